/**
 * Patch masks for masked image modelling. Every mask is a Uint8Array of height*width
 * cells in row-major order, 1 = masked. Generators draw from a seeded Rng and expose its
 * state so a resumed training run replays the exact mask sequence.
 */
import { Rng } from './rng'

export interface MaskGenerator {
  readonly height: number
  readonly width: number
  generate(): Uint8Array
  /** RNG state, so a resumed run replays the exact mask sequence. */
  getState(): number
  setState(state: number): void
}

export interface BlockwiseMaskOptions {
  height: number
  width: number
  /** Target number of masked patches per mask. */
  numMaskingPatches: number
  /** Smallest block area drawn. Default 16, as in BEiT pretraining. */
  minNumPatches?: number
  /** Largest block area per step. Default: numMaskingPatches. */
  maxNumPatches?: number
  /** Block aspect ratios (height/width) are log-uniform in [minAspect, maxAspect]. Default 0.3. */
  minAspect?: number
  /** Default: 1 / minAspect. */
  maxAspect?: number
  seed?: number
}

export interface RandomMaskOptions {
  height: number
  width: number
  /** Fraction of patches masked, in (0, 1]. */
  maskRatio: number
  seed?: number
}

/** Block placements tried per step, as in the reference. */
const ATTEMPTS_PER_BLOCK = 10
/**
 * Whole generations retried when one ends with nothing masked (the reference returns the
 * empty mask; we never do). Feasible configs reach this bound only with negligible odds.
 */
const MAX_GENERATIONS = 100

/**
 * BEiT's blockwise masking (microsoft/unilm beit/masking_generator.py), ported draw for
 * draw: rectangles of random area and aspect ratio are added until numMaskingPatches
 * cells are masked, or until no new rectangle fits (then slightly fewer are masked).
 */
export class BlockwiseMaskGenerator implements MaskGenerator {
  readonly height: number
  readonly width: number
  readonly numPatches: number
  private readonly numMaskingPatches: number
  private readonly minNumPatches: number
  private readonly maxNumPatches: number
  private readonly logAspect: readonly [number, number]
  private readonly rng: Rng

  constructor(opts: BlockwiseMaskOptions) {
    const who = 'BlockwiseMaskGenerator'
    this.height = requirePositiveInteger(who, 'height', opts.height)
    this.width = requirePositiveInteger(who, 'width', opts.width)
    this.numPatches = this.height * this.width
    this.numMaskingPatches = requireIntegerIn(who, 'numMaskingPatches', opts.numMaskingPatches, 1, this.numPatches)
    this.minNumPatches = requireAtLeast(who, 'minNumPatches', opts.minNumPatches ?? 16, 1)
    this.maxNumPatches = requireAtLeast(who, 'maxNumPatches', opts.maxNumPatches ?? this.numMaskingPatches, 1)
    const minAspect = opts.minAspect ?? 0.3
    if (!(minAspect > 0 && Number.isFinite(minAspect))) {
      throw new Error(`${who}: minAspect must be a finite number > 0, got ${minAspect}`)
    }
    const maxAspect = opts.maxAspect ?? 1 / minAspect
    if (!(maxAspect >= minAspect && Number.isFinite(maxAspect))) {
      const origin = opts.maxAspect === undefined ? ' (the default 1/minAspect)' : ''
      throw new Error(`${who}: maxAspect must be finite and >= minAspect (${minAspect}), got ${maxAspect}${origin}`)
    }
    this.logAspect = [Math.log(minAspect), Math.log(maxAspect)]
    if (!this.someBlockCanFit()) {
      throw new Error(
        `${who}: these options can never produce a mask: no block with area between minNumPatches ` +
          `(${this.minNumPatches}) and min(numMaskingPatches, maxNumPatches) (${this.firstCap()}) and aspect in ` +
          `[${minAspect}, ${maxAspect}] rounds to height < ${this.height} and width < ${this.width} (height ` +
          `and width must both be >= 2)`,
      )
    }
    this.rng = new Rng(opts.seed ?? 0)
  }

  generate(): Uint8Array {
    for (let i = 0; i < MAX_GENERATIONS; i++) {
      const mask = this.generateOnce()
      if (mask.includes(1)) return mask
    }
    throw new Error(
      `BlockwiseMaskGenerator: options cannot produce a mask: ${MAX_GENERATIONS} generations in a row ` +
        `masked nothing (numMaskingPatches=${this.numMaskingPatches}, minNumPatches=${this.minNumPatches}, ` +
        `grid ${this.height}x${this.width})`,
    )
  }

  getState(): number {
    return this.rng.getState()
  }

  setState(state: number): void {
    this.rng.setState(state)
  }

  /** The reference `__call__`. */
  private generateOnce(): Uint8Array {
    const mask = new Uint8Array(this.numPatches)
    let count = 0
    while (count < this.numMaskingPatches) {
      const cap = Math.min(this.numMaskingPatches - count, this.maxNumPatches)
      const delta = this.addBlock(mask, cap)
      if (delta === 0) break
      count += delta
    }
    return mask
  }

