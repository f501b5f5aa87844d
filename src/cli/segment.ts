/**
 * `beit segment`: a BEiT + UperNet segmenter fine-tuned on Fashion-MNIST scenes (garments
 * pasted on a canvas, labelled per pixel) or on an ADE20K / VOC folder or a manifest, from a
 * pretrained checkpoint or from scratch, scored with mIoU after every epoch.
 */
import { existsSync } from 'node:fs'
import { join } from 'node:path'

import { defineCommand, flagTable, UsageError } from '../cli-options'
import { DEBIAN_FASHION_MNIST_DIR, embeddedSampleDir, loadFashionMnist } from '../data/fashion-mnist'
import type { ModelSpec } from '../config'
import { CHECKPOINT_FILE, Progress } from '../run'
import { pretrainedBackbone } from '../model'
import { Segmenter } from '../segmenter'
import { finetuneSegmentation, SegmentationEpochResult, SegmentationProgress } from '../segmentation/finetune'
import { fashionScenes } from '../segmentation/scenes'
import {
  segmentationFolder,
  SegmentationDataset,
  segmentationManifest,
  SegmentationTransform,
  vocSegmentation,
} from '../segmentation/data'
import {
  BACKBONE_FLAGS,
  channelsFlag,
  DATA_PARALLEL_FLAGS,
  interruptible,
  joinJob,
  lengthFlags,
  log,
  MODEL_FLAGS,
  modelSpec,
  pct,
  placement,
  prepareOut,
  quietOffMain,
  refuseFlags,
  RUN_FLAGS,
  runLength,
  scheduleOptions,
} from './common'

const { 'scale-min': _scaleMin, threads: _threads, ...SEGMENT_RUN_FLAGS } = RUN_FLAGS

const FLAGS = flagTable({
  data: {
    kind: 'string',
    help: 'sample or fashion-mnist: Fashion-MNIST scenes (bundled sample, Debian package); or an ADE20K folder (images/ and annotations/ with training/ and validation/), a VOC folder (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/), or a CSV manifest (image,mask) for training',
    default: 'sample',
  },
  'test-data': { kind: 'string', help: 'CSV manifest (image,mask) of the test pairs, with a CSV --data' },
  'num-labels': {
    kind: 'int',
    fixed: true,
    help: 'classes of folder or manifest data (default: 150 for ADE20K, 21 for VOC)',
    min: 1,
  },
  'reduce-zero-label': {
    kind: 'bool',
    help: 'mask value 0 is ignored and the others shift down by one (manifests; ADE20K folders always are)',
  },
  'crop-size': {
    kind: 'int',
    fixed: true,
    help: 'training crop of folder or manifest data, the model input (default 512)',
    min: 8,
  },
  'train-scenes': { kind: 'int', help: 'training scenes (from the train split)', default: 2000, min: 1 },
  'test-scenes': { kind: 'int', help: 'test scenes (from the test split)', default: 500, min: 1 },
  'scene-height': { kind: 'int', fixed: true, help: 'scene height in pixels', default: 32, min: 28 },
  'scene-width': { kind: 'int', fixed: true, help: 'scene width in pixels', default: 64, min: 28 },
  init: {
    kind: 'string',
    fixed: true,
    help: 'pretrained MIM or classifier checkpoint (its position tables are resized to the scene size); without it the model starts from random weights',
  },
  ...MODEL_FLAGS,
  'image-size': {
    kind: 'int',
    fixed: true,
    help: 'the model input of folder or manifest data, as --crop-size (scenes are their own size)',
  },
  'patch-size': { kind: 'int', fixed: true, help: 'patch size (default 4 on scenes, 16 on photos)' },
  ...lengthFlags(
    'optimizer steps (or --epochs)',
    'passes over the training scenes (default 5 when --steps is not given)',
  ),
  'eval-every': { kind: 'int', help: 'epochs between test evaluations (and after the last step)', default: 1, min: 1 },
  ...SEGMENT_RUN_FLAGS,
  ...DATA_PARALLEL_FLAGS,
  lr: { kind: 'number', help: 'peak learning rate (linear warmup, then cosine)', default: 1e-3 },
  'layer-decay': { kind: 'number', fixed: true, help: 'layer-wise LR decay (1 = off)', default: 0.65 },
  'aux-channels': { kind: 'int', fixed: true, help: 'channels of the auxiliary FCN head', default: 64, min: 1 },
  'out-indices': {
    kind: 'string',
    fixed: true,
    help: "the four backbone features, as transformers' outIndices, e.g. 2,3,4,5: feature k is the hidden state after k - 1 blocks (default: [3, 5, 7, 11] for 12 blocks, [7, 11, 15, 23] for 24, else spread evenly to the last)",
  },
  out: { kind: 'string', help: 'run folder', default: join('runs', 'segment') },
})

