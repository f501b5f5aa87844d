/** What the commands share: data and model flags, run folders, interruption, output helpers. */
import { existsSync } from 'node:fs'
import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

import { Command, FlagTable, resolvedConfig, UsageError, Values } from '../cli-options'
import { ModelSpec, PresetName, PRESETS } from '../config'
import { TrainTransform } from '../data/augment'
import { ImageDataset } from '../data/dataset'
import { openDataset } from '../data/open'
import { DeviceOptions, DeviceSpec, PrecisionSpec } from '../device'
import { RunResult } from '../run'
import { interruptSignal } from '../run'

export const DATA_HELP =
  'sample (bundled Fashion-MNIST subset), fashion-mnist (Debian dataset-fashion-mnist), a folder (IDX files, or images with class subfolders; DIR/train and DIR/test or DIR/val are used when present) or a .csv/.jsonl manifest'

export const MODEL_FLAGS: FlagTable = {
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

export const RUN_FLAGS: FlagTable = {
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
export async function openData(
  spec: string,
): Promise<{ train: ImageDataset; test: ImageDataset | undefined; pixels: boolean }> {
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

export function modelSpec(v: Values, pixels: boolean, vocabSize?: number): ModelSpec {
  const imageSize = (v['image-size'] as number | undefined) ?? (pixels ? 28 : 224)
  const channels = (v.channels as number | undefined) ?? (pixels ? 1 : 3)
  if (channels !== 1 && channels !== 3) throw new UsageError(`--channels must be 1 or 3, got ${channels}`)
  const patchSize = (v['patch-size'] as number | undefined) ?? (imageSize === 28 ? 4 : 16)
  if (imageSize % patchSize !== 0)
    throw new UsageError(`--image-size ${imageSize} must be a multiple of --patch-size ${patchSize}`)
  const overrides: Partial<Record<string, number>> = {
    hiddenSize: v['hidden-size'] as number | undefined,
    numHiddenLayers: v.layers as number | undefined,
    numAttentionHeads: v.heads as number | undefined,
    intermediateSize: v['mlp-size'] as number | undefined,
    vocabSize,
  }
  const defined = Object.fromEntries(Object.entries(overrides).filter(([, x]) => x !== undefined))
  return {
    preset: v.preset as PresetName,
    imageSize: [imageSize, imageSize],
    patchSize,
    numChannels: channels,
    dropPathRate: v['drop-path'] as number,
    ...defined,
  }
}

export function trainTransform(v: Values, jitter: boolean): TrainTransform {
  const scaleMin = v['scale-min'] as number
  if (scaleMin > 1) throw new UsageError(`--scale-min must be at most 1, got ${scaleMin}`)
  return { kind: 'train', scale: [scaleMin, 1], colorJitter: jitter ? {} : null }
}

export async function prepareOut(
  command: Command,
  v: Values,
  checkpointName = 'checkpoint.safetensors',
): Promise<string> {
  const out = v.out as string
  const checkpoint = join(out, checkpointName)
  if (!v.resume && existsSync(checkpoint))
    throw new UsageError(
      `${out} already holds a run (${checkpointName}): pass --resume to continue it, or choose another --out`,
    )
  if (v.resume && !existsSync(checkpoint)) throw new UsageError(`--resume: no checkpoint at ${checkpoint}`)
  await mkdir(out, { recursive: true })
  await writeFile(join(out, 'config.json'), JSON.stringify(resolvedConfig(command, v), null, 2) + '\n')
  return out
}

/** Runs `body` with SIGINT/SIGTERM turned into a checkpoint-and-stop. */
export async function interruptible<R extends RunResult>(body: (signal: AbortSignal) => Promise<R>): Promise<R> {
  const { signal, dispose } = interruptSignal()
  try {
    const result = await body(signal)
    if (result.status === 'interrupted') {
      process.stderr.write(
        `beit: interrupted after step ${result.step}; checkpoint ${result.checkpoint} (continue with --resume)\n`,
      )
      process.exitCode = 130
    }
    return result
  } finally {
    dispose()
  }
}

export function pct(x: number): string {
  return `${(100 * x).toFixed(1)}%`
}

export function table(header: string[], rows: string[][]): void {
  console.log(`| ${header.join(' | ')} |`)
  console.log(`|${header.map(() => '---').join('|')}|`)
  for (const row of rows) console.log(`| ${row.join(' | ')} |`)
}

export function placement(v: Values): DeviceOptions {
  return { device: v.device as DeviceSpec, precision: v.precision as PrecisionSpec }
}

export function log(v: Values, line: string): void {
  if (!v.quiet) console.log(line)
}
