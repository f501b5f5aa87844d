/**
 * Where a model runs. 'auto' is a CUDA GPU when the CUDA build of the addon is loaded
 * (beit-linux-x64-gnu-cuda installed, NVIDIA driver present) and sees one, else the CPU;
 * 'cuda' / 'cuda:N' where there is none is an error that says why.
 */
import { native } from './native'

export type DeviceSpec = 'auto' | 'cpu' | 'cuda' | `cuda:${number}`

/**
 * Activation precision. 'bf16' is mixed precision: bf16 activations and matmuls (tensor
 * cores), f32 master weights, optimizer moments, norm/softmax reductions and losses. On the
 * CPU, 'bf16' computes activations in f32 and rounds the GEMM inputs to bf16, summing in f32
 * (the linear layers of the MIM model and the classifier, the convolutions of the segmentation
 * head and the tokenizer; AVX512-BF16 makes it faster than f32 on AMD Zen 4/5, see the README);
 * a tokenizer's training step with many activations keeps them for its backward pass in bf16.
 * 'auto' is 'bf16' on a GPU and 'f32' on the CPU. A tokenizer decodes in f32 at any precision,
 * and trains in bf16 only on the CPU (on a GPU its training runs in f32).
 */
export type PrecisionSpec = 'auto' | 'f32' | 'bf16'

export interface DeviceOptions {
  /** Default 'auto'. */
  device?: DeviceSpec
  /** Default 'auto'. */
  precision?: PrecisionSpec
}

/** GPUs the loaded addon can use (0 with the CPU build). */
export function cudaDeviceCount(): number {
  return native.cudaDeviceCount()
}

/**
 * How many times faster this CPU runs the engine's bf16 GEMMs than its f32 ones, measured once
 * per process (about 10 ms): 1.7-1.8 on an AMD Zen 4; below 1 where bf16 is slower than f32
 * (Intel Xeons without AMX run `vdpbf16ps` at half the f32 rate; CPUs without AVX512-BF16
 * emulate it). `precision: 'bf16'` pays on the CPU where this is well above 1.
 */
export function bf16GemmSpeedup(): number {
  return native.bf16GemmSpeedup()
}

/** 'cpu' or 'cuda:N' for a spec (itself a spec: a model can be moved there). */
export function resolveDevice(spec: DeviceSpec = 'auto'): 'cpu' | `cuda:${number}` {
  if (spec === 'auto') return cudaDeviceCount() > 0 ? 'cuda:0' : 'cpu'
  if (spec === 'cuda') return 'cuda:0'
  if (typeof spec !== 'string')
    throw new TypeError(`device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got ${typeof spec}`)
  return spec // anything else is checked natively, with the reason it cannot be used
}

/** 'f32' or 'bf16' for a spec on a resolved device ('cpu' or 'cuda:N'). */
export function resolvePrecision(spec: PrecisionSpec = 'auto', device: string): 'f32' | 'bf16' {
  if (spec === 'auto') return device.startsWith('cuda') ? 'bf16' : 'f32'
  if (spec !== 'f32' && spec !== 'bf16')
    throw new Error(`precision must be 'auto', 'f32' or 'bf16', got ${JSON.stringify(spec)}`)
  return spec
}

export interface NativePlaced {
  readonly device: string
  toDevice(device: string): void
  precision: string
}

/** Moves a native model to the options' device when it is not there already, and sets its precision. */
export function place<H extends NativePlaced>(handle: H, opts: DeviceOptions = {}): H {
  const target = resolveDevice(opts.device)
  const precision = resolvePrecision(opts.precision, target)
  if (handle.device !== target) handle.toDevice(target)
  handle.precision = precision
  return handle
}

/** What every model class shares: where its native handle runs, and in which precision. */
export abstract class Placed<Handle extends NativePlaced> {
  protected constructor(protected readonly handle: Handle) {}

  /** @internal The native handle, for native calls that take two models (a pretraining step). */
  nativeHandle(): Handle {
    return this.handle
  }

  /** Where it runs: 'cpu' or 'cuda:N'. */
  get device(): string {
    return this.handle.device
  }

  /** 'f32' or 'bf16': of training steps and predictions (for a tokenizer, of `encode`). */
  get precision(): string {
    return this.handle.precision
  }

  /** Moves weights and optimizer state (and a tokenizer's EMA) and sets the precision; later calls run there. */
  toDevice(device: DeviceSpec, opts: Omit<DeviceOptions, 'device'> = {}): void {
    place(this.handle, { ...opts, device })
  }
}
