/**
 * The image loader: TypeScript decides the order, the shards and every random augmentation
 * parameter; the native pool decodes, crops, resizes and normalises whole batches into
 * contiguous arrays, several batches ahead of the training step.
 */
import { native } from '../native'
import type { NativeImageLoader } from '../native'
import { deriveSeed, Rng } from '../rng'
import { drawAugment, Transform, validateTransform, validateViews, ViewSpec } from './augment'
import { describeImage, ImageDataset } from './dataset'
import { permutation } from './batches'
import { checkPositiveInteger } from '../check'

/** How a loader orders, shards, prefetches and decodes, whatever it loads. */
export interface ShardOptions {
  batchSize: number
  /** Seeds the shuffling and the augmentations. Default 0. */
  seed?: number
  /** Reshuffle every epoch. Default true. */
  shuffle?: boolean
  /** Drop the last partial batch of an epoch. Default false. */
  dropLast?: boolean
  /**
   * Data-parallel shard: this rank's batch k is the rank-th of worldSize equal parts of the
   * epoch's k-th global batch (worldSize x batchSize images of the epoch's order), so the ranks
   * together see what one process with batchSize x worldSize sees.
   */
  rank?: number
  worldSize?: number
  /**
   * With worldSize > 1, every rank gets the same number of images (and batches): the epoch's
   * order is cut to whole global batches (dropLast) or padded to a multiple of worldSize with
   * its first images, as PyTorch's DistributedSampler. false: every image exactly once, the
   * ranks' shards differing by up to one image (evaluation). Default true.
   */
  evenShards?: boolean
  /** Batches decoded ahead of the consumer. Default 2. */
  prefetch?: number
  /** Native decode threads. Default: the machine's available parallelism. */
  threads?: number
  /** Decoded pixels allowed per image (larger JPEGs are downscaled while decoding). Default 64 Mi. */
  maxPixels?: number
  /** 'skip' (default): leave unreadable images out, warn and count them. 'fail': throw. */
  onError?: 'skip' | 'fail'
  /** Called for each skipped image. Default: one console.warn line. */
  onSkip?: (skip: SkippedImage) => void
}

export interface LoaderOptions extends ShardOptions {
  dataset: ImageDataset
  views: ViewSpec[]
  transform: Transform
}

export interface SkippedImage {
  index: number
  image: string
  reason: string
}

export interface Batch extends LoadedBatch {
  /** One [size, C, H, W] array per view spec, in the specs' order. */
  views: Float32Array[]
  /** Label per image (-1 when unlabelled). */
  labels: Int32Array
}

export interface LoaderStats {
  loaded: number
  skipped: number
  /** The first 1000 skipped images. */
  skips: SkippedImage[]
}

const KEPT_SKIPS = 1000

/** The rank-th of `worldSize` contiguous parts of `n` items, as [from, to). */
function part(n: number, rank: number, worldSize: number): [number, number] {
  return [Math.floor((rank * n) / worldSize), Math.floor(((rank + 1) * n) / worldSize)]
}

/** What every loaded batch has, besides its data. */
export interface LoadedBatch {
  /** Dataset index per item. */
  indices: Uint32Array
  /** Items in the batch: batchSize, less any skipped ones (and the last partial batch). */
  size: number
  epoch: number
  /** Position of the batch in its epoch. */
  batch: number
}

type ShardSettings = Required<Omit<ShardOptions, 'threads' | 'maxPixels' | 'onSkip'>> & Pick<ShardOptions, 'onSkip'>

/** A batch off the native pool and the items it left out, counted when the batch is handed out. */
export interface Loaded<B> {
  batch: B
  skips: SkippedImage[]
}

/**
 * The order, the shards and the prefetching of a dataset's batches; subclasses say how one
 * batch is loaded (on the native pool) from its dataset indices.
 */
export abstract class ShardedLoader<B extends LoadedBatch> {
  readonly stats: LoaderStats = { loaded: 0, skipped: 0, skips: [] }
  protected readonly native: NativeImageLoader
  protected readonly shard: ShardSettings

