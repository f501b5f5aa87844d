/**
 * Fine-tuning a segmenter on image + mask pairs (folders, manifests or memory), on the loop
 * contract of the other loops (schedule, steps or epochs, accumulation, run folder, checkpoints
 * that resume, interruption, metrics and curves), with mmseg's joint augmentation, and mIoU,
 * mean and overall pixel accuracy on held-out data after every `evalEvery` epochs, with a
 * `predictions.png` of test images, their true masks and the predicted ones.
 */
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'

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
import { deriveSeed } from '../rng'
import { predictionSheet } from '../sheet'
import type { ViewSpec } from '../data/augment'
import {
  SegmentationBatch,
  SegmentationDataset,
  SegmentationLoader,
  SegmentationTransform,
  segmenterView,
} from './data'
import { SegmentationMetrics, SegmentationScores } from './metrics'

export interface SegmentationProgress extends SegmenterStepMetrics, LoopProgress {}

export interface SegmentationEpochResult extends SegmentationScores {
  epoch: number
  /** Steps completed when evaluated. */
  step: number
  /** Mean training loss over the epoch. */
  trainLoss: number
}

/** Pixel normalisation on [0, 1] values, one number or one per channel. Default 0.5 / 0.5. */
export interface Normalization {
  mean?: number | number[]
  std?: number | number[]
}

export interface SegmentationFinetuneOptions extends LoopOptions, Normalization {
  segmenter: Segmenter
  train: SegmentationDataset
  test: SegmentationDataset
  /** Epochs between evaluations on `test` (and one after the last step). Default 1. */
  evalEvery?: number
  /** The joint augmentation. Default: mmseg's ADE20K recipe (see SegmentationTransform); 'eval' for none. */
  transform?: SegmentationTransform | 'eval'
  /** Test images in predictions.png (rows of image | true mask | prediction), rewritten at every evaluation. Default 8; 0: none. */
  sheetImages?: number
  /** Native decode threads. Default: the machine's available parallelism. */
  threads?: number
  /** 'skip' (default): leave unreadable pairs out, warn and count them. 'fail': throw. */
  onError?: 'skip' | 'fail'
  onProgress?: (p: SegmentationProgress) => void
  onEpoch?: (e: SegmentationEpochResult) => void
}

interface SegmentationState extends LoopPosition {
  kind: 'finetune-segmentation'
  epochLoss: number
  epochSteps: number
  evals: SegmentationEpochResult[]
}

function viewFor(segmenter: Segmenter, n: Normalization): ViewSpec {
  const { imageSize, numChannels } = segmenter.config.model
  return segmenterView(imageSize, numChannels === 3 ? 3 : 1, n)
}

function checkClasses(segmenter: Segmenter, data: SegmentationDataset, what: string): void {
  if (data.classNames.length > segmenter.config.numLabels)
    throw new Error(
      `the ${what} set ${data.name} has ${data.classNames.length} classes but the segmenter ${segmenter.config.numLabels} labels`,
    )
}

export interface SegmentationEvaluateOptions extends Normalization {
  batchSize?: number
  threads?: number
  onError?: 'skip' | 'fail'
  /** Called with the first batch and its predictions (for pictures). */
  onFirstBatch?: (batch: SegmentationBatch, predicted: Uint8Array) => void
}

/**
 * mIoU, mean and overall pixel accuracy of `segmenter` on `data`, as mmseg scores them. Each
 * image is rescaled to fit the segmenter's input (keeping its ratio; the mask nearest-neighbour)
 * and padded below and right (the padding ignored); images of the input's size are scored as
 * they are.
 */
export async function evaluateSegmentation(
  segmenter: Segmenter,
  data: SegmentationDataset,
  opts: SegmentationEvaluateOptions = {},
): Promise<SegmentationScores> {
  checkClasses(segmenter, data, 'evaluation')
  const { numLabels, semanticLossIgnoreIndex: ignoreIndex } = segmenter.config
  const metrics = new SegmentationMetrics({ numLabels, ignoreIndex })
  const loader = new SegmentationLoader({
    data,
    view: viewFor(segmenter, opts),
    transform: 'eval',
    numLabels,
    ignoreIndex,
    batchSize: opts.batchSize ?? 64,
    shuffle: false,
    evenShards: false,
    threads: opts.threads,
    onError: opts.onError,
  })
  for await (const batch of loader.epoch(0)) {
    const predicted = await segmenter.predict(batch.pixels)
    if (batch.batch === 0) opts.onFirstBatch?.(batch, predicted)
    metrics.add(predicted, batch.masks, `${data.name} batch ${batch.batch}`)
  }
  return metrics.scores()
}

export async function finetuneSegmentation(
  opts: SegmentationFinetuneOptions,
): Promise<RunResult & { evals: SegmentationEpochResult[] }> {
  const { segmenter, train, test, batchSize } = opts
  const b = batching(opts)
  if (b.distributed.worldSize > 1) await segmenter.distribute() // refused with the reason until SyncBatchNorm
  checkClasses(segmenter, train, 'train')
  checkClasses(segmenter, test, 'test')
  if (!Number.isInteger(batchSize) || batchSize < 1 || batchSize > train.size)
    throw new Error(`batchSize must be an integer in [1, ${train.size}] (the train set's size), got ${batchSize}`)
  const seed = opts.seed ?? 0
  const { numLabels, semanticLossIgnoreIndex: ignoreIndex } = segmenter.config
  const loader = new SegmentationLoader({
    data: train,
    view: viewFor(segmenter, opts),
    transform: opts.transform ?? {},
    numLabels,
    ignoreIndex,
    batchSize,
    seed,
    dropLast: true,
    threads: opts.threads,
    onError: opts.onError,
  })
  const updates = updatesPerEpoch(b, loader.batchesPerEpoch)
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

  const sheetImages = opts.sheetImages ?? 8
  const drawSheet = async (batch: SegmentationBatch, predicted: Uint8Array) => {
    const view = viewFor(segmenter, opts)
    const png = predictionSheet({ batch, predicted, view, count: Math.min(sheetImages, batch.size) })
    if (b.distributed.rank === 0) await writeFile(join(opts.outDir, 'predictions.png'), png)
  }

  while (state.step < totalSteps || state.batch >= 0) {
    const epoch = state.epoch
    let started = performance.now()
    const batches = state.step < totalSteps ? loader.epoch(epoch, { fromBatch: state.batch + 1 }) : []
    for await (const batch of batches) {
      if (state.step >= totalSteps || batch.batch >= updates * b.accumulate) break
      const k = batch.batch
      const stepLr = lr(state.step)
      let gradNorm: number
      try {
        const draws = { seed: deriveSeed(seed, state.step, 3), firstSample: firstSample(b, k) }
        if (batch.size > 0) {
          const losses = await segmenter.lossAndGrads({ pixels: batch.pixels, masks: batch.masks, ...draws })
          means.add(losses, losses.labelledPixels)
        }
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
      let sheet: Promise<void> | undefined
      const scores = await evaluateSegmentation(segmenter, test, {
        mean: opts.mean,
        std: opts.std,
        threads: opts.threads,
        onError: opts.onError,
        onFirstBatch: (batch, predicted) => {
          if (sheetImages > 0 && batch.size > 0) sheet = drawSheet(batch, predicted)
        },
      })
      await sheet
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
