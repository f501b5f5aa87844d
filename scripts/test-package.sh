#!/bin/sh
# Packaging test: pack the main and linux-x64-gnu packages, install both from the tarballs alone
# into a fresh folder with no Rust toolchain on PATH and the registry unreachable (--offline),
# then (1) run `npx beit demo` on a reduced setting, (2) type-check a strict TypeScript script
# against the installed types, (3) require and import the package, (4) check that an unusable
# CUDA variant falls back to the CPU build with one line. Prints the installed sizes.
# The install and checks (1), (3) and (4) then run again under Node 22 and Node 24 (the same
# N-API addon loads under all three): official Node builds from the npm registry's
# node-<platform>-<arch> packages, downloaded once into ~/.cache/beit/node.
set -eu
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
node "$root/scripts/pack.js" "$work/packs" > "$work/pack.log" 2>&1 || { cat "$work/pack.log"; exit 1; }
version="$(node -p "require('$root/package.json').version")"

# The other Node versions the package supports ("engines"), exact so every run tests the same.
other_nodes="22.23.5 24.22.3"
platform="$(node -p 'process.platform + "-" + process.arch')"
# The bin folder of Node $1, downloaded on first use.
node_bin_dir() {
  cache="$HOME/.cache/beit/node/$1"
  bin="$cache/node_modules/node-$platform/bin"
  if [ "$("$bin/node" --version 2> /dev/null || true)" != "v$1" ]; then
    rm -rf "$cache"
    echo "== Node $1: node-$platform@$1 from the registry into $cache" >&2
    npm install --prefix "$cache" --no-save --no-package-lock --no-audit --no-fund --loglevel=error \
      "node-$platform@$1" > "$work/node-$1.log" 2>&1 || { cat "$work/node-$1.log" >&2; exit 1; }
  fi
  [ "$("$bin/node" --version)" = "v$1" ] || { echo "Node $1 did not install into $cache" >&2; exit 1; }
  echo "$bin"
}
node_dirs=""
for v in $other_nodes; do node_dirs="$node_dirs $(node_bin_dir "$v")"; done

export PATH="/usr/local/bin:/usr/bin:/bin"
if command -v cargo > /dev/null; then echo "cargo is still on PATH" >&2; exit 1; fi

# A fresh folder $1 with the two tarballs installed, offline.
install_app() {
  mkdir "$1"
  cd "$1"
  printf '{ "name": "app", "version": "1.0.0", "private": true }\n' > package.json
  npm install --offline --no-audit --no-fund --loglevel=error \
    "$work/packs/beit-$version.tgz" "$work/packs/beit-linux-x64-gnu-$version.tgz"
}

# Checks (1), (3) and (4) in the current app folder, under the `node` first on PATH.
run_checks() {
  node_version="$(node --version)"
  echo "== (1) npx beit demo (reduced), Node $node_version"
  npx --offline beit demo --tokenizer-steps 5 --pretrain-epochs 0.03 --labelled-per-class 10 --finetune-epochs 1 --out runs/demo --quiet > demo.log
  grep -q "linear probe on the 100 labelled" demo.log || { cat demo.log; exit 1; }
  tail -n 4 demo.log

  echo "== (3) require and import, Node $node_version"
  node -e "
    const b = require('beit')
    const m = b.Beit.create({ preset: 'mini', imageSize: [28, 28], patchSize: 4, numChannels: 1, numHiddenLayers: 1 })
    if (!(m.numParameters > 0)) process.exit(1)
    console.log('require ok:', Object.keys(b).length, 'exports; a model of', m.numParameters, 'parameters; N-API', process.versions.napi)"
  node --input-type=module -e "import { Beit, pretrain } from 'beit'; if (typeof Beit.create !== 'function' || typeof pretrain !== 'function') process.exit(1); console.log('import ok')"

  echo "== (4) an unusable CUDA variant falls back to the CPU build, Node $node_version"
  mkdir -p node_modules/beit-linux-x64-gnu-cuda
  printf '{ "name": "beit-linux-x64-gnu-cuda", "version": "%s", "main": "beit.linux-x64-gnu-cuda.node" }\n' "$version" > node_modules/beit-linux-x64-gnu-cuda/package.json
  echo "not a shared object" > node_modules/beit-linux-x64-gnu-cuda/beit.linux-x64-gnu-cuda.node
  node -e "const b = require('beit'); b.Beit.create('mini')" 2> fallback.log
  grep -q "beit: beit-linux-x64-gnu-cuda" fallback.log || { echo "no fallback line"; cat fallback.log; exit 1; }
  [ "$(wc -l < fallback.log)" -eq 1 ] || { echo "expected one line"; cat fallback.log; exit 1; }
  cat fallback.log
  rm -rf node_modules/beit-linux-x64-gnu-cuda
}

install_app "$work/app"
run_checks

echo "== (2) strict type check of a script using the API"
cat > check.ts <<'TS'
import { Beit, Classifier, ImageLoader, beitViews, openDataset, type BeitConfig, type Batch } from 'beit'

async function main(): Promise<number> {
  const model: Beit = Beit.create({ preset: 'mini', imageSize: [28, 28], patchSize: 4, numChannels: 1, numHiddenLayers: 1 })
  const config: BeitConfig = model.config
  const data = await openDataset('sample', 'test')
  const loader = new ImageLoader({ dataset: data, views: beitViews({ imageSize: 28, tokenizerSize: 28, channels: 1 }), transform: { kind: 'eval' }, batchSize: 8 })
  const first: IteratorResult<Batch> = await loader.epoch(0).next()
  const classifier = Classifier.create({ model: config, numLabels: 10 })
  const logits: Float32Array = await classifier.predict(first.done ? new Float32Array(784) : first.value.views[0])
  return logits.length
}
void main()
TS
printf '{ "compilerOptions": { "strict": true, "noEmit": true, "module": "nodenext", "moduleResolution": "nodenext", "target": "es2022", "skipLibCheck": false, "types": [] }, "files": ["check.ts"] }\n' > tsconfig.json
"$root/node_modules/.bin/tsc" -p tsconfig.json
echo "types ok"

echo "== installed sizes"
du -sh node_modules/beit node_modules/beit-linux-x64-gnu
ls -l "$work/packs"

for bin in $node_dirs; do
  (
    export PATH="$bin:$PATH"
    v="$(node --version)"
    echo "== Node $v: install from the tarballs"
    install_app "$work/app-$v"
    run_checks
  )
done
echo "package ok under Node $(node --version)$(for bin in $node_dirs; do printf ', %s' "$("$bin/node" --version)"; done)"
