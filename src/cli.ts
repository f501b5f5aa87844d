#!/usr/bin/env node
/**
 * The `beit` command: tokenizer -> pretrain -> finetune / probe, plus encode, reconstruct and
 * the embedded demo. Each command's flags are data (cli-options.ts); every run folder gets the
 * resolved config.json, metrics.jsonl, curves.svg and a resumable checkpoint.
 */
import { existsSync } from 'node:fs'
import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

import { Classifier } from './classifier'
import { Command, FlagTable, parseCommand, resolvedConfig, usage, UsageError, Values } from './cli-options'
import { TrainTransform } from './data/augment'
import { ImageDataset } from './data/dataset'
import { DeviceOptions, DeviceSpec, PrecisionSpec } from './device'
import { exportHuggingFace, HuggingFaceTask, importHuggingFace } from './huggingface'
import { openDataset } from './data/open'
import { EpochResult, finetune, FinetuneProgress } from './finetune'
import { BlockwiseMaskGenerator, MaskGenerator, RandomMaskGenerator } from './masking'
import { Beit } from './model'
import { ModelSpec, PresetName, PRESETS } from './config'
import { linearProbe, LinearProbeResult } from './probe'
import { pretrain, PretrainProgress, RunResult } from './pretrain'
import { formatSeconds, interruptSignal, Progress } from './run'
import { cosineRamp } from './schedule'
import { DVAE_PRESETS, Dvae, DvaePresetName } from './tokenizer'
import { TokenizerEvaluation, tokenizerLoader, trainTokenizer, writeSheet } from './train-tokenizer'

const DATA_HELP = 'sample (bundled Fashion-MNIST subset), fashion-mnist (Debian dataset-fashion-mnist), a folder (IDX files, or images with class subfolders; DIR/train and DIR/test or DIR/val are used when present) or a .csv/.jsonl manifest'

const MODEL_FLAGS: FlagTable = {
  preset: { kind: 'string', help: 'backbone size', default: 'mini', choices: Object.keys(PRESETS) },
  'image-size': { kind: 'int', help: 'input size in pixels (default: 28 for IDX data, 224 for image files)' },
  'patch-size': { kind: 'int', help: 'patch size (default: image size / 7 for 28 px, else 16)' },
  channels: { kind: 'int', help: 'input channels, 1 or 3 (default: 1 for IDX data, 3 for image files)' },
  'hidden-size': { kind: 'int', help: "override the preset's width" },
  layers: { kind: 'int', help: "override the preset's depth" },
  heads: { kind: 'int', help: "override the preset's attention heads" },
  'mlp-size': { kind: 'int', help: "override the preset's MLP width" },
  'drop-path': { kind: 'number', help: 'maximum stochastic-depth rate', default: 0.1, min: 0 },
}

const RUN_FLAGS: FlagTable = {
  'batch-size': { kind: 'int', help: 'images per step', default: 64 },
  lr: { kind: 'number', help: 'peak learning rate (linear warmup, then cosine)' },
  'min-lr': { kind: 'number', help: 'final learning rate (default lr / 150)', min: 0 },
  'warmup-steps': { kind: 'int', help: 'warmup steps (default 5% of the run)', min: 0 },
  'weight-decay': { kind: 'number', help: 'AdamW weight decay', default: 0.05, min: 0 },
  'scale-min': { kind: 'number', help: 'RandomResizedCrop smallest area share', default: 0.35 },
  seed: { kind: 'int', help: 'seed of init, data order, augmentation, masks, drop path', default: 0, min: 0 },
  resume: { kind: 'bool', help: 'continue the run in --out from its checkpoint', default: false },
  'checkpoint-every': { kind: 'int', help: 'steps between checkpoints', default: 500 },
  threads: { kind: 'int', help: 'image decoding threads (default: all cores)' },
}

/** A dataset and its test split where one exists. */
async function openData(spec: string): Promise<{ train: ImageDataset; test: ImageDataset | undefined; pixels: boolean }> {
  const train = await openDataset(spec, 'train')
  let test: ImageDataset | undefined
  try {
    test = await openDataset(spec, 'test')
    if (test.name === train.name) test = undefined
  } catch {
    test = undefined
  }
  return { train, test, pixels: train.source.kind === 'pixels' }
}

