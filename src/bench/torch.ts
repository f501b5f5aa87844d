/**
 * beit against PyTorch on the CPU, side by side in one run: every row of
 * scripts/bench/rows.json (training steps of the MIM model, the classifier, the segmenter and
 * the tokenizer, and tokenizer encoding) runs as beit processes (f32, and on CPUs with AMX or
 * AVX512-BF16 the engine's bf16 mixed precision) and PyTorch processes (eager
 * f32, and under bf16 autocast on CPUs with AMX or AVX512-BF16, which it runs on; and each of
 * those under torch.compile, unless `--eager-only`) on the same work with the same number of
 * threads, alternating, `--rounds` times each; the best images/s of each side and the larger
 * peak RSS are reported, with beit f32's ratio to PyTorch eager f32 and beit's fastest mode's
 * ratio to PyTorch's fastest mode,
 * and how close each side comes to the machine: the row's matmul and
 * convolution FLOPs per step (counted once on the PyTorch side, convolutions as direct ones) as
 * sustained GFLOP/s against the GEMM roof (a 2048^3 PyTorch matmul on the same threads, f32 and,
 * where the CPU has bf16 units, bf16). Not a test.
 *   npm run bench:torch [-- --threads 2 --rounds 2 --only mim-tiny-32,classifier-demo --eager-only]
 * scripts/bench/torch.sh makes the Python environment (torch + transformers from PyPI) first.
 */
import { spawnSync } from 'node:child_process'
import { mkdir, writeFile } from 'node:fs/promises'
import { availableParallelism, homedir } from 'node:os'
import { dirname, join } from 'node:path'
import { parseArgs } from 'node:util'

import { benchRows, bf16Hardware, cpuName, ResolvedRow } from './torch-rows'

interface Measurement {
  imagesPerSecond: number
  peakRssMiB: number
  /** Resident memory once the runtime is loaded (node and the addon; torch and transformers), before the row's work. */
  startRssMiB: number
  version: string
  /** Matmul and convolution FLOPs of one step (PyTorch's first f32 run only). */
  flopsPerStep?: number
}

interface Roof {
  gflops: { f32: number; bf16?: number }
  size: number
}

const ROOT = join(__dirname, '..', '..')
const TORCH_ROW = join(ROOT, 'scripts', 'bench', 'torch_row.py')

type Side = 'beit' | 'beitBf16' | 'torch' | 'torchBf16' | 'torchCompile' | 'torchBf16Compile'
type TorchMode = Exclude<Side, 'beit' | 'beitBf16'>

/** PyTorch's modes: the column title, torch_row.py's flags, and the precision of the roof they are held against. */
const TORCH_MODES: Record<TorchMode, { title: string; flags: string[]; bf16: boolean }> = {
  torch: { title: 'f32', flags: [], bf16: false },
  torchBf16: { title: 'bf16 autocast', flags: ['--autocast', 'bf16'], bf16: true },
  torchCompile: { title: 'f32 torch.compile', flags: ['--compile'], bf16: false },
  torchBf16Compile: { title: 'bf16 autocast torch.compile', flags: ['--autocast', 'bf16', '--compile'], bf16: true },
}

/** Runs `command` with `threads` compute threads; its last stdout line, parsed. */
function lastJsonLine<T>(what: string, command: string, args: string[], threads: number): T {
  const t = String(threads)
  const env = { ...process.env, RAYON_NUM_THREADS: t, OMP_NUM_THREADS: t, MKL_NUM_THREADS: t }
  const result = spawnSync(command, args, { env, encoding: 'utf8' })
  const last = result.stdout.trim().split('\n').pop() ?? ''
  if (result.status !== 0 || !last.startsWith('{')) {
    throw new Error(`${what} failed (exit ${result.status}):\n${result.stderr.slice(-2000)}`)
  }
  return JSON.parse(last) as T
}

