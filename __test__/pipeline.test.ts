import test from 'ava'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import {
  Beit,
  BlockwiseMaskGenerator,
  Classifier,
  Dvae,
  finetune,
  linearProbe,
  openDataset,
  pixelProbe,
  pretrain,
  RandomMaskGenerator,
  withClassesOf,
} from '../src'
import type { ImageDataset, ModelSpec } from '../src'
import { TINY_MODEL } from './fixtures/tiny-model'

const MODEL = TINY_MODEL

async function tempDir(t: { teardown: (fn: () => Promise<void>) => void }): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'beit-pipeline-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  return dir
}

function subset(data: ImageDataset, n: number): ImageDataset {
  return { ...data, size: n, labels: data.labels.subarray(0, n) }
}

/** Predictions of a fixed batch: equal predictions mean equal weights for this purpose. */
async function fingerprint(model: Beit, data: ImageDataset): Promise<Float32Array> {
  const pixels = new Float32Array(4 * 784)
  if (data.source.kind !== 'pixels') throw new Error('pixel data expected')
  for (let i = 0; i < pixels.length; i++) pixels[i] = data.source.pixels[i] / 127.5 - 1
  const mask = new Uint8Array(4 * 49).map((_, i) => (i % 3 === 0 ? 1 : 0))
  return (await model.forward({ pixels, mask })).logits
}

function maxDiff(a: Float32Array, b: Float32Array): number {
  let m = 0
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]))
  return m
}

test('an interrupted and resumed pretraining run ends with the weights of an uninterrupted one', async (t) => {
  const dir = await tempDir(t)
  const data = subset(await openDataset('sample', 'train'), 320)
  const tokenizer = Dvae.create({ preset: 'tiny', numChannels: 1 }, { seed: 3 })
  const run = (model: Beit, outDir: string, signal?: AbortSignal, onStep?: (step: number) => void) =>
    pretrain({
      model,
      tokenizer,
      data,
      masking: new BlockwiseMaskGenerator({ height: 7, width: 7, numMaskingPatches: 20, minNumPatches: 4, seed: 5 }),
      batchSize: 32,
      steps: 14, // 10 batches per epoch: the run crosses an epoch boundary
      schedule: { lr: 2e-3, warmupSteps: 3 },
      transform: { kind: 'train', scale: [0.35, 1] },
      seed: 7,
      outDir,
      checkpointEvery: 100,
      signal,
      onProgress: (p) => onStep?.(p.step),
    })

  const whole = await run(Beit.create(MODEL, { seed: 1 }), join(dir, 'whole'))
  t.is(whole.status, 'completed')
  t.is(whole.step, 14)

  const controller = new AbortController()
  const first = await run(
    Beit.create(MODEL, { seed: 1 }),
    join(dir, 'split'),
    controller.signal,
    (step) => step === 5 && controller.abort(),
  )
  t.is(first.status, 'interrupted')
  t.is(first.step, 6)
  const resumedModel = await Beit.load(first.checkpoint)
  t.like(resumedModel.trainState, { kind: 'pretrain', step: 6 })
  const second = await run(resumedModel, join(dir, 'split'))
  t.is(second.status, 'completed')

  // Stopped at its last step, the run is complete: nothing of it is left to resume.
  const atEnd = new AbortController()
  const ended = await run(Beit.create(MODEL, { seed: 1 }), join(dir, 'end'), atEnd.signal, (step) => {
    if (step === 13) atEnd.abort()
  })
  t.like(ended, { status: 'completed', step: 14 })

  const a = await fingerprint(await Beit.load(whole.checkpoint), data)
  const b = await fingerprint(await Beit.load(second.checkpoint), data)
  t.true(maxDiff(a, b) < 1e-5, `max logit difference ${maxDiff(a, b)}`)
  const steps = (await readFile(join(dir, 'split', 'metrics.jsonl'), 'utf8'))
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l).step)
  t.deepEqual(steps, [...Array(14).keys()])
  const svg = await readFile(join(dir, 'split', 'curves.svg'), 'utf8')
  t.regex(svg, /^<svg[\s\S]*MIM accuracy[\s\S]*<path d="M/)

  // A run configured differently refuses to resume from this checkpoint.
  const other = await Beit.load(whole.checkpoint)
  await t.throwsAsync(
    pretrain({
      model: other,
      tokenizer,
      data,
      masking: new BlockwiseMaskGenerator({ height: 7, width: 7, numMaskingPatches: 20, seed: 5 }),
      batchSize: 16,
      steps: 14,
      schedule: { lr: 1e-3 },
      seed: 7,
      outDir: join(dir, 'other'),
    }),
    { message: /cannot resume: the run had batchSize 32, now 16/ },
  )
})

