/**
 * Training throughput on this machine's CPU: images/s of `trainStep` and peak RSS, for the tiny
 * preset at 32x32 / patch 4 and at 224 / patch 16. Not a test: prints numbers.
 *   node dist/bench/train-step.js [--steps N]
 */
import { parseArgs } from 'node:util'

import { BlockwiseMaskGenerator } from '../masking'
import { Beit } from '../model'
import { Rng } from '../rng'

interface Case {
  name: string
  imageSize: number
  patchSize: number
  batchSize: number
}

const CASES: Case[] = [
  { name: 'tiny 32x32/p4', imageSize: 32, patchSize: 4, batchSize: 64 },
  { name: 'tiny 224/p16', imageSize: 224, patchSize: 16, batchSize: 8 },
]

async function run(c: Case, steps: number): Promise<void> {
  const model = Beit.create({ preset: 'tiny', imageSize: [c.imageSize, c.imageSize], patchSize: c.patchSize })
  const grid = c.imageSize / c.patchSize
  const n = grid * grid
  const masking = new BlockwiseMaskGenerator({ height: grid, width: grid, numMaskingPatches: Math.round(0.4 * n), minNumPatches: Math.min(16, Math.round(0.4 * n)) })
  const rng = new Rng(1)
  const pixels = new Float32Array(c.batchSize * 3 * c.imageSize * c.imageSize).map(() => rng.uniform(-1, 1))
  const targets = new Int32Array(c.batchSize * n).map(() => rng.int(0, 8191))
  const mask = new Uint8Array(c.batchSize * n)
  for (let b = 0; b < c.batchSize; b++) mask.set(masking.generate(), b * n)
  await model.trainStep({ pixels, mask, targets, lr: 1e-4 }) // warm-up, not timed
  const rssAfterWarmup = process.memoryUsage().rss / 2 ** 20
  const started = performance.now()
  for (let s = 0; s < steps; s++) await model.trainStep({ pixels, mask, targets, lr: 1e-4, seed: s })
  const seconds = (performance.now() - started) / 1000
  const rssMiB = process.resourceUsage().maxRSS / 1024
  const rssNow = process.memoryUsage().rss / 2 ** 20
  console.log(
    `${c.name.padEnd(16)} batch ${String(c.batchSize).padStart(3)}  ${((steps * c.batchSize) / seconds).toFixed(1).padStart(7)} img/s  ` +
      `${((seconds / steps) * 1000).toFixed(0).padStart(6)} ms/step  peak RSS ${rssMiB.toFixed(0)} MiB, ` +
      `RSS after warm-up ${rssAfterWarmup.toFixed(0)} -> after ${steps} steps ${rssNow.toFixed(0)} MiB  (${model.numParameters.toLocaleString()} params)`,
  )
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { steps: { type: 'string', default: '5' } } })
  const steps = Number(values.steps)
  console.log(`trainStep on CPU, ${steps} timed steps after one warm-up step (peak RSS is cumulative over the process)`)
  for (const c of CASES) await run(c, steps)
}

main().catch((e: unknown) => {
  console.error(e)
  process.exitCode = 1
})
