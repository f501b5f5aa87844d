import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import test from 'ava'

import {
  Beit,
  Classifier,
  exportHuggingFace,
  fashionScenes,
  finetuneSegmentation,
  huggingFaceTask,
  importHuggingFace,
  loadFashionMnist,
  Segmenter,
  SegmentationLoader,
  SegmentationMetrics,
  segmenterView,
} from '../src'
import type { ModelSpec } from '../src'

/** 4 blocks of width 16 on 16 px single-channel images, 4 px patches (a 4x4 grid). */
const MODEL: ModelSpec = {
  preset: 'mini',
  imageSize: [16, 16],
  patchSize: 4,
  numChannels: 1,
  hiddenSize: 16,
  numHiddenLayers: 4,
  numAttentionHeads: 2,
  intermediateSize: 32,
  vocabSize: 64,
  dropPathRate: 0,
}

/** Pixels N(0,1)-ish from a seed; the mask is 1 where the pixel is positive, 0 elsewhere, and
 * 255 (ignored) on the first row. */
function toyBatch(images: number, seed: number): { pixels: Float32Array; masks: Uint8Array } {
  let state = seed >>> 0 || 1
  const next = () => {
    state ^= state << 13
    state ^= state >>> 17
    state ^= state << 5
    return ((state >>> 0) / 2 ** 32) * 2 - 1
  }
  const pixels = new Float32Array(images * 256).map(() => next())
  const masks = Uint8Array.from(pixels, (v, i) => (i % 256 < 16 ? 255 : v > 0 ? 1 : 0))
  return { pixels, masks }
}

