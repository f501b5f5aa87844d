import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import test from 'ava'

import {
  drawPairAugment,
  evaluateSegmentation,
  Segmenter,
  SegmentationLoader,
  segmentationFolder,
  segmentationManifest,
  segmenterView,
  vocSegmentation,
} from '../src'
import type { SegmentationBatch, SegmentationDataset } from '../src'
import { encodePng } from '../src/png'
import { Rng } from '../src/rng'

function tempDir(t: { teardown: (f: () => void) => void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'beit-segdata-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

/** An RGB image whose red channel is 10 * x + y, and a gray mask of `id(x, y)`. */
function writePair(imagePath: string, maskPath: string, w: number, h: number, id: (x: number, y: number) => number) {
  const rgb = new Uint8Array(w * h * 3)
  const mask = new Uint8Array(w * h)
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      rgb.set([10 * x + y, 100, 200], (y * w + x) * 3)
      mask[y * w + x] = id(x, y)
    }
  }
  writeFileSync(imagePath, encodePng(rgb, w, h, 3))
  writeFileSync(maskPath, encodePng(mask, w, h, 1))
}

/** A tiny RGB segmenter on 8x8 inputs (2 px patches, a 4x4 grid). */
function tinySegmenter(numLabels: number): Segmenter {
  return Segmenter.create({
    model: {
      preset: 'mini',
      imageSize: [8, 8],
      patchSize: 2,
      numChannels: 3,
      hiddenSize: 8,
      numHiddenLayers: 4,
      numAttentionHeads: 2,
      intermediateSize: 16,
    },
    numLabels,
    auxiliaryChannels: 4,
  })
}

async function firstBatch(data: SegmentationDataset, numLabels: number, size: [number, number], onError?: 'fail') {
  const loader = new SegmentationLoader({
    data,
    view: segmenterView(size, 3, { mean: 0, std: 1 }),
    transform: 'eval',
    numLabels,
    batchSize: 8,
    shuffle: false,
    onError,
    onSkip: () => {},
  })
  const { value } = await loader.epoch(0).next()
  return { batch: value as SegmentationBatch, loader }
}

test('an ADE20K folder: pairs by stem, reduceZeroLabel, skipped pairs counted, unknown ids fatal', async (t) => {
  const dir = tempDir(t)
  for (const part of ['images', 'annotations']) mkdirSync(join(dir, part, 'training'), { recursive: true })
  const pair = (stem: string, w: number, h: number, id: (x: number, y: number) => number, maskW = w) => {
    writePair(
      join(dir, 'images', 'training', `${stem}.png`),
      join(dir, 'annotations', 'training', `${stem}.png`),
      w,
      h,
      id,
    )
    if (maskW !== w)
      writeFileSync(
        join(dir, 'annotations', 'training', `${stem}.png`),
        encodePng(new Uint8Array(maskW * h), maskW, h, 1),
      )
  }
  pair('a', 6, 4, (x) => x % 4) // ids 0..3 stored: 0 is ignored, 1..3 become 0..2
  pair('b', 6, 4, () => 2, 5) // a 5-wide mask for a 6-wide image
  writeFileSync(join(dir, 'images', 'training', 'lonely.png'), encodePng(new Uint8Array(4), 2, 2, 1))
  let unpaired: string[] = []
  const data = await segmentationFolder(dir, {
    split: 'training',
    reduceZeroLabel: true,
    onUnpaired: (images) => (unpaired = images),
  })
  t.is(data.size, 2)
  t.deepEqual(unpaired, [join(dir, 'images', 'training', 'lonely.png')])

  const { batch, loader } = await firstBatch(data, 3, [4, 6])
  t.deepEqual(Array.from(batch.indices), [0])
  t.deepEqual(Array.from(batch.masks.subarray(0, 6)), [255, 0, 1, 2, 255, 0])
  t.is(Math.round(batch.pixels[7] * 255), 10 * 1 + 1) // red of (1, 1)
  t.is(loader.stats.skipped, 1)
  t.regex(loader.stats.skips[0].reason, /the mask is 5x4 but the image 6x4/)
  await t.throwsAsync(firstBatch(data, 3, [4, 6], 'fail'), { message: /b\.png: the mask is 5x4/ })
  // Without reduceZeroLabel the stored 3 is no class of 3.
  const raw = await segmentationFolder(dir, { split: 'training', onUnpaired: () => {} })
  await t.throwsAsync(firstBatch(raw, 3, [4, 6]), { message: /a\.png holds the value 3, which is no class id/ })
})

