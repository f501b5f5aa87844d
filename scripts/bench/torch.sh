#!/bin/sh
# npm run bench:torch: beit against PyTorch eager on this CPU (src/bench/torch.ts). Makes the
# Python environment once (torch + transformers from PyPI, ~3 minutes, ~6 GB) in
# $BEIT_BENCH_VENV (default ~/.cache/beit/bench-venv) and passes its python on.
set -eu
cd "$(dirname "$0")/../.."
venv=${BEIT_BENCH_VENV:-$HOME/.cache/beit/bench-venv}
if ! "$venv/bin/python" -c 'import torch, transformers' 2>/dev/null; then
  echo "bench:torch: installing torch and transformers into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch transformers
fi
npm run --silent build:ts
BEIT_BENCH_PYTHON="$venv/bin/python" exec node dist/bench/torch.js "$@"
