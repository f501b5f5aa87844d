/**
 * Fine-tuning a segmenter on image + mask pairs (folders, manifests or memory), on the loop
 * contract of the other loops (schedule, steps or epochs, accumulation, run folder, checkpoints
 * that resume, interruption, metrics and curves), with mmseg's joint augmentation, and mIoU,
 * mean and overall pixel accuracy on held-out data after every `evalEvery` epochs, with a
 * `predictions.png` of test images, their true masks and the predicted ones.
 */
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
  restoreNaN,
  Run,
  RunResult,
  scheduleFor,
  startPosition,
  UpdateMeans,
  updatesPerEpoch,
  writeAtomic,
} from '../run'
import { anyRank, checkSameAcrossRanks, Distributed, SINGLE_PROCESS } from '../distributed'
import { deriveSeed } from '../rng'
import { predictionSheet } from '../sheet'
import type { ViewSpec } from '../data/augment'
import {
  checkScale,
  describePair,
  SegmentationDataset,
  SegmentationLoader,
  SegmentationTransform,
  segmenterView,
  WholePairLoader,
} from './data'
import { SegmentationMetrics, SegmentationScores } from './metrics'
import { checkPositiveInteger } from '../check'

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
  /** How the test set is scored (default: mmseg's sliding windows for files). */
  evaluation?: Pick<SegmentationEvaluateOptions, 'mode' | 'scale' | 'stride' | 'batchSize'>
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
  /**
   * 'slide' (default): mmseg's test protocol for files: each image rescaled keeping its ratio to
   * fit `scale`, segmented by sliding windows of the input size (`stride`), the logits resized to
   * the mask's stored size and scored there; in-memory pairs are segmented at their own size.
   * 'resize': each pair rescaled to fit the input (the mask nearest-neighbour), padded below and
   * right (ignored), scored at the input size, in batches (faster, approximate).
   */
  mode?: 'slide' | 'resize'
  /** [long side, short side]. Default 4x and 1x the input's shorter side ([2048, 512] for 512). */
  scale?: [number, number]
  /** Sliding-window stride [rows, columns]. Default two thirds of the input. */
  stride?: [number, number]
  batchSize?: number
  threads?: number
  onError?: 'skip' | 'fail'
  /** Each rank scores its share of `data` (every pair once) and the areas are summed. */
  distributed?: Distributed
}

/** mIoU, mean and overall pixel accuracy of `segmenter` on `data`, as mmseg scores them. */
export async function evaluateSegmentation(
  segmenter: Segmenter,
  data: SegmentationDataset,
  opts: SegmentationEvaluateOptions = {},
): Promise<SegmentationScores> {
  checkClasses(segmenter, data, 'evaluation')
  const mode = opts.mode ?? 'slide'
  if (mode !== 'slide' && mode !== 'resize') throw new Error(`mode must be 'slide' or 'resize', got ${String(mode)}`)
  if (opts.scale !== undefined) checkScale('scale', opts.scale)
  const { numLabels, semanticLossIgnoreIndex: ignoreIndex } = segmenter.config
  const metrics = new SegmentationMetrics({ numLabels, ignoreIndex })
  const view = viewFor(segmenter, opts)
  const dist = opts.distributed ?? SINGLE_PROCESS
  const common = {
    numLabels,
    ignoreIndex,
    threads: opts.threads,
    onError: opts.onError,
    rank: dist.rank,
    worldSize: dist.worldSize,
    evenShards: false,
  }
  const [h, w] = view.size
  const source = data.source
  const sameSize = source.kind === 'pixels' && source.height === h && source.width === w
  if (mode === 'resize' || sameSize) {
    // At the input size: batched, and for pairs of the input's size the same as sliding.
    const loader = new SegmentationLoader({
      ...common,
      data,
      view,
      transform: 'eval',
      batchSize: opts.batchSize ?? 64,
      shuffle: false,
    })
    for await (const batch of loader.epoch(0)) {
      metrics.add(await segmenter.predict(batch.pixels), batch.masks, `${data.name} batch ${batch.batch}`)
    }
    return metrics.scores(dist)
  }
  const slide = async (pixels: Float32Array, size: [number, number], outputSize: [number, number]) =>
    (await segmenter.segment(pixels, { size, stride: opts.stride, outputSize })).classes
  if (source.kind === 'pixels') {
    const own: [number, number] = [source.height, source.width]
    const loader = new SegmentationLoader({
      ...common,
      data,
      view: { ...view, size: own },
      transform: 'eval',
      batchSize: 16,
      shuffle: false,
    })
    const plane = own[0] * own[1]
    for await (const batch of loader.epoch(0)) {
      const per = plane * view.channels
      for (let i = 0; i < batch.size; i++) {
        const classes = await slide(batch.pixels.subarray(i * per, (i + 1) * per), own, own)
        metrics.add(classes, batch.masks.subarray(i * plane, (i + 1) * plane), `${data.name}[${batch.indices[i]}]`)
      }
    }
    return metrics.scores(dist)
  }
  const short = Math.min(h, w)
  const loader = new WholePairLoader({
    ...common,
    data,
    view,
    scale: opts.scale ?? [4 * short, short],
    batchSize: 4,
  })
  for await (const batch of loader.epoch(0)) {
    for (const [i, pair] of batch.pairs.entries()) {
      const classes = await slide(pair.pixels, pair.size, pair.maskSize)
      metrics.add(classes, pair.mask, describePair(data, batch.indices[i]))
    }
  }
  return metrics.scores(dist)
}

