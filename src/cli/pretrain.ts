/** `beit pretrain`: masked image modeling on a trained tokenizer's visual tokens. */
import { join } from 'node:path'

import { defineCommand, flagTable, UsageError } from '../cli-options'
import { openDataset } from '../data/open'
import { BlockwiseMaskGenerator, MaskGenerator, RandomMaskGenerator } from '../masking'
import { Beit } from '../model'
import { checkTokenizerFits, pretrain, PretrainProgress } from '../pretrain'
import { CHECKPOINT_FILE, Progress } from '../run'
import { Dvae } from '../tokenizer'
import { writeSheet } from '../train-tokenizer'
import {
  DATA_HELP,
  DATA_PARALLEL_FLAGS,
  interruptible,
  joinJob,
  lengthFlags,
  log,
  MODEL_FLAGS,
  modelSpec,
  placement,
  prepareOut,
  quietOffMain,
  RUN_FLAGS,
  runLength,
  scheduleOptions,
  trainTransform,
} from './common'

export function pretrainProgress(quiet: boolean, totalSteps: () => number, start: number) {
  let bar: Progress | undefined
  return (p: PretrainProgress) => {
    bar ??= new Progress('pretrain', totalSteps(), { quiet, every: 25, startAt: start })
    bar.update(p.step + 1, {
      loss: p.loss.toFixed(3),
      acc: p.mlmAcc.toFixed(3),
      lr: p.lr.toExponential(1),
      'img/s': p.imagesPerSecond.toFixed(0),
    })
    if (p.step + 1 === p.totalSteps) bar.end()
  }
}

const FLAGS = flagTable({
  data: { kind: 'string', help: DATA_HELP, default: 'sample' },
  tokenizer: {
    kind: 'string',
    help: 'tokenizer checkpoint (beit tokenizer); its token grid must equal the patch grid',
  },
  ...MODEL_FLAGS,
  ...lengthFlags('optimizer steps (or --epochs)', 'passes over the data (default 1 when --steps is not given)'),
  ...RUN_FLAGS,
  ...DATA_PARALLEL_FLAGS,
  lr: { kind: 'number', help: 'peak learning rate', default: 1.5e-3 },
  masking: { kind: 'string', help: 'mask generator', default: 'blockwise', choices: ['blockwise', 'random'] },
  'mask-ratio': { kind: 'number', help: 'share of patches masked', default: 0.4 },
  jitter: { kind: 'bool', help: 'ColorJitter(0.4, 0.4, 0.4) before cropping', default: true },
  out: { kind: 'string', help: 'run folder', default: join('runs', 'pretrain') },
})

export const pretrainCommand = defineCommand({
  name: 'pretrain',
  summary: "Masked image modeling: a BEiT learns to predict a trained tokenizer's visual tokens of masked patches.",
  flags: FLAGS,
  run: async (values) => {
    if (values.tokenizer === undefined)
      throw new UsageError('--tokenizer is required: a checkpoint from `beit tokenizer`')
    const tokenizerPath = values.tokenizer
    const job = joinJob(values)
    const v = quietOffMain(values, job)
    const length = runLength(v, { epochs: 1 })
    const ratio = v['mask-ratio']
    if (ratio >= 1) throw new UsageError(`--mask-ratio must be below 1, got ${ratio}`)
    // The data and the tokenizer before the run folder, so that a bad path leaves nothing there.
    const train = await openDataset(v.data, 'train')
    const pixels = train.source.kind === 'pixels'
    const tokenizer = await Dvae.load(tokenizerPath, placement(v, job))
    const fresh = v.resume
      ? undefined
      : Beit.create(modelSpec(v, pixels, tokenizer.config.vocabSize), {
          seed: v.seed,
          optimizer: { weightDecay: v['weight-decay'] },
          ...placement(v, job),
        })
    if (fresh) checkTokenizerFits(fresh, tokenizer)
    const out = await prepareOut(FLAGS, { ...values, ...length }, job)
    if (job.distributed.rank === 0) await writeSheet(tokenizer, train, 16, join(out, 'reconstructions.png'))
    const model = fresh ?? (await Beit.load(join(out, CHECKPOINT_FILE), placement(v, job)))
    const [gh, gw] = model.grid
    const count = Math.max(1, Math.round(ratio * gh * gw))
    const masking: MaskGenerator =
      v.masking === 'random'
        ? new RandomMaskGenerator({ height: gh, width: gw, maskRatio: ratio, seed: v.seed })
        : new BlockwiseMaskGenerator({
            height: gh,
            width: gw,
            numMaskingPatches: count,
            minNumPatches: Math.min(16, Math.max(2, Math.round(count / 5))),
            seed: v.seed,
          })
    const start = model.step
    log(
      v,
      `pretraining BEiT ${v.preset} (${model.numParameters.toLocaleString()} parameters, ${gh}x${gw} patches) on ${train.size.toLocaleString()} images of ${train.name}, tokens from ${tokenizerPath}${v.resume ? `, resuming at step ${start}` : ''}`,
    )
    let total = 0
    // One bar for the whole run, so its ETA clock runs from the first step.
    const show = pretrainProgress(v.quiet, () => total, start)
    const result = await interruptible((signal) =>
      pretrain({
        model,
        tokenizer,
        data: train,
        masking,
        batchSize: v['batch-size'],
        ...job,
        ...length,
        schedule: scheduleOptions(v),
        transform: trainTransform(v, v.jitter),
        seed: v.seed,
        outDir: out,
        checkpointEvery: v['checkpoint-every'],
        threads: v.threads,
        signal,
        onProgress: (p) => {
          total = p.totalSteps
          show(p)
        },
      }),
    )
    if (result.status === 'completed')
      log(v, `done: ${result.step} steps; checkpoint ${result.checkpoint}, metrics.jsonl and curves.svg in ${out}`)
  },
})
