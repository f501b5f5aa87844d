/** `beit tokenizer`: trains a dVAE visual tokenizer. */
import { join } from 'node:path'

import { choicesOf, CommandValues, defineCommand, flagTable, UsageError } from '../cli-options'
import { ImageDataset } from '../data/dataset'
import { hasTestSplit, openDataset } from '../data/open'
import { CHECKPOINT_FILE, formatSeconds, Progress } from '../run'
import { DVAE_PRESETS, Dvae } from '../tokenizer'
import { TokenizerEvaluation, trainTokenizer } from '../train-tokenizer'
import {
  channelsFlag,
  DATA_HELP,
  DATA_PARALLEL_FLAGS,
  interruptible,
  Job,
  joinJob,
  lengthFlags,
  log,
  placement,
  prepareOut,
  quietOffMain,
  runLength,
  SINGLE_JOB,
  table,
} from './common'

const FLAGS = flagTable({
  data: { kind: 'string', help: DATA_HELP, default: 'sample' },
  preset: { kind: 'string', fixed: true, help: 'dVAE size', default: 'tiny', choices: choicesOf(DVAE_PRESETS) },
  'vocab-size': { kind: 'int', fixed: true, help: "codebook size (default: the preset's)" },
  'image-size': {
    kind: 'int',
    fixed: true,
    help: "input size in pixels (default: the images' own for IDX data, else the preset's)",
  },
  channels: { kind: 'int', fixed: true, help: 'input channels, 1 or 3 (default: 1 for IDX data, 3 for image files)' },
  ...lengthFlags('training steps (default 1000 when --epochs is not given)', 'passes over the data (or --steps)'),
  'batch-size': { kind: 'int', help: 'images per batch (on each rank of a data-parallel job)', default: 32 },
  ...DATA_PARALLEL_FLAGS,
  lr: { kind: 'number', help: 'peak learning rate (cosine after the warmup)', default: 2e-3 },
  'min-lr': { kind: 'number', help: 'final learning rate (default lr / 100)', min: 0 },
  'warmup-steps': { kind: 'int', help: 'linear warmup steps', default: 0, min: 0 },
  'kl-weight': { kind: 'number', help: 'final KL weight, reached half way (DALL-E: 6.6)', default: 6.6, min: 0 },
  ema: { kind: 'number', fixed: true, help: 'EMA decay of the weights, 0 = off', default: 0, min: 0 },
  seed: { kind: 'int', help: 'seed', default: 0, min: 0 },
  resume: { kind: 'bool', help: 'continue the run in --out from its checkpoint', default: false },
  'checkpoint-every': { kind: 'int', help: 'steps between checkpoints (and reconstruction sheets)', default: 500 },
  threads: { kind: 'int', help: 'image decoding threads' },
  out: { kind: 'string', help: 'run folder', default: join('runs', 'tokenizer') },
})

/** What a tokenizer run reads of the flags (the demo passes its own). */
export type TokenizerValues = Pick<
  CommandValues<typeof FLAGS>,
  | 'steps'
  | 'epochs'
  | 'batch-size'
  | 'lr'
  | 'min-lr'
  | 'warmup-steps'
  | 'kl-weight'
  | 'seed'
  | 'checkpoint-every'
  | 'threads'
  | 'out'
  | 'quiet'
>

