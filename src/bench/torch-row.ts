/**
 * beit's side of `npm run bench:torch` (scripts/bench/torch_row.py is PyTorch's): one row of
 * scripts/bench/rows.json, resolved by the orchestrator (torch.ts), run in its own process so
 * its peak RSS is its own. Prints one JSON line: images/s over the timed steps and peak RSS.
 *   node dist/bench/torch-row.js --row '<json>' --steps N [--warmup 2]
 * The compute threads are rayon's (RAYON_NUM_THREADS, set by the orchestrator).
 */
import { parseArgs } from 'node:util'

import { Classifier } from '../classifier'
import { RandomMaskGenerator } from '../masking'
import { Beit } from '../model'
import { Rng } from '../rng'
import { Dvae } from '../tokenizer'
import { ResolvedRow } from './torch-rows'

type Step = () => Promise<unknown>

function uniform(rng: Rng, n: number, lo: number, hi: number): Float32Array {
  return new Float32Array(n).map(() => rng.uniform(lo, hi))
}

function build(row: ResolvedRow, rng: Rng): Step {
  const b = row.batchSize
  switch (row.kind) {
    case 'mim': {
      const c = row.config
      const model = Beit.create(c)
      const [gh, gw] = model.grid
      const n = gh * gw
      const masking = new RandomMaskGenerator({ height: gh, width: gw, maskRatio: row.maskRatio, seed: 1 })
      const pixels = uniform(rng, b * c.numChannels * c.imageSize[0] * c.imageSize[1], -1, 1)
      const targets = new Int32Array(b * n).map(() => rng.int(0, c.vocabSize - 1))
      const mask = new Uint8Array(b * n)
      for (let i = 0; i < b; i++) mask.set(masking.generate(), i * n)
      let seed = 0
      return () => model.trainStep({ pixels, mask, targets, lr: 1e-4, seed: seed++ })
    }
    case 'classifier': {
      const c = row.config
      const model = Classifier.create({ model: c, numLabels: row.numLabels })
      const pixels = uniform(rng, b * c.numChannels * c.imageSize[0] * c.imageSize[1], -1, 1)
      const labels = new Int32Array(b).map(() => rng.int(0, row.numLabels - 1))
      let seed = 0
      return () => model.trainStep({ pixels, labels, lr: 1e-4, seed: seed++ })
    }
    case 'tokenizer-train':
    case 'tokenizer-encode': {
      const tokenizer = Dvae.create(row.tokenizerConfig)
      const size = { height: row.imageSize, width: row.imageSize }
      const pixels = uniform(rng, b * row.tokenizerConfig.numChannels * row.imageSize * row.imageSize, 0, 1)
      if (row.kind === 'tokenizer-encode') return () => tokenizer.encode(pixels, b, size)
      let seed = 0
      return () => tokenizer.trainStep({ pixels, ...size, temperature: 1, klWeight: 1, lr: 1e-4, seed: seed++ })
    }
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: { row: { type: 'string' }, steps: { type: 'string' }, warmup: { type: 'string', default: '2' } },
  })
  const row = JSON.parse(values.row ?? '') as ResolvedRow
  const step = build(row, new Rng(0))
  for (let i = 0; i < Number(values.warmup); i++) await step()
  const steps = Number(values.steps)
  const started = performance.now()
  for (let i = 0; i < steps; i++) await step()
  const seconds = (performance.now() - started) / 1000
  console.log(
    JSON.stringify({
      imagesPerSecond: (steps * row.batchSize) / seconds,
      peakRssMiB: process.resourceUsage().maxRSS / 1024,
      version: `beit ${process.env.RAYON_NUM_THREADS ?? 'all'} threads`,
    }),
  )
}

main().catch((e: unknown) => {
  console.error(e)
  process.exitCode = 1
})
