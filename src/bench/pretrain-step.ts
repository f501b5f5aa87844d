/**
 * beit's side of the pretraining benchmark (scripts/cuda/bench_pytorch.py is PyTorch's): per
 * step, one native call (`pretrainStep`) in which the `dall-e` tokenizer encodes 112 px views
 * into 14x14 targets that stay on the device and BEiT-B/16 at 224 takes one MIM training step
 * with 40% of the patches masked. Prints one JSON line per batch size (images/s, time split,
 * MFU); the tokenizer's share is timed by as many `encode` calls after the timed steps. Peak
 * GPU memory is sampled outside (nvidia-smi). Not a test.
 *   node dist/bench/pretrain-step.js --device cuda --batch-sizes 64,128,256   (bf16 by default on a GPU)
 *   node dist/bench/pretrain-step.js --device cpu --preset tiny --batch-sizes 2 --steps 2 --warmup 1
 */
import { parseArgs } from 'node:util'

import { DeviceOptions, DeviceSpec, PrecisionSpec } from '../device'
import { Beit } from '../model'
import { Rng } from '../rng'
import { Dvae } from '../tokenizer'

// 6 x 18.0 GMAC backbone + head (forward and backward) + 2 x 26.1 GMAC tokenizer, in GFLOP.
const GFLOP_PER_IMAGE: Record<string, number> = { base: 6 * 18.0 + 2 * 26.1 }

const PRESETS = {
  base: {
    model: { preset: 'base' as const },
    tokenizer: { preset: 'dall-e' as const },
    image: 224,
    tokenImage: 112,
    grid: 14,
  },
  tiny: {
    model: {
      preset: 'tiny' as const,
      imageSize: [32, 32] as [number, number],
      patchSize: 8,
      vocabSize: 64,
      numHiddenLayers: 2,
    },
    tokenizer: { preset: 'tiny' as const, imageSize: [16, 16] as [number, number], vocabSize: 64, numGroups: 3 },
    image: 32,
    tokenImage: 16,
    grid: 4,
  },
}

async function bench(
  preset: keyof typeof PRESETS,
  batch: number,
  steps: number,
  warmup: number,
  placement: DeviceOptions,
  peakTflops: number,
): Promise<void> {
  const p = PRESETS[preset]
  const tokenizer = Dvae.create(p.tokenizer, { emaDecay: 0, ...placement })
  const model = Beit.create(p.model, placement)
  const n = p.grid * p.grid
  const rng = new Rng(0)
  const pixels = new Float32Array(batch * 3 * p.image * p.image).map(() => rng.uniform(-1, 1))
  const tokenPixels = new Float32Array(batch * 3 * p.tokenImage * p.tokenImage).map(() => rng.uniform(0, 1))
  const mask = new Uint8Array(batch * n).map(() => (rng.uniform(0, 1) < 0.4 ? 1 : 0))
  let total = 0
  let loss = 0
  for (let step = 0; step < warmup + steps; step++) {
    const t0 = performance.now()
    loss = (await model.pretrainStep({ tokenizer, pixels, tokenizerPixels: tokenPixels, mask, lr: 1e-4, seed: step }))
      .loss
    if (step >= warmup) total += performance.now() - t0
  }
  const t0 = performance.now()
  for (let step = 0; step < steps; step++) {
    await tokenizer.encode(tokenPixels, batch, { height: p.tokenImage, width: p.tokenImage })
  }
  const tokenizerMs = (performance.now() - t0) / steps
  const perStep = total / 1000 / steps
  const out: Record<string, unknown> = {
    impl: 'beit',
    device: model.device,
    preset,
    precision: model.precision,
    batch,
    images_per_s: batch / perStep,
    step_ms: { total: total / steps, tokenizer: tokenizerMs, forward_backward_optimizer: total / steps - tokenizerMs },
    loss,
  }
  if (GFLOP_PER_IMAGE[preset]) out.mfu = (GFLOP_PER_IMAGE[preset] * 1e9 * batch) / perStep / (peakTflops * 1e12)
  console.log(JSON.stringify(out))
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      device: { type: 'string', default: 'auto' },
      precision: { type: 'string', default: 'auto' },
      preset: { type: 'string', default: 'base' },
      'batch-sizes': { type: 'string', default: '64,128,256' },
      steps: { type: 'string', default: '10' },
      warmup: { type: 'string', default: '3' },
      'peak-tflops': { type: 'string', default: '989' },
    },
  })
  const preset = values.preset as keyof typeof PRESETS
  if (!(preset in PRESETS)) throw new Error(`--preset must be one of ${Object.keys(PRESETS).join(', ')}`)
  for (const b of values['batch-sizes']!.split(',').map(Number)) {
    try {
      const placement = { device: values.device as DeviceSpec, precision: values.precision as PrecisionSpec }
      await bench(preset, b, Number(values.steps), Number(values.warmup), placement, Number(values['peak-tflops']))
    } catch (e) {
      console.log(JSON.stringify({ impl: 'beit', batch: b, error: String((e as Error).message).split('\n')[0] }))
    }
  }
}

main().catch((e: unknown) => {
  console.error(e)
  process.exitCode = 1
})
