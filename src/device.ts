/**
 * Where a model runs. 'auto' is a CUDA GPU when the CUDA build of the addon is loaded
 * (beit-linux-x64-gnu-cuda installed, NVIDIA driver present) and sees one, else the CPU;
 * 'cuda' / 'cuda:N' where there is none is an error that says why.
 */
import { native } from './native'

export type DeviceSpec = 'auto' | 'cpu' | 'cuda' | `cuda:${number}`

export interface DeviceOptions {
  /** Default 'auto'. */
  device?: DeviceSpec
}

/** GPUs the loaded addon can use (0 with the CPU build). */
export function cudaDeviceCount(): number {
  return native.cudaDeviceCount()
}

/** 'cpu' or 'cuda:N' for a spec. */
export function resolveDevice(spec: DeviceSpec = 'auto'): string {
  if (spec === 'auto') return cudaDeviceCount() > 0 ? 'cuda:0' : 'cpu'
  if (spec === 'cuda') return 'cuda:0'
  if (typeof spec !== 'string') throw new TypeError(`device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got ${typeof spec}`)
  return spec // anything else is checked natively, with the reason it cannot be used
}

interface NativePlaced {
  readonly device: string
  toDevice(device: string): void
}

/** Moves a native model to `spec` when it is not there already. */
export function place<H extends NativePlaced>(handle: H, spec: DeviceSpec | undefined): H {
  const target = resolveDevice(spec)
  if (handle.device !== target) handle.toDevice(target)
  return handle
}
