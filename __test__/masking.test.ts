import { readFileSync } from 'node:fs'
import { join } from 'node:path'

import test from 'ava'

import {
  BlockwiseMaskGenerator,
  type BlockwiseMaskOptions,
  type MaskGenerator,
  RandomMaskGenerator,
  roundHalfEven,
} from '../src/masking'

interface ReferenceSummary {
  name: string
  options: BlockwiseMaskOptions
  meanCount: number
  stdCount: number
  countHistogram: Record<string, number>
  cellFrequency: number[]
  meanComponents: number
  stdComponents: number
}

interface ReferenceFixture {
  numMasks: number
  configs: ReferenceSummary[]
}

// Written by scripts/blockwise_mask_reference.py (a port of the unilm reference generator).
const reference: ReferenceFixture = JSON.parse(
  readFileSync(join(__dirname, 'fixtures', 'blockwise-mask-reference.json'), 'utf8'),
)

function countMasked(mask: Uint8Array): number {
  let n = 0
  for (const v of mask) n += v
  return n
}

/** Connected groups of masked cells, 4-connectivity (same definition as the Python script). */
function countComponents(mask: Uint8Array, height: number, width: number): number {
  const seen = new Uint8Array(mask.length)
  let components = 0
  for (let start = 0; start < mask.length; start++) {
    if (!mask[start] || seen[start]) continue
    components++
    seen[start] = 1
    const stack = [start]
    while (stack.length > 0) {
      const k = stack.pop()!
      const r = Math.floor(k / width)
      const c = k % width
      const neighbours = [
        r > 0 ? k - width : -1,
        r < height - 1 ? k + width : -1,
        c > 0 ? k - 1 : -1,
        c < width - 1 ? k + 1 : -1,
      ]
      for (const n of neighbours) {
        if (n >= 0 && mask[n] && !seen[n]) {
          seen[n] = 1
          stack.push(n)
        }
      }
    }
  }
  return components
}

function meanAndStd(xs: number[]): { mean: number; std: number } {
  const mean = xs.reduce((a, b) => a + b, 0) / xs.length
  const variance = xs.reduce((a, x) => a + (x - mean) ** 2, 0) / (xs.length - 1)
  return { mean, std: Math.sqrt(variance) }
}

function take(gen: MaskGenerator, n: number): Uint8Array[] {
  return Array.from({ length: n }, () => gen.generate())
}

// --- Distribution matches the reference -------------------------------------------------
// Both samples have n masks, so a difference of means has standard error
// sqrt(sA^2/n + sB^2/n). Per-cell frequencies use a Bonferroni-style 5 sigma (about 1e-3
// family-wise false-alarm odds over the ~320 cells) plus slack for the 4-decimal rounding.

for (const ref of reference.configs) {
  test(`blockwise statistics match the reference: ${ref.name}`, (t) => {
    const n = reference.numMasks
    const { height, width } = ref.options
    const gen = new BlockwiseMaskGenerator({ ...ref.options, seed: 7 })
    const counts: number[] = []
    const components: number[] = []
    const cellHits = new Float64Array(height * width)
    for (let i = 0; i < n; i++) {
      const mask = gen.generate()
      counts.push(countMasked(mask))
      components.push(countComponents(mask, height, width))
      for (let k = 0; k < mask.length; k++) cellHits[k] += mask[k]
    }

    const count = meanAndStd(counts)
    const countSe = Math.sqrt((count.std ** 2 + ref.stdCount ** 2) / n)
    t.log(`${ref.name}: mean count ours ${count.mean.toFixed(4)} vs reference ${ref.meanCount}`)
    t.true(Math.abs(count.mean - ref.meanCount) <= 4 * countSe, `mean count ${count.mean} vs ${ref.meanCount}`)

    const comps = meanAndStd(components)
    const compSe = Math.sqrt((comps.std ** 2 + ref.stdComponents ** 2) / n)
    t.log(`${ref.name}: mean components ours ${comps.mean.toFixed(4)} vs reference ${ref.meanComponents}`)
    t.true(Math.abs(comps.mean - ref.meanComponents) <= 4 * compSe, `components ${comps.mean} vs ${ref.meanComponents}`)

    // Total variation distance between the masked-count histograms. The histograms
    // concentrate on a few counts, so sampling noise alone gives TVD of order 0.01.
    const ours = new Map<number, number>()
    for (const c of counts) ours.set(c, (ours.get(c) ?? 0) + 1)
    const support = new Set([...ours.keys(), ...Object.keys(ref.countHistogram).map(Number)])
    let tvd = 0
    for (const k of support) tvd += Math.abs((ours.get(k) ?? 0) - (ref.countHistogram[k] ?? 0)) / n
    tvd /= 2
    t.log(`${ref.name}: count histogram TVD ${tvd.toFixed(4)}`)
    t.true(tvd < 0.03, `count histogram TVD ${tvd}`)

    let worst = 0
    for (let k = 0; k < cellHits.length; k++) {
      const ourFreq = cellHits[k] / n
      const p = (ourFreq + ref.cellFrequency[k]) / 2
      const tolerance = 5 * Math.sqrt((2 * p * (1 - p)) / n) + 0.001
      const deviation = Math.abs(ourFreq - ref.cellFrequency[k])
      worst = Math.max(worst, deviation / tolerance)
      t.true(deviation <= tolerance, `cell ${k}: ${ourFreq} vs ${ref.cellFrequency[k]}`)
    }
    t.log(`${ref.name}: worst cell deviation ${(worst * 100).toFixed(0)}% of tolerance`)
  })
}