test('pretraining refuses a tokenizer whose grid does not match the patch grid', async (t) => {
  const dir = await tempDir(t)
  const data = subset(await openDataset('sample', 'train'), 64)
  const model = Beit.create({ ...(MODEL as object), patchSize: 7 } as ModelSpec)
  const tokenizer = Dvae.create({ preset: 'tiny', numChannels: 1 })
  await t.throwsAsync(
    pretrain({
      model,
      tokenizer,
      data,
      masking: new BlockwiseMaskGenerator({ height: 4, width: 4, numMaskingPatches: 6, seed: 1 }),
      batchSize: 8,
      steps: 1,
      schedule: { lr: 1e-3 },
      outDir: dir,
    }),
    { message: /token grid 7x7 \(28 px \/ 4\) does not match the model's patch grid 4x4 \(28 px \/ 7\)/ },
  )
  // A mask grid of the right size but another shape would be read row-major as scattered strips.
  const base = {
    model: Beit.create(MODEL),
    tokenizer,
    data,
    batchSize: 8,
    steps: 1,
    schedule: { lr: 1e-3 },
    outDir: dir,
  }
  await t.throwsAsync(
    pretrain({
      ...base,
      masking: new RandomMaskGenerator({ height: 1, width: 49, maskRatio: 0.4 }),
    }),
    { message: /mask grid 1x49 does not match the model's patch grid 7x7/ },
  )
  // A custom generator's masks are checked for length.
  const short = { height: 7, width: 7, generate: () => new Uint8Array(48).fill(1), getState: () => 0, setState() {} }
  await t.throwsAsync(pretrain({ ...base, masking: short }), {
    message: /the mask generator gave a mask of 48 values, expected one per patch \(49\)/,
  })
  // An update larger than an epoch would never be taken: refused, as by every loop.
  await t.throwsAsync(
    pretrain({
      model: Beit.create(MODEL),
      tokenizer,
      data,
      masking: new BlockwiseMaskGenerator({ height: 7, width: 7, numMaskingPatches: 10, seed: 1 }),
      batchSize: 16,
      accumulate: 5,
      steps: 1,
      schedule: { lr: 1e-3 },
      outDir: dir,
    }),
    {
      message:
        /an update takes 80 images \(batchSize x accumulate x ranks\), more than an epoch of .* \(64 images\) holds/,
    },
  )
})

test('fine-tuning from a pretrained checkpoint learns, evaluates every epoch and resumes exactly', async (t) => {
  const dir = await tempDir(t)
  const train = subset(await openDataset('sample', 'train'), 960)
  const testSet = subset(await openDataset('sample', 'test'), 200)
  const mim = Beit.create(MODEL, { seed: 2 })
  const mimPath = join(dir, 'mim.safetensors')
  await mim.save(mimPath)
  const options = { training: { labelSmoothing: 0.1, layerDecay: 0.75 }, seed: 4 }
  const make = () => Classifier.fromPretrained(mimPath, { numLabels: 10 }, options)
  const run = (classifier: Classifier, outDir: string, signal?: AbortSignal, onStep?: (s: number) => void) =>
    finetune({
      classifier,
      train,
      test: testSet,
      epochs: 3,
      batchSize: 32,
      schedule: { lr: 2e-3, warmupSteps: 5 },
      seed: 9,
      outDir,
      signal,
      onProgress: (p) => onStep?.(p.step),
    })

  const whole = await run(await make(), join(dir, 'whole'))
  t.is(whole.evals.length, 3)
  // Chance is 10%; the training loss falls.
  t.true(whole.evals[2].evalAccuracy > 0.18, `accuracy after 3 epochs ${whole.evals[2].evalAccuracy}`)
  t.true(whole.evals[2].trainLoss < whole.evals[0].trainLoss)

  t.like(whole, { status: 'completed', step: 90 }) // 30 batches of 32 per epoch

  const controller = new AbortController()
  const first = await run(await make(), join(dir, 'split'), controller.signal, (s) => s === 40 && controller.abort())
  t.like(first, { status: 'interrupted', step: 41 })
  // Stopped right after the last step, before that epoch's evaluation: resuming runs the evaluation.
  const atLast = new AbortController()
  const second = await run(await Classifier.load(first.checkpoint), join(dir, 'split'), atLast.signal, (s) => {
    if (s === 89) atLast.abort()
  })
  t.like(second, { status: 'interrupted', step: 90 })
  t.is(second.evals.length, 2)
  const third = await run(await Classifier.load(second.checkpoint), join(dir, 'split'))
  t.like(third, { status: 'completed', step: 90 })
  t.deepEqual(
    third.evals.map((e) => e.evalAccuracy),
    whole.evals.map((e) => e.evalAccuracy),
  )
  const [a, b] = await Promise.all([Classifier.load(whole.checkpoint), Classifier.load(third.checkpoint)])
  const pixels = new Float32Array(2 * 784).fill(0.25)
  t.true(maxDiff(await a.predict(pixels), await b.predict(pixels)) < 1e-5)
})

test('a linear probe on random features beats chance (10%), and its layer is checked', async (t) => {
  const train = subset(await openDataset('sample', 'train'), 1000)
  const testSet = subset(await openDataset('sample', 'test'), 300)
  const backbone = Beit.create(MODEL, { seed: 3 })
  const result = await linearProbe({ backbone, train, test: testSet, layer: 1, epochs: 10, lr: 1e-2 })
  t.is(result.layer, 1)
  t.true(result.testAccuracy > 0.2, `probe accuracy ${result.testAccuracy}`)
  await t.throwsAsync(linearProbe({ backbone, train, test: testSet, layer: 3 }), {
    message: /layer must be an integer in \[0, 2\], got 3/,
  })
})

test('probes check their data and options before computing features', async (t) => {
  const train = subset(await openDataset('sample', 'train'), 200)
  const testSet = subset(await openDataset('sample', 'test'), 100)
  const options = { train, test: testSet, imageSize: [28, 28] as [number, number], channels: 1 as const, epochs: 2 }
  const unlabelled = { ...testSet, labels: testSet.labels.map((l, i) => (i < 3 ? -1 : l)) }
  await t.throwsAsync(pixelProbe({ ...options, test: unlabelled }), {
    message: /linear probing needs labels, but .* has 3 unlabelled images/,
  })
  await t.throwsAsync(pixelProbe({ ...options, batchSize: 0 }), {
    message: /batchSize must be a positive integer, got 0/,
  })
  await t.throwsAsync(pixelProbe({ ...options, epochs: 1.5 }), {
    message: /epochs must be a positive integer, got 1.5/,
  })
  await t.throwsAsync(pixelProbe({ ...options, seed: -1 }), { message: /seed must be an integer in \[0, 2\^32\)/ })
  // A test split that lacks a class is numbered by the training set's class names: without that,
  // a test image of class 9 would carry label 8 (its index in the shorter list).
  const keep = Array.from(testSet.labels.keys()).filter((i) => testSet.labels[i] !== 8)
  const shorter = {
    ...testSet,
    size: keep.length,
    labels: Int32Array.from(keep, (i) => (testSet.labels[i] === 9 ? 8 : testSet.labels[i])),
    classNames: [...train.classNames.slice(0, 8), train.classNames[9]],
  }
  const aligned = withClassesOf(train, shorter)
  t.deepEqual(aligned.classNames, train.classNames)
  t.deepEqual(
    Array.from(aligned.labels),
    keep.map((i) => testSet.labels[i]),
  )
  t.throws(() => withClassesOf(shorter, train), { message: /has classes that .* lacks \(1\): Bag$/ })
})
