/** What the commands share: data and model flags, run folders, interruption, output helpers. */
import { existsSync, statSync } from 'node:fs'
import { mkdir, readFile } from 'node:fs/promises'
import { join } from 'node:path'

import { choicesOf, CommonValues, FlagTable, flagTable, resolvedConfig, UsageError, Values } from '../cli-options'
import { ModelSpec, PRESETS } from '../config'
import { TrainTransform } from '../data/augment'
import { ImageDataset } from '../data/dataset'
import { hasTestSplit, openDataset } from '../data/open'
import { cudaDeviceCount, DeviceOptions, DeviceSpec } from '../device'
import { detectLaunch, Distributed, initDistributed, INTERRUPTED_EXIT_CODE, SINGLE_PROCESS } from '../distributed'
import { CHECKPOINT_FILE, interruptSignal, RunResult, ScheduleOptions, writeAtomic } from '../run'

export const DATA_HELP =
  'sample (bundled Fashion-MNIST subset), fashion-mnist (Debian dataset-fashion-mnist), a folder (IDX files, or images with class subfolders; DIR/train and DIR/test or DIR/val are used when present) or a .csv/.jsonl manifest'

export const MODEL_FLAGS = flagTable({
  preset: { kind: 'string', fixed: true, help: 'backbone size', default: 'mini', choices: choicesOf(PRESETS) },
  'image-size': {
    kind: 'int',
    fixed: true,
    help: 'input size in pixels (default: 28 for IDX data, 224 for image files)',
  },
  'patch-size': { kind: 'int', fixed: true, help: 'patch size (default: image size / 7 for 28 px, else 16)' },
  channels: { kind: 'int', fixed: true, help: 'input channels, 1 or 3 (default: 1 for IDX data, 3 for image files)' },
  'hidden-size': { kind: 'int', fixed: true, help: "override the preset's width" },
  layers: { kind: 'int', fixed: true, help: "override the preset's depth" },
  heads: { kind: 'int', fixed: true, help: "override the preset's attention heads" },
  'mlp-size': { kind: 'int', fixed: true, help: "override the preset's MLP width" },
  'drop-path': { kind: 'number', fixed: true, help: 'maximum stochastic-depth rate', default: 0.1, min: 0 },
})

/** The model flags that a checkpoint given with --init decides instead. */
export const SHAPE_FLAGS = ['preset', 'patch-size', 'channels', 'hidden-size', 'layers', 'heads', 'mlp-size'] as const

/** The shape flags of the backbone alone: `--channels` also says how a command reads its data. */
export const BACKBONE_FLAGS = SHAPE_FLAGS.filter((f) => f !== 'channels')

/**
 * Refuses the flags of `names` given to a command that would not read them (`flag` says why).
 * A flag counts as given when its value is not its default.
 */
export function refuseFlags(
  values: object,
  flags: FlagTable,
  flag: string,
  why: string,
  names: readonly string[],
): void {
  const given = names
    .filter((n) => {
      const value = (values as Record<string, unknown>)[n]
      const f = flags[n]
      return value !== undefined && value !== (f?.kind === 'bool' ? (f.default ?? false) : f?.default)
    })
    .map((n) => `--${n}`)
  if (given.length > 0) throw new UsageError(`${flag} ${why}: ${given.join(', ')} would be ignored`)
}

export const RUN_FLAGS = flagTable({
  'batch-size': { kind: 'int', help: 'images per batch (on each rank of a data-parallel job)', default: 64 },
  lr: { kind: 'number', help: 'peak learning rate (linear warmup, then cosine)' },
  'min-lr': { kind: 'number', help: 'final learning rate (default lr / 150; 0 with --decay poly)', min: 0 },
  'warmup-steps': { kind: 'int', help: 'warmup steps (default 5% of the run)', min: 0 },
  decay: {
    kind: 'string',
    help: "the learning rate's decay after the warmup: cosine (BEiT) or poly (linear, mmseg's segmentation recipe)",
    default: 'cosine',
    choices: ['cosine', 'poly'],
  },
  'weight-decay': { kind: 'number', fixed: true, help: 'AdamW weight decay', default: 0.05, min: 0 },
  'scale-min': { kind: 'number', help: 'RandomResizedCrop smallest area share', default: 0.35 },
  seed: { kind: 'int', help: 'seed of init, data order, augmentation, masks, drop path', default: 0, min: 0 },
  resume: { kind: 'bool', help: 'continue the run in --out from its checkpoint', default: false },
  'checkpoint-every': { kind: 'int', help: 'steps between checkpoints', default: 500 },
  threads: { kind: 'int', help: 'image decoding threads (default: all cores)' },
})

