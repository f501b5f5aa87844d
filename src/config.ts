/**
 * Model and optimizer configuration. Field names mirror Hugging Face's BeitConfig (camelCase)
 * so configs map one to one onto transformers checkpoints. Presets are data.
 */
import { native } from './native'

export interface BeitConfig {
  /** [height, width] in pixels, each a multiple of patchSize. */
  imageSize: [number, number]
  patchSize: number
  /** 1 for grayscale, 3 for RGB. */
  numChannels: number
  hiddenSize: number
  numHiddenLayers: number
  numAttentionHeads: number
  intermediateSize: number
  /** Visual-token vocabulary predicted by the MIM head. */
  vocabSize: number
  /** LayerScale init; 0 disables LayerScale. */
  layerScaleInitValue: number
  useAbsolutePositionEmbeddings: boolean
  /** One relative position bias table shared by all layers (pretraining). */
  useSharedRelativePositionBias: boolean
  /** One table per layer (fine-tuning). Exclusive with the shared table. */
  useRelativePositionBias: boolean
  /** Largest stochastic-depth rate (the last layer's); rates grow linearly with depth. */
  dropPathRate: number
  layerNormEps: number
  initializerRange: number
}

export type PresetName = 'mini' | 'tiny' | 'small' | 'base' | 'large'

/**
 * timm's beit_*_patch16_224 sizes with BEiT's pretraining choices (224 px, patch 16, RGB, 8192
 * visual tokens, shared relative position bias), and `mini`, a 6 x 128 model that trains at CPU
 * speed on small images. The one preset table is Rust's (crate/core/src/presets.rs).
 */
export const PRESETS: Readonly<Record<PresetName, BeitConfig>> = JSON.parse(native.presetsJson()).beit

/** A preset name, or a preset plus overrides, or a full config; imageSize may be one number. */
export type ModelSpec =
  PresetName | (Partial<Omit<BeitConfig, 'imageSize'>> & { preset?: PresetName; imageSize?: ImageSize })

export function resolveConfig(spec: ModelSpec): BeitConfig {
  if (typeof spec === 'string') return presetByName(spec)
  const { preset, imageSize, ...overrides } = spec
  const base = preset === undefined ? undefined : presetByName(preset)
  const config = {
    ...base,
    ...overrides,
    ...(imageSize === undefined ? {} : { imageSize: imageSizePair(imageSize) }),
  } as Partial<BeitConfig>
  const missing = (Object.keys(PRESETS.base) as (keyof BeitConfig)[]).filter((k) => config[k] === undefined)
  if (missing.length > 0) {
    throw new Error(
      `model config is missing ${missing.join(', ')}: give every field, or start from a preset ({ preset: 'tiny', ... })`,
    )
  }
  return config as BeitConfig
}

function presetByName(name: string): BeitConfig {
  const preset = PRESETS[name as PresetName]
  if (preset === undefined) {
    throw new Error(`unknown preset ${JSON.stringify(name)}: expected one of ${Object.keys(PRESETS).join(', ')}`)
  }
  return structuredClone(preset)
}

export function gridSize(config: BeitConfig): [number, number] {
  return [config.imageSize[0] / config.patchSize, config.imageSize[1] / config.patchSize]
}

/** Pixels: one number for a square image, or [height, width]. */
export type ImageSize = number | [number, number]

export function imageSizePair(size: ImageSize | undefined): [number, number] | undefined {
  if (size === undefined) return undefined
  const pair: [number, number] = typeof size === 'number' ? [size, size] : size
  if (!Array.isArray(pair) || pair.length !== 2 || !pair.every((s) => Number.isInteger(s) && s > 0)) {
    throw new Error(`imageSize must be a positive integer or [height, width], got ${JSON.stringify(size)}`)
  }
  return pair
}

/** AdamW settings; each missing field takes the model kind's default (see the README). */
export type { AdamWOptions } from './native'