test('an unknown id in in-memory masks names the pair by its index in the dataset', async (t) => {
  const masks = new Uint8Array(6 * 4).fill(1)
  masks[4 * 4 + 2] = 7 // pair 4 holds a 7, no class of 3
  const data: SegmentationDataset = {
    name: 'pairs',
    size: 6,
    classNames: ['a', 'b', 'c'],
    reduceZeroLabel: false,
    source: { kind: 'pixels', images: new Uint8Array(6 * 4 * 3), masks, height: 2, width: 2, channels: 3 },
  }
  const loader = new SegmentationLoader({
    data,
    view: segmenterView([2, 2], 3),
    transform: 'eval',
    numLabels: 3,
    batchSize: 2,
    shuffle: false,
  })
  // The native side gets a copy of batch 2 alone (pairs 4 and 5), where pair 4 is the first.
  await t.throwsAsync(loader.epoch(0, { fromBatch: 2 }).next(), {
    message: /the mask of pair 4 holds the value 7, which is no class id/,
  })
})

test('a VOC folder and a manifest list their pairs; the batched evaluation view rescales any image to fit the input', async (t) => {
  const dir = tempDir(t)
  for (const part of ['JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'])
    mkdirSync(join(dir, part), { recursive: true })
  writePair(join(dir, 'JPEGImages', 'x1.png'), join(dir, 'SegmentationClass', 'x1.png'), 16, 8, (x) => (x < 8 ? 0 : 1))
  writePair(join(dir, 'JPEGImages', 'x2.png'), join(dir, 'SegmentationClass', 'x2.png'), 8, 8, () => 255)
  writeFileSync(join(dir, 'ImageSets', 'Segmentation', 'val.txt'), 'x1\nx2\n')
  const voc = await vocSegmentation(dir, { split: 'val' })
  t.is(voc.size, 2)
  t.is(voc.classNames.length, 21)
  writeFileSync(join(dir, 'ImageSets', 'Segmentation', 'bad.txt'), 'x3\n')
  await t.throwsAsync(vocSegmentation(dir, { split: 'bad' }), { message: /lists x3, but .*JPEGImages has no image x3/ })

  writeFileSync(join(dir, 'pairs.csv'), 'image,mask\nJPEGImages/x1.png,SegmentationClass/x1.png\n')
  const listed = await segmentationManifest(join(dir, 'pairs.csv'))
  t.deepEqual(listed.source, {
    kind: 'files',
    images: [join(dir, 'JPEGImages', 'x1.png')],
    masks: [join(dir, 'SegmentationClass', 'x1.png')],
  })

  // 16x8 into 8x8: scaled by 1/2 (the long side fits) to 8x4, padded below with ignored rows.
  const { batch } = await firstBatch(voc, 21, [8, 8])
  t.deepEqual(Array.from(batch.masks.subarray(24, 32)), [0, 0, 0, 0, 1, 1, 1, 1])
  t.deepEqual(Array.from(batch.masks.subarray(32, 64)), Array(32).fill(255))
  t.deepEqual(Array.from(batch.masks.subarray(64, 128)), Array(64).fill(255)) // x2: all ignored

  const segmenter = tinySegmenter(21)
  const scores = await evaluateSegmentation(segmenter, voc)
  t.is(scores.perClassIou.length, 21)
  t.true(scores.overallAccuracy >= 0 && scores.overallAccuracy <= 1)
})