/** The training commands' data-parallel flags. */
export const DATA_PARALLEL_FLAGS = flagTable({
  accumulate: {
    kind: 'int',
    help: 'batches whose gradients are summed per update (an update takes batch-size x accumulate x ranks images)',
    default: 1,
    min: 1,
  },
  distributed: {
    kind: 'bool',
    help: 'join an MPI job (automatic under mpiexec, mpirun or srun --mpi=pmix; BEIT_MPI_LIB names the library)',
    default: false,
  },
})

/** How a training command's updates are made: its data-parallel job and accumulation. */
export interface Job {
  distributed: Distributed
  accumulate: number
}

/** One process on its own, one batch per update. */
export const SINGLE_JOB: Job = { distributed: SINGLE_PROCESS, accumulate: 1 }

/**
 * Joins the data-parallel job when a launcher started this process (or --distributed says so);
 * else one process. Rank 0's first line states the world size, the launcher and the MPI library.
 */
export function joinJob(v: Values<typeof DATA_PARALLEL_FLAGS> & { quiet: boolean }): Job {
  if (!v.distributed && !detectLaunch()) return { distributed: SINGLE_PROCESS, accumulate: v.accumulate }
  const distributed = initDistributed()
  if (distributed.rank === 0 && !v.quiet)
    console.log(
      `data-parallel: ${distributed.worldSize} rank(s), launched by ${distributed.launcher}; MPI: ${distributed.mpiLibrary}`,
    )
  return { distributed, accumulate: v.accumulate }
}

/** `v` with the progress output left to rank 0. */
export function quietOffMain<V extends { quiet: boolean }>(v: V, job: Job): V {
  return job.distributed.rank === 0 ? v : { ...v, quiet: true }
}

/** --steps or --epochs: one flag pair for every training command; `help` says the fallback. */
export function lengthFlags(stepsHelp: string, epochsHelp: string) {
  return flagTable({
    steps: { kind: 'int', help: stepsHelp, conflicts: 'epochs' },
    epochs: { kind: 'number', help: epochsHelp },
  })
}

/** The run's length: --steps or --epochs as given (the parser lets only one through), else `fallback`. */
export function runLength(
  v: { steps?: number; epochs?: number },
  fallback: { steps: number } | { epochs: number },
): { steps?: number; epochs?: number } {
  if (v.steps !== undefined) return { steps: v.steps }
  if (v.epochs !== undefined) return { epochs: v.epochs }
  return fallback
}

/** --lr, --min-lr, --warmup-steps and --decay as schedule options. */
export function scheduleOptions(v: {
  lr: number
  'min-lr'?: number
  'warmup-steps'?: number
  decay?: 'cosine' | 'poly'
}): ScheduleOptions {
  return { lr: v.lr, minLr: v['min-lr'], warmupSteps: v['warmup-steps'], decay: v.decay }
}

/** A dataset and its test split where it has one (an unreadable test split is an error). */
export async function openData(
  spec: string,
): Promise<{ train: ImageDataset; test: ImageDataset | undefined; pixels: boolean }> {
  const train = await openDataset(spec, 'train')
  const test = hasTestSplit(spec) ? await openDataset(spec, 'test') : undefined
  return { train, test, pixels: train.source.kind === 'pixels' }
}

/** Refuses an --out that is a folder where a command writes one file, before any work. */
export function checkOutFile(path: string): void {
  if (existsSync(path) && statSync(path).isDirectory())
    throw new UsageError(`--out ${path} is a folder: expected the path of the file to write`)
}

export type ModelValues = Values<typeof MODEL_FLAGS>

/** `--channels`, or `fallback` when it is not given: 1 or 3, else a usage error. */
export function channelsFlag(flag: number | undefined, fallback: number): 1 | 3 {
  const channels = flag ?? fallback
  if (channels !== 1 && channels !== 3) throw new UsageError(`--channels must be 1 or 3, got ${channels}`)
  return channels
}

