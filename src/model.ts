import { AdamWOptions, BeitConfig, ImageSize, imageSizePair, ModelSpec, gridSize, resolveConfig } from './config'
export { imageSizePair } from './config'
export type { ImageSize } from './config'
import { Checkpointed } from './checkpointed'
import { DeviceOptions, place } from './device'
import { ADAMW_FIELDS, checkLr, checkOptions, checkSeed, checkType, Draws, stepDraws } from './check'
import { BeitLossMetrics, BeitStepMetrics, native, NativeBeit, PretrainInput as NativePretrainInput } from './native'
import { Dvae } from './tokenizer'
export type { BeitLossMetrics, BeitStepMetrics } from './native'

export interface CreateOptions extends DeviceOptions {
  optimizer?: AdamWOptions
  /** Initialisation seed. Default 0. */
  seed?: number
}

export interface MimInput extends Draws {
  /** [B, C, H, W], already normalised. */
  pixels: Float32Array
  /** [B, N] with 1 = masked; N = number of patches. */
  mask: Uint8Array
  /** [B, N] visual-token ids; only masked positions are read. */
  targets: Int32Array
}

export interface PretrainInput extends Draws {
  /** Computes the targets from `tokenizerPixels`; its token grid must be the patch grid. */
  tokenizer: Dvae
  /** [B, C, H, W], already normalised: the model's view. */
  pixels: Float32Array
  /** [B, C, h, w] in [0, 1]: the tokenizer's view of the same crops (h, w: the tokenizer's imageSize). */
  tokenizerPixels: Float32Array
  /** [B, N] with 1 = masked. */
  mask: Uint8Array
}

export interface TrainStepInput extends MimInput {
  lr: number
}

export interface PretrainStepInput extends PretrainInput {
  lr: number
}

export interface ForwardInput {
  pixels: Float32Array
  mask: Uint8Array
}

export interface ForwardResult {
  /** [numMasked, vocabSize], masked patches in batch-major, row-major order. */
  logits: Float32Array
  /** [numMasked] predicted token ids. */
  ids: Int32Array
  numMasked: number
}

/**
 * The backbone config of a beit MIM (`Beit.save`) or classifier (`Classifier.save`)
 * checkpoint, read from the file's header alone: what `Classifier.fromPretrained` and
 * `Segmenter.fromPretrained` start from by default.
 */
export async function pretrainedBackbone(path: string): Promise<BeitConfig> {
  return JSON.parse(await native.pretrainedBackboneConfig(path)) as BeitConfig
}

/** A BEiT vision transformer with its masked-image-modeling head and AdamW state. */
export class Beit extends Checkpointed<NativeBeit> {
  readonly config: BeitConfig
  readonly optimizer: Required<AdamWOptions>
  readonly numParameters: number
  /** Patch grid [height, width]. */
  readonly grid: [number, number]

  private constructor(handle: NativeBeit) {
    super(handle)
    this.config = JSON.parse(handle.configJson) as BeitConfig
    this.optimizer = handle.optimizer as Required<AdamWOptions>
    this.numParameters = handle.numParameters
    this.grid = gridSize(this.config)
  }

  static create(spec: ModelSpec, opts: CreateOptions = {}): Beit {
    const config = resolveConfig(spec)
    const seed = checkSeed(opts.seed ?? 0)
    return new Beit(
      place(
        native.NativeBeit.create(JSON.stringify(config), checkOptions('optimizer', opts.optimizer, ADAMW_FIELDS), seed),
        opts,
      ),
    )
  }

  /**
   * Loads a checkpoint written by `save` (weights, config, optimizer state). With `config`,
   * the file must fit it: a mismatch names the tensor and both shapes.
   */
  static async load(path: string, opts: DeviceOptions & { config?: ModelSpec } = {}): Promise<Beit> {
    const expected = opts.config === undefined ? undefined : JSON.stringify(resolveConfig(opts.config))
    return new Beit(place(await native.NativeBeit.load(path, expected), opts))
  }

