import test from 'ava'
import { mkdtemp, mkdir, writeFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import sharp from 'sharp'

import {
  beitViews,
  ImageLoader,
  imageFolder,
  manifest,
  openDataset,
  pixelDataset,
  Rng,
  loadFashionMnist,
  viewSpec,
} from '../src'
import type { Batch, ColorJitterOptions, ImageDataset, ViewSpec } from '../src'

const W = 29
const H = 17

async function tempDir(t: { teardown: (fn: () => Promise<void>) => void }): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'beit-loader-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  return dir
}

/** Random RGB pixels drawn from a small palette (so GIF and palette PNG keep them exactly). */
function paletteImage(seed: number, channels: 1 | 3 = 3): Buffer {
  const rng = new Rng(seed)
  const palette = Array.from({ length: 12 }, () => [rng.int(0, 255), rng.int(0, 255), rng.int(0, 255)])
  const out = Buffer.alloc(W * H * channels)
  for (let i = 0; i < W * H; i++) {
    const colour = palette[rng.int(0, palette.length - 1)]
    for (let c = 0; c < channels; c++) out[i * channels + c] = colour[c]
  }
  return out
}

/** A 24-bit BMP (sharp does not write BMP): bottom-up BGR rows padded to 4 bytes. */
function encodeBmp(rgb: Buffer, width: number, height: number): Buffer {
  const stride = Math.ceil((width * 3) / 4) * 4
  const out = Buffer.alloc(54 + stride * height)
  out.write('BM', 0)
  out.writeUInt32LE(out.length, 2)
  out.writeUInt32LE(54, 10)
  out.writeUInt32LE(40, 14)
  out.writeInt32LE(width, 18)
  out.writeInt32LE(height, 22)
  out.writeUInt16LE(1, 26)
  out.writeUInt16LE(24, 28)
  out.writeUInt32LE(stride * height, 34)
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const src = (y * width + x) * 3
      const dst = 54 + (height - 1 - y) * stride + x * 3
      out[dst] = rgb[src + 2]
      out[dst + 1] = rgb[src + 1]
      out[dst + 2] = rgb[src]
    }
  }
  return out
}

/** The identity view: the whole image, nearest, at its own size, values x / 255. */
function identityView(channels: 1 | 3, size: [number, number] = [H, W]): ViewSpec {
  return viewSpec({ size, interpolation: 'nearest', channels })
}

async function loadAll(loader: ImageLoader, epoch = 0): Promise<Batch[]> {
  const batches: Batch[] = []
  for await (const batch of loader.epoch(epoch)) batches.push(batch)
  return batches
}

/** Planar [C, H, W] floats back to interleaved 8-bit. */
function toInterleaved(planar: Float32Array, channels: number, height = H, width = W): Buffer {
  const out = Buffer.alloc(height * width * channels)
  for (let c = 0; c < channels; c++) {
    for (let i = 0; i < height * width; i++) out[i * channels + c] = Math.round(planar[c * height * width + i] * 255)
  }
  return out
}

function maxDiff(a: Buffer, b: Buffer): number {
  let m = 0
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]))
  return m
}

