/**
 * Moving checkpoints between beit and Hugging Face transformers: a transformers BEiT folder
 * (`config.json` + `model.safetensors`) becomes a beit checkpoint and back. The tensor work
 * is native (`Beit.fromHuggingFace`, `Classifier.fromHuggingFace`, `Segmenter.fromHuggingFace`,
 * `exportHuggingFace`); this module decides which model a file or folder holds.
 */
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'

import { Classifier } from './classifier'
import { AdamWOptions } from './config'
import { Beit, ImageSize } from './model'
import { native } from './native'
import { Segmenter } from './segmenter'

export type HuggingFaceTask = 'mim' | 'classifier' | 'segmenter'

/** The `format` entry of a safetensors file's metadata (beit-mim/1, beit-cls/1, beit-dvae/1). */
export async function checkpointFormat(path: string): Promise<string | undefined> {
  return (await native.checkpointMetadata(path)).format
}

/**
 * Which beit model a transformers folder becomes: `mim` for `BeitForMaskedImageModeling`,
 * `segmenter` for `BeitForSemanticSegmentation`, `classifier` for everything else
 * (`BeitForImageClassification`, `BeitModel`).
 */
export async function huggingFaceTask(dir: string): Promise<HuggingFaceTask> {
  const path = join(dir, 'config.json')
  const config = JSON.parse(await readFile(path, 'utf8')) as { architectures?: string[] }
  const architectures = config.architectures ?? []
  if (architectures.includes('BeitForMaskedImageModeling')) return 'mim'
  if (architectures.includes('BeitForSemanticSegmentation')) return 'segmenter'
  return 'classifier'
}

export interface ImportOptions {
  /** Default: from the folder's `architectures`. */
  task?: HuggingFaceTask
  imageSize?: ImageSize
  /** Classes of the (new) head, for a classifier (a segmenter keeps the folder's head). */
  numLabels?: number
  optimizer?: AdamWOptions
  seed?: number
}

/** Imports a transformers folder and saves it as a beit checkpoint at `out`. */
export async function importHuggingFace(
  dir: string,
  out: string,
  opts: ImportOptions = {},
): Promise<Beit | Classifier | Segmenter> {
  const task = opts.task ?? (await huggingFaceTask(dir))
  if (task !== 'classifier' && opts.numLabels !== undefined)
    throw new Error(
      `numLabels ${opts.numLabels} is for a classifier, but ${dir} is imported as a ${task === 'mim' ? 'BeitForMaskedImageModeling' : 'BeitForSemanticSegmentation'} (ask for the classifier task, --task classifier on the command line, to put a new head on its backbone)`,
    )
  const { imageSize, optimizer } = opts
  const model =
    task === 'mim'
      ? await Beit.fromHuggingFace(dir, { imageSize, optimizer })
      : task === 'segmenter'
        ? await Segmenter.fromHuggingFace(dir, { imageSize, optimizer })
        : await Classifier.fromHuggingFace(dir, { imageSize, numLabels: opts.numLabels, optimizer, seed: opts.seed })
  await model.save(out)
  return model
}

/** Writes a beit MIM, classifier or segmenter checkpoint as a transformers folder. */
export async function exportHuggingFace(checkpoint: string, dir: string): Promise<Beit | Classifier | Segmenter> {
  const format = await checkpointFormat(checkpoint)
  let model: Beit | Classifier | Segmenter
  if (format === 'beit-mim/1') model = await Beit.load(checkpoint)
  else if (format === 'beit-cls/1') model = await Classifier.load(checkpoint)
  else if (format === 'beit-seg/1') model = await Segmenter.load(checkpoint)
  else
    throw new Error(
      `${checkpoint}: format ${JSON.stringify(format)} cannot be exported; expected a MIM (beit-mim/1), classifier (beit-cls/1) or segmenter (beit-seg/1) checkpoint`,
    )
  await model.exportHuggingFace(dir)
  return model
}
