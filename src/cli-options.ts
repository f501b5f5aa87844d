/**
 * Command-line options as data: each command lists its flags with type, default and help, so
 * parsing, `--help` text, `--config file.json` (flags override it) and the run folder's
 * config.json all come from one table. The table is typed: `parseCommand` returns each flag's
 * value with its type (number, boolean, string or the union of its choices), defined whenever
 * the flag has a default.
 */
import { existsSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { parseArgs } from 'node:util'

export class UsageError extends Error {}

interface FlagBase {
  help: string
  /** A flag that cannot be given with this one (e.g. steps and epochs). On the command line it overrides the config file's. */
  conflicts?: string
  /**
   * The model holds it (its shape, its training settings): a resumed run keeps its checkpoint's
   * value, so another one is refused rather than ignored.
   */
  fixed?: boolean
}

export interface NumberFlag extends FlagBase {
  /** 'int': a whole number. */
  kind: 'int' | 'number'
  default?: number
  /** The smallest allowed value, included. Default: > 0. */
  min?: number
}

export interface StringFlag extends FlagBase {
  kind: 'string'
  default?: string
  /** Allowed values; the parsed value's type is their union. */
  choices?: readonly string[]
}

export interface BoolFlag extends FlagBase {
  kind: 'bool'
  /** Default false. */
  default?: boolean
}

export type Flag = NumberFlag | StringFlag | BoolFlag
export type FlagTable = Record<string, Flag>

/** The type of one flag's value. */
export type FlagValue<F extends Flag> = F extends { kind: 'int' | 'number' }
  ? number
  : F extends { kind: 'bool' }
    ? boolean
    : F extends { choices: readonly (infer C extends string)[] }
      ? C
      : string

/** Flags that always have a value: those with a default, and booleans (false unless given). */
type Defined<T extends FlagTable> = {
  [K in keyof T]: T[K] extends { default: unknown } | { kind: 'bool' } ? K : never
}[keyof T]

/** What parsing a table gives: a typed value per flag, optional where the flag has no default. */
export type Values<T extends FlagTable> = { [K in Defined<T>]: FlagValue<T[K]> } & {
  [K in Exclude<keyof T, Defined<T>>]?: FlagValue<T[K]>
}

/**
 * A flag table with its literal types kept (kinds, choices, which flags have defaults), so that
 * `Values<typeof table>` types what parsing it returns.
 */
export function flagTable<const T extends FlagTable>(table: T): T {
  for (const [name, f] of Object.entries(table)) {
    // A default would always conflict; the command falls back when neither is given.
    if (f.conflicts !== undefined && f.default !== undefined)
      throw new Error(`flag --${name} conflicts with --${f.conflicts} and so cannot have a default`)
  }
  return table
}

/** The keys of a record, typed as the record's keys (for `choices`). */
export function choicesOf<K extends string>(record: Record<K, unknown>): K[] {
  return Object.keys(record) as K[]
}

/** The flags every command has. */
export const COMMON = flagTable({
  device: {
    kind: 'string',
    help: 'where models run: auto (a GPU when the CUDA build of the addon sees one), cpu, cuda or cuda:N',
    default: 'auto',
  },
  precision: {
    kind: 'string',
    help: 'activations: auto (bf16 on a GPU, f32 on the CPU), f32, or bf16 (mixed precision, f32 weights)',
    default: 'auto',
    choices: ['auto', 'f32', 'bf16'],
  },
  config: {
    kind: 'string',
    help: 'JSON file of option values (keys as the flags, e.g. "batch-size"); flags override it',
  },
  quiet: { kind: 'bool', help: 'no progress output', default: false },
  help: { kind: 'bool', help: 'this text', default: false },
})

export type CommonValues = Values<typeof COMMON>

/** What a command's `run` gets: its own flags' values and the common ones. */
export type CommandValues<T extends FlagTable> = Values<T> & CommonValues

export interface Command<T extends FlagTable = FlagTable> {
  name: string
  summary: string
  flags: T
  run(values: CommandValues<T>): Promise<void>
}

/** A command whose `run` gets the values of its flag table, typed. */
export function defineCommand<const T extends FlagTable>(spec: Command<T>): Command<T> {
  flagTable(spec.flags)
  return spec
}

export function usage(command: Command): string {
  const flags: FlagTable = { ...command.flags, ...COMMON }
  const lines = Object.entries(flags).map(([name, f]) => {
    const arg =
      f.kind === 'bool'
        ? ''
        : f.kind === 'string' && f.choices
          ? ` ${f.choices.join('|')}`
          : ` ${f.kind === 'string' ? 'VALUE' : 'N'}`
    const left = `  --${name}${arg}`
    const def =
      f.kind === 'bool'
        ? f.default === true
          ? ` (on by default; --no-${name} turns it off)`
          : ''
        : f.default === undefined
          ? ''
          : ` (default ${f.default})`
    return `${left.padEnd(30)} ${f.help}${def}`
  })
  return `usage: beit ${command.name} [options]\n\n${command.summary}\n\noptions:\n${lines.join('\n')}\n`
}

type Value = number | string | boolean

function convert(name: string, flag: Flag, raw: unknown, from: string): Value {
  const where = from === 'flag' ? `--${name}` : `${from}: "${name}"`
  if (flag.kind === 'bool') {
    if (typeof raw === 'boolean') return raw
    throw new UsageError(`${where} must be true or false, got ${JSON.stringify(raw)}`)
  }
  if (flag.kind === 'string') {
    if (typeof raw !== 'string') throw new UsageError(`${where} must be a string, got ${JSON.stringify(raw)}`)
    if (flag.choices && !flag.choices.includes(raw))
      throw new UsageError(`${where} must be one of ${flag.choices.join(', ')}, got ${JSON.stringify(raw)}`)
    return raw
  }
  // Decimal only: Number() would also read hex, binary and octal ('0x10' as 16).
  const decimal = /^\s*[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?\s*$/i
  const n = typeof raw === 'number' ? raw : typeof raw === 'string' && decimal.test(raw) ? Number(raw) : NaN
  const min = flag.min ?? 0
  const okMin = flag.min === undefined ? n > 0 : n >= min
  if (!Number.isFinite(n) || !okMin || (flag.kind === 'int' && !Number.isInteger(n))) {
    const what = flag.kind === 'int' ? 'an integer' : 'a number'
    throw new UsageError(
      `${where} must be ${what} ${flag.min === undefined ? '> 0' : `>= ${min}`}, got ${JSON.stringify(raw)}`,
    )
  }
  return n
}

/** Keys a run folder's config.json holds besides its command's flags (the data-parallel job's). */
const JOB_KEYS = new Set(['worldSize', 'launcher', 'mpiLibrary'])

/**
 * The options a run in `out` started with (its config.json), as converted values: what `--resume`
 * continues with unless the config file or a flag says otherwise.
 */
function savedRunValues(command: Command<FlagTable>, out: string): Record<string, Value> {
  const path = join(out, 'config.json')
  if (!existsSync(path)) return {}
  let saved: unknown
  try {
    saved = JSON.parse(readFileSync(path, 'utf8'))
  } catch (e) {
    throw new UsageError(`--resume: ${path}: ${(e as Error).message}`)
  }
  if (typeof saved !== 'object' || saved === null || Array.isArray(saved)) return {}
  const values: Record<string, Value> = {}
  for (const [key, raw] of Object.entries(saved)) {
    const flag = Object.hasOwn(command.flags, key) ? command.flags[key] : undefined
    if (JOB_KEYS.has(key) || key === 'resume' || !flag || raw === undefined) continue
    values[key] = convert(key, flag, raw, path)
  }
  return values
}

/** A --config file's option values, converted by their flags (camelCase keys as the flags' names). */
function readConfig(command: Command, flags: FlagTable, path: string): Record<string, Value> {
  let config: unknown
  try {
    config = JSON.parse(readFileSync(path, 'utf8'))
  } catch (e) {
    throw new UsageError(`--config ${path}: ${(e as Error).message}`)
  }
  if (typeof config !== 'object' || config === null || Array.isArray(config))
    throw new UsageError(`--config ${path}: expected a JSON object of option values`)
  // The command's options and the common ones, but not --config or --help.
  const inFile = Object.keys(flags).filter((name) => name !== 'config' && name !== 'help')
  const values: Record<string, Value> = {}
  for (const [key, raw] of Object.entries(config)) {
    // A run folder's config.json may be passed back in: its job's keys are not options.
    if (JOB_KEYS.has(key)) continue
    const name = key.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)
    const flag = inFile.includes(name) ? flags[name] : undefined
    if (!flag)
      throw new UsageError(
        `${path}: unknown option "${key}" for beit ${command.name}; expected one of ${inFile.join(', ')}`,
      )
    values[name] = convert(name, flag, raw, path)
  }
  return values
}

/** Parses `argv` for `command`: defaults < the run's config.json (with --resume) < config file < flags. */
export function parseCommand<T extends FlagTable>(command: Command<T>, argv: string[]): CommandValues<T> {
  const flags: FlagTable = { ...command.flags, ...COMMON }
  // Switches that default to on are turned off with --no-NAME (Node 20's parseArgs has no negation).
  const negated = Object.keys(flags).filter((name) => flags[name].kind === 'bool' && flags[name].default === true)
  const options: Record<string, { type: 'boolean' | 'string'; short?: string }> = {}
  for (const [name, f] of Object.entries(flags))
    options[name] = { type: f.kind === 'bool' ? 'boolean' : 'string', ...(name === 'help' ? { short: 'h' } : {}) }
  for (const name of negated) options[`no-${name}`] = { type: 'boolean' }
  let parsed
  try {
    parsed = parseArgs({ args: argv, options, strict: true, allowPositionals: false, tokens: true })
  } catch (e) {
    throw new UsageError((e as Error).message)
  }
  // parseArgs keeps the last of a repeated flag; a repeat is more likely a mistake than a choice.
  const seen = new Set<string>()
  for (const token of parsed.tokens) {
    if (token.kind !== 'option') continue
    if (seen.has(token.name)) throw new UsageError(`--${token.name} given twice: give it once`)
    seen.add(token.name)
  }
  const config = typeof parsed.values.config === 'string' ? readConfig(command, flags, parsed.values.config) : {}
  const values: Record<string, Value> = {}
  for (const [name, f] of Object.entries(flags)) {
    if (f.default !== undefined) values[name] = f.default
    else if (f.kind === 'bool') values[name] = false
  }
  // A resumed run continues with its own options, not the defaults. Its folder and --resume
  // may come from the config file as well as from the command line.
  const out = parsed.values.out ?? config.out ?? command.flags.out?.default
  if ((parsed.values.resume ?? config.resume) === true && typeof out === 'string') {
    const saved = savedRunValues(command as Command<FlagTable>, out)
    for (const [name, value] of Object.entries(saved)) {
      values[name] = value
      // As a flag does: the saved option replaces its conflicting default (--epochs, --steps).
      const other = flags[name].conflicts
      if (other !== undefined && !(other in saved)) delete values[other]
    }
  }
  const configPath = parsed.values.config
  Object.assign(values, config)
  const fromFlags = new Set<string>()
  for (const [option, raw] of Object.entries(parsed.values)) {
    if (option === 'config' || raw === undefined) continue
    const name = negated.includes(option.slice(3)) && option.startsWith('no-') ? option.slice(3) : option
    if (fromFlags.has(name)) throw new UsageError(`--${name} and --no-${name} both given: give one`)
    values[name] = name === option ? convert(name, flags[name], raw, 'flag') : !raw
    fromFlags.add(name)
  }
  for (const [name, f] of Object.entries(flags)) {
    const other = f.conflicts
    if (other === undefined || values[name] === undefined || values[other] === undefined) continue
    // A flag overrides the config file, its conflicting option included.
    if (fromFlags.has(name) && !fromFlags.has(other)) delete values[other]
    else if (fromFlags.has(other) && !fromFlags.has(name)) delete values[name]
    else {
      const where = fromFlags.has(name) ? 'the command line' : String(configPath)
      throw new UsageError(`--${name} and --${other} exclude each other, both given on ${where}: give one`)
    }
  }
  // The one place the parsed record meets its type: every value was converted by its flag above.
  return values as CommandValues<T>
}

/** The values a run used (its command's own flags), for its folder's config.json. */
export function resolvedConfig(flags: FlagTable, values: object): Record<string, unknown> {
  const given = new Map(Object.entries(values))
  return Object.fromEntries(
    Object.keys(flags)
      .filter((k) => given.get(k) !== undefined)
      .map((k) => [k, given.get(k)]),
  )
}
