/**
 * Real segmentation data without a download: Fashion-MNIST scenes (the M2NIST construction).
 * Each scene pastes 1 to `maxGarments` garments of a Fashion-MNIST split, without overlap, on
 * a black canvas; a pixel's label is its garment's class + 1 where the garment's pixel is
 * foreground (>= `threshold`), else 0 (background). Scenes for training come from the train
 * split and scenes for testing from the test split, so no garment is in both.
 */
import type { LabeledImages } from '../data/idx'
import { Rng } from '../rng'
import type { SegmentationDataset } from './data'
import { checkPositiveInteger } from '../check'

export interface FashionScenesOptions {
  count: number
  /** Canvas [height, width]. Default [64, 64]. */
  size?: [number, number]
  /** Garments per scene, at most. Default 3. */
  maxGarments?: number
  /** Garment pixels at or above it are foreground. Default 32 (of 255): the faint halo is background. */
  threshold?: number
  seed?: number
  name?: string
}

/** Tries at a free place for a garment before the scene stops adding garments. */
const PLACEMENT_TRIES = 50

export function fashionScenes(source: LabeledImages, opts: FashionScenesOptions): SegmentationDataset {
  const [height, width] = opts.size ?? [64, 64]
  const { count } = opts
  const maxGarments = opts.maxGarments ?? 3
  const threshold = opts.threshold ?? 32
  const { height: gh, width: gw } = source
  checkPositiveInteger('count', count)
  if (height < gh || width < gw)
    throw new Error(`a ${height}x${width} canvas cannot hold a ${gh}x${gw} garment: expected at least ${gh}x${gw}`)
  checkPositiveInteger('maxGarments', maxGarments)
  const rng = new Rng(opts.seed ?? 0)
  const images = new Uint8Array(count * height * width)
  const masks = new Uint8Array(count * height * width)
  for (let s = 0; s < count; s++) {
    const base = s * height * width
    const boxes: [number, number][] = []
    const garments = rng.int(1, maxGarments)
    for (let g = 0; g < garments; g++) {
      let place: [number, number] | undefined
      for (let t = 0; t < PLACEMENT_TRIES && !place; t++) {
        const y = rng.int(0, height - gh)
        const x = rng.int(0, width - gw)
        if (boxes.every(([by, bx]) => y + gh <= by || by + gh <= y || x + gw <= bx || bx + gw <= x)) place = [y, x]
      }
      if (!place) break
      boxes.push(place)
      const item = rng.int(0, source.count - 1)
      const label = source.labels[item] + 1
      for (let r = 0; r < gh; r++) {
        for (let c = 0; c < gw; c++) {
          const v = source.images[(item * gh + r) * gw + c]
          const at = base + (place[0] + r) * width + place[1] + c
          images[at] = v
          if (v >= threshold) masks[at] = label
        }
      }
    }
  }
  return {
    name: opts.name ?? `fashion-scenes-${count}`,
    size: count,
    source: { kind: 'pixels', images, masks, height, width, channels: 1 },
    classNames: ['background', ...source.classNames],
    reduceZeroLabel: false,
  }
}
