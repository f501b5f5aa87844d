/**
 * The masked-image-modeling pretraining loop (nanoGPT style: the loader, masking, schedule,
 * metrics and checkpoints are helpers it calls). Each batch: two views, a mask per image, and
 * one native call that encodes the tokenizer view into targets and adds the gradient of the
 * masked cross-entropy; every `accumulate` batches, one AdamW update (averaged over every rank
 * of a data-parallel job).
 * A checkpoint carries the loop's position, so a resumed run takes the very steps the
 * uninterrupted one would have. An update is the same whether its batches come from one rank
 * accumulating them or from several ranks: the loader gives rank r the r-th part of each global
 * batch, masks are drawn for the global batch, and random draws are keyed by the sample's place
 * in it.
 */
import { beitViews, TrainTransform } from './data/augment'
import { ImageDataset } from './data/dataset'
import { ImageLoader } from './data/loader'
import { checkSameAcrossRanks } from './distributed'
import { MaskGenerator } from './masking'
import { Beit, BeitStepMetrics } from './model'
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
  scheduleFor,
  startPosition,
  UpdateMeans,
  updatesPerEpoch,
} from './run'
import { Dvae } from './tokenizer'

export interface PretrainProgress extends BeitStepMetrics, LoopProgress {}

export interface PretrainOptions extends LoopOptions {
  model: Beit
  tokenizer: Dvae
  data: ImageDataset
  masking: MaskGenerator
  /** Augmentation of the shared crop. Default BEiT's (RandomResizedCrop 0.08-1, flip, jitter 0.4). */
  transform?: TrainTransform
  /** Patch view normalisation. Default 0.5 / 0.5. */
  mean?: number
  std?: number
  /** Batches prefetched. */
  prefetch?: number
  onProgress?: (p: PretrainProgress) => void
}

/** Where a pretraining run stands; stored in the checkpoint. */
interface PretrainState extends LoopPosition {
  kind: 'pretrain'
  masking: number
}

/** A generated mask, one value per patch (a custom `MaskGenerator` may get it wrong). */
function checkMask(mask: Uint8Array, patches: number): Uint8Array {
  if (mask.length !== patches)
    throw new Error(`the mask generator gave a mask of ${mask.length} values, expected one per patch (${patches})`)
  return mask
}

/** Refuses a tokenizer whose tokens cannot be `model`'s targets: another grid, vocabulary or channel count. */
export function checkTokenizerFits(model: Beit, tokenizer: Dvae): void {
  const [height, width] = model.config.imageSize
  const [tokHeight, tokWidth] = tokenizer.config.imageSize
  if (tokHeight !== tokWidth || height !== width) throw new Error('pretrain takes square images and tokenizer inputs')
  const tokenGrid = [tokHeight / tokenizer.downsample, tokWidth / tokenizer.downsample]
  if (tokenGrid[0] !== model.grid[0] || tokenGrid[1] !== model.grid[1]) {
    throw new Error(
      `the tokenizer's token grid ${tokenGrid.join('x')} (${tokHeight} px / ${tokenizer.downsample}) does not match the model's patch grid ${model.grid.join('x')} (${height} px / ${model.config.patchSize})`,
    )
  }
  if (tokenizer.config.vocabSize > model.config.vocabSize) {
    throw new Error(
      `tokenizer vocabulary ${tokenizer.config.vocabSize} exceeds the model's vocabSize ${model.config.vocabSize}`,
    )
  }
  if (tokenizer.config.numChannels !== model.config.numChannels) {
    throw new Error(
      `the tokenizer takes ${tokenizer.config.numChannels} channel(s) but the model ${model.config.numChannels}`,
    )
  }
}

