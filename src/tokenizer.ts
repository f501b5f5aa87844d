import {
  ADAMW_FIELDS,
  checkLr,
  checkOptions,
  checkPositiveInteger,
  checkSeed,
  checkSize,
  checkType,
  Draws,
  stepDraws,
} from './check'
import { Checkpointed } from './checkpointed'
import { ImageSize, imageSizePair } from './config'
import { DeviceOptions, place } from './device'
import { DvaeLossMetrics, DvaeStepMetrics, DvaeTrainingOptions, native, NativeDvae } from './native'
export type { DvaeLossMetrics, DvaeStepMetrics, DvaeTrainingOptions } from './native'

/** The dVAE architecture. Field names mirror the Rust `DvaeConfig`. */
export interface DvaeConfig {
  /** Input [height, width] it is trained for: the default image size of encode and trainStep. */
  imageSize: [number, number]
  /** 1 for grayscale, 3 for RGB. */
  numChannels: number
  /** Base width n_hid; encoder group g has width 2^g * n_hid. */
  hiddenSize: number
  /** Groups of residual blocks; the token grid is the image downsampled by 2^(numGroups-1). */
  numGroups: number
  blocksPerGroup: number
  vocabSize: number
  /** Width of the decoder's first 1x1 conv (DALL-E: 128). */
  decoderInputSize: number
}

export type DvaePresetName = 'dall-e' | 'small' | 'tiny'

/**
 * `dall-e`: OpenAI's layout (112 px -> 14x14 tokens of 8192). `small` and `tiny` suit 28-64 px
 * images on a CPU: downsampling 4, so 28 px gives the 7x7 grid of a BEiT with 4 px patches. The
 * one preset table is Rust's (crate/core/src/presets.rs).
 */
export const DVAE_PRESETS: Readonly<Record<DvaePresetName, DvaeConfig>> = JSON.parse(native.presetsJson()).tokenizer

export type DvaeSpec =
  DvaePresetName | (Partial<Omit<DvaeConfig, 'imageSize'>> & { preset?: DvaePresetName; imageSize?: ImageSize })

export interface TokenizerInput extends Draws {
  /** [B, C, H, W] in [0, 1]. */
  pixels: Float32Array
  /** Gumbel-softmax temperature (DALL-E anneals 1 -> 1/16). */
  temperature: number
  /** Weight of the KL to the uniform prior. */
  klWeight: number
  /** Image size; default: the config's imageSize. The batch size follows from the length. */
  size?: { height: number; width: number }
}

export interface TokenizerStepInput extends TokenizerInput {
  lr: number
}

export function resolveDvaeConfig(spec: DvaeSpec): DvaeConfig {
  const { preset, imageSize, ...overrides } = typeof spec === 'string' ? { preset: spec, imageSize: undefined } : spec
  let base: DvaeConfig | undefined
  if (preset !== undefined) {
    // A copy (the caller may edit its config), and only of the table's own keys: "toString" is
    // no preset.
    base = Object.hasOwn(DVAE_PRESETS, preset) ? structuredClone(DVAE_PRESETS[preset]) : undefined
    if (base === undefined) {
      throw new Error(
        `unknown tokenizer preset ${JSON.stringify(preset)}: expected one of ${Object.keys(DVAE_PRESETS).join(', ')}`,
      )
    }
  }
  const config = {
    ...base,
    ...overrides,
    ...(imageSize === undefined ? {} : { imageSize: imageSizePair(imageSize) }),
  } as Partial<DvaeConfig>
  const missing = (Object.keys(DVAE_PRESETS.tiny) as (keyof DvaeConfig)[]).filter((k) => config[k] === undefined)
  if (missing.length > 0)
    throw new Error(`tokenizer config is missing ${missing.join(', ')}: give every field, or start from a preset`)
  return config as DvaeConfig
}

/** A DALL-E style discrete VAE: images <-> grids of visual-token ids. */
export class Dvae extends Checkpointed<NativeDvae> {
  readonly config: DvaeConfig
  readonly numParameters: number
  /** Image size / token grid size. */
  readonly downsample: number

