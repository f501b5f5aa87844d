# Sourced by the benchmark scripts: makes the Python environment of the PyTorch side once
# (torch + transformers from PyPI, ~3 minutes, ~6 GB) in $BEIT_BENCH_VENV (default
# ~/.cache/beit/bench-venv) and sets $venv to it.
venv=${BEIT_BENCH_VENV:-$HOME/.cache/beit/bench-venv}
if ! "$venv/bin/python" -c 'import torch, transformers' 2>/dev/null; then
  echo "installing torch and transformers into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch transformers
fi
