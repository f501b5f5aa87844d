import test from 'ava'
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { SINGLE_PROCESS } from '../src/distributed'
import { batching, formatSeconds, MetricsLog, resolveSteps, Run, scheduleFor, startPosition } from '../src/run'
import { curvesSvg } from '../src/plot'
import { warmupCosine } from '../src/schedule'

async function tempDir(t: { teardown: (fn: () => Promise<void>) => void }): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'beit-run-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  return dir
}

const PANELS = [{ key: 'loss' }]
const ONE_BY_4 = batching({ batchSize: 4 })

test('durations read as seconds, minutes and seconds, or hours and minutes, rounded once', (t) => {
  t.is(formatSeconds(Number.NaN), '?')
  t.is(formatSeconds(Number.POSITIVE_INFINITY), '?')
  t.is(formatSeconds(0.4), '0s')
  t.is(formatSeconds(59.4), '59s')
  t.is(formatSeconds(59.6), '1m00s')
  t.is(formatSeconds(65), '1m05s')
  t.is(formatSeconds(119.6), '2m00s')
  t.is(formatSeconds(3599.7), '1h00m')
  t.is(formatSeconds(3 * 3600 + 5 * 60 + 9), '3h05m')
})

test('the run length is exactly one of steps and epochs', (t) => {
  t.is(resolveSteps(7, undefined, 10), 7)
  t.is(resolveSteps(undefined, 2.5, 10), 25)
  t.throws(() => resolveSteps(undefined, undefined, 10), { message: /give exactly one of steps and epochs.*neither/ })
  t.throws(() => resolveSteps(3, 1, 10), { message: /got steps 3 and epochs 1/ })
  t.throws(() => resolveSteps(undefined, 0.01, 10), {
    message: 'the run must have a positive whole number of steps, got 0 (0.01 epochs of 10 batches)',
  })
  t.throws(() => resolveSteps(undefined, -1, 10), { message: 'epochs must be a positive number, got -1' })
  t.throws(() => resolveSteps(2.5, undefined, 10), { message: /positive whole number of steps, got 2.5$/ })
})

test('a schedule is warmup + cosine options or a function used as is', (t) => {
  const f = (step: number) => step / 10
  t.is(scheduleFor(f, 100), f)
  const lr = scheduleFor({ lr: 1e-3 }, 100)
  const reference = warmupCosine({ lr: 1e-3, minLr: 1e-3 / 150, warmupSteps: 5, totalSteps: 100 })
  t.deepEqual([0, 4, 5, 50, 99].map(lr), [0, 4, 5, 50, 99].map(reference))
  t.throws(() => scheduleFor(1e-3 as unknown as { lr: number }, 10), {
    message: 'schedule must be { lr, minLr?, warmupSteps?, decay? } or a function of the step, got 0.001',
  })
})

test('a run checkpoints every N steps, after the last and when aborted, and stops only when aborted', async (t) => {
  const dir = await tempDir(t)
  const controller = new AbortController()
  const fresh = startPosition('test', 7, ONE_BY_4, 0)
  const run = await Run.open({
    outDir: join(dir, 'run'),
    saved: undefined,
    fresh,
    owner: 'model',
    runName: 'a test run',
    title: 'test',
    panels: PANELS,
    checkpointEvery: 3,
    signal: controller.signal,
  })
  t.is(run.start, fresh)
  t.is(run.checkpoint, join(dir, 'run', 'checkpoint.safetensors'))
  const saved: number[] = []
  const stops: boolean[] = []
  for (let step = 1; step <= 7; step++) {
    if (step === 5) controller.abort()
    stops.push(await run.afterStep(step, async () => void saved.push(step)))
  }
  t.deepEqual(saved, [3, 5, 6, 7])
  t.deepEqual(stops, [false, false, false, false, true, true, true])
  await run.metrics.record({ step: 0, loss: 1 })
  t.deepEqual(await run.end('interrupted', 5), {
    status: 'interrupted',
    step: 5,
    checkpoint: join(dir, 'run', 'checkpoint.safetensors'),
  })
  t.regex(await readFile(join(dir, 'run', 'curves.svg'), 'utf8'), /^<svg/)
})

