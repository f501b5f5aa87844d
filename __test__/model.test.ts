import test from 'ava'
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { Beit, BeitConfig, Classifier, PRESETS, pretrainedBackbone, resolveConfig } from '../src/index'

const TINY: Partial<BeitConfig> & { preset: 'tiny' } = {
  preset: 'tiny',
  imageSize: [8, 12],
  patchSize: 4,
  numChannels: 1,
  hiddenSize: 16,
  numHiddenLayers: 2,
  numAttentionHeads: 2,
  intermediateSize: 32,
  vocabSize: 10,
  dropPathRate: 0,
}
const N = 6 // 2x3 patches

function batch(b: number, seed = 1) {
  let s = seed
  const rand = () => (s = (s * 1103515245 + 12345) >>> 0) / 2 ** 32
  const pixels = new Float32Array(b * 96).map(() => rand() * 2 - 1)
  const mask = new Uint8Array(b * N).map((_, i) => (i % 3 === 0 ? 1 : 0))
  const targets = new Int32Array(b * N).map((_, i) => (i * 7) % 10)
  return { pixels, mask, targets }
}

test('BEiT-B from the base preset with an 8192 head has 91,965,776 parameters', (t) => {
  const model = Beit.create('base')
  t.is(model.numParameters, 91_965_776)
  t.deepEqual(model.config, PRESETS.base)
  t.deepEqual(model.grid, [14, 14])
})

test('config and optimizer settings round-trip through the native model', (t) => {
  const model = Beit.create(TINY, { optimizer: { weightDecay: 0.01, clipGradNorm: 1 } })
  t.deepEqual(model.config, resolveConfig(TINY))
  t.is(model.optimizer.weightDecay, 0.01)
  t.is(model.optimizer.clipGradNorm, 1)
  t.is(model.optimizer.beta2, 0.999)
})

test('trainStep runs off the JS thread and lowers the loss on a fixed batch', async (t) => {
  const model = Beit.create(TINY, { seed: 3, optimizer: { weightDecay: 0 } })
  const data = batch(4)
  let ticks = 0
  const timer = setInterval(() => ticks++, 0)
  const pending = model.trainStep({ ...data, lr: 5e-3 })
  t.true(pending instanceof Promise)
  const first = await pending
  clearInterval(timer)
  t.true(ticks > 0, 'the event loop kept running during the step')
  let last = first
  for (let i = 1; i < 150; i++) last = await model.trainStep({ ...data, lr: 5e-3, seed: i })
  t.true(first.loss > 1.5, `initial loss ${first.loss} near ln(10)`)
  t.true(last.loss < 0.1 * first.loss, `loss fell from ${first.loss} only to ${last.loss}`)
  t.is(last.numMasked, 8)
  t.true(last.gradNorm > 0 && Number.isFinite(last.gradNorm))
  t.is(model.step, 150)
})

test('concurrent calls on one model queue on its lock and calls on others run alongside: none waits forever', async (t) => {
  // Steps run on rayon's pool with the model's lock taken first (on the libuv thread); a
  // pool thread that blocked on a lock could hang every call here.
  const [a, b, other] = [1, 1, 2].map((seed) => Beit.create(TINY, { seed, optimizer: { weightDecay: 0 } }))
  const data = batch(4)
  const step = { ...data, lr: 5e-3, seed: 7 }
  const calls = [
    ...[0, 1, 2].map(() => a.trainStep(step)),
    a.forward(data),
    ...[0, 1, 2].map(() => other.trainStep(step)),
    other.forward(data),
  ]
  await Promise.all(calls)
  for (let i = 0; i < 3; i++) await b.trainStep(step)
  t.is(a.step, 3)
  t.is(other.step, 3)
  // Three identical steps in whatever order: the same weights as three in a row.
  t.deepEqual((await a.forward(data)).logits, (await b.forward(data)).logits)
})

test('forward gives logits and ids at masked patches only', async (t) => {
  const model = Beit.create(TINY)
  const { pixels, mask } = batch(2)
  const out = await model.forward({ pixels, mask })
  t.is(out.numMasked, 4)
  t.is(out.logits.length, 4 * 10)
  t.is(out.ids.length, 4)
  for (let m = 0; m < 4; m++) {
    const row = Array.from(out.logits.subarray(m * 10, m * 10 + 10))
    t.is(out.ids[m], row.indexOf(Math.max(...row)))
  }
})

