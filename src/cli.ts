#!/usr/bin/env node
/**
 * The `beit` command: tokenizer -> pretrain -> finetune / probe, plus encode, reconstruct,
 * import/export and the embedded demo, one module per command under cli/. Each command's
 * flags are data (cli-options.ts); every run folder gets the resolved config.json,
 * metrics.jsonl, curves.svg and a resumable checkpoint.
 */
import { Command, parseCommand, usage, UsageError } from './cli-options'
import { demoCommand } from './cli/demo'
import { encodeCommand, reconstructCommand } from './cli/encode'
import { finetuneCommand } from './cli/finetune'
import { exportCommand, importCommand } from './cli/huggingface'
import { pretrainCommand } from './cli/pretrain'
import { probeCommand } from './cli/probe'
import { tokenizerCommand } from './cli/tokenizer'

const COMMANDS: Command[] = [
  demoCommand,
  tokenizerCommand,
  pretrainCommand,
  finetuneCommand,
  probeCommand,
  encodeCommand,
  reconstructCommand,
  importCommand,
  exportCommand,
]

const USAGE = `usage: beit <command> [options]   (beit <command> --help for its options)

commands:
${COMMANDS.map((c) => `  ${c.name.padEnd(12)} ${c.summary}`).join('\n')}
`

async function main(argv: string[]): Promise<void> {
  const [name, ...rest] = argv
  if (name === undefined || name === '-h' || name === '--help') {
    process.stdout.write(USAGE)
    return
  }
  const command = COMMANDS.find((c) => c.name === name)
  if (!command)
    throw new UsageError(
      `unknown command ${JSON.stringify(name)}; expected one of ${COMMANDS.map((c) => c.name).join(', ')}`,
    )
  const values = parseCommand(command, rest)
  if (values.help) {
    process.stdout.write(usage(command))
    return
  }
  await command.run(values)
}

main(process.argv.slice(2)).catch((err: unknown) => {
  const message = err instanceof Error ? err.message : String(err)
  process.stderr.write(`beit: error: ${message}\n`)
  if (err instanceof UsageError)
    process.stderr.write(`run 'beit ${process.argv[2] ?? ''} --help' for usage\n`.replace('  ', ' '))
  if (process.env.BEIT_DEBUG && err instanceof Error) process.stderr.write(`${err.stack}\n`)
  process.exitCode = process.exitCode === 130 ? 130 : 1
})
