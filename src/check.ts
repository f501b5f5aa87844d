/** The input checks every public class shares, written once. */

/** A TypeError naming `name`, the type expected and the one given, unless `value` is a `type`. */
export function checkType(name: string, value: unknown, type: Function): void {
  if (!(value instanceof type)) {
    const got = value === null ? 'null' : typeof value === 'object' ? (value as object).constructor.name : typeof value
    const article = /^[AEIOU]/.test(type.name) ? 'an' : 'a'
    throw new TypeError(`${name}: expected ${article} ${type.name}, got ${got}`)
  }
}

/** `value` when it is a positive integer, else an error naming `name`. */
export function checkPositiveInteger(name: string, value: number): number {
  if (!Number.isInteger(value) || value <= 0) throw new Error(`${name} must be a positive integer, got ${value}`)
  return value
}

/** `seed` when it is a valid native seed (a 32-bit unsigned integer), else an error naming `name`. */
export function checkSeed(seed: number, name = 'seed'): number {
  if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff)
    throw new Error(`${name} must be an integer in [0, 2^32), got ${seed}`)
  return seed
}

/**
 * `[height, width]` when both are positive integers the native layer takes as they are (below
 * 2^31: it would truncate fractions and wrap negatives), else an error naming `name`.
 */
export function checkSize(name: string, size: readonly [number, number]): [number, number] {
  if (!Array.isArray(size) || size.length !== 2 || !size.every((v) => Number.isInteger(v) && v > 0 && v < 2 ** 31))
    throw new Error(`${name} must be [height, width] of positive integers, got ${JSON.stringify(size)}`)
  return [size[0], size[1]]
}

/** `lr` when it is a number (its range is checked natively), else a TypeError. */
export function checkLr(lr: unknown): number {
  if (typeof lr !== 'number') throw new TypeError(`lr: expected a number, got ${typeof lr}`)
  return lr
}

/** The random draws of a step's batch. */
export interface Draws {
  /** Seeds stochastic depth for this step, so a step can be replayed. Default 0. */
  seed?: number
  /**
   * The batch's first image in the step, when a step's batch is split into parts whose
   * gradients accumulate: draws are keyed by image, so the parts draw what the whole would.
   * Default 0.
   */
  firstSample?: number
}

/** The native form of a batch's draws, checked. */
export function stepDraws(draws: Draws): { seed: number; firstSample: number } {
  return { seed: checkSeed(draws.seed ?? 0), firstSample: checkSeed(draws.firstSample ?? 0, 'firstSample') }
}

/**
 * `options` when it is undefined or an object with no keys beyond `allowed` (the native layer
 * would ignore an unknown one silently: a misspelt option must not fall back to its default).
 */
export function checkOptions<T extends object>(
  name: string,
  options: T | undefined,
  allowed: readonly string[],
): T | undefined {
  if (options === undefined) return undefined
  if (typeof options !== 'object' || options === null)
    throw new TypeError(`${name}: expected an object, got ${options === null ? 'null' : typeof options}`)
  const unknown = Object.keys(options).find((k) => !allowed.includes(k))
  if (unknown !== undefined)
    throw new Error(`${name}: unknown field \`${unknown}\`, expected one of ${allowed.join(', ')}`)
  return options
}

export const ADAMW_FIELDS = ['beta1', 'beta2', 'eps', 'weightDecay', 'clipGradNorm'] as const
