/**
 * Image pipeline throughput on real photographs, ours side by side with sharp (libvips) doing
 * the same work in the same process: decode a JPEG, take a random crop box, flip, color
 * jitter, then a 224 px bicubic and a 112 px Lanczos resize (BEiT's two views).
 *   node dist/bench/decode.js [--photos DIR] [--rounds N]
 * The photos default to .cache/photos (scripts/fetch-bench-photos.sh fills it from Debian's
 * mate-backgrounds: multi-megapixel JPEGs). A second table runs the same photos re-encoded at
 * ImageNet's typical size (500 px wide, baseline 4:2:0, quality 90).
 */
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises'
import { availableParallelism, tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import sharp from 'sharp'

import { beitViews } from '../data/augment'
import type { ImageDataset } from '../data/dataset'
import { ImageLoader } from '../data/loader'
import { Rng } from '../rng'

const { values } = parseArgs({
  options: { photos: { type: 'string', default: '.cache/photos' }, rounds: { type: 'string', default: '3' } },
})
const rounds = Number(values.rounds)

async function main(): Promise<void> {
  const paths = (await readdir(values.photos!))
    .filter((f) => /\.jpe?g$/i.test(f))
    .sort()
    .map((f) => join(values.photos!, f))
  if (paths.length === 0) throw new Error(`no JPEG photos in ${values.photos}; run scripts/fetch-bench-photos.sh first`)
  await compare(paths)
  const small = await mkdtemp(join(tmpdir(), 'beit-bench-'))
  try {
    const resized = await Promise.all(
      paths.map(async (p, i) => {
        const out = join(small, `${i}.jpg`)
        await sharp(p).resize(500).jpeg({ quality: 90, progressive: false, chromaSubsampling: '4:2:0' }).toFile(out)
        return out
      }),
    )
    await compare(resized)
  } finally {
    await rm(small, { recursive: true, force: true })
  }
}

async function compare(paths: string[]): Promise<void> {
  const sizes = await Promise.all(
    paths.map(async (p) => (await sharp(p).metadata()) as { width: number; height: number }),
  )
  const megapixels = sizes.reduce((s, m) => s + m.width * m.height, 0) / sizes.length / 1e6
  console.log(
    `\n${paths.length} JPEG photos, mean ${megapixels.toFixed(2)} MP; ${rounds} rounds each; ${availableParallelism()} cores`,
  )
  const buffers = await Promise.all(paths.map((p) => readFile(p)))

  const dataset: ImageDataset = {
    name: 'photos',
    size: paths.length,
    source: { kind: 'files', paths },
    labels: new Int32Array(paths.length).fill(-1),
    classNames: [],
    ignoredFiles: 0,
  }
  const views = beitViews()
  const ours = async (threads: number) => {
    const loader = new ImageLoader({
      dataset,
      views,
      transform: { kind: 'train' },
      batchSize: paths.length,
      threads,
      onError: 'fail',
    })
    await loader.epoch(0).next() // warm-up
    const started = performance.now()
    for (let r = 0; r < rounds; r++) for await (const batch of loader.epoch(r + 1)) void batch
    return (rounds * paths.length) / ((performance.now() - started) / 1000)
  }

  // sharp: the same work, one image per pipeline; `inFlight` pipelines at a time, one libvips
  // thread each.
  const rng = new Rng(1)
  const sharpOne = async (i: number) => {
    const { width, height } = sizes[i]
    const area = width * height * rng.uniform(0.08, 1)
    const ratio = Math.exp(rng.uniform(Math.log(3 / 4), Math.log(4 / 3)))
    const w = Math.min(width, Math.round(Math.sqrt(area * ratio)))
    const h = Math.min(height, Math.round(Math.sqrt(area / ratio)))
    const box = { left: rng.int(0, width - w), top: rng.int(0, height - h), width: w, height: h }
    const base = sharp(buffers[i])
      .extract(box)
      .modulate({ brightness: rng.uniform(0.6, 1.4), saturation: rng.uniform(0.6, 1.4) })
    const c = rng.uniform(0.6, 1.4)
    const jittered = base.linear(c, 128 * (1 - c))
    const flipped = rng.next() < 0.5 ? jittered.flop() : jittered
    await Promise.all([
      flipped.clone().resize(224, 224, { kernel: 'cubic', fit: 'fill' }).raw().toBuffer(),
      flipped.clone().resize(112, 112, { kernel: 'lanczos3', fit: 'fill' }).raw().toBuffer(),
    ])
  }
  const viaSharp = async (inFlight: number) => {
    sharp.concurrency(1)
    await sharpOne(0)
    const started = performance.now()
    let next = 0
    const total = rounds * paths.length
    const worker = async () => {
      while (next < total) await sharpOne(next++ % paths.length)
    }
    await Promise.all(Array.from({ length: inFlight }, worker))
    return total / ((performance.now() - started) / 1000)
  }

  const cores = availableParallelism()
  const rows: [string, number, number][] = []
  for (const threads of [1, cores]) rows.push([`${threads} thread(s)`, await ours(threads), await viaSharp(threads)])
  console.log('                 beit img/s   sharp img/s   ratio')
  for (const [name, a, b] of rows)
    console.log(
      `${name.padEnd(16)} ${a.toFixed(1).padStart(10)} ${b.toFixed(1).padStart(13)} ${(a / b).toFixed(2).padStart(7)}`,
    )
}

main().catch((e) => {
  console.error(e instanceof Error ? e.message : e)
  process.exit(1)
})
