/** `beit encode` and `beit reconstruct`: a tokenizer's ids of images, and its reconstructions. */
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'

import { defineCommand, UsageError } from '../cli-options'
import { ImageDataset, subset } from '../data/dataset'
import { openDataset } from '../data/open'
import { writeAtomic } from '../run'
import { Dvae } from '../tokenizer'
import { tokenizerLoader, writeSheet } from '../train-tokenizer'
import { checkOutFile, DATA_HELP, log, placement } from './common'

export const encodeCommand = defineCommand({
  name: 'encode',
  summary: 'Images -> visual token ids, one JSON line per image ({"image", "ids"}).',
  flags: {
    tokenizer: { kind: 'string', help: 'tokenizer checkpoint' },
    data: { kind: 'string', help: DATA_HELP, default: 'sample' },
    split: { kind: 'string', help: 'which split of --data', default: 'test', choices: ['train', 'test'] },
    limit: { kind: 'int', help: 'encode only the first N images' },
    out: { kind: 'string', help: 'output JSONL file', default: join('runs', 'tokens.jsonl') },
  },
  run: async (v) => {
    checkOutFile(v.out)
    if (v.tokenizer === undefined) throw new UsageError('--tokenizer is required')
    const tokenizer = await Dvae.load(v.tokenizer, placement(v))
    const data = limit(await openDataset(v.data, v.split), v.limit)
    const [h, w] = tokenizer.config.imageSize.map((s) => s / tokenizer.downsample)
    const lines: string[] = []
    for await (const batch of tokenizerLoader(tokenizer, data, { batchSize: 64, shuffle: false }).epoch(0)) {
      const ids = await tokenizer.encode(batch.views[0], batch.size)
      for (let i = 0; i < batch.size; i++) {
        const image =
          data.source.kind === 'files' ? data.source.paths[batch.indices[i]] : `${data.name}[${batch.indices[i]}]`
        lines.push(JSON.stringify({ image, grid: [h, w], ids: Array.from(ids.subarray(i * h * w, (i + 1) * h * w)) }))
      }
    }
    await mkdir(join(v.out, '..'), { recursive: true })
    await writeAtomic(v.out, lines.join('\n') + '\n')
    log(v, `${lines.length} images -> ${h}x${w} token ids of ${tokenizer.config.vocabSize}: ${v.out}`)
  },
})

/** The first `n` images of `data` (all of them without `n`). */
function limit(data: ImageDataset, n: number | undefined): ImageDataset {
  if (n === undefined || n >= data.size) return data
  return subset(
    data,
    Array.from({ length: n }, (_, i) => i),
    `${data.name} (first ${n})`,
  )
}

export const reconstructCommand = defineCommand({
  name: 'reconstruct',
  summary: 'Images -> tokens -> images: a PNG sheet of originals above their reconstructions.',
  flags: {
    tokenizer: { kind: 'string', help: 'tokenizer checkpoint' },
    data: { kind: 'string', help: DATA_HELP, default: 'sample' },
    split: { kind: 'string', help: 'which split of --data', default: 'test', choices: ['train', 'test'] },
    count: { kind: 'int', help: 'images on the sheet', default: 16 },
    out: { kind: 'string', help: 'PNG file', default: join('runs', 'reconstructions.png') },
  },
  run: async (v) => {
    checkOutFile(v.out)
    if (v.tokenizer === undefined) throw new UsageError('--tokenizer is required')
    const tokenizer = await Dvae.load(v.tokenizer, placement(v))
    const data = await openDataset(v.data, v.split)
    await mkdir(join(v.out, '..'), { recursive: true })
    const count = await writeSheet(tokenizer, data, v.count, v.out)
    log(v, `${count} originals above their reconstructions: ${v.out}`)
  },
})