test('every format decodes to the pixels written (lossless exactly, JPEG close to libvips)', async (t) => {
  const dir = await tempDir(t)
  const rgb = paletteImage(1)
  const gray = paletteImage(2, 1)
  const raw = { raw: { width: W, height: H, channels: 3 as const } }
  const files: [string, Buffer, 1 | 3, Buffer][] = [
    ['rgb.png', await sharp(rgb, raw).png().toBuffer(), 3, rgb],
    ['rgb16.png', await sharp(rgb, raw).toColourspace('rgb16').png().toBuffer(), 3, rgb],
    ['palette.png', await sharp(rgb, raw).png({ palette: true, colours: 256, dither: 0 }).toBuffer(), 3, rgb],
    ['rgba.png', await sharp(rgb, raw).ensureAlpha(0.5).png().toBuffer(), 3, rgb],
    [
      'gray.png',
      await sharp(gray, { raw: { width: W, height: H, channels: 1 } })
        .png()
        .toBuffer(),
      1,
      gray,
    ],
    ['lossless.webp', await sharp(rgb, raw).webp({ lossless: true }).toBuffer(), 3, rgb],
    ['first-frame.gif', await sharp(rgb, raw).gif({ dither: 0 }).toBuffer(), 3, rgb],
    ['image.bmp', encodeBmp(rgb, W, H), 3, rgb],
  ]
  for (const [name, bytes] of files) await writeFile(join(dir, name), bytes)
  const dataset = await imageFolder(dir, { labels: 'none' })
  t.is(dataset.size, files.length)
  for (const [name, , channels, expected] of files) {
    const index = dataset.source.kind === 'files' ? dataset.source.paths.findIndex((p) => p.endsWith(name)) : -1
    const one: ImageDataset = {
      ...dataset,
      size: 1,
      source: { kind: 'files', paths: [join(dir, name)] },
      labels: new Int32Array([-1]),
    }
    const loader = new ImageLoader({
      dataset: one,
      views: [identityView(channels)],
      transform: { kind: 'eval', cropFraction: 1 },
      batchSize: 1,
      onError: 'fail',
    })
    const [batch] = await loadAll(loader)
    t.true(index >= 0)
    // libvips scales 8 -> 16 bits by 256, not 257, so a round trip may be one level off.
    t.true(maxDiff(toInterleaved(batch.views[0], channels), expected) <= (name === 'rgb16.png' ? 1 : 0), name)
  }

  // JPEG: compare with libvips decoding the same file (both IDCTs round slightly differently).
  const smooth = Buffer.alloc(W * H * 3)
  for (let i = 0; i < W * H; i++) smooth.set([(i % W) * 8, Math.floor(i / W) * 15, 100], i * 3)
  const jpeg = await sharp(smooth, raw).jpeg({ quality: 95 }).toBuffer()
  const vips = await sharp(jpeg).raw().toBuffer()
  await writeFile(join(dir, 'photo.jpg'), jpeg)
  const one: ImageDataset = {
    ...dataset,
    size: 1,
    source: { kind: 'files', paths: [join(dir, 'photo.jpg')] },
    labels: new Int32Array([-1]),
  }
  const loader = new ImageLoader({
    dataset: one,
    views: [identityView(3)],
    transform: { kind: 'eval', cropFraction: 1 },
    batchSize: 1,
    onError: 'fail',
  })
  const [batch] = await loadAll(loader)
  t.true(maxDiff(toInterleaved(batch.views[0], 3), vips) <= 3)
})

test('EXIF orientation is honoured like libvips autorotate', async (t) => {
  const dir = await tempDir(t)
  const smooth = Buffer.alloc(W * H * 3)
  for (let i = 0; i < W * H; i++) smooth.set([(i % W) * 8, Math.floor(i / W) * 15, 60], i * 3)
  const jpeg = await sharp(smooth, { raw: { width: W, height: H, channels: 3 } })
    .jpeg({ quality: 95 })
    .withMetadata({ orientation: 6 })
    .toBuffer()
  await writeFile(join(dir, 'rotated.jpg'), jpeg)
  const upright = await sharp(jpeg).rotate().raw().toBuffer({ resolveWithObject: true })
  t.deepEqual([upright.info.width, upright.info.height], [H, W])
  const dataset = await imageFolder(dir)
  const loader = new ImageLoader({
    dataset,
    views: [identityView(3, [W, H])],
    transform: { kind: 'eval', cropFraction: 1 },
    batchSize: 1,
    onError: 'fail',
  })
  const [batch] = await loadAll(loader)
  t.true(maxDiff(toInterleaved(batch.views[0], 3, W, H), upright.data) <= 3)

  // WebP's EXIF chunk, as libvips writes it, starts with "Exif\0\0"; it was once left unrotated.
  const webp = await sharp(smooth, { raw: { width: W, height: H, channels: 3 } })
    .webp({ lossless: true })
    .withMetadata({ orientation: 6 })
    .toBuffer()
  const webpDir = join(dir, 'webp')
  await mkdir(webpDir)
  await writeFile(join(webpDir, 'rotated.webp'), webp)
  const uprightWebp = await sharp(webp).rotate().raw().toBuffer()
  const [webpBatch] = await loadAll(
    new ImageLoader({
      dataset: await imageFolder(webpDir),
      views: [identityView(3, [W, H])],
      transform: { kind: 'eval', cropFraction: 1 },
      batchSize: 1,
      onError: 'fail',
    }),
  )
  t.is(maxDiff(toInterleaved(webpBatch.views[0], 3, W, H), uprightWebp), 0)
})

