/** `beit probe`: a linear classifier on frozen features of a pretrained or random backbone. */
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'

import { CommandValues, defineCommand, flagTable, UsageError } from '../cli-options'
import { ImageDataset } from '../data/dataset'
import { Beit, pretrainedBackbone } from '../model'
import { linearProbe, LinearProbeResult, pixelProbe } from '../probe'
import { Progress, writeAtomic } from '../run'
import {
  BACKBONE_FLAGS,
  channelsFlag,
  checkOutFile,
  DATA_HELP,
  log,
  MODEL_FLAGS,
  modelSpec,
  openData,
  pct,
  placement,
  refuseFlags,
  SHAPE_FLAGS,
} from './common'

const FLAGS = flagTable({
  data: { kind: 'string', help: DATA_HELP, default: 'sample' },
  init: {
    kind: 'string',
    help: 'pretrained MIM checkpoint; without it a random backbone built from the model flags (or --random-like)',
  },
  'random-like': {
    kind: 'string',
    help: 'a MIM or classifier checkpoint whose backbone config (not weights) the random backbone copies',
  },
  pixels: {
    kind: 'bool',
    help: 'no backbone: the linear classifier on the raw pixels (at --image-size, --channels), the baseline',
    default: false,
  },
  ...MODEL_FLAGS,
  layer: {
    kind: 'int',
    help: 'block whose output is probed, 1-based, 0 for the patch embeddings (default 3/4 of the depth)',
    min: 0,
  },
  epochs: { kind: 'int', help: 'passes over the features', default: 10 },
  'batch-size': { kind: 'int', help: 'features per step', default: 256 },
  lr: { kind: 'number', help: 'peak learning rate (cosine to 1/100)', default: 1e-2 },
  seed: { kind: 'int', help: 'seed', default: 0, min: 0 },
  threads: { kind: 'int', help: 'image decoding threads' },
  out: { kind: 'string', help: 'result file (JSON)', default: join('runs', 'probe.json') },
})

/** What a probe reads of the flags (the demo passes its own). */
export type ProbeValues = CommandValues<typeof FLAGS>

/** Flags the chosen probe would not read are refused rather than ignored. */
function refuseUnread(v: ProbeValues): void {
  // Probes read frozen features: no stochastic depth, whatever the backbone.
  refuseFlags(v, FLAGS, 'a probe', 'reads frozen features', ['drop-path'])
  if (v.pixels) {
    const why = 'probes the raw pixels, no backbone'
    refuseFlags(v, FLAGS, '--pixels', why, ['init', 'random-like', 'layer', ...BACKBONE_FLAGS])
  } else if (v.init !== undefined) {
    const why = 'takes the backbone, its shape included, from the checkpoint'
    refuseFlags(v, FLAGS, '--init', why, ['random-like', 'image-size', ...SHAPE_FLAGS])
  } else if (v['random-like'] !== undefined) {
    const why = "builds the random backbone from the checkpoint's config"
    refuseFlags(v, FLAGS, '--random-like', why, ['image-size', ...SHAPE_FLAGS])
  }
}

export const probeCommand = defineCommand({
  name: 'probe',
  summary:
    'Linear probe: a linear classifier on frozen features ([CLS] + mean patch token of one layer) of a pretrained or a random backbone, or on the raw pixels (--pixels).',
  flags: FLAGS,
  run: async (v) => {
    refuseUnread(v)
    checkOutFile(v.out)
    const { train, test, pixels } = await openData(v.data)
    if (!test) throw new UsageError(`--data ${v.data}: probing needs a test split`)
    await mkdir(join(v.out, '..'), { recursive: true })
    if (v.pixels) {
      const size = v['image-size'] ?? (pixels ? 28 : 224)
      const channels = channelsFlag(v.channels, pixels ? 1 : 3)
      const opts = {
        epochs: v.epochs,
        batchSize: v['batch-size'],
        lr: v.lr,
        seed: v.seed,
        threads: v.threads,
      }
      const result = await pixelProbe({ train, test, imageSize: [size, size], channels, ...opts })
      await writeAtomic(v.out, JSON.stringify({ init: 'pixels', ...result }, null, 2) + '\n')
      log(
        v,
        `linear classifier on the raw pixels: test accuracy ${pct(result.testAccuracy)} (train ${pct(result.trainAccuracy)}); written to ${v.out}`,
      )
      return
    }
    const backbone = await probeBackbone(v, pixels)
    const result = await runProbe(v, backbone, train, test)
    await writeAtomic(v.out, JSON.stringify({ init: v.init ?? 'random', ...result }, null, 2) + '\n')
    log(
      v,
      `linear probe of layer ${result.layer}: test accuracy ${pct(result.testAccuracy)} (train ${pct(result.trainAccuracy)}); written to ${v.out}`,
    )
  },
})

export async function probeBackbone(v: ProbeValues, pixels: boolean): Promise<Beit> {
  if (v.init !== undefined) return Beit.load(v.init, placement(v))
  const like = v['random-like'] === undefined ? undefined : await pretrainedBackbone(v['random-like'])
  return Beit.create(like ?? modelSpec(v, pixels), { seed: v.seed, ...placement(v) })
}

export async function runProbe(
  v: Pick<ProbeValues, 'epochs' | 'quiet' | 'layer' | 'batch-size' | 'lr' | 'seed' | 'threads'>,
  backbone: Beit,
  train: ImageDataset,
  test: ImageDataset,
): Promise<LinearProbeResult> {
  const epochs = v.epochs
  const bar = new Progress('probe', epochs, { quiet: v.quiet, every: 5 })
  const result = await linearProbe({
    backbone,
    train,
    test,
    layer: v.layer,
    epochs,
    batchSize: v['batch-size'],
    lr: v.lr,
    seed: v.seed,
    threads: v.threads,
    onEpoch: (e) => bar.update(e.epoch + 1, { loss: e.loss.toFixed(4), acc: e.trainAccuracy.toFixed(3) }),
  })
  bar.end()
  return result
}
