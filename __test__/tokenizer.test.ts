import test from 'ava'
import { mkdir, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { inflateSync } from 'node:zlib'

import { imagesAsFloats } from '../src/data/batches'
import { imageFolder, pixelDataset } from '../src/data/dataset'
import { loadFashionMnist } from '../src/data/fashion-mnist'
import { cosineRamp } from '../src/schedule'
import { encodePng } from '../src/png'
import { reconstructionSheet } from '../src/sheet'
import { DVAE_PRESETS, Dvae, resolveDvaeConfig } from '../src/tokenizer'
import { trainTokenizer } from '../src/train-tokenizer'

const SMALL = {
  imageSize: [28, 28] as [number, number],
  numChannels: 1,
  hiddenSize: 16,
  numGroups: 3,
  blocksPerGroup: 1,
  vocabSize: 64,
  decoderInputSize: 16,
}

async function withDir<T>(f: (dir: string) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), 'beit-tok-'))
  try {
    return await f(dir)
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
}

test('presets build, and dall-e maps 112 px to 14x14 tokens of 8192', async (t) => {
  const tok = Dvae.create('dall-e')
  t.deepEqual(tok.config, DVAE_PRESETS['dall-e'])
  t.is(tok.downsample, 8)
  const ids = await tok.encode(new Float32Array(3 * 112 * 112).fill(0.5), 1)
  t.is(ids.length, 14 * 14)
  t.true(ids.every((i) => i >= 0 && i < 8192))
})

test('encode is deterministic and shape-correct; decode gives images in [0, 1]', async (t) => {
  const tok = Dvae.create(SMALL, { seed: 1 })
  const images = await loadFashionMnist({ split: 'test' })
  const x = imagesAsFloats(images, 5)
  const ids = await tok.encode(x, 5)
  t.is(ids.length, 5 * 7 * 7)
  t.deepEqual(await tok.encode(x, 5), ids)
  const y = await tok.decode(ids, 5)
  t.is(y.length, x.length)
  t.true(y.every((v) => v >= 0 && v <= 1))
  const nonSquare = await tok.encode(new Float32Array(2 * 8 * 12).fill(0.3), 2, { height: 8, width: 12 })
  t.is(nonSquare.length, 2 * 2 * 3)
  t.is((await tok.decode(nonSquare, 2, { height: 2, width: 3 })).length, 2 * 8 * 12)
  // A grid the native layer would truncate (1.5 -> 1) is refused, not decoded as another batch.
  t.throws(() => tok.decode(new Int32Array(6), 2, { height: 1.5, width: 2 }), {
    message: 'grid must be [height, width] of positive integers, got [1.5,2]',
  })
})

test('trained briefly on real images, decode(encode(x)) beats the mean image; save/load round-trips exactly', async (t) => {
  const images = await loadFashionMnist({ split: 'train' })
  const x = imagesAsFloats(images, 8)
  const tok = Dvae.create(SMALL, { seed: 2, emaDecay: 0, reconLoss: 'mse' })
  const lr = cosineRamp({ from: 3e-3, to: 3e-4, steps: 120 })
  const temperature = cosineRamp({ from: 1, to: 1 / 16, steps: 120 })
  for (let s = 0; s < 120; s++) {
    await tok.trainStep({ pixels: x, temperature: temperature(s), klWeight: 0, lr: lr(s), seed: s })
  }
  const y = await tok.decode(await tok.encode(x, 8), 8)
  const per = 28 * 28
  let err = 0
  let baseline = 0
  for (let i = 0; i < x.length; i++) {
    let mean = 0
    for (let b = 0; b < 8; b++) mean += x[b * per + (i % per)] / 8
    err += (y[i] - x[i]) ** 2
    baseline += (mean - x[i]) ** 2
  }
  t.true(err < 0.7 * baseline, `reconstruction ${err / x.length} vs mean image ${baseline / x.length}`)
  await withDir(async (dir) => {
    const path = join(dir, 'tok.safetensors')
    await tok.save(path)
    t.deepEqual(await readdir(dir), ['tok.safetensors'])
    const again = await Dvae.load(path)
    t.deepEqual(again.config, tok.config)
    t.is(again.step, 120)
    const ids = await tok.encode(x, 8)
    t.deepEqual(await again.encode(x, 8), ids)
    t.deepEqual(await again.decode(ids, 8), await tok.decode(ids, 8))
  })
})

