/**
 * Segmentation data: image + mask pairs from an ADE20K-style folder, a VOC-style folder, a
 * manifest, or memory (Fashion-MNIST scenes); mmseg's joint augmentation drawn here and applied
 * by the native pool (rescale, crop capped by one class's share, flip, photometric distortion,
 * padding); a loader of augmented batches on the contract of the image loader.
 */
import { readdir, readFile } from 'node:fs/promises'
import { basename, dirname, extname, isAbsolute, join, resolve } from 'node:path'

import { csvRecords, IMAGE_EXTENSIONS, readManifest, requireFolder } from '../data/dataset'
import { Loaded, LoadedBatch, ShardedLoader, ShardOptions } from '../data/loader'
import { ViewSpec, viewSpec } from '../data/augment'
import { deriveSeed, Rng } from '../rng'

export type PairSource =
  | { kind: 'files'; images: string[]; masks: string[] }
  /** 8-bit images [count, height, width, channels] and masks [count, height, width]. */
  | { kind: 'pixels'; images: Uint8Array; masks: Uint8Array; height: number; width: number; channels: 1 | 3 }

export interface SegmentationDataset {
  /** Where it came from, for messages. */
  readonly name: string
  readonly size: number
  readonly source: PairSource
  /** Class names by id, where known (empty: ids only). */
  readonly classNames: string[]
  /** Stored mask value 0 is ignored and the others shift down by one (ADE20K's convention). */
  readonly reduceZeroLabel: boolean
}

export function describePair(data: SegmentationDataset, index: number): string {
  return data.source.kind === 'files' ? data.source.images[index] : `${data.name}[${index}]`
}

async function folderEntries(dir: string): Promise<string[]> {
  await requireFolder(dir)
  return (await readdir(dir)).sort()
}

const stem = (name: string) => basename(name, extname(name))

/** Images of `imageDir` paired with the PNG of the same stem in `maskDir`; unpaired files are counted. */
async function pairByStem(
  imageDir: string,
  maskDir: string,
): Promise<{ images: string[]; masks: string[]; unpaired: string[] }> {
  const maskNames = new Map(
    (await folderEntries(maskDir)).filter((n) => extname(n).toLowerCase() === '.png').map((n) => [stem(n), n]),
  )
  const images: string[] = []
  const masks: string[] = []
  const unpaired: string[] = []
  for (const name of await folderEntries(imageDir)) {
    if (!IMAGE_EXTENSIONS.includes(extname(name).toLowerCase())) continue
    const mask = maskNames.get(stem(name))
    if (mask === undefined) unpaired.push(join(imageDir, name))
    else {
      images.push(join(imageDir, name))
      masks.push(join(maskDir, mask))
    }
  }
  return { images, masks, unpaired }
}

function filesDataset(
  name: string,
  images: string[],
  masks: string[],
  opts: { classNames?: string[]; reduceZeroLabel?: boolean },
): SegmentationDataset {
  if (images.length === 0) throw new Error(`${name} holds no image with a mask`)
  return {
    name,
    size: images.length,
    source: { kind: 'files', images, masks },
    classNames: opts.classNames ?? [],
    reduceZeroLabel: opts.reduceZeroLabel ?? false,
  }
}

export interface SegmentationFolderOptions {
  /** The split's subfolder of `images/` and `annotations/` (ADE20K: 'training', 'validation'). */
  split?: string
  /** ADE20K stores "other" as 0 and its 150 classes as 1..150: true maps 0 to ignored and shifts. Default false. */
  reduceZeroLabel?: boolean
  classNames?: string[]
  /** Called with the images that have no mask (default: one warning line with their count). */
  onUnpaired?: (images: string[]) => void
}

/**
 * An ADE20K-style folder: `images/[split/]` and `annotations/[split/]`, an image and its PNG
 * mask sharing a file stem (ADEChallengeData2016: `split: 'training'`, `reduceZeroLabel: true`).
 */
export async function segmentationFolder(
  dir: string,
  opts: SegmentationFolderOptions = {},
): Promise<SegmentationDataset> {
  const sub = (part: string) => (opts.split ? join(dir, part, opts.split) : join(dir, part))
  const { images, masks, unpaired } = await pairByStem(sub('images'), sub('annotations'))
  reportUnpaired(unpaired, dir, opts.onUnpaired)
  return filesDataset(opts.split ? `${dir} (${opts.split})` : dir, images, masks, opts)
}