  private constructor(handle: NativeDvae) {
    super(handle)
    this.config = JSON.parse(handle.configJson) as DvaeConfig
    this.numParameters = handle.numParameters
    this.downsample = 2 ** (this.config.numGroups - 1)
  }

  static create(spec: DvaeSpec, opts: DvaeTrainingOptions & DeviceOptions & { seed?: number } = {}): Dvae {
    const { seed = 0, device, precision, ...training } = opts
    checkSeed(seed)
    checkOptions('training', training, ['optimizer', 'emaDecay', 'reconLoss'])
    checkOptions('optimizer', training.optimizer, ADAMW_FIELDS)
    const handle = native.NativeDvae.create(JSON.stringify(resolveDvaeConfig(spec)), training, seed)
    return new Dvae(place(handle, { device, precision }))
  }

  static async load(path: string, opts: DeviceOptions = {}): Promise<Dvae> {
    return new Dvae(place(await native.NativeDvae.load(path), opts))
  }

  get training(): Required<DvaeTrainingOptions> {
    return this.handle.training as Required<DvaeTrainingOptions>
  }

  /**
   * Token ids [B, H/d, W/d] (argmax, deterministic) of images [B, C, H, W] in [0, 1]; H x W is
   * the config's imageSize unless `size` says otherwise.
   */
  encode(pixels: Float32Array, batchSize: number, size?: { height: number; width: number }): Promise<Int32Array> {
    const { height, width } = this.imageSize(pixels, size, batchSize)
    return this.handle.encode(pixels, height, width)
  }

  /** Images [B, C, h*d, w*d] in [0, 1] from ids [B, h, w]; the grid defaults to imageSize / d. */
  decode(ids: Int32Array, batchSize: number, grid?: { height: number; width: number }): Promise<Float32Array> {
    checkType('ids', ids, Int32Array)
    checkPositiveInteger('batchSize', batchSize)
    const [height, width] = checkSize('grid', [
      grid?.height ?? this.config.imageSize[0] / this.downsample,
      grid?.width ?? this.config.imageSize[1] / this.downsample,
    ])
    if (ids.length !== batchSize * height * width) {
      throw new Error(
        `ids: expected ${batchSize * height * width} values (batchSize*h*w = ${batchSize}*${height}*${width}), got ${ids.length}`,
      )
    }
    return this.handle.decode(ids, height, width)
  }

  /**
   * Adds the gradient of the tokenizer objective on images [B, C, H, W] in [0, 1] (summed over
   * the images) to the model's gradients; `applyUpdate` applies their mean. The Gumbel noise
   * is keyed by image (`seed`, `firstSample`).
   */
  lossAndGrads(input: TokenizerInput): Promise<DvaeLossMetrics> {
    const { height, width } = this.imageSize(input.pixels, input.size)
    const draws = stepDraws(input)
    return this.handle.lossAndGrads(input.pixels, height, width, input.temperature, input.klWeight, draws)
  }

  /** One training step (lossAndGrads + applyUpdate in one native call). */
  trainStep(input: TokenizerStepInput): Promise<DvaeStepMetrics> {
    const { height, width } = this.imageSize(input.pixels, input.size)
    const seed = checkSeed(input.seed ?? 0)
    const lr = checkLr(input.lr)
    return this.handle.trainStep(input.pixels, height, width, input.temperature, input.klWeight, lr, seed)
  }

  /** The image size, checked against the length when the batch size is known. */
  private imageSize(pixels: Float32Array, size?: { height: number; width: number }, batchSize?: number) {
    checkType('pixels', pixels, Float32Array)
    const [height, width] = checkSize('size', [
      size?.height ?? this.config.imageSize[0],
      size?.width ?? this.config.imageSize[1],
    ])
    if (batchSize !== undefined) {
      checkPositiveInteger('batchSize', batchSize)
      const c = this.config.numChannels
      if (pixels.length !== batchSize * c * height * width) {
        throw new Error(
          `pixels: expected ${batchSize * c * height * width} values (B*C*H*W = ${batchSize}*${c}*${height}*${width}), got ${pixels.length}`,
        )
      }
    }
    return { height, width }
  }
}
