/** Learning-rate schedules: pure functions of the step, so a resumed run gets the same values. */
import { checkPositiveInteger } from './check'

export interface WarmupCosineOptions {
  /** Peak learning rate, reached at the end of warmup. */
  lr: number
  /**
   * Learning rate of the last step (totalSteps - 1), unless the decay is a single step, which
   * runs at lr. Default 1e-5 * lr / 1.5e-3 (BEiT's ratio).
   */
  minLr?: number
  warmupSteps: number
  totalSteps: number
}

/**
 * Linear warmup to lr, then cosine decay to minLr: the shape of BEiT's `cosine_scheduler`, one
 * step apart at each end. Warmup step i runs at lr (i + 1) / warmupSteps, where unilm's starts at
 * 0 (an update that changes nothing) and reaches lr at its last warmup step; the decay ends at
 * minLr on the last step that runs, where unilm's ends one step short of it.
 */
export function warmupCosine(opts: WarmupCosineOptions): (step: number) => number {
  const { lr, warmupSteps, totalSteps } = opts
  const minLr = opts.minLr ?? (lr * 1e-5) / 1.5e-3
  checkWarmupDecay(lr, minLr, warmupSteps, totalSteps)
  return (step: number) => {
    if (step < warmupSteps) return (lr * (step + 1)) / warmupSteps
    const decaySteps = totalSteps - warmupSteps
    // A single decay step is at the peak, as BEiT's schedule starts its decay there.
    const progress = decaySteps <= 1 ? 0 : Math.min(1, (step - warmupSteps) / (decaySteps - 1))
    return minLr + 0.5 * (lr - minLr) * (1 + Math.cos(Math.PI * progress))
  }
}

export interface WarmupPolyOptions {
  /** Peak learning rate, reached at the end of warmup. */
  lr: number
  /** The rate the decay heads for. Default 0 (mmseg's eta_min). */
  minLr?: number
  /** The polynomial's power. Default 1 (mmseg's BEiT recipes: linear decay). */
  power?: number
  warmupSteps: number
  totalSteps: number
}

/**
 * Linear warmup to lr (as `warmupCosine`'s), then mmseg's PolyLR: decay step t (from 0 at the
 * warmup's end) runs at minLr + (lr - minLr)(1 - t / decaySteps)^power, so the last step is
 * still (1 / decaySteps)^power of the way above minLr. mmseg trains BEiT's segmenters this way.
 */
export function warmupPoly(opts: WarmupPolyOptions): (step: number) => number {
  const { lr, warmupSteps, totalSteps } = opts
  const minLr = opts.minLr ?? 0
  const power = opts.power ?? 1
  checkWarmupDecay(lr, minLr, warmupSteps, totalSteps)
  if (!(Number.isFinite(power) && power > 0)) throw new Error(`power must be a positive number, got ${power}`)
  return (step: number) => {
    if (step < warmupSteps) return (lr * (step + 1)) / warmupSteps
    const left = Math.max(0, 1 - (step - warmupSteps) / (totalSteps - warmupSteps))
    return minLr + (lr - minLr) * left ** power
  }
}

function checkWarmupDecay(lr: number, minLr: number, warmupSteps: number, totalSteps: number): void {
  if (!(lr > 0)) throw new Error(`lr must be > 0, got ${lr}`)
  if (!(minLr >= 0 && minLr <= lr)) throw new Error(`minLr must be in [0, lr], got ${minLr}`)
  checkPositiveInteger('totalSteps', totalSteps)
  if (!(Number.isInteger(warmupSteps) && warmupSteps >= 0 && warmupSteps <= totalSteps)) {
    throw new Error(`warmupSteps must be an integer in [0, totalSteps=${totalSteps}], got ${warmupSteps}`)
  }
}

export interface CosineRampOptions {
  from: number
  to: number
  /** Steps over which the value moves; it stays at `to` afterwards. */
  steps: number
}

/**
 * Half-cosine interpolation from `from` (step 0) to `to` (step `steps`), constant after. DALL-E
 * anneals the Gumbel temperature 1 -> 1/16 and raises the KL weight 0 -> 6.6 this way.
 */
export function cosineRamp(opts: CosineRampOptions): (step: number) => number {
  const { from, to, steps } = opts
  if (!Number.isFinite(from) || !Number.isFinite(to))
    throw new Error(`cosineRamp: from and to must be finite, got ${from}, ${to}`)
  if (!(Number.isInteger(steps) && steps >= 0))
    throw new Error(`cosineRamp: steps must be an integer >= 0, got ${steps}`)
  return (step: number) => {
    if (step >= steps) return to
    return to + 0.5 * (from - to) * (1 + Math.cos((Math.PI * step) / steps))
  }
}