test('class-per-subfolder labels, ignored files and a CSV / JSONL manifest', async (t) => {
  const dir = await tempDir(t)
  const png = await sharp(paletteImage(3), { raw: { width: W, height: H, channels: 3 } })
    .png()
    .toBuffer()
  for (const [cls, n] of [
    ['cat', 2],
    ['dog', 3],
  ] as const) {
    await mkdir(join(dir, cls, 'nested'), { recursive: true })
    for (let i = 0; i < n; i++) await writeFile(join(dir, cls, i === 0 ? 'nested' : '', `${i}.PNG`), png)
  }
  await writeFile(join(dir, 'dog', 'README.txt'), 'not an image')
  const folder = await imageFolder(dir)
  t.deepEqual(folder.classNames, ['cat', 'dog'])
  t.deepEqual([...folder.labels], [0, 0, 1, 1, 1])
  t.is(folder.ignoredFiles, 1)

  await writeFile(join(dir, 'list.csv'), 'path,label\ncat/1.PNG,cat\n"dog/1.PNG",dog\n')
  const csv = await manifest(join(dir, 'list.csv'))
  t.deepEqual(csv.classNames, ['cat', 'dog'])
  t.deepEqual([...csv.labels], [0, 1])
  await writeFile(join(dir, 'list.jsonl'), '{"path": "cat/1.PNG", "label": 1}\n{"path": "dog/2.PNG", "label": 0}\n')
  const jsonl = await manifest(join(dir, 'list.jsonl'), { classes: ['dog', 'cat'] })
  t.deepEqual([...jsonl.labels], [1, 0])
  await writeFile(
    join(dir, 'bad.jsonl'),
    '{"path": "cat/1.PNG", "label": "cat"}\n{"path": "dog/2.PNG", "label": "horse"}\n',
  )
  await t.throwsAsync(manifest(join(dir, 'bad.jsonl'), { classes: ['cat', 'dog'] }), {
    message: /bad\.jsonl:2: unknown class "horse"; expected one of cat, dog/,
  })
  // Numbers 0..K-1 are their own indices; other numbers are names in numeric order.
  await writeFile(join(dir, 'zero.csv'), 'path,label\ncat/1.PNG,1\ndog/1.PNG,0\n')
  t.deepEqual((await manifest(join(dir, 'zero.csv'))).classNames, ['0', '1'])
  await writeFile(join(dir, 'one.csv'), 'path,label\ncat/1.PNG,10\ndog/1.PNG,2\ndog/2.PNG,1\n')
  const one = await manifest(join(dir, 'one.csv'))
  t.deepEqual(
    [one.classNames, [...one.labels]],
    [
      ['1', '2', '10'],
      [2, 1, 0],
    ],
  )
  // A quoted field may hold a comma and a line break; a quote left open is named.
  await writeFile(join(dir, 'quoted.csv'), 'path,label\r\n"cat/1.PNG","a, b\nc"\r\n\r\ndog/1.PNG,d\n')
  const quoted = await manifest(join(dir, 'quoted.csv'))
  t.deepEqual(quoted.classNames, ['a, b\nc', 'd'])
  t.is(quoted.size, 2)
  await writeFile(join(dir, 'open.csv'), 'path,label\ncat/1.PNG,cat\n"dog/1.PNG,dog\n')
  await t.throwsAsync(manifest(join(dir, 'open.csv')), { message: /open\.csv:3: unterminated quote/ })

  const loader = new ImageLoader({
    dataset: csv,
    views: [identityView(3)],
    transform: { kind: 'eval', cropFraction: 1 },
    batchSize: 4,
    onError: 'fail',
  })
  const [batch] = await loadAll(loader)
  t.is(batch.size, 2)
  t.deepEqual([...batch.labels].sort(), [0, 1])
})