test('a call works on its inputs as they were when it was made: refilling or transferring them after is safe', async (t) => {
  const model = Beit.create(TINY)
  const { pixels, mask } = batch(2)
  const expected = await model.forward({ pixels: pixels.slice(), mask: mask.slice() })
  const refilled = model.forward({ pixels, mask })
  pixels.fill(0.5) // as a loader refilling its buffer for the next batch would
  t.deepEqual(await refilled, expected)
  const moved = model.forward({ pixels, mask })
  structuredClone(pixels.buffer, { transfer: [pixels.buffer] }) // detached: its memory is gone
  t.is((await moved).numMasked, expected.numMasked)
})

test('calls on one model run in the order they were made, awaited or not', async (t) => {
  const [awaited, queued] = [0, 1].map(() => Beit.create(TINY, { seed: 3 }))
  const data = batch(2, 7)
  const half = (p: number) => ({
    pixels: data.pixels.subarray(p * 96, (p + 1) * 96),
    mask: data.mask.subarray(p * 6, (p + 1) * 6),
    targets: data.targets.subarray(p * 6, (p + 1) * 6),
    firstSample: p,
  })
  const expected = []
  for (let step = 0; step < 6; step++) {
    await awaited.lossAndGrads({ ...half(0), seed: step })
    await awaited.lossAndGrads({ ...half(1), seed: step })
    expected.push((await awaited.applyUpdate(1e-2)).gradNorm)
  }
  // None awaited: libuv's several worker threads would otherwise take them in any order, and
  // an applyUpdate taken before its lossAndGrads fails with "no gradients to apply".
  const updates = []
  for (let step = 0; step < 6; step++) {
    void queued.lossAndGrads({ ...half(0), seed: step })
    void queued.lossAndGrads({ ...half(1), seed: step })
    updates.push(queued.applyUpdate(1e-2))
  }
  // A getter waits for the calls made before it.
  t.is(queued.step, 6)
  t.deepEqual(
    (await Promise.all(updates)).map((u) => u.gradNorm),
    expected,
  )
  const [a, b] = await Promise.all([awaited.forward(data), queued.forward(data)])
  t.deepEqual(b.logits, a.logits)
})

test('save and load round-trip weights, optimizer state and behaviour; writes leave no temp file', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'beit-test-'))
  try {
    const a = Beit.create({ ...TINY, dropPathRate: 0.2 }, { seed: 5 })
    const data = batch(3)
    await a.trainStep({ ...data, lr: 1e-3, seed: 1 })
    const path = join(dir, 'm.safetensors')
    await a.save(path)
    t.deepEqual(await readdir(dir), ['m.safetensors'])
    const b = await Beit.load(path)
    t.deepEqual(b.config, a.config)
    t.is(b.step, 1)
    const [fa, fb] = await Promise.all([a.forward(data), b.forward(data)])
    t.deepEqual(fb.logits, fa.logits)
    const [sa, sb] = [
      await a.trainStep({ ...data, lr: 1e-3, seed: 2 }),
      await b.trainStep({ ...data, lr: 1e-3, seed: 2 }),
    ]
    t.is(sb.loss, sa.loss)
    t.is(sb.gradNorm, sa.gradNorm)
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
})

test('loading a checkpoint with another config names the fields that differ', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'beit-test-'))
  try {
    const path = join(dir, 'm.safetensors')
    await Beit.create(TINY).save(path)
    await t.throwsAsync(Beit.load(path, { config: { ...TINY, hiddenSize: 24, numAttentionHeads: 1 } }), {
      message:
        /the checkpoint's config differs from the one given in hiddenSize \(16 in the file, 24 given\), numAttentionHeads \(2 in the file, 1 given\)$/,
    })
    // The transposed grid's tables have the same length: the config tells them apart.
    await t.throwsAsync(Beit.load(path, { config: { ...TINY, imageSize: [12, 8] } }), {
      message: /imageSize \(\[8,12\] in the file, \[12,8\] given\)/,
    })
    t.is((await Beit.load(path, { config: { ...TINY, dropPathRate: 0.2 } })).config.dropPathRate, 0.2)
    // A classifier from it at the transposed size resizes the tables (their length alone fits);
    // another patch size is refused by name.
    const cls = await Classifier.fromPretrained(path, { model: { ...TINY, imageSize: [12, 8] }, numLabels: 3 })
    t.deepEqual(cls.config.model.imageSize, [12, 8])
    await t.throwsAsync(Classifier.fromPretrained(path, { model: { ...TINY, patchSize: 2 }, numLabels: 3 }), {
      message: /the checkpoint's backbone has patchSize 4, the classifier's model asks for 2/,
    })
    await t.throwsAsync(Beit.load(join(dir, 'missing.safetensors')), { message: /cannot read .*missing\.safetensors/ })
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
})

