/**
 * Shuffled mini-batches over an in-memory 8-bit image set, as [B, C, H, W] floats in [0, 1].
 * Epoch-wise reshuffling from a seeded RNG, so a run's batches replay given the seed.
 */
import { Rng } from '../rng'
import { LabeledImages } from './idx'

export interface ImageBatch {
  /** [B, C, H, W] in [0, 1]. */
  pixels01: Float32Array
  /** Dataset indices of the batch's images. */
  indices: Uint32Array
}

export class ShuffledBatches {
  private order: Uint32Array
  private cursor = 0

  constructor(
    readonly images: LabeledImages,
    readonly batchSize: number,
    private readonly rng: Rng,
  ) {
    if (!Number.isInteger(batchSize) || batchSize <= 0) throw new Error(`batchSize must be a positive integer, got ${batchSize}`)
    if (images.count === 0) throw new Error('the dataset is empty')
    this.order = permutation(images.count, rng)
  }

  next(): ImageBatch {
    const { height, width, channels } = this.images
    const per = height * width * channels
    const pixels01 = new Float32Array(this.batchSize * per)
    const indices = new Uint32Array(this.batchSize)
    for (let b = 0; b < this.batchSize; b++) {
      if (this.cursor === this.order.length) {
        this.order = permutation(this.images.count, this.rng)
        this.cursor = 0
      }
      const index = this.order[this.cursor++]
      indices[b] = index
      const src = this.images.images.subarray(index * per, (index + 1) * per)
      for (let i = 0; i < per; i++) pixels01[b * per + i] = src[i] / 255
    }
    return { pixels01, indices }
  }
}

/** The first `count` images as [count, C, H, W] floats in [0, 1]. */
export function imagesAsFloats(images: LabeledImages, count = images.count): Float32Array {
  const per = images.height * images.width * images.channels
  const out = new Float32Array(count * per)
  for (let i = 0; i < count * per; i++) out[i] = images.images[i] / 255
  return out
}

export function permutation(n: number, rng: Rng): Uint32Array {
  const order = new Uint32Array(n)
  for (let i = 0; i < n; i++) order[i] = i
  for (let i = n - 1; i > 0; i--) {
    const j = rng.int(0, i)
    const t = order[i]
    order[i] = order[j]
    order[j] = t
  }
  return order
}
