/** `beit import` and `beit export`: Hugging Face transformers folders in and out. */
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'

import { defineCommand, UsageError } from '../cli-options'
import { exportHuggingFace, importHuggingFace } from '../huggingface'
import { Classifier } from '../classifier'
import { Beit } from '../model'
import { log } from './common'

export const importCommand = defineCommand({
  name: 'import',
  summary: 'A Hugging Face transformers BEiT folder (config.json + model.safetensors) -> a beit checkpoint.',
  flags: {
    from: {
      kind: 'string',
      help: 'transformers folder (BeitForMaskedImageModeling, BeitForImageClassification, BeitForSemanticSegmentation or BeitModel)',
    },
    task: {
      kind: 'string',
      help: 'what it becomes: mim, classifier or segmenter (default: from its architectures)',
      choices: ['mim', 'classifier', 'segmenter'],
    },
    'image-size': { kind: 'int', help: 'new input size in pixels: position tables are resized to its grid' },
    'num-labels': {
      kind: 'int',
      help: 'classes of the head (a new head when the checkpoint has none or another number)',
      min: 2,
    },
    seed: { kind: 'int', help: 'seed of a new head', default: 0, min: 0 },
    out: { kind: 'string', help: 'beit checkpoint to write', default: join('runs', 'imported.safetensors') },
  },
  run: async (v) => {
    if (v.from === undefined) throw new UsageError('--from is required')
    await mkdir(join(v.out, '..'), { recursive: true })
    const model = await importHuggingFace(v.from, v.out, {
      task: v.task,
      imageSize: v['image-size'],
      numLabels: v['num-labels'],
      seed: v.seed,
    })
    const what =
      model instanceof Beit
        ? 'MIM model'
        : `${model instanceof Classifier ? 'classifier' : 'segmenter'} of ${model.config.numLabels} classes`
    log(v, `${v.from} -> ${v.out}: ${what}, ${model.numParameters.toLocaleString()} parameters`)
  },
})

export const exportCommand = defineCommand({
  name: 'export',
  summary:
    'A beit MIM, classifier or segmenter checkpoint -> a Hugging Face transformers folder (from_pretrained loads it).',
  flags: {
    from: { kind: 'string', help: 'beit checkpoint (pretrain or finetune output)' },
    out: {
      kind: 'string',
      help: 'folder to write config.json and model.safetensors into',
      default: join('runs', 'hf'),
    },
  },
  run: async (v) => {
    if (v.from === undefined) throw new UsageError('--from is required')
    const model = await exportHuggingFace(v.from, v.out)
    const architecture =
      model instanceof Beit
        ? 'BeitForMaskedImageModeling'
        : model instanceof Classifier
          ? 'BeitForImageClassification'
          : 'BeitForSemanticSegmentation'
    log(v, `${v.from} -> ${v.out}: ${architecture}`)
  },
})
