/** The rows of `npm run bench:torch` (scripts/bench/rows.json), resolved into full configs. */
import { readFileSync } from 'node:fs'
import { availableParallelism } from 'node:os'
import { join } from 'node:path'

import { BeitConfig, ModelSpec, resolveConfig } from '../config'
import { resolveSegmenterConfig, SegmenterConfig, SegmenterSpec } from '../segmenter'
import { DvaeConfig, DvaeSpec, resolveDvaeConfig } from '../tokenizer'

interface Common {
  name: string
  title: string
  batchSize: number
  steps: number
}

type RowSpec = Common &
  (
    | { kind: 'mim'; model: ModelSpec; maskRatio: number }
    | { kind: 'classifier'; model: ModelSpec; numLabels: number }
    | { kind: 'segmenter'; segmenter: SegmenterSpec }
    | { kind: 'tokenizer-train' | 'tokenizer-encode'; tokenizer: DvaeSpec; imageSize: number; numChannels: number }
  )

export type ResolvedRow = Common &
  (
    | { kind: 'mim'; config: BeitConfig; maskRatio: number }
    | { kind: 'classifier'; config: BeitConfig; numLabels: number }
    | { kind: 'segmenter'; segmenterConfig: SegmenterConfig }
    | { kind: 'tokenizer-train' | 'tokenizer-encode'; tokenizerConfig: DvaeConfig; imageSize: number }
  )

export function benchRows(root: string): ResolvedRow[] {
  const { rows } = JSON.parse(readFileSync(join(root, 'scripts', 'bench', 'rows.json'), 'utf8')) as { rows: RowSpec[] }
  return rows.map((r): ResolvedRow => {
    const common = { name: r.name, title: r.title, batchSize: r.batchSize, steps: r.steps }
    switch (r.kind) {
      case 'mim':
        return { ...common, kind: r.kind, config: resolveConfig(r.model), maskRatio: r.maskRatio }
      case 'classifier':
        return { ...common, kind: r.kind, config: resolveConfig(r.model), numLabels: r.numLabels }
      case 'segmenter':
        return { ...common, kind: r.kind, segmenterConfig: resolveSegmenterConfig(r.segmenter) }
      default: {
        const spec = typeof r.tokenizer === 'string' ? { preset: r.tokenizer } : r.tokenizer
        const tokenizerConfig = resolveDvaeConfig({
          ...spec,
          numChannels: r.numChannels,
          imageSize: [r.imageSize, r.imageSize],
        })
        return { ...common, kind: r.kind, tokenizerConfig, imageSize: r.imageSize }
      }
    }
  })
}

/** The CPU's feature flags from /proc/cpuinfo ('' where it cannot be read). */
function cpuFlags(): string {
  try {
    return /^flags\s*:\s*(.*)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1] ?? ''
  } catch {
    return ''
  }
}

/** What bf16 GEMMs can run on: AMX tiles (Intel Sapphire Rapids and later), AVX512-BF16 (Zen 4/5, Cooper Lake). */
export function bf16Hardware(flags: string = cpuFlags()): string[] {
  return [
    ['amx_bf16', 'AMX-BF16'],
    ['avx512_bf16', 'AVX512-BF16'],
  ]
    .filter(([flag]) => new RegExp(`\\b${flag}\\b`).test(flags))
    .map(([, name]) => name)
}

/** The CPU as /proc/cpuinfo names it, with its widest vector extension and its bf16 GEMM units. */
export function cpuName(): string {
  try {
    const info = readFileSync('/proc/cpuinfo', 'utf8')
    const field = (key: string) => new RegExp(`^${key}\\s*:\\s*(.*)$`, 'm').exec(info)?.[1] ?? '?'
    const flags = field('flags')
    const simd = /\bavx512f\b/.test(flags) ? 'AVX-512' : /\bavx2\b/.test(flags) ? 'AVX2' : 'SSE'
    const features = [simd, ...bf16Hardware(flags)].join(', ')
    return `${field('model name')} (family ${field('cpu family')}, model ${field('model')}), ${availableParallelism()} cores, ${features}`
  } catch {
    return `${availableParallelism()} cores`
  }
}
