#!/usr/bin/env node
// Packs the npm packages the way a release publishes them, from the binaries built here:
//   1. `napi artifacts` (restricted to the targets whose .node exists) copies each binary into
//      its platform package under npm/;
//   2. the main package is staged with `optionalDependencies` on every declared platform
//      package (what `napi pre-publish` writes; it needs all targets' binaries, built by a
//      release matrix) and without the development-only scripts and dependencies;
//   3. `npm pack` of the main package and of each platform package that has its binary.
// Usage: node scripts/pack.js DEST_DIR   (after `npm run build`)
'use strict'
const { execFileSync } = require('node:child_process')
const { cpSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } = require('node:fs')
const { tmpdir } = require('node:os')
const { join, resolve } = require('node:path')

const root = join(__dirname, '..')
const dest = resolve(process.argv[2] ?? 'packages')
require('node:fs').mkdirSync(dest, { recursive: true })
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'))
const { binaryName, targets } = pkg.napi

const platformDirs = Object.fromEntries(
  require('node:fs')
    .readdirSync(join(root, 'npm'))
    .map((dir) => [dir, JSON.parse(readFileSync(join(root, 'npm', dir, 'package.json'), 'utf8'))]),
)
const built = Object.keys(platformDirs).filter((dir) => existsSync(join(root, `${binaryName}.${dir}.node`)))
if (built.length === 0) throw new Error(`no ${binaryName}.*.node in ${root}: run npm run build:native first`)

const napi = join(root, 'node_modules', '.bin', 'napi')
const builtTargets = targets.filter((t) => built.includes(tripleToDir(t)))
const scratch = mkdtempSync(join(tmpdir(), 'beit-pack-'))
try {
  const config = join(scratch, 'napi.json')
  writeFileSync(config, JSON.stringify({ binaryName, targets: builtTargets }))
  execFileSync(napi, ['artifacts', '-c', config, '--output-dir', '.', '--npm-dir', 'npm'], {
    cwd: root,
    stdio: 'inherit',
  })

  const stage = join(scratch, 'beit')
  for (const entry of ['dist', 'index.js', 'index.d.ts', 'README.md', 'data/fashion-mnist-sample']) {
    cpSync(join(root, entry), join(stage, entry), { recursive: true })
  }
  const published = { ...pkg }
  delete published.devDependencies
  published.scripts = {}
  published.files = pkg.files.filter((f) => f !== 'scripts/install-native.js')
  published.optionalDependencies = Object.fromEntries(
    targets.map((t) => [`${pkg.name}-${tripleToDir(t)}`, pkg.version]),
  )
  writeFileSync(join(stage, 'package.json'), JSON.stringify(published, null, 2) + '\n')
  execFileSync('npm', ['pack', '--pack-destination', dest], { cwd: stage, stdio: 'inherit' })
  for (const dir of built)
    execFileSync('npm', ['pack', '--pack-destination', dest], { cwd: join(root, 'npm', dir), stdio: 'inherit' })
} finally {
  rmSync(scratch, { recursive: true, force: true })
}

/** napi's platform folder name of a Rust target triple. */
function tripleToDir(triple) {
  const names = {
    'x86_64-unknown-linux-gnu': 'linux-x64-gnu',
    'aarch64-unknown-linux-gnu': 'linux-arm64-gnu',
    'x86_64-apple-darwin': 'darwin-x64',
    'aarch64-apple-darwin': 'darwin-arm64',
    'x86_64-pc-windows-msvc': 'win32-x64-msvc',
  }
  if (!names[triple]) throw new Error(`no platform folder name for target ${triple}`)
  return names[triple]
}
