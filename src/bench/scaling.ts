/**
 * The cost of going data-parallel on this machine, and beit's data parallelism against PyTorch
 * DDP, side by side in one run (`npm run bench:scaling`; not a test): the same step (a row of
 * scripts/bench/rows.json, the same global batch) as
 *   - beit, 1 process x 2 threads, and 2 ranks x 1 thread under MPICH's mpiexec;
 *   - PyTorch eager, 1 process x 2 threads, and DDP (gloo) 2 ranks x 1 thread under torchrun;
 * alternating, best of `--rounds`. Then the all-reduce: beit's share of the 2-rank step and its
 * time per update against the MPI library's own MPI_Allreduce of the same bytes and of 25 MiB
 * (scripts/bench/allreduce.c, compiled with the library's mpicc).
 *   npm run bench:scaling [-- --rounds 3 --only classifier-demo]
 */
import { spawnSync } from 'node:child_process'
import { mkdir, writeFile } from 'node:fs/promises'
import { homedir, tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { parseArgs } from 'node:util'

import { benchRows, cpuName, ResolvedRow } from './torch-rows'

const ROOT = join(__dirname, '..', '..')
const ROWS = ['mim-tiny-32', 'classifier-demo']

interface Measurement {
  imagesPerSecond: number
  peakRssMiB: number
  version: string
  parameters?: number
  allReduceShare?: number
  allReduceSeconds?: number
}

type Setup = 'beit 1x2' | 'beit 2x1' | 'torch 1x2' | 'torch DDP 2x1'
const SETUPS: Setup[] = ['beit 1x2', 'beit 2x1', 'torch 1x2', 'torch DDP 2x1']

function run(command: string[], threads: number): string {
  const t = String(threads)
  const env = { ...process.env, RAYON_NUM_THREADS: t, OMP_NUM_THREADS: t, MKL_NUM_THREADS: t }
  const result = spawnSync(command[0], command.slice(1), { env, encoding: 'utf8', cwd: ROOT })
  const last = result.stdout.trim().split('\n').pop() ?? ''
  if (result.status !== 0 || !last.startsWith('{'))
    throw new Error(`${command.join(' ')} failed (exit ${result.status}):\n${result.stderr.slice(-2000)}`)
  return last
}

function measure(setup: Setup, row: ResolvedRow, tools: { python: string; mpiexec: string }): Measurement {
  const args = ['--row', JSON.stringify(row), '--steps', String(row.steps)]
  const beit = [process.execPath, join(__dirname, 'torch-row.js'), ...args]
  const torch = [join(ROOT, 'scripts', 'bench', 'torch_row.py'), ...args]
  const torchrun = [tools.python, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']
  const commands: Record<Setup, [string[], number]> = {
    'beit 1x2': [beit, 2],
    'beit 2x1': [[tools.mpiexec, '-n', '2', ...beit], 1],
    'torch 1x2': [[tools.python, ...torch, '--threads', '2'], 2],
    'torch DDP 2x1': [[...torchrun, ...torch, '--threads', '1'], 1],
  }
  const [command, threads] = commands[setup]
  return JSON.parse(run(command, threads)) as Measurement
}

/** The MPI library's own in-place all-reduce of `bytes` (seconds per call). */
function mpiAllReduce(binary: string, mpiexec: string, bytes: number): number {
  const line = run([mpiexec, '-n', '2', binary, String(Math.round(bytes / 4)), '20'], 1)
  return (JSON.parse(line) as { seconds: number }).seconds
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      rounds: { type: 'string', default: '2' },
      only: { type: 'string' },
      python: {
        type: 'string',
        default: process.env.BEIT_BENCH_PYTHON ?? join(homedir(), '.cache', 'beit', 'bench-venv', 'bin', 'python'),
      },
      mpich: { type: 'string', default: join(homedir(), '.cache', 'beit', 'mpich') },
      out: { type: 'string', default: join('runs', 'bench-scaling.json') },
    },
  })
  const rounds = Number(values.rounds)
  const names = values.only?.split(',') ?? ROWS
  const rows = benchRows(ROOT).filter((r) => names.includes(r.name))
  if (rows.length === 0) throw new Error(`--only ${values.only} matches no row; rows: ${ROWS.join(', ')}`)
  const tools = { python: values.python, mpiexec: join(values.mpich, 'bin', 'mpiexec') }
  const allreduce = join(tmpdir(), `beit-allreduce-${process.pid}`)
  const source = join(ROOT, 'scripts', 'bench', 'allreduce.c')
  const compiled = spawnSync(join(values.mpich, 'bin', 'mpicc'), ['-O2', '-o', allreduce, source], { encoding: 'utf8' })
  if (compiled.status !== 0) throw new Error(`mpicc ${source} failed:\n${compiled.stderr}`)

  console.log(
    `data-parallel scaling on ${cpuName()}, f32, best of ${rounds} alternating rounds; the same global batch\n`,
  )
  console.log(
    '| row | beit 1x2 | beit 2 ranks x 1 | 2x1 / 1x2 | PyTorch 1x2 | PyTorch DDP 2x1 | beit 2x1 / DDP 2x1 | all-reduce share (beit 2x1) |',
  )
  console.log('|---|---|---|---|---|---|---|---|')
  const results = []
  const comms: string[] = []
  let versions = new Set<string>()
  for (const row of rows) {
    const runs = Object.fromEntries(SETUPS.map((s) => [s, [] as Measurement[]])) as Record<Setup, Measurement[]>
    for (let round = 0; round < rounds; round++) {
      const order = round % 2 === 0 ? SETUPS : SETUPS.map((_, i) => SETUPS[SETUPS.length - 1 - i])
      for (const setup of order) runs[setup].push(measure(setup, row, tools))
    }
    const best = (s: Setup) => runs[s].reduce((a, b) => (b.imagesPerSecond > a.imagesPerSecond ? b : a))
    const [b12, b21, t12, t21] = SETUPS.map(best)
    versions = new Set([...versions, ...SETUPS.map((s) => runs[s][0].version)])
    const fmt = (m: Measurement) => m.imagesPerSecond.toFixed(1)
    console.log(
      `| ${row.title} | ${fmt(b12)} | ${fmt(b21)} | **${(b21.imagesPerSecond / b12.imagesPerSecond).toFixed(2)}** | ${fmt(t12)} | ${fmt(t21)} | **${(b21.imagesPerSecond / t21.imagesPerSecond).toFixed(2)}** | ${(100 * (b21.allReduceShare ?? 0)).toFixed(1)}% |`,
    )
    const bytes = 4 * (b21.parameters ?? 0)
    const mpi = mpiAllReduce(allreduce, tools.mpiexec, bytes)
    const ms = (s: number) => `${(1000 * s).toFixed(2)} ms`
    const gbs = (s: number) => `${(bytes / s / 1e9).toFixed(2)} GB/s`
    comms.push(
      `| ${row.name} | ${(bytes / 2 ** 20).toFixed(1)} MiB | ${ms(b21.allReduceSeconds ?? 0)} (${gbs(b21.allReduceSeconds ?? 1)}) | ${ms(mpi)} (${gbs(mpi)}) |`,
    )
    results.push({ row: row.name, title: row.title, runs, mpiAllReduceSeconds: mpi, gradientBytes: bytes })
  }
  const mib25 = 25 * 2 ** 20
  const mpi25 = mpiAllReduce(allreduce, tools.mpiexec, mib25)
  console.log(`\n${[...versions].join('; ')}\n`)
  console.log(
    '| gradients of | size | beit all-reduce per update (incl. waiting for the slower rank) | MPI_Allreduce of the same bytes |',
  )
  console.log('|---|---|---|---|')
  for (const line of comms) console.log(line)
  console.log(
    `\nMPI_Allreduce of 25 MiB (PyTorch DDP's bucket): ${(1000 * mpi25).toFixed(2)} ms, ${(mib25 / mpi25 / 1e9).toFixed(2)} GB/s`,
  )
  await mkdir(dirname(values.out), { recursive: true })
  await writeFile(
    values.out,
    JSON.stringify({ cpu: cpuName(), rounds, results, mpiAllReduce25MiBSeconds: mpi25 }, null, 2) + '\n',
  )
  console.log(`all measurements: ${values.out}`)
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? e.message : e)
  process.exitCode = 1
})
