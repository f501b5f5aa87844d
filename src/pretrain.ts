/**
 * The masked-image-modeling pretraining loop (nanoGPT style: schedules, masking and logging
 * are helpers it calls). Data here is an in-memory image set; the streaming data pipeline
 * plugs in at the batch.
 */
import { ShuffledBatches } from './data/batches'
import { LabeledImages } from './data/idx'
import { MaskGenerator } from './masking'
import { Beit, TrainStepResult } from './model'
import { Rng } from './rng'
import { Dvae } from './tokenizer'

export interface PretrainProgress extends TrainStepResult {
  step: number
  lr: number
  /** Share of the batch's most frequent target among masked patches: the accuracy of always guessing it. */
  majorityBaseline: number
  imagesPerSecond: number
}

export interface PretrainOptions {
  model: Beit
  images: LabeledImages
  tokenizer: Dvae
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
  if (images.height !== height || images.width !== width || images.channels !== model.config.numChannels) {
    throw new Error(
      `images are ${images.height}x${images.width} with ${images.channels} channel(s) but the model expects ${height}x${width} with ${model.config.numChannels}`,
    )
  }
  const tokenGrid = [height / tokenizer.downsample, width / tokenizer.downsample]
  if (tokenGrid[0] !== model.grid[0] || tokenGrid[1] !== model.grid[1]) {
    throw new Error(
      `the tokenizer's token grid ${tokenGrid.join('x')} (image / ${tokenizer.downsample}) does not match the model's patch grid ${model.grid.join('x')}`,
    )
  }
  if (tokenizer.config.vocabSize > model.config.vocabSize) {
    throw new Error(`tokenizer vocabulary ${tokenizer.config.vocabSize} exceeds the model's vocabSize ${model.config.vocabSize}`)
  }
  if (masking.height * masking.width !== model.grid[0] * model.grid[1]) {
    throw new Error(`mask grid ${masking.height}x${masking.width} does not match the model's patch grid ${model.grid.join('x')}`)
  }
  const rng = new Rng(opts.seed ?? 0)
  const mean = opts.mean ?? 0.5
  const std = opts.std ?? 0.5
  const batches = new ShuffledBatches(images, batchSize, rng)
  const patches = model.grid[0] * model.grid[1]
  const history: PretrainProgress[] = []
  for (let step = 0; step < steps; step++) {
    const started = performance.now()
    const { pixels01 } = batches.next()
    const mask = new Uint8Array(batchSize * patches)
    for (let b = 0; b < batchSize; b++) mask.set(masking.generate(), b * patches)
    const targets = await tokenizer.encode(pixels01, batchSize)
    const pixels = pixels01.map((v) => (v - mean) / std)
    const lr = opts.lr(step)
    const result = await model.trainStep({ pixels, mask, targets, lr, seed: rng.nextSeed() })
    if (!Number.isFinite(result.loss)) throw new Error(`non-finite loss ${result.loss} at step ${step}`)
    const progress = { ...result, step, lr, majorityBaseline: majorityShare(targets, mask), imagesPerSecond: batchSize / ((performance.now() - started) / 1000) }
    history.push(progress)
    opts.onProgress?.(progress)
  }
  return history
}

function majorityShare(targets: Int32Array, mask: Uint8Array): number {
  const counts = new Map<number, number>()
  let masked = 0
  for (let i = 0; i < mask.length; i++) {
    if (mask[i] === 0) continue
    masked++
    counts.set(targets[i], (counts.get(targets[i]) ?? 0) + 1)
  }
  return Math.max(...counts.values()) / masked
}
