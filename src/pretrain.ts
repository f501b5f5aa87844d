/**
 * The masked-image-modeling pretraining loop (nanoGPT style: schedules, masking and logging
 * are helpers it calls). Data here is an in-memory grayscale image set; the streaming data
 * pipeline and the dVAE tokenizer plug in at the same two places (batch, tokenize).
 */
import { LabeledImages } from './data/idx'
import { MaskGenerator } from './masking'
import { Beit, TrainStepResult } from './model'
import { Rng } from './rng'

export interface Tokenizer {
  readonly vocabSize: number
  /** pixels01 [B, C, H, W] in [0, 1] -> ids [B, N]. */
  encode(pixels01: Float32Array, batch: number, channels: number, height: number, width: number): Int32Array
}

export interface PretrainProgress extends TrainStepResult {
  step: number
  lr: number
  imagesPerSecond: number
}

export interface PretrainOptions {
  model: Beit
  images: LabeledImages
  tokenizer: Tokenizer
  masking: MaskGenerator
  steps: number
  batchSize: number
  /** Learning rate at each step (0-based). */
  lr: (step: number) => number
  /** Shuffling and stochastic-depth seed. Default 0. */
  seed?: number
  /** Per-channel normalisation of the patch view. Default 0.5 / 0.5 (BEiT's). */
  mean?: number
  std?: number
  onProgress?: (p: PretrainProgress) => void
}

export async function pretrain(opts: PretrainOptions): Promise<PretrainProgress[]> {
  const { model, images, tokenizer, masking, steps, batchSize } = opts
  const [height, width] = model.config.imageSize
  if (images.height !== height || images.width !== width || model.config.numChannels !== 1) {
    throw new Error(
      `images are ${images.height}x${images.width} grayscale but the model expects ${height}x${width} with ${model.config.numChannels} channel(s)`,
    )
  }
  if (tokenizer.vocabSize > model.config.vocabSize) {
    throw new Error(`tokenizer vocabulary ${tokenizer.vocabSize} exceeds the model's vocabSize ${model.config.vocabSize}`)
  }
  if (masking.height * masking.width !== model.grid[0] * model.grid[1]) {
    throw new Error(`mask grid ${masking.height}x${masking.width} does not match the model's patch grid ${model.grid.join('x')}`)
  }
  const rng = new Rng(opts.seed ?? 0)
  const mean = opts.mean ?? 0.5
  const std = opts.std ?? 0.5
  const pixelsPerImage = height * width
  const order = shuffled(images.count, rng)
  let cursor = 0
  const history: PretrainProgress[] = []
  for (let step = 0; step < steps; step++) {
    const started = performance.now()
    const raw = new Float32Array(batchSize * pixelsPerImage)
    const mask = new Uint8Array(batchSize * model.grid[0] * model.grid[1])
    for (let b = 0; b < batchSize; b++) {
      if (cursor === order.length) {
        order.set(shuffled(images.count, rng))
        cursor = 0
      }
      const src = order[cursor++] * pixelsPerImage
      for (let i = 0; i < pixelsPerImage; i++) raw[b * pixelsPerImage + i] = images.images[src + i] / 255
      mask.set(masking.generate(), b * masking.height * masking.width)
    }
    const targets = tokenizer.encode(raw, batchSize, 1, height, width)
    const pixels = raw.map((v) => (v - mean) / std)
    const lr = opts.lr(step)
    const result = await model.trainStep({ pixels, mask, targets, lr, seed: rng.nextSeed() })
    if (!Number.isFinite(result.loss)) throw new Error(`non-finite loss ${result.loss} at step ${step}`)
    const progress = { ...result, step, lr, imagesPerSecond: batchSize / ((performance.now() - started) / 1000) }
    history.push(progress)
    opts.onProgress?.(progress)
  }
  return history
}

function shuffled(n: number, rng: Rng): Uint32Array {
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
