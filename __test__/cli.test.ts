import test from 'ava'
import { spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { Beit, Segmenter } from '../src'
import { encodePng } from '../src/png'

const CLI = join(__dirname, '..', 'dist', 'cli.js')
const TINY_MODEL = ['--layers', '1', '--hidden-size', '32', '--heads', '2', '--mlp-size', '64']

interface Outcome {
  code: number | null
  stdout: string
  stderr: string
}

function beit(
  args: string[],
  opts: { onStdout?: (text: string, kill: (signal: NodeJS.Signals) => void) => void } = {},
): Promise<Outcome> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d) => {
      stdout += d
      opts.onStdout?.(stdout, (signal) => child.kill(signal))
    })
    child.stderr.on('data', (d) => (stderr += d))
    child.on('error', reject)
    child.on('close', (code) => resolve({ code, stdout, stderr }))
  })
}

async function tempDir(t: { teardown: (fn: () => Promise<void>) => void }): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'beit-cli-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  return dir
}

test('the whole pipeline end to end on a tiny config: tokenizer, pretrain, finetune, probe, encode, reconstruct', async (t) => {
  const dir = await tempDir(t)
  const tok = await beit(['tokenizer', '--steps', '4', '--batch-size', '8', '--out', join(dir, 'tok'), '--quiet'])
  t.is(tok.code, 0, tok.stderr)
  t.regex(tok.stdout, /reconstruction MSE/)
  const tokenizer = join(dir, 'tok', 'checkpoint.safetensors')

  await writeFile(join(dir, 'pretrain.json'), JSON.stringify({ steps: 3, 'batch-size': 16, lr: 1e-3 }))
  const pre = await beit([
    'pretrain',
    '--tokenizer',
    tokenizer,
    '--config',
    join(dir, 'pretrain.json'),
    '--steps',
    '4',
    ...TINY_MODEL,
    '--out',
    join(dir, 'pre'),
  ])
  t.is(pre.code, 0, pre.stderr)
  for (const file of ['checkpoint.safetensors', 'metrics.jsonl', 'curves.svg', 'config.json', 'reconstructions.png'])
    t.true(existsSync(join(dir, 'pre', file)), file)
  // Flags override the config file; the resolved values are saved.
  const config = JSON.parse(await readFile(join(dir, 'pre', 'config.json'), 'utf8'))
  t.like(config, { steps: 4, 'batch-size': 16, lr: 1e-3, tokenizer })
  t.is((await readFile(join(dir, 'pre', 'metrics.jsonl'), 'utf8')).trim().split('\n').length, 4)
  // Not a TTY: plain progress lines, no carriage returns.
  t.notRegex(pre.stderr, /\r/)
  t.regex(pre.stderr, /pretrain 4\/4 {2}loss/)

  const checkpoint = join(dir, 'pre', 'checkpoint.safetensors')
  const ft = await beit([
    'finetune',
    '--init',
    checkpoint,
    '--epochs',
    '0.02',
    '--batch-size',
    '32',
    '--out',
    join(dir, 'ft'),
    '--quiet',
  ])
  t.is(ft.code, 0, ft.stderr)
  t.is(ft.stdout, '')
  const evals = (await readFile(join(dir, 'ft', 'metrics.jsonl'), 'utf8'))
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l))
    .filter((r) => 'evalAccuracy' in r)
  t.is(evals.length, 1)

  const probe = await beit(['probe', '--init', checkpoint, '--epochs', '1', '--out', join(dir, 'probe.json')])
  t.is(probe.code, 0, probe.stderr)
  const result = JSON.parse(await readFile(join(dir, 'probe.json'), 'utf8'))
  t.true(result.testAccuracy > 0 && result.layer === 1)

  const enc = await beit(['encode', '--tokenizer', tokenizer, '--limit', '3', '--out', join(dir, 'tokens.jsonl')])
  t.is(enc.code, 0, enc.stderr)
  const lines = (await readFile(join(dir, 'tokens.jsonl'), 'utf8'))
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l))
  t.is(lines.length, 3)
  t.deepEqual(lines[0].grid, [7, 7])
  t.is(lines[0].ids.length, 49)

  const rec = await beit(['reconstruct', '--tokenizer', tokenizer, '--count', '4', '--out', join(dir, 'sheet.png')])
  t.is(rec.code, 0, rec.stderr)
  t.deepEqual([...(await readFile(join(dir, 'sheet.png'))).subarray(1, 4)], [0x50, 0x4e, 0x47])
})

