/** What the model classes share: an atomic checkpoint with the optimizer and the loop's position. */
import { checkLr } from './check'
import { NativePlaced, Placed } from './device'
import type { UpdateMetrics } from './native'

interface NativeCheckpointed extends NativePlaced {
  save(path: string): Promise<void>
  applyUpdate(lr: number): Promise<UpdateMetrics>
  distribute(): Promise<void>
  readonly optimizerStep: number
  readonly pendingLossTerms: number
  trainState: string | null
}

export abstract class Checkpointed<Handle extends NativeCheckpointed> extends Placed<Handle> {
  /** Writes weights, config, optimizer state and `trainState` atomically (temp file, then rename). */
  save(path: string): Promise<void> {
    return this.handle.save(path)
  }

  /**
   * Clip, AdamW (and the tokenizer's EMA) from the gradients `lossAndGrads` added since the
   * last update: their mean over the loss terms they sum, so batches accumulate into the
   * gradient of one big batch. Empties them (also when a non-finite gradient norm skips the
   * update); a bad `lr` is refused first and keeps them.
   */
  applyUpdate(lr: number): Promise<UpdateMetrics> {
    return this.handle.applyUpdate(checkLr(lr))
  }

  /**
   * Makes this model one replica of the data-parallel job `initDistributed` joined: rank 0's
   * weights, EMA and optimizer state replace every rank's (its config and options must be every
   * rank's: a difference is an error on every rank naming the rank and the field), and every
   * later update averages the gradients of all ranks. The training loops call it.
   */
  distribute(): Promise<void> {
    return this.handle.distribute()
  }

  /** Loss terms (masked patches, images) whose gradients wait for `applyUpdate`. */
  get pendingLossTerms(): number {
    return this.handle.pendingLossTerms
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
