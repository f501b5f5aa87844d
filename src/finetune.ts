/**
 * Fine-tuning a classifier end to end, with an evaluation on held-out data after every epoch,
 * checkpoints that resume, and the same metrics and curves as pretraining.
 */
import { argmaxRows, Classifier, ClassifierStepMetrics } from './classifier'
import { EvalTransform, TrainTransform, ViewSpec, viewSpec } from './data/augment'
import { ImageDataset, withClassesOf } from './data/dataset'
import { ImageLoader } from './data/loader'
import { checkSameAcrossRanks, Distributed, SINGLE_PROCESS, sumAcrossRanks } from './distributed'
import {
  applyComputedUpdate,
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
} from './run'
import { deriveSeed } from './rng'
import { checkPositiveInteger } from './check'

export interface FinetuneProgress extends ClassifierStepMetrics, LoopProgress {}

export interface EpochResult {
  epoch: number
  /** Steps completed when evaluated. */
  step: number
  evalAccuracy: number
  /** Mean training loss and accuracy over the epoch. */
  trainLoss: number
  trainAccuracy: number
}

export interface FinetuneOptions extends LoopOptions {
  classifier: Classifier
  train: ImageDataset
  /** Evaluated every `evalEvery` epochs and after the last step. */
  test: ImageDataset
  /** Epochs between evaluations on `test`. Default 1. */
  evalEvery?: number
  /** Default: RandomResizedCrop(0.08-1) + flip, no color jitter (BEiT fine-tuning uses RandAugment). */
  transform?: TrainTransform
  /** Default: the whole image (cropFraction 1). */
  evalTransform?: EvalTransform
  /** Per-channel normalisation, as in pretraining. Default 0.5 / 0.5. */
  mean?: number
  std?: number
  onProgress?: (p: FinetuneProgress) => void
  /** After each evaluation. */
  onEpoch?: (e: EpochResult) => void
}

interface FinetuneState extends LoopPosition {
  kind: 'finetune'
  /** Running sums of the current epoch's training metrics. */
  epochLoss: number
  epochAccuracy: number
  epochSteps: number
  evals: EpochResult[]
}

export function classifierView(classifier: Classifier, mean = 0.5, std = 0.5): ViewSpec {
  const { imageSize, numChannels } = classifier.config.model
  return viewSpec({ size: imageSize, interpolation: 'bicubic', channels: numChannels, mean, std })
}

export interface EvaluateOptions {
  batchSize?: number
  transform?: EvalTransform
  mean?: number
  std?: number
  threads?: number
  /** Each rank evaluates its share of `data` (every image once) and the counts are summed. */
  distributed?: Distributed
}

/** Accuracy of `classifier` on `data` (labels required). */
export async function evaluate(
  classifier: Classifier,
  data: ImageDataset,
  opts: EvaluateOptions = {},
): Promise<number> {
  const dist = opts.distributed ?? SINGLE_PROCESS
  const loader = new ImageLoader({
    dataset: data,
    views: [classifierView(classifier, opts.mean, opts.std)],
    transform: opts.transform ?? { kind: 'eval', cropFraction: 1 },
    batchSize: opts.batchSize ?? 256,
    shuffle: false,
    threads: opts.threads,
    rank: dist.rank,
    worldSize: dist.worldSize,
    evenShards: false,
  })
  let correct = 0
  let seen = 0
  for await (const batch of loader.epoch(0)) {
    const predicted = argmaxRows(await classifier.predict(batch.views[0]), classifier.config.numLabels)
    for (let i = 0; i < batch.size; i++) {
      if (batch.labels[i] < 0)
        throw new Error(`evaluation needs labels, but ${data.name} image ${batch.indices[i]} has none`)
      if (predicted[i] === batch.labels[i]) correct++
    }
    seen += batch.size
  }
  const [allCorrect, allSeen] = sumAcrossRanks(dist, [correct, seen])
  return allCorrect / allSeen
}

