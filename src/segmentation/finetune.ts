/**
 * Fine-tuning a segmenter on in-memory image/mask pairs, on the loop contract of the other
 * loops (schedule, steps or epochs, accumulation, run folder, checkpoints that resume,
 * interruption, metrics and curves), with mIoU, mean and overall pixel accuracy on held-out
 * data after every `evalEvery` epochs. Augmentation: a horizontal flip of image and mask
 * together, drawn per image from the seed.
 */
import { Segmenter, SegmenterStepMetrics } from '../segmenter'
import {
  batching,
  endsUpdate,
  firstSample,
  LoopOptions,
  LoopPosition,
  LoopProgress,
  resolveSteps,
  Run,
  RunResult,
  scheduleFor,
  startPosition,
  UpdateMeans,
  updatesPerEpoch,
} from '../run'
import { deriveSeed, Rng } from '../rng'
import { SegmentationMetrics, SegmentationScores } from './metrics'
import type { SegmentationSet } from './scenes'

export interface SegmentationProgress extends SegmenterStepMetrics, LoopProgress {}

export interface SegmentationEpochResult extends SegmentationScores {
  epoch: number
  /** Steps completed when evaluated. */
  step: number
  /** Mean training loss over the epoch. */
  trainLoss: number
}

export interface SegmentationFinetuneOptions extends LoopOptions {
  segmenter: Segmenter
  train: SegmentationSet
  test: SegmentationSet
  /** Epochs between evaluations on `test` (and one after the last step). Default 1. */
  evalEvery?: number
  /** Flip image and mask horizontally with probability 1/2. Default true. */
  flip?: boolean
  /** Pixel normalisation (x / 255 - mean) / std. Default 0.5 / 0.5. */
  mean?: number
  std?: number
  onProgress?: (p: SegmentationProgress) => void
  onEpoch?: (e: SegmentationEpochResult) => void
}

interface SegmentationState extends LoopPosition {
  kind: 'finetune-segmentation'
  epochLoss: number
  epochSteps: number
  evals: SegmentationEpochResult[]
}

export interface SegmentationBatch {
  pixels: Float32Array
  masks: Uint8Array
}

/** Images `indices` of `data` normalised for `segmenter`, with their masks; `flips[i]` mirrors image i. */
export function segmentationBatch(
  data: SegmentationSet,
  indices: ArrayLike<number>,
  flips?: ArrayLike<boolean>,
  mean = 0.5,
  std = 0.5,
): SegmentationBatch {
  const { height: h, width: w } = data
  const n = indices.length
  const pixels = new Float32Array(n * h * w)
  const masks = new Uint8Array(n * h * w)
  for (let i = 0; i < n; i++) {
    const src = indices[i] * h * w
    const dst = i * h * w
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        const from = src + y * w + (flips?.[i] ? w - 1 - x : x)
        pixels[dst + y * w + x] = (data.images[from] / 255 - mean) / std
        masks[dst + y * w + x] = data.masks[from]
      }
    }
  }
  return { pixels, masks }
}

function checkFits(segmenter: Segmenter, data: SegmentationSet, what: string): void {
  const { imageSize, numChannels } = segmenter.config.model
  if (numChannels !== 1 || data.height !== imageSize[0] || data.width !== imageSize[1])
    throw new Error(
      `the ${what} set ${data.name} has ${data.height}x${data.width} single-channel images, the segmenter takes ` +
        `${imageSize[0]}x${imageSize[1]} with ${numChannels} channel(s)`,
    )
  if (data.classNames.length > segmenter.config.numLabels)
    throw new Error(
      `the ${what} set has ${data.classNames.length} classes but the segmenter ${segmenter.config.numLabels} labels`,
    )
}

/** mIoU, mean and overall pixel accuracy of `segmenter` on `data`, as mmseg scores them. */
export async function evaluateSegmentation(
  segmenter: Segmenter,
  data: SegmentationSet,
  opts: { batchSize?: number; mean?: number; std?: number } = {},
): Promise<SegmentationScores> {
  checkFits(segmenter, data, 'evaluation')
  const metrics = new SegmentationMetrics({
    numLabels: segmenter.config.numLabels,
    ignoreIndex: segmenter.config.semanticLossIgnoreIndex,
  })
  const batchSize = opts.batchSize ?? 64
  for (let start = 0; start < data.count; start += batchSize) {
    const indices = Array.from({ length: Math.min(batchSize, data.count - start) }, (_, i) => start + i)
    const batch = segmentationBatch(data, indices, undefined, opts.mean, opts.std)
    metrics.add(await segmenter.predict(batch.pixels), batch.masks, `${data.name} images ${start}..`)
  }
  return metrics.scores()
}

/** The order of epoch `epoch`: a seeded shuffle of the set. */
function epochOrder(count: number, seed: number, epoch: number): Uint32Array {
  const order = Uint32Array.from({ length: count }, (_, i) => i)
  const rng = new Rng(deriveSeed(seed, epoch, 11))
  for (let i = count - 1; i > 0; i--) {
    const j = rng.int(0, i)
    ;[order[i], order[j]] = [order[j], order[i]]
  }
  return order
}