export function modelSpec(v: ModelValues, pixels: boolean, vocabSize?: number): ModelSpec {
  const imageSize = v['image-size'] ?? (pixels ? 28 : 224)
  const channels = channelsFlag(v.channels, pixels ? 1 : 3)
  const patchSize = v['patch-size'] ?? (imageSize === 28 ? 4 : 16)
  if (imageSize % patchSize !== 0)
    throw new UsageError(`--image-size ${imageSize} must be a multiple of --patch-size ${patchSize}`)
  const overrides: Partial<Record<string, number>> = {
    hiddenSize: v['hidden-size'],
    numHiddenLayers: v.layers,
    numAttentionHeads: v.heads,
    intermediateSize: v['mlp-size'],
    vocabSize,
  }
  const defined = Object.fromEntries(Object.entries(overrides).filter(([, x]) => x !== undefined))
  return {
    preset: v.preset,
    imageSize: [imageSize, imageSize],
    patchSize,
    numChannels: channels,
    dropPathRate: v['drop-path'],
    ...defined,
  }
}

export function trainTransform(v: { 'scale-min': number }, jitter: boolean): TrainTransform {
  const scaleMin = v['scale-min']
  if (scaleMin > 1) throw new UsageError(`--scale-min must be at most 1, got ${scaleMin}`)
  return { kind: 'train', scale: [scaleMin, 1], colorJitter: jitter ? {} : null }
}

/**
 * The run folder --out: refused when it holds a run and --resume is not given (or holds none
 * and it is); gets (from rank 0) the resolved config.json of `flags`, with the data-parallel job.
 */
export async function prepareOut(
  flags: FlagTable,
  v: { out: string; resume: boolean },
  job: Job = SINGLE_JOB,
): Promise<string> {
  const { out } = v
  const checkpoint = join(out, CHECKPOINT_FILE)
  if (!v.resume && existsSync(checkpoint))
    throw new UsageError(
      `${out} already holds a run (${CHECKPOINT_FILE}): pass --resume to continue it, or choose another --out`,
    )
  if (v.resume && !existsSync(checkpoint)) throw new UsageError(`--resume: no checkpoint at ${checkpoint}`)
  const { rank, worldSize, launcher, mpiLibrary } = job.distributed
  if (rank > 0) return out
  await mkdir(out, { recursive: true })
  const resolved = resolvedConfig(flags, v)
  const path = join(out, 'config.json')
  if (v.resume && existsSync(path)) {
    // The run's record stays what it started with; options changed for the rest are said once.
    const saved = JSON.parse(await readFile(path, 'utf8')) as Record<string, unknown>
    const changed = Object.entries(resolved).filter(
      ([k, value]) => k !== 'resume' && JSON.stringify(value) !== JSON.stringify(saved[k]),
    )
    const describe = (entries: [string, unknown][]) =>
      entries.map(([k, value]) => `--${k} ${JSON.stringify(value)} (was ${JSON.stringify(saved[k]) ?? 'not set'})`)
    const fixed = changed.filter(([k]) => flags[k]?.fixed)
    if (fixed.length > 0)
      throw new UsageError(
        `--resume continues ${out} with its checkpoint's model, which keeps ${describe(fixed).join(', ')}: start a new run (another --out) to change them`,
      )
    if (changed.length > 0)
      process.stderr.write(`beit: resuming ${out} with changed options: ${describe(changed).join(', ')}\n`)
    return out
  }
  const config = { ...resolved, ...(launcher === 'none' ? {} : { worldSize, launcher, mpiLibrary }) }
  await writeAtomic(path, JSON.stringify(config, null, 2) + '\n')
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
      process.exitCode = INTERRUPTED_EXIT_CODE
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

function isDeviceSpec(spec: string): spec is DeviceSpec {
  return /^(auto|cpu|cuda|cuda:\d+)$/.test(spec)
}

/**
 * --device and --precision as model placement options. In a data-parallel job 'cuda' (and 'auto'
 * on a machine with GPUs) means the GPU of the process's local rank.
 */
export function placement(v: Pick<CommonValues, 'device' | 'precision'>, job: Job = SINGLE_JOB): DeviceOptions {
  if (!isDeviceSpec(v.device))
    throw new UsageError(`--device must be auto, cpu, cuda or cuda:N, got ${JSON.stringify(v.device)}`)
  const { worldSize, localRank } = job.distributed
  const gpus = worldSize > 1 && (v.device === 'cuda' || v.device === 'auto') ? cudaDeviceCount() : 0
  if (gpus > 0) return { device: `cuda:${localRank % gpus}`, precision: v.precision }
  return { device: v.device, precision: v.precision }
}

export function log(v: Pick<CommonValues, 'quiet'>, line: string): void {
  if (!v.quiet) console.log(line)
}
