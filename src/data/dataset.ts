/**
 * Datasets: what images exist and their labels. Decoding happens later, in the loader.
 * Sources: an image folder (class-per-subfolder labels, ImageNet style), a CSV/JSONL manifest,
 * or in-memory 8-bit pixels (IDX files such as Fashion-MNIST).
 */
import { readdir, readFile, stat } from 'node:fs/promises'
import { dirname, extname, isAbsolute, join, relative, resolve } from 'node:path'
import { Rng } from '../rng'
import { permutation } from './batches'
import type { LabeledImages } from './idx'
import { checkPositiveInteger } from '../check'

export type ImageSource =
  | { kind: 'files'; paths: string[] }
  /** [count, height, width, channels] 8-bit pixels. */
  | { kind: 'pixels'; pixels: Uint8Array; height: number; width: number; channels: 1 | 3 }

export interface ImageDataset {
  /** Where it came from, for messages. */
  readonly name: string
  readonly size: number
  readonly source: ImageSource
  /** Label of each image; -1 where unlabelled. */
  readonly labels: Int32Array
  /** Class names indexed by label; empty when unlabelled. */
  readonly classNames: string[]
  /** Files seen but not taken as images (other extensions), for the record. */
  readonly ignoredFiles: number
}

/** File extensions taken as images (case-insensitive). */
export const IMAGE_EXTENSIONS = ['.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif']

function isImageFile(name: string): boolean {
  return IMAGE_EXTENSIONS.includes(extname(name).toLowerCase())
}

/**
 * `test` with its labels numbered as `train`'s classes (a dataset's, or a model's), matched by
 * name: two folder splits each number their own subfolders, so a class missing from one would
 * shift the other's labels. A test class that `train` lacks is an error naming it.
 */
export function withClassesOf(train: Pick<ImageDataset, 'name' | 'classNames'>, test: ImageDataset): ImageDataset {
  const same = (a: string[], b: string[]) => a.length === b.length && a.every((name, i) => name === b[i])
  if (same(train.classNames, test.classNames)) return test
  const index = new Map(train.classNames.map((name, i) => [name, i]))
  const unknown = test.classNames.filter((name) => !index.has(name))
  if (unknown.length > 0) {
    const listed = unknown.slice(0, 10).join(', ') + (unknown.length > 10 ? ', ...' : '')
    throw new Error(`${test.name} has classes that ${train.name} lacks (${unknown.length}): ${listed}`)
  }
  const renumber = test.classNames.map((name) => index.get(name)!)
  const labels = test.labels.map((l) => (l < 0 ? l : renumber[l]))
  return { ...test, labels, classNames: train.classNames }
}

export function describeImage(dataset: ImageDataset, index: number): string {
  return dataset.source.kind === 'files' ? dataset.source.paths[index] : `${dataset.name}[${index}]`
}

export async function requireFolder(dir: string): Promise<void> {
  let info
  try {
    info = await stat(dir)
  } catch {
    throw new Error(`data folder not found: ${dir}`)
  }
  if (!info.isDirectory()) throw new Error(`not a folder: ${dir}`)
}

/** Every file under `dir`, recursively, sorted; symlinked folders are not followed. */
async function walk(dir: string): Promise<string[]> {
  const out: string[] = []
  const entries = await readdir(dir, { withFileTypes: true })
  entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))
  for (const entry of entries) {
    const path = join(dir, entry.name)
    if (entry.isDirectory()) out.push(...(await walk(path)))
    else if (entry.isFile() || entry.isSymbolicLink()) out.push(path)
  }
  return out
}

export interface ImageFolderOptions {
  /**
   * 'folders': each subfolder of `dir` is a class (ImageNet layout; images may be nested deeper).
   * 'none': unlabelled. 'auto' (default): 'folders' when `dir` holds subfolders and no images
   * of its own.
   */
  labels?: 'auto' | 'folders' | 'none'
}

/** All images under `dir`, recursively. */
export async function imageFolder(dir: string, opts: ImageFolderOptions = {}): Promise<ImageDataset> {
  await requireFolder(dir)
  const files = await walk(dir)
  const images = files.filter(isImageFile)
  if (images.length === 0) {
    throw new Error(`no images found in ${dir} (looked for ${IMAGE_EXTENSIONS.join(', ')} in it and its subfolders)`)
  }
  const topLevel = (path: string) => relative(dir, path).split(/[\\/]/)
  const mode = opts.labels ?? 'auto'
  const byFolder = mode === 'folders' || (mode === 'auto' && images.every((p) => topLevel(p).length > 1))
  let classNames: string[] = []
  const labels = new Int32Array(images.length).fill(-1)
  if (byFolder) {
    const loose = images.find((p) => topLevel(p).length === 1)
    if (loose)
      throw new Error(`labels 'folders' needs every image inside a class subfolder of ${dir}, but ${loose} is not`)
    classNames = [...new Set(images.map((p) => topLevel(p)[0]))].sort()
    const index = new Map(classNames.map((name, i) => [name, i]))
    images.forEach((p, i) => (labels[i] = index.get(topLevel(p)[0])!))
  }
  return {
    name: dir,
    size: images.length,
    source: { kind: 'files', paths: images },
    labels,
    classNames,
    ignoredFiles: files.length - images.length,
  }
}

