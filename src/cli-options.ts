/**
 * Command-line options as data: each command lists its flags with type, default and help, so
 * parsing, `--help` text, `--config file.json` (flags override it) and the run folder's
 * config.json all come from one table.
 */
import { readFileSync } from 'node:fs'
import { parseArgs } from 'node:util'

export class UsageError extends Error {}

type Kind = 'int' | 'number' | 'string' | 'bool'

export interface Flag {
  kind: Kind
  help: string
  default?: number | string | boolean
  /** Allowed values for strings. */
  choices?: string[]
  /** For numbers: the smallest allowed value and whether it is included. Default: > 0. */
  min?: number
}

export type FlagTable = Record<string, Flag>
export type Values = Record<string, number | string | boolean | undefined>

export interface Command {
  name: string
  summary: string
  flags: FlagTable
  run: (values: Values) => Promise<void>
}

const COMMON: FlagTable = {
  device: {
    kind: 'string',
    help: 'where models run: auto (a GPU when the CUDA build of the addon sees one), cpu, cuda or cuda:N',
    default: 'auto',
  },
  precision: {
    kind: 'string',
    help: 'activations: auto (bf16 on a GPU, f32 on the CPU), f32, or bf16 (mixed precision, f32 weights)',
    default: 'auto',
  },
  config: {
    kind: 'string',
    help: 'JSON file of option values (keys as the flags, e.g. "batch-size"); flags override it',
  },
  quiet: { kind: 'bool', help: 'no progress output', default: false },
  help: { kind: 'bool', help: 'this text', default: false },
}

export function usage(command: Command): string {
  const flags = { ...command.flags, ...COMMON }
  const lines = Object.entries(flags).map(([name, f]) => {
    const arg =
      f.kind === 'bool' ? '' : f.choices ? ` ${f.choices.join('|')}` : ` ${f.kind === 'string' ? 'VALUE' : 'N'}`
    const left = `  --${name}${arg}`
    const def = f.default === undefined || f.kind === 'bool' ? '' : ` (default ${f.default})`
    return `${left.padEnd(30)} ${f.help}${def}`
  })
  return `usage: beit ${command.name} [options]\n\n${command.summary}\n\noptions:\n${lines.join('\n')}\n`
}

function convert(name: string, flag: Flag, raw: unknown, from: string): number | string | boolean {
  const where = from === 'flag' ? `--${name}` : `${from}: "${name}"`
  if (flag.kind === 'bool') {
    if (typeof raw === 'boolean') return raw
    throw new UsageError(`${where} must be true or false, got ${JSON.stringify(raw)}`)
  }
  if (flag.kind === 'string') {
    const value = String(raw)
    if (flag.choices && !flag.choices.includes(value))
      throw new UsageError(`${where} must be one of ${flag.choices.join(', ')}, got ${JSON.stringify(value)}`)
    return value
  }
  const n = typeof raw === 'number' ? raw : typeof raw === 'string' && raw.trim() !== '' ? Number(raw) : NaN
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

/** Parses `argv` for `command`: defaults < config file < flags. */
export function parseCommand(command: Command, argv: string[]): Values {
  const flags = { ...command.flags, ...COMMON }
  const options = Object.fromEntries(
    Object.entries(flags).map(([name, f]) => [
      name,
      {
        type: f.kind === 'bool' ? ('boolean' as const) : ('string' as const),
        ...(name === 'help' ? { short: 'h' } : {}),
      },
    ]),
  )
  let parsed
  try {
    parsed = parseArgs({ args: argv, options, strict: true, allowPositionals: false })
  } catch (e) {
    throw new UsageError((e as Error).message)
  }
  const values: Values = {}
  for (const [name, f] of Object.entries(flags)) if (f.default !== undefined) values[name] = f.default
  const configPath = parsed.values.config as string | undefined
  if (configPath !== undefined) {
    let config: unknown
    try {
      config = JSON.parse(readFileSync(configPath, 'utf8'))
    } catch (e) {
      throw new UsageError(`--config ${configPath}: ${(e as Error).message}`)
    }
    if (typeof config !== 'object' || config === null || Array.isArray(config))
      throw new UsageError(`--config ${configPath}: expected a JSON object of option values`)
    for (const [key, raw] of Object.entries(config)) {
      const name = key.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)
      const flag = command.flags[name]
      if (!flag) throw new UsageError(`${configPath}: unknown option "${key}" for beit ${command.name}`)
      values[name] = convert(name, flag, raw, configPath)
    }
  }
  for (const [name, raw] of Object.entries(parsed.values)) {
    if (name === 'config' || raw === undefined) continue
    values[name] = convert(name, flags[name], raw, 'flag')
  }
  return values
}

/** The values a run used, for its folder's config.json. */
export function resolvedConfig(command: Command, values: Values): Record<string, unknown> {
  return Object.fromEntries(
    Object.keys(command.flags)
      .filter((k) => values[k] !== undefined)
      .map((k) => [k, values[k]]),
  )
}
