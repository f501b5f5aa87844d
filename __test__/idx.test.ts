import test, { type ExecutionContext } from 'ava'
import { existsSync } from 'node:fs'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { gzipSync } from 'node:zlib'

import { parseIdx, readIdx, type IdxArray } from '../src/data/idx'
import {
  DEBIAN_FASHION_MNIST_DIR,
  FASHION_MNIST_CLASSES,
  embeddedSampleDir,
  loadFashionMnist,
} from '../src/data/fashion-mnist'

// --- a minimal IDX writer, independent of the parser, to build test inputs ---

const WRITERS = {
  uint8: { code: 0x08, bytes: 1, set: (v: DataView, o: number, x: number) => v.setUint8(o, x) },
  int8: { code: 0x09, bytes: 1, set: (v: DataView, o: number, x: number) => v.setInt8(o, x) },
  int16: { code: 0x0b, bytes: 2, set: (v: DataView, o: number, x: number) => v.setInt16(o, x, false) },
  int32: { code: 0x0c, bytes: 4, set: (v: DataView, o: number, x: number) => v.setInt32(o, x, false) },
  float32: { code: 0x0d, bytes: 4, set: (v: DataView, o: number, x: number) => v.setFloat32(o, x, false) },
  float64: { code: 0x0e, bytes: 8, set: (v: DataView, o: number, x: number) => v.setFloat64(o, x, false) },
} as const

function writeIdx(dtype: IdxArray['dtype'], shape: number[], values: ArrayLike<number>): Uint8Array {
  const { code, bytes, set } = WRITERS[dtype]
  const header = 4 + 4 * shape.length
  const out = new Uint8Array(header + values.length * bytes)
  const view = new DataView(out.buffer)
  view.setUint8(2, code)
  view.setUint8(3, shape.length)
  shape.forEach((size, d) => view.setUint32(4 + 4 * d, size, false))
  for (let i = 0; i < values.length; i++) set(view, header + i * bytes, values[i])
  return out
}

async function tempDir(t: ExecutionContext): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'beit-idx-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  return dir
}

function countPerClass(labels: Uint8Array): number[] {
  const counts = Array.from({ length: FASHION_MNIST_CLASSES.length }, () => 0)
  for (const label of labels) counts[label]++
  return counts
}

function pixelRange(images: Uint8Array): [number, number] {
  let min = 255
  let max = 0
  for (const p of images) {
    if (p < min) min = p
    if (p > max) max = p
  }
  return [min, max]
}

// --- the embedded sample ---

for (const [split, count, perClass] of [
  ['train', 5000, 500],
  ['test', 1000, 100],
] as const) {
  test(`embedded sample ${split}: ${count} 28x28 images, ${perClass} per class`, async (t) => {
    const set = await loadFashionMnist({ split })
    t.is(set.count, count)
    t.is(set.height, 28)
    t.is(set.width, 28)
    t.is(set.channels, 1)
    t.is(set.images.length, count * 28 * 28)
    t.is(set.labels.length, count)
    t.deepEqual(
      countPerClass(set.labels),
      Array.from({ length: 10 }, () => perClass),
    )
    t.true(set.labels.every((label) => label <= 9))
    t.deepEqual(pixelRange(set.images), [0, 255])
    t.deepEqual(set.classNames, FASHION_MNIST_CLASSES)
  })
}

test('embedded sample keeps the original order: first train labels match Fashion-MNIST', async (t) => {
  // The first training images of Fashion-MNIST are Ankle boot, T-shirt, T-shirt, Dress, T-shirt, Pullover, Sneaker, Pullover.
  const { labels } = await loadFashionMnist({ split: 'train' })
  t.deepEqual([...labels.subarray(0, 8)], [9, 0, 0, 3, 0, 2, 7, 2])
})

test('embeddedSampleDir points at the bundled data folder', (t) => {
  t.regex(embeddedSampleDir(), /[/\\]data[/\\]fashion-mnist-sample$/)
  t.true(existsSync(join(embeddedSampleDir(), 'train-images-idx3-ubyte.gz')))
})

test('readIdx parses the gzipped sample files with their raw IDX shapes', async (t) => {
  const images = await readIdx(join(embeddedSampleDir(), 't10k-images-idx3-ubyte.gz'))
  t.is(images.dtype, 'uint8')
  t.deepEqual(images.shape, [1000, 28, 28])
  const labels = await readIdx(join(embeddedSampleDir(), 't10k-labels-idx1-ubyte.gz'))
  t.deepEqual(labels.shape, [1000])
})

// --- round trip through the test writer, every dtype, raw and gzipped ---

