/**
 * Run-folder helpers the training loops call: metrics JSONL with a refreshed SVG of the curves,
 * a progress line (bar on a TTY, plain lines otherwise), and SIGINT/SIGTERM as an AbortSignal.
 */
import { existsSync, readFileSync } from 'node:fs'
import { appendFile, mkdir, writeFile, rename } from 'node:fs/promises'
import { join } from 'node:path'

import { curvesSvg, Series } from './plot'
import { warmupCosine } from './schedule'

export type Metrics = Record<string, number | string>

export interface ScheduleOptions {
  /** Peak learning rate. */
  lr: number
  /** Final learning rate. Default lr / 150 (BEiT: 1.5e-3 -> 1e-5). */
  minLr?: number
  /** Linear warmup steps. Default 5% of the run. */
  warmupSteps?: number
}

export interface RunResult {
  status: 'completed' | 'interrupted'
  /** Steps completed so far (over all sessions of the run). */
  step: number
  checkpoint: string
}

export function resolveSteps(steps: number | undefined, epochs: number | undefined, batchesPerEpoch: number): number {
  if ((steps === undefined) === (epochs === undefined)) throw new Error('give exactly one of steps and epochs')
  const total = steps ?? Math.round(epochs! * batchesPerEpoch)
  if (!Number.isInteger(total) || total <= 0)
    throw new Error(`the run must have a positive whole number of steps, got ${total}`)
  return total
}

export function scheduleFor(opts: ScheduleOptions, totalSteps: number): (step: number) => number {
  return warmupCosine({
    lr: opts.lr,
    minLr: opts.minLr ?? opts.lr / 150,
    warmupSteps: opts.warmupSteps ?? Math.round(0.05 * totalSteps),
    totalSteps,
  })
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
}

/** The position of a run that has not taken a step. */
export function startPosition<K extends string>(kind: K, totalSteps: number, batchSize: number, seed: number) {
  return { kind, step: 0, totalSteps, epoch: 0, batch: -1, batchSize, seed }
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
  for (const key of ['totalSteps', 'batchSize', 'seed'] as const) {
    if (position[key] !== fresh[key])
      throw new Error(`cannot resume: the run had ${key} ${position[key]}, now ${fresh[key]}`)
  }
  return position
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
 * metrics.jsonl plus curves.svg in `dir`. Opening with `resumeFrom` keeps the records before
 * that step (an interrupted run logged past its last checkpoint) and drops the rest.
 */
export class MetricsLog {
  private readonly records: Metrics[] = []
  private sinceRefresh = 0

  private constructor(
    readonly dir: string,
    private readonly title: string,
    private readonly panels: Panel[],
    private readonly refreshEvery: number,
  ) {}

  static async open(
    dir: string,
    opts: { title: string; panels: Panel[]; refreshEvery?: number; resumeFrom?: number },
  ): Promise<MetricsLog> {
    await mkdir(dir, { recursive: true })
    const log = new MetricsLog(dir, opts.title, opts.panels, opts.refreshEvery ?? 25)
    const path = join(dir, 'metrics.jsonl')
    if (opts.resumeFrom !== undefined && existsSync(path)) {
      for (const line of readFileSync(path, 'utf8').split('\n')) {
        if (!line.trim()) continue
        const record = JSON.parse(line) as Metrics
        if (typeof record.step === 'number' && record.step < opts.resumeFrom) log.records.push(record)
      }
    }
    await writeAtomic(path, log.records.map((r) => JSON.stringify(r) + '\n').join(''))
    return log
  }

  async record(entry: Metrics): Promise<void> {
    this.records.push(entry)
    await appendFile(join(this.dir, 'metrics.jsonl'), JSON.stringify(entry) + '\n')
    if (++this.sinceRefresh >= this.refreshEvery) await this.writePlot()
  }

  async writePlot(): Promise<void> {
    this.sinceRefresh = 0
    const series: Series[] = this.panels.map((p) => ({
      title: p.title ?? p.key,
      log: p.log,
      points: this.records
        .filter((r) => typeof r[p.key] === 'number' && typeof r[p.x ?? 'step'] === 'number')
        .map((r) => [r[p.x ?? 'step'] as number, r[p.key] as number]),
    }))
    await writeAtomic(join(this.dir, 'curves.svg'), curvesSvg(this.title, series))
  }
}

export async function writeAtomic(path: string, text: string): Promise<void> {
  const temp = `${path}.tmp-${process.pid}`
  await writeFile(temp, text)
  await rename(temp, path)
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

export function formatSeconds(s: number): string {
  if (!Number.isFinite(s)) return '?'
  if (s < 60) return `${Math.round(s)}s`
  if (s < 3600) return `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, '0')}s`
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`
}

/**
 * An AbortSignal fired by the first SIGINT or SIGTERM, so a loop can checkpoint and stop; a
 * second signal exits at once. `dispose` removes the handlers.
 */
export function interruptSignal(): { signal: AbortSignal; dispose: () => void } {
  const controller = new AbortController()
  const onSignal = (name: NodeJS.Signals) => {
    if (controller.signal.aborted) process.exit(130)
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
