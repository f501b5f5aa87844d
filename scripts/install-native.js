#!/usr/bin/env node
// npm `install` hook: use a prebuilt native binary when one loads, else build it from the
// Rust sources (a git checkout). BEIT_BUILD_FROM_SOURCE=1 forces a build.
'use strict'
const { spawnSync } = require('node:child_process')
const { existsSync } = require('node:fs')
const { join } = require('node:path')

const root = join(__dirname, '..')

function prebuiltLoads() {
  try {
    require(join(root, 'index.js'))
    return true
  } catch {
    return false
  }
}

if (process.env.BEIT_BUILD_FROM_SOURCE !== '1' && prebuiltLoads()) process.exit(0)

if (!existsSync(join(root, 'crate', 'node', 'Cargo.toml'))) {
  console.error(
    'beit: no prebuilt native binary loads on this platform and the Rust sources are not present to build one',
  )
  process.exit(1)
}
console.log('beit: building the native addon from source (cargo, release profile)...')
const result = spawnSync('npm', ['run', 'build:native'], { cwd: root, stdio: 'inherit' })
process.exit(result.status ?? 1)
