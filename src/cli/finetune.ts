/** `beit finetune`: a classifier from a pretrained checkpoint or from scratch. */
import { join } from 'node:path'

import { Classifier } from '../classifier'
import { CommandValues, defineCommand, flagTable, UsageError } from '../cli-options'
import { ImageDataset } from '../data/dataset'
import { EpochResult, finetune, FinetuneProgress } from '../finetune'
import { pretrainedBackbone } from '../model'
import { CHECKPOINT_FILE, Progress, RunResult } from '../run'
import {
  DATA_HELP,
  DATA_PARALLEL_FLAGS,
  interruptible,
  Job,
  joinJob,
  lengthFlags,
  log,
  MODEL_FLAGS,
  modelSpec,
  openData,
  pct,
  placement,
  prepareOut,
  quietOffMain,
  refuseFlags,
  RUN_FLAGS,
  runLength,
  scheduleOptions,
  SHAPE_FLAGS,
  SINGLE_JOB,
  trainTransform,
} from './common'

const FLAGS = flagTable({
  data: { kind: 'string', help: DATA_HELP, default: 'sample' },
  init: {
    kind: 'string',
    fixed: true,
    help: 'pretrained MIM checkpoint (beit pretrain); without it the model starts from random weights',
  },
  ...MODEL_FLAGS,
  ...lengthFlags(
    'optimizer steps (or --epochs)',
    'passes over the training data (default 5 when --steps is not given)',
  ),
  'eval-every': { kind: 'int', help: 'epochs between test evaluations (and after the last step)', default: 1, min: 1 },
  ...RUN_FLAGS,
  ...DATA_PARALLEL_FLAGS,
  lr: { kind: 'number', help: 'peak learning rate', default: 1e-3 },
  'layer-decay': { kind: 'number', fixed: true, help: 'layer-wise LR decay (1 = off)', default: 0.75 },
  'label-smoothing': { kind: 'number', fixed: true, help: 'label smoothing', default: 0.1, min: 0 },
  pooling: { kind: 'string', fixed: true, help: 'classifier input', default: 'mean', choices: ['mean', 'cls'] },
  out: { kind: 'string', help: 'run folder', default: join('runs', 'finetune') },
})

/** What a fine-tuning run reads of the flags (the demo passes its own). */
export type FinetuneValues = Omit<
  CommandValues<typeof FLAGS>,
  'data' | 'out' | 'config' | 'help' | keyof typeof DATA_PARALLEL_FLAGS
>

export const finetuneCommand = defineCommand({
  name: 'finetune',
  summary:
    'Fine-tunes a classifier (mean-pooled patches -> LayerNorm -> Linear, or [CLS]) from a pretrained checkpoint or from scratch, evaluating after every epoch.',
  flags: FLAGS,
  run: async (values) => {
    if (values.init !== undefined) {
      const why = "takes the backbone's shape from the checkpoint (--image-size resizes its position tables)"
      refuseFlags(values, FLAGS, '--init', why, SHAPE_FLAGS)
    }
    const job = joinJob(values)
    const v = quietOffMain(values, job)
    const { train, test } = await openData(v.data)
    if (!test)
      throw new UsageError(
        `--data ${v.data}: fine-tuning needs a test split (IDX t10k files, or a test/ or val/ folder)`,
      )
    // A checkpoint of another kind is refused before the run folder is written.
    if (v.init !== undefined && !v.resume) await pretrainedBackbone(v.init)
    const out = await prepareOut(FLAGS, { ...values, ...runLength(v, { epochs: 5 }) }, job)
    const result = await runFinetune(v, train, test, out, job)
    if (result.status === 'completed') {
      const best = Math.max(...result.evals.map((e) => e.evalAccuracy))
      log(
        v,
        `done: test accuracy ${pct(result.evals[result.evals.length - 1].evalAccuracy)} (best epoch ${pct(best)}); checkpoint, metrics.jsonl, curves.svg in ${out}`,
      )
    }
  },
})

export async function runFinetune(
  v: FinetuneValues,
  train: ImageDataset,
  test: ImageDataset,
  out: string,
  job: Job = SINGLE_JOB,
): Promise<RunResult & { evals: EpochResult[] }> {
  const pixels = train.source.kind === 'pixels'
  const options = {
    optimizer: { weightDecay: v['weight-decay'] },
    training: { labelSmoothing: v['label-smoothing'], layerDecay: v['layer-decay'] },
    seed: v.seed,
    ...placement(v, job),
  }
  const numLabels = train.classNames.length
  const pooling = v.pooling
  let classifier: Classifier
  if (v.resume) classifier = await Classifier.load(join(out, CHECKPOINT_FILE), placement(v, job))
  else if (v.init !== undefined) {
    const pretrained = await pretrainedBackbone(v.init)
    classifier = await Classifier.fromPretrained(
      v.init,
      {
        model: { ...pretrained, dropPathRate: v['drop-path'], imageSize: v['image-size'] ?? pretrained.imageSize },
        numLabels,
        pooling,
        classNames: train.classNames,
      },
      options,
    )
  } else
    classifier = Classifier.create(
      { model: modelSpec(v, pixels), numLabels, pooling, classNames: train.classNames },
      options,
    )
  log(
    v,
    `fine-tuning ${v.init ? `from ${v.init}` : 'from scratch'} (${classifier.numParameters.toLocaleString()} parameters) on ${train.size.toLocaleString()} images, ${numLabels} classes${v.resume ? `, resuming at step ${classifier.step}` : ''}`,
  )
  let bar: Progress | undefined
  return interruptible((signal) =>
    finetune({
      classifier,
      train,
      test,
      ...runLength(v, { epochs: 5 }),
      evalEvery: v['eval-every'],
      batchSize: v['batch-size'],
      ...job,
      schedule: scheduleOptions(v),
      transform: trainTransform(v, false),
      seed: v.seed,
      outDir: out,
      checkpointEvery: v['checkpoint-every'],
      threads: v.threads,
      signal,
      onProgress: (p: FinetuneProgress) => {
        bar ??= new Progress('finetune', p.totalSteps, { quiet: v.quiet, every: 50, startAt: p.step })
        bar.update(p.step + 1, {
          loss: p.loss.toFixed(3),
          acc: p.accuracy.toFixed(3),
          'img/s': p.imagesPerSecond.toFixed(0),
        })
      },
      onEpoch: (e: EpochResult) => {
        bar?.end()
        bar = undefined
        log(
          v,
          `epoch ${e.epoch + 1}: test accuracy ${pct(e.evalAccuracy)}, train loss ${e.trainLoss.toFixed(4)}, train accuracy ${pct(e.trainAccuracy)}`,
        )
      },
    }),
  )
}