test('beit segment fine-tunes on Fashion-MNIST scenes from a pretrained checkpoint, scoring mIoU', async (t) => {
  const dir = await tempDir(t)
  const model = { preset: 'mini', imageSize: 28, patchSize: 4, numChannels: 1, hiddenSize: 16 } as const
  await Beit.create({ ...model, numHiddenLayers: 4, numAttentionHeads: 2, intermediateSize: 32 }).save(
    join(dir, 'mim.safetensors'),
  )
  const args = [
    '--train-scenes',
    '32',
    '--test-scenes',
    '8',
    '--steps',
    '3',
    '--batch-size',
    '8',
    '--aux-channels',
    '8',
  ]
  const seg = await beit(['segment', '--init', join(dir, 'mim.safetensors'), ...args, '--out', join(dir, 'seg')])
  t.is(seg.code, 0, seg.stderr)
  t.regex(seg.stdout, /from .*mim.safetensors .* on 32 scenes at 32x64, 11 classes/)
  t.true(existsSync(join(dir, 'seg', 'predictions.png')))
  t.regex(seg.stdout, /done: test mIoU \d+\.\d%, mean accuracy/)
  const records = (await readFile(join(dir, 'seg', 'metrics.jsonl'), 'utf8'))
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l))
  t.is(records.filter((r) => 'loss' in r).length, 3)
  t.is(records.filter((r) => 'evalMeanIou' in r).length, 1)
  t.like(JSON.parse(await readFile(join(dir, 'seg', 'config.json'), 'utf8')), { 'train-scenes': 32, steps: 3 })
  const odd = await beit(['segment', ...args, '--scene-height', '30', '--out', join(dir, 'odd')])
  t.is(odd.code, 1)
  t.regex(odd.stderr, /input size 30x64 must be a multiple of --patch-size 4/)

  // An ADE20K-style folder: RGB images, masks with 0 = other (ignored) and classes 1..3.
  const ade = join(dir, 'ade')
  for (const [split, count] of [
    ['training', 4],
    ['validation', 2],
  ] as const) {
    for (const part of ['images', 'annotations']) await mkdir(join(ade, part, split), { recursive: true })
    for (let i = 0; i < count; i++) {
      const rgb = Uint8Array.from({ length: 20 * 24 * 3 }, (_, k) => (k * (i + 3)) % 256)
      const mask = Uint8Array.from({ length: 20 * 24 }, (_, k) => (k % 24 < 12 ? 1 : 3) - (k < 24 ? 1 : 0))
      await writeFile(join(ade, 'images', split, `${i}.png`), encodePng(rgb, 24, 20, 3))
      await writeFile(join(ade, 'annotations', split, `${i}.png`), encodePng(mask, 24, 20, 1))
    }
  }
  // 8 px patches: the input size is the crop's (no 28 px default to be a multiple of); 5 blocks,
  // whose default features would be [1, 3, 4, 5].
  const small = ['--hidden-size', '16', '--layers', '5', '--heads', '2', '--mlp-size', '32', '--patch-size', '8']
  const folder = await beit([
    'segment',
    '--data',
    ade,
    '--num-labels',
    '3',
    '--crop-size',
    '32',
    '--out-indices',
    '2,3,4,5',
    ...small,
    '--steps',
    '2',
    '--batch-size',
    '2',
    '--aux-channels',
    '4',
    '--out',
    join(dir, 'ade-run'),
  ])
  t.is(folder.code, 0, folder.stderr)
  t.regex(folder.stdout, /from scratch .* on 4 ADE20K-style images at 32x32, 3 classes/)
  t.regex(folder.stdout, /done: test mIoU \d+\.\d%/)
  const trained = await Segmenter.load(join(dir, 'ade-run', 'checkpoint.safetensors'))
  t.deepEqual(trained.config.outIndices, [2, 3, 4, 5])
  const outIndices = await beit(['segment', '--out-indices', '2,3,x', '--out', join(dir, 'bad-indices')])
  t.is(outIndices.code, 1)
  t.regex(outIndices.stderr, /--out-indices: expected four positive integers like 2,3,4,5, got "2,3,x"/)
  const bad = await beit(['segment', '--data', join(dir, 'nowhere'), '--out', join(dir, 'bad')])
  t.is(bad.code, 1)
  t.regex(bad.stderr, /expected sample, fashion-mnist, an ADE20K folder/)
})

