/**
 * Semantic segmentation on a BEiT backbone (Hugging Face's BeitForSemanticSegmentation: the
 * feature pyramid, UperNet and the FCN auxiliary head), fine-tuned end to end with layer-wise
 * LR decay and stochastic depth, started from a pretrained MIM or classifier checkpoint, or
 * imported from transformers. Masks are bytes: class ids, and the ignore index (255) for
 * pixels no loss reads.
 */
import { AdamWOptions, BeitConfig, ImageSize, imageSizePair, ModelSpec, resolveConfig } from './config'
import { Checkpointed } from './checkpointed'
import { ADAMW_FIELDS, checkLr, checkOptions, checkSeed, checkSize, checkType, Draws, stepDraws } from './check'
import { pretrainedBackbone } from './model'
import { DeviceOptions, place } from './device'
import {
  native,
  NativeSegmenter,
  SegmentationLogits,
  SegmentedPixels,
  SegmenterLossMetrics,
  SegmenterStepMetrics,
  SegmenterTrainingOptions,
} from './native'
export type {
  SegmentationLogits,
  SegmentedPixels,
  SegmenterLossMetrics,
  SegmenterStepMetrics,
  SegmenterTrainingOptions,
} from './native'

/** transformers' `BeitConfig` segmentation fields, camelCase. */
export interface SegmenterConfig {
  model: BeitConfig
  numLabels: number
  /**
   * Backbone stages the four features come from, transformers' rule: stage i is the hidden
   * state after i - 1 blocks (BEiT-B: [3, 5, 7, 11]). Blocks past the deepest are not run.
   */
  outIndices: [number, number, number, number]
  poolScales: number[]
  useAuxiliaryHead: boolean
  auxiliaryChannels: number
  auxiliaryNumConvs: number
  auxiliaryConcatInput: boolean
  auxiliaryLossWeight: number
  semanticLossIgnoreIndex: number
  /** The classes' names by label (transformers' `id2label`; exported as LABEL_i when absent). */
  classNames?: string[]
}

/** A backbone and the class count; every other field defaults to transformers'. */
export type SegmenterSpec = { model: ModelSpec; numLabels: number } & Partial<
  Omit<SegmenterConfig, 'model' | 'numLabels'>
>

export interface SegmenterCreateOptions extends DeviceOptions {
  optimizer?: AdamWOptions
  training?: SegmenterTrainingOptions
  /** Initialisation seed (of the head, when starting from a checkpoint). Default 0. */
  seed?: number
}

export interface SegmentationInput extends Draws {
  /** [B, C, H, W], normalised. */
  pixels: Float32Array
  /** [B, H, W] class ids, or the ignore index. */
  masks: Uint8Array
}

const SPEC_FIELDS = [
  'model',
  'numLabels',
  'outIndices',
  'poolScales',
  'useAuxiliaryHead',
  'auxiliaryChannels',
  'auxiliaryNumConvs',
  'auxiliaryConcatInput',
  'auxiliaryLossWeight',
  'semanticLossIgnoreIndex',
  'classNames',
]
const TRAINING_FIELDS = ['layerDecay']

/** The full config of `spec`: transformers' defaults around its backbone, overlaid with its fields. */
export function resolveSegmenterConfig(spec: SegmenterSpec): SegmenterConfig {
  checkOptions('segmenter spec', spec, SPEC_FIELDS)
  if (!Number.isInteger(spec.numLabels) || spec.numLabels < 2)
    throw new Error(`numLabels must be an integer >= 2, got ${spec.numLabels}`)
  const model = resolveConfig(spec.model)
  const defaults = JSON.parse(native.defaultSegmenterConfig(JSON.stringify(model), spec.numLabels)) as SegmenterConfig
  const given = Object.fromEntries(Object.entries(spec).filter(([, v]) => v !== undefined))
  return { ...defaults, ...given, model }
}

export class Segmenter extends Checkpointed<NativeSegmenter> {
  readonly config: SegmenterConfig
  readonly training: Required<SegmenterTrainingOptions>
  /** Trainable values (BatchNorm statistics not counted). */
  readonly numParameters: number

  private constructor(handle: NativeSegmenter) {
    super(handle)
    this.config = JSON.parse(handle.configJson) as SegmenterConfig
    this.training = handle.training as Required<SegmenterTrainingOptions>
    this.numParameters = handle.numParameters
  }

  static create(spec: SegmenterSpec, opts: SegmenterCreateOptions = {}): Segmenter {
    const config = resolveSegmenterConfig(spec)
    return new Segmenter(place(native.NativeSegmenter.create(JSON.stringify(config), ...nativeOptions(opts)), opts))
  }