function modelSpec(v: Values, pixels: boolean, vocabSize?: number): ModelSpec {
  const imageSize = (v['image-size'] as number | undefined) ?? (pixels ? 28 : 224)
  const channels = (v.channels as number | undefined) ?? (pixels ? 1 : 3)
  if (channels !== 1 && channels !== 3) throw new UsageError(`--channels must be 1 or 3, got ${channels}`)
  const patchSize = (v['patch-size'] as number | undefined) ?? (imageSize === 28 ? 4 : 16)
  if (imageSize % patchSize !== 0) throw new UsageError(`--image-size ${imageSize} must be a multiple of --patch-size ${patchSize}`)
  const overrides: Partial<Record<string, number>> = {
    hiddenSize: v['hidden-size'] as number | undefined,
    numHiddenLayers: v.layers as number | undefined,
    numAttentionHeads: v.heads as number | undefined,
    intermediateSize: v['mlp-size'] as number | undefined,
    vocabSize,
  }
  const defined = Object.fromEntries(Object.entries(overrides).filter(([, x]) => x !== undefined))
  return { preset: v.preset as PresetName, imageSize: [imageSize, imageSize], patchSize, numChannels: channels, dropPathRate: v['drop-path'] as number, ...defined }
}

function trainTransform(v: Values, jitter: boolean): TrainTransform {
  const scaleMin = v['scale-min'] as number
  if (scaleMin > 1) throw new UsageError(`--scale-min must be at most 1, got ${scaleMin}`)
  return { kind: 'train', scale: [scaleMin, 1], colorJitter: jitter ? {} : null }
}

async function prepareOut(command: Command, v: Values): Promise<string> {
  const out = v.out as string
  const checkpoint = join(out, 'checkpoint.safetensors')
  if (!v.resume && existsSync(checkpoint)) throw new UsageError(`${out} already holds a run (checkpoint.safetensors): pass --resume to continue it, or choose another --out`)
  if (v.resume && !existsSync(checkpoint)) throw new UsageError(`--resume: no checkpoint at ${checkpoint}`)
  await mkdir(out, { recursive: true })
  await writeFile(join(out, 'config.json'), JSON.stringify(resolvedConfig(command, v), null, 2) + '\n')
  return out
}

/** Runs `body` with SIGINT/SIGTERM turned into a checkpoint-and-stop. */
async function interruptible<R extends RunResult>(body: (signal: AbortSignal) => Promise<R>): Promise<R> {
  const { signal, dispose } = interruptSignal()
  try {
    const result = await body(signal)
    if (result.status === 'interrupted') {
      process.stderr.write(`beit: interrupted after step ${result.step}; checkpoint ${result.checkpoint} (continue with --resume)\n`)
      process.exitCode = 130
    }
    return result
  } finally {
    dispose()
  }
}

function pretrainProgress(quiet: boolean, totalSteps: () => number, start: number) {
  let bar: Progress | undefined
  return (p: PretrainProgress) => {
    bar ??= new Progress('pretrain', totalSteps(), { quiet, every: 25, startAt: start })
    bar.update(p.step + 1, { loss: p.loss.toFixed(3), acc: p.mlmAcc.toFixed(3), lr: p.lr.toExponential(1), 'img/s': p.imagesPerSecond.toFixed(0) })
    if (p.step + 1 === p.totalSteps) bar.end()
  }
}