test('user errors end with one clear line and exit code 1, no stack trace', async (t) => {
  const dir = await tempDir(t)
  const tok = await beit(['tokenizer', '--steps', '2', '--batch-size', '4', '--out', join(dir, 'tok'), '--quiet'])
  t.is(tok.code, 0, tok.stderr)
  const tokenizer = join(dir, 'tok', 'checkpoint.safetensors')
  const cases: [string[], RegExp][] = [
    [['pretrain', '--data', join(dir, 'nope'), '--tokenizer', tokenizer], /data not found: .*nope/],
    [['pretrain', '--tokenizer', tokenizer, '--batch-size', 'lots'], /--batch-size must be an integer > 0, got "lots"/],
    [['pretrain', '--tokenizer', tokenizer, '--masking', 'sideways'], /--masking must be one of blockwise, random/],
    [
      ['pretrain', '--tokenizer', tokenizer, '--patch-size', '7', '--steps', '1', '--out', join(dir, 'grid')],
      /token grid 7x7 .* does not match the model's patch grid 4x4/,
    ],
    [
      ['finetune', '--init', tokenizer, '--out', join(dir, 'ft')],
      /format "beit-dvae\/1" is not a beit MIM \("beit-mim\/1"\) or classifier \("beit-cls\/1"\) checkpoint/,
    ],
    [
      ['finetune', '--init', tokenizer, '--patch-size', '4', '--out', join(dir, 'ft2')],
      /--init takes the backbone's shape from the checkpoint \(--image-size resizes .*\): --patch-size would be ignored/,
    ],
    [['probe', '--pixels', '--layer', '2'], /--pixels probes the raw pixels, no backbone: --layer would be ignored/],
    [
      ['probe', '--pixels', '--preset', 'base'],
      /--pixels probes the raw pixels, no backbone: --preset would be ignored/,
    ],
    [['probe', '--pixels', '--out', dir], /--out .* is a folder: expected the path of the file to write/],
    [
      ['finetune', '--init', tokenizer, '--preset', 'base', '--out', join(dir, 'ft3')],
      /--init takes the backbone's shape from the checkpoint .*: --preset would be ignored/,
    ],
    [
      ['segment', '--crop-size', '16', '--out', join(dir, 'seg-crop')],
      /--data sample builds Fashion-MNIST scenes, .*: --crop-size would be ignored/,
    ],
    [['tokenizer', '--steps', '1', '--steps', '2'], /--steps given twice: give it once/],
    [
      ['probe', '--init', tokenizer, '--random-like', tokenizer, '--hidden-size', '8'],
      /--init takes the backbone, its shape included, from the checkpoint: --random-like, --hidden-size would be ignored/,
    ],
    [['finetune', '--resume', '--out', join(dir, 'nothing')], /--resume: no checkpoint at/],
    [
      ['pretrain', '--tokenizer', tokenizer, '--precision', 'fp16', '--steps', '1', '--out', join(dir, 'fp16')],
      /--precision must be one of auto, f32, bf16, got "fp16"/,
    ],
    [['tokenizer', '--channels', '2', '--out', join(dir, 'tok2')], /--channels must be 1 or 3, got 2/],
    [['tokenizer', '--data', join(dir, 'nope'), '--out', join(dir, 'tok3')], /data not found: .*nope/],
    [['pretrain', '--bogus'], /Unknown option '--bogus'[\s\S]*run 'beit pretrain --help' for usage/],
    [['fly'], /unknown command "fly"; expected one of demo, .* \(or --help, --version\)\nrun 'beit --help' for usage/],
    [
      ['pretrain', '--tokenizer', tokenizer, '--device', 'gpu', '--out', join(dir, 'gpu')],
      /--device must be auto, cpu, cuda or cuda:N, got "gpu"/,
    ],
    [
      ['tokenizer', '--steps', '3', '--epochs', '1'],
      /--steps and --epochs exclude each other, both given on the command line/,
    ],
    [
      ['finetune', '--config', join(dir, 'both.json')],
      /--steps and --epochs exclude each other, both given on .*both\.json/,
    ],
    [
      ['finetune', '--config', join(dir, 'typo.json')],
      /typo\.json: unknown option "epoch" for beit finetune; expected one of .*epochs/,
    ],
    [['probe', '--config', join(dir, 'wrong.json')], /wrong\.json: "out" must be a string, got 3/],
    [['segment', '--channels', '3', '--out', join(dir, 'seg3')], /Fashion-MNIST scenes are gray: --channels must be 1/],
    [['segment', '--data', dir, '--channels', '2', '--out', join(dir, 'seg2')], /--channels must be 1 or 3, got 2/],
    [
      ['segment', '--init', join(dir, 'rgb.safetensors'), '--out', join(dir, 'seg-rgb')],
      /rgb\.safetensors takes 3-channel images but Fashion-MNIST scenes are gray/,
    ],
    // A test split that is there but unreadable says why, not that there is none.
    [['finetune', '--data', join(dir, 'split'), '--out', join(dir, 'ft4')], /no images found in .*split\/test/],
  ]
  const rgb = Beit.create({
    preset: 'mini',
    imageSize: [32, 32],
    patchSize: 4,
    numChannels: 3,
    vocabSize: 16,
    hiddenSize: 32,
    numHiddenLayers: 2,
    numAttentionHeads: 2,
    intermediateSize: 64,
  })
  await rgb.save(join(dir, 'rgb.safetensors'))
  await mkdir(join(dir, 'split', 'train', 'a'), { recursive: true })
  await mkdir(join(dir, 'split', 'test'))
  await writeFile(join(dir, 'split', 'train', 'a', '0.png'), encodePng(new Uint8Array(16), 4, 4, 1))
  await writeFile(join(dir, 'both.json'), JSON.stringify({ steps: 3, epochs: 1 }))
  await writeFile(join(dir, 'typo.json'), JSON.stringify({ epoch: 1 }))
  await writeFile(join(dir, 'wrong.json'), JSON.stringify({ out: 3 }))
  for (const [args, message] of cases) {
    const r = await beit(args)
    t.is(r.code, 1, `${args.join(' ')}: ${r.stderr}`)
    t.regex(r.stderr, message, args.join(' '))
    t.notRegex(r.stderr, /\n\s+at /, `${args.join(' ')} printed a stack`)
    // Nothing is written to a run folder before the error.
    const out = args.indexOf('--out')
    if (out >= 0) t.false(existsSync(join(args[out + 1], 'config.json')), `${args.join(' ')} wrote config.json`)
  }
  const help = await beit(['pretrain', '--help'])
  t.is(help.code, 0)
  t.regex(help.stdout, /usage: beit pretrain[\s\S]*--mask-ratio N/)
})