function tempDir(t: { teardown: (f: () => void) => void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'beit-seg-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

test('the spec fills in transformers defaults, and bad fields are named', (t) => {
  const seg = Segmenter.create({ model: MODEL, numLabels: 2, auxiliaryChannels: 8 })
  t.deepEqual(seg.config.outIndices, [1, 2, 3, 4])
  t.deepEqual(seg.config.poolScales, [1, 2, 3, 6])
  t.is(seg.config.auxiliaryChannels, 8)
  t.is(seg.config.semanticLossIgnoreIndex, 255)
  t.true(seg.numParameters > 0)
  t.throws(() => Segmenter.create({ model: MODEL, numLabels: 2, outIndicies: [1, 2, 3, 4] } as never), {
    message: /outIndicies/,
  })
  t.throws(() => Segmenter.create({ model: MODEL, numLabels: 2, outIndices: [1, 2, 3, 9] }), {
    message: /outIndices \[1, 2, 3, 9\]: 9 is out of range, expected values in 1..=4/,
  })
  t.throws(() => Segmenter.create({ model: { ...MODEL, imageSize: [12, 16] }, numLabels: 2 }), {
    message: /the patch grid 3x4 \(imageSize \/ patchSize\) must be even in both directions/,
  })
  t.throws(() => Segmenter.create({ model: MODEL, numLabels: 300, semanticLossIgnoreIndex: 1000 }), {
    message: /masks are 8-bit: numLabels must be at most 255/,
  })
})

test('a segmenter learns a per-pixel rule, and the metrics score it', async (t) => {
  const seg = Segmenter.create(
    { model: MODEL, numLabels: 2, outIndices: [1, 2, 3, 4], auxiliaryChannels: 8 },
    { seed: 1 },
  )
  const first = await seg.trainStep({ ...toyBatch(4, 1), lr: 3e-3 })
  t.is(first.labelledPixels, 4 * 240)
  let last = first
  for (let step = 1; step < 60; step++) last = await seg.trainStep({ ...toyBatch(4, 1 + step), lr: 3e-3, seed: step })
  t.true(last.loss < 0.5 * first.loss, `loss ${first.loss} -> ${last.loss}`)
  const heldOut = toyBatch(8, 999)
  const predicted = await seg.predict(heldOut.pixels)
  t.is(predicted.length, 8 * 256)
  const metrics = new SegmentationMetrics({ numLabels: 2 })
  metrics.add(predicted, heldOut.masks)
  const scores = metrics.scores()
  t.true(scores.overallAccuracy > 0.75, `pixel accuracy ${scores.overallAccuracy}`)
  const logits = await seg.logits(heldOut.pixels)
  t.deepEqual(logits.shape, [8, 2, 16, 16])
})

test('save, load and the transformers folder keep the weights, the BatchNorm statistics and the class names', async (t) => {
  const dir = tempDir(t)
  const classNames = ['sky', 'road', 'car']
  const spec = { model: MODEL, numLabels: 3, auxiliaryChannels: 8, classNames }
  const seg = Segmenter.create(spec, { training: { layerDecay: 0.65 } })
  const batch = toyBatch(2, 7)
  await seg.lossAndGrads(batch)
  t.true(seg.pendingLossTerms > 0)
  await seg.applyUpdate(1e-3)
  seg.trainState = { epoch: 1 }
  await seg.save(join(dir, 'seg.safetensors'))
  const loaded = await Segmenter.load(join(dir, 'seg.safetensors'))
  t.deepEqual(loaded.trainState, { epoch: 1 })
  t.deepEqual(loaded.training, { layerDecay: 0.65 })
  t.is(loaded.step, 1)
  t.deepEqual(await loaded.predict(batch.pixels), await seg.predict(batch.pixels))
  await seg.exportHuggingFace(join(dir, 'hf'))
  const imported = await Segmenter.fromHuggingFace(join(dir, 'hf'))
  t.deepEqual(imported.config, seg.config)
  t.deepEqual(imported.config.classNames, classNames)
  const hfConfig = JSON.parse(readFileSync(join(dir, 'hf', 'config.json'), 'utf8'))
  t.deepEqual(hfConfig.id2label, { 0: 'sky', 1: 'road', 2: 'car' })
  t.throws(() => Segmenter.create({ ...spec, classNames: ['sky', 'sky', 'car'] }), {
    message: /classNames: "sky" is empty or named twice/,
  })
  t.deepEqual((await imported.logits(batch.pixels)).values, (await seg.logits(batch.pixels)).values)
  // The same through the file-level functions (beit export / beit import).
  t.true((await exportHuggingFace(join(dir, 'seg.safetensors'), join(dir, 'hf2'))) instanceof Segmenter)
  t.is(await huggingFaceTask(join(dir, 'hf2')), 'segmenter')
  const reimported = await importHuggingFace(join(dir, 'hf2'), join(dir, 'reimported.safetensors'))
  if (!(reimported instanceof Segmenter)) return t.fail(`imported as ${reimported.constructor.name}`)
  t.deepEqual((await reimported.logits(batch.pixels)).values, (await seg.logits(batch.pixels)).values)
  await t.throwsAsync(importHuggingFace(join(dir, 'hf2'), join(dir, 'x.safetensors'), { numLabels: 3 }), {
    message: /numLabels 3 is for a classifier, but .*hf2 is imported as a BeitForSemanticSegmentation/,
  })
})

test('fine-tuning starts from a pretrained MIM checkpoint at another image size', async (t) => {
  const dir = tempDir(t)
  const mim = Beit.create(MODEL)
  await mim.save(join(dir, 'mim.safetensors'))
  const seg = await Segmenter.fromPretrained(
    join(dir, 'mim.safetensors'),
    { model: { ...MODEL, imageSize: [24, 32] }, numLabels: 2, auxiliaryChannels: 8 },
    { seed: 3 },
  )
  t.deepEqual(seg.config.model.imageSize, [24, 32])
  const { pixels } = toyBatch(3, 5)
  t.is((await seg.predict(pixels.subarray(0, 24 * 32))).length, 24 * 32)
  // The grid the tables are resized from is the checkpoint's: another patch size is refused.
  await t.throwsAsync(
    Segmenter.fromPretrained(join(dir, 'mim.safetensors'), {
      model: { ...MODEL, imageSize: [32, 32], patchSize: 8 },
      numLabels: 2,
      auxiliaryChannels: 8,
    }),
    { message: /the checkpoint's backbone has patchSize 4, the segmenter's model asks for 8/ },
  )
  // A classifier's backbone, its config read from the checkpoint when no model is given; a
  // file of another kind is named with both formats expected.
  const classifier = Classifier.create({ model: { ...MODEL, hiddenSize: 24 }, numLabels: 3 })
  await classifier.save(join(dir, 'cls.safetensors'))
  const fromClassifier = await Segmenter.fromPretrained(join(dir, 'cls.safetensors'), {
    numLabels: 2,
    auxiliaryChannels: 8,
  })
  t.is(fromClassifier.config.model.hiddenSize, 24)
  await fromClassifier.save(join(dir, 'seg.safetensors'))
  await t.throwsAsync(Segmenter.fromPretrained(join(dir, 'seg.safetensors'), { numLabels: 2 }), {
    message:
      /seg\.safetensors: format "beit-seg\/1" is not a beit MIM \("beit-mim\/1"\) or classifier \("beit-cls\/1"\) checkpoint/,
  })
})

test('segment refuses sizes the native layer would misread and pixels that are not finite', async (t) => {
  const seg = Segmenter.create({ model: MODEL, numLabels: 2, auxiliaryChannels: 8 })
  const { pixels } = toyBatch(1, 3)
  await t.throwsAsync(async () => seg.segment(pixels, { size: [16, 16], outputSize: [-1, -1] }), {
    message: 'outputSize must be [height, width] of positive integers, got [-1,-1]',
  })
  await t.throwsAsync(async () => seg.segment(pixels, { size: [16, 16], stride: [1.5, 2] }), {
    message: /^stride must be/,
  })
  await t.throwsAsync(async () => seg.segment(pixels, { size: [16, 16], outputSize: [60000, 60000] }), {
    message: /outputSize \[60000, 60000\] x 2 classes exceeds/,
  })
  await t.throwsAsync(async () => seg.segment(new Float32Array(256).fill(NaN), { size: [16, 16] }), {
    message: /segment: pixel value NaN at index 0 is not finite/,
  })
})

test('masks of the wrong size are refused with both sizes', async (t) => {
  const seg = Segmenter.create({ model: MODEL, numLabels: 2, auxiliaryChannels: 8 })
  const { pixels, masks } = toyBatch(2, 3)
  await t.throwsAsync(seg.lossAndGrads({ pixels, masks: masks.subarray(1) }), {
    message: /labels have 511 values, expected 2 x 16 x 16 = 512/,
  })
  await t.throwsAsync(seg.lossAndGrads({ pixels, masks: Uint8Array.from(masks, () => 7) }), {
    message: /label 7 is not a class id \(numLabels 2\)/,
  })
})

test('Fashion-MNIST scenes: garments pasted without overlap, labelled class + 1 where they are foreground', async (t) => {
  const source = await loadFashionMnist({ split: 'test' })
  const data = fashionScenes(source, { count: 20, size: [40, 64], seed: 4 })
  const again = fashionScenes(source, { count: 20, size: [40, 64], seed: 4 })
  t.deepEqual(again.source, data.source)
  t.is(data.size, 20)
  if (data.source.kind !== 'pixels') return t.fail('scenes are in memory')
  const scenes = data.source
  t.deepEqual(data.classNames.slice(0, 2), ['background', source.classNames[0]])
  let garments = 0
  for (let i = 0; i < scenes.images.length; i++) {
    const [v, m] = [scenes.images[i], scenes.masks[i]]
    // Foreground pixels are labelled with a garment class, background and halo pixels 0.
    t.is(m > 0, v >= 32, `pixel ${i}: value ${v}, label ${m}`)
    if (m > 10) t.fail(`label ${m} is not a class + 1`)
  }
  for (let s = 0; s < 20; s++) garments += new Set(scenes.masks.subarray(s * 2560, (s + 1) * 2560)).size - 1
  // 40x64 holds at most two 28x28 garments side by side.
  t.true(garments >= 20 && garments <= 40, `${garments} garment classes over 20 scenes`)
  t.throws(() => fashionScenes(source, { count: 1, size: [20, 64] }), { message: /cannot hold a 28x28 garment/ })
})

test('finetuneSegmentation: an update without a labelled pixel changes no weight, and the run goes on', async (t) => {
  const { pixels, masks } = toyBatch(2, 11)
  masks.fill(255, 0, 256) // scene 0 is all ignored: with batch 1, one of the epoch's two steps
  const images = Uint8Array.from(pixels, (v) => Math.round((v + 1) * 127.5))
  const data = {
    name: 'toy',
    size: 2,
    source: { kind: 'pixels' as const, images, masks, height: 16, width: 16, channels: 1 as const },
    classNames: ['off', 'on'],
    reduceZeroLabel: false,
  }
  const steps: { loss: number; gradNorm: number; labelledPixels: number }[] = []
  const result = await finetuneSegmentation({
    segmenter: Segmenter.create({ model: MODEL, numLabels: 2, auxiliaryChannels: 8 }, { seed: 4 }),
    train: data,
    test: data,
    batchSize: 1,
    epochs: 1,
    transform: 'eval',
    schedule: { lr: 1e-3, warmupSteps: 0 },
    sheetImages: 0,
    outDir: tempDir(t),
    onProgress: (p) => steps.push({ loss: p.loss, gradNorm: p.gradNorm, labelledPixels: p.labelledPixels }),
  })
  t.is(result.status, 'completed')
  const [skipped, taken] = steps[0].labelledPixels === 0 ? steps : [steps[1], steps[0]]
  t.deepEqual(skipped, { loss: NaN, gradNorm: 0, labelledPixels: 0 })
  t.true(taken.labelledPixels > 0 && taken.gradNorm > 0 && Number.isFinite(taken.loss))
  t.is(result.evals[0].trainLoss, taken.loss) // the epoch's mean leaves the unlabelled step out
})

test('finetuneSegmentation: a run folder with mIoU, and an interrupted run resumes to the same model', async (t) => {
  const source = await loadFashionMnist({ split: 'train' })
  const train = fashionScenes(source, { count: 32, size: [32, 32], seed: 1 })
  const testSet = fashionScenes(await loadFashionMnist({ split: 'test' }), { count: 8, size: [32, 32], seed: 2 })
  const model: ModelSpec = { ...MODEL, imageSize: [32, 32] }
  const spec = { model, numLabels: 11, auxiliaryChannels: 8 }
  const options = {
    train,
    test: testSet,
    batchSize: 8,
    steps: 6,
    schedule: { lr: 2e-3, warmupSteps: 1 },
    seed: 5,
    transform: { ratioRange: [0.75, 1.5] as [number, number] }, // mmseg's recipe otherwise
  }
  const whole = Segmenter.create(spec, { seed: 9 })
  const dir = tempDir(t)
  const done = await finetuneSegmentation({ ...options, segmenter: whole, outDir: join(dir, 'whole') })
  t.is(done.status, 'completed')
  t.is(done.evals.length, 2) // after epoch 0 (4 steps) and after the last step
  t.true(done.evals[1].meanIou >= 0 && done.evals[1].meanIou <= 1)
  t.is(done.evals[1].perClassIou.length, 11)
  const records = readFileSync(join(dir, 'whole', 'metrics.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l))
  t.is(records.filter((r) => r.loss !== undefined).length, 6)
  t.true(records.some((r) => typeof r.evalMeanIou === 'number'))
  // predictions.png: 8 rows of image | truth | prediction, 32 px scaled 4x, 2 px gaps.
  const sheet = readFileSync(join(dir, 'whole', 'predictions.png'))
  t.deepEqual([sheet.readUInt32BE(16), sheet.readUInt32BE(20)], [3 * 130 + 2, 8 * 130 + 2])

  const parted = Segmenter.create(spec, { seed: 9 })
  const abort = new AbortController()
  const first = await finetuneSegmentation({
    ...options,
    segmenter: parted,
    outDir: join(dir, 'parted'),
    signal: abort.signal,
    onProgress: (p) => p.step === 4 && abort.abort(),
  })
  t.is(first.status, 'interrupted')
  const resumed = await Segmenter.load(join(dir, 'parted', 'checkpoint.safetensors'))
  t.is(resumed.step, 5) // inside epoch 1, after epoch 0's evaluation
  const rest = await finetuneSegmentation({ ...options, segmenter: resumed, outDir: join(dir, 'parted') })
  t.is(rest.status, 'completed')
  const loader = new SegmentationLoader({
    data: testSet,
    view: segmenterView([32, 32], 1),
    transform: 'eval',
    numLabels: 11,
    batchSize: 3,
    shuffle: false,
  })
  const { value: probe } = await loader.epoch(0).next()
  if (!probe) return t.fail('no batch')
  t.deepEqual((await resumed.logits(probe.pixels)).values, (await whole.logits(probe.pixels)).values)
  // Epoch 0's scores come back from the checkpoint's JSON with their NaNs (classes absent from
  // the 8 test scenes), not as nulls.
  t.true(done.evals[0].perClassAccuracy.some(Number.isNaN))
  t.deepEqual(rest.evals, done.evals)
  // Bad sheetImages are refused before any step, not after the first epoch.
  await t.throwsAsync(
    finetuneSegmentation({ ...options, segmenter: whole, sheetImages: 2.5, outDir: join(dir, 'sheet') }),
    { message: 'sheetImages must be an integer >= 0 (0: no predictions.png), got 2.5' },
  )
})