test('wrong shapes, channel counts, ranges and ids are clear errors', async (t) => {
  const tok = Dvae.create(SMALL)
  t.throws(() => tok.encode(new Float32Array(3 * 28 * 28), 1, { height: 28, width: 28 }), {
    message: 'pixels: expected 784 values (B*C*H*W = 1*1*28*28), got 2352',
  })
  t.throws(() => tok.decode(new Int32Array(10), 2, { height: 2, width: 3 }), {
    message: 'ids: expected 12 values (batchSize*h*w = 2*2*3), got 10',
  })
  t.throws(() => tok.encode(new Float32Array(700), 1), {
    message: 'pixels: expected 784 values (B*C*H*W = 1*1*28*28), got 700',
  })
  await t.throwsAsync(tok.trainStep({ pixels: new Float32Array(700), temperature: 1, klWeight: 0, lr: 1e-3 }), {
    message: /pixels: expected a positive multiple of 784 values \(C\*H\*W = 1\*28\*28\), got 700/,
  })
  await t.throwsAsync(tok.encode(new Float32Array(30 * 30), 1, { height: 30, width: 30 }), {
    message: /downsampling factor 4/,
  })
  t.throws(() => Dvae.create({ ...SMALL, imageSize: [30, 30] }), {
    message: /imageSize \[30, 30\] must be positive multiples of the downsampling factor 4/,
  })
  await t.throwsAsync(tok.encode(new Float32Array(28 * 28).fill(255), 1), { message: /must be in \[0, 1\], got 255/ })
  await t.throwsAsync(tok.decode(new Int32Array(49).fill(64), 1), {
    message: /token id 64 at index 0 is out of range \[0, 64\)/,
  })
  t.throws(() => tok.decode([1, 2] as unknown as Int32Array, 1), { message: /ids: expected an Int32Array, got Array/ })
  await t.throwsAsync(tok.trainStep({ pixels: new Float32Array(784), temperature: 0, klWeight: 0, lr: 1e-3 }), {
    message: /temperature must be a finite number > 0, got 0/,
  })
  t.throws(() => Dvae.create('huge' as 'tiny'), {
    message: /unknown tokenizer preset "huge": expected one of dall-e, small, tiny/,
  })
  t.throws(() => Dvae.create({ preset: 'toString' as 'tiny' }), { message: /unknown tokenizer preset "toString"/ })
  // The config is the caller's copy: editing it leaves the preset table as it was.
  const config = resolveDvaeConfig('tiny')
  config.imageSize[0] = 64
  t.deepEqual(DVAE_PRESETS.tiny.imageSize, [28, 28])
  t.throws(() => Dvae.create({ ...SMALL, hiddenSize: 10 }), { message: /hiddenSize must be a multiple of 4/ })
  // Sizes far beyond any model are an error, not an allocation that aborts the process.
  t.throws(() => Dvae.create({ ...SMALL, vocabSize: 2 ** 40 }), {
    message: /the config gives the model \d+ parameters, more than the 2\^33 beit trains/,
  })
  await t.throwsAsync(Dvae.load('/nonexistent/tok.safetensors'), {
    message: /cannot read \/nonexistent\/tok\.safetensors/,
  })
})

