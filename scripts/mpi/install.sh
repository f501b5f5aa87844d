#!/bin/sh
# The MPIs the data-parallel tests launch (never a dependency of the package, which opens MPI at
# run time): MPICH from its PyPI wheel (mpiexec, libmpi_abi.so.1 = the MPI 5 standard ABI,
# libmpi.so.12 = MPICH's ABI), cached in ~/.cache/beit/mpich, and Debian's Open MPI
# (mpirun.openmpi, libmpi.so.40). Idempotent: does nothing when both are there.
set -eu
cache="${BEIT_CACHE:-$HOME/.cache/beit}"
venv="$cache/mpich"
if [ ! -x "$venv/bin/mpiexec" ]; then
  echo "installing MPICH (PyPI wheel 'mpich') into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'mpich==5.0.2'
fi
if ! command -v mpirun.openmpi >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Open MPI (Debian openmpi-bin)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin >/dev/null
  else
    echo "Open MPI is missing: install Debian's openmpi-bin (sudo apt-get install openmpi-bin)" >&2
    exit 1
  fi
fi