export async function finetuneSegmentation(
  opts: SegmentationFinetuneOptions,
): Promise<RunResult & { evals: SegmentationEpochResult[] }> {
  const { segmenter, train, test, batchSize } = opts
  const b = batching(opts)
  const { distributed: dist } = b
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
    rank: dist.rank,
    worldSize: dist.worldSize,
  })
  const updates = updatesPerEpoch(b, loader.batchesPerEpoch, train)
  const totalSteps = resolveSteps(opts.steps, opts.epochs, updates)
  const sizes = { train: train.size, test: test.size, batchSize, accumulate: b.accumulate, totalSteps, seed }
  checkSameAcrossRanks(dist, 'segmentation fine-tuning run', sizes)
  const lr = scheduleFor(opts.schedule, totalSteps)
  const evalEvery = checkPositiveInteger('evalEvery', opts.evalEvery ?? 1)
  const sheetImages = opts.sheetImages ?? 8
  if (!Number.isInteger(sheetImages) || sheetImages < 0)
    throw new Error(`sheetImages must be an integer >= 0 (0: no predictions.png), got ${sheetImages}`)
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
    distributed: dist,
  })
  // Scores saved in the checkpoint's JSON come back with their NaNs.
  let state = { ...run.start, evals: restoreNaN(run.start.evals) }
  const save = async () => {
    segmenter.trainState = state
    await segmenter.save(run.checkpoint)
  }
  // From here the BatchNorms are synchronised: each rank's statistics are the global batch's.
  if (dist.worldSize > 1) await segmenter.distribute()
  const means = new UpdateMeans(['loss', 'pixelAccuracy'] as const)
  const result = async (status: RunResult['status']) => ({ ...(await run.end(status, state.step)), evals: state.evals })

  /** predictions.png: the first test pairs at the input size, their masks and the predictions. */
  const drawSheet = async () => {
    if (sheetImages === 0 || dist.rank !== 0) return
    const view = viewFor(segmenter, opts)
    const firstTest = new SegmentationLoader({
      data: test,
      view,
      transform: 'eval',
      numLabels,
      ignoreIndex,
      batchSize: Math.min(sheetImages, test.size),
      shuffle: false,
      threads: opts.threads,
      onError: opts.onError,
    })
    const { value: batch } = await firstTest.epoch(0).next()
    if (!batch || batch.size === 0) return
    const predicted = await segmenter.predict(batch.pixels)
    await writeAtomic(
      join(opts.outDir, 'predictions.png'),
      predictionSheet({ batch, predicted, view, count: batch.size, ignoreIndex }),
    )
  }

  // Batches of the current update that ran lossAndGrads (none where every batch of the update
  // was unreadable on some rank: then there is nothing to apply).
  let computed = 0
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
        // Synchronised BatchNorms need every rank in every forward: a batch whose pairs were
        // all unreadable on some rank is left out on all of them (their loaders counted it).
        if (!anyRank(dist, batch.size === 0)) {
          const losses = await segmenter.lossAndGrads({ pixels: batch.pixels, masks: batch.masks, ...draws })
          means.add(losses, losses.labelledPixels)
          computed++
        }
        if (!endsUpdate(b, k)) continue
        // An update without a labelled pixel on any rank changes no weight (gradNorm 0).
        // `computed` is the same on every rank (a batch is left out on all of them together),
        // so no rank need be asked, as applyComputedUpdate would.
        gradNorm = computed > 0 ? (await segmenter.applyUpdate(stepLr)).gradNorm : 0
        computed = 0
      } catch (e) {
        throw new Error(`segmentation fine-tuning step ${state.step}: ${(e as Error).message}`, { cause: e })
      }
      const { weight: labelledPixels, ...step } = means.take(dist)
      const images = batchSize * b.accumulate * dist.worldSize
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
      // Its loss and pixel accuracy are NaN (null in metrics.jsonl) and left out of the epoch's.
      const labelled = labelledPixels > 0
      state = {
        ...state,
        step: state.step + 1,
        batch: k,
        epochLoss: state.epochLoss + (labelled ? step.loss : 0),
        epochSteps: state.epochSteps + (labelled ? 1 : 0),
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
      const scores = await evaluateSegmentation(segmenter, test, {
        ...opts.evaluation,
        mean: opts.mean,
        std: opts.std,
        threads: opts.threads,
        onError: opts.onError,
        distributed: dist,
      })
      await drawSheet()
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