test('trainTokenizer writes metrics JSONL, a checkpoint, a reconstruction sheet and an evaluation', async (t) => {
  const images = await loadFashionMnist({ split: 'test' })
  await withDir(async (dir) => {
    const tok = Dvae.create(SMALL, { seed: 3 })
    const progress: number[] = []
    const { evaluation } = await trainTokenizer({
      tokenizer: tok,
      data: images,
      steps: 4,
      batchSize: 8,
      outDir: dir,
      checkpointEvery: 2,
      evalImages: 50,
      onProgress: (p) => progress.push(p.step),
    })
    t.is(progress.length, 4)
    t.truthy(evaluation)
    if (!evaluation) return
    const lines = (await readFile(join(dir, 'metrics.jsonl'), 'utf8'))
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l))
    t.is(lines.length, 4)
    for (const key of [
      'step',
      'loss',
      'reconLoss',
      'kl',
      'temperature',
      'klWeight',
      'lr',
      'perplexity',
      'codesUsedFraction',
    ]) {
      t.true(
        lines.every((l) => typeof l[key] === 'number' && Number.isFinite(l[key])),
        key,
      )
    }
    // Annealed over the run: 1 at its first step, DALL-E's 1/16 at its last.
    t.is(lines[0].temperature, 1)
    t.is(lines[3].temperature, 1 / 16)
    // Sample counts are checked before training, not after it.
    await t.throwsAsync(
      trainTokenizer({ tokenizer: tok, data: images, steps: 1, batchSize: 8, outDir: dir, sheetImages: 0 }),
      {
        message: 'sheetImages must be a positive integer, got 0',
      },
    )
    t.deepEqual(
      (await readdir(dir)).sort(),
      ['checkpoint.safetensors', 'curves.svg', 'evaluation.json', 'metrics.jsonl', 'reconstructions.png'].sort(),
    )
    t.true(evaluation.meanImageMse > 0 && evaluation.reconstructionMse > 0)
    t.true(evaluation.codesUsedFraction > 0 && evaluation.codesUsedFraction <= 1)
    t.is((await Dvae.load(join(dir, 'checkpoint.safetensors'))).step, 4)
  })
})

test('trainTokenizer follows the loop contract: epochs or steps, a schedule as options or a function, outDir required', async (t) => {
  const images = await loadFashionMnist({ split: 'test' })
  await withDir(async (dir) => {
    const lrsOf = async (outDir: string) =>
      (await readFile(join(dir, outDir, 'metrics.jsonl'), 'utf8'))
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l).lr as number)
    // 1,000 images in batches of 8: 125 batches per epoch, so 0.024 epochs are 3 steps.
    const byEpochs = await trainTokenizer({
      tokenizer: Dvae.create(SMALL, { seed: 1 }),
      data: images,
      epochs: 0.024,
      batchSize: 8,
      schedule: (step) => 1e-3 * (step + 1),
      evalImages: 8,
      outDir: join(dir, 'fn'),
    })
    t.like(byEpochs, { status: 'completed', step: 3, checkpoint: join(dir, 'fn', 'checkpoint.safetensors') })
    t.deepEqual(
      await lrsOf('fn'),
      [0, 1, 2].map((step) => 1e-3 * (step + 1)),
    )
    // The default: cosine from 1e-3 to 1e-5 over the run, no warmup.
    await trainTokenizer({
      tokenizer: Dvae.create(SMALL, { seed: 1 }),
      data: images,
      steps: 3,
      batchSize: 8,
      evalImages: 8,
      outDir: join(dir, 'default'),
    })
    const close = (a: number[], b: number[]) => a.length === b.length && a.every((x, i) => Math.abs(x - b[i]) < 1e-12)
    const lrs = await lrsOf('default')
    t.true(close(lrs, [1e-3, (1e-3 + 1e-5) / 2, 1e-5]), `lrs ${lrs}`)
    // Options: the same warmup + cosine as pretraining and fine-tuning.
    await trainTokenizer({
      tokenizer: Dvae.create(SMALL, { seed: 1 }),
      data: images,
      steps: 4,
      batchSize: 8,
      schedule: { lr: 2e-3, minLr: 1e-4, warmupSteps: 2 },
      evalImages: 8,
      outDir: join(dir, 'options'),
    })
    const warm = await lrsOf('options')
    t.true(close(warm, [1e-3, 2e-3, 2e-3, 1e-4]), `lrs ${warm}`)

    const tokenizer = Dvae.create(SMALL)
    const base = { tokenizer, data: images, batchSize: 8, outDir: join(dir, 'bad') }
    await t.throwsAsync(trainTokenizer({ ...base, steps: 2, epochs: 1 }), {
      message: /give exactly one of steps and epochs \(the run's length\), got steps 2 and epochs 1/,
    })
    await t.throwsAsync(trainTokenizer({ ...base }), { message: /give exactly one of steps and epochs.*got neither/ })
    await t.throwsAsync(trainTokenizer({ ...base, outDir: undefined as unknown as string, steps: 1 }), {
      message: /outDir is required: the run folder for checkpoint\.safetensors/,
    })
    await t.throwsAsync(trainTokenizer({ ...base, steps: 1, schedule: { minLr: 1 } as unknown as { lr: number } }), {
      message:
        /schedule must be \{ lr, minLr\?, warmupSteps\?, decay\? \} or a function of the step, got \{"minLr":1\}/,
    })
    await t.throwsAsync(trainTokenizer({ ...base, steps: 1, checkpointEvery: 0 }), {
      message: 'checkpointEvery must be a positive integer (steps), got 0',
    })
  })
})

