#!/bin/sh
# npm run bench:scaling: beit's data parallelism on this machine and against PyTorch DDP
# (src/bench/scaling.ts). Makes the Python environment (torch + transformers, as bench:torch)
# and the MPICH of the tests (scripts/mpi/install.sh) first.
set -eu
cd "$(dirname "$0")/../.."
. scripts/bench/venv.sh
sh scripts/mpi/install.sh
npm run --silent build:ts
BEIT_BENCH_PYTHON="$venv/bin/python" exec node dist/bench/scaling.js "$@"