export interface ManifestOptions {
  /** Folder that relative paths are resolved against. Default: the manifest's folder. */
  root?: string
  /**
   * Class names by label. Given, every label must be one of them (or its index); otherwise
   * the classes are the distinct labels, sorted (numeric labels are taken as indices).
   */
  classes?: string[]
}

/**
 * A CSV (header row with `path` and optionally `label`) or JSONL (`{"path": ..., "label": ...}`
 * per line) list of images.
 */
export async function manifest(path: string, opts: ManifestOptions = {}): Promise<ImageDataset> {
  const text = await readManifest(path)
  const root = opts.root ?? dirname(path)
  const rows = extname(path).toLowerCase() === '.jsonl' ? parseJsonl(text, path) : parseCsv(text, path)
  if (rows.length === 0) throw new Error(`manifest ${path} lists no images`)
  const paths = rows.map((r) => (isAbsolute(r.path) ? r.path : resolve(root, r.path)))
  const labelled = rows.filter((r) => r.label !== undefined).length
  if (labelled !== 0 && labelled !== rows.length) {
    const line = rows.find((r) => r.label === undefined)!.line
    throw new Error(`${path}:${line}: missing label (some rows have labels, so every row needs one)`)
  }
  const labels = new Int32Array(rows.length).fill(-1)
  let classNames: string[] = []
  if (labelled) {
    classNames = opts.classes ?? classesOf(rows.map((r) => r.label!))
    const index = new Map(classNames.map((name, i) => [name, i]))
    rows.forEach((r, i) => {
      const label = r.label!
      const id =
        index.get(label) ??
        (opts.classes && /^\d+$/.test(label) && Number(label) < classNames.length ? Number(label) : undefined)
      if (id === undefined) {
        throw new Error(
          `${path}:${r.line}: unknown class ${JSON.stringify(label)}; expected one of ${classNames.slice(0, 20).join(', ')}${classNames.length > 20 ? ', ...' : ''}`,
        )
      }
      labels[i] = id
    })
  }
  return { name: path, size: rows.length, source: { kind: 'files', paths }, labels, classNames, ignoredFiles: 0 }
}

/** A manifest's text, or an error naming it. */
export async function readManifest(path: string): Promise<string> {
  try {
    return await readFile(path, 'utf8')
  } catch (e) {
    throw new Error(`cannot read manifest ${path}: ${(e as Error).message}`, { cause: e })
  }
}

/**
 * The class names of a manifest's labels, sorted: labels that are exactly 0..K-1 keep their own
 * indices; other numbers sort by value (1..10 become classes 0..9 named "1".."10"), names
 * alphabetically.
 */
function classesOf(labels: string[]): string[] {
  const distinct = [...new Set(labels)]
  const numbers = distinct.every((l) => /^\d+$/.test(l))
  if (numbers && distinct.every((l) => String(Number(l)) === l && Number(l) < distinct.length)) {
    return Array.from({ length: distinct.length }, (_, i) => String(i))
  }
  return numbers ? distinct.sort((a, b) => Number(a) - Number(b) || a.localeCompare(b)) : distinct.sort()
}

interface ManifestRow {
  path: string
  label?: string
  line: number
}

function parseJsonl(text: string, file: string): ManifestRow[] {
  const rows: ManifestRow[] = []
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim()
    if (!line) return
    let value: unknown
    try {
      value = JSON.parse(line)
    } catch (e) {
      throw new Error(`${file}:${i + 1}: invalid JSON: ${(e as Error).message}`, { cause: e })
    }
    const { path, label } = (value ?? {}) as { path?: unknown; label?: unknown }
    if (typeof path !== 'string' || !path)
      throw new Error(`${file}:${i + 1}: expected {"path": string, "label"?: string | number}`)
    if (label !== undefined && typeof label !== 'string' && typeof label !== 'number') {
      throw new Error(`${file}:${i + 1}: label must be a string or a number, got ${JSON.stringify(label)}`)
    }
    rows.push({ path, label: label === undefined ? undefined : String(label), line: i + 1 })
  })
  return rows
}