test('trainTokenizer takes any dataset: a folder of RGB images of another size is resized to the tokenizer input', async (t) => {
  await withDir(async (dir) => {
    // 12 images of 20x24 px: left half dark, right half bright, in two class folders.
    for (let i = 0; i < 12; i++) {
      const pixels = new Uint8Array(20 * 24 * 3)
      for (let p = 0; p < 20 * 24; p++) pixels.fill(p % 24 < 12 ? 20 + i : 230 - i, 3 * p, 3 * p + 3)
      await mkdir(join(dir, 'images', `class${i % 2}`), { recursive: true })
      await writeFile(join(dir, 'images', `class${i % 2}`, `${i}.png`), encodePng(pixels, 24, 20, 3))
    }
    const data = await imageFolder(join(dir, 'images'))
    const tok = Dvae.create({ ...SMALL, imageSize: [16, 16], numChannels: 3 }, { seed: 4 })
    const steps: number[] = []
    const { evaluation } = await trainTokenizer({
      tokenizer: tok,
      data,
      steps: 5,
      batchSize: 4,
      outDir: join(dir, 'run'),
      evalImages: 6,
      onProgress: (p) => steps.push(p.step),
    })
    // 3 full batches per epoch: the run goes on into a second epoch.
    t.deepEqual(steps, [0, 1, 2, 3, 4])
    if (!evaluation) return t.fail('a completed run has an evaluation')
    t.true(Number.isFinite(evaluation.reconstructionMse) && evaluation.reconstructionMse > 0)
    // The images are two flat halves: their mean image is close to every image.
    t.true(evaluation.meanImageMse < 0.01, `mean-image MSE ${evaluation.meanImageMse}`)
    const sheet = await readFile(join(dir, 'run', 'reconstructions.png'))
    const blank = new Float32Array(12 * 3 * 16 * 16)
    const expected = Buffer.from(
      reconstructionSheet({ originals: blank, reconstructions: blank, count: 12, channels: 3, height: 16, width: 16 }),
    )
    t.deepEqual(
      [sheet.readUInt32BE(16), sheet.readUInt32BE(20)],
      [expected.readUInt32BE(16), expected.readUInt32BE(20)],
      'all twelve images, at 16 px',
    )
    await t.throwsAsync(trainTokenizer({ tokenizer: tok, data, steps: 1, batchSize: 13, outDir: join(dir, 'big') }), {
      message:
        /an update takes 13 images \(batchSize x accumulate x ranks\), more than an epoch of .* \(12 images\) holds/,
    })
  })
})

