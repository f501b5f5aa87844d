/** What the model classes share: an atomic checkpoint with the optimizer and the loop's position. */
import { NativePlaced, Placed } from './device'

interface NativeCheckpointed extends NativePlaced {
  save(path: string): Promise<void>
  readonly optimizerStep: number
  trainState: string | null
}

export abstract class Checkpointed<Handle extends NativeCheckpointed> extends Placed<Handle> {
  /** Writes weights, config, optimizer state and `trainState` atomically (temp file, then rename). */
  save(path: string): Promise<void> {
    return this.handle.save(path)
  }

  /** Optimizer updates taken so far. */
  get step(): number {
    return this.handle.optimizerStep
  }

  /**
   * The training loop's position (JSON-serialisable), written into and read back from the
   * checkpoint with the weights, so one atomic file resumes a run.
   */
  get trainState(): unknown {
    const json = this.handle.trainState
    return json == null ? undefined : JSON.parse(json)
  }

  set trainState(state: unknown) {
    this.handle.trainState = state === undefined ? null : JSON.stringify(state)
  }
}