test('beit --version and -v print the package version; -h, --help and no command print the command list', async (t) => {
  const { version } = JSON.parse(await readFile(join(__dirname, '..', 'package.json'), 'utf8'))
  t.regex(version, /^\d+\.\d+\.\d+/)
  for (const flag of ['--version', '-v']) {
    const r = await beit([flag])
    t.is(r.code, 0, r.stderr)
    t.is(r.stdout, `${version}\n`, flag)
    t.is(r.stderr, '')
  }
  const commands = ['demo', 'tokenizer', 'pretrain', 'finetune', 'probe', 'encode', 'reconstruct', 'import', 'export']
  for (const args of [['-h'], ['--help'], []]) {
    const r = await beit(args)
    t.is(r.code, 0, r.stderr)
    t.regex(r.stdout, /^usage: beit <command> \[options\][\s\S]*beit --version \| -v\n\ncommands:\n/)
    for (const name of commands) t.regex(r.stdout, new RegExp(`\n  ${name} +\\S`), `${args.join(' ')}: ${name}`)
  }
})

test('a flag overrides the config file, --steps its --epochs too; the run folder records what ran', async (t) => {
  const dir = await tempDir(t)
  const tok = await beit(['tokenizer', '--steps', '2', '--batch-size', '8', '--out', join(dir, 'tok'), '--quiet'])
  t.is(tok.code, 0, tok.stderr)
  t.deepEqual(JSON.parse(await readFile(join(dir, 'tok', 'config.json'), 'utf8')), {
    data: 'sample',
    preset: 'tiny',
    steps: 2,
    'batch-size': 8,
    accumulate: 1,
    distributed: false,
    lr: 2e-3,
    'warmup-steps': 0,
    'kl-weight': 6.6,
    ema: 0,
    seed: 0,
    resume: false,
    'checkpoint-every': 500,
    out: join(dir, 'tok'),
  })
  // The config file asks for epochs; --steps on the command line replaces them.
  // (It may also hold the common options and, as a run folder's config.json does, the job's keys.)
  await writeFile(
    join(dir, 'ft.json'),
    JSON.stringify({ epochs: 5, 'batch-size': 32, layers: 1, hiddenSize: 32, device: 'cpu', worldSize: 1 }),
  )
  const args = ['finetune', '--config', join(dir, 'ft.json'), '--heads', '2', '--mlp-size', '64', '--quiet']
  const ft = await beit([...args, '--steps', '3', '--out', join(dir, 'ft')])
  t.is(ft.code, 0, ft.stderr)
  const config = JSON.parse(await readFile(join(dir, 'ft', 'config.json'), 'utf8'))
  t.like(config, { steps: 3, 'batch-size': 32, layers: 1, 'hidden-size': 32, heads: 2 })
  t.false('epochs' in config)
  const steps = (await readFile(join(dir, 'ft', 'metrics.jsonl'), 'utf8'))
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l))
    .filter((r) => 'loss' in r)
  t.is(steps.length, 3)
  // Neither given: the command's fallback (finetune: 5 epochs) runs, and the folder records it.
  for (const split of ['train', 'test'])
    for (const label of ['dark', 'light']) {
      await mkdir(join(dir, 'tiny', split, label), { recursive: true })
      for (let i = 0; i < 4; i++) {
        const gray = new Uint8Array(28 * 28).fill(label === 'dark' ? 10 + i : 240 - i)
        await writeFile(join(dir, 'tiny', split, label, `${i}.png`), encodePng(gray, 28, 28, 1))
      }
    }
  const small = ['--image-size', '28', '--patch-size', '4', '--channels', '1', '--layers', '1', '--hidden-size', '32']
  const fallback = await beit([
    'finetune',
    '--data',
    join(dir, 'tiny'),
    ...small,
    '--heads',
    '2',
    '--mlp-size',
    '64',
    '--batch-size',
    '4',
    '--out',
    join(dir, 'ft5'),
    '--quiet',
  ])
  t.is(fallback.code, 0, fallback.stderr)
  t.like(JSON.parse(await readFile(join(dir, 'ft5', 'config.json'), 'utf8')), { epochs: 5 })
  const records = (await readFile(join(dir, 'ft5', 'metrics.jsonl'), 'utf8'))
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l))
  t.is(records.filter((r) => 'loss' in r).length, 10, '8 images in batches of 4, 5 epochs')
  t.is(records.filter((r) => 'evalAccuracy' in r).length, 5)
})

