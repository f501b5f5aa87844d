/** Pictures a person can look at: reconstruction sheets (originals above reconstructions) and segmentation predictions. */
import { checkPositiveInteger } from './check'
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
  checkPositiveInteger('count', s.count)
  const perRow = checkPositiveInteger('perRow', s.perRow ?? Math.min(s.count, 8))
  const scale = checkPositiveInteger('scale', s.scale ?? 2)
  for (const [name, images] of [
    ['originals', s.originals],
    ['reconstructions', s.reconstructions],
  ] as const) {
    if (images.length < s.count * s.channels * s.height * s.width)
      throw new Error(
        `${name}: expected ${s.count} images of ${s.channels}x${s.height}x${s.width} values, got ${images.length} values`,
      )
  }
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

/**
 * The colour of class `id`: PASCAL VOC's palette (the id's bits spread over the high bits of
 * R, G and B), so that ids keep their colours across pictures; the ignore index is white.
 */
export function classColour(id: number, ignoreIndex = 255): [number, number, number] {
  if (id === ignoreIndex) return [255, 255, 255]
  const rgb: [number, number, number] = [0, 0, 0]
  for (let bit = 0, c = id; c > 0; bit++, c >>= 3) {
    for (let k = 0; k < 3; k++) rgb[k] |= ((c >> k) & 1) << (7 - bit)
  }
  return rgb
}

export interface PredictionSheetInput {
  /** The images as fed to the segmenter ([N, C, H, W], normalised with `view`) and their true masks. */
  batch: { pixels: Float32Array; masks: Uint8Array; size: number }
  /** Predicted class ids [N, H, W]. */
  predicted: Uint8Array
  view: { size: [number, number]; channels: number; mean: number[]; std: number[] }
  /** Rows (images) drawn. */
  count: number
  /** The masks' ignore index (drawn white), the segmenter's `semanticLossIgnoreIndex`. */
  ignoreIndex: number
}

/** One row per image: the image | its true mask | the predicted mask, in the class palette, 2 px gaps. */
export function predictionSheet(s: PredictionSheetInput): Uint8Array {
  const [h, w] = s.view.size
  const channels = s.view.channels
  const scale = Math.max(1, Math.floor(128 / Math.max(h, w)))
  const gap = 2
  const W = 3 * (w * scale + gap) + gap
  const H = s.count * (h * scale + gap) + gap
  const out = new Uint8Array(W * H * 3).fill(255)
  const plane = h * w
  const put = (top: number, left: number, colour: (p: number) => [number, number, number]) => {
    for (let y = 0; y < h * scale; y++) {
      for (let x = 0; x < w * scale; x++) {
        const rgb = colour(Math.floor(y / scale) * w + Math.floor(x / scale))
        out.set(rgb, ((top + y) * W + left + x) * 3)
      }
    }
  }
  for (let i = 0; i < s.count; i++) {
    const top = gap + i * (h * scale + gap)
    const value = (c: number, p: number) => {
      const v = s.batch.pixels[(i * channels + c) * plane + p] * s.view.std[c] + s.view.mean[c]
      return Math.round(Math.min(1, Math.max(0, v)) * 255)
    }
    put(top, gap, (p) =>
      channels === 3 ? [value(0, p), value(1, p), value(2, p)] : [value(0, p), value(0, p), value(0, p)],
    )
    put(top, gap + (w * scale + gap), (p) => classColour(s.batch.masks[i * plane + p], s.ignoreIndex))
    put(top, gap + 2 * (w * scale + gap), (p) => classColour(s.predicted[i * plane + p], s.ignoreIndex))
  }
  return encodePng(out, W, H, 3)
}
