/**
 * The tokenizer training loop: Gumbel temperature annealed 1 -> 1/16, KL weight raised to its
 * final value, cosine LR; metrics JSONL, periodic checkpoints and reconstruction sheets. Images
 * come through the image loader, so any dataset works: they are resized to the tokenizer's input.
 */
import { join } from 'node:path'

import { Transform, ViewSpec, viewSpec } from './data/augment'
import { ImageDataset, pixelDataset } from './data/dataset'
import type { LabeledImages } from './data/idx'
import { ImageLoader, LoaderOptions } from './data/loader'
import { checkSameAcrossRanks } from './distributed'
import { deriveSeed } from './rng'
import {
  applyComputedUpdate,
  batching,
  endsUpdate,
  firstSample,
  LoopOptions,
  LoopPosition,
  LoopProgress,
  resolveSteps,
  Run,
  RunResult,
  Schedule,
  scheduleFor,
  startPosition,
  UpdateMeans,
  updatesPerEpoch,
  writeAtomic,
} from './run'
import { cosineRamp } from './schedule'
import { reconstructionSheet } from './sheet'
import { native } from './native'
import { Dvae, DvaeStepMetrics } from './tokenizer'
import { checkPositiveInteger } from './check'

/** Images for a tokenizer: any dataset (image folder, manifest, in-memory pixels) or IDX images. */
export type TokenizerData = ImageDataset | LabeledImages

function asDataset(data: TokenizerData, name: string): ImageDataset {
  return 'source' in data ? data : pixelDataset(data, name)
}

/**
 * The tokenizer's input: its image size (whatever the images' own), Lanczos, its channels, in
 * [0, 1] (`encode` applies the logit-Laplace pixel map itself).
 */
function tokenizerView(tokenizer: Dvae): ViewSpec {
  const { imageSize, numChannels } = tokenizer.config
  return viewSpec({ size: imageSize, interpolation: 'lanczos', channels: numChannels })
}

/** Values of one image at the tokenizer's input. */
function valuesPerImage(tokenizer: Dvae): number {
  return tokenizer.config.numChannels * tokenizer.config.imageSize[0] * tokenizer.config.imageSize[1]
}

/**
 * A loader of `data` at the tokenizer's input: whole images, resized (no augmentation), unless
 * `transform` says otherwise.
 */
export function tokenizerLoader(
  tokenizer: Dvae,
  data: TokenizerData,
  opts: Omit<LoaderOptions, 'dataset' | 'views' | 'transform'> & { transform?: Transform },
): ImageLoader {
  return new ImageLoader({
    ...opts,
    dataset: asDataset(data, 'images'),
    views: [tokenizerView(tokenizer)],
    transform: opts.transform ?? { kind: 'eval', cropFraction: 1 },
  })
}

/** Seed of the image samples behind evaluations and sheets, so they are the same in every run. */
const SAMPLE_SEED = 0x5eed

