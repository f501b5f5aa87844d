#!/usr/bin/env node
/**
 * The `beit` command. Until the tokenizer and data-pipeline issues land, `beit demo` is a short
 * real MIM pretraining run on the bundled Fashion-MNIST sample with an interim patch-statistics
 * tokenizer.
 */
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { parseArgs } from 'node:util'

import { loadFashionMnist } from './data/fashion-mnist'
import { BlockwiseMaskGenerator } from './masking'
import { Beit } from './model'
import { PatchQuantizer } from './patch-quantizer'
import { pretrain } from './pretrain'
import { warmupCosine } from './schedule'

const USAGE = `usage: beit <command> [options]

commands:
  demo     short MIM pretraining of a small BEiT on the bundled Fashion-MNIST sample

demo options:
  --steps N        training steps (default 120)
  --batch-size N   images per step (default 64)
  --lr X           peak learning rate (default 1.5e-3)
  --seed N         seed for init, shuffling, masks (default 0)
  --out DIR        run folder for the checkpoint (default runs/demo)
  --quiet          no per-step lines
  -h, --help       this text
`

async function demo(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      steps: { type: 'string', default: '120' },
      'batch-size': { type: 'string', default: '64' },
      lr: { type: 'string', default: '1.5e-3' },
      seed: { type: 'string', default: '0' },
      out: { type: 'string', default: join('runs', 'demo') },
      quiet: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  })
  if (values.help) {
    process.stdout.write(USAGE)
    return
  }
  const steps = positiveInt('--steps', values.steps)
  const batchSize = positiveInt('--batch-size', values['batch-size'])
  const seed = nonNegativeInt('--seed', values.seed)
  const lr = Number(values.lr)
  if (!(lr > 0)) throw new UsageError(`--lr must be a number > 0, got ${values.lr}`)

  const images = await loadFashionMnist({ split: 'train' })
  const tokenizer = new PatchQuantizer(4)
  const model = Beit.create(
    {
      preset: 'tiny',
      imageSize: [28, 28],
      patchSize: 4,
      numChannels: 1,
      hiddenSize: 128,
      numHiddenLayers: 4,
      numAttentionHeads: 4,
      intermediateSize: 512,
      vocabSize: tokenizer.vocabSize,
    },
    { seed },
  )
  const masking = new BlockwiseMaskGenerator({ height: 7, width: 7, numMaskingPatches: 20, minNumPatches: 4, seed })
  console.log(
    `BEiT demo: ${model.numParameters.toLocaleString()} parameters, ${images.count} Fashion-MNIST images (bundled sample), ` +
      `${steps} steps x ${batchSize} images, blockwise masks of 20/49 patches, interim ${tokenizer.vocabSize}-token patch tokenizer`,
  )
  const started = performance.now()
  const history = await pretrain({
    model,
    images,
    tokenizer,
    masking,
    steps,
    batchSize,
    seed,
    lr: warmupCosine({ lr, warmupSteps: Math.min(10, steps), totalSteps: steps }),
    onProgress: (p) => {
      if (!values.quiet && (p.step % 10 === 0 || p.step === steps - 1)) {
        console.log(
          `step ${String(p.step + 1).padStart(5)}/${steps}  loss ${p.loss.toFixed(4)}  mlm_acc ${p.mlmAcc.toFixed(3)}  ` +
            `lr ${p.lr.toExponential(2)}  grad_norm ${p.gradNorm.toFixed(3)}  ${p.imagesPerSecond.toFixed(0)} img/s`,
        )
      }
    },
  })
  const seconds = (performance.now() - started) / 1000
  await mkdir(values.out, { recursive: true })
  const checkpoint = join(values.out, 'model.safetensors')
  await model.save(checkpoint)
  const window = Math.min(10, history.length)
  const avg = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length
  const first = history.slice(0, window)
  const last = history.slice(-window)
  console.log('')
  console.log(`| metric (mean of ${window} steps) | first | last |`)
  console.log('|---|---|---|')
  console.log(`| MIM loss | ${avg(first.map((h) => h.loss)).toFixed(4)} | ${avg(last.map((h) => h.loss)).toFixed(4)} |`)
  console.log(`| MIM accuracy | ${avg(first.map((h) => h.mlmAcc)).toFixed(3)} | ${avg(last.map((h) => h.mlmAcc)).toFixed(3)} |`)
  console.log(`wall time ${seconds.toFixed(1)} s, ${((steps * batchSize) / seconds).toFixed(0)} images/s; checkpoint ${checkpoint}`)
}

class UsageError extends Error {}

function positiveInt(flag: string, value: string | undefined): number {
  const n = Number(value)
  if (!Number.isInteger(n) || n <= 0) throw new UsageError(`${flag} must be a positive integer, got ${value}`)
  return n
}

function nonNegativeInt(flag: string, value: string | undefined): number {
  const n = Number(value)
  if (!Number.isInteger(n) || n < 0) throw new UsageError(`${flag} must be an integer >= 0, got ${value}`)
  return n
}

async function main(argv: string[]): Promise<void> {
  const [command, ...rest] = argv
  switch (command) {
    case 'demo':
      return demo(rest)
    case undefined:
    case '-h':
    case '--help':
      process.stdout.write(USAGE)
      return
    default:
      throw new UsageError(`unknown command ${JSON.stringify(command)}`)
  }
}

main(process.argv.slice(2)).catch((err: unknown) => {
  const message = err instanceof Error ? err.message : String(err)
  process.stderr.write(`beit: ${message}\n`)
  if (err instanceof UsageError || (err as { code?: string }).code?.startsWith('ERR_PARSE_ARGS')) {
    process.stderr.write(`run 'beit --help' for usage\n`)
  }
  process.exitCode = 1
})