// --- Shape and invariants ---------------------------------------------------------------

test('blockwise masks are height*width cells of 0/1, at most numMaskingPatches masked', (t) => {
  const configs: BlockwiseMaskOptions[] = [
    { height: 14, width: 14, numMaskingPatches: 75 },
    { height: 6, width: 10, numMaskingPatches: 24, minNumPatches: 4 },
    { height: 10, width: 3, numMaskingPatches: 12, minNumPatches: 2, maxNumPatches: 4 },
  ]
  for (const opts of configs) {
    const gen = new BlockwiseMaskGenerator(opts)
    t.is(gen.numPatches, opts.height * opts.width)
    t.is(gen.height, opts.height)
    t.is(gen.width, opts.width)
    for (const mask of take(gen, 200)) {
      t.true(mask instanceof Uint8Array)
      t.is(mask.length, opts.height * opts.width)
      t.true(mask.every((v) => v === 0 || v === 1))
      const masked = countMasked(mask)
      t.true(masked >= 1 && masked <= opts.numMaskingPatches, `masked ${masked}`)
    }
  }
})

test('maxNumPatches caps the cells each block adds', (t) => {
  // Capped at one cell per step, 12 masked cells are mostly isolated; uncapped, a few
  // large blocks cover them.
  const opts = { height: 14, width: 14, numMaskingPatches: 12, minNumPatches: 1, minAspect: 1, maxAspect: 1 }
  const meanComponents = (gen: BlockwiseMaskGenerator) =>
    meanAndStd(take(gen, 500).map((mask) => countComponents(mask, 14, 14))).mean
  const capped = meanComponents(new BlockwiseMaskGenerator({ ...opts, maxNumPatches: 1 }))
  const uncapped = meanComponents(new BlockwiseMaskGenerator(opts))
  t.log(`mean components: maxNumPatches 1 -> ${capped.toFixed(2)}, default -> ${uncapped.toFixed(2)}`)
  t.true(capped > 9)
  t.true(uncapped < 5)
})

test('blockwise never returns an empty mask, even on tiny grids', (t) => {
  const configs: BlockwiseMaskOptions[] = [
    { height: 2, width: 2, numMaskingPatches: 1, minNumPatches: 1 },
    { height: 3, width: 3, numMaskingPatches: 4, minNumPatches: 1 },
    { height: 2, width: 5, numMaskingPatches: 3, minNumPatches: 2 },
    { height: 14, width: 14, numMaskingPatches: 75 },
  ]
  for (const opts of configs) {
    for (let seed = 0; seed < 200; seed++) {
      const gen = new BlockwiseMaskGenerator({ ...opts, seed })
      for (const mask of take(gen, 10)) t.true(countMasked(mask) >= 1, `${JSON.stringify(opts)} seed ${seed}`)
    }
  }
})

test('blockwise retries generations that the reference would leave empty', (t) => {
  // Only 1x1 blocks fit a 2x2 grid; with aspect 1 they need area < 2.25, drawn from
  // [2.2, 4] with odds 0.028 per attempt, so a single reference generation ends empty
  // with odds 0.972^10 = 0.75. Ours must still mask something every time.
  const gen = new BlockwiseMaskGenerator({
    height: 2,
    width: 2,
    numMaskingPatches: 4,
    minNumPatches: 2.2,
    minAspect: 1,
    maxAspect: 1,
  })
  for (const mask of take(gen, 500)) t.true(countMasked(mask) >= 1)
})