export interface TokenizerProgress extends DvaeStepMetrics, LoopProgress {
  temperature: number
  klWeight: number
  /** Distinct codes of the batch / vocabulary size. */
  codesUsedFraction: number
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

/** The tokenizer's default learning rate: cosine from 1e-3 to 1e-5 over the run, no warmup. */
export const TOKENIZER_SCHEDULE: Schedule = { lr: 1e-3, minLr: 1e-5, warmupSteps: 0 }

export interface TrainTokenizerOptions extends Omit<LoopOptions, 'schedule'> {
  tokenizer: Dvae
  /** Training images, resized to the tokenizer's input size and channels by the loader. */
  data: TokenizerData
  /** Augmentation of the training images. Default: none (the whole image, resized). */
  transform?: Transform
  /** Learning rate per step. Default TOKENIZER_SCHEDULE: cosine from 1e-3 to 1e-5, no warmup. */
  schedule?: Schedule
  /** Default: cosine 1 -> 1/16 over the run, 1/16 at its last step (DALL-E). */
  temperature?: (step: number) => number
  /**
   * KL weight per step. A number is the final weight of the default ramp: cosine from 0 to it
   * over the first half of the run. Default 6.6 (DALL-E's).
   */
  klWeight?: number | ((step: number) => number)
  /** Images on the reconstruction sheet (written with each checkpoint) and in the evaluation (seeded random samples). Default 16 / 1000. */
  sheetImages?: number
  evalImages?: number
  /** Held-out images for evaluation. Default: `data`. */
  evalData?: TokenizerData
  onProgress?: (p: TokenizerProgress) => void
}

/** Where a tokenizer run stands; stored in the checkpoint. */
interface TokenizerState extends LoopPosition {
  kind: 'tokenizer'
}

/**
 * Trains `tokenizer`; the run folder `outDir` gets checkpoint.safetensors (with the loop's
 * position, so a tokenizer loaded from it with `Dvae.load` resumes the very steps of an
 * uninterrupted run), metrics.jsonl, curves.svg, reconstructions.png (with each checkpoint) and,
 * when the run completes, its evaluation in evaluation.json.
 */
export async function trainTokenizer(
  opts: TrainTokenizerOptions,
): Promise<RunResult & { evaluation?: TokenizerEvaluation }> {
  const { tokenizer, batchSize } = opts
  const b = batching(opts)
  const { accumulate, distributed: dist } = b
  const seed = opts.seed ?? 0
  for (const key of ['sheetImages', 'evalImages'] as const)
    if (opts[key] !== undefined) checkPositiveInteger(key, opts[key])
  const data = asDataset(opts.data, 'training images')
  const evalData = opts.evalData === undefined ? data : asDataset(opts.evalData, 'evaluation images')
  const loader = tokenizerLoader(tokenizer, data, {
    transform: opts.transform,
    batchSize,
    seed,
    dropLast: true,
    threads: opts.threads,
    rank: dist.rank,
    worldSize: dist.worldSize,
  })
  const updates = updatesPerEpoch(b, loader.batchesPerEpoch, data)
  const totalSteps = resolveSteps(opts.steps, opts.epochs, updates)
  checkSameAcrossRanks(dist, 'tokenizer run', { images: data.size, batchSize, accumulate, totalSteps, seed })
  const lr = scheduleFor(opts.schedule ?? TOKENIZER_SCHEDULE, totalSteps)
  // Annealed to 1/16 at the last step (totalSteps - 1), as the LR reaches its minimum there.
  const temperature = opts.temperature ?? cosineRamp({ from: 1, to: 1 / 16, steps: totalSteps - 1 })
  const klWeight =
    typeof opts.klWeight === 'function'
      ? opts.klWeight
      : cosineRamp({ from: 0, to: opts.klWeight ?? 6.6, steps: Math.ceil(totalSteps / 2) })
  const [height, width] = tokenizer.config.imageSize
  const vocab = tokenizer.config.vocabSize
  const fresh: TokenizerState = startPosition('tokenizer', totalSteps, b, seed)
  // The run folder, its metrics log, and the position to continue from when the tokenizer carries one.
  const run = await Run.open({
    outDir: opts.outDir,
    saved: tokenizer.trainState,
    fresh,
    owner: 'tokenizer',
    runName: 'tokenizer training',
    title: 'dVAE tokenizer',
    panels: [
      { key: 'loss' },
      { key: 'reconLoss', title: 'reconstruction loss' },
      { key: 'perplexity', title: 'batch codebook perplexity' },
      { key: 'lr', log: true },
    ],
    checkpointEvery: opts.checkpointEvery,
    signal: opts.signal,
    distributed: dist,
  })
  let state = run.start
  if (dist.worldSize > 1) await tokenizer.distribute()
  const means = new UpdateMeans(['loss', 'reconLoss', 'kl', 'perplexity', 'codesUsed'] as const)
  const save = async () => {
    tokenizer.trainState = state
    await tokenizer.save(run.checkpoint)
    const sheet = join(opts.outDir, 'reconstructions.png')
    await writeSheet(tokenizer, evalData, opts.sheetImages ?? 16, sheet, opts.threads)
  }

  let epoch = state.epoch
  let fromBatch = state.batch + 1
  // Batches of the current update that ran lossAndGrads on this rank.
  let computed = 0
  while (state.step < totalSteps) {
    const stepsBefore = state.step
    let started = performance.now()
    for await (const batch of loader.epoch(epoch, { fromBatch })) {
      if (state.step >= totalSteps || batch.batch >= updates * accumulate) break
      const step = state.step
      const schedule = { lr: lr(step), temperature: temperature(step), klWeight: klWeight(step) }
      const draws = { seed: deriveSeed(seed, step, 1), firstSample: firstSample(b, batch.batch) }
      const { lr: stepLr, ...relaxation } = schedule
      if (batch.size > 0) {
        const input = { pixels: batch.views[0], size: { height, width }, ...relaxation, ...draws }
        const losses = await tokenizer.lossAndGrads(input)
        means.add(losses, batch.size)
        computed++
      }
      if (!endsUpdate(b, batch.batch)) continue
      const gradNorm = await applyComputedUpdate(tokenizer, b, computed, stepLr)
      computed = 0
      // Over the update's batches on every rank; perplexity and codes used are the batches' means.
      const { weight: images, ...mean } = means.take(dist)
      const result = { ...mean, gradNorm }
      const progress: TokenizerProgress = {
        ...result,
        ...schedule,
        step,
        totalSteps,
        epoch,
        codesUsedFraction: result.codesUsed / vocab,
        imagesPerSecond: images / ((performance.now() - started) / 1000),
      }
      state = { ...state, step: step + 1, epoch, batch: batch.batch }
      await run.metrics.record({
        step,
        epoch,
        ...result,
        ...schedule,
        codesUsedFraction: progress.codesUsedFraction,
        images,
        imagesPerSecond: progress.imagesPerSecond,
      })
      opts.onProgress?.(progress)
      if (await run.afterStep(state.step, save)) return run.end('interrupted', state.step)
      started = performance.now()
    }
    // A whole epoch without a step (not the rest of one a resumed run starts in, which may be
    // empty: a run saved after an epoch's last step).
    if (fromBatch === 0 && state.step === stepsBefore)
      throw new Error(`no readable images in ${data.name} (${loader.stats.skipped} skipped)`)
    epoch++
    fromBatch = 0
  }
  // Every rank evaluates (the same images, so the same result); rank 0 writes it.
  const evaluation = await evaluateTokenizer(tokenizer, evalData, data, opts.evalImages ?? 1000, opts.threads)
  if (run.main) await writeAtomic(join(opts.outDir, 'evaluation.json'), JSON.stringify(evaluation, null, 2) + '\n')
  return { ...(await run.end('completed', state.step)), evaluation }
}

/**
 * Up to `count` whole images of `data` at the tokenizer's input, in batches of up to `chunk`:
 * a seeded random sample (the first images of a folder are often all of one class).
 */
async function* sampleImages(
  tokenizer: Dvae,
  data: TokenizerData,
  count: number,
  chunk: number,
  threads?: number,
): AsyncGenerator<{ pixels: Float32Array; size: number }> {
  const per = valuesPerImage(tokenizer)
  const loader = tokenizerLoader(tokenizer, data, {
    batchSize: Math.max(1, Math.min(chunk, count)),
    seed: SAMPLE_SEED,
    threads,
  })
  let left = count
  for await (const batch of loader.epoch(0)) {
    const size = Math.min(batch.size, left)
    yield { pixels: batch.views[0].subarray(0, size * per), size }
    left -= size
    if (left === 0) return
  }
}

/** A sample of `count` images of `data` above decode(encode(image)), as a PNG at `path`; returns the number shown. */
export async function writeSheet(
  tokenizer: Dvae,
  data: TokenizerData,
  count: number,
  path: string,
  threads?: number,
): Promise<number> {
  const { value: batch } = await sampleImages(tokenizer, data, count, count, threads).next()
  if (!batch) throw new Error(`no readable images in ${asDataset(data, 'images').name}`)
  const reconstructions = await tokenizer.decode(await tokenizer.encode(batch.pixels, batch.size), batch.size)
  const [height, width] = tokenizer.config.imageSize
  await writeAtomic(
    path,
    reconstructionSheet({
      originals: batch.pixels,
      reconstructions,
      count: batch.size,
      channels: tokenizer.config.numChannels as 1 | 3,
      height,
      width,
    }),
  )
  return batch.size
}

/**
 * Reconstruction error of up to `maxImages` evaluation images against the mean-image baseline
 * (the mean of as many training images), and codebook usage; all at the tokenizer's input.
 */
export async function evaluateTokenizer(
  tokenizer: Dvae,
  evalData: TokenizerData,
  trainData: TokenizerData,
  maxImages: number,
  threads?: number,
): Promise<TokenizerEvaluation> {
  const per = valuesPerImage(tokenizer)
  const sum = new Float64Array(per)
  let meanOf = 0
  for await (const { pixels, size } of sampleImages(tokenizer, trainData, maxImages, 100, threads)) {
    for (let i = 0; i < pixels.length; i++) sum[i % per] += pixels[i]
    meanOf += size
  }
  const mean = sum.map((s) => s / meanOf)
  const allIds: Int32Array[] = []
  let sqErr = 0
  let sqErrMean = 0
  let n = 0
  for await (const { pixels: x, size } of sampleImages(tokenizer, evalData, maxImages, 100, threads)) {
    const ids = await tokenizer.encode(x, size)
    allIds.push(ids)
    const y = await tokenizer.decode(ids, size)
    for (let i = 0; i < x.length; i++) {
      sqErr += (y[i] - x[i]) ** 2
      sqErrMean += (mean[i % per] - x[i]) ** 2
    }
    n += size
  }
  const ids = new Int32Array(allIds.reduce((total, a) => total + a.length, 0))
  allIds.reduce((offset, a) => (ids.set(a, offset), offset + a.length), 0)
  const usage = native.codebookUsage(ids, tokenizer.config.vocabSize)
  return {
    reconstructionMse: sqErr / (n * per),
    meanImageMse: sqErrMean / (n * per),
    perplexity: usage.perplexity,
    codesUsedFraction: usage.codesUsed / tokenizer.config.vocabSize,
  }
}
