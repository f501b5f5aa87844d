#!/usr/bin/env node
/**
 * The `beit` command. `beit demo`: train a small dVAE tokenizer, then pretrain a small BEiT on
 * its tokens, both on the bundled Fashion-MNIST sample.
 */
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { parseArgs } from 'node:util'

import { loadFashionMnist } from './data/fashion-mnist'
import { BlockwiseMaskGenerator } from './masking'
import { Beit } from './model'
import { pretrain } from './pretrain'
import { cosineRamp, warmupCosine } from './schedule'
import { Dvae } from './tokenizer'
import { trainTokenizer } from './train-tokenizer'

const USAGE = `usage: beit <command> [options]

commands:
  demo     train a small dVAE tokenizer, then MIM-pretrain a small BEiT on its tokens,
           on the bundled Fashion-MNIST sample

demo options:
  --tokenizer-steps N   tokenizer training steps (default 300, batch 32)
  --steps N             pretraining steps (default 150)
  --batch-size N        pretraining images per step (default 64)
  --lr X                peak pretraining learning rate (default 1.5e-3)
  --seed N              seed for init, shuffling, masks, noise (default 0)
  --out DIR             run folder (default runs/demo)
  --quiet          no per-step lines
  -h, --help       this text
`

async function demo(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      'tokenizer-steps': { type: 'string', default: '300' },
      steps: { type: 'string', default: '150' },
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
  const tokenizerSteps = positiveInt('--tokenizer-steps', values['tokenizer-steps'])
  const steps = positiveInt('--steps', values.steps)
  const batchSize = positiveInt('--batch-size', values['batch-size'])
  const seed = nonNegativeInt('--seed', values.seed)
  const lr = Number(values.lr)
  if (!(lr > 0)) throw new UsageError(`--lr must be a number > 0, got ${values.lr}`)

  const images = await loadFashionMnist({ split: 'train' })
  const heldOut = await loadFashionMnist({ split: 'test' })
  await mkdir(values.out, { recursive: true })
  const log = (line: string) => {
    if (!values.quiet) console.log(line)
  }

  const tokenizer = Dvae.create({ preset: 'tiny', numChannels: 1 }, { seed, emaDecay: 0 })
  console.log(
    `1/2 tokenizer: dVAE (${tokenizer.numParameters.toLocaleString()} parameters, ${tokenizer.config.vocabSize} tokens, 28 px -> 7x7), ` +
      `${tokenizerSteps} steps x 32 of ${images.count} Fashion-MNIST images (bundled sample)`,
  )
  const tokenizerStarted = performance.now()
  const { evaluation } = await trainTokenizer({
    tokenizer,
    data: images,
    evalData: heldOut,
    steps: tokenizerSteps,
    batchSize: 32,
    seed,
    lr: cosineRamp({ from: 2e-3, to: 2e-5, steps: tokenizerSteps }),
    outDir: join(values.out, 'tokenizer'),
    onProgress: (p) => {
      if (p.step % 25 === 0 || p.step === tokenizerSteps - 1) {
        log(
          `tokenizer step ${String(p.step + 1).padStart(5)}/${tokenizerSteps}  loss ${p.loss.toFixed(4)}  recon ${p.reconLoss.toFixed(4)}  ` +
            `kl ${p.kl.toFixed(3)}  temp ${p.temperature.toFixed(3)}  perplexity ${p.perplexity.toFixed(1)}  ${p.imagesPerSecond.toFixed(0)} img/s`,
        )
      }
    },
  })
  const tokenizerSeconds = (performance.now() - tokenizerStarted) / 1000

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
      vocabSize: tokenizer.config.vocabSize,
    },
    { seed },
  )
  const masking = new BlockwiseMaskGenerator({ height: 7, width: 7, numMaskingPatches: 20, minNumPatches: 4, seed })
  console.log(
    `2/2 pretraining: BEiT (${model.numParameters.toLocaleString()} parameters, 7x7 patches of 4 px), ${steps} steps x ${batchSize}, ` +
      `blockwise masks of 20/49 patches, targets from the tokenizer`,
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
      if (p.step % 10 === 0 || p.step === steps - 1) {
        log(
          `pretrain step ${String(p.step + 1).padStart(5)}/${steps}  loss ${p.loss.toFixed(4)}  mlm_acc ${p.mlmAcc.toFixed(3)}  ` +
            `lr ${p.lr.toExponential(2)}  grad_norm ${p.gradNorm.toFixed(3)}  ${p.imagesPerSecond.toFixed(0)} img/s`,
        )
      }
    },
  })
  const seconds = (performance.now() - started) / 1000
  const checkpoint = join(values.out, 'model.safetensors')
  await model.save(checkpoint)
  const window = Math.min(10, history.length)
  const avg = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length
  const first = history.slice(0, window)
  const last = history.slice(-window)
  console.log('')
  console.log(`| tokenizer (${heldOut.count} held-out images) | value |`)
  console.log('|---|---|')
  console.log(`| reconstruction MSE | ${evaluation.reconstructionMse.toFixed(4)} |`)
  console.log(`| mean-image baseline MSE | ${evaluation.meanImageMse.toFixed(4)} |`)
  console.log(`| codebook perplexity | ${evaluation.perplexity.toFixed(1)} |`)
  console.log(`| codes used | ${(evaluation.codesUsedFraction * 100).toFixed(1)}% of ${tokenizer.config.vocabSize} |`)
  console.log(`| wall time | ${tokenizerSeconds.toFixed(1)} s |`)
  console.log('')
  console.log(`| pretraining (mean of ${window} steps) | first | last |`)
  console.log('|---|---|---|')
  console.log(`| MIM loss | ${avg(first.map((h) => h.loss)).toFixed(4)} | ${avg(last.map((h) => h.loss)).toFixed(4)} |`)
  console.log(`| MIM accuracy | ${avg(first.map((h) => h.mlmAcc)).toFixed(3)} | ${avg(last.map((h) => h.mlmAcc)).toFixed(3)} |`)
  console.log(`| wall time | ${seconds.toFixed(1)} s (${((steps * batchSize) / seconds).toFixed(0)} img/s) | |`)
  console.log('')
  console.log(`run folder ${values.out}: tokenizer/ (checkpoint, metrics.jsonl, reconstructions.png), model.safetensors`)
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