test('broken files are skipped with their reasons and counted, or fatal with onError fail', async (t) => {
  const dir = await tempDir(t)
  const png = await sharp(paletteImage(4), { raw: { width: W, height: H, channels: 3 } })
    .png()
    .toBuffer()
  const jpeg = await sharp(paletteImage(4), { raw: { width: W, height: H, channels: 3 } })
    .jpeg()
    .toBuffer()
  await writeFile(join(dir, 'good.png'), png)
  await writeFile(join(dir, 'zero.jpg'), Buffer.alloc(0))
  await writeFile(join(dir, 'truncated.png'), png.subarray(0, png.length >> 1))
  await writeFile(join(dir, 'truncated.jpg'), jpeg.subarray(0, jpeg.length >> 2))
  await writeFile(join(dir, 'text.jpg'), 'this is a text file\n')
  await writeFile(join(dir, 'garbage.webp'), Buffer.from(new Rng(5).nextSeed().toString(16).repeat(40)))
  await mkdir(join(dir, 'folder.png'))
  const lines = [
    'path',
    'good.png',
    'zero.jpg',
    'truncated.png',
    'truncated.jpg',
    'text.jpg',
    'garbage.webp',
    'folder.png',
    'missing.png',
  ]
  await writeFile(join(dir, 'all.csv'), lines.join('\n'))
  const dataset = await manifest(join(dir, 'all.csv'))
  const skips: string[] = []
  const loader = new ImageLoader({
    dataset,
    views: [identityView(3)],
    transform: { kind: 'eval', cropFraction: 1 },
    batchSize: 8,
    shuffle: false,
    onSkip: (s) => skips.push(`${s.image.split('/').pop()}: ${s.reason}`),
  })
  const batches = await loadAll(loader)
  t.is(batches.length, 1)
  t.is(batches[0].size, 1)
  t.is(batches[0].views[0].length, 3 * H * W)
  t.deepEqual(loader.stats.loaded, 1)
  t.deepEqual(loader.stats.skipped, 7)
  const reasonOf = (name: string) => skips.find((s) => s.startsWith(`${name}:`)) ?? ''
  t.regex(reasonOf('zero.jpg'), /empty file/)
  t.regex(reasonOf('truncated.png'), /corrupt or truncated PNG/)
  t.regex(reasonOf('truncated.jpg'), /JPEG/)
  t.regex(reasonOf('text.jpg'), /not a recognised image/)
  t.regex(reasonOf('garbage.webp'), /not a recognised image/)
  t.regex(reasonOf('folder.png'), /cannot read file/)
  t.regex(reasonOf('missing.png'), /cannot read file.*No such file/)

  const strict = new ImageLoader({
    dataset,
    views: [identityView(3)],
    transform: { kind: 'eval' },
    batchSize: 8,
    shuffle: false,
    onError: 'fail',
  })
  await t.throwsAsync(loadAll(strict), { message: /cannot load .*zero\.jpg: empty file/ })

  // A consumer that stops early: the batches prefetched after its last are not counted (they
  // were counted when loaded, so the stats grew after the loop had ended).
  const early = new ImageLoader({
    dataset,
    views: [identityView(3)],
    transform: { kind: 'eval', cropFraction: 1 },
    batchSize: 1,
    shuffle: false,
    prefetch: 4,
    onSkip: (s) => t.fail(`${s.image} was never handed out`),
  })
  for await (const batch of early.epoch(0)) {
    t.is(batch.size, 1)
    break
  }
  await new Promise((resolve) => setTimeout(resolve, 300))
  t.deepEqual([early.stats.loaded, early.stats.skipped], [1, 0])
})