const pretrainCommand: Command = {
  name: 'pretrain',
  summary: 'Masked image modeling: a BEiT learns to predict a trained tokenizer\'s visual tokens of masked patches.',
  flags: {
    data: { kind: 'string', help: DATA_HELP, default: 'sample' },
    tokenizer: { kind: 'string', help: 'tokenizer checkpoint (beit tokenizer); its token grid must equal the patch grid' },
    ...MODEL_FLAGS,
    steps: { kind: 'int', help: 'optimizer steps (or --epochs)' },
    epochs: { kind: 'number', help: 'passes over the data (default 1 when --steps is not given)' },
    ...RUN_FLAGS,
    lr: { kind: 'number', help: 'peak learning rate', default: 1.5e-3 },
    masking: { kind: 'string', help: 'mask generator', default: 'blockwise', choices: ['blockwise', 'random'] },
    'mask-ratio': { kind: 'number', help: 'share of patches masked', default: 0.4 },
    jitter: { kind: 'bool', help: 'ColorJitter(0.4, 0.4, 0.4) before cropping', default: true },
    out: { kind: 'string', help: 'run folder', default: join('runs', 'pretrain') },
  },
  run: async (v) => {
    if (v.tokenizer === undefined) throw new UsageError('--tokenizer is required: a checkpoint from `beit tokenizer`')
    const out = await prepareOut(pretrainCommand, v)
    const { train, pixels } = await openData(v.data as string)
    const tokenizer = await Dvae.load(v.tokenizer as string, placement(v))
    await writeSheet(tokenizer, train, 16, join(out, 'reconstructions.png'))
    const model = v.resume
      ? await Beit.load(join(out, 'checkpoint.safetensors'), placement(v))
      : Beit.create(modelSpec(v, pixels, tokenizer.config.vocabSize), { seed: v.seed as number, optimizer: { weightDecay: v['weight-decay'] as number }, ...placement(v) })
    const [gh, gw] = model.grid
    const ratio = v['mask-ratio'] as number
    if (ratio >= 1) throw new UsageError(`--mask-ratio must be below 1, got ${ratio}`)
    const count = Math.max(1, Math.round(ratio * gh * gw))
    const masking: MaskGenerator =
      v.masking === 'random'
        ? new RandomMaskGenerator({ height: gh, width: gw, maskRatio: ratio, seed: v.seed as number })
        : new BlockwiseMaskGenerator({ height: gh, width: gw, numMaskingPatches: count, minNumPatches: Math.min(16, Math.max(2, Math.round(count / 5))), seed: v.seed as number })
    const epochs = v.steps === undefined ? ((v.epochs as number | undefined) ?? 1) : undefined
    const start = model.step
    log(v, `pretraining BEiT ${v.preset} (${model.numParameters.toLocaleString()} parameters, ${gh}x${gw} patches) on ${train.size.toLocaleString()} images of ${train.name}, tokens from ${v.tokenizer}${v.resume ? `, resuming at step ${start}` : ''}`)
    let total = 0
    const result = await interruptible((signal) =>
      pretrain({
        model,
        tokenizer,
        data: train,
        masking,
        batchSize: v['batch-size'] as number,
        steps: v.steps as number | undefined,
        epochs,
        schedule: { lr: v.lr as number, minLr: v['min-lr'] as number | undefined, warmupSteps: v['warmup-steps'] as number | undefined },
        transform: trainTransform(v, v.jitter as boolean),
        seed: v.seed as number,
        outDir: out,
        checkpointEvery: v['checkpoint-every'] as number,
        threads: v.threads as number | undefined,
        signal,
        onProgress: (p) => {
          total = p.totalSteps
          pretrainProgress(v.quiet as boolean, () => total, start)(p)
        },
      }),
    )
    if (result.status === 'completed') log(v, `done: ${result.step} steps; checkpoint ${result.checkpoint}, metrics.jsonl and curves.svg in ${out}`)
  },
}

const finetuneCommand: Command = {
  name: 'finetune',
  summary: 'Fine-tunes a classifier (mean-pooled patches -> LayerNorm -> Linear, or [CLS]) from a pretrained checkpoint or from scratch, evaluating after every epoch.',
  flags: {
    data: { kind: 'string', help: DATA_HELP, default: 'sample' },
    init: { kind: 'string', help: 'pretrained MIM checkpoint (beit pretrain); without it the model starts from random weights' },
    ...MODEL_FLAGS,
    epochs: { kind: 'number', help: 'passes over the training data', default: 5 },
    ...RUN_FLAGS,
    lr: { kind: 'number', help: 'peak learning rate', default: 1e-3 },
    'layer-decay': { kind: 'number', help: 'layer-wise LR decay (1 = off)', default: 0.75 },
    'label-smoothing': { kind: 'number', help: 'label smoothing', default: 0.1, min: 0 },
    pooling: { kind: 'string', help: 'classifier input', default: 'mean', choices: ['mean', 'cls'] },
    out: { kind: 'string', help: 'run folder', default: join('runs', 'finetune') },
  },
  run: async (v) => {
    const out = await prepareOut(finetuneCommand, v)
    const { train, test } = await openData(v.data as string)
    if (!test) throw new UsageError(`--data ${v.data}: fine-tuning needs a test split (IDX t10k files, or a test/ or val/ folder)`)
    const result = await runFinetune(v, train, test, out)
    if (result.status === 'completed') {
      const best = Math.max(...result.evals.map((e) => e.evalAccuracy))
      log(v, `done: test accuracy ${pct(result.evals[result.evals.length - 1].evalAccuracy)} (best epoch ${pct(best)}); checkpoint, metrics.jsonl, curves.svg in ${out}`)
    }
  },
}