export const segmentCommand = defineCommand({
  name: 'segment',
  summary:
    'Fine-tunes a BEiT + UperNet segmenter on Fashion-MNIST scenes (per-pixel garment classes), from a pretrained checkpoint or from scratch, scoring mIoU after every epoch.',
  flags: FLAGS,
  run: async (values) => {
    if (values.init !== undefined) {
      const why = "takes the backbone's shape from the checkpoint (the data's size resizes its position tables)"
      refuseFlags(values, FLAGS, '--init', why, BACKBONE_FLAGS)
    }
    const job = joinJob(values)
    const v = quietOffMain(values, job)
    const { train, test, size, transform, numLabels, what, channels } = await openSegmentationData(v)
    // A checkpoint of another kind, or for other images, is refused before the run folder is written.
    const pretrained = v.init !== undefined && !v.resume ? await pretrainedBackbone(v.init) : undefined
    if (pretrained && pretrained.numChannels !== channels)
      throw new UsageError(
        what === 'scenes'
          ? `${v.init} takes ${pretrained.numChannels}-channel images but Fashion-MNIST scenes are gray`
          : `${v.init} takes ${pretrained.numChannels}-channel images but the data is read with ${channels} (--channels ${pretrained.numChannels} reads it as the checkpoint takes it)`,
      )
    const out = await prepareOut(FLAGS, { ...values, ...runLength(v, { epochs: 5 }) }, job)
    const options = {
      optimizer: { weightDecay: v['weight-decay'] },
      training: { layerDecay: v['layer-decay'] },
      seed: v.seed,
      ...placement(v, job),
    }
    // The data's class names where it names every label (scenes, VOC), for id2label on export.
    const classNames = train.classNames.length === numLabels ? train.classNames : undefined
    const head = { numLabels, classNames, auxiliaryChannels: v['aux-channels'], ...outIndices(v['out-indices']) }
    let segmenter: Segmenter
    if (v.resume) segmenter = await Segmenter.load(join(out, CHECKPOINT_FILE), placement(v, job))
    else if (v.init !== undefined && pretrained) {
      const model = { ...pretrained, imageSize: size, dropPathRate: v['drop-path'] }
      segmenter = await Segmenter.fromPretrained(v.init, { model, ...head }, options)
    } else {
      // 4 px on the scenes (a garment spans a few patches, as in the demo), BEiT's 16 on photos.
      const patch = v['patch-size'] ?? (what === 'scenes' ? 4 : 16)
      if (size[0] % patch !== 0 || size[1] % patch !== 0)
        throw new UsageError(`the input size ${size.join('x')} must be a multiple of --patch-size ${patch}`)
      const model = {
        // The input size is the data's (scenes or crops), checked against the patch above.
        ...(modelSpec({ ...v, 'image-size': size[0], 'patch-size': patch }, true) as Exclude<ModelSpec, string>),
        imageSize: size,
      }
      segmenter = Segmenter.create({ model: { ...model, numChannels: channels }, ...head }, options)
    }
    log(
      v,
      `segmentation ${v.init ? `from ${v.init}` : 'from scratch'} (${segmenter.numParameters.toLocaleString()} parameters) on ${train.size.toLocaleString()} ${what} at ${size.join('x')}, ${numLabels} classes${v.resume ? `, resuming at step ${segmenter.step}` : ''}`,
    )
    let bar: Progress | undefined
    const result = await interruptible((signal) =>
      finetuneSegmentation({
        segmenter,
        train,
        test,
        ...runLength(v, { epochs: 5 }),
        evalEvery: v['eval-every'],
        transform,
        batchSize: v['batch-size'],
        ...job,
        schedule: scheduleOptions(v),
        seed: v.seed,
        outDir: out,
        checkpointEvery: v['checkpoint-every'],
        signal,
        onProgress: (p: SegmentationProgress) => {
          bar ??= new Progress('segment', p.totalSteps, { quiet: v.quiet, every: 50, startAt: p.step })
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

type SegmentValues = Parameters<typeof segmentCommand.run>[0]

/** The train and test pairs `--data` names, the input size, the augmentation and the classes. */
async function openSegmentationData(v: SegmentValues): Promise<{
  train: SegmentationDataset
  test: SegmentationDataset
  size: [number, number]
  transform: SegmentationTransform
  numLabels: number
  channels: 1 | 3
  what: string
}> {
  if (v.data === 'sample' || v.data === 'fashion-mnist') {
    const why = 'builds Fashion-MNIST scenes, whose size, classes and test split are their own'
    refuseFlags(v, FLAGS, `--data ${v.data}`, why, [
      'image-size',
      'crop-size',
      'num-labels',
      'test-data',
      'reduce-zero-label',
    ])
    if (v.channels !== undefined && v.channels !== 1)
      throw new UsageError(`Fashion-MNIST scenes are gray: --channels must be 1 or left out, got ${v.channels}`)
    const dir = v.data === 'sample' ? embeddedSampleDir() : DEBIAN_FASHION_MNIST_DIR
    const size: [number, number] = [v['scene-height'], v['scene-width']]
    const scenes = async (split: 'train' | 'test', count: number, seed: number) =>
      fashionScenes(await loadFashionMnist({ split, dir }), { count, size, seed, name: `${v.data} ${split} scenes` })
    const train = await scenes('train', v['train-scenes'], v.seed)
    const test = await scenes('test', v['test-scenes'], v.seed + 1)
    // Scenes come at the input size: a joint flip only (the rescale is 1 at the scenes' own scale,
    // where the default [4 x short, short] would shrink scenes more than 4 times as wide as high).
    const scale: [number, number] = [Math.max(...size), Math.min(...size)]
    const transform = { scale, ratioRange: [1, 1], catMaxRatio: 1, photometric: false } satisfies SegmentationTransform
    return { train, test, size, transform, numLabels: train.classNames.length, channels: 1, what: 'scenes' }
  }
  const path = v.data
  const csv = path.toLowerCase().endsWith('.csv')
  refuseFlags(v, FLAGS, `--data ${path}`, 'reads pairs, not Fashion-MNIST scenes', [
    'train-scenes',
    'test-scenes',
    'scene-height',
    'scene-width',
  ])
  if (!csv) {
    const folder = 'is a folder, whose test split and label convention are its own'
    refuseFlags(v, FLAGS, `--data ${path}`, folder, ['test-data', 'reduce-zero-label'])
  }
  const channels = channelsFlag(v.channels, 3)
  const reduceZeroLabel = v['reduce-zero-label']
  let train: SegmentationDataset
  let test: SegmentationDataset
  let what: string
  if (csv) {
    if (!v['test-data']) throw new UsageError('a CSV --data needs --test-data (a CSV manifest of the test pairs)')
    train = await segmentationManifest(path, { reduceZeroLabel })
    test = await segmentationManifest(v['test-data'], { reduceZeroLabel })
    what = 'manifest pairs'
  } else if (existsSync(join(path, 'ImageSets', 'Segmentation'))) {
    train = await vocSegmentation(path, { split: 'train' })
    test = await vocSegmentation(path, { split: 'val' })
    what = 'VOC images'
  } else if (existsSync(join(path, 'images', 'training'))) {
    const ade = { reduceZeroLabel: true }
    train = await segmentationFolder(path, { ...ade, split: 'training' })
    test = await segmentationFolder(path, { ...ade, split: 'validation' })
    what = 'ADE20K-style images'
  } else {
    throw new UsageError(
      `--data ${path}: expected sample, fashion-mnist, an ADE20K folder (images/training, annotations/training), a VOC folder (ImageSets/Segmentation) or a CSV manifest`,
    )
  }
  const numLabels = v['num-labels'] ?? (train.classNames.length || (what.startsWith('ADE') ? 150 : 0))
  if (!numLabels) throw new UsageError(`--num-labels is needed for ${path}: its classes are not known`)
  const crop = v['crop-size'] ?? v['image-size'] ?? 512
  return {
    train,
    test,
    size: [crop, crop],
    transform: {},
    numLabels,
    channels,
    what,
  }
}

/** `--out-indices` as four integers (checked against the depth by the model's config). */
function outIndices(flag: string | undefined): { outIndices?: [number, number, number, number] } {
  if (flag === undefined) return {}
  const parts = flag.split(',').map((p) => p.trim())
  const values = parts.map(Number)
  if (values.length !== 4 || values.some((n, i) => !/^\d+$/.test(parts[i]) || n < 1))
    throw new UsageError(`--out-indices: expected four positive integers like 2,3,4,5, got ${JSON.stringify(flag)}`)
  return { outIndices: values as [number, number, number, number] }
}