/** CSV with a header; fields may be double-quoted (with "" for a quote). */
function parseCsv(text: string, file: string): ManifestRow[] {
  const [head, ...records] = csvRecords(text, file)
  const header = (head?.fields ?? []).map((h) => h.trim().toLowerCase())
  const pathCol = header.indexOf('path')
  const labelCol = header.indexOf('label')
  if (pathCol < 0)
    throw new Error(
      `${file}:1: the CSV header needs a "path" column (and optionally "label"), got ${JSON.stringify(text.split(/\r?\n/)[0])}`,
    )
  return records.map(({ fields, line }) => {
    const path = fields[pathCol]?.trim()
    if (!path) throw new Error(`${file}:${line}: empty path`)
    const label = labelCol >= 0 ? fields[labelCol]?.trim() : undefined
    return { path, label: label === '' ? undefined : label, line }
  })
}

/**
 * The records of a CSV text, each with the line it starts on (RFC 4180: a field may be
 * double-quoted, with "" for a quote, and a quoted field may hold commas and line breaks);
 * blank lines are skipped, and a quote left open is an error naming its line.
 */
export function csvRecords(text: string, file: string): { fields: string[]; line: number }[] {
  const records: { fields: string[]; line: number }[] = []
  let fields: string[] = []
  let field = ''
  let quoted = false
  let blank = true
  let line = 1
  let start = 1
  let openedAt = 1
  const endRecord = () => {
    fields.push(field)
    if (!blank) records.push({ fields, line: start })
    fields = []
    field = ''
    blank = true
  }
  for (let i = 0; i < text.length; i++) {
    const ch = text[i]
    if (quoted) {
      if (ch === '"' && text[i + 1] === '"') {
        field += '"'
        i++
      } else if (ch === '"') quoted = false
      else {
        if (ch === '\n') line++
        field += ch
      }
    } else if (ch === '"') {
      quoted = true
      blank = false
      openedAt = line
    } else if (ch === ',') {
      fields.push(field)
      field = ''
      blank = false
    } else if (ch === '\n' || ch === '\r') {
      if (ch === '\r' && text[i + 1] === '\n') i++
      endRecord()
      line++
      start = line
    } else {
      field += ch
      if (ch.trim()) blank = false
    }
  }
  if (quoted) throw new Error(`${file}:${openedAt}: unterminated quote`)
  endRecord()
  return records
}

/** An in-memory labelled image set (e.g. IDX files) as a dataset. */
export function pixelDataset(images: LabeledImages, name: string): ImageDataset {
  if (images.count === 0) throw new Error(`${name} holds no images`)
  return {
    name,
    size: images.count,
    source: {
      kind: 'pixels',
      pixels: images.images,
      height: images.height,
      width: images.width,
      channels: images.channels,
    },
    labels: Int32Array.from(images.labels),
    classNames: images.classNames,
    ignoredFiles: 0,
  }
}

/** The images of `dataset` at `indices` (in that order), as a dataset of their own. */
export function subset(dataset: ImageDataset, indices: ArrayLike<number>, name: string): ImageDataset {
  const picked = Array.from(indices)
  for (const i of picked) {
    if (!Number.isInteger(i) || i < 0 || i >= dataset.size)
      throw new Error(`subset of ${dataset.name}: index ${i} is outside [0, ${dataset.size})`)
  }
  const source = dataset.source
  let sub: ImageSource
  if (source.kind === 'files') sub = { kind: 'files', paths: picked.map((i) => source.paths[i]) }
  else {
    const per = source.height * source.width * source.channels
    const pixels = new Uint8Array(picked.length * per)
    picked.forEach((i, k) => pixels.set(source.pixels.subarray(i * per, (i + 1) * per), k * per))
    sub = { ...source, pixels }
  }
  return {
    name,
    size: picked.length,
    source: sub,
    labels: Int32Array.from(picked, (i) => dataset.labels[i]),
    classNames: dataset.classNames,
    ignoredFiles: 0,
  }
}

/**
 * A class-balanced labelled subset: `perClass` images of every class, drawn by a seeded
 * shuffle (the few labels of a semi-supervised setting). Every class must have that many.
 */
export function labelledSubset(dataset: ImageDataset, perClass: number, seed: number): ImageDataset {
  if (dataset.classNames.length === 0) throw new Error(`${dataset.name} has no labels to draw a labelled subset from`)
  checkPositiveInteger('perClass', perClass)
  const order = permutation(dataset.size, new Rng(seed))
  const taken = Array.from({ length: dataset.classNames.length }, () => 0)
  const picked: number[] = []
  for (const i of order) {
    const label = dataset.labels[i]
    if (label >= 0 && taken[label] < perClass) {
      taken[label]++
      picked.push(i)
    }
  }
  const short = taken.findIndex((t) => t < perClass)
  if (short >= 0)
    throw new Error(
      `${dataset.name} has only ${taken[short]} images of class ${dataset.classNames[short]}, fewer than ${perClass}`,
    )
  picked.sort((a, b) => a - b)
  return subset(dataset, picked, `${dataset.name} (${picked.length} labelled: ${perClass} per class)`)
}