async function runFinetune(v: Values, train: ImageDataset, test: ImageDataset, out: string): Promise<RunResult & { evals: EpochResult[] }> {
  const pixels = train.source.kind === 'pixels'
  const options = {
    optimizer: { weightDecay: v['weight-decay'] as number },
    finetune: { labelSmoothing: v['label-smoothing'] as number, layerDecay: v['layer-decay'] as number },
    seed: v.seed as number,
    ...placement(v),
  }
  const numLabels = Math.max(train.classNames.length, test.classNames.length)
  const pooling = v.pooling as 'mean' | 'cls'
  let classifier: Classifier
  if (v.resume) classifier = await Classifier.load(join(out, 'checkpoint.safetensors'), placement(v))
  else if (v.init !== undefined) {
    const pretrained = (await Beit.load(v.init as string, { device: 'cpu' })).config
    classifier = await Classifier.fromPretrained(v.init as string, { model: { ...pretrained, dropPathRate: v['drop-path'] as number }, numLabels, pooling }, options)
  } else classifier = Classifier.create({ model: modelSpec(v, pixels), numLabels, pooling }, options)
  log(v, `fine-tuning ${v.init ? `from ${v.init}` : 'from scratch'} (${classifier.numParameters.toLocaleString()} parameters) on ${train.size.toLocaleString()} images, ${numLabels} classes${v.resume ? `, resuming at step ${classifier.step}` : ''}`)
  let bar: Progress | undefined
  const start = classifier.step
  return interruptible((signal) =>
    finetune({
      classifier,
      train,
      test,
      epochs: v.epochs as number,
      batchSize: v['batch-size'] as number,
      schedule: { lr: v.lr as number, minLr: v['min-lr'] as number | undefined, warmupSteps: v['warmup-steps'] as number | undefined },
      transform: trainTransform(v, false),
      seed: v.seed as number,
      outDir: out,
      checkpointEvery: v['checkpoint-every'] as number,
      threads: v.threads as number | undefined,
      signal,
      onProgress: (p: FinetuneProgress) => {
        bar ??= new Progress('finetune', p.totalSteps, { quiet: v.quiet as boolean, every: 50, startAt: start })
        bar.update(p.step + 1, { loss: p.loss.toFixed(3), acc: p.accuracy.toFixed(3), 'img/s': p.imagesPerSecond.toFixed(0) })
      },
      onEpoch: (e: EpochResult) => {
        bar?.end()
        bar = undefined
        log(v, `epoch ${e.epoch + 1}: test accuracy ${pct(e.evalAccuracy)}, train loss ${e.trainLoss.toFixed(4)}, train accuracy ${pct(e.trainAccuracy)}`)
      },
    }),
  )
}

const probeCommand: Command = {
  name: 'probe',
  summary: 'Linear probe: a linear classifier on frozen features ([CLS] + mean patch token of one layer) of a pretrained or a random backbone.',
  flags: {
    data: { kind: 'string', help: DATA_HELP, default: 'sample' },
    init: { kind: 'string', help: 'pretrained MIM checkpoint; without it a random backbone built from the model flags (or --random-like)' },
    'random-like': { kind: 'string', help: 'a MIM checkpoint whose config (not weights) the random backbone copies' },
    ...MODEL_FLAGS,
    layer: { kind: 'int', help: 'block whose output is probed, 1-based (default 3/4 of the depth)' },
    epochs: { kind: 'int', help: 'passes over the features', default: 10 },
    'batch-size': { kind: 'int', help: 'features per step', default: 256 },
    lr: { kind: 'number', help: 'peak learning rate (cosine to 1/100)', default: 1e-2 },
    seed: { kind: 'int', help: 'seed', default: 0, min: 0 },
    threads: { kind: 'int', help: 'image decoding threads' },
    out: { kind: 'string', help: 'result file (JSON)', default: join('runs', 'probe.json') },
  },
  run: async (v) => {
    const { train, test, pixels } = await openData(v.data as string)
    if (!test) throw new UsageError(`--data ${v.data}: probing needs a test split`)
    const backbone = await probeBackbone(v, pixels)
    const result = await runProbe(v, backbone, train, test)
    await mkdir(join(v.out as string, '..'), { recursive: true })
    await writeFile(v.out as string, JSON.stringify({ init: v.init ?? 'random', ...result }, null, 2) + '\n')
    log(v, `linear probe of layer ${result.layer}: test accuracy ${pct(result.testAccuracy)} (train ${pct(result.trainAccuracy)}); written to ${v.out}`)
  },
}

async function probeBackbone(v: Values, pixels: boolean): Promise<Beit> {
  if (v.init !== undefined) return Beit.load(v.init as string, placement(v))
  const like = v['random-like'] === undefined ? undefined : (await Beit.load(v['random-like'] as string, { device: 'cpu' })).config
  return Beit.create(like ?? modelSpec(v, pixels), { seed: v.seed as number, ...placement(v) })
}

async function runProbe(v: Values, backbone: Beit, train: ImageDataset, test: ImageDataset): Promise<LinearProbeResult> {
  const epochs = v.epochs as number
  const bar = new Progress('probe', epochs, { quiet: v.quiet as boolean, every: 5 })
  const result = await linearProbe({
    backbone,
    train,
    test,
    layer: v.layer as number | undefined,
    epochs,
    batchSize: v['batch-size'] as number,
    lr: v.lr as number,
    seed: v.seed as number,
    threads: v.threads as number | undefined,
    onEpoch: (e) => bar.update(e.epoch + 1, { loss: e.loss.toFixed(4), acc: e.trainAccuracy.toFixed(3) }),
  })
  bar.end()
  return result
}

