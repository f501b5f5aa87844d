//! Compiles crate/core/cuda/kernels.cu for the host, with emulation/ standing in for the CUDA
//! runtime (see emulation/cuda_emulation.h).

fn main() {
    for path in
        ["emulation/kernels.cpp", "emulation/cuda_emulation.h", "emulation/cuda_bf16.h", "../core/cuda/kernels.cu"]
    {
        println!("cargo::rerun-if-changed={path}");
    }
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .include("emulation")
        .file("emulation/kernels.cpp")
        .warnings(true)
        .flag_if_supported("-Wno-unused-parameter")
        .compile("beit_emulated_kernels");
    println!("cargo::rustc-link-lib=stdc++");
}
