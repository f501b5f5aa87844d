#!/usr/bin/env node
/**
 * The `beit` command. `beit demo`: train a small dVAE tokenizer, then pretrain a small BEiT on
 * its tokens, both on the bundled Fashion-MNIST sample.
 */
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { parseArgs } from 'node:util'

import { existsSync } from 'node:fs'

import { DEBIAN_FASHION_MNIST_DIR, embeddedSampleDir, loadFashionMnist } from './data/fashion-mnist'
import { LabeledImages } from './data/idx'
import { BlockwiseMaskGenerator } from './masking'
import { Beit } from './model'
import { pretrain } from './pretrain'
import { cosineRamp, warmupCosine } from './schedule'
import { DVAE_PRESETS, Dvae, DvaePresetName } from './tokenizer'
import { TokenizerEvaluation, TokenizerProgress, trainTokenizer } from './train-tokenizer'

const USAGE = `usage: beit <command> [options]

commands:
  demo     train a small dVAE tokenizer, then MIM-pretrain a small BEiT on its tokens,
           on the bundled Fashion-MNIST sample

  tokenizer  train a dVAE tokenizer on Fashion-MNIST (the bundled sample or the full set)

tokenizer options:
  --data SRC            sample (bundled, default), fashion-mnist (the Debian package
                        dataset-fashion-mnist), or a folder with the four IDX files
  --preset NAME         tiny, small (default) or dall-e; grayscale input
  --vocab-size N        codebook size (default: the preset's)
  --steps N             training steps (default 1000)
  --batch-size N        images per step (default 32)
  --lr X                peak learning rate, cosine to 1/100 of it (default 2e-3)
  --kl-weight X         final KL weight, reached half way (default 6.6, DALL-E's)
  --ema X               EMA decay of the weights, 0 = off (default 0)
  --seed N, --out DIR (default runs/tokenizer), --quiet

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
  const lr = positiveNumber('--lr', values.lr)

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
    onProgress: tokenizerProgressPrinter(tokenizerSteps, values.quiet),
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
  printTokenizerEvaluation(evaluation, heldOut, tokenizer, tokenizerSeconds)
  console.log('')
  console.log(`| pretraining (mean of ${window} steps) | first | last |`)
  console.log('|---|---|---|')
  console.log(`| MIM loss | ${avg(first.map((h) => h.loss)).toFixed(4)} | ${avg(last.map((h) => h.loss)).toFixed(4)} |`)
  console.log(`| MIM accuracy | ${avg(first.map((h) => h.mlmAcc)).toFixed(3)} | ${avg(last.map((h) => h.mlmAcc)).toFixed(3)} |`)
  console.log(`| most-frequent-token baseline | ${avg(first.map((h) => h.majorityBaseline)).toFixed(3)} | ${avg(last.map((h) => h.majorityBaseline)).toFixed(3)} |`)
  console.log(`| wall time | ${seconds.toFixed(1)} s (${((steps * batchSize) / seconds).toFixed(0)} img/s) | |`)
  console.log('')
  console.log(`run folder ${values.out}: tokenizer/ (checkpoint, metrics.jsonl, reconstructions.png), model.safetensors`)
}

async function tokenizerCommand(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      data: { type: 'string', default: 'sample' },
      preset: { type: 'string', default: 'small' },
      'vocab-size': { type: 'string' },
      steps: { type: 'string', default: '1000' },
      'batch-size': { type: 'string', default: '32' },
      lr: { type: 'string', default: '2e-3' },
      'kl-weight': { type: 'string', default: '6.6' },
      ema: { type: 'string', default: '0' },
      seed: { type: 'string', default: '0' },
      out: { type: 'string', default: join('runs', 'tokenizer') },
      quiet: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  })
  if (values.help) {
    process.stdout.write(USAGE)
    return
  }
  const preset = values.preset as DvaePresetName
  if (!(preset in DVAE_PRESETS)) throw new UsageError(`--preset must be one of ${Object.keys(DVAE_PRESETS).join(', ')}, got ${values.preset}`)
  const steps = positiveInt('--steps', values.steps)
  const batchSize = positiveInt('--batch-size', values['batch-size'])
  const seed = nonNegativeInt('--seed', values.seed)
  const lr = positiveNumber('--lr', values.lr)
  const klWeight = Number(values['kl-weight'])
  if (!(klWeight >= 0)) throw new UsageError(`--kl-weight must be a number >= 0, got ${values['kl-weight']}`)
  const emaDecay = Number(values.ema)
  if (!(emaDecay >= 0 && emaDecay < 1)) throw new UsageError(`--ema must be in [0, 1), got ${values.ema}`)
  const vocab = values['vocab-size'] === undefined ? {} : { vocabSize: positiveInt('--vocab-size', values['vocab-size']) }

  const dir = fashionMnistDir(values.data)
  const [train, test] = [await loadFashionMnist({ split: 'train', dir }), await loadFashionMnist({ split: 'test', dir })]
  const tokenizer = Dvae.create({ preset, numChannels: 1, ...vocab }, { seed, emaDecay })
  console.log(
    `dVAE ${preset} (${tokenizer.numParameters.toLocaleString()} parameters, ${tokenizer.config.vocabSize} tokens, 28 px -> ${28 / tokenizer.downsample}x${28 / tokenizer.downsample}) ` +
      `on ${train.count} images from ${dir}, ${steps} steps x ${batchSize}`,
  )
  const started = performance.now()
  const { evaluation } = await trainTokenizer({
    tokenizer,
    data: train,
    evalData: test,
    steps,
    batchSize,
    seed,
    lr: cosineRamp({ from: lr, to: lr / 100, steps }),
    klWeight: cosineRamp({ from: 0, to: klWeight, steps: Math.ceil(steps / 2) }),
    outDir: values.out,
    onProgress: tokenizerProgressPrinter(steps, values.quiet),
  })
  printTokenizerEvaluation(evaluation, test, tokenizer, (performance.now() - started) / 1000)
  console.log(`run folder ${values.out}: tokenizer.safetensors, metrics.jsonl, reconstructions.png, evaluation.json`)
}

/** `sample`, `fashion-mnist` (the Debian package's location) or a folder of IDX files. */
function fashionMnistDir(source: string): string {
  if (source === 'sample') return embeddedSampleDir()
  if (source === 'fashion-mnist') {
    if (!existsSync(DEBIAN_FASHION_MNIST_DIR)) {
      throw new UsageError(`--data fashion-mnist: ${DEBIAN_FASHION_MNIST_DIR} does not exist; install it with: apt-get install dataset-fashion-mnist`)
    }
    return DEBIAN_FASHION_MNIST_DIR
  }
  if (!existsSync(source)) throw new UsageError(`--data: no such folder ${source} (expected sample, fashion-mnist or a folder of IDX files)`)
  return source
}

function tokenizerProgressPrinter(steps: number, quiet: boolean): (p: TokenizerProgress) => void {
  return (p) => {
    if (quiet || (p.step % 25 !== 0 && p.step !== steps - 1)) return
    console.log(
      `tokenizer step ${String(p.step + 1).padStart(5)}/${steps}  loss ${p.loss.toFixed(4)}  recon ${p.reconLoss.toFixed(4)}  ` +
        `kl ${p.kl.toFixed(3)}  temp ${p.temperature.toFixed(3)}  perplexity ${p.perplexity.toFixed(1)}  ${p.imagesPerSecond.toFixed(0)} img/s`,
    )
  }
}

function printTokenizerEvaluation(e: TokenizerEvaluation, heldOut: LabeledImages, tokenizer: Dvae, seconds: number): void {
  console.log('')
  console.log(`| tokenizer (${Math.min(1000, heldOut.count)} held-out images) | value |`)
  console.log('|---|---|')
  console.log(`| reconstruction MSE | ${e.reconstructionMse.toFixed(4)} |`)
  console.log(`| mean-image baseline MSE | ${e.meanImageMse.toFixed(4)} |`)
  console.log(`| codebook perplexity | ${e.perplexity.toFixed(1)} |`)
  console.log(`| codes used | ${(e.codesUsedFraction * 100).toFixed(1)}% of ${tokenizer.config.vocabSize} |`)
  console.log(`| wall time | ${seconds.toFixed(1)} s |`)
}

class UsageError extends Error {}

function positiveInt(flag: string, value: string | undefined): number {
  const n = Number(value)
  if (!Number.isInteger(n) || n <= 0) throw new UsageError(`${flag} must be a positive integer, got ${value}`)
  return n
}

function positiveNumber(flag: string, value: string | undefined): number {
  const n = Number(value)
  if (!(n > 0 && Number.isFinite(n))) throw new UsageError(`${flag} must be a number > 0, got ${value}`)
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
    case 'tokenizer':
      return tokenizerCommand(rest)
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
