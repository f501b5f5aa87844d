/** What the model classes share: an atomic checkpoint with the optimizer and the loop's position. */
import { DeviceOptions, DeviceSpec, NativePlaced, place } from './device'

interface NativeCheckpointed extends NativePlaced {
  save(path: string): Promise<void>
  readonly optimizerStep: number
  trainState: string | null
}

export abstract class Checkpointed<Handle extends NativeCheckpointed> {
  protected constructor(protected readonly handle: Handle) {}

  /** Writes weights, config, optimizer state and `trainState` atomically (temp file, then rename). */
  save(path: string): Promise<void> {
    return this.handle.save(path)
  }

  /** Where it runs: 'cpu' or 'cuda:N'. */
  get device(): string {
    return this.handle.device
  }

  /** Activation precision of later steps and predictions: 'f32' or 'bf16'. */
  get precision(): string {
    return this.handle.precision
  }

  /** Moves weights and optimizer state and sets the precision; later steps run there. */
  toDevice(device: DeviceSpec, opts: Omit<DeviceOptions, 'device'> = {}): void {
    place(this.handle, { ...opts, device })
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