function measure(side: Side, row: ResolvedRow, threads: number, python: string, countFlops: boolean): Measurement {
  const args = ['--row', JSON.stringify(row), '--steps', String(row.steps)]
  const t = String(threads)
  if (side === 'beit' || side === 'beitBf16')
    return lastJsonLine(
      `${side} run of ${row.name}`,
      process.execPath,
      [join(__dirname, 'torch-row.js'), ...args, '--precision', side === 'beit' ? 'f32' : 'bf16'],
      threads,
    )
  const torchArgs = ['--threads', t, ...TORCH_MODES[side].flags]
  if (countFlops) torchArgs.push('--count-flops')
  return lastJsonLine(`${side} run of ${row.name}`, python, [TORCH_ROW, ...args, ...torchArgs], threads)
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      threads: { type: 'string', default: String(availableParallelism()) },
      rounds: { type: 'string', default: '2' },
      only: { type: 'string' },
      python: {
        type: 'string',
        default: process.env.BEIT_BENCH_PYTHON ?? join(homedir(), '.cache', 'beit', 'bench-venv', 'bin', 'python'),
      },
      'eager-only': { type: 'boolean', default: false },
      out: { type: 'string', default: join('runs', 'bench-torch.json') },
    },
  })
  const threads = Number(values.threads)
  const rounds = Number(values.rounds)
  const only = values.only?.split(',')
  const rows = benchRows(ROOT).filter((r) => only === undefined || only.includes(r.name))
  if (rows.length === 0)
    throw new Error(
      `--only ${values.only} matches no row; rows: ${benchRows(ROOT)
        .map((r) => r.name)
        .join(', ')}`,
    )
  // Without AMX or AVX512-BF16, PyTorch's bf16 autocast emulates bf16 arithmetic: minutes per
  // step, and never the faster mode, so those columns are left out.
  const bf16 = bf16Hardware().length > 0
  const modes = (Object.keys(TORCH_MODES) as TorchMode[]).filter(
    (m) => (bf16 || !TORCH_MODES[m].bf16) && (!values['eager-only'] || !TORCH_MODES[m].flags.includes('--compile')),
  )
  const modeTitles = modes.map((m) => TORCH_MODES[m].title)
  const beitModes = bf16 ? 'f32, bf16' : 'f32'
  console.log(
    `beit (${beitModes}) vs PyTorch (${modeTitles.join(', ')}) on ${cpuName()}, ${threads} threads each, best of ${rounds} alternating rounds${bf16 ? '' : '; no bf16 autocast columns: this CPU has neither AMX-BF16 nor AVX512-BF16'}${values['eager-only'] ? '; no torch.compile columns (--eager-only)' : ''}`,
  )
  const roof = lastJsonLine<Roof>(
    'the GEMM roof',
    values.python,
    [TORCH_ROW, '--roof', '--threads', String(threads), ...(bf16 ? ['--bf16'] : [])],
    threads,
  )
  const bf16Roof = roof.gflops.bf16 === undefined ? '' : `, bf16 ${roof.gflops.bf16.toFixed(0)} GFLOP/s`
  console.log(
    `GEMM roof (PyTorch ${roof.size}^3 matmul, ${threads} threads): f32 ${roof.gflops.f32.toFixed(0)} GFLOP/s${bf16Roof}\n`,
  )
  const header = [
    'row',
    'beit f32 img/s',
    ...(bf16 ? ['beit bf16 img/s'] : []),
    ...modeTitles.map((t) => `PyTorch ${t} img/s`),
    'beit f32 / PyTorch f32',
    "beit's fastest / PyTorch's fastest",
    `beit peak RSS (f32${bf16 ? ' / bf16' : ''})`,
    `PyTorch peak RSS (${modeTitles.join(' / ')})`,
    "peak RSS above the start, beit's fastest / PyTorch's fastest",
    'GFLOP per step',
    `GFLOP/s at the direct count (% of the roof in its precision): beit f32${bf16 ? ' / beit bf16' : ''} / ${modeTitles.join(' / ')}`,
  ]
  console.log(`| ${header.join(' | ')} |\n|${header.map(() => '---|').join('')}`)
  const results = []
  let versions = ''
  for (const row of rows) {
    const sides: Record<Side, Measurement[]> = {
      beit: [],
      beitBf16: [],
      torch: [],
      torchBf16: [],
      torchCompile: [],
      torchBf16Compile: [],
    }
    const beitSides: Side[] = bf16 ? ['beit', 'beitBf16'] : ['beit']
    const sidesRun: Side[] = [...beitSides, ...modes]
    for (let round = 0; round < rounds; round++) {
      const order = round % 2 === 0 ? sidesRun : sidesRun.map((_, i) => sidesRun[sidesRun.length - 1 - i])
      for (const side of order)
        sides[side].push(measure(side, row, threads, values.python, side === 'torch' && sides.torch.length === 0))
    }
    const best = (ms: Measurement[]) => (ms.length > 0 ? Math.max(...ms.map((m) => m.imagesPerSecond)) : NaN)
    const rss = (ms: Measurement[]) => (ms.length > 0 ? Math.max(...ms.map((m) => m.peakRssMiB)) : NaN)
    const grown = (ms: Measurement[]) =>
      ms.length > 0 ? Math.max(...ms.map((m) => m.peakRssMiB - m.startRssMiB)) : NaN
    const beit = best(sides.beit)
    const beitFastest = Math.max(...beitSides.map((s) => best(sides[s])))
    const beitFastestSide = beitSides.find((s) => best(sides[s]) === beitFastest) ?? 'beit'
    const beitFastestMode = beitFastestSide === 'beitBf16' ? 'bf16' : 'f32'
    const torch = best(sides.torch)
    const fastest = Math.max(...modes.map((m) => best(sides[m])))
    const fastestMode = modes.find((m) => best(sides[m]) === fastest) ?? 'torch'
    versions = `${sides.beit[0].version}; ${sides.torch[0].version}`
    const gib = (mib: number) => (Number.isNaN(mib) ? 'n/a' : `${(mib / 1024).toFixed(2)} GiB`)
    const flopsPerImage = (sides.torch[0].flopsPerStep ?? NaN) / row.batchSize
    const sustained = (imagesPerSecond: number, useBf16Roof: boolean) => {
      const roofGflops = useBf16Roof ? roof.gflops.bf16 : roof.gflops.f32
      if (Number.isNaN(imagesPerSecond) || roofGflops === undefined) return 'n/a'
      const gflops = (imagesPerSecond * flopsPerImage) / 1e9
      return `${gflops.toFixed(0)} (${((100 * gflops) / roofGflops).toFixed(0)}%)`
    }
    const beitBf16 = bf16 ? [best(sides.beitBf16)] : []
    // Three significant digits: the slow rows run at 0.3-1 img/s.
    const speed = (v: number) => (Number.isNaN(v) ? 'n/a' : v >= 100 ? v.toFixed(1) : v.toPrecision(3))
    const cells = [
      row.title,
      speed(beit),
      ...beitBf16.map(speed),
      ...modes.map((m) => speed(best(sides[m]))),
      (beit / torch).toFixed(2),
      `**${(beitFastest / fastest).toFixed(2)}** (beit ${beitFastestMode} / ${TORCH_MODES[fastestMode].title})`,
      [gib(rss(sides.beit)), ...beitBf16.map(() => gib(rss(sides.beitBf16)))].join(' / '),
      modes.map((m) => gib(rss(sides[m]))).join(' / '),
      `${gib(grown(sides[beitFastestSide]))} / ${gib(grown(sides[fastestMode]))}`,
      ((flopsPerImage * row.batchSize) / 1e9).toFixed(1),
      [
        sustained(beit, false),
        ...beitBf16.map((v) => sustained(v, true)),
        ...modes.map((m) => sustained(best(sides[m]), TORCH_MODES[m].bf16)),
      ].join(' / '),
    ]
    console.log(`| ${cells.join(' | ')} |`)
    results.push({
      row: row.name,
      title: row.title,
      ...sides,
      ratio: beit / torch,
      ratioToFastest: beitFastest / fastest,
      beitFastestMode,
      fastestMode,
      flopsPerStep: sides.torch[0].flopsPerStep,
    })
  }
  console.log(`\n${versions}`)
  console.log(
    "GFLOP/s count every convolution as a direct one (PyTorch's FLOP counter). beit runs 3x3 convolutions of 16 or more channels as Winograd transforms (fewer multiplies), so on the rows with convolutions (segmenter, tokenizer) its figures are the work of the direct method per second, above the work it does, and can pass 100% of the roof.",
  )
  await mkdir(dirname(values.out), { recursive: true })
  await writeFile(
    values.out,
    JSON.stringify({ cpu: cpuName(), threads, rounds, gemmRoof: roof, results }, null, 2) + '\n',
  )
  console.log(`all measurements: ${values.out}`)
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? e.message : e)
  process.exitCode = 1
})