const CASES: { dtype: IdxArray['dtype']; shape: number[]; expected: IdxArray['data'] }[] = [
  { dtype: 'uint8', shape: [2, 3], expected: Uint8Array.of(0, 1, 127, 128, 254, 255) },
  { dtype: 'int8', shape: [6], expected: Int8Array.of(-128, -1, 0, 1, 64, 127) },
  { dtype: 'int16', shape: [3, 2], expected: Int16Array.of(-32768, -1, 0, 1, 0x1234, 32767) },
  { dtype: 'int32', shape: [1, 2, 3], expected: Int32Array.of(-2147483648, -1, 0, 1, 0x12345678, 2147483647) },
  {
    dtype: 'float32',
    shape: [2, 1, 3, 1],
    expected: Float32Array.of(-1.5, 0, Math.fround(0.1), 3.25e38, -Infinity, Math.fround(1e-40)),
  },
  { dtype: 'float64', shape: [3, 2], expected: Float64Array.of(Math.PI, -0, 1e308, Number.MIN_VALUE, -Infinity, NaN) },
]

for (const { dtype, shape, expected } of CASES) {
  for (const gzipped of [false, true]) {
    test(`parseIdx round-trips ${dtype} shape [${shape}] (${gzipped ? 'gzipped' : 'raw'})`, (t) => {
      const raw = writeIdx(dtype, shape, expected)
      const parsed = parseIdx(gzipped ? gzipSync(raw) : raw)
      t.is(parsed.dtype, dtype)
      t.deepEqual(parsed.shape, shape)
      t.is(parsed.data.constructor, expected.constructor)
      t.deepEqual(parsed.data, expected)
    })
  }
}

test('parseIdx reads multi-byte values big-endian', (t) => {
  // Hand-written bytes, so a writer/parser pair that agreed on the wrong byte order would still fail here.
  const bytes = Uint8Array.of(0, 0, 0x0b, 1, 0, 0, 0, 2, 0x01, 0x02, 0xff, 0xfe)
  t.deepEqual(parseIdx(bytes).data, Int16Array.of(0x0102, -2))
})

test('parseIdx result does not alias the input bytes', (t) => {
  const raw = writeIdx('uint8', [3], [1, 2, 3])
  const parsed = parseIdx(raw)
  raw[raw.length - 1] = 99
  t.deepEqual(parsed.data, Uint8Array.of(1, 2, 3))
})

// --- errors ---

test('parseIdx rejects bad magic and names the source', (t) => {
  const bytes = writeIdx('uint8', [2], [1, 2])
  bytes[1] = 0x07
  t.throws(() => parseIdx(bytes, 'my-file.idx'), { message: /my-file\.idx.*bad magic.*expected.*00 00, got 00 07/ })
})

test('parseIdx rejects an unknown dtype code', (t) => {
  const bytes = writeIdx('uint8', [2], [1, 2])
  bytes[2] = 0x0a
  t.throws(() => parseIdx(bytes, 'x.idx'), { message: /x\.idx.*unknown dtype code 0x0a/ })
})

test('parseIdx rejects truncated data with expected and actual sizes', (t) => {
  const bytes = writeIdx('int32', [2, 2], [1, 2, 3, 4])
  t.throws(() => parseIdx(bytes.subarray(0, bytes.length - 3), 'x.idx'), {
    message: /x\.idx.*truncated data.*needs 16 data bytes, got 13/,
  })
})

test('parseIdx rejects a truncated header', (t) => {
  t.throws(() => parseIdx(Uint8Array.of(0, 0), 'x.idx'), { message: /header truncated.*at least 4 bytes, got 2/ })
  const bytes = writeIdx('uint8', [2, 3], [1, 2, 3, 4, 5, 6])
  t.throws(() => parseIdx(bytes.subarray(0, 9), 'x.idx'), {
    message: /header truncated.*2 dimensions need 12 header bytes, got 9/,
  })
})

test('parseIdx rejects trailing bytes', (t) => {
  const bytes = writeIdx('uint8', [2], [1, 2])
  const padded = new Uint8Array(bytes.length + 3)
  padded.set(bytes)
  t.throws(() => parseIdx(padded, 'x.idx'), { message: /x\.idx.*3 trailing bytes.*needs 2 data bytes, got 5/ })
})

test('parseIdx rejects zero dimensions and zero-size dimensions', (t) => {
  t.throws(() => parseIdx(Uint8Array.of(0, 0, 0x08, 0), 'x.idx'), { message: /x\.idx.*zero dimensions/ })
  t.throws(() => parseIdx(writeIdx('uint8', [3, 0], []), 'x.idx'), { message: /x\.idx.*dimension 1 has size 0/ })
})

test('parseIdx reports corrupt gzip', (t) => {
  const gz = gzipSync(writeIdx('uint8', [4], [1, 2, 3, 4]))
  t.throws(() => parseIdx(gz.subarray(0, 12), 'x.idx.gz'), { message: /x\.idx\.gz.*gzip decompression failed/ })
})

test('readIdx names a missing path', async (t) => {
  const path = join(await tempDir(t), 'nope-idx1-ubyte')
  const err = await t.throwsAsync(readIdx(path))
  t.true(err?.message.includes(`IDX file not found: ${path}`))
})