const tokenizerCommand: Command = {
  name: 'tokenizer',
  summary: 'Trains a dVAE visual tokenizer (Gumbel-softmax relaxation) on any image data, resized to its input size.',
  flags: {
    data: { kind: 'string', help: DATA_HELP, default: 'sample' },
    preset: { kind: 'string', help: 'dVAE size', default: 'tiny', choices: Object.keys(DVAE_PRESETS) },
    'vocab-size': { kind: 'int', help: "codebook size (default: the preset's)" },
    'image-size': { kind: 'int', help: "input size in pixels (default: the images' own for IDX data, else the preset's)" },
    channels: { kind: 'int', help: 'input channels, 1 or 3 (default: 1 for IDX data, 3 for image files)' },
    steps: { kind: 'int', help: 'training steps', default: 1000 },
    'batch-size': { kind: 'int', help: 'images per step', default: 32 },
    lr: { kind: 'number', help: 'peak learning rate, cosine to 1/100 of it', default: 2e-3 },
    'kl-weight': { kind: 'number', help: 'final KL weight, reached half way (DALL-E: 6.6)', default: 6.6, min: 0 },
    ema: { kind: 'number', help: 'EMA decay of the weights, 0 = off', default: 0, min: 0 },
    seed: { kind: 'int', help: 'seed', default: 0, min: 0 },
    threads: { kind: 'int', help: 'image decoding threads' },
    out: { kind: 'string', help: 'run folder', default: join('runs', 'tokenizer') },
  },
  run: async (v) => {
    const train = await openDataset(v.data as string, 'train')
    const test = await openDataset(v.data as string, 'test')
    const preset = v.preset as DvaePresetName
    const source = train.source.kind === 'pixels' ? train.source : undefined
    const channels = (v.channels as number | undefined) ?? source?.channels ?? 3
    if (channels !== 1 && channels !== 3) throw new UsageError(`--channels must be 1 or 3, got ${channels}`)
    const given = v['image-size'] as number | undefined
    const imageSize: [number, number] = given !== undefined ? [given, given] : source ? [source.height, source.width] : DVAE_PRESETS[preset].imageSize
    const vocab = v['vocab-size'] === undefined ? {} : { vocabSize: v['vocab-size'] as number }
    if ((v.ema as number) >= 1) throw new UsageError(`--ema must be below 1, got ${v.ema}`)
    const tokenizer = Dvae.create({ preset, numChannels: channels, imageSize, ...vocab }, { seed: v.seed as number, emaDecay: v.ema as number, ...placement(v) })
    await mkdir(v.out as string, { recursive: true })
    await writeFile(join(v.out as string, 'config.json'), JSON.stringify(resolvedConfig(tokenizerCommand, v), null, 2) + '\n')
    log(v, `tokenizer: dVAE ${preset} at ${imageSize[0]}x${imageSize[1]}x${channels} on ${train.size.toLocaleString()} images of ${train.name}`)
    const evaluation = await runTokenizer(v, tokenizer, train, test)
    printTokenizerEvaluation(evaluation, tokenizer)
    log(v, `run folder ${v.out}: tokenizer.safetensors, metrics.jsonl, reconstructions.png, evaluation.json`)
  },
}

async function runTokenizer(v: Values, tokenizer: Dvae, train: ImageDataset, test: ImageDataset): Promise<TokenizerEvaluation & { seconds: number }> {
  const steps = v.steps as number
  const lr = v.lr as number
  const bar = new Progress('tokenizer', steps, { quiet: v.quiet as boolean, every: 50 })
  const started = performance.now()
  const { evaluation } = await trainTokenizer({
    tokenizer,
    data: train,
    evalData: test,
    steps,
    batchSize: v['batch-size'] as number,
    seed: v.seed as number,
    lr: cosineRamp({ from: lr, to: lr / 100, steps }),
    klWeight: cosineRamp({ from: 0, to: v['kl-weight'] as number, steps: Math.ceil(steps / 2) }),
    outDir: v.out as string,
    threads: v.threads as number | undefined,
    onProgress: (p) => bar.update(p.step + 1, { loss: p.loss.toFixed(4), recon: p.reconLoss.toFixed(4), perplexity: p.perplexity.toFixed(1), 'img/s': p.imagesPerSecond.toFixed(0) }),
  })
  bar.end()
  return { ...evaluation, seconds: (performance.now() - started) / 1000 }
}