test('clear errors before any loading: missing or empty folder, bad options', async (t) => {
  const dir = await tempDir(t)
  await t.throwsAsync(imageFolder(join(dir, 'nope')), { message: /data folder not found: .*nope/ })
  await writeFile(join(dir, 'notes.txt'), 'hi')
  await t.throwsAsync(imageFolder(dir), { message: /no images found in .*\(looked for \.jpg/ })
  await t.throwsAsync(openDataset(join(dir, 'missing'), 'train'), { message: /data not found/ })
  // Split folders: a split without its own is an error, not the whole folder (train/ included).
  await mkdir(join(dir, 'splits', 'train', 'cat'), { recursive: true })
  const png = await sharp(Buffer.alloc(4 * 4 * 3, 100), { raw: { width: 4, height: 4, channels: 3 } })
    .png()
    .toBuffer()
  await writeFile(join(dir, 'splits', 'train', 'cat', 'a.png'), png)
  t.is((await openDataset(join(dir, 'splits'), 'train')).size, 1)
  await t.throwsAsync(openDataset(join(dir, 'splits'), 'test'), {
    message: /splits has split folders \(train\) but none for the test split \(expected test or val\)/,
  })
  const dataset = pixelDataset(await loadFashionMnist({ split: 'test' }), 'sample')
  const base = { dataset, views: [identityView(1, [28, 28])], transform: { kind: 'eval' as const }, batchSize: 4 }
  t.throws(() => new ImageLoader({ ...base, batchSize: 0 }), { message: /batchSize must be a positive integer/ })
  t.throws(() => new ImageLoader({ ...base, threads: -1 }), {
    message: /threads must be at least 1 \(a whole number of decode threads\), got -1/,
  })
  // A training rank that would get no images makes every rank refuse, those with images
  // included; an evaluation shard may be empty (that rank scores nothing).
  const three = { ...dataset, size: 3 }
  for (const rank of [0, 1, 2, 3])
    t.throws(() => new ImageLoader({ ...base, dataset: three, rank, worldSize: 4, dropLast: true }), {
      message: /shard 0 of 4 gets no images: the dataset has only 3 \(fewer than one global batch of 4 x 4\)/,
    })
  const evaluated = []
  for (const rank of [0, 1, 2, 3]) {
    const loader = new ImageLoader({ ...base, dataset: three, rank, worldSize: 4, evenShards: false, shuffle: false })
    for await (const batch of loader.epoch(0)) evaluated.push(...batch.indices)
  }
  t.deepEqual(evaluated.sort(), [0, 1, 2])
  t.throws(
    () => new ImageLoader({ ...base, transform: { kind: 'train', colorJitter: { hue: 0.1 } as ColorJitterOptions } }),
    { message: /transform\.colorJitter\.hue is not an option: expected brightness, contrast or saturation/ },
  )
  // A hand-built dataset that disagrees with itself is named with both counts.
  const short = { ...dataset, labels: dataset.labels.subarray(1) }
  t.throws(() => new ImageLoader({ ...base, dataset: short }), {
    message: /dataset sample has size 1000 but only 999 labels/,
  })
  t.throws(() => new ImageLoader({ ...base, dataset: { ...dataset, size: 1001 } }), {
    message: /dataset sample has size 1001 but only 1000 images of 28x28x1 pixels/,
  })
  t.throws(() => new ImageLoader({ ...base, rank: 2, worldSize: 2 }), {
    message: /rank must be an integer in \[0, 1\]/,
  })
  t.throws(() => new ImageLoader({ ...base, views: [{ ...identityView(1), channels: 2 as 1 }] }), {
    message: /channels must be 1 or 3/,
  })
  t.throws(() => new ImageLoader({ ...base, transform: { kind: 'train', scale: [0.5, 0.1] } }), {
    message: /transform\.scale/,
  })
  t.throws(() => new ImageLoader({ ...base, threads: 0 }), { message: /threads must be at least 1/ })
})

test('the bundled Fashion-MNIST subset passes through unchanged with the identity view', async (t) => {
  const images = await loadFashionMnist({ split: 'test' })
  const dataset = pixelDataset(images, 'sample')
  const loader = new ImageLoader({
    dataset,
    views: [identityView(1, [28, 28])],
    transform: { kind: 'eval', cropFraction: 1 },
    batchSize: 100,
    seed: 3,
  })
  const [batch] = await loadAll(loader)
  t.is(batch.size, 100)
  for (let b = 0; b < batch.size; b++) {
    const index = batch.indices[b]
    t.is(batch.labels[b], images.labels[index])
    const src = images.images.subarray(index * 784, (index + 1) * 784)
    const got = batch.views[0].subarray(b * 784, (b + 1) * 784)
    if (!src.every((v, i) => Math.round(got[i] * 255) === v)) t.fail(`image ${index} differs`)
  }
})

test('viewSpec builds every view: square or [h, w], one value or one per channel, defaults 0 / 1', (t) => {
  t.deepEqual(viewSpec({ size: 28, interpolation: 'bicubic', channels: 1, mean: 0.5, std: 0.5 }), {
    size: [28, 28],
    interpolation: 'bicubic',
    channels: 1,
    mean: [0.5],
    std: [0.5],
  })
  t.deepEqual(viewSpec({ size: [16, 24], interpolation: 'lanczos', channels: 3 }), {
    size: [16, 24],
    interpolation: 'lanczos',
    channels: 3,
    mean: [0, 0, 0],
    std: [1, 1, 1],
  })
  t.deepEqual(viewSpec({ size: 8, interpolation: 'nearest', channels: 3, mean: [0.1, 0.2, 0.3] }).mean, [0.1, 0.2, 0.3])
  t.deepEqual(beitViews({ imageSize: 28, tokenizerSize: 14, channels: 1 }), [
    viewSpec({ size: 28, interpolation: 'bicubic', channels: 1, mean: 0.5, std: 0.5 }),
    viewSpec({ size: 14, interpolation: 'lanczos', channels: 1 }),
  ])
  t.throws(() => viewSpec({ size: 8, interpolation: 'nearest', channels: 2 }), {
    message: 'a view has 1 or 3 channels, got 2',
  })
  t.throws(() => viewSpec({ size: 8, interpolation: 'nearest', channels: 3, std: [1, 2] }), {
    message: 'view std: expected one number or 3 (one per channel), got [1,2]',
  })
})

test('BEiT views: shapes, ranges, seeded reproducibility, epochs differ, resume from a batch', async (t) => {
  const dataset = pixelDataset(await loadFashionMnist({ split: 'test' }), 'sample')
  const views = beitViews({ imageSize: 32, tokenizerSize: 16, channels: 1 })
  const make = (seed: number) =>
    new ImageLoader({ dataset, views, transform: { kind: 'train', scale: [0.4, 1] }, batchSize: 64, seed, prefetch: 3 })
  const loader = make(7)
  t.is(loader.batchesPerEpoch, Math.ceil(1000 / 64))
  const first = await loadAll(loader)
  t.is(first.length, 16)
  t.is(first[15].size, 1000 - 15 * 64)
  t.is(first[0].views[0].length, 64 * 32 * 32)
  t.is(first[0].views[1].length, 64 * 16 * 16)
  t.true(first[0].views[0].every((v) => v >= -1.0001 && v <= 1.0001))
  t.true(first[0].views[1].every((v) => v >= 0 && v <= 1))
  const again = await loadAll(make(7))
  t.deepEqual(
    again.map((b) => b.views),
    first.map((b) => b.views),
  )
  const otherSeed = await loadAll(make(8))
  t.notDeepEqual(otherSeed[0].indices, first[0].indices)
  const nextEpoch = await loadAll(loader, 1)
  t.notDeepEqual(nextEpoch[0].indices, first[0].indices)
  // Same image in two epochs: different augmentation.
  const index = first[0].indices[0]
  const inEpoch1 = nextEpoch.flatMap((b) => [...b.indices].map((i, k) => ({ i, b, k }))).find((e) => e.i === index)!
  t.notDeepEqual(
    inEpoch1.b.views[0].subarray(inEpoch1.k * 1024, (inEpoch1.k + 1) * 1024),
    first[0].views[0].subarray(0, 1024),
  )
  // Resuming at batch 10 yields exactly batches 10.. of the uninterrupted epoch.
  const resumed: Batch[] = []
  for await (const b of make(7).epoch(0, { fromBatch: 10 })) resumed.push(b)
  t.deepEqual(
    resumed.map((b) => b.views),
    first.slice(10).map((b) => b.views),
  )
})

test('uneven shards (evaluation) cover the epoch exactly once; dropLast drops the partial batch', async (t) => {
  const dataset = pixelDataset(await loadFashionMnist({ split: 'test' }), 'sample')
  const seen = new Uint8Array(dataset.size)
  for (let rank = 0; rank < 3; rank++) {
    const loader = new ImageLoader({
      dataset,
      views: [identityView(1, [8, 8])],
      transform: { kind: 'eval' },
      batchSize: 50,
      seed: 1,
      rank,
      worldSize: 3,
      evenShards: false,
    })
    for (const batch of await loadAll(loader, 2)) for (const i of batch.indices) seen[i]++
  }
  t.true(seen.every((n) => n === 1))
  const dropping = new ImageLoader({
    dataset,
    views: [identityView(1, [8, 8])],
    transform: { kind: 'eval' },
    batchSize: 300,
    dropLast: true,
  })
  const batches = await loadAll(dropping)
  t.deepEqual(
    batches.map((b) => b.size),
    [300, 300, 300],
  )
})

test('even shards: every rank the same batches, together the batches of one process with worldSize x batchSize', async (t) => {
  const dataset = pixelDataset(await loadFashionMnist({ split: 'test' }), 'sample')
  const base = { dataset, views: [identityView(1, [8, 8])], transform: { kind: 'eval' as const }, seed: 3 }
  for (const dropLast of [false, true]) {
    const whole = await loadAll(new ImageLoader({ ...base, batchSize: 3 * 70, dropLast }))
    const ranks = await Promise.all(
      [0, 1, 2].map((rank) => loadAll(new ImageLoader({ ...base, batchSize: 70, dropLast, rank, worldSize: 3 }))),
    )
    const counts = ranks.map((batches) => batches.length)
    t.deepEqual(counts, [counts[0], counts[0], counts[0]], 'the same number of batches on every rank')
    t.is(counts[0], dropLast ? Math.floor(dataset.size / 210) : Math.ceil(dataset.size / 210))
    for (let k = 0; k < whole.length; k++) {
      const joined = ranks.flatMap((batches) => Array.from(batches[k].indices))
      const sizes = ranks.map((batches) => batches[k].size)
      t.deepEqual(sizes, [sizes[0], sizes[0], sizes[0]], `batch ${k}: equal parts`)
      if (k < whole.length - 1 || dropLast) t.deepEqual(joined, Array.from(whole[k].indices), `batch ${k}`)
    }
    if (!dropLast) {
      // The last global batch is padded to a multiple of 3 with the epoch's first images.
      const last = ranks.flatMap((batches) => Array.from(batches[batches.length - 1].indices))
      const lastWhole = Array.from(whole[whole.length - 1].indices)
      t.deepEqual(last.slice(0, lastWhole.length), lastWhole)
      t.deepEqual(
        last.slice(lastWhole.length),
        Array.from(whole[0].indices.subarray(0, last.length - lastWhole.length)),
      )
    }
  }
})
