/** `beit demo`: the embedded default on the bundled Fashion-MNIST sample. */
import { join } from 'node:path'

import { Command } from '../cli-options'
import { openDataset } from '../data/open'
import { EpochResult } from '../finetune'
import { BlockwiseMaskGenerator } from '../masking'
import { Beit } from '../model'
import { pretrain } from '../pretrain'
import { formatSeconds } from '../run'
import { Dvae } from '../tokenizer'
import { interruptible, pct, placement, table } from './common'
import { runFinetune } from './finetune'
import { pretrainProgress } from './pretrain'
import { runProbe } from './probe'
import { printTokenizerEvaluation, runTokenizer } from './tokenizer'

export const demoCommand: Command = {
  name: 'demo',
  summary: 'The embedded default on the bundled Fashion-MNIST sample: tokenizer -> pretrain -> linear probes (pretrained vs random) -> fine-tuning (pretrained vs from scratch), then a results table.',
  flags: {
    'tokenizer-steps': { kind: 'int', help: 'tokenizer training steps (batch 32)', default: 200 },
    'pretrain-epochs': { kind: 'number', help: 'pretraining epochs over the 5,000 sample images', default: 2 },
    'finetune-epochs': { kind: 'number', help: 'fine-tuning epochs, for each of the two classifiers', default: 2 },
    seed: { kind: 'int', help: 'seed', default: 0, min: 0 },
    out: { kind: 'string', help: 'run folder', default: join('runs', 'demo') },
  },
  run: async (v) => {
    const out = v.out as string
    const seed = v.seed as number
    const quiet = v.quiet as boolean
    const started = performance.now()
    const times: Record<string, number> = {}
    const timed = async <T>(name: string, f: () => Promise<T>): Promise<T> => {
      const t = performance.now()
      const r = await f()
      times[name] = (performance.now() - t) / 1000
      return r
    }
    const train = await openDataset('sample', 'train')
    const test = await openDataset('sample', 'test')

    console.log(`1/4 tokenizer: dVAE tiny on ${train.size} images, ${v['tokenizer-steps']} steps x 32`)
    const tokenizer = Dvae.create({ preset: 'tiny', numChannels: 1 }, { seed, emaDecay: 0, ...placement(v) })
    const tokOut = join(out, 'tokenizer')
    const evaluation = await timed('tokenizer', () => runTokenizer({ ...v, steps: v['tokenizer-steps'], lr: 2e-3, 'batch-size': 32, 'kl-weight': 6.6, out: tokOut }, tokenizer, train, test))

    const model = Beit.create({ preset: 'mini', imageSize: [28, 28], patchSize: 4, numChannels: 1, numHiddenLayers: 4, vocabSize: tokenizer.config.vocabSize, dropPathRate: 0.05 }, { seed, ...placement(v) })
    console.log(`2/4 pretraining: BEiT mini, 4 layers (${model.numParameters.toLocaleString()} parameters, 7x7 patches), ${v['pretrain-epochs']} epochs x ${train.size} images, blockwise masks of 20/49`)
    const masking = new BlockwiseMaskGenerator({ height: 7, width: 7, numMaskingPatches: 20, minNumPatches: 4, seed })
    const pretrainOut = join(out, 'pretrain')
    let firstAcc = NaN
    let lastAcc = NaN
    let total = 0
    const show = pretrainProgress(quiet, () => total, 0)
    await timed('pretrain', () =>
      interruptible((signal) =>
        pretrain({
          model, tokenizer, data: train, masking, batchSize: 64, epochs: v['pretrain-epochs'] as number,
          schedule: { lr: 1.5e-3 }, transform: { kind: 'train', scale: [0.35, 1] }, seed, outDir: pretrainOut, signal,
          onProgress: (p) => {
            total = p.totalSteps
            if (p.step === 0) firstAcc = p.mlmAcc
            lastAcc = p.mlmAcc
            show(p)
          },
        }),
      ),
    )
    if (process.exitCode === 130) return

    console.log('3/4 linear probes: pretrained vs randomly initialised backbone (layer 3 of 4)')
    const probeFlags = { ...v, layer: 3, epochs: 10, 'batch-size': 256, lr: 1e-2 }
    const pretrainedProbe = await timed('probe pretrained', () => runProbe(probeFlags, model, train, test))
    const randomProbe = await timed('probe random', () => runProbe(probeFlags, Beit.create(model.config, { seed: seed + 1, ...placement(v) }), train, test))

    console.log(`4/4 fine-tuning ${v['finetune-epochs']} epochs each: from the pretrained backbone vs from scratch`)
    const ft = { ...v, epochs: v['finetune-epochs'], 'batch-size': 64, lr: 1e-3, 'weight-decay': 0.05, 'label-smoothing': 0.1, 'layer-decay': 0.75, pooling: 'mean', 'drop-path': 0.05, 'scale-min': 0.35, 'checkpoint-every': 1000, resume: false }
    const pretrainedCkpt = join(pretrainOut, 'checkpoint.safetensors')
    const fromPretrained = await timed('finetune pretrained', () => runFinetune({ ...ft, init: pretrainedCkpt }, train, test, join(out, 'finetune-pretrained')))
    const scratchSpec = { ...ft, preset: 'mini', 'image-size': 28, 'patch-size': 4, channels: 1, layers: 4 }
    const fromScratch = await timed('finetune scratch', () => runFinetune(scratchSpec, train, test, join(out, 'finetune-scratch')))
    const finalAcc = (r: { evals: EpochResult[] }) => r.evals[r.evals.length - 1]?.evalAccuracy ?? NaN

    console.log('')
    printTokenizerEvaluation(evaluation, tokenizer)
    console.log('')
    table(['BEiT on the Fashion-MNIST sample (1,000 test images)', 'pretrained', 'random init / from scratch'], [
      ['MIM accuracy, first -> last step', `${firstAcc.toFixed(3)} -> ${lastAcc.toFixed(3)}`, ''],
      [`linear probe test accuracy (layer ${pretrainedProbe.layer})`, pct(pretrainedProbe.testAccuracy), pct(randomProbe.testAccuracy)],
      [`fine-tuned test accuracy (${v['finetune-epochs']} epochs)`, pct(finalAcc(fromPretrained)), pct(finalAcc(fromScratch))],
      ['wall time: pretrain / probe / fine-tune', `${formatSeconds(times.pretrain)} / ${formatSeconds(times['probe pretrained'])} / ${formatSeconds(times['finetune pretrained'])}`, `- / ${formatSeconds(times['probe random'])} / ${formatSeconds(times['finetune scratch'])}`],
    ])
    console.log(`\ntotal ${formatSeconds((performance.now() - started) / 1000)}; run folder ${out}: tokenizer/, pretrain/, finetune-pretrained/, finetune-scratch/ (metrics.jsonl, curves.svg, checkpoints)`)
  },
}
