/** Reconstruction sheets: originals above reconstructions, as one PNG a person can look at. */
import { encodePng } from './png'

export interface SheetImages {
  /** [B, C, H, W] in [0, 1]. */
  originals: Float32Array
  reconstructions: Float32Array
  count: number
  channels: 1 | 3
  height: number
  width: number
  /** Images per row pair. Default min(count, 8). */
  perRow?: number
  /** Integer upscaling of each image. Default 2. */
  scale?: number
}

/** Rows of originals, each followed by the row of their reconstructions, 2 px gaps. */
export function reconstructionSheet(s: SheetImages): Uint8Array {
  const perRow = s.perRow ?? Math.min(s.count, 8)
  const scale = s.scale ?? 2
  const gap = 2
  const cellW = s.width * scale + gap
  const cellH = s.height * scale + gap
  const pairs = Math.ceil(s.count / perRow)
  const W = perRow * cellW + gap
  const H = pairs * 2 * cellH + gap
  const out = new Uint8Array(W * H * s.channels).fill(255)
  const plane = s.height * s.width
  const put = (src: Float32Array, index: number, top: number, left: number) => {
    for (let y = 0; y < s.height * scale; y++) {
      for (let x = 0; x < s.width * scale; x++) {
        const p = Math.floor(y / scale) * s.width + Math.floor(x / scale)
        for (let c = 0; c < s.channels; c++) {
          const v = src[(index * s.channels + c) * plane + p]
          out[((top + y) * W + left + x) * s.channels + c] = Math.round(Math.min(1, Math.max(0, v)) * 255)
        }
      }
    }
  }
  for (let i = 0; i < s.count; i++) {
    const row = Math.floor(i / perRow)
    const left = gap + (i % perRow) * cellW
    put(s.originals, i, gap + 2 * row * cellH, left)
    put(s.reconstructions, i, gap + (2 * row + 1) * cellH, left)
  }
  return encodePng(out, W, H, s.channels)
}
