/** In-memory 8-bit images as floats, and the seeded shuffle behind every epoch order. */
import { Rng } from '../rng'
import { LabeledImages } from './idx'

/** The first `count` images as [count, C, H, W] floats in [0, 1]. */
export function imagesAsFloats(images: LabeledImages, count = images.count): Float32Array {
  if (!(Number.isInteger(count) && count >= 0 && count <= images.count))
    throw new Error(`imagesAsFloats: count must be an integer in [0, ${images.count}], got ${count}`)
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
