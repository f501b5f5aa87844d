/**
 * Run-folder helpers the training loops call: metrics JSONL with a refreshed SVG of the curves,
 * a progress line (bar on a TTY, plain lines otherwise), and SIGINT/SIGTERM as an AbortSignal.
 */
import { existsSync, readFileSync } from 'node:fs'
import { appendFile, mkdir, rename, rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

import {
  anyRank,
  barrier,
  checkDistributed,
  Distributed,
  INTERRUPTED_EXIT_CODE,
  noteStoppedTogether,
  SINGLE_PROCESS,
  sumAcrossRanks,
} from './distributed'
import { curvesSvg, MAX_POINTS, Series, thin } from './plot'
import { warmupCosine, warmupPoly } from './schedule'

/** Points a panel holds before they are thinned to MAX_POINTS. */
const COMPACT_AT = 4 * MAX_POINTS

export type Metrics = Record<string, number | string>

export interface ScheduleOptions {
  /** Peak learning rate. */
  lr: number
  /** Final learning rate. Default lr / 150 with the cosine (BEiT: 1.5e-3 -> 1e-5), 0 with poly (mmseg). */
  minLr?: number
  /** Linear warmup steps. Default 5% of the run. */
  warmupSteps?: number
  /** The decay after the warmup: 'cosine' (default, `warmupCosine`) or 'poly' (`warmupPoly`, power 1). */
  decay?: 'cosine' | 'poly'
}

/** The learning rate of each step: linear warmup then a decay (options), or any function of the step. */
export type Schedule = ScheduleOptions | ((step: number) => number)

/**
 * What every training loop (pretrain, finetune, trainTokenizer) takes besides its models and
 * data: one contract for the run's length, schedule, folder, checkpoints and interruption.
 */
export interface LoopOptions {
  /** Images per batch on each rank: an update takes batchSize x worldSize x accumulate images. */
  batchSize: number
  /** Batches whose gradients are summed before each update (gradient accumulation). Default 1. */
  accumulate?: number
  /**
   * The data-parallel job (from `initDistributed`): each rank takes its shard of the data, the
   * model's updates average every rank's gradients, rank 0 alone writes the run folder. Default:
   * one process.
   */
  distributed?: Distributed
  /** Length of the run: optimizer steps, or epochs over the training data (may be fractional). Exactly one. */
  steps?: number
  epochs?: number
  /** Learning rate per step. */
  schedule: Schedule
  /** Data order, augmentation and every other random draw of the loop. Default 0. */
  seed?: number
  /** Run folder: checkpoint.safetensors (weights, optimizer state, the loop's position), metrics.jsonl, curves.svg. */
  outDir: string
  /** Checkpoint every N steps, after the last step, and when `signal` aborts. Default 500. */
  checkpointEvery?: number
  /** Abort (e.g. on SIGINT): the loop checkpoints after the current step and returns 'interrupted'. */
  signal?: AbortSignal
  /** Native image decoding threads. Default: all cores. */
  threads?: number
}

/** What every loop reports after each step. */
export interface LoopProgress {
  /** The step just taken, 0-based. */
  step: number
  totalSteps: number
  epoch: number
  lr: number
  imagesPerSecond: number
}

export interface RunResult {
  status: 'completed' | 'interrupted'
  /** Steps completed so far (over all sessions of the run). */
  step: number
  /** The run folder's checkpoint.safetensors. */
  checkpoint: string
}

/** The checkpoint's name in every run folder. */
export const CHECKPOINT_FILE = 'checkpoint.safetensors'

export function resolveSteps(steps: number | undefined, epochs: number | undefined, batchesPerEpoch: number): number {
  if ((steps === undefined) === (epochs === undefined))
    throw new Error(
      `give exactly one of steps and epochs (the run's length), got ${steps === undefined ? 'neither' : `steps ${steps} and epochs ${epochs}`}`,
    )
  if (epochs !== undefined && !(Number.isFinite(epochs) && epochs > 0))
    throw new Error(`epochs must be a positive number, got ${epochs}`)
  const total = steps ?? Math.round(epochs! * batchesPerEpoch)
  if (!Number.isInteger(total) || total <= 0)
    throw new Error(
      `the run must have a positive whole number of steps, got ${total}${epochs === undefined ? '' : ` (${epochs} epochs of ${batchesPerEpoch} batches)`}`,
    )
  return total
}

/** The learning rate of each step of a run of `totalSteps`: a function as given, options as warmup + decay. */
export function scheduleFor(schedule: Schedule, totalSteps: number): (step: number) => number {
  if (typeof schedule === 'function') return schedule
  if (typeof schedule !== 'object' || schedule === null || typeof schedule.lr !== 'number')
    throw new Error(
      `schedule must be { lr, minLr?, warmupSteps?, decay? } or a function of the step, got ${JSON.stringify(schedule)}`,
    )
  const decay = schedule.decay ?? 'cosine'
  const warmupSteps = schedule.warmupSteps ?? Math.round(0.05 * totalSteps)
  if (decay === 'poly') return warmupPoly({ lr: schedule.lr, minLr: schedule.minLr, warmupSteps, totalSteps })
  if (decay !== 'cosine') throw new Error(`schedule.decay must be 'cosine' or 'poly', got ${String(decay)}`)
  return warmupCosine({ lr: schedule.lr, minLr: schedule.minLr ?? schedule.lr / 150, warmupSteps, totalSteps })
}

/** What every training loop's saved position holds, whatever else it adds. */
export interface LoopPosition {
  kind: string
  /** Steps completed. */
  step: number
  totalSteps: number
  /** Loader position of the last batch used. */
  epoch: number
  batch: number
  batchSize: number
  seed: number
  /** Ranks and batches per update (absent in runs from before data parallelism: 1). */
  worldSize?: number
  accumulate?: number
}

/** How a loop's batches make its updates. */
export interface Batching {
  batchSize: number
  accumulate: number
  distributed: Distributed
}

/** A loop's batching from its options, checked. */
export function batching(opts: Pick<LoopOptions, 'batchSize' | 'accumulate' | 'distributed'>): Batching {
  const accumulate = opts.accumulate ?? 1
  if (!Number.isInteger(accumulate) || accumulate < 1)
    throw new Error(`accumulate must be a positive integer (batches per update), got ${accumulate}`)
  return { batchSize: opts.batchSize, accumulate, distributed: checkDistributed(opts.distributed ?? SINGLE_PROCESS) }
}

/**
 * Whole updates in an epoch of `batchesPerEpoch` batches of `data` (the last batches that make
 * no whole update are left out). An epoch without one is an error: the loop would never step.
 */
export function updatesPerEpoch(b: Batching, batchesPerEpoch: number, data: { size: number; name: string }): number {
  const updates = Math.floor(batchesPerEpoch / b.accumulate)
  if (updates === 0)
    throw new Error(
      `an update takes ${b.batchSize * b.accumulate * b.distributed.worldSize} images (batchSize x accumulate x ranks), more than an epoch of ${data.name} (${data.size} images) holds`,
    )
  return updates
}

/**
 * Where this rank's batch number `batch` of an epoch starts in its update's global batch (its
 * accumulated batches, each split over the ranks): random draws are keyed by it, so every way
 * of making the same update (ranks, accumulation, one big batch) draws the same.
 */
export function firstSample(b: Batching, batch: number): number {
  return ((batch % b.accumulate) * b.distributed.worldSize + b.distributed.rank) * b.batchSize
}

/**
 * Applies an update and returns its gradient norm; 0 where no rank ran `lossAndGrads` for any
 * of its batches (all their images unreadable): nothing to apply, no weight changes. `computed`
 * counts this rank's batches that ran it; every rank calls this together.
 */
export async function applyComputedUpdate(
  model: { applyUpdate(lr: number): Promise<{ gradNorm: number }> },
  b: Batching,
  computed: number,
  lr: number,
): Promise<number> {
  return anyRank(b.distributed, computed > 0) ? (await model.applyUpdate(lr)).gradNorm : 0
}

/** Whether batch number `batch` of an epoch is the last of its update. */
export function endsUpdate(b: Batching, batch: number): boolean {
  return (batch + 1) % b.accumulate === 0
}

/** The position of a run that has not taken a step. */
export function startPosition<K extends string>(kind: K, totalSteps: number, b: Batching, seed: number) {
  const { batchSize, accumulate } = b
  return {
    kind,
    step: 0,
    totalSteps,
    epoch: 0,
    batch: -1,
    batchSize,
    seed,
    worldSize: b.distributed.worldSize,
    accumulate,
  }
}

/**
 * The position to continue from: `saved` (a checkpoint's trainState) when there is one, else
 * `fresh`. A position from another kind of run, or from a run with another length, batch size
 * or seed, is refused: resuming it would not replay the same steps.
 */
export function resumePosition<S extends LoopPosition>(saved: unknown, fresh: S, owner: string, runName: string): S {
  if (saved === undefined) return fresh
  const position = saved as S
  if (position.kind !== fresh.kind)
    throw new Error(`the ${owner}'s checkpoint is from a ${String(position.kind)} run, not ${runName}`)
  for (const key of ['totalSteps', 'batchSize', 'seed', 'worldSize', 'accumulate'] as const) {
    const [was, now] = [position[key] ?? 1, fresh[key] ?? 1]
    if (was !== now)
      throw new Error(
        `cannot resume: the run had ${key} ${was}, now ${now}${key === 'worldSize' ? ` (launch it with ${was} rank(s) to continue it exactly)` : ''}`,
      )
  }
  return position
}

export interface OpenRunOptions<S extends LoopPosition> {
  outDir: string
  /** The model's `trainState`: the position saved with its checkpoint, or undefined. */
  saved: unknown
  /** The position of this run before its first step. */
  fresh: S
  /** For errors: whose checkpoint ("model") and what run ("pretraining"). */
  owner: string
  runName: string
  /** curves.svg */
  title: string
  panels: Panel[]
  checkpointEvery?: number
  signal?: AbortSignal
  /** Default one process. */
  distributed?: Distributed
}

/**
 * The skeleton every training loop shares, as helpers it calls (the step itself stays in the
 * loop): `Run.open` makes the run folder, opens its metrics log and finds the position to start
 * from; `afterStep` decides when to checkpoint and when to stop; `end` writes the curves and
 * the result. In a data-parallel job rank 0 alone writes; the ranks agree on stopping and
 * wait for rank 0's checkpoints.
 */
export class Run<S extends LoopPosition> {
  private constructor(
    /** Where the loop starts: the saved position when resuming, else the fresh one. */
    readonly start: S,
    readonly checkpoint: string,
    readonly metrics: MetricsLog,
    private readonly totalSteps: number,
    private readonly every: number,
    private readonly signal: AbortSignal | undefined,
    readonly distributed: Distributed,
  ) {}

  static async open<S extends LoopPosition>(opts: OpenRunOptions<S>): Promise<Run<S>> {
    if (typeof opts.outDir !== 'string' || opts.outDir === '')
      throw new Error(
        `outDir is required: the run folder for ${CHECKPOINT_FILE}, metrics.jsonl and curves.svg, got ${JSON.stringify(opts.outDir)}`,
      )
    const every = opts.checkpointEvery ?? 500
    if (!Number.isInteger(every) || every < 1)
      throw new Error(`checkpointEvery must be a positive integer (steps), got ${every}`)
    const start = resumePosition(opts.saved, opts.fresh, opts.owner, opts.runName)
    const distributed = opts.distributed ?? SINGLE_PROCESS
    const main = distributed.rank === 0
    const metrics = main
      ? await MetricsLog.open(opts.outDir, { title: opts.title, panels: opts.panels, resumeFrom: start })
      : MetricsLog.discarding()
    return new Run(
      start,
      join(opts.outDir, CHECKPOINT_FILE),
      metrics,
      opts.fresh.totalSteps,
      every,
      opts.signal,
      distributed,
    )
  }

  /** Whether this process writes the run folder (rank 0). */
  get main(): boolean {
    return this.distributed.rank === 0
  }

  /**
   * Call after every step with the steps completed: runs `save` (on rank 0) every
   * `checkpointEvery` steps, after the last step and when aborted on any rank; true when the
   * loop must stop (aborted).
   */
  async afterStep(step: number, save: () => Promise<void>): Promise<boolean> {
    const aborted = anyRank(this.distributed, this.signal?.aborted ?? false)
    if (step % this.every === 0 || step === this.totalSteps || aborted) await this.saveCheckpoint(save)
    if (aborted) noteStoppedTogether(this.distributed)
    return aborted
  }

  /** Runs `save` on rank 0; every rank waits until it is written. */
  async saveCheckpoint(save: () => Promise<void>): Promise<void> {
    if (this.main) await save()
    await barrier(this.distributed)
  }

  /** The run's result, with its curves written. */
  async end(status: RunResult['status'], step: number): Promise<RunResult> {
    if (this.main) await this.metrics.writePlot()
    await barrier(this.distributed)
    return { status, step, checkpoint: this.checkpoint }
  }
}

/**
 * The means an update reports over its batches (accumulated ones, and every rank's): each
 * batch's metrics weighted by its loss terms (masked patches, images).
 */
export class UpdateMeans<K extends string> {
  private sums: number[]
  private weight = 0

  constructor(private readonly keys: readonly K[]) {
    this.sums = keys.map(() => 0)
  }

  add(metrics: Record<K, number>, weight: number): void {
    this.keys.forEach((k, i) => (this.sums[i] += metrics[k] * weight))
    this.weight += weight
  }

  /** The means over everything added on every rank (and the total weight); starts over. */
  take(d: Distributed): Record<K, number> & { weight: number } {
    const [weight, ...sums] = sumAcrossRanks(d, [this.weight, ...this.sums])
    this.sums = this.keys.map(() => 0)
    this.weight = 0
    const means = Object.fromEntries(this.keys.map((k, i) => [k, sums[i] / weight])) as Record<K, number>
    return { ...means, weight }
  }
}

export interface Panel {
  /** Metric key in the records. */
  key: string
  title?: string
  log?: boolean
  /** x key; default 'step'. */
  x?: string
}

/**
 * metrics.jsonl plus curves.svg in `dir`. Opening with `resumeFrom` (a checkpoint's position)
 * keeps the records before it (an interrupted run logged past its last checkpoint) and drops the
 * rest: the steps from its step on, and the summaries of epochs it has not closed. A summary is
 * logged with its epoch's last step, before the checkpoint that closes the epoch, so a run killed
 * in between resumes from an earlier checkpoint inside that epoch and logs the summary again.
 */
export class MetricsLog {
  /**
   * Each panel's points, thinned to their extremes whenever they pass COMPACT_AT: the curves of
   * a run of millions of steps in bounded memory (metrics.jsonl keeps every record).
   */
  private readonly points: [number, number][][]
  private sinceRefresh = 0

  private constructor(
    readonly dir: string,
    private readonly title: string,
    private readonly panels: Panel[],
    private readonly refreshEvery: number,
    /** false: nothing is written or kept (the ranks other than 0 of a data-parallel run). */
    private readonly writes = true,
  ) {
    this.points = panels.map(() => [])
  }

  private plot(record: Metrics): void {
    this.panels.forEach((p, i) => {
      const [x, y] = [record[p.x ?? 'step'], record[p.key]]
      if (typeof x !== 'number' || typeof y !== 'number' || !Number.isFinite(x) || !Number.isFinite(y)) return
      if (p.log && y <= 0) return
      this.points[i].push([x, y])
      if (this.points[i].length > COMPACT_AT) this.points[i] = thin(this.points[i])
    })
  }

  /** A log that writes nothing. */
  static discarding(): MetricsLog {
    return new MetricsLog('', '', [], Infinity, false)
  }

  static async open(
    dir: string,
    opts: {
      title: string
      panels: Panel[]
      refreshEvery?: number
      resumeFrom?: Pick<LoopPosition, 'step' | 'epoch'>
    },
  ): Promise<MetricsLog> {
    await mkdir(dir, { recursive: true })
    const log = new MetricsLog(dir, opts.title, opts.panels, opts.refreshEvery ?? 25)
    const path = join(dir, 'metrics.jsonl')
    const { resumeFrom } = opts
    const kept: Metrics[] = []
    if (resumeFrom !== undefined && existsSync(path)) {
      // An epoch's summary (its train loss, and its evaluation when it has one).
      const unclosedSummary = (r: Metrics) =>
        'trainLoss' in r && typeof r.epoch === 'number' && r.epoch >= resumeFrom.epoch
      const lines = readFileSync(path, 'utf8').split('\n')
      for (const [i, line] of lines.entries()) {
        if (!line.trim()) continue
        let record: Metrics
        try {
          record = JSON.parse(line) as Metrics
        } catch (e) {
          // A record cut short by a hard kill ends the file without a newline: it is dropped
          // with the others past the checkpoint.
          if (i === lines.length - 1) continue
          throw new Error(`${path}:${i + 1}: not a JSON record: ${(e as Error).message}`, { cause: e })
        }
        if (typeof record.step === 'number' && record.step < resumeFrom.step && !unclosedSummary(record))
          kept.push(record)
      }
    }
    for (const record of kept) log.plot(record)
    await writeAtomic(path, kept.map((r) => JSON.stringify(r) + '\n').join(''))
    return log
  }

  async record(entry: Metrics): Promise<void> {
    if (!this.writes) return
    this.plot(entry)
    await appendFile(join(this.dir, 'metrics.jsonl'), JSON.stringify(entry) + '\n')
    if (++this.sinceRefresh >= this.refreshEvery) await this.writePlot()
  }

  async writePlot(): Promise<void> {
    this.sinceRefresh = 0
    if (!this.writes) return
    const series: Series[] = this.panels.map((p, i) => ({
      title: p.title ?? p.key,
      log: p.log,
      points: this.points[i],
    }))
    await writeAtomic(join(this.dir, 'curves.svg'), curvesSvg(this.title, series))
  }
}

/**
 * `value` read back from JSON with its NaNs: JSON writes NaN as null, and a loop's results
 * (evaluation scores, epoch means) hold numbers only, NaN where there is none (a class absent
 * from the test set, an epoch without a readable batch).
 */
export function restoreNaN<T>(value: T): T {
  if (value === null) return NaN as T
  if (Array.isArray(value)) return value.map(restoreNaN) as T
  if (typeof value === 'object')
    return Object.fromEntries(Object.entries(value as object).map(([k, v]) => [k, restoreNaN(v)])) as T
  return value
}

let atomicWrites = 0

/**
 * Writes `path` whole or not at all: a temporary file beside it (unique per call, so two writes
 * of one file cannot interleave), renamed over it. A kill leaves the old file or the new one.
 */
export async function writeAtomic(path: string, data: string | Uint8Array): Promise<void> {
  const temp = `${path}.tmp-${process.pid}-${atomicWrites++}`
  try {
    await writeFile(temp, data)
    await rename(temp, path)
  } catch (e) {
    await rm(temp, { force: true })
    throw e
  }
}

/** Where progress goes (process.stderr by default). */
export interface ProgressStream {
  isTTY?: boolean
  write(text: string): unknown
}

/** A progress bar with ETA on a TTY, a plain line every `every` updates otherwise, or nothing. */
export class Progress {
  private readonly started = performance.now()
  private readonly tty: boolean
  private lastLine = ''

  constructor(
    private readonly label: string,
    private readonly total: number,
    private readonly opts: { quiet?: boolean; every?: number; stream?: ProgressStream; startAt?: number } = {},
  ) {
    this.tty = Boolean((opts.stream ?? process.stderr).isTTY)
  }

  update(done: number, fields: Record<string, string>): void {
    if (this.opts.quiet) return
    const stream = this.opts.stream ?? process.stderr
    const elapsed = (performance.now() - this.started) / 1000
    const doneHere = done - (this.opts.startAt ?? 0)
    const eta = doneHere > 0 ? (elapsed / doneHere) * (this.total - done) : NaN
    const text = Object.entries(fields)
      .map(([k, v]) => `${k} ${v}`)
      .join('  ')
    if (this.tty) {
      const width = 24
      const filled = Math.round((width * done) / this.total)
      this.lastLine = `${this.label} [${'='.repeat(filled)}${' '.repeat(width - filled)}] ${done}/${this.total}  ${text}  ETA ${formatSeconds(eta)}`
      stream.write(`\r\x1b[2K${this.lastLine}`)
    } else if (done === this.total || done % (this.opts.every ?? 50) === 0) {
      stream.write(`${this.label} ${done}/${this.total}  ${text}  ETA ${formatSeconds(eta)}\n`)
    }
  }

  /** Ends the bar's line on a TTY. */
  end(): void {
    if (this.tty && this.lastLine && !this.opts.quiet) (this.opts.stream ?? process.stderr).write('\n')
  }
}

/** `42s`, `1m05s` or `2h03m`; `?` when there is no estimate yet. */
export function formatSeconds(seconds: number): string {
  if (!Number.isFinite(seconds)) return '?'
  // Round once, before splitting, so 119.6 s reads 2m00s and not 1m60s.
  const s = Math.round(seconds)
  if (s < 60) return `${s}s`
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`
}

/**
 * An AbortSignal fired by the first SIGINT or SIGTERM, so a loop can checkpoint and stop; a
 * second signal exits at once. `dispose` removes the handlers.
 */
export function interruptSignal(): { signal: AbortSignal; dispose: () => void } {
  const controller = new AbortController()
  const onSignal = (name: NodeJS.Signals) => {
    if (controller.signal.aborted) process.exit(INTERRUPTED_EXIT_CODE)
    process.stderr.write(`\nbeit: ${name}: saving a checkpoint at the end of this step (again to quit now)\n`)
    controller.abort(new Error(name))
  }
  process.on('SIGINT', onSignal)
  process.on('SIGTERM', onSignal)
  return {
    signal: controller.signal,
    dispose: () => {
      process.off('SIGINT', onSignal)
      process.off('SIGTERM', onSignal)
    },
  }
}