// --- loadFashionMnist on hand-made folders ---

async function writeSplit(dir: string, images: Uint8Array, imageShape: number[], labels: number[], gz = true) {
  const encode = (bytes: Uint8Array) => (gz ? gzipSync(bytes) : bytes)
  const ext = gz ? '.gz' : ''
  await writeFile(join(dir, `t10k-images-idx3-ubyte${ext}`), encode(writeIdx('uint8', imageShape, images)))
  await writeFile(join(dir, `t10k-labels-idx1-ubyte${ext}`), encode(writeIdx('uint8', [labels.length], labels)))
}

test('loadFashionMnist accepts uncompressed file names', async (t) => {
  const dir = await tempDir(t)
  const images = Uint8Array.from({ length: 2 * 28 * 28 }, (_, i) => i % 256)
  await writeSplit(dir, images, [2, 28, 28], [3, 8], false)
  const set = await loadFashionMnist({ split: 'test', dir })
  t.is(set.count, 2)
  t.deepEqual(set.labels, Uint8Array.of(3, 8))
  t.deepEqual(set.images, images)
})

test('loadFashionMnist rejects a label/image count mismatch', async (t) => {
  const dir = await tempDir(t)
  await writeSplit(dir, new Uint8Array(3 * 28 * 28), [3, 28, 28], [1, 2])
  await t.throwsAsync(loadFashionMnist({ split: 'test', dir }), {
    message: /label\/image count mismatch.*3 images.*2 labels/,
  })
})

test('loadFashionMnist rejects labels outside 0..9', async (t) => {
  const dir = await tempDir(t)
  await writeSplit(dir, new Uint8Array(2 * 28 * 28), [2, 28, 28], [4, 10])
  await t.throwsAsync(loadFashionMnist({ split: 'test', dir }), {
    message: /label 10 at index 1 is out of range, expected 0\.\.9/,
  })
})

test('loadFashionMnist rejects images that are not 28x28', async (t) => {
  const dir = await tempDir(t)
  await writeSplit(dir, new Uint8Array(2 * 32 * 32), [2, 32, 32], [0, 1])
  await t.throwsAsync(loadFashionMnist({ split: 'test', dir }), {
    message: /expected images \[N, 28, 28\], got shape \[2, 32, 32\]/,
  })
})

test('loadFashionMnist rejects non-uint8 images', async (t) => {
  const dir = await tempDir(t)
  await writeFile(join(dir, 't10k-images-idx3-ubyte'), writeIdx('float32', [1, 28, 28], new Float32Array(28 * 28)))
  await writeFile(join(dir, 't10k-labels-idx1-ubyte'), writeIdx('uint8', [1], [0]))
  await t.throwsAsync(loadFashionMnist({ split: 'test', dir }), { message: /expected uint8 images.*got float32/ })
})

test('loadFashionMnist names both candidate files when one is missing', async (t) => {
  const dir = await tempDir(t)
  await t.throwsAsync(loadFashionMnist({ split: 'train', dir }), {
    message: /not found: expected .*train-images-idx3-ubyte\.gz or .*train-images-idx3-ubyte$/,
  })
})

// --- the full dataset from the Debian package, when this machine has it ---

const debianInstalled = existsSync(DEBIAN_FASHION_MNIST_DIR)
const debianTest = debianInstalled ? test : test.skip

debianTest(
  `Debian dataset (skipped when ${DEBIAN_FASHION_MNIST_DIR} is absent): 60000/10000 images, sample is its class-quota subset`,
  async (t) => {
    for (const [split, fullCount, perClass] of [
      ['train', 60000, 500],
      ['test', 10000, 100],
    ] as const) {
      const full = await loadFashionMnist({ split, dir: DEBIAN_FASHION_MNIST_DIR })
      t.is(full.count, fullCount)
      t.deepEqual(
        countPerClass(full.labels),
        Array.from({ length: 10 }, () => fullCount / 10),
      )

      // Rebuild the sample by the documented rule and compare with the bundled files byte for byte.
      const taken = Array.from({ length: 10 }, () => 0)
      const keep: number[] = []
      full.labels.forEach((label, i) => {
        if (taken[label] < perClass) {
          taken[label]++
          keep.push(i)
        }
      })
      const pixels = 28 * 28
      const sample = await loadFashionMnist({ split })
      t.deepEqual(
        sample.labels,
        Uint8Array.from(keep, (i) => full.labels[i]),
      )
      const expectedImages = new Uint8Array(keep.length * pixels)
      keep.forEach((src, dst) =>
        expectedImages.set(full.images.subarray(src * pixels, (src + 1) * pixels), dst * pixels),
      )
      t.true(
        Buffer.from(sample.images).equals(Buffer.from(expectedImages)),
        `${split} sample images differ from the rule`,
      )
    }
  },
)
