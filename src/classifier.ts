/**
 * Image classification on a BEiT backbone (Hugging Face's BeitForImageClassification layout):
 * fine-tuned end to end with label smoothing, layer-wise LR decay and stochastic depth, or
 * initialised from a pretrained MIM checkpoint.
 */
import { AdamWOptions, BeitConfig, ModelSpec, resolveConfig } from './config'
import { Checkpointed } from './checkpointed'
import { ADAMW_FIELDS, checkLr, checkOptions, checkSeed, checkType, Draws, stepDraws } from './check'
import { ImageSize, imageSizePair } from './config'
import { pretrainedBackbone } from './model'
import { DeviceOptions, place } from './device'
import {
  ClassifierLossMetrics,
  ClassifierStepMetrics,
  ClassifierTrainingOptions,
  native,
  NativeClassifier,
} from './native'
export type { ClassifierLossMetrics, ClassifierStepMetrics, ClassifierTrainingOptions } from './native'

export type Pooling = 'mean' | 'cls'

export interface ClassifierConfig {
  model: BeitConfig
  numLabels: number
  pooling: Pooling
  /** The classes' names by label (transformers' `id2label`; exported as LABEL_i when absent). */
  classNames?: string[]
}

export interface ClassifierSpec {
  /** Backbone: preset name, preset with overrides, or a full config. */
  model: ModelSpec
  numLabels: number
  /** Default 'mean' (BEiT's fine-tuning head). */
  pooling?: Pooling
  /** One distinct name per label, e.g. the training set's `classNames`; saved and exported. */
  classNames?: string[]
}

export interface ClassifierCreateOptions extends DeviceOptions {
  optimizer?: AdamWOptions
  training?: ClassifierTrainingOptions
  /** Initialisation seed (of the head, when starting from a checkpoint). Default 0. */
  seed?: number
}

export interface LabelledInput extends Draws {
  /** [B, C, H, W], normalised. */
  pixels: Float32Array
  /** [B] class indices. */
  labels: Int32Array
}

function resolveSpec(spec: ClassifierSpec): ClassifierConfig {
  if (!Number.isInteger(spec.numLabels) || spec.numLabels < 2)
    throw new Error(`numLabels must be an integer >= 2, got ${spec.numLabels}`)
  const pooling = spec.pooling ?? 'mean'
  if (pooling !== 'mean' && pooling !== 'cls')
    throw new Error(`pooling must be 'mean' or 'cls', got ${String(pooling)}`)
  const { classNames } = spec
  if (classNames !== undefined && !(Array.isArray(classNames) && classNames.every((n) => typeof n === 'string')))
    throw new Error(`classNames must be an array of strings, got ${JSON.stringify(classNames)}`)
  return { model: resolveConfig(spec.model), numLabels: spec.numLabels, pooling, ...(classNames && { classNames }) }
}

export class Classifier extends Checkpointed<NativeClassifier> {
  readonly config: ClassifierConfig
  readonly training: Required<ClassifierTrainingOptions>
  readonly numParameters: number

  private constructor(handle: NativeClassifier) {
    super(handle)
    this.config = JSON.parse(handle.configJson) as ClassifierConfig
    this.training = handle.training as Required<ClassifierTrainingOptions>
    this.numParameters = handle.numParameters
  }

  static create(spec: ClassifierSpec, opts: ClassifierCreateOptions = {}): Classifier {
    const config = resolveSpec(spec)
    const args = [
      checkOptions('optimizer', opts.optimizer, ADAMW_FIELDS),
      checkOptions('training', opts.training, ['labelSmoothing', 'layerDecay']),
      checkSeed(opts.seed ?? 0),
    ] as const
    return new Classifier(place(native.NativeClassifier.create(JSON.stringify(config), ...args), opts))
  }

