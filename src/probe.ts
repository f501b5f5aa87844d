/**
 * Linear probing: a frozen backbone's features of one layer ([CLS] and mean patch token), a
 * standardisation, and a linear classifier trained on them with AdamW.
 */
import { checkPositiveInteger, checkSeed } from './check'
import { argmaxRows } from './classifier'
import { EvalTransform, viewSpec } from './data/augment'
import { ImageDataset, withClassesOf } from './data/dataset'
import { ImageLoader } from './data/loader'
import { permutation } from './data/batches'
import { Beit } from './model'
import { native } from './native'
import { Rng } from './rng'
import { cosineRamp } from './schedule'

export interface LinearProbeOptions {
  backbone: Beit
  train: ImageDataset
  test: ImageDataset
  /** 1-based block whose output is probed (0 = embeddings). Default: the middle-to-late 3/4 depth (BEiT-B's best was 9 of 12). */
  layer?: number
  epochs?: number
  batchSize?: number
  /** Peak learning rate, cosine to 1/100. Default 1e-3. */
  lr?: number
  weightDecay?: number
  seed?: number
  /** Default: the whole image (cropFraction 1). */
  transform?: EvalTransform
  mean?: number
  std?: number
  threads?: number
  onEpoch?: (e: { epoch: number; loss: number; trainAccuracy: number }) => void
}

export interface LinearProbeResult {
  layer: number
  trainAccuracy: number
  testAccuracy: number
  featureSeconds: number
  trainSeconds: number
}

/** Features of every image of `data`, in dataset order, with their labels. */
export async function probeFeatures(
  backbone: Beit,
  data: ImageDataset,
  layer: number,
  opts: Pick<LinearProbeOptions, 'transform' | 'mean' | 'std' | 'threads'> = {},
): Promise<{ features: Float32Array; labels: Int32Array; dim: number }> {
  const { imageSize, numChannels } = backbone.config
  const loader = new ImageLoader({
    dataset: data,
    views: [
      viewSpec({
        size: imageSize,
        interpolation: 'bicubic',
        channels: numChannels,
        mean: opts.mean ?? 0.5,
        std: opts.std ?? 0.5,
      }),
    ],
    transform: opts.transform ?? { kind: 'eval', cropFraction: 1 },
    batchSize: 256,
    shuffle: false,
    threads: opts.threads,
  })
  const dim = 2 * backbone.config.hiddenSize
  const features = new Float32Array(data.size * dim)
  const labels = new Int32Array(data.size)
  let count = 0
  for await (const batch of loader.epoch(0)) {
    features.set(await backbone.probeFeatures(batch.views[0], layer), count * dim)
    labels.set(batch.labels, count)
    count += batch.size
  }
  if (labels.subarray(0, count).some((l) => l < 0))
    throw new Error(`linear probing needs labels, but ${data.name} has unlabelled images`)
  return { features: features.subarray(0, count * dim), labels: labels.subarray(0, count), dim }
}

export async function linearProbe(opts: LinearProbeOptions): Promise<LinearProbeResult> {
  const { backbone } = opts
  const layer = opts.layer ?? Math.round((backbone.config.numHiddenLayers * 3) / 4)
  const { test: testData, numLabels, settings } = probeData(opts)
  const started = performance.now()
  const train = await probeFeatures(backbone, opts.train, layer, opts)
  const test = await probeFeatures(backbone, testData, layer, opts)
  const featureSeconds = (performance.now() - started) / 1000
  const fit = await fitLinear(train, test, numLabels, { ...opts, ...settings })
  return { layer, ...fit, featureSeconds }
}

export interface PixelProbeOptions extends Omit<LinearProbeOptions, 'backbone' | 'layer' | 'mean' | 'std'> {
  /** The images' size and channels as the classifier sees them. */
  imageSize: [number, number]
  channels: 1 | 3
}

/**
 * The baseline a representation has to beat: the same linear classifier on the raw pixels
 * (resized to `imageSize`, standardised per pixel with the training set's statistics).
 */