  /** The reference `_mask`: masks one block adding 1..cap new cells, or returns 0. */
  private addBlock(mask: Uint8Array, cap: number): number {
    for (let attempt = 0; attempt < ATTEMPTS_PER_BLOCK; attempt++) {
      const area = this.rng.uniform(this.minNumPatches, cap)
      const aspect = Math.exp(this.rng.uniform(this.logAspect[0], this.logAspect[1]))
      const h = roundHalfEven(Math.sqrt(area * aspect))
      const w = roundHalfEven(Math.sqrt(area / aspect))
      if (h >= this.height || w >= this.width) continue
      const top = this.rng.int(0, this.height - h)
      const left = this.rng.int(0, this.width - w)
      let fresh = 0
      for (let i = top; i < top + h; i++) {
        for (let j = left; j < left + w; j++) fresh += 1 - mask[i * this.width + j]
      }
      if (fresh > 0 && fresh <= cap) {
        for (let i = top; i < top + h; i++) mask.fill(1, i * this.width + left, i * this.width + left + w)
        return fresh
      }
    }
    return 0
  }

  private firstCap(): number {
    return Math.min(this.numMaskingPatches, this.maxNumPatches)
  }

  /**
   * Whether the first step can place a block with positive probability. A draw gives block
   * h x w when sqrt(area*aspect) rounds to h and sqrt(area/aspect) to w. In log space
   * (u, v) = (log sqrt(area*aspect), log sqrt(area/aspect)) that is an open box, while the
   * drawable (u+v, u-v) = (log area, log aspect) form a rotated rectangle; convex sets
   * that overlap on the four axes u, v, u+v, u-v intersect (separating axis theorem).
   * The test is deliberately lenient (closed intervals, float slack) so it never rejects a
   * feasible config; one that can only hit a rounding tie is left to generate()'s bound.
   */
  private someBlockCanFit(): boolean {
    const cap = this.firstCap()
    // uniform(min, cap) spans the two bounds in either order, as Python's does.
    const s0 = Math.log(Math.min(this.minNumPatches, cap))
    const s1 = Math.log(Math.max(this.minNumPatches, cap))
    const [d0, d1] = this.logAspect
    for (let h = 1; h < this.height; h++) {
      for (let w = 1; w < this.width && h * w <= cap; w++) {
        const u0 = Math.log(h - 0.5)
        const u1 = Math.log(h + 0.5)
        const v0 = Math.log(w - 0.5)
        const v1 = Math.log(w + 0.5)
        if (
          meets(u0, u1, (s0 + d0) / 2, (s1 + d1) / 2) &&
          meets(v0, v1, (s0 - d1) / 2, (s1 - d0) / 2) &&
          meets(u0 + v0, u1 + v1, s0, s1) &&
          meets(u0 - v1, u1 - v0, d0, d1)
        ) {
          return true
        }
      }
    }
    return false
  }
}

/** Masks exactly round(maskRatio * N) patches (at least 1), uniformly at random. */
export class RandomMaskGenerator implements MaskGenerator {
  readonly height: number
  readonly width: number
  private readonly numMasked: number
  private readonly order: Int32Array
  private readonly rng: Rng

  constructor(opts: RandomMaskOptions) {
    const who = 'RandomMaskGenerator'
    this.height = requirePositiveInteger(who, 'height', opts.height)
    this.width = requirePositiveInteger(who, 'width', opts.width)
    const ratio = opts.maskRatio
    if (!(ratio > 0 && ratio <= 1)) throw new Error(`${who}: maskRatio must be in (0, 1], got ${ratio}`)
    const numPatches = this.height * this.width
    this.numMasked = Math.max(1, Math.round(ratio * numPatches))
    this.order = new Int32Array(numPatches)
    this.rng = new Rng(opts.seed ?? 0)
  }

  generate(): Uint8Array {
    const n = this.order.length
    // Reset to the identity so each mask depends only on the RNG state (exact replay).
    for (let i = 0; i < n; i++) this.order[i] = i
    const mask = new Uint8Array(n)
    // Partial Fisher-Yates: the first numMasked slots become a uniform random subset.
    for (let i = 0; i < this.numMasked; i++) {
      const j = this.rng.int(i, n - 1)
      const picked = this.order[j]
      this.order[j] = this.order[i]
      this.order[i] = picked
      mask[picked] = 1
    }
    return mask
  }

  getState(): number {
    return this.rng.getState()
  }

  setState(state: number): void {
    this.rng.setState(state)
  }
}

/** Python 3's round(): ties go to the even neighbour, so round(2.5) = 2. */
export function roundHalfEven(x: number): number {
  const r = Math.round(x)
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r
}

/** Slack for rounding error in the log-space feasibility test. */
const LOG_SLACK = 1e-9

/** Intervals [a0, a1] and [b0, b1] meet, up to LOG_SLACK. */
function meets(a0: number, a1: number, b0: number, b1: number): boolean {
  return a0 <= b1 + LOG_SLACK && b0 <= a1 + LOG_SLACK
}

function requirePositiveInteger(who: string, name: string, value: number): number {
  if (!(Number.isInteger(value) && value > 0))
    throw new Error(`${who}: ${name} must be a positive integer, got ${value}`)
  return value
}

function requireIntegerIn(who: string, name: string, value: number, lo: number, hi: number): number {
  if (!(Number.isInteger(value) && value >= lo && value <= hi)) {
    throw new Error(`${who}: ${name} must be an integer in [${lo}, ${hi}], got ${value}`)
  }
  return value
}

function requireAtLeast(who: string, name: string, value: number, lo: number): number {
  if (!(Number.isFinite(value) && value >= lo))
    throw new Error(`${who}: ${name} must be a finite number >= ${lo}, got ${value}`)
  return value
}
