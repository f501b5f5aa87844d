#!/bin/sh
# npm run bench:torch: beit against PyTorch eager on this CPU (src/bench/torch.ts). Makes the
# Python environment once (torch + transformers from PyPI, ~3 minutes, ~6 GB) in
# $BEIT_BENCH_VENV (default ~/.cache/beit/bench-venv) and passes its python on.
set -eu
cd "$(dirname "$0")/../.."
. scripts/bench/venv.sh
npm run --silent build:ts
BEIT_BENCH_PYTHON="$venv/bin/python" exec node dist/bench/torch.js "$@"