function reportUnpaired(unpaired: string[], where: string, onUnpaired?: (images: string[]) => void): void {
  if (unpaired.length === 0) return
  if (onUnpaired) onUnpaired(unpaired)
  else console.warn(`beit: ${unpaired.length} images in ${where} have no mask and are left out (first: ${unpaired[0]})`)
}

/** PASCAL VOC's 21 classes (ids 0..20; 255 marks object borders, ignored). */
export const VOC_CLASSES = [
  'background',
  'aeroplane',
  'bicycle',
  'bird',
  'boat',
  'bottle',
  'bus',
  'car',
  'cat',
  'chair',
  'cow',
  'diningtable',
  'dog',
  'horse',
  'motorbike',
  'person',
  'pottedplant',
  'sheep',
  'sofa',
  'train',
  'tvmonitor',
]

/**
 * A VOC-style folder (`VOCdevkit/VOC2012`): `JPEGImages/`, palette PNG masks in
 * `SegmentationClass/` (the palette index is the class, 255 ignored), and the split's stems in
 * `ImageSets/Segmentation/<split>.txt`.
 */
export async function vocSegmentation(
  dir: string,
  opts: { split?: string; classNames?: string[] } = {},
): Promise<SegmentationDataset> {
  const split = opts.split ?? 'train'
  const list = join(dir, 'ImageSets', 'Segmentation', `${split}.txt`)
  let text: string
  try {
    text = await readFile(list, 'utf8')
  } catch (e) {
    throw new Error(`cannot read the VOC split list ${list}: ${(e as Error).message}`, { cause: e })
  }
  const stems = text
    .split(/\r?\n/)
    .map((l) => l.trim())
    .filter(Boolean)
  const imageNames = new Map((await folderEntries(join(dir, 'JPEGImages'))).map((n) => [stem(n), n]))
  const images: string[] = []
  const masks: string[] = []
  for (const s of stems) {
    const image = imageNames.get(s)
    if (image === undefined) throw new Error(`${list} lists ${s}, but ${join(dir, 'JPEGImages')} has no image ${s}.*`)
    images.push(join(dir, 'JPEGImages', image))
    masks.push(join(dir, 'SegmentationClass', `${s}.png`))
  }
  return filesDataset(`${dir} (${split})`, images, masks, { classNames: opts.classNames ?? VOC_CLASSES })
}

/**
 * A CSV manifest with `image` and `mask` columns (paths relative to `root`, default the
 * manifest's folder).
 */
export async function segmentationManifest(
  path: string,
  opts: { root?: string; reduceZeroLabel?: boolean; classNames?: string[] } = {},
): Promise<SegmentationDataset> {
  const text = await readManifest(path)
  const root = opts.root ?? dirname(path)
  const [head, ...records] = csvRecords(text, path)
  const header = (head?.fields ?? []).map((h) => h.trim().toLowerCase())
  const [imageCol, maskCol] = [header.indexOf('image'), header.indexOf('mask')]
  if (imageCol < 0 || maskCol < 0)
    throw new Error(
      `${path}:1: the CSV header needs "image" and "mask" columns, got ${JSON.stringify(text.split(/\r?\n/)[0])}`,
    )
  const images: string[] = []
  const masks: string[] = []
  const at = (p: string) => (isAbsolute(p) ? p : resolve(root, p))
  for (const { fields, line } of records) {
    const [image, mask] = [fields[imageCol]?.trim(), fields[maskCol]?.trim()]
    if (!image || !mask) throw new Error(`${path}:${line}: expected an image and a mask path`)
    images.push(at(image))
    masks.push(at(mask))
  }
  return filesDataset(path, images, masks, opts)
}

/** mmseg's training pipeline for BEiT on ADE20K, relative to the crop (the view) size. */
export interface SegmentationTransform {
  /** RandomResize with keep_ratio: [long, short] sides at ratio 1. Default [4 x, 1 x] the crop's shorter side (ADE20K: [2048, 512] for 512 crops). */
  scale?: [number, number]
  /** Default [0.5, 2]. */
  ratioRange?: [number, number]
  /** Crops where one class covers this share of the labelled pixels or more are redrawn (up to 10 times). Default 0.75; 1 turns it off. */
  catMaxRatio?: number
  /** Horizontal flip probability. Default 0.5. */
  flip?: number
  /** PhotoMetricDistortion (brightness ±32, contrast and saturation 0.5-1.5, hue ±18), each with probability 1/2. Default true. */
  photometric?: boolean
}