  /**
   * The backbone of a MIM (`Beit.save`) or classifier checkpoint under a new head (a
   * classifier's pooling LayerNorm is kept when `pooling` is the same). `spec.model` may change
   * what does not change shapes (e.g. dropPathRate) and the image size (the position tables are
   * resized); by default it is the checkpoint's backbone config (`pretrainedBackbone`).
   */
  static async fromPretrained(
    path: string,
    spec: Omit<ClassifierSpec, 'model'> & { model?: ModelSpec },
    opts: ClassifierCreateOptions = {},
  ): Promise<Classifier> {
    const model = spec.model ?? (await pretrainedBackbone(path))
    const config = resolveSpec({ ...spec, model })
    const args = [
      checkOptions('optimizer', opts.optimizer, ADAMW_FIELDS),
      checkOptions('training', opts.training, ['labelSmoothing', 'layerDecay']),
      checkSeed(opts.seed ?? 0),
    ] as const
    return new Classifier(
      place(await native.NativeClassifier.fromPretrained(path, JSON.stringify(config), ...args), opts),
    )
  }

  /**
   * Imports a Hugging Face transformers BEiT folder (`config.json` + `model.safetensors`). A
   * `BeitForImageClassification` keeps its head unless `numLabels` differs; a `BeitModel` or
   * `BeitForMaskedImageModeling` backbone gets a new head of `numLabels` classes. Pooling
   * follows the config's `use_mean_pooling`; `imageSize` resizes the position tables.
   */
  static async fromHuggingFace(
    dir: string,
    opts: ClassifierCreateOptions & { imageSize?: ImageSize; numLabels?: number } = {},
  ): Promise<Classifier> {
    if (opts.numLabels !== undefined && (!Number.isInteger(opts.numLabels) || opts.numLabels < 2)) {
      throw new Error(`numLabels must be an integer >= 2, got ${opts.numLabels}`)
    }
    const args = [
      checkOptions('optimizer', opts.optimizer, ADAMW_FIELDS),
      checkOptions('training', opts.training, ['labelSmoothing', 'layerDecay']),
      checkSeed(opts.seed ?? 0),
    ] as const
    return new Classifier(
      place(
        await native.NativeClassifier.fromHuggingFace(dir, imageSizePair(opts.imageSize), opts.numLabels, ...args),
        opts,
      ),
    )
  }

  /** Writes a transformers `BeitForImageClassification` folder (classes named LABEL_i). */
  exportHuggingFace(dir: string): Promise<void> {
    return this.handle.exportHuggingFace(dir)
  }

  /** Reads a checkpoint written by `save`. */
  static async load(path: string, opts: DeviceOptions = {}): Promise<Classifier> {
    return new Classifier(place(await native.NativeClassifier.load(path), opts))
  }

  /**
   * Adds the gradient of the batch's label-smoothed cross-entropy (summed over its images) to
   * the model's gradients; `applyUpdate` applies their mean.
   */
  lossAndGrads(input: LabelledInput): Promise<ClassifierLossMetrics> {
    checkType('pixels', input.pixels, Float32Array)
    checkType('labels', input.labels, Int32Array)
    return this.handle.lossAndGrads(input.pixels, input.labels, stepDraws(input))
  }

  /** One AdamW step (lossAndGrads + applyUpdate in one native call); `seed` drives drop path. */
  trainStep(input: LabelledInput & { lr: number }): Promise<ClassifierStepMetrics> {
    checkType('pixels', input.pixels, Float32Array)
    checkType('labels', input.labels, Int32Array)
    return this.handle.trainStep(input.pixels, input.labels, checkLr(input.lr), checkSeed(input.seed ?? 0))
  }

  /** Logits [B, numLabels]. */
  predict(pixels: Float32Array): Promise<Float32Array> {
    checkType('pixels', pixels, Float32Array)
    return this.handle.predict(pixels)
  }
}

/** Index of the largest logit of each row of [rows, classes]. */
export function argmaxRows(logits: Float32Array, classes: number): Int32Array {
  const rows = logits.length / classes
  const out = new Int32Array(rows)
  for (let r = 0; r < rows; r++) {
    let best = 0
    for (let c = 1; c < classes; c++) if (logits[r * classes + c] > logits[r * classes + best]) best = c
    out[r] = best
  }
  return out
}