export async function finetuneSegmentation(
  opts: SegmentationFinetuneOptions,
): Promise<RunResult & { evals: SegmentationEpochResult[] }> {
  const { segmenter, train, test, batchSize } = opts
  const b = batching(opts)
  if (b.distributed.worldSize > 1) await segmenter.distribute() // refused with the reason until SyncBatchNorm
  checkFits(segmenter, train, 'train')
  checkFits(segmenter, test, 'test')
  if (!Number.isInteger(batchSize) || batchSize < 1 || batchSize > train.count)
    throw new Error(`batchSize must be an integer in [1, ${train.count}] (the train set's size), got ${batchSize}`)
  const seed = opts.seed ?? 0
  const flip = opts.flip ?? true
  const batchesPerEpoch = Math.floor(train.count / batchSize)
  const updates = updatesPerEpoch(b, batchesPerEpoch)
  const totalSteps = resolveSteps(opts.steps, opts.epochs, updates)
  const lr = scheduleFor(opts.schedule, totalSteps)
  const evalEvery = opts.evalEvery ?? 1
  if (!Number.isInteger(evalEvery) || evalEvery < 1)
    throw new Error(`evalEvery must be a positive integer, got ${evalEvery}`)
  const fresh: SegmentationState = {
    ...startPosition('finetune-segmentation', totalSteps, b, seed),
    epochLoss: 0,
    epochSteps: 0,
    evals: [],
  }
  const run = await Run.open({
    outDir: opts.outDir,
    saved: segmenter.trainState,
    fresh,
    owner: 'segmenter',
    runName: 'segmentation fine-tuning',
    title: 'BEiT segmentation fine-tuning',
    panels: [
      { key: 'loss' },
      { key: 'pixelAccuracy', title: 'train batch pixel accuracy' },
      { key: 'evalMeanIou', title: 'test mIoU (per epoch)' },
      { key: 'lr', log: true },
    ],
    checkpointEvery: opts.checkpointEvery,
    signal: opts.signal,
  })
  let state = run.start
  const save = async () => {
    segmenter.trainState = state
    await segmenter.save(run.checkpoint)
  }
  const means = new UpdateMeans(['loss', 'pixelAccuracy'] as const)
  const result = async (status: RunResult['status']) => ({ ...(await run.end(status, state.step)), evals: state.evals })

  while (state.step < totalSteps || state.batch >= 0) {
    const epoch = state.epoch
    const order = epochOrder(train.count, seed, epoch)
    let started = performance.now()
    const last = state.step < totalSteps ? updates * b.accumulate : 0
    for (let k = state.batch + 1; k < last && state.step < totalSteps; k++) {
      const indices = order.subarray(k * batchSize, (k + 1) * batchSize)
      const flips = Array.from(indices, (i) => flip && new Rng(deriveSeed(seed, epoch, i, 13)).next() < 0.5)
      const batch = segmentationBatch(train, indices, flips, opts.mean, opts.std)
      const stepLr = lr(state.step)
      let gradNorm: number
      try {
        const draws = { seed: deriveSeed(seed, state.step, 3), firstSample: firstSample(b, k) }
        const losses = await segmenter.lossAndGrads({ ...batch, ...draws })
        means.add(losses, losses.labelledPixels)
        if (!endsUpdate(b, k)) continue
        gradNorm = (await segmenter.applyUpdate(stepLr)).gradNorm
      } catch (e) {
        throw new Error(`segmentation fine-tuning step ${state.step}: ${(e as Error).message}`, { cause: e })
      }
      const { weight: labelledPixels, ...step } = means.take(b.distributed)
      const images = batchSize * b.accumulate
      const progress: SegmentationProgress = {
        ...step,
        labelledPixels,
        gradNorm,
        step: state.step,
        totalSteps,
        epoch,
        lr: stepLr,
        imagesPerSecond: images / ((performance.now() - started) / 1000),
      }
      state = {
        ...state,
        step: state.step + 1,
        batch: k,
        epochLoss: state.epochLoss + step.loss,
        epochSteps: state.epochSteps + 1,
      }
      await run.metrics.record({
        step: progress.step,
        epoch,
        loss: step.loss,
        pixelAccuracy: step.pixelAccuracy,
        lr: stepLr,
        gradNorm,
        images,
        imagesPerSecond: progress.imagesPerSecond,
      })
      opts.onProgress?.(progress)
      if (await run.afterStep(state.step, save)) return result('interrupted')
      started = performance.now()
    }
    const trainLoss = state.epochLoss / state.epochSteps
    let evals = state.evals
    if ((epoch + 1) % evalEvery === 0 || state.step >= totalSteps) {
      const scores = await evaluateSegmentation(segmenter, test, { mean: opts.mean, std: opts.std })
      const evaluation: SegmentationEpochResult = { epoch, step: state.step, trainLoss, ...scores }
      evals = [...evals, evaluation]
      await run.metrics.record({
        step: state.step - 1,
        epoch,
        trainLoss,
        evalMeanIou: scores.meanIou,
        evalMeanAccuracy: scores.meanAccuracy,
        evalPixelAccuracy: scores.overallAccuracy,
        evalPerClassIou: JSON.stringify(scores.perClassIou),
      })
      opts.onEpoch?.(evaluation)
    } else await run.metrics.record({ step: state.step - 1, epoch, trainLoss })
    state = { ...state, epoch: epoch + 1, batch: -1, epochLoss: 0, epochSteps: 0, evals }
    await run.saveCheckpoint(save)
  }
  return result('completed')
}