/** The drawn parameters for one pair, as the native pool takes them. */
export interface PairAugment {
  /** [long side, short side] at ratio 1; with `fit`, the [height, width] the image fits in. */
  rescale?: { scale: [number, number]; ratio: number; fit?: boolean }
  crop: [number, number][]
  catMaxRatio: number
  flip: boolean
  photometric: (
    | { op: 'brightness'; delta: number }
    | { op: 'contrast'; alpha: number }
    | { op: 'saturation'; alpha: number }
    | { op: 'hue'; delta: number }
  )[]
}

/** mmseg's RandomCrop draws a window and redraws it up to 10 times. */
const CROP_DRAWS = 11

function checkRange(name: string, r: unknown, positive: boolean): void {
  if (!Array.isArray(r) || r.length !== 2 || !r.every((v) => Number.isFinite(v) && (!positive || v > 0)) || r[0] > r[1])
    throw new Error(
      `${name} must be [low, high] with low <= high${positive ? ', both positive' : ''}, got ${JSON.stringify(r)}`,
    )
}

/** A rescale target: [long side, short side], both positive, in that order. */
export function checkScale(name: string, scale: unknown): void {
  if (!(Array.isArray(scale) && scale.length === 2 && scale[0] >= scale[1] && scale[1] > 0))
    throw new Error(`${name} must be [long side, short side], positive, got ${JSON.stringify(scale)}`)
}

export function validateSegmentationTransform(t: SegmentationTransform | 'eval'): void {
  if (t === 'eval') return
  if (t.scale !== undefined) checkScale('transform.scale', t.scale)
  if (t.ratioRange !== undefined) checkRange('transform.ratioRange', t.ratioRange, true)
  const cap = t.catMaxRatio ?? 0.75
  if (!(cap > 0 && cap <= 1)) throw new Error(`transform.catMaxRatio must be in (0, 1], got ${cap}`)
  const flip = t.flip ?? 0.5
  if (!(flip >= 0 && flip <= 1)) throw new Error(`transform.flip must be a probability, got ${flip}`)
}

/** One pair's draws for `t` at a crop of `size` ([height, width]). */
export function drawPairAugment(t: SegmentationTransform | 'eval', size: [number, number], rng: Rng): PairAugment {
  const short = Math.min(...size)
  if (t === 'eval')
    return {
      rescale: { scale: size, ratio: 1, fit: true },
      crop: [],
      catMaxRatio: 1,
      flip: false,
      photometric: [],
    }
  const [lo, hi] = t.ratioRange ?? [0.5, 2]
  const rescale = { scale: t.scale ?? ([4 * short, short] as [number, number]), ratio: rng.uniform(lo, hi) }
  const catMaxRatio = t.catMaxRatio ?? 0.75
  const crop = Array.from(
    { length: catMaxRatio < 1 ? CROP_DRAWS : 1 },
    () => [rng.next(), rng.next()] as [number, number],
  )
  const flip = rng.next() < (t.flip ?? 0.5)
  const photometric: PairAugment['photometric'] = []
  if (t.photometric ?? true) {
    const maybe = () => rng.next() < 0.5
    if (maybe()) photometric.push({ op: 'brightness', delta: rng.uniform(-32, 32) })
    const contrastFirst = maybe()
    const contrast = () => maybe() && photometric.push({ op: 'contrast', alpha: rng.uniform(0.5, 1.5) })
    if (contrastFirst) contrast()
    if (maybe()) photometric.push({ op: 'saturation', alpha: rng.uniform(0.5, 1.5) })
    // numpy's randint, which mmseg draws with, leaves out its upper bound.
    if (maybe()) photometric.push({ op: 'hue', delta: rng.int(-18, 17) })
    if (!contrastFirst) contrast()
  }
  return { rescale, crop, catMaxRatio, flip, photometric }
}

export interface SegmentationLoaderOptions extends ShardOptions {
  data: SegmentationDataset
  /** The crop every pair becomes: its size, channels, resize filter and normalisation. */
  view: ViewSpec
  transform: SegmentationTransform | 'eval'
  numLabels: number
  /** Default 255. */
  ignoreIndex?: number
}

export interface SegmentationBatch extends LoadedBatch {
  /** [size, C, H, W] normalised. */
  pixels: Float32Array
  /** [size, H, W] class ids or the ignore index. */
  masks: Uint8Array
}

/** Batches of augmented pairs, decoded on the native pool ahead of the consumer. */
export class SegmentationLoader extends ShardedLoader<SegmentationBatch> {
  private readonly viewJson: string
  private readonly masksJson: string

