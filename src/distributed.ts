/**
 * Data-parallel training over MPI, launched by the launchers users have (`mpiexec -n 4 node
 * train.js`, `mpirun -H a:8,b:8 npx beit pretrain ...`, `srun --mpi=pmix ...`): one process per
 * device, each with its shard of the data; every update averages the gradients of all ranks
 * (PyTorch DDP's semantics), so N ranks x B images take the step one rank x N*B takes.
 *
 * MPI is opened at run time: nothing here needs MPI until `initDistributed` is called.
 */
import { native } from './native'
import type { Launch } from './native'

export type { Launch }

/** This process's place in a data-parallel job. */
export interface Distributed {
  rank: number
  worldSize: number
  /** The rank among this machine's processes: it chooses the GPU (`cuda:${localRank}`). */
  localRank: number
  /** Who started the job, e.g. "PMI (PMI_SIZE)"; "none" for a process started alone. */
  launcher: string
  /** MPI_Get_library_version's first line, the library file and its ABI. */
  mpiLibrary: string
}

/** One process on its own: what the loops assume without `distributed`. */
export const SINGLE_PROCESS: Readonly<Distributed> = Object.freeze({
  rank: 0,
  worldSize: 1,
  localRank: 0,
  launcher: 'none',
  mpiLibrary: 'none',
})

export interface InitDistributedOptions {
  /** The MPI library to open (a path or a file name). Default: BEIT_MPI_LIB, else the launcher's ABI's. */
  mpiLibrary?: string
}

/** The launch the environment describes (mpiexec, mpirun, srun set it), or null. */
export function detectLaunch(): Launch | null {
  return native.detectLaunch() ?? null
}

/**
 * Joins the data-parallel job this process was launched into: opens and initialises MPI (once
 * per process) and returns the rank, world size and library. A library that sees another world
 * size than the launcher started is an error naming both. When the process ends, MPI is
 * finalised after a clean exit (an interrupted run's included) and the whole job is aborted
 * after a failed one, so a rank that throws never leaves the others waiting.
 */
export function initDistributed(opts: InitDistributedOptions = {}): Distributed {
  const info = native.initDistributed(opts.mpiLibrary)
  if (!exitHooked) {
    exitHooked = true
    process.on('exit', (code) => {
      // A run interrupted on every rank at the same step, checkpoint written, ends cleanly: an
      // abort would report it to the launcher as a failure (Open MPI: exit code 1).
      if (code === 0 || (code === INTERRUPTED_EXIT_CODE && stoppedTogether)) return native.finalizeDistributed()
      // Give the launcher a moment to forward this rank's last output (its error) before the
      // abort tears the job down.
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ABORT_GRACE_MS)
      native.abortDistributed(code)
    })
  }
  return { ...info }
}
/** The exit code of a run stopped by SIGINT/SIGTERM (128 + SIGINT). */
export const INTERRUPTED_EXIT_CODE = 130
// MPI is per process, so its end is hooked once per process.
let exitHooked = false
let stoppedTogether = false
const ABORT_GRACE_MS = 300

/**
 * Records that every rank has agreed to stop (a signal seen by any, `anyRank`) and passed its
 * checkpoint: the process's exit with INTERRUPTED_EXIT_CODE then finalises MPI instead of
 * aborting the job. A second signal, which exits at once, still aborts.
 */
export function noteStoppedTogether(d: Distributed): void {
  if (d.worldSize > 1) stoppedTogether = true
}

/** Element-wise sums over every rank (the values themselves on a single process). */
export function sumAcrossRanks(d: Distributed, values: number[]): number[] {
  if (d.worldSize === 1) return values
  return Array.from(native.sumAcrossRanks(Float64Array.from(values)))
}

/** True on every rank when it is true on any (a signal seen by one rank stops them all at the same step). */
export function anyRank(d: Distributed, value: boolean): boolean {
  if (d.worldSize === 1) return value
  return native.maxAcrossRanks(Float64Array.of(value ? 1 : 0))[0] > 0
}

/**
 * Throws on every rank unless `value` (JSON-serialisable) is the same on every rank as on rank 0;
 * the rank that differs names the first field that does.
 */
export function checkSameAcrossRanks(d: Distributed, what: string, value: unknown): void {
  if (d.worldSize > 1) native.checkSameAcrossRanks(what, JSON.stringify(value))
}

/** Resolves when every rank has reached it. */
export async function barrier(d: Distributed): Promise<void> {
  if (d.worldSize > 1) await native.barrier()
}

/** Checks a `distributed` option: an object from `initDistributed` (or SINGLE_PROCESS). */
export function checkDistributed(d: Distributed): Distributed {
  const ok =
    typeof d === 'object' &&
    d !== null &&
    Number.isInteger(d.worldSize) &&
    d.worldSize >= 1 &&
    Number.isInteger(d.rank) &&
    d.rank >= 0 &&
    d.rank < d.worldSize
  if (!ok) throw new Error(`distributed must be what initDistributed() returns, got ${JSON.stringify(d)}`)
  return d
}