export async function pretrain(opts: PretrainOptions): Promise<RunResult> {
  const { model, tokenizer, data, masking, batchSize } = opts
  const b = batching(opts)
  const { accumulate, distributed: dist } = b
  const seed = opts.seed ?? 0
  checkTokenizerFits(model, tokenizer)
  const height = model.config.imageSize[0]
  const tokHeight = tokenizer.config.imageSize[0]
  const channels = model.config.numChannels as 1 | 3
  if (masking.height !== model.grid[0] || masking.width !== model.grid[1]) {
    throw new Error(
      `mask grid ${masking.height}x${masking.width} does not match the model's patch grid ${model.grid.join('x')}`,
    )
  }

  const loader = new ImageLoader({
    dataset: data,
    views: beitViews({ imageSize: height, tokenizerSize: tokHeight, channels, mean: opts.mean, std: opts.std }),
    transform: opts.transform ?? { kind: 'train' },
    batchSize,
    seed,
    dropLast: true,
    rank: dist.rank,
    worldSize: dist.worldSize,
    threads: opts.threads,
    prefetch: opts.prefetch,
  })
  const updates = updatesPerEpoch(b, loader.batchesPerEpoch, data)
  const totalSteps = resolveSteps(opts.steps, opts.epochs, updates)
  checkSameAcrossRanks(dist, 'pretraining run', { images: data.size, batchSize, accumulate, totalSteps, seed })
  const lr = scheduleFor(opts.schedule, totalSteps)
  const fresh: PretrainState = {
    ...startPosition('pretrain', totalSteps, b, seed),
    masking: masking.getState(),
  }
  // The run folder, its metrics log, and the position to continue from when the model carries one.
  const run = await Run.open({
    outDir: opts.outDir,
    saved: model.trainState,
    fresh,
    owner: 'model',
    runName: 'pretraining',
    title: 'BEiT masked image modeling',
    panels: [
      { key: 'loss' },
      { key: 'mlmAcc', title: 'MIM accuracy' },
      { key: 'lr', log: true },
      { key: 'gradNorm', title: 'gradient norm' },
    ],
    checkpointEvery: opts.checkpointEvery,
    signal: opts.signal,
    distributed: dist,
  })
  let state = run.start
  masking.setState(state.masking)
  if (dist.worldSize > 1) await model.distribute()
  const save = async () => {
    state.masking = masking.getState()
    model.trainState = state
    await model.save(run.checkpoint)
  }
  const patches = model.grid[0] * model.grid[1]

  const means = new UpdateMeans(['loss', 'mlmAcc', 'majorityBaseline'] as const)
  let epoch = state.epoch
  let fromBatch = state.batch + 1
  // Batches of the current update that ran lossAndGrads on this rank.
  let computed = 0
  while (state.step < totalSteps) {
    let started = performance.now()
    for await (const batch of loader.epoch(epoch, { fromBatch })) {
      if (state.step >= totalSteps || batch.batch >= updates * accumulate) break
      const [pixels, tokenizerPixels] = batch.views
      // Masks for the whole global batch on every rank (so the generator's state stays the
      // same everywhere); this rank's part of it.
      const masks = Array.from({ length: dist.worldSize * batchSize }, () => checkMask(masking.generate(), patches))
      const mask = new Uint8Array(batch.size * patches)
      for (let i = 0; i < batch.size; i++) mask.set(masks[dist.rank * batchSize + i], i * patches)
      const stepLr = lr(state.step)
      let gradNorm: number
      try {
        const draws = { seed: deriveSeed(seed, state.step, 2), firstSample: firstSample(b, batch.batch) }
        if (batch.size > 0) {
          const losses = await model.lossAndGrads({ tokenizer, pixels, tokenizerPixels, mask, ...draws })
          means.add(losses, losses.numMasked)
          computed++
        }
        if (!endsUpdate(b, batch.batch)) continue
        gradNorm = await applyComputedUpdate(model, b, computed, stepLr)
        computed = 0
      } catch (e) {
        throw new Error(`pretraining step ${state.step}: ${(e as Error).message}`, { cause: e })
      }
      const { weight: numMasked, ...result } = means.take(dist)
      const images = batchSize * accumulate * dist.worldSize
      const progress: PretrainProgress = {
        ...result,
        gradNorm,
        numMasked,
        step: state.step,
        totalSteps,
        epoch,
        lr: stepLr,
        imagesPerSecond: images / ((performance.now() - started) / 1000),
      }
      state = { ...state, step: state.step + 1, epoch, batch: batch.batch }
      await run.metrics.record({
        step: progress.step,
        epoch,
        loss: result.loss,
        mlmAcc: result.mlmAcc,
        majorityBaseline: result.majorityBaseline,
        lr: stepLr,
        gradNorm,
        images,
        imagesPerSecond: progress.imagesPerSecond,
      })
      opts.onProgress?.(progress)
      // Stopped after the last step, the run is complete: nothing of it is left to resume.
      const stopped = await run.afterStep(state.step, save)
      if (stopped && state.step < totalSteps) return run.end('interrupted', state.step)
      started = performance.now()
    }
    epoch++
    fromBatch = 0
  }
  return run.end('completed', state.step)
}