function printTokenizerEvaluation(e: TokenizerEvaluation & { seconds: number }, tokenizer: Dvae): void {
  table(['tokenizer (held-out images)', 'value'], [
    ['reconstruction MSE', e.reconstructionMse.toFixed(4)],
    ['mean-image baseline MSE', e.meanImageMse.toFixed(4)],
    ['codebook perplexity', e.perplexity.toFixed(1)],
    ['codes used', `${(e.codesUsedFraction * 100).toFixed(1)}% of ${tokenizer.config.vocabSize}`],
    ['wall time', formatSeconds(e.seconds)],
  ])
}

const encodeCommand: Command = {
  name: 'encode',
  summary: 'Images -> visual token ids, one JSON line per image ({"image", "ids"}).',
  flags: {
    tokenizer: { kind: 'string', help: 'tokenizer checkpoint' },
    data: { kind: 'string', help: DATA_HELP, default: 'sample' },
    split: { kind: 'string', help: 'which split of --data', default: 'test', choices: ['train', 'test'] },
    limit: { kind: 'int', help: 'encode only the first N images' },
    out: { kind: 'string', help: 'output JSONL file', default: join('runs', 'tokens.jsonl') },
  },
  run: async (v) => {
    if (v.tokenizer === undefined) throw new UsageError('--tokenizer is required')
    const tokenizer = await Dvae.load(v.tokenizer as string, placement(v))
    const data = limit(await openDataset(v.data as string, v.split as 'train' | 'test'), v.limit as number | undefined)
    const [h, w] = tokenizer.config.imageSize.map((s) => s / tokenizer.downsample)
    const lines: string[] = []
    for await (const batch of tokenizerLoader(tokenizer, data, { batchSize: 64, shuffle: false }).epoch(0)) {
      const ids = await tokenizer.encode(batch.views[0], batch.size)
      for (let i = 0; i < batch.size; i++) {
        const image = data.source.kind === 'files' ? data.source.paths[batch.indices[i]] : `${data.name}[${batch.indices[i]}]`
        lines.push(JSON.stringify({ image, grid: [h, w], ids: Array.from(ids.subarray(i * h * w, (i + 1) * h * w)) }))
      }
    }
    await mkdir(join(v.out as string, '..'), { recursive: true })
    await writeFile(v.out as string, lines.join('\n') + '\n')
    log(v, `${lines.length} images -> ${h}x${w} token ids of ${tokenizer.config.vocabSize}: ${v.out}`)
  },
}

const importCommand: Command = {
  name: 'import',
  summary: 'A Hugging Face transformers BEiT folder (config.json + model.safetensors) -> a beit checkpoint.',
  flags: {
    from: { kind: 'string', help: 'transformers folder (BeitForMaskedImageModeling, BeitForImageClassification or BeitModel)' },
    task: { kind: 'string', help: 'what it becomes: mim or classifier (default: from its architectures)', choices: ['mim', 'classifier'] },
    'image-size': { kind: 'int', help: 'new input size in pixels: position tables are resized to its grid' },
    'num-labels': { kind: 'int', help: 'classes of the head (a new head when the checkpoint has none or another number)', min: 2 },
    seed: { kind: 'int', help: 'seed of a new head', default: 0, min: 0 },
    out: { kind: 'string', help: 'beit checkpoint to write', default: join('runs', 'imported.safetensors') },
  },
  run: async (v) => {
    if (v.from === undefined) throw new UsageError('--from is required')
    await mkdir(join(v.out as string, '..'), { recursive: true })
    const model = await importHuggingFace(v.from as string, v.out as string, {
      task: v.task as HuggingFaceTask | undefined,
      imageSize: v['image-size'] as number | undefined,
      numLabels: v['num-labels'] as number | undefined,
      seed: v.seed as number,
    })
    const what = model instanceof Beit ? 'MIM model' : `classifier of ${model.config.numLabels} classes`
    log(v, `${v.from} -> ${v.out}: ${what}, ${model.numParameters.toLocaleString()} parameters`)
  },
}

const exportCommand: Command = {
  name: 'export',
  summary: 'A beit MIM or classifier checkpoint -> a Hugging Face transformers folder (from_pretrained loads it).',
  flags: {
    from: { kind: 'string', help: 'beit checkpoint (pretrain or finetune output)' },
    out: { kind: 'string', help: 'folder to write config.json and model.safetensors into', default: join('runs', 'hf') },
  },
  run: async (v) => {
    if (v.from === undefined) throw new UsageError('--from is required')
    const model = await exportHuggingFace(v.from as string, v.out as string)
    log(v, `${v.from} -> ${v.out}: ${model instanceof Beit ? 'BeitForMaskedImageModeling' : 'BeitForImageClassification'}`)
  },
}

function limit(data: ImageDataset, n: number | undefined): ImageDataset {
  if (n === undefined || n >= data.size) return data
  const source = data.source.kind === 'files' ? { kind: 'files' as const, paths: data.source.paths.slice(0, n) } : data.source
  return { ...data, size: n, source, labels: data.labels.subarray(0, n) }
}