test("drawPairAugment: mmseg's recipe by default, reproducible, and nothing random in evaluation", (t) => {
  const a = drawPairAugment({}, [64, 48], new Rng(3))
  t.deepEqual(drawPairAugment({}, [64, 48], new Rng(3)), a)
  t.deepEqual(a.rescale?.scale, [192, 48])
  t.true(a.rescale!.ratio >= 0.5 && a.rescale!.ratio <= 2)
  t.is(a.crop.length, 11)
  t.is(a.catMaxRatio, 0.75)
  let flips = 0
  const ops = new Set<string>()
  const hues = new Set<number>()
  for (let s = 0; s < 400; s++) {
    const d = drawPairAugment({}, [64, 48], new Rng(s))
    if (d.flip) flips++
    for (const p of d.photometric) {
      ops.add(p.op)
      if (p.op === 'brightness') t.true(Math.abs(p.delta) <= 32)
      if (p.op === 'hue') hues.add(p.delta)
    }
  }
  t.true(flips > 140 && flips < 260, `${flips} flips in 400`)
  // mmseg's np.random.randint(-18, 18): the integers -18 to 17.
  t.deepEqual(
    [...hues].sort((x, y) => x - y),
    Array.from({ length: 36 }, (_, i) => i - 18),
  )
  t.deepEqual([...ops].sort(), ['brightness', 'contrast', 'hue', 'saturation'])
  const plain = drawPairAugment({ catMaxRatio: 1, photometric: false, flip: 0 }, [8, 8], new Rng(1))
  t.deepEqual([plain.crop.length, plain.photometric, plain.flip], [1, [], false])
  t.deepEqual(drawPairAugment('eval', [32, 16], new Rng(1)), {
    rescale: { scale: [32, 16], ratio: 1, fit: true },
    crop: [],
    catMaxRatio: 1,
    flip: false,
    photometric: [],
  })
  t.throws(
    () =>
      new SegmentationLoader({
        data: {
          name: 'x',
          size: 1,
          source: { kind: 'files', images: ['a'], masks: ['b'] },
          classNames: [],
          reduceZeroLabel: false,
        },
        view: segmenterView([8, 8], 1),
        transform: { catMaxRatio: 0 },
        numLabels: 2,
        batchSize: 1,
      }),
    { message: /catMaxRatio must be in \(0, 1\], got 0/ },
  )
})

test('evaluation: sliding windows over rescaled files agree with the batched path where images are the input size', async (t) => {
  const dir = tempDir(t)
  for (const part of ['images', 'annotations']) mkdirSync(join(dir, part, 'validation'), { recursive: true })
  for (let i = 0; i < 3; i++) {
    const sub = (part: string) => join(dir, part, 'validation', `${i}.png`)
    writePair(sub('images'), sub('annotations'), 8, 8, (x, y) => (x + y + i) % 3)
  }
  const data = await segmentationFolder(dir, { split: 'validation' })
  const segmenter = tinySegmenter(3)
  const slide = await evaluateSegmentation(segmenter, data)
  const resize = await evaluateSegmentation(segmenter, data, { mode: 'resize' })
  t.deepEqual(slide, resize)
  // A 16x12 image: three windows across, two down (stride 4, 6), scored at the stored size.
  writePair(
    join(dir, 'images', 'validation', 'big.png'),
    join(dir, 'annotations', 'validation', 'big.png'),
    16,
    12,
    () => 1,
  )
  const bigger = await segmentationFolder(dir, { split: 'validation' })
  const scores = await evaluateSegmentation(segmenter, bigger, { scale: [16, 12], stride: [4, 6] })
  t.true(scores.overallAccuracy >= 0 && scores.overallAccuracy <= 1)
  await t.throwsAsync(evaluateSegmentation(segmenter, bigger, { scale: [12, 16] }), {
    message: 'scale must be [long side, short side], positive, got [12,16]',
  })
  await t.throwsAsync(evaluateSegmentation(segmenter, bigger, { mode: 'whole' as 'slide' }), {
    message: "mode must be 'slide' or 'resize', got whole",
  })
  // segment(): class ids at the output size, probabilities summing to 1.
  const image = new Float32Array(3 * 12 * 16).map((_, i) => Math.sin(i))
  const out = await segmenter.segment(image, { size: [12, 16], outputSize: [6, 8], probabilities: true })
  t.is(out.classes.length, 48)
  const p = out.probabilities!
  t.is(p.length, 3 * 48)
  for (let px = 0; px < 48; px++) t.true(Math.abs(p[px] + p[48 + px] + p[96 + px] - 1) < 1e-5)
  await t.throwsAsync(segmenter.segment(image, { size: [12, 15] }), { message: /3\*12\*15 = 540 values/ })
})