  /**
   * Imports a Hugging Face transformers `BeitForMaskedImageModeling` folder (`config.json` +
   * `model.safetensors`), with a fresh optimizer. `imageSize` changes the resolution: the
   * relative position tables and absolute position embeddings are resized to the new grid.
   */
  static async fromHuggingFace(
    dir: string,
    opts: DeviceOptions & { imageSize?: ImageSize; optimizer?: AdamWOptions } = {},
  ): Promise<Beit> {
    const handle = await native.NativeBeit.fromHuggingFace(
      dir,
      imageSizePair(opts.imageSize),
      checkOptions('optimizer', opts.optimizer, ADAMW_FIELDS),
    )
    return new Beit(place(handle, opts))
  }

  /** Writes a transformers `BeitForMaskedImageModeling` folder (`from_pretrained` loads it). */
  exportHuggingFace(dir: string): Promise<void> {
    return this.handle.exportHuggingFace(dir)
  }

  /**
   * Linear-probe features of layer `layer` (1-based; 0 = the embeddings): [CLS] and the mean
   * patch token concatenated, [B, 2 * hiddenSize]. No masking, no stochastic depth.
   */
  probeFeatures(pixels: Float32Array, layer: number): Promise<Float32Array> {
    checkType('pixels', pixels, Float32Array)
    if (!Number.isInteger(layer) || layer < 0 || layer > this.config.numHiddenLayers) {
      throw new Error(`layer must be an integer in [0, ${this.config.numHiddenLayers}], got ${layer}`)
    }
    return this.handle.probeFeatures(pixels, layer)
  }

  /**
   * Adds the gradient of the batch's masked cross-entropy (summed over its masked patches) to
   * the model's gradients, off the JS thread; `applyUpdate` applies the mean over every masked
   * patch since the last update. With a tokenizer and its view the targets are its ids, which
   * stay native (on a GPU, on the GPU).
   */
  lossAndGrads(input: MimInput | PretrainInput): Promise<BeitLossMetrics> {
    checkType('pixels', input.pixels, Float32Array)
    checkType('mask', input.mask, Uint8Array)
    const draws = stepDraws(input)
    if (!('tokenizer' in input)) {
      checkType('targets', input.targets, Int32Array)
      return this.handle.lossAndGrads(input.pixels, input.mask, input.targets, draws)
    }
    return this.handle.pretrainLossAndGrads(input.tokenizer.nativeHandle(), pretrainBatch(input), draws)
  }

  /** One AdamW step on the masked cross-entropy (lossAndGrads + applyUpdate in one native call). */
  trainStep(input: TrainStepInput): Promise<BeitStepMetrics> {
    checkType('pixels', input.pixels, Float32Array)
    checkType('mask', input.mask, Uint8Array)
    checkType('targets', input.targets, Int32Array)
    return this.handle.trainStep(input.pixels, input.mask, input.targets, checkLr(input.lr), checkSeed(input.seed ?? 0))
  }

  /**
   * One pretraining step in one native call: the tokenizer encodes the tokenizer view into the
   * targets, which stay native (on a GPU, on the GPU), then one AdamW step as `trainStep`.
   */
  pretrainStep(input: PretrainStepInput): Promise<BeitStepMetrics> {
    const batch = pretrainBatch(input)
    const seed = checkSeed(input.seed ?? 0)
    return this.handle.pretrainStep(input.tokenizer.nativeHandle(), batch, checkLr(input.lr), seed)
  }

  /** Evaluation forward pass (no stochastic depth): logits and ids at the masked patches. */
  forward(input: ForwardInput): Promise<ForwardResult> {
    checkType('pixels', input.pixels, Float32Array)
    checkType('mask', input.mask, Uint8Array)
    return this.handle.forward(input.pixels, input.mask)
  }
}

/** The native pretraining batch of `input`, checked; the tokenizer view is at its imageSize. */
function pretrainBatch(input: PretrainInput): NativePretrainInput {
  checkType('tokenizer', input.tokenizer, Dvae)
  checkType('pixels', input.pixels, Float32Array)
  checkType('tokenizerPixels', input.tokenizerPixels, Float32Array)
  checkType('mask', input.mask, Uint8Array)
  const [tokenizerHeight, tokenizerWidth] = input.tokenizer.config.imageSize
  const { pixels, tokenizerPixels, mask } = input
  return { pixels, tokenizerPixels, tokenizerHeight, tokenizerWidth, mask }
}