test('SIGINT mid-run leaves a loadable checkpoint, and --resume finishes the run', async (t) => {
  const dir = await tempDir(t)
  const tok = await beit(['tokenizer', '--steps', '2', '--batch-size', '4', '--out', join(dir, 'tok'), '--quiet'])
  t.is(tok.code, 0, tok.stderr)
  const args = [
    'pretrain',
    '--tokenizer',
    join(dir, 'tok', 'checkpoint.safetensors'),
    ...TINY_MODEL,
    '--steps',
    '400',
    '--batch-size',
    '16',
    '--checkpoint-every',
    '1000',
    '--out',
    join(dir, 'run'),
    '--quiet',
  ]
  let sent = false
  const metrics = join(dir, 'run', 'metrics.jsonl')
  const interrupted = await new Promise<Outcome>((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
    let stderr = ''
    child.stderr.on('data', (d) => (stderr += d))
    const poll = setInterval(async () => {
      if (sent || !existsSync(metrics)) return
      if ((await readFile(metrics, 'utf8')).split('\n').length > 5) {
        sent = true
        child.kill('SIGINT')
      }
    }, 100)
    child.on('error', reject)
    child.on('close', (code) => {
      clearInterval(poll)
      resolve({ code, stdout: '', stderr })
    })
  })
  t.true(sent, 'the run ended before it could be interrupted')
  t.is(interrupted.code, 130, interrupted.stderr)
  t.regex(interrupted.stderr, /interrupted after step \d+; checkpoint .*--resume/)
  const model = await Beit.load(join(dir, 'run', 'checkpoint.safetensors'))
  const state = model.trainState as { step: number }
  t.true(state.step >= 5 && state.step < 400, `saved at step ${state.step}`)
  t.is(model.step, state.step)

  // --resume continues with the options the run started with (its config.json), not the defaults.
  const config = await readFile(join(dir, 'run', 'config.json'), 'utf8')
  const resumed = await beit(['pretrain', '--resume', '--out', join(dir, 'run'), '--quiet'])
  t.is(resumed.code, 0, resumed.stderr)
  t.is(await readFile(join(dir, 'run', 'config.json'), 'utf8'), config, 'the run keeps its record')
  t.is(((await Beit.load(join(dir, 'run', 'checkpoint.safetensors'))).trainState as { step: number }).step, 400)
})

