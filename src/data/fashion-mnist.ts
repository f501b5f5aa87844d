/**
 * Fashion-MNIST loading: the small sample bundled in data/fashion-mnist-sample/ by default,
 * or any folder holding the four standard IDX files (such as the full Debian dataset).
 */
import { access } from 'node:fs/promises'
import { existsSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { readIdx, type IdxArray, type LabeledImages } from './idx'

/** Class names indexed by label. */
export const FASHION_MNIST_CLASSES: string[] = [
  'T-shirt/top',
  'Trouser',
  'Pullover',
  'Dress',
  'Coat',
  'Sandal',
  'Shirt',
  'Sneaker',
  'Bag',
  'Ankle boot',
]

/** Where the Debian package `dataset-fashion-mnist` installs the full dataset. */
export const DEBIAN_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'

const IMAGE_SIZE = 28

/**
 * The bundled sample folder. Found by walking up to the package root (the first folder with a
 * package.json), because this module runs both from src/ (tsx) and from dist/ (compiled).
 */
export function embeddedSampleDir(): string {
  for (let dir = __dirname; ; dir = dirname(dir)) {
    if (existsSync(join(dir, 'package.json'))) return join(dir, 'data', 'fashion-mnist-sample')
    if (dirname(dir) === dir) throw new Error(`no package.json found in ${__dirname} or any parent folder`)
  }
}

/** Path of `<base>.gz` or `<base>` in `dir`, whichever exists (gzip preferred). */
async function findIdxFile(dir: string, base: string): Promise<string> {
  const candidates = [join(dir, `${base}.gz`), join(dir, base)]
  for (const path of candidates) {
    try {
      await access(path)
      return path
    } catch {
      // try the next name
    }
  }
  throw new Error(`Fashion-MNIST file not found: expected ${candidates.join(' or ')}`)
}

function requireUint8(array: IdxArray, path: string, expectedShape: string): Uint8Array {
  if (array.dtype !== 'uint8') throw new Error(`${path}: expected uint8 ${expectedShape}, got ${array.dtype}`)
  return array.data as Uint8Array
}

export async function loadFashionMnist(opts: { split: 'train' | 'test'; dir?: string }): Promise<LabeledImages> {
  const { split, dir = embeddedSampleDir() } = opts
  if (split !== 'train' && split !== 'test') throw new Error(`split must be 'train' or 'test', got ${String(split)}`)
  const prefix = split === 'train' ? 'train' : 't10k'
  // One after the other, so that when both are missing the error always names the images file.
  const imagesPath = await findIdxFile(dir, `${prefix}-images-idx3-ubyte`)
  const labelsPath = await findIdxFile(dir, `${prefix}-labels-idx1-ubyte`)
  const [imageArray, labelArray] = await Promise.all([readIdx(imagesPath), readIdx(labelsPath)])

  const imagesShape = `images [N, ${IMAGE_SIZE}, ${IMAGE_SIZE}]`
  const images = requireUint8(imageArray, imagesPath, imagesShape)
  const [count, height, width] = imageArray.shape
  if (imageArray.shape.length !== 3 || height !== IMAGE_SIZE || width !== IMAGE_SIZE) {
    throw new Error(`${imagesPath}: expected ${imagesShape}, got shape [${imageArray.shape.join(', ')}]`)
  }

  const labels = requireUint8(labelArray, labelsPath, 'labels [N]')
  if (labelArray.shape.length !== 1) {
    throw new Error(`${labelsPath}: expected labels [N], got shape [${labelArray.shape.join(', ')}]`)
  }
  if (labelArray.shape[0] !== count) {
    throw new Error(
      `label/image count mismatch: ${imagesPath} has ${count} images, ${labelsPath} has ${labelArray.shape[0]} labels`,
    )
  }
  const bad = labels.findIndex((label) => label >= FASHION_MNIST_CLASSES.length)
  if (bad >= 0) {
    throw new Error(
      `${labelsPath}: label ${labels[bad]} at index ${bad} is out of range, expected 0..${FASHION_MNIST_CLASSES.length - 1}`,
    )
  }

  return { images, labels, count, height, width, channels: 1, classNames: [...FASHION_MNIST_CLASSES] }
}
