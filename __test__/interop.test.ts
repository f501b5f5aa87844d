/**
 * Hugging Face interop through the public API and the CLI, on the parity fixtures that
 * scripts/interop/make_fixtures.py made with transformers and OpenAI's DALL-E package.
 */
import test from 'ava'
import { execFile } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'

import { Beit, checkpointFormat, Classifier, Dvae, exportHuggingFace, importHuggingFace } from '../src'

const FIXTURES = join(__dirname, '..', 'crate', 'core', 'tests', 'fixtures')
const CLI = join(__dirname, '..', 'dist', 'cli.js')
const hf = (name: string) => join(FIXTURES, 'hf', name)

/** The tensors of a safetensors file (F32, I32 and U8 only: what the fixtures hold). */
function readTensors(path: string): Record<string, { shape: number[]; data: Float32Array | Int32Array | Uint8Array }> {
  const bytes = readFileSync(path)
  const length = Number(bytes.readBigUInt64LE(0))
  const header = JSON.parse(bytes.subarray(8, 8 + length).toString('utf8')) as Record<
    string,
    { dtype: string; shape: number[]; data_offsets: [number, number] }
  >
  const out: Record<string, { shape: number[]; data: Float32Array | Int32Array | Uint8Array }> = {}
  for (const [name, t] of Object.entries(header)) {
    if (name === '__metadata__') continue
    const raw = bytes.subarray(8 + length + t.data_offsets[0], 8 + length + t.data_offsets[1])
    const copy = new Uint8Array(raw).buffer
    const data =
      t.dtype === 'F32' ? new Float32Array(copy) : t.dtype === 'I32' ? new Int32Array(copy) : new Uint8Array(copy)
    out[name] = { shape: t.shape, data }
  }
  return out
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`lengths differ: ${a.length} vs ${b.length}`)
  let worst = 0
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i] - b[i]))
  return worst
}

/** Rows of [B*N, V] logits where the mask is set. */
function maskedRows(logits: Float32Array, mask: Uint8Array, vocab: number): Float32Array {
  const rows: number[] = []
  mask.forEach((m, i) => {
    if (m) rows.push(...logits.subarray(i * vocab, (i + 1) * vocab))
  })
  return Float32Array.from(rows)
}

async function tempDir(t: { teardown: (fn: () => Promise<void>) => void }): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'beit-interop-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  return dir
}

test('a transformers MIM checkpoint imports with its logits, exports, and imports back identical', async (t) => {
  const io = readTensors(join(hf('mim-shared'), 'io.safetensors'))
  const pixels = io.pixel_values.data as Float32Array
  const mask = io.bool_masked_pos.data as Uint8Array
  const model = await Beit.fromHuggingFace(hf('mim-shared'))
  t.deepEqual(model.grid, [4, 4])
  const { logits } = await model.forward({ pixels, mask })
  t.true(maxAbsDiff(logits, maskedRows(io.logits.data as Float32Array, mask, 64)) < 1e-4)

  const dir = await tempDir(t)
  await model.exportHuggingFace(join(dir, 'hf'))
  const config = JSON.parse(await readFile(join(dir, 'hf', 'config.json'), 'utf8'))
  t.like(config, {
    model_type: 'beit',
    architectures: ['BeitForMaskedImageModeling'],
    use_mask_token: true,
    image_size: 16,
    patch_size: 4,
    vocab_size: 64,
  })
  const again = await Beit.fromHuggingFace(join(dir, 'hf'))
  t.deepEqual((await again.forward({ pixels, mask })).logits, logits)
})

test('a resolution change on import resizes the position tables as transformers interpolates them', async (t) => {
  const io = readTensors(join(hf('mim-resize'), 'io.safetensors'))
  const mask = io.bool_masked_pos.data as Uint8Array
  const model = await Beit.fromHuggingFace(hf('mim-resize'), { imageSize: 20 })
  t.deepEqual(model.config.imageSize, [20, 20])
  const { logits } = await model.forward({ pixels: io.pixel_values.data as Float32Array, mask })
  t.true(maxAbsDiff(logits, maskedRows(io.logits.data as Float32Array, mask, 64)) < 1e-4)
  await t.throwsAsync(Beit.fromHuggingFace(hf('mim-resize'), { imageSize: 18 }), { message: /multiple of patchSize 4/ })
  await t.throwsAsync(Beit.fromHuggingFace(hf('mim-resize'), { imageSize: [20] as unknown as number }), {
    message: /imageSize must be/,
  })
})