  /**
   * The backbone of a beit MIM (`Beit.save`) or classifier checkpoint under a new
   * segmentation head. `spec.model` is by default the checkpoint's backbone config; another
   * image size is `{ ...(await pretrainedBackbone(path)), imageSize }` (the position tables are
   * resized). It may change what does not change shapes; a patch size or channel count other
   * than the checkpoint's is refused.
   */
  static async fromPretrained(
    path: string,
    spec: Omit<SegmenterSpec, 'model'> & { model?: ModelSpec },
    opts: SegmenterCreateOptions = {},
  ): Promise<Segmenter> {
    const model = spec.model ?? (await pretrainedBackbone(path))
    const config = resolveSegmenterConfig({ ...spec, model })
    const handle = await native.NativeSegmenter.fromPretrained(path, JSON.stringify(config), ...nativeOptions(opts))
    return new Segmenter(place(handle, opts))
  }

  /**
   * Imports a transformers `BeitForSemanticSegmentation` folder (`config.json` +
   * `model.safetensors`), BatchNorm statistics included; `imageSize` resizes the position
   * tables.
   */
  static async fromHuggingFace(
    dir: string,
    opts: Omit<SegmenterCreateOptions, 'seed'> & { imageSize?: ImageSize } = {},
  ): Promise<Segmenter> {
    const handle = await native.NativeSegmenter.fromHuggingFace(
      dir,
      imageSizePair(opts.imageSize),
      checkOptions('optimizer', opts.optimizer, ADAMW_FIELDS),
      checkOptions('training', opts.training, TRAINING_FIELDS),
    )
    return new Segmenter(place(handle, opts))
  }

  /** Writes a transformers `BeitForSemanticSegmentation` folder (classes named LABEL_i). */
  exportHuggingFace(dir: string): Promise<void> {
    return this.handle.exportHuggingFace(dir)
  }

  /** Reads a checkpoint written by `save`. */
  static async load(path: string, opts: DeviceOptions = {}): Promise<Segmenter> {
    return new Segmenter(place(await native.NativeSegmenter.load(path), opts))
  }

  /**
   * Adds the gradient of the batch's per-pixel cross-entropy (summed over its labelled pixels)
   * to the model's gradients (`applyUpdate` applies their mean) and moves the BatchNorm
   * statistics, as a PyTorch training forward does.
   */
  lossAndGrads(input: SegmentationInput): Promise<SegmenterLossMetrics> {
    checkType('pixels', input.pixels, Float32Array)
    checkType('masks', input.masks, Uint8Array)
    return this.handle.lossAndGrads(input.pixels, input.masks, stepDraws(input))
  }

  /** One AdamW step (lossAndGrads + applyUpdate in one native call); `seed` drives drop path. */
  trainStep(input: SegmentationInput & { lr: number }): Promise<SegmenterStepMetrics> {
    checkType('pixels', input.pixels, Float32Array)
    checkType('masks', input.masks, Uint8Array)
    return this.handle.trainStep(input.pixels, input.masks, checkLr(input.lr), checkSeed(input.seed ?? 0))
  }

  /** Class ids [B, H, W] at the input's size (BatchNorm on its running statistics). */
  predict(pixels: Float32Array): Promise<Uint8Array> {
    checkType('pixels', pixels, Float32Array)
    return this.handle.predict(pixels)
  }

  /**
   * One image [C, H, W] of any size, as mmseg's "slide" inference: windows of the input size
   * every `stride` pixels (default two thirds of the window, as 341 for 512), the last flush
   * with the far edge, their logits resized to the window and averaged where they overlap, the
   * average resized bilinearly to `outputSize` (default the image's size; an image rescaled for
   * inference is scored at its original size). An image smaller than the window is padded with
   * zeros. Returns class ids [outputSize] and, with `probabilities`, softmax [numLabels, ...outputSize].
   */
  segment(
    pixels: Float32Array,
    opts: { size: [number, number]; stride?: [number, number]; outputSize?: [number, number]; probabilities?: boolean },
  ): Promise<SegmentedPixels> {
    checkType('pixels', pixels, Float32Array)
    const [h, w] = this.config.model.imageSize
    const size = checkSize('size', opts.size)
    const stride = checkSize(
      'stride',
      opts.stride ?? [Math.max(1, Math.round((2 * h) / 3)), Math.max(1, Math.round((2 * w) / 3))],
    )
    const outputSize = checkSize('outputSize', opts.outputSize ?? size)
    return this.handle.segment(pixels, size, stride, outputSize, opts.probabilities ?? false)
  }

  /** The main head's logits [B, numLabels, h, w] at 4x the patch grid (a quarter of the input for 16-pixel patches). */
  logits(pixels: Float32Array): Promise<SegmentationLogits> {
    checkType('pixels', pixels, Float32Array)
    return this.handle.logits(pixels)
  }
}

function nativeOptions(opts: SegmenterCreateOptions) {
  return [
    checkOptions('optimizer', opts.optimizer, ADAMW_FIELDS),
    checkOptions('training', opts.training, TRAINING_FIELDS),
    checkSeed(opts.seed ?? 0),
  ] as const
}