  constructor(
    private readonly source: { name: string; size: number },
    options: ShardOptions,
  ) {
    const given = Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)) as ShardOptions
    const opts = {
      seed: 0,
      shuffle: true,
      dropLast: false,
      rank: 0,
      worldSize: 1,
      evenShards: true,
      prefetch: 2,
      onError: 'skip' as const,
      ...given,
    }
    const { batchSize, rank, worldSize, prefetch } = opts
    if (!source || !(source.size > 0)) throw new Error(`dataset ${source?.name ?? ''} is empty`)
    checkPositiveInteger('batchSize', batchSize)
    checkPositiveInteger('worldSize', worldSize)
    if (!Number.isInteger(opts.seed)) throw new Error(`seed must be an integer, got ${opts.seed}`)
    if (!Number.isInteger(rank) || rank < 0 || rank >= worldSize)
      throw new Error(`rank must be an integer in [0, ${worldSize - 1}], got ${rank}`)
    if (!Number.isInteger(prefetch) || prefetch < 0)
      throw new Error(`prefetch must be a non-negative integer, got ${prefetch}`)
    if (opts.onError !== 'skip' && opts.onError !== 'fail')
      throw new Error(`onError must be 'skip' or 'fail', got ${String(opts.onError)}`)
    this.shard = opts
    // Even shards (training: every rank takes every step) are checked for every rank on every
    // rank, so that all of them refuse together (one that went on would wait for the others in
    // its first collective). An uneven shard (evaluation) may be empty: that rank scores nothing.
    const empty = Array.from({ length: worldSize }, (_, r) => r).find((r) => this.shardSize(r) === 0)
    if (empty !== undefined && opts.evenShards) {
      throw new Error(
        `shard ${empty} of ${worldSize} gets no images: the dataset has only ${source.size}${opts.dropLast && worldSize > 1 ? ` (fewer than one global batch of ${worldSize} x ${batchSize})` : ''}`,
      )
    }
    const { threads } = options
    if (threads !== undefined && !(Number.isInteger(threads) && threads > 0))
      throw new Error(`threads must be at least 1 (a whole number of decode threads), got ${threads}`)
    this.native = new native.NativeImageLoader(threads, options.maxPixels)
  }

  get threads(): number {
    return this.native.threads
  }

  /** Batches this shard yields per epoch. */
  get batchesPerEpoch(): number {
    const { batchSize, dropLast } = this.shard
    const n = this.shardSize()
    return dropLast ? Math.floor(n / batchSize) : Math.ceil(n / batchSize)
  }

  /** This shard's dataset indices for `epoch`, in order. */
  epochOrder(epoch: number): Uint32Array {
    const { shuffle, seed, rank, worldSize, batchSize } = this.shard
    const size = this.source.size
    const order = shuffle
      ? permutation(size, new Rng(deriveSeed(seed, epoch)))
      : Uint32Array.from({ length: size }, (_, i) => i)
    if (worldSize === 1) return order
    const n = this.orderLength()
    const all = Uint32Array.from({ length: n }, (_, i) => order[i % order.length])
    const shard: number[] = []
    for (let start = 0; start < n; start += worldSize * batchSize) {
      const [from, to] = part(Math.min(worldSize * batchSize, n - start), rank, worldSize)
      for (let i = from; i < to; i++) shard.push(all[start + i])
    }
    return Uint32Array.from(shard)
  }

  /**
   * The batches of one epoch, from batch `fromBatch` on (for resuming: the batches, their
   * order and their augmentations depend only on seed, epoch and position).
   */
  async *epoch(epoch: number, opts: { fromBatch?: number } = {}): AsyncGenerator<B> {
    if (!Number.isInteger(epoch) || epoch < 0) throw new Error(`epoch must be a non-negative integer, got ${epoch}`)
    const order = this.epochOrder(epoch)
    const total = this.batchesPerEpoch
    let next = opts.fromBatch ?? 0
    if (!Number.isInteger(next) || next < 0 || next > total)
      throw new Error(`fromBatch must be an integer in [0, ${total}], got ${next}`)
    const { batchSize } = this.shard
    // Batches are prefetched; their skips are counted (or thrown, with onError 'fail') when they
    // are handed out, so a consumer that stops early sees the stats of what it took.
    const queue: Promise<Loaded<B>>[] = []
    const launch = (batch: number) => {
      const indices = order.subarray(batch * batchSize, Math.min(order.length, (batch + 1) * batchSize))
      const pending = this.load(indices, epoch, batch)
      pending.catch(() => {}) // surfaced when awaited; avoids an unhandled rejection meanwhile
      queue.push(pending)
    }
    while (next < total && queue.length <= this.shard.prefetch) launch(next++)
    while (queue.length > 0) {
      const { batch, skips } = await queue.shift()!
      if (next < total) launch(next++)
      this.count(skips, batch.size)
      // A batch whose every image was skipped (and counted) is left out, except with even shards
      // in a data-parallel job, where every rank takes every step (it adds no gradient there).
      if (batch.size > 0 || (this.shard.worldSize > 1 && this.shard.evenShards)) yield batch
    }
  }

  /** Loads the items `indices` (batch `batch` of `epoch`). */
  protected abstract load(indices: Uint32Array, epoch: number, batch: number): Promise<Loaded<B>>

  /** The native pool's kept items and failures as dataset indices and skips. */
  protected kept(
    indices: Uint32Array,
    result: { kept: Uint32Array; failures: { index: number; reason: string }[] },
    describe: (index: number) => string,
  ): { kept: Uint32Array; skips: SkippedImage[] } {
    const skips = result.failures.map((failure) => {
      const index = indices[failure.index]
      return { index, image: describe(index), reason: failure.reason }
    })
    return { kept: Uint32Array.from(result.kept, (k) => indices[k]), skips }
  }

  /** Counts and reports a handed-out batch's skips, or throws at the first with onError 'fail'. */
  private count(skips: SkippedImage[], loaded: number): void {
    for (const skip of skips) {
      if (this.shard.onError === 'fail') throw new Error(`cannot load ${skip.image}: ${skip.reason}`)
      this.stats.skipped++
      if (this.stats.skips.length < KEPT_SKIPS) this.stats.skips.push(skip)
      if (this.shard.onSkip) this.shard.onSkip(skip)
      else console.warn(`beit: skipped ${skip.image}: ${skip.reason}`)
    }
    this.stats.loaded += loaded
  }

  /** The length of the epoch's order the shards are cut from (cut or padded for even shards). */
  private orderLength(): number {
    const { worldSize, batchSize, dropLast, evenShards } = this.shard
    const n = this.source.size
    if (worldSize === 1 || !evenShards) return n
    return dropLast
      ? Math.floor(n / (worldSize * batchSize)) * worldSize * batchSize
      : Math.ceil(n / worldSize) * worldSize
  }

  private shardSize(rank = this.shard.rank): number {
    const { worldSize, batchSize } = this.shard
    const n = this.orderLength()
    const global = worldSize * batchSize
    const [from, to] = part(n % global, rank, worldSize)
    return Math.floor(n / global) * batchSize + (to - from)
  }
}