test('trainTokenizer is reproducible: one seed gives the same losses from IDX images or the same images as a dataset', async (t) => {
  const images = await loadFashionMnist({ split: 'test' })
  await withDir(async (dir) => {
    const run = async (data: Parameters<typeof trainTokenizer>[0]['data'], outDir: string) => {
      const tok = Dvae.create(SMALL, { seed: 5 })
      const losses: number[] = []
      await trainTokenizer({
        tokenizer: tok,
        data,
        steps: 2,
        batchSize: 8,
        evalImages: 16,
        outDir: join(dir, outDir),
        onProgress: (p) => losses.push(p.loss),
      })
      return losses
    }
    t.deepEqual(await run(images, 'idx'), await run(pixelDataset(images, 'fashion-mnist test'), 'dataset'))
  })
})

test('an interrupted and resumed tokenizer run ends with the weights of an uninterrupted one', async (t) => {
  const images = await loadFashionMnist({ split: 'test' })
  await withDir(async (dir) => {
    const run = (tokenizer: Dvae, outDir: string, signal?: AbortSignal, onStep?: (step: number) => void) =>
      trainTokenizer({
        tokenizer,
        data: images,
        steps: 9,
        batchSize: 8,
        seed: 2,
        outDir,
        checkpointEvery: 100,
        evalImages: 16,
        signal,
        onProgress: (p) => onStep?.(p.step),
      })
    const whole = await run(Dvae.create(SMALL, { seed: 6 }), join(dir, 'whole'))
    t.is(whole.status, 'completed')
    const controller = new AbortController()
    const first = await run(
      Dvae.create(SMALL, { seed: 6 }),
      join(dir, 'split'),
      controller.signal,
      (step) => step === 3 && controller.abort(),
    )
    t.is(first.status, 'interrupted')
    t.is(first.step, 4)
    t.is(first.evaluation, undefined)
    const resumed = await Dvae.load(first.checkpoint)
    t.like(resumed.trainState, { kind: 'tokenizer', step: 4 })
    const second = await run(resumed, join(dir, 'split'))
    t.is(second.status, 'completed')
    // The same steps: the same weights, so the same codes and reconstructions.
    const a = await Dvae.load(whole.checkpoint)
    const b = await Dvae.load(second.checkpoint)
    t.is(b.step, 9)
    const x = new Float32Array(4 * 28 * 28).map((_, i) => (i % 97) / 97)
    t.deepEqual(await a.encode(x, 4), await b.encode(x, 4))
    const steps = (await readFile(join(dir, 'split', 'metrics.jsonl'), 'utf8'))
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l).step)
    t.deepEqual(steps, [...Array(9).keys()])
    // A position from another run is refused.
    await t.throwsAsync(
      trainTokenizer({ tokenizer: b, data: images, steps: 5, batchSize: 8, outDir: join(dir, 'other') }),
      {
        message: /cannot resume: the run had totalSteps 9, now 5/,
      },
    )
    // Saved after an epoch's last step (16 images, 4 steps an epoch): the rest of that epoch
    // is empty, and the run goes on into the next.
    const few = {
      ...images,
      count: 16,
      images: images.images.subarray(0, 16 * 784),
      labels: images.labels.subarray(0, 16),
    }
    const boundary = new AbortController()
    const short = (tokenizer: Dvae, signal?: AbortSignal) =>
      trainTokenizer({
        tokenizer,
        data: few,
        steps: 6,
        batchSize: 4,
        seed: 2,
        outDir: join(dir, 'boundary'),
        evalImages: 8,
        signal,
        onProgress: (p) => p.step === 3 && boundary.abort(),
      })
    t.like(await short(Dvae.create(SMALL, { seed: 6 }), boundary.signal), { status: 'interrupted', step: 4 })
    const rest = await short(await Dvae.load(join(dir, 'boundary', 'checkpoint.safetensors')))
    t.like(rest, { status: 'completed', step: 6 })
  })
})

