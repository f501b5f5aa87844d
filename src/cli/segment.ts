/**
 * `beit segment`: a BEiT + UperNet segmenter fine-tuned on Fashion-MNIST scenes (garments
 * pasted on a canvas, labelled per pixel), from a pretrained checkpoint or from scratch,
 * scored with mIoU after every epoch.
 */
import { join } from 'node:path'

import { defineCommand, flagTable, UsageError } from '../cli-options'
import { DEBIAN_FASHION_MNIST_DIR, embeddedSampleDir, loadFashionMnist } from '../data/fashion-mnist'
import type { ModelSpec } from '../config'
import { Beit } from '../model'
import { CHECKPOINT_FILE, Progress } from '../run'
import { Segmenter } from '../segmenter'
import { finetuneSegmentation, SegmentationEpochResult, SegmentationProgress } from '../segmentation/finetune'
import { fashionScenes } from '../segmentation/scenes'
import {
  interruptible,
  lengthFlags,
  log,
  MODEL_FLAGS,
  modelSpec,
  pct,
  placement,
  prepareOut,
  RUN_FLAGS,
  runLength,
  scheduleOptions,
} from './common'

const { 'scale-min': _scaleMin, threads: _threads, ...SEGMENT_RUN_FLAGS } = RUN_FLAGS

const FLAGS = flagTable({
  data: {
    kind: 'string',
    help: 'garments for the scenes: sample (bundled) or fashion-mnist (the Debian package)',
    default: 'sample',
    choices: ['sample', 'fashion-mnist'],
  },
  'train-scenes': { kind: 'int', help: 'training scenes (from the train split)', default: 2000, min: 1 },
  'test-scenes': { kind: 'int', help: 'test scenes (from the test split)', default: 500, min: 1 },
  'scene-height': { kind: 'int', help: 'scene height in pixels', default: 32, min: 28 },
  'scene-width': { kind: 'int', help: 'scene width in pixels', default: 64, min: 28 },
  init: {
    kind: 'string',
    help: 'pretrained MIM or classifier checkpoint (its position tables are resized to the scene size); without it the model starts from random weights',
  },
  ...MODEL_FLAGS,
  ...lengthFlags(
    'optimizer steps (or --epochs)',
    'passes over the training scenes (default 5 when --steps is not given)',
  ),
  'eval-every': { kind: 'int', help: 'epochs between test evaluations (and after the last step)', default: 1, min: 1 },
  ...SEGMENT_RUN_FLAGS,
  'layer-decay': { kind: 'number', help: 'layer-wise LR decay (1 = off)', default: 0.65 },
  'aux-channels': { kind: 'int', help: 'channels of the auxiliary FCN head', default: 64, min: 1 },
  out: { kind: 'string', help: 'run folder', default: join('runs', 'segment') },
})

export const segmentCommand = defineCommand({
  name: 'segment',
  summary:
    'Fine-tunes a BEiT + UperNet segmenter on Fashion-MNIST scenes (per-pixel garment classes), from a pretrained checkpoint or from scratch, scoring mIoU after every epoch.',
  flags: FLAGS,
  run: async (v) => {
    const out = await prepareOut(FLAGS, { ...v, ...runLength(v, { epochs: 5 }) }, undefined)
    const dir = v.data === 'sample' ? embeddedSampleDir() : DEBIAN_FASHION_MNIST_DIR
    const size: [number, number] = [v['scene-height'], v['scene-width']]
    const scenes = async (split: 'train' | 'test', count: number, seed: number) =>
      fashionScenes(await loadFashionMnist({ split, dir }), { count, size, seed, name: `${v.data} ${split} scenes` })
    const train = await scenes('train', v['train-scenes'], v.seed)
    const test = await scenes('test', v['test-scenes'], v.seed + 1)
    const numLabels = train.classNames.length
    const options = {
      optimizer: { weightDecay: v['weight-decay'] },
      training: { layerDecay: v['layer-decay'] },
      seed: v.seed,
      ...placement(v),
    }
    const head = { numLabels, auxiliaryChannels: v['aux-channels'] }
    let segmenter: Segmenter
    if (v.resume) segmenter = await Segmenter.load(join(out, CHECKPOINT_FILE), placement(v))
    else if (v.init !== undefined) {
      const pretrained = (await Beit.load(v.init, { device: 'cpu' })).config
      const model = { ...pretrained, imageSize: size, dropPathRate: v['drop-path'] }
      segmenter = await Segmenter.fromPretrained(v.init, { model, ...head }, options)
    } else {
      const patch = v['patch-size'] ?? 4
      if (size[0] % patch !== 0 || size[1] % patch !== 0)
        throw new UsageError(`the scene size ${size.join('x')} must be a multiple of --patch-size ${patch}`)
      const model = {
        ...(modelSpec({ ...v, 'patch-size': patch }, true) as Exclude<ModelSpec, string>),
        imageSize: size,
      }
      segmenter = Segmenter.create({ model, ...head }, options)
    }
    log(
      v,
      `segmentation ${v.init ? `from ${v.init}` : 'from scratch'} (${segmenter.numParameters.toLocaleString()} parameters) on ${train.count.toLocaleString()} ${size.join('x')} scenes, ${numLabels} classes (background + garments)${v.resume ? `, resuming at step ${segmenter.step}` : ''}`,
    )
    let bar: Progress | undefined
    const start = segmenter.step
    const result = await interruptible((signal) =>
      finetuneSegmentation({
        segmenter,
        train,
        test,
        ...runLength(v, { epochs: 5 }),
        evalEvery: v['eval-every'],
        batchSize: v['batch-size'],
        schedule: scheduleOptions({ ...v, lr: v.lr ?? 1e-3 }),
        seed: v.seed,
        outDir: out,
        checkpointEvery: v['checkpoint-every'],
        signal,
        onProgress: (p: SegmentationProgress) => {
          bar ??= new Progress('segment', p.totalSteps, { quiet: v.quiet, every: 50, startAt: start })
          bar.update(p.step + 1, {
            loss: p.loss.toFixed(3),
            'pixel acc': p.pixelAccuracy.toFixed(3),
            'img/s': p.imagesPerSecond.toFixed(0),
          })
        },
        onEpoch: (e: SegmentationEpochResult) => {
          bar?.end()
          bar = undefined
          log(
            v,
            `epoch ${e.epoch + 1}: test mIoU ${pct(e.meanIou)}, pixel accuracy ${pct(e.overallAccuracy)}, train loss ${e.trainLoss.toFixed(4)}`,
          )
        },
      }),
    )
    if (result.status === 'completed') {
      const last = result.evals[result.evals.length - 1]
      log(
        v,
        `done: test mIoU ${pct(last.meanIou)}, mean accuracy ${pct(last.meanAccuracy)}, pixel accuracy ${pct(last.overallAccuracy)}; checkpoint, metrics.jsonl, curves.svg in ${out}`,
      )
    }
  },
})