test('a resumed run starts at the saved position and keeps the metrics before it', async (t) => {
  const dir = await tempDir(t)
  // The last record was cut short by a hard kill (no newline): dropped with the others past step 2.
  const records = [0, 1, 2, 3].map((step) => JSON.stringify({ step, loss: 1 })).join('\n')
  await writeFile(join(dir, 'metrics.jsonl'), `${records}\n{"step":4,"lo`)
  const saved = { ...startPosition('test', 7, ONE_BY_4, 0), step: 2, batch: 1 }
  const open = (fresh: ReturnType<typeof startPosition>) =>
    Run.open({ outDir: dir, saved, fresh, owner: 'model', runName: 'fine-tuning', title: 'test', panels: PANELS })
  const run = await open(startPosition('test', 7, ONE_BY_4, 0))
  t.deepEqual(run.start, saved)
  const steps = (await readFile(join(dir, 'metrics.jsonl'), 'utf8'))
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l).step)
  t.deepEqual(steps, [0, 1])
  await t.throwsAsync(open(startPosition('test', 8, ONE_BY_4, 0)), {
    message: 'cannot resume: the run had totalSteps 7, now 8',
  })
  await t.throwsAsync(open(startPosition('other', 7, ONE_BY_4, 0)), {
    message: "the model's checkpoint is from a test run, not fine-tuning",
  })
  const twoRanks = batching({ batchSize: 4, distributed: { ...SINGLE_PROCESS, worldSize: 2 } })
  await t.throwsAsync(open(startPosition('test', 7, twoRanks, 0)), {
    message: 'cannot resume: the run had worldSize 1, now 2 (launch it with 1 rank(s) to continue it exactly)',
  })
  await t.throwsAsync(open(startPosition('test', 7, batching({ batchSize: 4, accumulate: 2 }), 0)), {
    message: 'cannot resume: the run had accumulate 1, now 2',
  })
  // A position saved before data parallelism (no worldSize, no accumulate) is one rank's, one batch per update.
  const { worldSize: _w, accumulate: _a, ...older } = saved
  const legacy = await Run.open({
    outDir: dir,
    saved: older,
    fresh: startPosition('test', 7, ONE_BY_4, 0),
    owner: 'model',
    runName: 'fine-tuning',
    title: 'test',
    panels: PANELS,
  })
  t.is(legacy.start.step, 2)
  // An epoch's summary is logged with its last step, before the checkpoint that closes the epoch:
  // resumed from a checkpoint inside that epoch (a kill in between), it is logged again, so the
  // first one goes; resumed from the epoch's end, it stays.
  const summary = { step: 3, epoch: 0, trainLoss: 1 }
  const log = [0, 1, 2, 3].map((step) => ({ step, epoch: 0, loss: 1 }))
  for (const [position, kept] of [
    [{ step: 4, epoch: 0, batch: 3 }, [...log]],
    [{ step: 4, epoch: 1, batch: -1 }, [...log, summary]],
  ] as const) {
    await writeFile(join(dir, 'metrics.jsonl'), [...log, summary].map((r) => JSON.stringify(r) + '\n').join(''))
    await Run.open({
      outDir: dir,
      saved: { ...saved, ...position },
      fresh: startPosition('test', 7, ONE_BY_4, 0),
      owner: 'model',
      runName: 'fine-tuning',
      title: 'test',
      panels: PANELS,
    })
    const lines = (await readFile(join(dir, 'metrics.jsonl'), 'utf8')).trim().split('\n')
    t.deepEqual(
      lines.map((l) => JSON.parse(l)),
      kept,
    )
  }
  // A broken record before the end is an error naming its line.
  await writeFile(join(dir, 'metrics.jsonl'), `{"step":0}\n{"step":\n{"step":1}\n`)
  await t.throwsAsync(open(startPosition('test', 7, ONE_BY_4, 0)), { message: /metrics\.jsonl:2: not a JSON record/ })
})

test('accumulate must be a whole number of batches', (t) => {
  t.throws(() => batching({ batchSize: 4, accumulate: 0 }), {
    message: 'accumulate must be a positive integer (batches per update), got 0',
  })
  t.throws(() => batching({ batchSize: 4, distributed: { ...SINGLE_PROCESS, rank: 2, worldSize: 2 } }), {
    message: /distributed must be what initDistributed\(\) returns/,
  })
})

test("a long run's metrics log holds bounded curves in memory and every record on disk", async (t) => {
  const dir = await tempDir(t)
  const log = await MetricsLog.open(dir, { title: 'run', panels: [{ key: 'loss' }], refreshEvery: 1e9 })
  const steps = 30_000
  for (let step = 0; step < steps; step++) await log.record({ step, loss: step === 12_345 ? 9 : 1 + (step % 5) / 100 })
  await log.writePlot()
  const held = (log as unknown as { points: [number, number][][] }).points[0].length
  t.true(held <= 8000, `${held} points held for ${steps} records`)
  const svg = await readFile(join(dir, 'curves.svg'), 'utf8')
  t.true(svg.includes('>9</text>') || svg.includes('>8</text>'), 'the spike survives the compaction')
  const lines = (await readFile(join(dir, 'metrics.jsonl'), 'utf8')).trim().split('\n')
  t.is(lines.length, steps)
})

test('training curves: a long run is thinned to its extremes, and a flat panel gets ticks', (t) => {
  const points: [number, number][] = Array.from({ length: 150_000 }, (_, i) => [
    i,
    i === 77_777 ? 9 : 1 + (i % 7) / 100,
  ])
  const svg = curvesSvg('run', [{ title: 'loss', points }])
  const path = /<path d="([^"]*)"/.exec(svg)![1]
  const drawn = path.split(/[ML]/).length - 1
  t.true(drawn <= 2000 && drawn >= 1000, `${drawn} points drawn`)
  // The one spike survives thinning: its y is the top of the panel.
  t.true(svg.includes('>9</text>') || svg.includes('>8</text>'), 'the y axis reaches the spike')
  // Values equal up to rounding: ticks used to loop forever (the step below an ulp of the value).
  const flat = curvesSvg('run', [
    {
      title: 'lr',
      points: [
        [0, 1000],
        [1, 1000 + 1.2e-13],
      ],
    },
  ])
  t.true(flat.includes('<path'))
})