export async function pixelProbe(opts: PixelProbeOptions): Promise<Omit<LinearProbeResult, 'layer'>> {
  const { test: testData, numLabels, settings } = probeData(opts)
  const started = performance.now()
  const pixels = async (data: ImageDataset) => {
    const loader = new ImageLoader({
      dataset: data,
      views: [viewSpec({ size: opts.imageSize, interpolation: 'bicubic', channels: opts.channels })],
      transform: opts.transform ?? { kind: 'eval', cropFraction: 1 },
      batchSize: 256,
      shuffle: false,
      threads: opts.threads,
    })
    const dim = opts.channels * opts.imageSize[0] * opts.imageSize[1]
    const features = new Float32Array(data.size * dim)
    const labels = new Int32Array(data.size)
    let count = 0
    for await (const batch of loader.epoch(0)) {
      features.set(batch.views[0], count * dim)
      labels.set(batch.labels, count)
      count += batch.size
    }
    return { features: features.subarray(0, count * dim), labels: labels.subarray(0, count), dim }
  }
  const train = await pixels(opts.train)
  const test = await pixels(testData)
  const featureSeconds = (performance.now() - started) / 1000
  return { ...(await fitLinear(train, test, numLabels, { ...opts, ...settings })), featureSeconds }
}

/** A probe's training settings, with their defaults resolved. */
type FitSettings = Required<Pick<LinearProbeOptions, 'epochs' | 'batchSize' | 'lr' | 'seed'>>

/**
 * Checks a probe's data and options before any feature is computed: both sets labelled, at
 * least 2 classes, the test set's labels numbered as the training set's classes.
 */
function probeData(opts: Pick<LinearProbeOptions, 'train' | 'test'> & Partial<FitSettings>): {
  test: ImageDataset
  numLabels: number
  settings: FitSettings
} {
  for (const data of [opts.train, opts.test]) {
    const unlabelled = data.labels.subarray(0, data.size).filter((l) => l < 0).length
    if (unlabelled > 0)
      throw new Error(`linear probing needs labels, but ${data.name} has ${unlabelled} unlabelled images`)
  }
  const numLabels = opts.train.classNames.length
  if (numLabels < 2) throw new Error(`linear probing needs labelled data with at least 2 classes, got ${numLabels}`)
  const { epochs = 10, batchSize = 256, lr = 1e-3, seed = 0 } = opts
  checkPositiveInteger('epochs', epochs)
  checkPositiveInteger('batchSize', batchSize)
  if (!(Number.isFinite(lr) && lr > 0)) throw new Error(`lr must be a finite number > 0, got ${lr}`)
  checkSeed(seed)
  return { test: withClassesOf(opts.train, opts.test), numLabels, settings: { epochs, batchSize, lr, seed } }
}

interface Features {
  features: Float32Array
  labels: Int32Array
  dim: number
}

/** A standardised linear classifier on `train`'s features (AdamW, cosine LR), scored on both sets. */
async function fitLinear(
  train: Features,
  test: Features,
  numLabels: number,
  opts: FitSettings & Pick<LinearProbeOptions, 'weightDecay' | 'onEpoch'>,
): Promise<{ trainAccuracy: number; testAccuracy: number; trainSeconds: number }> {
  const started = performance.now()
  const { epochs, batchSize, seed } = opts
  const optimizer = { weightDecay: opts.weightDecay ?? 1e-4, clipGradNorm: 0 }
  const probe = new native.NativeLinearProbe(train.dim, numLabels, train.features, optimizer, seed)
  const n = train.labels.length
  const steps = epochs * Math.ceil(n / batchSize)
  const lr = cosineRamp({ from: opts.lr, to: opts.lr / 100, steps })
  const rng = new Rng(seed)
  let step = 0
  for (let epoch = 0; epoch < epochs; epoch++) {
    const order = permutation(n, rng)
    let lossSum = 0
    let accSum = 0
    let batches = 0
    for (let start = 0; start < n; start += batchSize) {
      const idx = order.subarray(start, Math.min(n, start + batchSize))
      const features = new Float32Array(idx.length * train.dim)
      const labels = new Int32Array(idx.length)
      idx.forEach((i, k) => {
        features.set(train.features.subarray(i * train.dim, (i + 1) * train.dim), k * train.dim)
        labels[k] = train.labels[i]
      })
      const m = await probe.trainStep(features, labels, lr(step++))
      lossSum += m.loss
      accSum += m.accuracy
      batches++
    }
    opts.onEpoch?.({ epoch, loss: lossSum / batches, trainAccuracy: accSum / batches })
  }
  const accuracy = async (f: Float32Array, labels: Int32Array) => {
    const predicted = argmaxRows(await probe.predict(f), numLabels)
    return predicted.reduce((hits, p, i) => hits + (p === labels[i] ? 1 : 0), 0) / labels.length
  }
  return {
    trainAccuracy: await accuracy(train.features, train.labels),
    testAccuracy: await accuracy(test.features, test.labels),
    trainSeconds: (performance.now() - started) / 1000,
  }
}