/**
 * A dataset that agrees with itself: a label, and a path or the pixels, for each of its `size`
 * images (a source may hold more: the first `size` are the dataset's).
 */
function checkDataset(d: ImageDataset): void {
  if (!d) return // the base class names an absent dataset
  const images =
    d.source.kind === 'files'
      ? { count: d.source.paths.length, what: 'paths' }
      : {
          count: d.source.pixels.length / (d.source.height * d.source.width * d.source.channels),
          what: `images of ${d.source.height}x${d.source.width}x${d.source.channels} pixels`,
        }
  if (images.count < d.size)
    throw new Error(`dataset ${d.name} has size ${d.size} but only ${images.count} ${images.what}`)
  if (d.labels.length < d.size)
    throw new Error(
      `dataset ${d.name} has size ${d.size} but only ${d.labels.length} labels (-1 for unlabelled images)`,
    )
}

export class ImageLoader extends ShardedLoader<Batch> {
  private readonly viewsJson: string

  constructor(private readonly options: LoaderOptions) {
    validateViews(options.views)
    validateTransform(options.transform)
    checkDataset(options.dataset)
    super(options.dataset, options)
    this.viewsJson = JSON.stringify(options.views)
  }

  get dataset(): ImageDataset {
    return this.options.dataset
  }

  protected async load(indices: Uint32Array, epoch: number, batch: number): Promise<Loaded<Batch>> {
    const { dataset, transform } = this.options
    const augments = Array.from(indices, (index) =>
      drawAugment(transform, new Rng(deriveSeed(this.shard.seed, epoch, index, 1))),
    )
    const augmentsJson = JSON.stringify(augments)
    const source = dataset.source
    const result =
      source.kind === 'files'
        ? await this.native.loadFiles(
            Array.from(indices, (i: number) => source.paths[i]),
            augmentsJson,
            this.viewsJson,
          )
        : await this.native.loadPixels(
            source.pixels,
            source.height,
            source.width,
            source.channels,
            indices,
            augmentsJson,
            this.viewsJson,
          )
    const { kept, skips } = this.kept(indices, result, (i) => describeImage(dataset, i))
    return {
      batch: {
        views: result.views,
        labels: Int32Array.from(kept, (i) => dataset.labels[i]),
        indices: kept,
        size: kept.length,
        epoch,
        batch,
      },
      skips,
    }
  }
}