const reconstructCommand: Command = {
  name: 'reconstruct',
  summary: 'Images -> tokens -> images: a PNG sheet of originals above their reconstructions.',
  flags: {
    tokenizer: { kind: 'string', help: 'tokenizer checkpoint' },
    data: { kind: 'string', help: DATA_HELP, default: 'sample' },
    split: { kind: 'string', help: 'which split of --data', default: 'test', choices: ['train', 'test'] },
    count: { kind: 'int', help: 'images on the sheet', default: 16 },
    out: { kind: 'string', help: 'PNG file', default: join('runs', 'reconstructions.png') },
  },
  run: async (v) => {
    if (v.tokenizer === undefined) throw new UsageError('--tokenizer is required')
    const tokenizer = await Dvae.load(v.tokenizer as string, placement(v))
    const data = await openDataset(v.data as string, v.split as 'train' | 'test')
    await mkdir(join(v.out as string, '..'), { recursive: true })
    const count = await writeSheet(tokenizer, data, v.count as number, v.out as string)
    log(v, `${count} originals above their reconstructions: ${v.out}`)
  },
}

const demoCommand: Command = {
  name: 'demo',
  summary: 'The embedded default on the bundled Fashion-MNIST sample: tokenizer -> pretrain -> linear probes (pretrained vs random) -> fine-tuning (pretrained vs from scratch), then a results table.',
  flags: {
    'tokenizer-steps': { kind: 'int', help: 'tokenizer training steps (batch 32)', default: 200 },
    'pretrain-epochs': { kind: 'number', help: 'pretraining epochs over the 5,000 sample images', default: 2 },
    'finetune-epochs': { kind: 'number', help: 'fine-tuning epochs, for each of the two classifiers', default: 2 },
    seed: { kind: 'int', help: 'seed', default: 0, min: 0 },
    out: { kind: 'string', help: 'run folder', default: join('runs', 'demo') },
  },
  run: async (v) => {
    const out = v.out as string
    const seed = v.seed as number
    const quiet = v.quiet as boolean
    const started = performance.now()
    const times: Record<string, number> = {}
    const timed = async <T>(name: string, f: () => Promise<T>): Promise<T> => {
      const t = performance.now()
      const r = await f()
      times[name] = (performance.now() - t) / 1000
      return r
    }
    const train = await openDataset('sample', 'train')
    const test = await openDataset('sample', 'test')

    console.log(`1/4 tokenizer: dVAE tiny on ${train.size} images, ${v['tokenizer-steps']} steps x 32`)
    const tokenizer = Dvae.create({ preset: 'tiny', numChannels: 1 }, { seed, emaDecay: 0, ...placement(v) })
    const tokOut = join(out, 'tokenizer')
    const evaluation = await timed('tokenizer', () => runTokenizer({ ...v, steps: v['tokenizer-steps'], lr: 2e-3, 'batch-size': 32, 'kl-weight': 6.6, out: tokOut }, tokenizer, train, test))

    const model = Beit.create({ preset: 'mini', imageSize: [28, 28], patchSize: 4, numChannels: 1, numHiddenLayers: 4, vocabSize: tokenizer.config.vocabSize, dropPathRate: 0.05 }, { seed, ...placement(v) })
    console.log(`2/4 pretraining: BEiT mini, 4 layers (${model.numParameters.toLocaleString()} parameters, 7x7 patches), ${v['pretrain-epochs']} epochs x ${train.size} images, blockwise masks of 20/49`)
    const masking = new BlockwiseMaskGenerator({ height: 7, width: 7, numMaskingPatches: 20, minNumPatches: 4, seed })
    const pretrainOut = join(out, 'pretrain')
    let firstAcc = NaN
    let lastAcc = NaN
    let total = 0
    const show = pretrainProgress(quiet, () => total, 0)
    await timed('pretrain', () =>
      interruptible((signal) =>
        pretrain({
          model, tokenizer, data: train, masking, batchSize: 64, epochs: v['pretrain-epochs'] as number,
          schedule: { lr: 1.5e-3 }, transform: { kind: 'train', scale: [0.35, 1] }, seed, outDir: pretrainOut, signal,
          onProgress: (p) => {
            total = p.totalSteps
            if (p.step === 0) firstAcc = p.mlmAcc
            lastAcc = p.mlmAcc
            show(p)
          },
        }),
      ),
    )
    if (process.exitCode === 130) return

    console.log('3/4 linear probes: pretrained vs randomly initialised backbone (layer 3 of 4)')
    const probeFlags = { ...v, layer: 3, epochs: 10, 'batch-size': 256, lr: 1e-2 }
    const pretrainedProbe = await timed('probe pretrained', () => runProbe(probeFlags, model, train, test))
    const randomProbe = await timed('probe random', () => runProbe(probeFlags, Beit.create(model.config, { seed: seed + 1, ...placement(v) }), train, test))

    console.log(`4/4 fine-tuning ${v['finetune-epochs']} epochs each: from the pretrained backbone vs from scratch`)
    const ft = { ...v, epochs: v['finetune-epochs'], 'batch-size': 64, lr: 1e-3, 'weight-decay': 0.05, 'label-smoothing': 0.1, 'layer-decay': 0.75, pooling: 'mean', 'drop-path': 0.05, 'scale-min': 0.35, 'checkpoint-every': 1000, resume: false }
    const pretrainedCkpt = join(pretrainOut, 'checkpoint.safetensors')
    const fromPretrained = await timed('finetune pretrained', () => runFinetune({ ...ft, init: pretrainedCkpt }, train, test, join(out, 'finetune-pretrained')))
    const scratchSpec = { ...ft, preset: 'mini', 'image-size': 28, 'patch-size': 4, channels: 1, layers: 4 }
    const fromScratch = await timed('finetune scratch', () => runFinetune(scratchSpec, train, test, join(out, 'finetune-scratch')))
    const finalAcc = (r: { evals: EpochResult[] }) => r.evals[r.evals.length - 1]?.evalAccuracy ?? NaN

    console.log('')
    printTokenizerEvaluation(evaluation, tokenizer)
    console.log('')
    table(['BEiT on the Fashion-MNIST sample (1,000 test images)', 'pretrained', 'random init / from scratch'], [
      ['MIM accuracy, first -> last step', `${firstAcc.toFixed(3)} -> ${lastAcc.toFixed(3)}`, ''],
      [`linear probe test accuracy (layer ${pretrainedProbe.layer})`, pct(pretrainedProbe.testAccuracy), pct(randomProbe.testAccuracy)],
      [`fine-tuned test accuracy (${v['finetune-epochs']} epochs)`, pct(finalAcc(fromPretrained)), pct(finalAcc(fromScratch))],
      ['wall time: pretrain / probe / fine-tune', `${formatSeconds(times.pretrain)} / ${formatSeconds(times['probe pretrained'])} / ${formatSeconds(times['finetune pretrained'])}`, `- / ${formatSeconds(times['probe random'])} / ${formatSeconds(times['finetune scratch'])}`],
    ])
    console.log(`\ntotal ${formatSeconds((performance.now() - started) / 1000)}; run folder ${out}: tokenizer/, pretrain/, finetune-pretrained/, finetune-scratch/ (metrics.jsonl, curves.svg, checkpoints)`)
  },
}

