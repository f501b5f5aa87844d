/**
 * View specs and augmentation parameters. The random draws happen here, from a seeded Rng; the
 * native loader only applies them (BEIT_REFERENCE.md section 4).
 */
import { Rng } from '../rng'

export type Interpolation = 'nearest' | 'bilinear' | 'bicubic' | 'lanczos'

/** One output of the loader: its size, filter, channels and per-channel normalisation. */
export interface ViewSpec {
  /** [height, width]. */
  size: [number, number]
  interpolation: Interpolation
  /** 1 (RGB sources become ITU-R 601 luma) or 3 (gray sources are repeated). */
  channels: 1 | 3
  /** Output = (x - mean[c]) / std[c] with x in [0, 1]. */
  mean: number[]
  std: number[]
}

export interface ViewSpecOptions {
  /** Square side in pixels, or [height, width]. */
  size: number | [number, number]
  interpolation: Interpolation
  /** 1 or 3 (a model or tokenizer config's numChannels). */
  channels: number
  /** Normalisation: one value for every channel, or one per channel. Default 0 / 1: pixels in [0, 1]. */
  mean?: number | number[]
  std?: number | number[]
}

/** The one way to make a ViewSpec: a size, a filter, the channels and (optionally) a normalisation. */
export function viewSpec(opts: ViewSpecOptions): ViewSpec {
  const { size, interpolation, channels } = opts
  if (channels !== 1 && channels !== 3) throw new Error(`a view has 1 or 3 channels, got ${channels}`)
  const perChannel = (name: 'mean' | 'std', value: number | number[]) => {
    if (typeof value === 'number') return Array.from({ length: channels }, () => value)
    if (!Array.isArray(value) || value.length !== channels)
      throw new Error(
        `view ${name}: expected one number or ${channels} (one per channel), got ${JSON.stringify(value)}`,
      )
    return [...value]
  }
  return {
    size: typeof size === 'number' ? [size, size] : [size[0], size[1]],
    interpolation,
    channels,
    mean: perChannel('mean', opts.mean ?? 0),
    std: perChannel('std', opts.std ?? 1),
  }
}

export interface BeitViewOptions {
  /** Patch view size in pixels (square). Default 224. */
  imageSize?: number
  /** Tokenizer view size in pixels (square). Default 112. */
  tokenizerSize?: number
  /** Default 3. */
  channels?: 1 | 3
  /** Patch view normalisation. Default 0.5 / 0.5 (BEiT's). */
  mean?: number
  std?: number
}

/**
 * BEiT's two views of one crop: the bicubic patch view, normalised, and the Lanczos tokenizer
 * view in [0, 1] (the form `Dvae.encode` takes; it applies the logit-Laplace pixel map itself).
 */
export function beitViews(opts: BeitViewOptions = {}): [ViewSpec, ViewSpec] {
  const { imageSize = 224, tokenizerSize = 112, channels = 3, mean = 0.5, std = 0.5 } = opts
  return [
    viewSpec({ size: imageSize, interpolation: 'bicubic', channels, mean, std }),
    viewSpec({ size: tokenizerSize, interpolation: 'lanczos', channels }),
  ]
}

export interface ColorJitterOptions {
  /** Factors are drawn from [max(0, 1 - v), 1 + v], as torchvision's ColorJitter. 0 disables. */
  brightness?: number
  contrast?: number
  saturation?: number
}

/** Training augmentation; the defaults are BEiT's pretraining transform. */
export interface TrainTransform {
  kind: 'train'
  /** RandomResizedCrop area share range. Default [0.08, 1]. */
  scale?: [number, number]
  /** RandomResizedCrop aspect ratio range (w/h). Default [3/4, 4/3]. */
  ratio?: [number, number]
  /** Horizontal flip probability. Default 0.5. */
  flip?: number
  /** Default 0.4 for each; null disables. */
  colorJitter?: ColorJitterOptions | null
}

/** Evaluation: the centred box of the view's aspect, `cropFraction` of the shorter side. */
export interface EvalTransform {
  kind: 'eval'
  /** Default 0.875 (Resize(256) + CenterCrop(224)). */
  cropFraction?: number
}

export type Transform = TrainTransform | EvalTransform

/** The drawn parameters for one image, as the native loader takes them. */
export type Augment = {
  crop:
    | { kind: 'randomResized'; attempts: [number, number][]; position: [number, number]; ratioRange: [number, number] }
    | { kind: 'center'; fraction: number }
  flip: boolean
  jitter: { op: 'brightness' | 'contrast' | 'saturation'; factor: number }[]
}

/** torchvision's RandomResizedCrop tries 10 boxes before falling back to a centre crop. */
const CROP_ATTEMPTS = 10

