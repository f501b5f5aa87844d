#!/usr/bin/env node
// Does pretraining help segmentation? Fashion-MNIST scenes (64x64, 1-3 garments) from the bundled
// sample. The tokenizer (on the scenes at 32x32) and a 5-block BEiT (8 px patches: an 8x8 grid)
// pretrain without labels on 5,000 training scenes; then a segmenter is fine-tuned on a few
// labelled scenes at the pretraining's own size and grid (no position-table resize), from the
// pretrained backbone and from scratch at an equal budget, and both are scored (mIoU, pixel
// accuracy) on 500 test scenes built from the test split. The features are the hidden states after
// blocks 1-4 (outIndices [2, 3, 4, 5]): the fifth block, which MIM's head reads, is not run.
// Masking is random by default: a garment spans about 12 of the 64 patches, and BEiT's blockwise
// masks (blocks of 4 to 26 patches) often hide all of it, leaving nothing of it to infer from.
//   npm run build:ts && node scripts/proof-segmentation.js [--seed 0] [--out runs/proof-seg]
//     [--labelled 50] [--tokenizer-steps 200] [--tokenizer-size 32|64] [--pretrain-epochs 30]
//     [--finetune-epochs 30] [--masking random|blockwise]
//     [--lr 3e-4] [--scratch-lr <the from-scratch run's, default --lr>] [--precision f32|bf16]
// Prints one JSON line per seed at the end; the run folders hold metrics, curves and
// predictions.png.
'use strict'
const { join } = require('node:path')
const { parseArgs } = require('node:util')

const beit = require('../dist')
const { pixelDataset } = require('../dist/data/dataset')

const { values } = parseArgs({
  options: {
    seed: { type: 'string', default: '0' },
    out: { type: 'string', default: join('runs', 'proof-seg') },
    labelled: { type: 'string', default: '50' },
    'tokenizer-steps': { type: 'string', default: '200' },
    'tokenizer-size': { type: 'string', default: '32' },
    'pretrain-epochs': { type: 'string', default: '30' },
    'finetune-epochs': { type: 'string', default: '30' },
    masking: { type: 'string', default: 'random' },
    lr: { type: 'string', default: '3e-4' },
    'scratch-lr': { type: 'string' },
    precision: { type: 'string', default: 'f32' },
  },
})
const seed = Number(values.seed)
// Every model of the run (tokenizer, MIM model, both segmenters) at this precision.
const precision = beit.resolvePrecision(values.precision, 'cpu')
const out = join(values.out, `seed-${seed}`)
const SIZE = [64, 64]
const MODEL = { preset: 'mini', imageSize: SIZE, patchSize: 8, numChannels: 1, numHiddenLayers: 5, dropPathRate: 0.05 }

// BEiT's 40% of the patches (26 of 64), at random or in blocks of 4 or more.
function maskGenerator(kind, height, width) {
  if (kind === 'random') return new beit.RandomMaskGenerator({ height, width, maskRatio: 0.4, seed })
  if (kind === 'blockwise') {
    const numMaskingPatches = Math.round(0.4 * height * width)
    return new beit.BlockwiseMaskGenerator({ height, width, numMaskingPatches, minNumPatches: 4, seed })
  }
  throw new Error(`--masking must be random or blockwise, got ${kind}`)
}