test('the reconstruction sheet is a PNG with originals above reconstructions', (t) => {
  const originals = new Float32Array(2 * 4 * 4).fill(1)
  const reconstructions = new Float32Array(2 * 4 * 4).fill(0)
  const png = Buffer.from(
    reconstructionSheet({ originals, reconstructions, count: 2, channels: 1, height: 4, width: 4, scale: 1 }),
  )
  t.deepEqual([...png.subarray(0, 8)], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])
  const width = png.readUInt32BE(16)
  const height = png.readUInt32BE(20)
  t.deepEqual([width, height], [2 * (4 + 2) + 2, 2 * (4 + 2) + 2])
  const idatLength = png.readUInt32BE(33)
  const raw = inflateSync(png.subarray(41, 41 + idatLength))
  const at = (x: number, y: number) => raw[y * (width + 1) + 1 + x]
  t.is(at(2, 2), 255, 'original (white) in the top row')
  t.is(at(2, 2 + 6), 0, 'reconstruction (black) below it')
  t.is(at(0, 0), 255, 'gap')
  // A fractional scale or row length once wrote a PNG whose rows contradicted its header.
  const sheet = { originals, reconstructions, count: 2, channels: 1 as const, height: 4, width: 4 }
  t.throws(() => reconstructionSheet({ ...sheet, scale: 1.5 }), {
    message: 'scale must be a positive integer, got 1.5',
  })
  t.throws(() => reconstructionSheet({ ...sheet, perRow: 2.5 }), {
    message: 'perRow must be a positive integer, got 2.5',
  })
  t.throws(() => reconstructionSheet({ ...sheet, count: 0 }), { message: 'count must be a positive integer, got 0' })
  t.throws(() => reconstructionSheet({ ...sheet, count: 3 }), {
    message: 'originals: expected 3 images of 1x4x4 values, got 32 values',
  })
})

test('the tokenizer step in parts: lossAndGrads + applyUpdate equal trainStep; halves accumulate into the whole', async (t) => {
  const images = await loadFashionMnist({ split: 'train' })
  const x = imagesAsFloats(images, 4)
  const [whole, split, halves] = [0, 1, 2].map(() => Dvae.create(SMALL, { seed: 6 }))
  const input = { temperature: 0.9, klWeight: 0.5 }
  for (let step = 0; step < 2; step++) {
    const w = await whole.trainStep({ pixels: x, ...input, lr: 1e-3, seed: step })
    const l = await split.lossAndGrads({ pixels: x, ...input, seed: step })
    t.is(split.pendingLossTerms, 4)
    const u = await split.applyUpdate(1e-3)
    t.deepEqual([l.loss, l.perplexity, u.gradNorm], [w.loss, w.perplexity, w.gradNorm])
    const per = x.length / 4
    const a = await halves.lossAndGrads({ pixels: x.subarray(0, 2 * per), ...input, seed: step, firstSample: 0 })
    const b = await halves.lossAndGrads({ pixels: x.subarray(2 * per), ...input, seed: step, firstSample: 2 })
    const v = await halves.applyUpdate(1e-3)
    t.true(Math.abs((a.loss + b.loss) / 2 - w.loss) < 1e-6 * Math.abs(w.loss), `${(a.loss + b.loss) / 2} vs ${w.loss}`)
    t.true(Math.abs(v.gradNorm - w.gradNorm) < 1e-5 * w.gradNorm, `${v.gradNorm} vs ${w.gradNorm}`)
  }
  t.deepEqual(await split.encode(x, 4), await whole.encode(x, 4))
})
