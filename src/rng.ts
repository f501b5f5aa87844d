/**
 * Seeded pseudo-random numbers (mulberry32 over a splitmix32-scrambled seed).
 * Every random decision in the TS layer draws from one of these so runs replay.
 */
export class Rng {
  private state: number

  constructor(seed: number) {
    if (!Number.isFinite(seed)) throw new Error(`Rng: seed must be a finite number, got ${seed}`)
    this.state = splitmix32(Math.trunc(seed) >>> 0)
  }

  /** Uniform in [0, 1). */
  next(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0
    let t = this.state
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }

  /** Uniform in [lo, hi). */
  uniform(lo: number, hi: number): number {
    return lo + (hi - lo) * this.next()
  }

  /** Integer uniform in [lo, hi], both inclusive. */
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.next() * (hi - lo + 1))
  }

  /** A fresh 32-bit seed, for seeding native work reproducibly. */
  nextSeed(): number {
    return Math.floor(this.next() * 4294967296) >>> 0
  }

  /** Internal state, for checkpoints. */
  getState(): number {
    return this.state
  }

  setState(state: number): void {
    this.state = state >>> 0
  }
}

function splitmix32(x: number): number {
  x = (x + 0x9e3779b9) >>> 0
  x = Math.imul(x ^ (x >>> 16), 0x85ebca6b) >>> 0
  x = Math.imul(x ^ (x >>> 13), 0xc2b2ae35) >>> 0
  return (x ^ (x >>> 16)) >>> 0
}

/**
 * A 32-bit seed derived from several integers (e.g. run seed, epoch, image index), so that a
 * random draw can be made for one item without replaying the draws before it.
 */
export function deriveSeed(...parts: number[]): number {
  let h = 0x811c9dc5
  for (const part of parts) {
    if (!Number.isInteger(part)) throw new Error(`deriveSeed: parts must be integers, got ${part}`)
    h = splitmix32((h ^ (part >>> 0)) >>> 0)
    h = Math.imul(h ^ Math.floor(part / 4294967296), 0x01000193) >>> 0
  }
  return splitmix32(h)
}
