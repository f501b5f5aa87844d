#!/usr/bin/env sh
# A CUDA 13.0 toolchain from PyPI wheels, for building the CUDA addon on a machine without a GPU
# or a CUDA install: nvcc (kernels to PTX), the runtime libraries to link against, and a
# link-only libcuda stub (the real libcuda comes with the NVIDIA driver on the GPU host).
#
#   . scripts/cuda/toolchain.sh     # installs once into the cache, then exports the environment
#
# nvcc must not be newer than the GPU driver's CUDA (driver 580 = CUDA 13.0), or the PTX fails
# to load there; hence the pins.
set -eu

BEIT_CUDA_DIR=${BEIT_CUDA_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/beit/cuda-13.0}
CUDA_ROOT=$BEIT_CUDA_DIR/nvidia/cu13

if [ ! -x "$CUDA_ROOT/bin/nvcc" ] || [ ! -e "$CUDA_ROOT/lib/libcublas.so.13" ]; then
  echo "installing the CUDA 13.0 toolchain wheels into $BEIT_CUDA_DIR" >&2
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$BEIT_CUDA_DIR" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
    nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.1.1.3 nvidia-curand==10.4.0.35
fi

# The wheels ship only versioned libraries; the linker looks for lib<name>.so.
for lib in cudart nvrtc cublas cublasLt curand; do
  versioned=$(ls "$CUDA_ROOT/lib/lib$lib.so."* 2>/dev/null | grep -E "lib$lib\.so\.[0-9]+$" | head -n 1)
  [ -n "$versioned" ] || { echo "toolchain.sh: lib$lib.so.* missing in $CUDA_ROOT/lib" >&2; exit 1; }
  ln -sf "$(basename "$versioned")" "$CUDA_ROOT/lib/lib$lib.so"
done

# libcuda belongs to the driver. To link, a stub exporting every cu* entry point of cuda.h
# (both the names and the _v2 names the macros map them to), with the driver's soname. It is
# for linking only: never on a runtime library path.
STUB=$CUDA_ROOT/lib/stubs/libcuda.so
if [ ! -e "$STUB" ]; then
  mkdir -p "$CUDA_ROOT/lib/stubs"
  src=$CUDA_ROOT/lib/stubs/libcuda-stub.c
  { cat "$CUDA_ROOT/include/cuda.h"; gcc -E -P -I "$CUDA_ROOT/include" "$CUDA_ROOT/include/cuda.h"; } \
    | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( \t' | sort -u \
    | awk '{ print "void " $1 "(void) {}" }' > "$src"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB" "$src"
  rm -f "$src"
fi

export CUDA_HOME="$CUDA_ROOT"
export CUDA_PATH="$CUDA_ROOT"
export PATH="$CUDA_ROOT/bin:$PATH"
export LIBRARY_PATH="$CUDA_ROOT/lib:$CUDA_ROOT/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
# Compute capability 9.0 (H100/H200); without it candle-kernels asks nvidia-smi, which fails here.
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
set +eu