test('on a terminal, beit pretrain draws one progress bar whose ETA comes from the run so far', async (t) => {
  const dir = await tempDir(t)
  const tok = await beit(['tokenizer', '--steps', '2', '--batch-size', '8', '--out', join(dir, 'tok'), '--quiet'])
  t.is(tok.code, 0, tok.stderr)
  const args = [
    CLI,
    'pretrain',
    '--tokenizer',
    join(dir, 'tok', 'checkpoint.safetensors'),
    '--layers',
    '2',
    '--steps',
    '40',
    '--batch-size',
    '256',
    '--out',
    join(dir, 'pre'),
  ]
  const command = [process.execPath, ...args].map((a) => `'${a}'`).join(' ')
  // script(1) runs the command on a pseudo-terminal and copies what it draws to stdout.
  const run = await new Promise<Outcome>((resolve, reject) => {
    const child = spawn('script', ['-qfec', command, '/dev/null'], { stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    child.stdout.on('data', (d) => (stdout += d))
    child.on('error', reject)
    child.on('close', (code) => resolve({ code, stdout, stderr: '' }))
  })
  t.is(run.code, 0, run.stdout)
  const frames = run.stdout.split('\r\x1b[2K').filter((f) => f.startsWith('pretrain ['))
  t.is(frames.length, 40, run.stdout)
  frames.forEach((f, i) => t.regex(f, new RegExp(`^pretrain \\[[= ]{24}\\] ${i + 1}/40 `)))
  // The bar starts with the first step's report; from the second on, its ETA is the time per
  // step so far times the ~38 steps left. A bar rebuilt every step times each step from its
  // own start: an ETA of 0s throughout.
  // A slow machine prints ETAs of a minute or more as 1m05s.
  const etas = frames.slice(1, 5).map((f) => {
    const eta = /ETA (?:(\d+)m)?(\d+)s/.exec(f)
    return eta ? Number(eta[1] ?? 0) * 60 + Number(eta[2]) : NaN
  })
  t.true(Math.max(...etas) >= 1, `ETAs ${etas.join(', ')} s after steps 2-5: the bar forgot the time already spent`)
})
