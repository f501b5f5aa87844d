/** The input checks every public class shares, written once. */

/** A TypeError naming `name`, the type expected and the one given, unless `value` is a `type`. */
export function checkType(name: string, value: unknown, type: Function): void {
  if (!(value instanceof type)) {
    const got = value === null ? 'null' : typeof value === 'object' ? (value as object).constructor.name : typeof value
    const article = /^[AEIOU]/.test(type.name) ? 'an' : 'a'
    throw new TypeError(`${name}: expected ${article} ${type.name}, got ${got}`)
  }
}

/** `seed` when it is a valid native seed (a 32-bit unsigned integer), else an error naming `name`. */
export function checkSeed(seed: number, name = 'seed'): number {
  if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff)
    throw new Error(`${name} must be an integer in [0, 2^32), got ${seed}`)
  return seed
}
