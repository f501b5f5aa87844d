/**
 * The tokenizer training loop: Gumbel temperature annealed 1 -> 1/16, KL weight raised to its
 * final value, cosine LR; metrics JSONL, periodic checkpoints and reconstruction sheets.
 */
import { appendFile, mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

import { ShuffledBatches, imagesAsFloats } from './data/batches'
import { LabeledImages } from './data/idx'
import { Rng } from './rng'
import { cosineRamp } from './schedule'
import { reconstructionSheet } from './sheet'
import { Dvae, TokenizerStepResult } from './tokenizer'

export interface TokenizerProgress extends TokenizerStepResult {
  step: number
  lr: number
  temperature: number
  klWeight: number
  /** Distinct codes of the batch / vocabulary size. */
  codesUsedFraction: number
  imagesPerSecond: number
}

export interface TokenizerEvaluation {
  /** Mean squared error of decode(encode(x)) in [0, 1] pixel space. */
  reconstructionMse: number
  /** Mean squared error of predicting the training set's mean image for every image. */
  meanImageMse: number
  /** exp(entropy) of the code histogram over the evaluation images. */
  perplexity: number
  /** Distinct codes over the evaluation images / vocabulary size. */
  codesUsedFraction: number
}

export interface TrainTokenizerOptions {
  tokenizer: Dvae
  data: LabeledImages
  steps: number
  batchSize: number
  /** Default: cosine from 1e-3 to 1e-5 over the run. */
  lr?: (step: number) => number
  /** Default: cosine 1 -> 1/16 over the run (DALL-E). */
  temperature?: (step: number) => number
  /** Default: cosine 0 -> 6.6 over the first half of the run (DALL-E's final weight). */
  klWeight?: (step: number) => number
  seed?: number
  /** Run folder: metrics.jsonl, tokenizer.safetensors, reconstructions.png. */
  outDir?: string
  /** Checkpoint and sheet every N steps (and at the end). Default 500. */
  checkpointEvery?: number
  /** Images for the sheet and the evaluation (the first ones of `evalData`). Default 16 / 1000. */
  sheetImages?: number
  evalImages?: number
  /** Held-out images for evaluation. Default: `data`. */
  evalData?: LabeledImages
  onProgress?: (p: TokenizerProgress) => void
}

export async function trainTokenizer(opts: TrainTokenizerOptions): Promise<{ history: TokenizerProgress[]; evaluation: TokenizerEvaluation }> {
  const { tokenizer, data, steps, batchSize } = opts
  if (data.channels !== tokenizer.config.numChannels) {
    throw new Error(`images have ${data.channels} channel(s) but the tokenizer expects ${tokenizer.config.numChannels}`)
  }
  const lr = opts.lr ?? cosineRamp({ from: 1e-3, to: 1e-5, steps })
  const temperature = opts.temperature ?? cosineRamp({ from: 1, to: 1 / 16, steps })
  const klWeight = opts.klWeight ?? cosineRamp({ from: 0, to: 6.6, steps: Math.ceil(steps / 2) })
  const every = opts.checkpointEvery ?? 500
  const rng = new Rng(opts.seed ?? 0)
  const batches = new ShuffledBatches(data, batchSize, rng)
  const size = { height: data.height, width: data.width }
  const evalData = opts.evalData ?? data
  const vocab = tokenizer.config.vocabSize
  if (opts.outDir !== undefined) await mkdir(opts.outDir, { recursive: true })
  const metricsPath = opts.outDir && join(opts.outDir, 'metrics.jsonl')
  if (metricsPath) await writeFile(metricsPath, '')

  const history: TokenizerProgress[] = []
  for (let step = 0; step < steps; step++) {
    const started = performance.now()
    const { pixels01 } = batches.next()
    const schedule = { lr: lr(step), temperature: temperature(step), klWeight: klWeight(step) }
    const result = await tokenizer.trainStep({ pixels: pixels01, size, ...schedule, seed: rng.nextSeed() })
    if (!Number.isFinite(result.loss)) throw new Error(`tokenizer loss is ${result.loss} at step ${step}`)
    const progress: TokenizerProgress = {
      step,
      ...schedule,
      ...result,
      codesUsedFraction: result.codesUsed / vocab,
      imagesPerSecond: batchSize / ((performance.now() - started) / 1000),
    }
    history.push(progress)
    opts.onProgress?.(progress)
    if (metricsPath) await appendFile(metricsPath, JSON.stringify(progress) + '\n')
    if (opts.outDir && ((step + 1) % every === 0 || step === steps - 1)) {
      await tokenizer.save(join(opts.outDir, 'tokenizer.safetensors'))
      await writeSheet(tokenizer, evalData, opts.sheetImages ?? 16, join(opts.outDir, 'reconstructions.png'))
    }
  }
  const evaluation = await evaluateTokenizer(tokenizer, evalData, data, opts.evalImages ?? 1000)
  if (opts.outDir) await writeFile(join(opts.outDir, 'evaluation.json'), JSON.stringify(evaluation, null, 2) + '\n')
  return { history, evaluation }
}

export async function writeSheet(tokenizer: Dvae, images: LabeledImages, count: number, path: string): Promise<void> {
  const n = Math.min(count, images.count)
  const originals = imagesAsFloats(images, n)
  const reconstructions = await roundTrip(tokenizer, originals, n, images)
  const sheet = reconstructionSheet({ originals, reconstructions, count: n, channels: images.channels, height: images.height, width: images.width })
  await writeFile(path, sheet)
}

function tokenGrid(tokenizer: Dvae, images: LabeledImages): { height: number; width: number } {
  return { height: images.height / tokenizer.downsample, width: images.width / tokenizer.downsample }
}

/** decode(encode(x)) of `count` images of the size of `images`. */
async function roundTrip(tokenizer: Dvae, x: Float32Array, count: number, images: LabeledImages): Promise<Float32Array> {
  const ids = await tokenizer.encode(x, count, { height: images.height, width: images.width })
  return tokenizer.decode(ids, count, tokenGrid(tokenizer, images))
}

/** Reconstruction error against the mean-image baseline, and codebook usage. */
export async function evaluateTokenizer(tokenizer: Dvae, evalData: LabeledImages, trainData: LabeledImages, maxImages: number): Promise<TokenizerEvaluation> {
  const n = Math.min(maxImages, evalData.count)
  const per = evalData.height * evalData.width * evalData.channels
  const mean = new Float64Array(per)
  for (let i = 0; i < trainData.count * per; i++) mean[i % per] += trainData.images[i] / 255 / trainData.count
  const counts = new Float64Array(tokenizer.config.vocabSize)
  let sqErr = 0
  let sqErrMean = 0
  const chunk = 100
  for (let start = 0; start < n; start += chunk) {
    const b = Math.min(chunk, n - start)
    const x = new Float32Array(b * per)
    for (let i = 0; i < b * per; i++) x[i] = evalData.images[start * per + i] / 255
    const ids = await tokenizer.encode(x, b, { height: evalData.height, width: evalData.width })
    for (const id of ids) counts[id]++
    const y = await tokenizer.decode(ids, b, tokenGrid(tokenizer, evalData))
    for (let i = 0; i < x.length; i++) {
      sqErr += (y[i] - x[i]) ** 2
      sqErrMean += (mean[i % per] - x[i]) ** 2
    }
  }
  const total = counts.reduce((a, c) => a + c, 0)
  let entropy = 0
  for (const c of counts) if (c > 0) entropy -= (c / total) * Math.log(c / total)
  return {
    reconstructionMse: sqErr / (n * per),
    meanImageMse: sqErrMean / (n * per),
    perplexity: Math.exp(entropy),
    codesUsedFraction: counts.filter((c) => c > 0).length / counts.length,
  }
}
