/**
 * Data sources by name, as the CLI and the demo take them:
 *   sample         the Fashion-MNIST subset bundled in the package (5,000 train / 1,000 test)
 *   fashion-mnist  the full Fashion-MNIST installed by Debian's `dataset-fashion-mnist`
 *   DIR            a folder of IDX files, or of images (DIR/<split>/ when it exists)
 *   FILE.csv|.jsonl  a manifest
 */
import { existsSync, statSync } from 'node:fs'
import { extname, join } from 'node:path'
import { imageFolder, ImageDataset, manifest, pixelDataset } from './dataset'
import { DEBIAN_FASHION_MNIST_DIR, embeddedSampleDir, loadFashionMnist } from './fashion-mnist'

export type Split = 'train' | 'test'

/** Folder names tried for each split inside an image folder (ImageNet uses train/ and val/). */
const SPLIT_FOLDERS: Record<Split, string[]> = { train: ['train'], test: ['test', 'val'] }

function hasIdx(dir: string, split: Split): boolean {
  const prefix = split === 'train' ? 'train' : 't10k'
  return [`${prefix}-images-idx3-ubyte`, `${prefix}-images-idx3-ubyte.gz`].some((f) => existsSync(join(dir, f)))
}

/** The folder of IDX files that `sample` or `fashion-mnist` names; undefined for other specs. */
function namedIdxDir(spec: string): string | undefined {
  if (spec === 'sample') return embeddedSampleDir()
  if (spec !== 'fashion-mnist') return undefined
  if (!existsSync(DEBIAN_FASHION_MNIST_DIR)) {
    throw new Error(
      `the full Fashion-MNIST is not installed: expected it in ${DEBIAN_FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist), or use --data sample`,
    )
  }
  return DEBIAN_FASHION_MNIST_DIR
}

/**
 * Whether `spec` has a test split of its own: the named IDX sets, an IDX folder with t10k
 * files, or a folder with a test/ or val/ folder (a manifest or a folder of class folders is one
 * split, whichever is asked for).
 */
export function hasTestSplit(spec: string): boolean {
  if (spec === 'sample' || spec === 'fashion-mnist') return true
  if (!existsSync(spec) || !statSync(spec).isDirectory()) return false
  return hasIdx(spec, 'test') || SPLIT_FOLDERS.test.some((name) => existsSync(join(spec, name)))
}

export async function openDataset(spec: string, split: Split): Promise<ImageDataset> {
  const named = namedIdxDir(spec)
  if (named)
    return pixelDataset(
      await loadFashionMnist({ split, dir: named }),
      `${spec === 'sample' ? 'fashion-mnist sample' : spec} (${split})`,
    )
  if (!existsSync(spec))
    throw new Error(`data not found: ${spec} (expected sample, fashion-mnist, a folder or a .csv/.jsonl manifest)`)
  if (statSync(spec).isFile()) {
    const ext = extname(spec).toLowerCase()
    if (ext !== '.csv' && ext !== '.jsonl') throw new Error(`data file ${spec}: expected a .csv or .jsonl manifest`)
    return manifest(spec)
  }
  if (hasIdx(spec, split)) return pixelDataset(await loadFashionMnist({ split, dir: spec }), `${spec} (${split})`)
  // A folder of class folders is every split's data; one with split folders has each split in
  // its own (never the whole folder: the training images would score as test images).
  const present = Object.values(SPLIT_FOLDERS)
    .flat()
    .filter((name) => existsSync(join(spec, name)))
  if (present.length === 0) return imageFolder(spec)
  const splitDir = SPLIT_FOLDERS[split].find((name) => present.includes(name))
  if (splitDir === undefined)
    throw new Error(
      `${spec} has split folders (${present.join(', ')}) but none for the ${split} split (expected ${SPLIT_FOLDERS[split].join(' or ')})`,
    )
  return imageFolder(join(spec, splitDir))
}