async function main() {
  const started = performance.now()
  const lap = (what) => console.log(`${what}: ${((performance.now() - started) / 1000).toFixed(0)} s`)
  const trainSource = await beit.loadFashionMnist({ split: 'train' })
  const scenes = (source, count, salt) => beit.fashionScenes(source, { count, size: SIZE, seed: seed * 10 + salt })
  const unlabelled = scenes(trainSource, 5000, 1)
  const labelled = scenes(trainSource, Number(values.labelled), 2)
  const test = scenes(await beit.loadFashionMnist({ split: 'test' }), 500, 3)
  const { images, height, width } = unlabelled.source
  const data = pixelDataset(
    {
      images,
      labels: new Uint8Array(unlabelled.size),
      count: unlabelled.size,
      height,
      width,
      channels: 1,
      classNames: [],
    },
    'unlabelled scenes',
  )

  // 32 px: three groups (downsampling 4); 64 px: the scenes at full size, four groups (8).
  const tokenizerSize = Number(values['tokenizer-size'])
  if (tokenizerSize !== 32 && tokenizerSize !== 64)
    throw new Error(`--tokenizer-size must be 32 or 64, got ${values['tokenizer-size']}`)
  const tokenizer = beit.Dvae.create(
    {
      preset: 'tiny',
      numChannels: 1,
      imageSize: [tokenizerSize, tokenizerSize],
      numGroups: Math.log2(tokenizerSize / 8) + 1,
    },
    { seed, emaDecay: 0, precision },
  )
  await beit.trainTokenizer({
    tokenizer,
    data,
    batchSize: 32,
    steps: Number(values['tokenizer-steps']),
    outDir: join(out, 'tokenizer'),
    seed,
    schedule: { lr: 2e-3, warmupSteps: 0 },
    klWeight: 6.6,
    evalImages: 200,
  })
  lap('tokenizer')
  const model = beit.Beit.create({ ...MODEL, vocabSize: tokenizer.config.vocabSize }, { seed, precision })
  const [gridHeight, gridWidth] = model.grid
  const masking = maskGenerator(values.masking, gridHeight, gridWidth)
  const accuracy = []
  await beit.pretrain({
    model,
    tokenizer,
    data,
    masking,
    batchSize: 64,
    epochs: Number(values['pretrain-epochs']),
    schedule: { lr: 1.5e-3 },
    transform: { kind: 'train', scale: [0.5, 1], colorJitter: null },
    seed,
    outDir: join(out, 'pretrain'),
    onProgress: (p) => accuracy.push(p.mlmAcc),
  })
  const mlmAccuracy = accuracy.slice(-20).reduce((a, b) => a + b, 0) / Math.min(20, accuracy.length)
  lap(`pretraining (MIM accuracy, last 20 steps: ${mlmAccuracy.toFixed(3)})`)

  const segmentation = { model: MODEL, numLabels: 11, auxiliaryChannels: 32, outIndices: [2, 3, 4, 5] }
  const finetune = (segmenter, name, lr) =>
    beit.finetuneSegmentation({
      segmenter,
      train: labelled,
      test,
      batchSize: 16,
      epochs: Number(values['finetune-epochs']),
      evalEvery: 10,
      schedule: { lr },
      transform: { ratioRange: [1, 1], catMaxRatio: 1, photometric: false }, // scenes: a joint flip
      seed,
      outDir: join(out, name),
      onEpoch: (e) => console.log(`${name} epoch ${e.epoch + 1}: mIoU ${(100 * e.meanIou).toFixed(1)}%`),
    })
  const checkpoint = join(out, 'pretrain', 'checkpoint.safetensors')
  const pretrained = await finetune(
    await beit.Segmenter.fromPretrained(checkpoint, segmentation, { seed, training: { layerDecay: 0.75 }, precision }),
    'finetune-pretrained',
    Number(values.lr),
  )
  lap('fine-tuning from the pretrained backbone')
  const scratchLr = Number(values['scratch-lr'] ?? values.lr)
  const scratch = await finetune(
    beit.Segmenter.create(segmentation, { seed, precision }),
    'finetune-scratch',
    scratchLr,
  )
  lap('fine-tuning from scratch')
  const last = (r) => r.evals[r.evals.length - 1]
  const scores = (r) => ({ meanIou: last(r).meanIou, pixelAccuracy: last(r).overallAccuracy })
  console.log(
    JSON.stringify({ seed, precision, mlmAccuracy, pretrained: scores(pretrained), scratch: scores(scratch) }),
  )
}

main().catch((e) => {
  console.error(e)
  process.exitCode = 1
})
