/**
 * dVAE tokenizer throughput on this machine's CPU: encode images/s and train-step images/s for
 * the small preset at 28 px (grayscale) and for the dall-e preset at 112 px (RGB, batch 8).
 *   node dist/bench/tokenizer.js [--steps N]
 */
import { parseArgs } from 'node:util'

import { Rng } from '../rng'
import { Dvae, DvaeSpec } from '../tokenizer'

interface Case {
  name: string
  spec: DvaeSpec
  size: number
  channels: number
  batchSize: number
}

const CASES: Case[] = [
  { name: 'small 28px gray', spec: { preset: 'small', numChannels: 1 }, size: 28, channels: 1, batchSize: 32 },
  { name: 'dall-e 112px', spec: 'dall-e', size: 112, channels: 3, batchSize: 8 },
]

async function timeIt(steps: number, f: (step: number) => Promise<unknown>): Promise<number> {
  await f(-1) // warm-up, not timed
  const started = performance.now()
  for (let s = 0; s < steps; s++) await f(s)
  return (performance.now() - started) / 1000
}

async function run(c: Case, steps: number): Promise<void> {
  const tok = Dvae.create(c.spec)
  const rng = new Rng(1)
  const pixels = new Float32Array(c.batchSize * c.channels * c.size * c.size).map(() => rng.next())
  const encodeSeconds = await timeIt(steps, () => tok.encode(pixels, c.batchSize))
  const trainSeconds = await timeIt(steps, (s) =>
    tok.trainStep({ pixels, temperature: 1, klWeight: 1, lr: 1e-4, seed: Math.max(0, s) }),
  )
  const rate = (seconds: number) => ((steps * c.batchSize) / seconds).toFixed(1).padStart(7)
  console.log(
    `${c.name.padEnd(16)} batch ${String(c.batchSize).padStart(3)}  encode ${rate(encodeSeconds)} img/s  train ${rate(trainSeconds)} img/s  ` +
      `peak RSS ${(process.resourceUsage().maxRSS / 1024).toFixed(0)} MiB  (${tok.numParameters.toLocaleString()} params)`,
  )
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { steps: { type: 'string', default: '3' } } })
  const steps = Number(values.steps)
  console.log(`dVAE tokenizer on CPU, ${steps} timed calls after one warm-up call (peak RSS is cumulative over the process)`)
  for (const c of CASES) await run(c, steps)
}

main().catch((e: unknown) => {
  console.error(e)
  process.exitCode = 1
})