export function validateTransform(t: Transform): void {
  if (t.kind === 'eval') {
    const f = t.cropFraction ?? 0.875
    if (!(f > 0 && f <= 1)) throw new Error(`transform.cropFraction must be in (0, 1], got ${f}`)
    return
  }
  if (t.kind !== 'train')
    throw new Error(`transform.kind must be 'train' or 'eval', got ${String((t as { kind: unknown }).kind)}`)
  const [s0, s1] = t.scale ?? [0.08, 1]
  if (!(s0 > 0 && s0 <= s1 && s1 <= 1))
    throw new Error(`transform.scale must satisfy 0 < min <= max <= 1, got [${s0}, ${s1}]`)
  const [r0, r1] = t.ratio ?? [3 / 4, 4 / 3]
  if (!(r0 > 0 && r0 <= r1 && Number.isFinite(r1)))
    throw new Error(`transform.ratio must satisfy 0 < min <= max, got [${r0}, ${r1}]`)
  const flip = t.flip ?? 0.5
  if (!(flip >= 0 && flip <= 1)) throw new Error(`transform.flip is a probability in [0, 1], got ${flip}`)
  for (const [name, v] of Object.entries(t.colorJitter ?? {})) {
    // torchvision's hue jitter is not one of them: a hue key would silently do nothing.
    if (!['brightness', 'contrast', 'saturation'].includes(name))
      throw new Error(`transform.colorJitter.${name} is not an option: expected brightness, contrast or saturation`)
    if (!(Number.isFinite(v) && v >= 0))
      throw new Error(`transform.colorJitter.${name} must be a non-negative number, got ${v}`)
  }
}

/** Draws one image's augmentation from `rng`, in a fixed order of draws. */
export function drawAugment(t: Transform, rng: Rng): Augment {
  if (t.kind === 'eval') return { crop: { kind: 'center', fraction: t.cropFraction ?? 0.875 }, flip: false, jitter: [] }
  const [s0, s1] = t.scale ?? [0.08, 1]
  const ratioRange = t.ratio ?? [3 / 4, 4 / 3]
  const [logR0, logR1] = ratioRange.map(Math.log)
  const attempts: [number, number][] = []
  for (let i = 0; i < CROP_ATTEMPTS; i++) attempts.push([rng.uniform(s0, s1), Math.exp(rng.uniform(logR0, logR1))])
  const position: [number, number] = [rng.next(), rng.next()]
  const flip = rng.next() < (t.flip ?? 0.5)
  const {
    brightness = 0.4,
    contrast = 0.4,
    saturation = 0.4,
  } = t.colorJitter === null ? { brightness: 0, contrast: 0, saturation: 0 } : (t.colorJitter ?? {})
  const jitter: Augment['jitter'] = []
  const ops = [
    ['brightness', brightness],
    ['contrast', contrast],
    ['saturation', saturation],
  ] as const
  for (const [op, strength] of ops) {
    if (strength > 0) jitter.push({ op, factor: rng.uniform(Math.max(0, 1 - strength), 1 + strength) })
  }
  // torchvision applies the jitter ops in a random order.
  for (let i = jitter.length - 1; i > 0; i--) {
    const j = rng.int(0, i)
    ;[jitter[i], jitter[j]] = [jitter[j], jitter[i]]
  }
  return { crop: { kind: 'randomResized', attempts, position, ratioRange }, flip, jitter }
}

export function validateViews(views: ViewSpec[]): void {
  if (!Array.isArray(views) || views.length === 0) throw new Error('views: at least one view spec is needed')
  views.forEach((v, i) => {
    const [h, w] = v.size ?? []
    if (!(Number.isInteger(h) && Number.isInteger(w) && h > 0 && w > 0)) {
      throw new Error(`views[${i}].size must be [height, width] positive integers, got ${JSON.stringify(v.size)}`)
    }
    if (v.channels !== 1 && v.channels !== 3) throw new Error(`views[${i}].channels must be 1 or 3, got ${v.channels}`)
    if (!['nearest', 'bilinear', 'bicubic', 'lanczos'].includes(v.interpolation)) {
      throw new Error(
        `views[${i}].interpolation must be nearest, bilinear, bicubic or lanczos, got ${String(v.interpolation)}`,
      )
    }
    if (v.mean?.length !== v.channels || v.std?.length !== v.channels) {
      throw new Error(
        `views[${i}]: mean and std need ${v.channels} value(s), got ${JSON.stringify(v.mean)} and ${JSON.stringify(v.std)}`,
      )
    }
    if (v.std.some((s) => !(s > 0)))
      throw new Error(`views[${i}].std values must be positive, got ${JSON.stringify(v.std)}`)
  })
}