test('pretrainedBackbone reads a checkpoint header: the backbone of a MIM model or classifier', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'beit-test-'))
  try {
    const mim = Beit.create({ ...TINY, imageSize: [8, 12] })
    await mim.save(join(dir, 'mim.safetensors'))
    t.deepEqual(await pretrainedBackbone(join(dir, 'mim.safetensors')), mim.config)
    const cls = Classifier.create({ model: { ...TINY, hiddenSize: 24 }, numLabels: 3 })
    await cls.save(join(dir, 'cls.safetensors'))
    t.deepEqual(await pretrainedBackbone(join(dir, 'cls.safetensors')), cls.config.model)
    // A classifier from a classifier: new classes on the same backbone.
    const next = await Classifier.fromPretrained(join(dir, 'cls.safetensors'), { numLabels: 5 })
    t.is(next.config.numLabels, 5)
    t.deepEqual(next.config.model, cls.config.model)
    await writeFile(join(dir, 'short.safetensors'), Buffer.from([255, 255, 255, 255, 0, 0, 0, 0, 123]))
    await t.throwsAsync(pretrainedBackbone(join(dir, 'short.safetensors')), {
      message: /short\.safetensors is not a valid safetensors file: a header of 4294967295 bytes in a file of 9/,
    })
    await t.throwsAsync(pretrainedBackbone(join(dir, 'missing.safetensors')), {
      message: /cannot read .*missing\.safetensors/,
    })
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
})

test("a classifier's class names are saved, exported as id2label and imported with its head", async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'beit-test-'))
  try {
    const classNames = ['cat', 'dog', 'bird']
    const cls = Classifier.create({ model: TINY, numLabels: 3, classNames })
    t.deepEqual(cls.config.classNames, classNames)
    await cls.save(join(dir, 'cls.safetensors'))
    t.deepEqual((await Classifier.load(join(dir, 'cls.safetensors'))).config.classNames, classNames)
    await cls.exportHuggingFace(join(dir, 'hf'))
    const config = JSON.parse(await readFile(join(dir, 'hf', 'config.json'), 'utf8'))
    t.deepEqual(config.id2label, { 0: 'cat', 1: 'dog', 2: 'bird' })
    t.deepEqual(config.label2id, { cat: 0, dog: 1, bird: 2 })
    t.deepEqual((await Classifier.fromHuggingFace(join(dir, 'hf'))).config.classNames, classNames)
    // A new head of another size has no names; without names LABEL_i is exported.
    t.is((await Classifier.fromHuggingFace(join(dir, 'hf'), { numLabels: 4 })).config.classNames, undefined)
    t.throws(() => Classifier.create({ model: TINY, numLabels: 3, classNames: ['a', 'b'] }), {
      message: /classNames: expected one name per label \(3\), got 2/,
    })
    t.throws(() => Classifier.create({ model: TINY, numLabels: 2, classNames: ['a', 'a'] }), {
      message: /classNames: "a" is empty or named twice/,
    })
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
})

test('bad inputs are JS errors stating expected vs got', async (t) => {
  // Sizes far beyond any model are an error, not an allocation that aborts the process.
  t.throws(() => Beit.create({ ...TINY, vocabSize: 2 ** 40 }), {
    message: /the config gives the model \d+ parameters, more than the 2\^33 beit trains/,
  })
  t.throws(() => Classifier.create({ model: TINY, numLabels: 1e15 }), { message: /more than the 2\^33 beit trains/ })
  const model = Beit.create(TINY)
  const good = batch(2)
  await t.throwsAsync(model.trainStep({ ...good, pixels: good.pixels.subarray(0, 100), lr: 1e-3 }), {
    message: /pixels: expected a multiple of 96 values .* got 100/,
  })
  await t.throwsAsync(model.trainStep({ ...good, mask: new Uint8Array(11), lr: 1e-3 }), {
    message: /mask: expected 12 values \(B\*N = 2\*6\), got 11/,
  })
  await t.throwsAsync(model.trainStep({ ...good, mask: new Uint8Array(12), lr: 1e-3 }), {
    message: /no patch of the batch is masked/,
  })
  await t.throwsAsync(model.trainStep({ ...good, targets: new Int32Array(12).fill(10), lr: 1e-3 }), {
    message: /token id 10 at index 0 is out of range \[0, 10\)/,
  })
  t.throws(() => model.trainStep({ ...good, pixels: [1, 2] as unknown as Float32Array, lr: 1e-3 }), {
    message: 'pixels: expected a Float32Array, got Array',
  })
  t.throws(() => model.trainStep({ ...good, targets: new Float32Array(12) as unknown as Int32Array, lr: 1e-3 }), {
    message: 'targets: expected an Int32Array, got Float32Array',
  })
  // The model is still usable after every rejected call.
  const ok = await model.trainStep({ ...good, lr: 1e-3 })
  t.true(Number.isFinite(ok.loss))
})

