#!/usr/bin/env node
/**
 * The `beit` command: tokenizer -> pretrain -> finetune / probe, plus encode, reconstruct,
 * import/export and the embedded demo, one module per command under cli/. Each command's
 * flags are data (cli-options.ts); every run folder gets the resolved config.json,
 * metrics.jsonl, curves.svg and a resumable checkpoint.
 */
import { readFileSync } from 'node:fs'
import { join } from 'node:path'

import { Command, parseCommand, usage, UsageError } from './cli-options'
import { detectLaunch, INTERRUPTED_EXIT_CODE } from './distributed'
import { demoCommand } from './cli/demo'
import { encodeCommand, reconstructCommand } from './cli/encode'
import { finetuneCommand } from './cli/finetune'
import { exportCommand, importCommand } from './cli/huggingface'
import { pretrainCommand } from './cli/pretrain'
import { probeCommand } from './cli/probe'
import { segmentCommand } from './cli/segment'
import { tokenizerCommand } from './cli/tokenizer'

const COMMANDS: Command[] = [
  demoCommand,
  tokenizerCommand,
  pretrainCommand,
  finetuneCommand,
  probeCommand,
  segmentCommand,
  encodeCommand,
  reconstructCommand,
  importCommand,
  exportCommand,
]

const USAGE = `usage: beit <command> [options]   (beit <command> --help for its options)
       beit --version | -v

commands:
${COMMANDS.map((c) => `  ${c.name.padEnd(12)} ${c.summary}`).join('\n')}
`

/** The version in the package's package.json (next to dist/). */
function packageVersion(): string {
  const path = join(__dirname, '..', 'package.json')
  const pkg: unknown = JSON.parse(readFileSync(path, 'utf8'))
  const version = typeof pkg === 'object' && pkg !== null && 'version' in pkg ? pkg.version : undefined
  if (typeof version !== 'string') throw new Error(`${path} has no version`)
  return version
}

async function main(argv: string[]): Promise<void> {
  const [name, ...rest] = argv
  if (name === undefined || name === '-h' || name === '--help') {
    process.stdout.write(USAGE)
    return
  }
  if (name === '-v' || name === '--version') {
    process.stdout.write(`${packageVersion()}\n`)
    return
  }
  const command = COMMANDS.find((c) => c.name === name)
  if (!command)
    throw new UsageError(
      `unknown command ${JSON.stringify(name)}; expected one of ${COMMANDS.map((c) => c.name).join(', ')} (or --help, --version)`,
    )
  const values = parseCommand(command, rest)
  if (values.help) {
    process.stdout.write(usage(command))
    return
  }
  // Under mpiexec every rank runs the command: only the training commands share the work.
  const launch = detectLaunch()
  if (launch && launch.worldSize > 1 && !('distributed' in command.flags))
    throw new UsageError(
      `beit ${name} runs in one process, but ${launch.launcher} started ${launch.worldSize}: run it without a launcher (tokenizer, pretrain, finetune and segment train data-parallel)`,
    )
  await command.run(values)
}

main(process.argv.slice(2)).catch((err: unknown) => {
  const message = err instanceof Error ? err.message : String(err)
  process.stderr.write(`beit: error: ${message}\n`)
  if (err instanceof UsageError) {
    const name = process.argv[2]
    const known = COMMANDS.some((c) => c.name === name)
    process.stderr.write(`run 'beit ${known ? `${name} ` : ''}--help' for usage\n`)
  }
  if (process.env.BEIT_DEBUG && err instanceof Error) process.stderr.write(`${err.stack}\n`)
  process.exitCode = process.exitCode === INTERRUPTED_EXIT_CODE ? INTERRUPTED_EXIT_CODE : 1
})
