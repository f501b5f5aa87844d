/**
 * `beit demo`: the embedded default on the bundled Fashion-MNIST sample, set up the way
 * self-supervised pretraining pays off: the tokenizer and the BEiT pretrain on all 5,000
 * training images without their labels; then only 500 of them (50 per class) keep a label,
 * and the pretrained backbone is compared with a random one (linear probes), with raw pixels
 * (a linear classifier) and with training from scratch (fine-tuning, equal budgets), all
 * scored on the 1,000 test images.
 */
import { join } from 'node:path'

import { CommonValues, defineCommand } from '../cli-options'
import { labelledSubset } from '../data/dataset'
import { openDataset } from '../data/open'
import { bf16GemmSpeedup, resolveDevice } from '../device'
import { INTERRUPTED_EXIT_CODE } from '../distributed'
import { EpochResult } from '../finetune'
import { BlockwiseMaskGenerator } from '../masking'
import { Beit } from '../model'
import { pixelProbe } from '../probe'
import { pretrain } from '../pretrain'
import { formatSeconds } from '../run'
import { Dvae } from '../tokenizer'
import { interruptible, pct, placement, table } from './common'
import { FinetuneValues, runFinetune } from './finetune'
import { pretrainProgress } from './pretrain'
import { runProbe } from './probe'
import { printTokenizerEvaluation, runTokenizer } from './tokenizer'

/**
 * The demo is meant to take minutes, so on a CPU its 'auto' precision is the faster one there:
 * bf16 where the CPU runs the engine's bf16 GEMMs at least 1.3x as fast as f32 (AMD Zen 4/5),
 * else f32 (elsewhere 'auto' is f32 on the CPU). A precision given by name is kept.
 */
function demoPrecision(v: Pick<CommonValues, 'device' | 'precision'>): CommonValues['precision'] {
  if (v.precision !== 'auto' || resolveDevice(placement(v).device) !== 'cpu') return v.precision
  return bf16GemmSpeedup() >= 1.3 ? 'bf16' : 'auto'
}

/** The mean of the last (or first) `n` values. */
function meanOf(values: number[], n: number, last: boolean): number {
  const part = last ? values.slice(-n) : values.slice(0, n)
  return part.reduce((a, b) => a + b, 0) / part.length
}