test('impossible configs are rejected with the reason', (t) => {
  t.throws(() => Beit.create({ ...TINY, imageSize: [10, 12] }), {
    message: /imageSize height 10 must be a positive multiple of patchSize 4/,
  })
  t.throws(() => Beit.create({ ...TINY, hiddenSize: 15 }), {
    message: /hiddenSize 15 must be divisible by numAttentionHeads 2/,
  })
  t.throws(() => Beit.create('huge' as 'tiny'), {
    message: /unknown preset "huge": expected one of mini, tiny, small, base, large/,
  })
  t.throws(() => Beit.create({ hiddenSize: 8 }), { message: /model config is missing imageSize/ })
  t.throws(() => Beit.create(TINY, { optimizer: { beta1: 1.5 } }), { message: /beta1 must be in \[0, 1\), got 1.5/ })
  t.throws(() => Beit.create(TINY, { optimizer: { betta: 1 } as never }), { message: /unknown field `betta`/ })
  // Config errors name the field and what it takes, not a JSON position.
  const negative = t.throws(() => Beit.create({ ...TINY, numHiddenLayers: -1 }))
  t.regex(negative!.message, /numHiddenLayers: invalid value: integer `-1`, expected a whole number >= 0/)
  t.notRegex(negative!.message, /line \d+ column/)
  // One number is a square image size.
  t.deepEqual(Beit.create({ ...TINY, imageSize: 8 }).config.imageSize, [8, 8])
})

test.serial('dropped models are collected without a manual gc: their native bytes are told to V8', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'beit-drop-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  const path = join(dir, 'model.safetensors')
  // About 1M parameters: 16 MB of weights, gradients and moments, and the step's workspaces.
  const config = { ...TINY, imageSize: [32, 32] as [number, number], hiddenSize: 128, intermediateSize: 512 }
  const first = Beit.create({ ...config, numHiddenLayers: 4, vocabSize: 1024 })
  t.true(first.numParameters > 900_000)
  await first.save(path)
  const pixels = new Float32Array(4 * 1024).fill(0.1)
  const mask = new Uint8Array(4 * 64).map((_, i) => (i % 3 === 0 ? 1 : 0))
  const targets = new Int32Array(4 * 64).map((_, i) => i % 1024)
  const before = process.memoryUsage().rss / 2 ** 20
  for (let i = 0; i < 80; i++) {
    const model = await Beit.load(path)
    await model.trainStep({ pixels, mask, targets, lr: 1e-4, seed: i })
  }
  // When V8 saw only each model's wrapper, dropped models were collected whenever the tiny JS
  // heap happened to need it: about 60 MB a model stayed held here.
  const grown = process.memoryUsage().rss / 2 ** 20 - before
  t.true(grown < 800, `RSS grew ${grown.toFixed(0)} MiB over 80 loaded and dropped models`)
})

test('memory stays flat across training steps (no per-step leak)', async (t) => {
  const model = Beit.create({ ...TINY, imageSize: [16, 16], hiddenSize: 32, vocabSize: 64 })
  const n = 16
  const pixels = new Float32Array(32 * 256).fill(0.1)
  const mask = new Uint8Array(32 * n).map((_, i) => (i % 3 === 0 ? 1 : 0))
  const targets = new Int32Array(32 * n).map((_, i) => i % 64)
  const rss: number[] = []
  for (let s = 1; s <= 120; s++) {
    await model.trainStep({ pixels, mask, targets, lr: 1e-4, seed: s })
    await model.forward({ pixels, mask })
    if (s % 20 === 0) rss.push(process.memoryUsage().rss / 2 ** 20)
  }
  // Keeping one step's graph alive (activations and gradients, ~4 MiB here) would add ~400 MiB.
  t.true(rss[rss.length - 1] - rss[0] < 40, `RSS in MiB every 20 steps: ${rss.map((r) => r.toFixed(0)).join(', ')}`)
})

