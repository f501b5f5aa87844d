/** `beit finetune`: a classifier from a pretrained checkpoint or from scratch. */
import { join } from 'node:path'

import { Classifier } from '../classifier'
import { Command, UsageError, Values } from '../cli-options'
import { ImageDataset } from '../data/dataset'
import { EpochResult, finetune, FinetuneProgress } from '../finetune'
import { Beit } from '../model'
import { RunResult } from '../run'
import { Progress } from '../run'
import {
  DATA_HELP,
  interruptible,
  log,
  MODEL_FLAGS,
  modelSpec,
  openData,
  pct,
  placement,
  prepareOut,
  RUN_FLAGS,
  trainTransform,
} from './common'

export const finetuneCommand: Command = {
  name: 'finetune',
  summary:
    'Fine-tunes a classifier (mean-pooled patches -> LayerNorm -> Linear, or [CLS]) from a pretrained checkpoint or from scratch, evaluating after every epoch.',
  flags: {
    data: { kind: 'string', help: DATA_HELP, default: 'sample' },
    init: {
      kind: 'string',
      help: 'pretrained MIM checkpoint (beit pretrain); without it the model starts from random weights',
    },
    ...MODEL_FLAGS,
    epochs: { kind: 'number', help: 'passes over the training data', default: 5 },
    'eval-every': { kind: 'int', help: 'epochs between test evaluations (and after the last)', default: 1, min: 1 },
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
    if (!test)
      throw new UsageError(
        `--data ${v.data}: fine-tuning needs a test split (IDX t10k files, or a test/ or val/ folder)`,
      )
    const result = await runFinetune(v, train, test, out)
    if (result.status === 'completed') {
      const best = Math.max(...result.evals.map((e) => e.evalAccuracy))
      log(
        v,
        `done: test accuracy ${pct(result.evals[result.evals.length - 1].evalAccuracy)} (best epoch ${pct(best)}); checkpoint, metrics.jsonl, curves.svg in ${out}`,
      )
    }
  },
}

export async function runFinetune(
  v: Values,
  train: ImageDataset,
  test: ImageDataset,
  out: string,
): Promise<RunResult & { evals: EpochResult[] }> {
  const pixels = train.source.kind === 'pixels'
  const options = {
    optimizer: { weightDecay: v['weight-decay'] as number },
    training: { labelSmoothing: v['label-smoothing'] as number, layerDecay: v['layer-decay'] as number },
    seed: v.seed as number,
    ...placement(v),
  }
  const numLabels = Math.max(train.classNames.length, test.classNames.length)
  const pooling = v.pooling as 'mean' | 'cls'
  let classifier: Classifier
  if (v.resume) classifier = await Classifier.load(join(out, 'checkpoint.safetensors'), placement(v))
  else if (v.init !== undefined) {
    const pretrained = (await Beit.load(v.init as string, { device: 'cpu' })).config
    classifier = await Classifier.fromPretrained(
      v.init as string,
      { model: { ...pretrained, dropPathRate: v['drop-path'] as number }, numLabels, pooling },
      options,
    )
  } else classifier = Classifier.create({ model: modelSpec(v, pixels), numLabels, pooling }, options)
  log(
    v,
    `fine-tuning ${v.init ? `from ${v.init}` : 'from scratch'} (${classifier.numParameters.toLocaleString()} parameters) on ${train.size.toLocaleString()} images, ${numLabels} classes${v.resume ? `, resuming at step ${classifier.step}` : ''}`,
  )
  let bar: Progress | undefined
  const start = classifier.step
  return interruptible((signal) =>
    finetune({
      classifier,
      train,
      test,
      epochs: v.epochs as number,
      evalEvery: v['eval-every'] as number,
      batchSize: v['batch-size'] as number,
      schedule: {
        lr: v.lr as number,
        minLr: v['min-lr'] as number | undefined,
        warmupSteps: v['warmup-steps'] as number | undefined,
      },
      transform: trainTransform(v, false),
      seed: v.seed as number,
      outDir: out,
      checkpointEvery: v['checkpoint-every'] as number,
      threads: v.threads as number | undefined,
      signal,
      onProgress: (p: FinetuneProgress) => {
        bar ??= new Progress('finetune', p.totalSteps, { quiet: v.quiet as boolean, every: 50, startAt: start })
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