export const tokenizerCommand = defineCommand({
  name: 'tokenizer',
  summary: 'Trains a dVAE visual tokenizer (Gumbel-softmax relaxation) on any image data, resized to its input size.',
  flags: FLAGS,
  run: async (values) => {
    const job = joinJob(values)
    const v = quietOffMain(values, job)
    const train = await openDataset(v.data, 'train')
    // Data without a test split of its own (a manifest, class folders, train/ alone) is scored on
    // its training images, as the tokenizer needs no labels.
    const test = hasTestSplit(v.data) ? await openDataset(v.data, 'test') : train
    const preset = v.preset
    const source = train.source.kind === 'pixels' ? train.source : undefined
    const channels = channelsFlag(v.channels, source?.channels ?? 3)
    const given = v['image-size']
    const imageSize: [number, number] =
      given !== undefined ? [given, given] : source ? [source.height, source.width] : DVAE_PRESETS[preset].imageSize
    const vocab = v['vocab-size'] === undefined ? {} : { vocabSize: v['vocab-size'] }
    if (v.ema >= 1) throw new UsageError(`--ema must be below 1, got ${v.ema}`)
    // A bad configuration fails before the run folder is written.
    const fresh = v.resume
      ? undefined
      : Dvae.create(
          { preset, numChannels: channels, imageSize, ...vocab },
          { seed: v.seed, emaDecay: v.ema, ...placement(v, job) },
        )
    const out = await prepareOut(FLAGS, { ...values, ...runLength(v, { steps: 1000 }) }, job)
    const tokenizer = fresh ?? (await Dvae.load(join(out, CHECKPOINT_FILE), placement(v, job)))
    log(
      v,
      `tokenizer: dVAE ${preset} at ${imageSize[0]}x${imageSize[1]}x${channels} on ${train.size.toLocaleString()} images of ${train.name}${v.resume ? `, resuming at step ${tokenizer.step}` : ''}`,
    )
    const evaluation = await runTokenizer(v, tokenizer, train, test, job)
    if (evaluation === undefined || job.distributed.rank > 0) return
    printTokenizerEvaluation(evaluation, tokenizer)
    log(v, `run folder ${out}: ${CHECKPOINT_FILE}, metrics.jsonl, curves.svg, reconstructions.png, evaluation.json`)
  },
})

/** Trains `tokenizer` as the flags say; the evaluation, or undefined when interrupted. */
export async function runTokenizer(
  v: TokenizerValues,
  tokenizer: Dvae,
  train: ImageDataset,
  test: ImageDataset,
  job: Job = SINGLE_JOB,
): Promise<(TokenizerEvaluation & { seconds: number }) | undefined> {
  let bar: Progress | undefined
  const started = performance.now()
  const { evaluation } = await interruptible((signal) =>
    trainTokenizer({
      tokenizer,
      data: train,
      evalData: test,
      ...runLength(v, { steps: 1000 }),
      batchSize: v['batch-size'],
      ...job,
      seed: v.seed,
      schedule: { lr: v.lr, minLr: v['min-lr'] ?? v.lr / 100, warmupSteps: v['warmup-steps'] },
      klWeight: v['kl-weight'],
      outDir: v.out,
      checkpointEvery: v['checkpoint-every'],
      threads: v.threads,
      signal,
      onProgress: (p) => {
        bar ??= new Progress('tokenizer', p.totalSteps, { quiet: v.quiet, every: 50, startAt: p.step })
        bar.update(p.step + 1, {
          loss: p.loss.toFixed(4),
          recon: p.reconLoss.toFixed(4),
          perplexity: p.perplexity.toFixed(1),
          'img/s': p.imagesPerSecond.toFixed(0),
        })
      },
    }),
  )
  bar?.end()
  return evaluation && { ...evaluation, seconds: (performance.now() - started) / 1000 }
}

export function printTokenizerEvaluation(e: TokenizerEvaluation & { seconds: number }, tokenizer: Dvae): void {
  table(
    ['tokenizer (held-out images)', 'value'],
    [
      ['reconstruction MSE', e.reconstructionMse.toFixed(4)],
      ['mean-image baseline MSE', e.meanImageMse.toFixed(4)],
      ['codebook perplexity', e.perplexity.toFixed(1)],
      ['codes used', `${(e.codesUsedFraction * 100).toFixed(1)}% of ${tokenizer.config.vocabSize}`],
      ['wall time', formatSeconds(e.seconds)],
    ],
  )
}
