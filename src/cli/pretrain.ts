/** `beit pretrain`: masked image modeling on a trained tokenizer's visual tokens. */
import { join } from 'node:path'

import { Command, UsageError } from '../cli-options'
import { BlockwiseMaskGenerator, MaskGenerator, RandomMaskGenerator } from '../masking'
import { Beit } from '../model'
import { pretrain, PretrainProgress } from '../pretrain'
import { Progress } from '../run'
import { Dvae } from '../tokenizer'
import { writeSheet } from '../train-tokenizer'
import {
  DATA_HELP,
  interruptible,
  log,
  MODEL_FLAGS,
  modelSpec,
  openData,
  placement,
  prepareOut,
  RUN_FLAGS,
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

export const pretrainCommand: Command = {
  name: 'pretrain',
  summary: "Masked image modeling: a BEiT learns to predict a trained tokenizer's visual tokens of masked patches.",
  flags: {
    data: { kind: 'string', help: DATA_HELP, default: 'sample' },
    tokenizer: {
      kind: 'string',
      help: 'tokenizer checkpoint (beit tokenizer); its token grid must equal the patch grid',
    },
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
      : Beit.create(modelSpec(v, pixels, tokenizer.config.vocabSize), {
          seed: v.seed as number,
          optimizer: { weightDecay: v['weight-decay'] as number },
          ...placement(v),
        })
    const [gh, gw] = model.grid
    const ratio = v['mask-ratio'] as number
    if (ratio >= 1) throw new UsageError(`--mask-ratio must be below 1, got ${ratio}`)
    const count = Math.max(1, Math.round(ratio * gh * gw))
    const masking: MaskGenerator =
      v.masking === 'random'
        ? new RandomMaskGenerator({ height: gh, width: gw, maskRatio: ratio, seed: v.seed as number })
        : new BlockwiseMaskGenerator({
            height: gh,
            width: gw,
            numMaskingPatches: count,
            minNumPatches: Math.min(16, Math.max(2, Math.round(count / 5))),
            seed: v.seed as number,
          })
    const epochs = v.steps === undefined ? ((v.epochs as number | undefined) ?? 1) : undefined
    const start = model.step
    log(
      v,
      `pretraining BEiT ${v.preset} (${model.numParameters.toLocaleString()} parameters, ${gh}x${gw} patches) on ${train.size.toLocaleString()} images of ${train.name}, tokens from ${v.tokenizer}${v.resume ? `, resuming at step ${start}` : ''}`,
    )
    let total = 0
    // One bar for the whole run, so its ETA clock runs from the first step.
    const show = pretrainProgress(v.quiet as boolean, () => total, start)
    const result = await interruptible((signal) =>
      pretrain({
        model,
        tokenizer,
        data: train,
        masking,
        batchSize: v['batch-size'] as number,
        steps: v.steps as number | undefined,
        epochs,
        schedule: {
          lr: v.lr as number,
          minLr: v['min-lr'] as number | undefined,
          warmupSteps: v['warmup-steps'] as number | undefined,
        },
        transform: trainTransform(v, v.jitter as boolean),
        seed: v.seed as number,
        outDir: out,
        checkpointEvery: v['checkpoint-every'] as number,
        threads: v.threads as number | undefined,
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
}