test('blockwise rounds half to even like Python, where a tie is certain', (t) => {
  // Area is exactly 6.25 at the first step (minNumPatches = maxNumPatches = 6.25) and the
  // aspect exactly 1, so sqrt(area) = 2.5: Python rounds it to a 2x2 block, which fits
  // the 6.25 cap; rounding half up would give 3x3 = 9 cells, which never fits.
  const gen = new BlockwiseMaskGenerator({
    height: 14,
    width: 14,
    numMaskingPatches: 7,
    minNumPatches: 6.25,
    maxNumPatches: 6.25,
    minAspect: 1,
    maxAspect: 1,
  })
  for (const mask of take(gen, 100)) {
    const masked = countMasked(mask)
    t.true(masked >= 4 && masked <= 7, `masked ${masked}`)
  }
})

test('blockwise throws a clear error when retries cannot find any block', (t) => {
  // Feasible only for area in [2.25 - 1e-9, 2.25): about 6e-10 odds per attempt.
  const gen = new BlockwiseMaskGenerator({
    height: 2,
    width: 2,
    numMaskingPatches: 4,
    minNumPatches: 2.25 - 1e-9,
    minAspect: 1,
    maxAspect: 1,
  })
  t.throws(() => gen.generate(), { message: /cannot produce a mask.*100 generations/ })
})

test('minNumPatches above numMaskingPatches still masks between 1 and numMaskingPatches', (t) => {
  // The reference's uniform(min, cap) then draws areas in [cap, min]; small blocks still fit.
  const gen = new BlockwiseMaskGenerator({ height: 14, width: 14, numMaskingPatches: 10, minNumPatches: 16, seed: 3 })
  const counts = take(gen, 500).map(countMasked)
  t.true(counts.every((c) => c >= 1 && c <= 10))
  t.true(
    counts.some((c) => c === 10),
    'the target is reachable',
  )
})

// --- Reproducibility --------------------------------------------------------------------

function sameSequence(a: Uint8Array[], b: Uint8Array[]): boolean {
  return a.length === b.length && a.every((mask, i) => Buffer.from(mask).equals(Buffer.from(b[i])))
}

const reproducible: Array<[string, (seed: number) => BlockwiseMaskGenerator | RandomMaskGenerator]> = [
  ['blockwise', (seed) => new BlockwiseMaskGenerator({ height: 14, width: 14, numMaskingPatches: 75, seed })],
  ['random', (seed) => new RandomMaskGenerator({ height: 14, width: 14, maskRatio: 0.4, seed })],
]

for (const [name, make] of reproducible) {
  test(`${name}: same seed gives the same sequence, a different seed a different one`, (t) => {
    const a = take(make(11), 30)
    t.true(sameSequence(a, take(make(11), 30)))
    t.false(sameSequence(a, take(make(12), 30)))
    t.false(sameSequence(a.slice(0, 15), a.slice(15)), 'masks vary within a sequence')
  })

  test(`${name}: getState/setState replays the mask sequence`, (t) => {
    const gen = make(5)
    take(gen, 7)
    const state = gen.getState()
    const expected = take(gen, 20)
    gen.setState(state)
    t.true(sameSequence(take(gen, 20), expected))
    // The state alone determines the sequence, whatever the seed a generator started from.
    const resumed = make(999)
    resumed.setState(state)
    t.true(sameSequence(take(resumed, 20), expected))
  })
}

// --- RandomMaskGenerator ----------------------------------------------------------------

test('random masks exactly round(maskRatio * N) patches, at least one', (t) => {
  const cases: Array<[number, number, number, number]> = [
    // height, width, maskRatio, expected count
    [14, 14, 0.4, 78],
    [14, 14, 0.75, 147],
    [7, 9, 0.5, 32],
    [4, 4, 1, 16],
    [3, 3, 0.01, 1],
    [1, 1, 0.5, 1],
  ]
  for (const [height, width, maskRatio, expected] of cases) {
    t.is(Math.max(1, Math.round(maskRatio * height * width)), expected)
    const gen = new RandomMaskGenerator({ height, width, maskRatio, seed: 1 })
    t.is(gen.height, height)
    t.is(gen.width, width)
    for (const mask of take(gen, 50)) {
      t.is(mask.length, height * width)
      t.true(mask.every((v) => v === 0 || v === 1))
      t.is(countMasked(mask), expected)
    }
  }
})

test('random mask positions are uniform', (t) => {
  const n = 20000
  const gen = new RandomMaskGenerator({ height: 14, width: 14, maskRatio: 0.4, seed: 2 })
  const hits = new Float64Array(196)
  for (let i = 0; i < n; i++) {
    const mask = gen.generate()
    for (let k = 0; k < 196; k++) hits[k] += mask[k]
  }
  const p = 78 / 196
  const tolerance = 5 * Math.sqrt((p * (1 - p)) / n)
  for (let k = 0; k < 196; k++) t.true(Math.abs(hits[k] / n - p) <= tolerance, `cell ${k}: ${hits[k] / n}`)
})

// --- Validation -------------------------------------------------------------------------

