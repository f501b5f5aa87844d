import test from 'ava'
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { defineCommand, flagTable, parseCommand, resolvedConfig, usage, UsageError } from '../src/cli-options'
import { prepareOut, SINGLE_JOB } from '../src/cli/common'
import { CHECKPOINT_FILE } from '../src/run'

const FLAGS = flagTable({
  size: { kind: 'int', help: 'a size', default: 3 },
  rate: { kind: 'number', help: 'a rate', min: 0 },
  mode: { kind: 'string', help: 'a mode', default: 'fast', choices: ['fast', 'slow'] },
  name: { kind: 'string', help: 'a name' },
  dry: { kind: 'bool', help: 'a switch' },
  'batch-size': { kind: 'int', help: 'a batch', default: 8 },
  jitter: { kind: 'bool', help: 'a switch that is on', default: true },
  steps: { kind: 'int', help: 'steps', conflicts: 'epochs' },
  epochs: { kind: 'number', help: 'epochs' },
})
const TOY = defineCommand({ name: 'toy', summary: 'a toy command', flags: FLAGS, run: async () => {} })

test('parsing returns each flag typed: numbers, booleans, choices, undefined only without a default', (t) => {
  const v = parseCommand(TOY, ['--rate', '0', '--mode', 'slow', '--dry'])
  // Each annotation compiles only if parsing is typed this way (`npm run typecheck` checks tests).
  const size: number = v.size
  const batch: number = v['batch-size']
  const rate: number | undefined = v.rate
  const mode: 'fast' | 'slow' = v.mode
  const name: string | undefined = v.name
  const dry: boolean = v.dry
  const quiet: boolean = v.quiet
  const precision: 'auto' | 'f32' | 'bf16' = v.precision
  // @ts-expect-error a flag without a default may be undefined
  const rateNumber: number = v.rate
  // @ts-expect-error a string with choices is their union, not any string
  const other: 'medium' = v.mode
  t.deepEqual(
    { size, batch, rate, mode, name, dry, quiet, precision, rateNumber, other },
    {
      size: 3,
      batch: 8,
      rate: 0,
      mode: 'slow',
      name: undefined,
      dry: true,
      quiet: false,
      precision: 'auto',
      rateNumber: 0,
      other: 'slow',
    },
  )
  t.is(typeof v.size, 'number')
})

test('a switch that is on by default turns off with --no-NAME, and says so in the help', (t) => {
  t.is(parseCommand(TOY, []).jitter, true)
  t.is(parseCommand(TOY, ['--no-jitter']).jitter, false)
  t.is(parseCommand(TOY, ['--jitter']).jitter, true)
  t.throws(() => parseCommand(TOY, ['--jitter', '--no-jitter']), {
    message: '--jitter and --no-jitter both given: give one',
  })
  t.throws(() => parseCommand(TOY, ['--no-dry']), { instanceOf: UsageError, message: /Unknown option '--no-dry'/ })
  t.regex(usage(TOY), /--jitter +a switch that is on \(on by default; --no-jitter turns it off\)/)
})

test('bad values name the flag and what was expected', (t) => {
  const cases: [string[], string][] = [
    [['--size', '2.5'], '--size must be an integer > 0, got "2.5"'],
    [['--rate=-1'], '--rate must be a number >= 0, got "-1"'],
    [['--mode', 'medium'], '--mode must be one of fast, slow, got "medium"'],
    [['--size', '0x10'], '--size must be an integer > 0, got "0x10"'],
    [['--size', '2', '--size', '3'], '--size given twice: give it once'],
    [
      ['--steps', '2', '--epochs', '1'],
      '--steps and --epochs exclude each other, both given on the command line: give one',
    ],
  ]
  for (const [argv, message] of cases) t.throws(() => parseCommand(TOY, argv), { instanceOf: UsageError, message })
})

test('defaults < config file < flags; a flag replaces the config file conflicting one; config.json keeps the run', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'beit-options-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  const config = join(dir, 'config.json')
  await writeFile(config, JSON.stringify({ size: 5, mode: 'slow', epochs: 2 }))
  const fromFile = parseCommand(TOY, ['--config', config])
  t.like(fromFile, { size: 5, mode: 'slow', epochs: 2, steps: undefined })
  const overridden = parseCommand(TOY, ['--config', config, '--size', '7', '--steps', '10'])
  t.like(overridden, { size: 7, mode: 'slow', steps: 10, epochs: undefined })
  t.deepEqual(resolvedConfig(FLAGS, overridden), {
    size: 7,
    mode: 'slow',
    dry: false,
    jitter: true,
    'batch-size': 8,
    steps: 10,
  })
  await writeFile(config, JSON.stringify({ size: 'big' }))
  t.throws(() => parseCommand(TOY, ['--config', config]), {
    message: `${config}: "size" must be an integer > 0, got "big"`,
  })
  await writeFile(config, JSON.stringify({ dryRun: true }))
  t.throws(() => parseCommand(TOY, ['--config', config]), {
    message: `${config}: unknown option "dryRun" for beit toy; expected one of size, rate, mode, name, dry, batch-size, jitter, steps, epochs, device, precision, quiet`,
  })
  // camelCase keys are the flags' names.
  await writeFile(config, JSON.stringify({ batchSize: 4, dry: true }))
  t.like(parseCommand(TOY, ['--config', config]), { 'batch-size': 4, dry: true })
})

test('--resume continues with the run folder options, wherever --out and --resume are given; the model keeps its own', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'beit-options-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  const run = join(dir, 'run')
  const flags = flagTable({
    ...FLAGS,
    width: { kind: 'int', fixed: true, help: 'a model width', default: 2 },
    out: { kind: 'string', help: 'run folder', default: join(dir, 'default') },
    resume: { kind: 'bool', help: 'continue' },
  })
  const resumable = defineCommand({ name: 'toy', summary: 'a toy run', flags, run: async () => {} })
  await mkdir(run)
  await writeFile(join(run, 'config.json'), JSON.stringify({ size: 9, width: 4, out: run }))
  await writeFile(join(run, CHECKPOINT_FILE), '')
  const config = join(dir, 'options.json')
  await writeFile(config, JSON.stringify({ out: run, resume: true }))
  t.like(parseCommand(resumable, ['--config', config]), { size: 9, width: 4 })
  await writeFile(config, JSON.stringify({ out: run }))
  t.like(parseCommand(resumable, ['--config', config, '--resume']), { size: 9, width: 4 })
  t.like(parseCommand(resumable, ['--out', run, '--resume', '--size', '5']), { size: 5, width: 4 })
  // The run's other options may change (and are reported); a model's are refused.
  const resumed = parseCommand(resumable, ['--out', run, '--resume', '--size', '5'])
  t.is(await prepareOut(flags, resumed, SINGLE_JOB), run)
  await t.throwsAsync(
    prepareOut(flags, parseCommand(resumable, ['--out', run, '--resume', '--width', '8']), SINGLE_JOB),
    {
      instanceOf: UsageError,
      message: `--resume continues ${run} with its checkpoint's model, which keeps --width 8 (was 4): start a new run (another --out) to change them`,
    },
  )
})

test('a flag that conflicts with another cannot have a default', (t) => {
  t.throws(
    () =>
      flagTable({
        steps: { kind: 'int', help: '', default: 1, conflicts: 'epochs' },
        epochs: { kind: 'int', help: '' },
      }),
    { message: 'flag --steps conflicts with --epochs and so cannot have a default' },
  )
})