function pct(x: number): string {
  return `${(100 * x).toFixed(1)}%`
}

function table(header: string[], rows: string[][]): void {
  console.log(`| ${header.join(' | ')} |`)
  console.log(`|${header.map(() => '---').join('|')}|`)
  for (const row of rows) console.log(`| ${row.join(' | ')} |`)
}

function placement(v: Values): DeviceOptions {
  return { device: v.device as DeviceSpec, precision: v.precision as PrecisionSpec }
}

function log(v: Values, line: string): void {
  if (!v.quiet) console.log(line)
}

const COMMANDS: Command[] = [demoCommand, tokenizerCommand, pretrainCommand, finetuneCommand, probeCommand, encodeCommand, reconstructCommand, importCommand, exportCommand]

const USAGE = `usage: beit <command> [options]   (beit <command> --help for its options)

commands:
${COMMANDS.map((c) => `  ${c.name.padEnd(12)} ${c.summary}`).join('\n')}
`

async function main(argv: string[]): Promise<void> {
  const [name, ...rest] = argv
  if (name === undefined || name === '-h' || name === '--help') {
    process.stdout.write(USAGE)
    return
  }
  const command = COMMANDS.find((c) => c.name === name)
  if (!command) throw new UsageError(`unknown command ${JSON.stringify(name)}; expected one of ${COMMANDS.map((c) => c.name).join(', ')}`)
  const values = parseCommand(command, rest)
  if (values.help) {
    process.stdout.write(usage(command))
    return
  }
  await command.run(values)
}

main(process.argv.slice(2)).catch((err: unknown) => {
  const message = err instanceof Error ? err.message : String(err)
  process.stderr.write(`beit: error: ${message}\n`)
  if (err instanceof UsageError) process.stderr.write(`run 'beit ${process.argv[2] ?? ''} --help' for usage\n`.replace('  ', ' '))
  if (process.env.BEIT_DEBUG && err instanceof Error) process.stderr.write(`${err.stack}\n`)
  process.exitCode = process.exitCode === 130 ? 130 : 1
})