const base: BlockwiseMaskOptions = { height: 14, width: 14, numMaskingPatches: 75 }

test('blockwise rejects invalid options with messages naming option, range and value', (t) => {
  const cases: Array<[Partial<BlockwiseMaskOptions>, RegExp]> = [
    [{ height: 0 }, /height must be a positive integer, got 0/],
    [{ height: 2.5 }, /height must be a positive integer, got 2\.5/],
    [{ width: -3 }, /width must be a positive integer, got -3/],
    [{ width: Number.NaN }, /width must be a positive integer, got NaN/],
    [{ numMaskingPatches: 0 }, /numMaskingPatches must be an integer in \[1, 196\], got 0/],
    [{ numMaskingPatches: 197 }, /numMaskingPatches must be an integer in \[1, 196\], got 197/],
    [{ numMaskingPatches: 7.5 }, /numMaskingPatches must be an integer in \[1, 196\], got 7\.5/],
    [{ minNumPatches: 0.5 }, /minNumPatches must be a finite number >= 1, got 0\.5/],
    [{ maxNumPatches: 0 }, /maxNumPatches must be a finite number >= 1, got 0/],
    [{ minAspect: 0 }, /minAspect must be a finite number > 0, got 0/],
    [{ minAspect: -1 }, /minAspect must be a finite number > 0, got -1/],
    [{ minAspect: 0.5, maxAspect: 0.4 }, /maxAspect must be finite and >= minAspect \(0\.5\), got 0\.4/],
    [{ minAspect: 2 }, /maxAspect must be finite and >= minAspect \(2\), got 0\.5 \(the default 1\/minAspect\)/],
  ]
  for (const [override, message] of cases) {
    t.throws(() => new BlockwiseMaskGenerator({ ...base, ...override }), { message }, JSON.stringify(override))
  }
})

test('blockwise rejects options where no block can ever fit', (t) => {
  const impossible: BlockwiseMaskOptions[] = [
    // Blocks need height < grid height, so a single row never fits one.
    { height: 1, width: 10, numMaskingPatches: 4, minNumPatches: 1 },
    // Only 1x1 blocks fit 2x2, but every drawn area is 4.
    { height: 2, width: 2, numMaskingPatches: 4, minNumPatches: 4 },
    // Aspect 4 with area >= 1 gives h >= 2, so every block exceeds the one-patch cap.
    { height: 14, width: 14, numMaskingPatches: 1, minAspect: 4, maxAspect: 4 },
  ]
  for (const opts of impossible) {
    t.throws(() => new BlockwiseMaskGenerator(opts), { message: /can never produce a mask/ }, JSON.stringify(opts))
  }
  // Neighbouring feasible configs are accepted.
  t.notThrows(() => new BlockwiseMaskGenerator({ height: 2, width: 10, numMaskingPatches: 4, minNumPatches: 1 }))
  t.notThrows(() => new BlockwiseMaskGenerator({ height: 2, width: 2, numMaskingPatches: 4, minNumPatches: 2 }))
  // A 2x1 block takes area in (1, 1.5625) at aspect 4, reachable once areas start at 1.
  t.notThrows(
    () =>
      new BlockwiseMaskGenerator({
        height: 14,
        width: 14,
        numMaskingPatches: 2,
        minNumPatches: 1,
        minAspect: 4,
        maxAspect: 4,
      }),
  )
})

test('random rejects invalid options with messages naming option, range and value', (t) => {
  const cases: Array<[Partial<{ height: number; width: number; maskRatio: number }>, RegExp]> = [
    [{ height: 0 }, /height must be a positive integer, got 0/],
    [{ width: 1.5 }, /width must be a positive integer, got 1\.5/],
    [{ maskRatio: 0 }, /maskRatio must be in \(0, 1\], got 0/],
    [{ maskRatio: 1.2 }, /maskRatio must be in \(0, 1\], got 1\.2/],
    [{ maskRatio: Number.NaN }, /maskRatio must be in \(0, 1\], got NaN/],
  ]
  for (const [override, message] of cases) {
    t.throws(() => new RandomMaskGenerator({ height: 14, width: 14, maskRatio: 0.4, ...override }), { message })
  }
})

// --- Python rounding --------------------------------------------------------------------

test('roundHalfEven matches Python round()', (t) => {
  const cases: Array<[number, number]> = [
    [0.5, 0],
    [1.5, 2],
    [2.5, 2],
    [3.5, 4],
    [4.5, 4],
    [-2.5, -2],
    [-3.5, -4],
    [2.4999999, 2],
    [2.5000001, 3],
    [3.2, 3],
    [3.7, 4],
    [7, 7],
  ]
  for (const [x, expected] of cases) t.is(roundHalfEven(x), expected, `round(${x})`)
})