test('classification checkpoints keep their head; a bare BeitModel gets a new one', async (t) => {
  const io = readTensors(join(hf('cls-token-abs'), 'io.safetensors'))
  const pixels = io.pixel_values.data as Float32Array
  const classifier = await Classifier.fromHuggingFace(hf('cls-token-abs'))
  t.like(classifier.config, { numLabels: 5, pooling: 'cls' })
  t.true(maxAbsDiff(await classifier.predict(pixels), io.logits.data as Float32Array) < 1e-4)
  const relabelled = await Classifier.fromHuggingFace(hf('cls-token-abs'), { numLabels: 3 })
  t.is((await relabelled.predict(pixels)).length, 2 * 3)

  await t.throwsAsync(Classifier.fromHuggingFace(hf('model-pooler')), { message: /numLabels is required/ })
  const fresh = await Classifier.fromHuggingFace(hf('model-pooler'), { numLabels: 4 })
  t.like(fresh.config, { numLabels: 4, pooling: 'mean' })
  await t.throwsAsync(Beit.fromHuggingFace(hf('cls-token-abs')), { message: /needs a BeitForMaskedImageModeling/ })
})

test('importHuggingFace and exportHuggingFace pick the model from the folder and the checkpoint', async (t) => {
  const dir = await tempDir(t)
  const mim = await importHuggingFace(hf('mim-abs-gray'), join(dir, 'mim.safetensors'))
  t.true(mim instanceof Beit)
  t.is(await checkpointFormat(join(dir, 'mim.safetensors')), 'beit-mim/1')
  const cls = await importHuggingFace(hf('cls-mean-nonsquare'), join(dir, 'cls.safetensors'))
  t.true(cls instanceof Classifier)
  t.is(await checkpointFormat(join(dir, 'cls.safetensors')), 'beit-cls/1')
  await exportHuggingFace(join(dir, 'cls.safetensors'), join(dir, 'cls-hf'))
  const config = JSON.parse(await readFile(join(dir, 'cls-hf', 'config.json'), 'utf8'))
  t.like(config, {
    architectures: ['BeitForImageClassification'],
    image_size: [8, 16],
    use_mean_pooling: true,
    // The fixture's own class names, kept with its head.
    id2label: { 0: 'a', 1: 'b', 2: 'c' },
  })
  const tokenizer = join(FIXTURES, 'dalle', 'dvae.safetensors')
  await t.throwsAsync(exportHuggingFace(tokenizer, join(dir, 'x')), { message: /beit-dvae\/1.*cannot be exported/ })
  // transformers writes no id2label for its default labels: the head's rows give the count.
  const { id2label: _, label2id: __, ...unlabelled } = config
  await writeFile(join(dir, 'cls-hf', 'config.json'), JSON.stringify(unlabelled))
  t.is((await Classifier.fromHuggingFace(join(dir, 'cls-hf'))).config.numLabels, 3)
  // A class count for a MIM folder is a mistake, not something to drop.
  await t.throwsAsync(importHuggingFace(hf('mim-abs-gray'), join(dir, 'x.safetensors'), { numLabels: 10 }), {
    message: /numLabels 10 is for a classifier, but .*mim-abs-gray is imported as a BeitForMaskedImageModeling/,
  })
})

test('the CLI imports and exports, and names what is wrong with a folder that does not fit', async (t) => {
  const dir = await tempDir(t)
  const run = promisify(execFile)
  const ckpt = join(dir, 'cls.safetensors')
  const imported = await run(process.execPath, [
    CLI,
    'import',
    '--from',
    hf('model-pooler'),
    '--num-labels',
    '4',
    '--out',
    ckpt,
  ])
  t.regex(imported.stdout, /classifier of 4 classes/)
  const exported = await run(process.execPath, [CLI, 'export', '--from', ckpt, '--out', join(dir, 'hf')])
  t.regex(exported.stdout, /BeitForImageClassification/)
  const again = await Classifier.fromHuggingFace(join(dir, 'hf'))
  t.is(again.config.numLabels, 4)

  const failed = await run(process.execPath, [
    CLI,
    'import',
    '--from',
    join(dir, 'nowhere'),
    '--out',
    join(dir, 'x.safetensors'),
  ]).catch((e: { code: number; stderr: string }) => e)
  t.is((failed as { code: number }).code, 1)
  t.regex((failed as { stderr: string }).stderr, /nowhere.*config\.json/)
})

test('DALL-E weights converted from the package tokenize as the package does', async (t) => {
  const io = readTensors(join(FIXTURES, 'dalle', 'io.safetensors'))
  const dvae = await Dvae.load(join(FIXTURES, 'dalle', 'dvae.safetensors'))
  t.like(dvae.config, { numGroups: 4, hiddenSize: 8, vocabSize: 32, imageSize: [16, 16] })
  const ids = await dvae.encode(io.pixels.data as Float32Array, 2)
  t.deepEqual(Array.from(ids), Array.from(io.ids.data as Int32Array))
})
