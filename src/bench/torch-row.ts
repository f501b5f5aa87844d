/**
 * beit's side of `npm run bench:torch` and `npm run bench:scaling` (scripts/bench/torch_row.py
 * is PyTorch's): one row of scripts/bench/rows.json, resolved by the orchestrator, run in its
 * own process so its peak RSS is its own. Prints one JSON line: images/s over the timed steps
 * and peak RSS.
 *   node dist/bench/torch-row.js --row '<json>' --steps N [--warmup 2] [--precision bf16]
 * `--precision bf16` runs the row in the CPU engine's mixed precision (bf16 GEMM inputs, f32
 * sums).
 * Under mpiexec each rank takes its share of the row's batch (one update of the whole batch per
 * step, gradients summed across ranks) and rank 0 prints, with the all-reduce's share of the
 * step. The compute threads are rayon's (RAYON_NUM_THREADS, set by the orchestrator).
 */
import { parseArgs } from 'node:util'

import { Classifier } from '../classifier'
import { detectLaunch, Distributed, initDistributed, SINGLE_PROCESS } from '../distributed'
import { RandomMaskGenerator } from '../masking'
import { Beit } from '../model'
import { Rng } from '../rng'
import { Segmenter } from '../segmenter'
import { Dvae } from '../tokenizer'
import { ResolvedRow } from './torch-rows'

/** One step; the seconds it spent in the all-reduce (0 on one process). */
type Step = () => Promise<number>

function uniform(rng: Rng, n: number, lo: number, hi: number): Float32Array {
  return new Float32Array(n).map(() => rng.uniform(lo, hi))
}

/** One process: the one-call step; a rank of a job: its share of the batch, then the update of all. */
function stepOf(
  model: Beit | Classifier | Dvae,
  d: Distributed,
  whole: (seed: number) => Promise<unknown>,
  part: (seed: number) => Promise<unknown>,
): Step {
  let seed = 0
  if (d.worldSize === 1) return () => whole(seed++).then(() => 0)
  return async () => {
    await part(seed++)
    return (await model.applyUpdate(1e-4)).allReduceSeconds
  }
}

async function build(
  row: ResolvedRow,
  rng: Rng,
  d: Distributed,
  precision: 'f32' | 'bf16',
): Promise<{ step: Step; parameters: number }> {
  if (row.batchSize % d.worldSize !== 0)
    throw new Error(`batch ${row.batchSize} does not split into ${d.worldSize} equal shares`)
  const b = row.batchSize / d.worldSize
  const placed = async <M extends Beit | Classifier | Dvae>(model: M, step: Step) => {
    if (d.worldSize > 1) await model.distribute()
    return { step, parameters: model.numParameters }
  }
  switch (row.kind) {
    case 'mim': {
      const c = row.config
      const model = Beit.create(c, { precision })
      const [gh, gw] = model.grid
      const n = gh * gw
      const masking = new RandomMaskGenerator({ height: gh, width: gw, maskRatio: row.maskRatio, seed: 1 })
      const pixels = uniform(rng, b * c.numChannels * c.imageSize[0] * c.imageSize[1], -1, 1)
      const targets = new Int32Array(b * n).map(() => rng.int(0, c.vocabSize - 1))
      const mask = new Uint8Array(b * n)
      for (let i = 0; i < b; i++) mask.set(masking.generate(), i * n)
      const batch = { pixels, mask, targets }
      return placed(
        model,
        stepOf(
          model,
          d,
          (seed) => model.trainStep({ ...batch, lr: 1e-4, seed }),
          (seed) => model.lossAndGrads({ ...batch, seed, firstSample: d.rank * b }),
        ),
      )
    }
    case 'classifier': {
      const c = row.config
      const model = Classifier.create({ model: c, numLabels: row.numLabels }, { precision })
      const pixels = uniform(rng, b * c.numChannels * c.imageSize[0] * c.imageSize[1], -1, 1)
      const labels = new Int32Array(b).map(() => rng.int(0, row.numLabels - 1))
      return placed(
        model,
        stepOf(
          model,
          d,
          (seed) => model.trainStep({ pixels, labels, lr: 1e-4, seed }),
          (seed) => model.lossAndGrads({ pixels, labels, seed, firstSample: d.rank * b }),
        ),
      )
    }
    case 'segmenter': {
      if (d.worldSize > 1) throw new Error('segmentation is not a data-parallel row (no synchronised BatchNorm yet)')
      const s = row.segmenterConfig
      const model = Segmenter.create(s, { precision })
      const [h, w] = s.model.imageSize
      const pixels = uniform(rng, b * s.model.numChannels * h * w, -1, 1)
      const masks = new Uint8Array(b * h * w).map(() => rng.int(0, s.numLabels - 1))
      let seed = 0
      return {
        step: () => model.trainStep({ pixels, masks, lr: 1e-4, seed: seed++ }).then(() => 0),
        parameters: model.numParameters,
      }
    }
    case 'tokenizer-train':
    case 'tokenizer-encode': {
      const tokenizer = Dvae.create(row.tokenizerConfig, { precision })
      const size = { height: row.imageSize, width: row.imageSize }
      const pixels = uniform(rng, b * row.tokenizerConfig.numChannels * row.imageSize * row.imageSize, 0, 1)
      if (row.kind === 'tokenizer-encode') {
        if (d.worldSize > 1) throw new Error('encoding is not a data-parallel row')
        return { step: () => tokenizer.encode(pixels, b, size).then(() => 0), parameters: tokenizer.numParameters }
      }
      const relaxation = { temperature: 1, klWeight: 1 }
      return placed(
        tokenizer,
        stepOf(
          tokenizer,
          d,
          (seed) => tokenizer.trainStep({ pixels, ...size, ...relaxation, lr: 1e-4, seed }),
          (seed) => tokenizer.lossAndGrads({ pixels, size, ...relaxation, seed, firstSample: d.rank * b }),
        ),
      )
    }
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      row: { type: 'string' },
      steps: { type: 'string' },
      warmup: { type: 'string', default: '2' },
      precision: { type: 'string', default: 'f32' },
    },
  })
  const precision = values.precision
  if (precision !== 'f32' && precision !== 'bf16') throw new Error(`--precision must be f32 or bf16, got ${precision}`)
  const row = JSON.parse(values.row ?? '') as ResolvedRow
  const d = detectLaunch() ? initDistributed() : SINGLE_PROCESS
  const startRssMiB = process.memoryUsage().rss / 2 ** 20
  const { step, parameters } = await build(row, new Rng(d.rank), d, precision)
  for (let i = 0; i < Number(values.warmup); i++) await step()
  const steps = Number(values.steps)
  let allReduceSeconds = 0
  const started = performance.now()
  for (let i = 0; i < steps; i++) allReduceSeconds += await step()
  const seconds = (performance.now() - started) / 1000
  if (d.rank > 0) return
  const ranks = d.worldSize > 1 ? `${d.worldSize} ranks x ` : ''
  console.log(
    JSON.stringify({
      imagesPerSecond: (steps * row.batchSize) / seconds,
      peakRssMiB: process.resourceUsage().maxRSS / 1024,
      startRssMiB,
      version: `beit ${precision}, ${ranks}${process.env.RAYON_NUM_THREADS ?? 'all'} threads`,
      parameters,
      allReduceShare: allReduceSeconds / seconds,
      allReduceSeconds: allReduceSeconds / steps,
    }),
  )
}

main().catch((e: unknown) => {
  console.error(e)
  process.exitCode = 1
})