export async function finetune(opts: FinetuneOptions): Promise<RunResult & { evals: EpochResult[] }> {
  const { classifier, batchSize } = opts
  const b = batching(opts)
  const { accumulate, distributed: dist } = b
  const seed = opts.seed ?? 0
  for (const [name, data] of [
    ['train', opts.train],
    ['test', opts.test],
  ] as const) {
    if (data.classNames.length === 0)
      throw new Error(`fine-tuning needs labelled data, but the ${name} set ${data.name} has no labels`)
    if (data.classNames.length > classifier.config.numLabels) {
      throw new Error(
        `the ${name} set has ${data.classNames.length} classes but the classifier ${classifier.config.numLabels} labels`,
      )
    }
  }
  // Labels numbered as the classifier's named classes, else as the training set's.
  const names = classifier.config.classNames
  const classes = names ? { name: 'the classifier', classNames: names } : opts.train
  const [train, test] = [withClassesOf(classes, opts.train), withClassesOf(classes, opts.test)]
  const loader = new ImageLoader({
    dataset: train,
    views: [classifierView(classifier, opts.mean, opts.std)],
    transform: opts.transform ?? { kind: 'train', colorJitter: null },
    batchSize,
    seed,
    dropLast: true,
    threads: opts.threads,
    rank: dist.rank,
    worldSize: dist.worldSize,
  })
  const updates = updatesPerEpoch(b, loader.batchesPerEpoch, train)
  const totalSteps = resolveSteps(opts.steps, opts.epochs, updates)
  const sizes = { train: train.size, test: test.size, batchSize, accumulate, totalSteps, seed }
  checkSameAcrossRanks(dist, 'fine-tuning run', sizes)
  const lr = scheduleFor(opts.schedule, totalSteps)
  const evalEvery = checkPositiveInteger('evalEvery', opts.evalEvery ?? 1)
  const evalOptions = {
    transform: opts.evalTransform,
    mean: opts.mean,
    std: opts.std,
    threads: opts.threads,
    distributed: dist,
  }
  const fresh: FinetuneState = {
    ...startPosition('finetune', totalSteps, b, seed),
    epochLoss: 0,
    epochAccuracy: 0,
    epochSteps: 0,
    evals: [],
  }
  // The run folder, its metrics log, and the position to continue from when the classifier carries one.
  const run = await Run.open({
    outDir: opts.outDir,
    saved: classifier.trainState,
    fresh,
    owner: 'classifier',
    runName: 'fine-tuning',
    title: 'BEiT fine-tuning',
    panels: [
      { key: 'loss' },
      { key: 'accuracy', title: 'train batch accuracy' },
      { key: 'evalAccuracy', title: 'test accuracy (per epoch)' },
      { key: 'lr', log: true },
    ],
    checkpointEvery: opts.checkpointEvery,
    signal: opts.signal,
    distributed: dist,
  })
  // Scores saved in the checkpoint's JSON come back with their NaNs.
  let state = { ...run.start, evals: restoreNaN(run.start.evals) }
  const save = async () => {
    classifier.trainState = state
    await classifier.save(run.checkpoint)
  }
  if (dist.worldSize > 1) await classifier.distribute()
  const means = new UpdateMeans(['loss', 'accuracy'] as const)
  const result = async (status: RunResult['status']) => ({ ...(await run.end(status, state.step)), evals: state.evals })

  // Batches of the current update that ran lossAndGrads on this rank.
  let computed = 0
  // Until the last step is taken and its epoch closed (evaluated, saved): a run saved after its
  // last step but before that evaluation resumes into it.
  while (state.step < totalSteps || state.batch >= 0) {
    const epoch = state.epoch
    let started = performance.now()
    const batches = state.step < totalSteps ? loader.epoch(epoch, { fromBatch: state.batch + 1 }) : []
    for await (const batch of batches) {
      if (state.step >= totalSteps || batch.batch >= updates * accumulate) break
      const stepLr = lr(state.step)
      let gradNorm: number
      try {
        const draws = { seed: deriveSeed(seed, state.step, 3), firstSample: firstSample(b, batch.batch) }
        if (batch.size > 0) {
          const losses = await classifier.lossAndGrads({ pixels: batch.views[0], labels: batch.labels, ...draws })
          means.add(losses, batch.size)
          computed++
        }
        if (!endsUpdate(b, batch.batch)) continue
        gradNorm = await applyComputedUpdate(classifier, b, computed, stepLr)
        computed = 0
      } catch (e) {
        throw new Error(`fine-tuning step ${state.step}: ${(e as Error).message}`, { cause: e })
      }
      const { weight: images, ...step } = means.take(dist)
      const progress: FinetuneProgress = {
        ...step,
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
        batch: batch.batch,
        // An update without an image (NaN loss, null in metrics.jsonl) is left out of the epoch's.
        epochLoss: state.epochLoss + (images > 0 ? step.loss : 0),
        epochAccuracy: state.epochAccuracy + (images > 0 ? step.accuracy : 0),
        epochSteps: state.epochSteps + (images > 0 ? 1 : 0),
      }
      await run.metrics.record({
        step: progress.step,
        epoch,
        loss: step.loss,
        accuracy: step.accuracy,
        lr: stepLr,
        gradNorm,
        images,
        imagesPerSecond: progress.imagesPerSecond,
      })
      opts.onProgress?.(progress)
      if (await run.afterStep(state.step, save)) return result('interrupted')
      started = performance.now()
    }
    // The epoch's end: training means, an evaluation every evalEvery epochs and after the last
    // step, and a checkpoint that holds it.
    const trainLoss = state.epochLoss / state.epochSteps
    const trainAccuracy = state.epochAccuracy / state.epochSteps
    let evals = state.evals
    if ((epoch + 1) % evalEvery === 0 || state.step >= totalSteps) {
      const evaluation: EpochResult = {
        epoch,
        step: state.step,
        evalAccuracy: await evaluate(classifier, test, evalOptions),
        trainLoss,
        trainAccuracy,
      }
      evals = [...evals, evaluation]
      await run.metrics.record({
        step: state.step - 1,
        epoch,
        evalAccuracy: evaluation.evalAccuracy,
        trainLoss,
        trainAccuracy,
      })
      opts.onEpoch?.(evaluation)
    } else await run.metrics.record({ step: state.step - 1, epoch, trainLoss, trainAccuracy })
    state = { ...state, epoch: epoch + 1, batch: -1, epochLoss: 0, epochAccuracy: 0, epochSteps: 0, evals }
    await run.saveCheckpoint(save)
  }
  return result('completed')
}
