import test from 'ava'

import {
  Beit,
  BeitConfig,
  bf16GemmSpeedup,
  Classifier,
  cudaDeviceCount,
  Dvae,
  resolveDevice,
  resolvePrecision,
} from '../src/index'

const TINY: Partial<BeitConfig> & { preset: 'tiny' } = {
  preset: 'tiny',
  imageSize: [8, 8],
  patchSize: 4,
  numChannels: 1,
  hiddenSize: 16,
  numHiddenLayers: 1,
  numAttentionHeads: 2,
  intermediateSize: 32,
  vocabSize: 10,
}

test("the CPU's bf16 GEMM speed-up is a positive ratio, measured once per process", (t) => {
  const speedup = bf16GemmSpeedup()
  t.true(Number.isFinite(speedup) && speedup > 0, `speed-up ${speedup}`)
  t.is(bf16GemmSpeedup(), speedup)
})

test("'auto' is a GPU exactly when the loaded addon sees one", (t) => {
  const gpus = cudaDeviceCount()
  t.true(Number.isInteger(gpus) && gpus >= 0)
  t.is(resolveDevice('auto'), gpus > 0 ? 'cuda:0' : 'cpu')
  t.is(resolveDevice('cuda'), 'cuda:0')
  t.is(Beit.create(TINY).device, resolveDevice('auto'))
  t.is(Dvae.create({ preset: 'tiny', numChannels: 1 }, { device: 'cpu' }).device, 'cpu')
})

test('a device that cannot be had is a clear error', (t) => {
  t.throws(() => Beit.create(TINY, { device: 'gpu' as 'cpu' }), {
    message: /device must be "cpu", "cuda" or "cuda:N", got "gpu"/,
  })
  const gpus = cudaDeviceCount()
  const unavailable = `cuda:${gpus}` as const
  t.throws(() => Classifier.create({ model: TINY, numLabels: 2 }, { device: unavailable }), {
    message: gpus === 0 ? /no CUDA support|0 CUDA device/ : /CUDA device/,
  })
})

test('moving a model keeps what it computes', async (t) => {
  const model = Beit.create(TINY, { device: 'cpu' })
  const pixels = new Float32Array(2 * 64).map((_, i) => Math.sin(i))
  const mask = new Uint8Array(2 * 4).map((_, i) => i % 2)
  const before = await model.forward({ pixels, mask })
  model.toDevice('cpu')
  model.toDevice(resolveDevice('auto'), { precision: 'f32' })
  const after = await model.forward({ pixels, mask })
  const worst = before.logits.reduce((m, v, i) => Math.max(m, Math.abs(v - after.logits[i])), 0)
  t.true(worst < 1e-4, `max difference ${worst}`)
  t.is(model.device, resolveDevice('auto'))
})

test("precision 'auto' is bf16 on a GPU and f32 on the CPU; a bad one is a clear error", (t) => {
  t.is(resolvePrecision('auto', 'cpu'), 'f32')
  t.is(resolvePrecision('auto', 'cuda:0'), 'bf16')
  t.is(Beit.create(TINY, { device: 'cpu' }).precision, 'f32')
  t.is(Beit.create(TINY).precision, resolvePrecision('auto', resolveDevice('auto')))
  t.is(Dvae.create({ preset: 'tiny', numChannels: 1 }, { device: 'cpu', precision: 'bf16' }).precision, 'bf16')
  t.throws(() => Beit.create(TINY, { precision: 'fp16' as 'f32' }), {
    message: /precision must be 'auto', 'f32' or 'bf16', got "fp16"/,
  })
})

test('bf16 mixed precision trains and predicts close to f32', async (t) => {
  const model = Beit.create(TINY, { device: 'cpu', seed: 3 })
  const pixels = new Float32Array(2 * 64).map((_, i) => Math.sin(i))
  const mask = new Uint8Array(2 * 4).map((_, i) => i % 2)
  const targets = new Int32Array(2 * 4).map((_, i) => i % 10)
  const full = await model.forward({ pixels, mask })
  model.toDevice('cpu', { precision: 'bf16' })
  t.is(model.precision, 'bf16')
  const mixed = await model.forward({ pixels, mask })
  const scale = full.logits.reduce((m, v) => Math.max(m, Math.abs(v)), 1e-3)
  const worst = full.logits.reduce((m, v, i) => Math.max(m, Math.abs(v - mixed.logits[i])), 0)
  t.true(worst < 0.05 * scale, `bf16 logits differ by ${worst} (scale ${scale})`)
  const step = await model.trainStep({ pixels, mask, targets, lr: 1e-3 })
  t.true(Number.isFinite(step.loss) && step.gradNorm > 0, JSON.stringify(step))
})