  constructor(private readonly options: SegmentationLoaderOptions) {
    validateSegmentationTransform(options.transform)
    super(options.data, options)
    this.viewJson = JSON.stringify(options.view)
    this.masksJson = JSON.stringify({
      numLabels: options.numLabels,
      ignoreIndex: options.ignoreIndex ?? 255,
      reduceZeroLabel: options.data.reduceZeroLabel,
    })
  }

  protected async load(indices: Uint32Array, epoch: number, batch: number): Promise<Loaded<SegmentationBatch>> {
    const { data, transform, view } = this.options
    const augments = Array.from(indices, (index) =>
      drawPairAugment(transform, view.size, new Rng(deriveSeed(this.shard.seed, epoch, index, 1))),
    )
    const augmentsJson = JSON.stringify(augments)
    const source = data.source
    const result =
      source.kind === 'files'
        ? await this.native.loadPairFiles(
            Array.from(indices, (i) => source.images[i]),
            Array.from(indices, (i) => source.masks[i]),
            augmentsJson,
            this.viewJson,
            this.masksJson,
          )
        : await this.native.loadPairPixels(
            source.images,
            source.masks,
            source.height,
            source.width,
            source.channels,
            indices,
            augmentsJson,
            this.viewJson,
            this.masksJson,
          )
    const { kept, skips } = this.kept(indices, result, (i) => describePair(data, i))
    return {
      batch: { pixels: result.pixels, masks: result.masks, indices: kept, size: kept.length, epoch, batch },
      skips,
    }
  }
}

/** The view a segmenter takes: its image size and channels, bilinear (mmseg), normalised. */
export function segmenterView(
  imageSize: [number, number],
  channels: 1 | 3,
  normalize: { mean?: number | number[]; std?: number | number[] } = {},
): ViewSpec {
  return viewSpec({
    size: imageSize,
    interpolation: 'bilinear',
    channels,
    mean: normalize.mean ?? 0.5,
    std: normalize.std ?? 0.5,
  })
}

export interface WholePairLoaderOptions extends ShardOptions {
  /** Pairs read from files (in-memory pairs are evaluated with SegmentationLoader at their own size). */
  data: SegmentationDataset
  /** Channels, filter and normalisation of the images (its size is not used). */
  view: ViewSpec
  /** Each image is rescaled keeping its ratio to fit [long side, short side] (mmseg's test Resize); null: as it is. */
  scale: [number, number] | null
  numLabels: number
  /** Default 255. */
  ignoreIndex?: number
}

export interface WholePair {
  /** [C, size] normalised. */
  pixels: Float32Array
  size: [number, number]
  /** Class ids at the stored size. */
  mask: Uint8Array
  maskSize: [number, number]
}

export interface WholePairBatch extends LoadedBatch {
  pairs: WholePair[]
}

/** Pairs for whole-image evaluation (mmseg's test pipeline): images rescaled, masks as stored. */
export class WholePairLoader extends ShardedLoader<WholePairBatch> {
  private readonly json: [string, string, string]

  constructor(private readonly options: WholePairLoaderOptions) {
    if (options.data.source.kind !== 'files')
      throw new Error(`WholePairLoader reads pairs from files; ${options.data.name} is in memory`)
    super(options.data, { shuffle: false, evenShards: false, ...options })
    const { scale, view, numLabels, ignoreIndex = 255, data } = options
    this.json = [
      JSON.stringify(scale && { scale, ratio: 1 }),
      JSON.stringify(view),
      JSON.stringify({ numLabels, ignoreIndex, reduceZeroLabel: data.reduceZeroLabel }),
    ]
  }

  protected async load(indices: Uint32Array, epoch: number, batch: number): Promise<Loaded<WholePairBatch>> {
    const { data } = this.options
    const source = data.source as Extract<PairSource, { kind: 'files' }>
    const result = await this.native.loadWholePairs(
      Array.from(indices, (i) => source.images[i]),
      Array.from(indices, (i) => source.masks[i]),
      ...this.json,
    )
    const { kept, skips } = this.kept(indices, result, (i) => describePair(data, i))
    const pairs = result.pairs.map((p) => ({
      pixels: p.pixels,
      size: [p.size[0], p.size[1]] as [number, number],
      mask: p.mask,
      maskSize: [p.maskSize[0], p.maskSize[1]] as [number, number],
    }))
    return { batch: { pairs, indices: kept, size: kept.length, epoch, batch }, skips }
  }
}