test('a step in three parts: lossAndGrads + applyUpdate equal trainStep, and two halves accumulate into the whole batch', async (t) => {
  const config = { ...TINY, dropPathRate: 0.3 }
  const [whole, split, halves] = [0, 1, 2].map(() => Beit.create(config, { seed: 5 }))
  const data = batch(4, 9)
  // The halves mask different numbers of patches: the loss is a mean over all of them.
  data.mask.set([1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0], 0)
  data.mask.set([1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1], 12)
  const part = (p: number) => ({
    pixels: data.pixels.subarray(p * 192, (p + 1) * 192),
    mask: data.mask.subarray(p * 12, (p + 1) * 12),
    targets: data.targets.subarray(p * 12, (p + 1) * 12),
  })
  await t.throwsAsync(split.applyUpdate(1e-3), { message: /no gradients to apply/ })
  for (let step = 0; step < 3; step++) {
    const w = await whole.trainStep({ ...data, lr: 2e-3, seed: step })
    const l = await split.lossAndGrads({ ...data, seed: step })
    t.is(split.pendingLossTerms, l.numMasked)
    const u = await split.applyUpdate(2e-3)
    t.is(split.pendingLossTerms, 0)
    t.is(l.loss, w.loss)
    t.is(u.gradNorm, w.gradNorm)
    const a = await halves.lossAndGrads({ ...part(0), seed: step, firstSample: 0 })
    const b = await halves.lossAndGrads({ ...part(1), seed: step, firstSample: 2 })
    t.is(a.numMasked + b.numMasked, w.numMasked)
    t.is(halves.pendingLossTerms, w.numMasked)
    const v = await halves.applyUpdate(2e-3)
    const weighted = (a.loss * a.numMasked + b.loss * b.numMasked) / w.numMasked
    t.true(Math.abs(weighted - w.loss) < 1e-6 * w.loss, `${weighted} vs ${w.loss}`)
    t.true(Math.abs(v.gradNorm - w.gradNorm) < 1e-5 * w.gradNorm, `${v.gradNorm} vs ${w.gradNorm}`)
  }
  const probe = batch(2, 4)
  const [p, q, r] = await Promise.all([whole, split, halves].map((m) => m.forward(probe)))
  t.deepEqual(q.logits, p.logits, 'bit for bit')
  const worst = r.logits.reduce((m, v, i) => Math.max(m, Math.abs(v - p.logits[i])), 0)
  t.true(worst < 1e-4, `accumulated halves' logits differ by ${worst}`)
  t.throws(() => split.lossAndGrads({ ...data, firstSample: -1 }), { message: /firstSample must be an integer/ })
})

test('the presets are the native table', (t) => {
  t.is(PRESETS.base.hiddenSize, 768)
  t.is(PRESETS.mini.numHiddenLayers, 6)
  t.deepEqual(Object.keys(PRESETS), ['mini', 'tiny', 'small', 'base', 'large'])
})

test('the classifier step in parts: lossAndGrads + applyUpdate equal trainStep, and the training options are typed', async (t) => {
  const spec = { model: { ...TINY, dropPathRate: 0.2 }, numLabels: 3 }
  const options = { seed: 2, training: { labelSmoothing: 0.2, layerDecay: 0.8 } }
  const [whole, split] = [0, 1].map(() => Classifier.create(spec, options))
  t.deepEqual(split.training, { labelSmoothing: 0.2, layerDecay: 0.8 })
  const { pixels } = batch(4, 3)
  const labels = new Int32Array([0, 2, 1, 2])
  for (let step = 0; step < 3; step++) {
    const w = await whole.trainStep({ pixels, labels, lr: 3e-3, seed: step })
    const l = await split.lossAndGrads({ pixels, labels, seed: step })
    t.is(split.pendingLossTerms, 4)
    const u = await split.applyUpdate(3e-3)
    t.deepEqual([l.loss, l.accuracy, u.gradNorm], [w.loss, w.accuracy, w.gradNorm])
  }
  t.deepEqual(await split.predict(pixels), await whole.predict(pixels))
  t.throws(() => Classifier.create(spec, { training: { layerDecay: 2 } }), {
    message: /layerDecay must be in \(0, 1\]/,
  })
  t.throws(() => Classifier.create(spec, { training: { layerDecy: 0.5 } as never }), {
    message: /training: unknown field `layerDecy`, expected one of labelSmoothing, layerDecay/,
  })
})
