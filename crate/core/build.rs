//! With the `cuda` feature: compiles cuda/kernels.cu to PTX with nvcc (scripts/cuda/toolchain.sh
//! sets up one from PyPI wheels). Without it: nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=cuda/kernels.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("kernels.ptx");
    // The PTX ISA must be one the GPU host's driver can load: nvcc from CUDA 13.0, sm_90 by default.
    let arch = format!("-arch=sm_{}", std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into()));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", &arch, "-O3", "-std=c++17", "cuda/kernels.cu", "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {nvcc} ({e}): run `. scripts/cuda/toolchain.sh` first"));
    assert!(status.success(), "{nvcc} failed to compile cuda/kernels.cu");
}