export const demoCommand = defineCommand({
  name: 'demo',
  summary:
    'The embedded default on the bundled Fashion-MNIST sample: tokenizer and BEiT pretraining on 5,000 unlabelled images, then linear probes (pretrained vs random vs raw pixels) and fine-tuning (pretrained vs from scratch) on 500 labelled ones, then a results table.',
  flags: {
    'tokenizer-steps': { kind: 'int', help: 'tokenizer training steps (batch 32)', default: 200 },
    'pretrain-epochs': { kind: 'number', help: 'pretraining epochs over the 5,000 sample images', default: 20 },
    'labelled-per-class': {
      kind: 'int',
      help: 'labelled training images per class for probing and fine-tuning',
      default: 50,
      min: 1,
    },
    'finetune-epochs': {
      kind: 'number',
      help: 'fine-tuning epochs over the labelled images, for each of the two classifiers',
      default: 60,
    },
    seed: { kind: 'int', help: 'seed', default: 0, min: 0 },
    out: { kind: 'string', help: 'run folder', default: join('runs', 'demo') },
  },
  run: async (flags) => {
    const v = { ...flags, precision: demoPrecision(flags) }
    const out = v.out
    const seed = v.seed
    const quiet = v.quiet
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
    if (v.precision !== flags.precision)
      console.log(
        `precision: bf16 (this CPU runs bf16 GEMMs ${bf16GemmSpeedup().toFixed(1)}x as fast as f32; --precision f32 to keep f32)`,
      )

    console.log(
      `1/5 tokenizer: dVAE tiny on the ${train.size.toLocaleString()} training images (labels unused), ${v['tokenizer-steps']} steps x 32`,
    )
    const tokenizer = Dvae.create({ preset: 'tiny', numChannels: 1 }, { seed, emaDecay: 0, ...placement(v) })
    const evaluation = await timed('tokenizer', () =>
      runTokenizer(
        {
          ...v,
          steps: v['tokenizer-steps'],
          lr: 2e-3,
          'batch-size': 32,
          'warmup-steps': 0,
          'kl-weight': 6.6,
          'checkpoint-every': 500,
          out: join(out, 'tokenizer'),
        },
        tokenizer,
        train,
        test,
      ),
    )
    if (evaluation === undefined) return

    const model = Beit.create(
      {
        preset: 'mini',
        imageSize: [28, 28],
        patchSize: 4,
        numChannels: 1,
        numHiddenLayers: 4,
        vocabSize: tokenizer.config.vocabSize,
        dropPathRate: 0.05,
      },
      { seed, ...placement(v) },
    )
    console.log(
      `2/5 pretraining: BEiT mini, 4 layers (${model.numParameters.toLocaleString()} parameters, 7x7 patches), ${v['pretrain-epochs']} epochs x ${train.size.toLocaleString()} images without labels, blockwise masks of 20/49`,
    )
    const masking = new BlockwiseMaskGenerator({ height: 7, width: 7, numMaskingPatches: 20, minNumPatches: 4, seed })
    const pretrainOut = join(out, 'pretrain')
    const accuracy: number[] = []
    const baseline: number[] = []
    let total = 0
    const show = pretrainProgress(quiet, () => total, 0)
    await timed('pretrain', () =>
      interruptible((signal) =>
        pretrain({
          model,
          tokenizer,
          data: train,
          masking,
          batchSize: 64,
          epochs: v['pretrain-epochs'],
          schedule: { lr: 1.5e-3 },
          transform: { kind: 'train', scale: [0.35, 1] },
          seed,
          outDir: pretrainOut,
          signal,
          onProgress: (p) => {
            total = p.totalSteps
            accuracy.push(p.mlmAcc)
            baseline.push(p.majorityBaseline)
            show(p)
          },
        }),
      ),
    )
    if (process.exitCode === INTERRUPTED_EXIT_CODE) return

    const perClass = v['labelled-per-class']
    const labelled = labelledSubset(train, perClass, seed)
    console.log(
      `3/5 labels: ${labelled.size} of the training images keep theirs (${perClass} per class, drawn with the seed); the ${test.size.toLocaleString()} test images score everything`,
    )
    console.log(
      '4/5 linear classifiers on the labelled images: features of the pretrained backbone and of a random one (layer 3 of 4), and raw pixels',
    )
    const probeFlags = { ...v, layer: 3, epochs: 50, 'batch-size': 256, lr: 1e-2 }
    const pretrainedProbe = await timed('probe pretrained', () => runProbe(probeFlags, model, labelled, test))
    const randomProbe = await timed('probe random', () =>
      runProbe(probeFlags, Beit.create(model.config, { seed: seed + 1, ...placement(v) }), labelled, test),
    )
    const pixels = await timed('probe pixels', () =>
      pixelProbe({
        train: labelled,
        test,
        imageSize: [28, 28],
        channels: 1,
        epochs: 50,
        batchSize: 256,
        lr: 1e-2,
        seed,
      }),
    )

    const ftEpochs = v['finetune-epochs']
    console.log(
      `5/5 fine-tuning on the labelled images, ${ftEpochs} epochs each: from the pretrained backbone vs from scratch`,
    )
    const ft = {
      ...v,
      preset: 'mini',
      epochs: ftEpochs,
      'eval-every': Math.max(1, Math.ceil(ftEpochs)),
      // Fewer than 7 labelled images per class are fewer than one batch of 64.
      'batch-size': Math.min(64, labelled.size),
      lr: 1e-3,
      'weight-decay': 0.05,
      decay: 'cosine',
      'label-smoothing': 0.1,
      'layer-decay': 0.75,
      pooling: 'mean',
      'drop-path': 0.05,
      'scale-min': 0.8,
      'checkpoint-every': 1_000_000,
      resume: false,
    } satisfies FinetuneValues
    const fromPretrained = await timed('finetune pretrained', () =>
      runFinetune(
        { ...ft, init: join(pretrainOut, 'checkpoint.safetensors') },
        labelled,
        test,
        join(out, 'finetune-pretrained'),
      ),
    )
    // Interrupted (Ctrl-C): stop here, as after the pretraining; the demo has no --resume.
    if (fromPretrained.status === 'interrupted') return
    const scratchSpec = { ...ft, 'image-size': 28, 'patch-size': 4, channels: 1, layers: 4 }
    const fromScratch = await timed('finetune scratch', () =>
      runFinetune(scratchSpec, labelled, test, join(out, 'finetune-scratch')),
    )
    if (fromScratch.status === 'interrupted') return
    const finalAcc = (r: { evals: EpochResult[] }) => r.evals[r.evals.length - 1]?.evalAccuracy ?? NaN

    console.log('')
    printTokenizerEvaluation(evaluation, tokenizer)
    console.log('')
    const n = Math.min(20, accuracy.length)
    table(
      [
        `BEiT on the Fashion-MNIST sample: ${train.size.toLocaleString()} unlabelled training images, ${labelled.size} labelled, ${test.size.toLocaleString()} test`,
        'pretrained',
        'random init / from scratch',
      ],
      [
        [
          `MIM accuracy on the masked patches, first -> last ${n} steps`,
          `${meanOf(accuracy, n, false).toFixed(3)} -> ${meanOf(accuracy, n, true).toFixed(3)}`,
          '',
        ],
        [
          `MIM baseline: always the batch's most frequent token, last ${n} steps`,
          meanOf(baseline, n, true).toFixed(3),
          '',
        ],
        [
          `linear probe on the ${labelled.size} labelled (layer ${pretrainedProbe.layer}), test accuracy`,
          pct(pretrainedProbe.testAccuracy),
          pct(randomProbe.testAccuracy),
        ],
        [
          `linear classifier on the raw pixels (the same ${labelled.size}), test accuracy`,
          `${pct(pixels.testAccuracy)} (no backbone)`,
          '',
        ],
        [
          `fine-tuned on the ${labelled.size} labelled (${ftEpochs} epochs), test accuracy`,
          pct(finalAcc(fromPretrained)),
          pct(finalAcc(fromScratch)),
        ],
        [
          'wall time: pretrain / probe / fine-tune',
          `${formatSeconds(times.pretrain)} / ${formatSeconds(times['probe pretrained'])} / ${formatSeconds(times['finetune pretrained'])}`,
          `- / ${formatSeconds(times['probe random'])} / ${formatSeconds(times['finetune scratch'])}`,
        ],
      ],
    )
    console.log(
      `\ntotal ${formatSeconds((performance.now() - started) / 1000)}; run folder ${out}: tokenizer/ (with reconstructions.png), pretrain/, finetune-pretrained/, finetune-scratch/ (metrics.jsonl, curves.svg, checkpoints)`,
    )
  },
})
