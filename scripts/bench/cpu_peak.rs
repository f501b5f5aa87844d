// The peak rates of one core's vector units, to choose bf16 GEMM kernels by: AVX-512 f32 FMA
// (vfmadd, 32 flops per instruction) against AVX512-BF16 dot products (vdpbf16ps, 64 flops: 16
// lanes x 2 pairs), each over 24 independent accumulators so that latency is hidden and only
// throughput counts. No memory traffic: a ceiling, not a GEMM.
//   rustc -O -C target-cpu=native scripts/bench/cpu_peak.rs -o /tmp/cpu_peak && /tmp/cpu_peak
use std::arch::x86_64::*;
use std::time::Instant;

const CHAINS: usize = 24;
const ITERATIONS: usize = 20_000_000;

#[target_feature(enable = "avx512f,fma")]
unsafe fn f32_fma(iterations: usize) -> f32 {
    let mut acc = [_mm512_setzero_ps(); CHAINS];
    let (a, b) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(1e-9));
    for _ in 0..iterations {
        for c in acc.iter_mut() {
            *c = _mm512_fmadd_ps(a, b, *c);
        }
    }
    _mm512_reduce_add_ps(acc.iter().fold(_mm512_setzero_ps(), |s, &c| _mm512_add_ps(s, c)))
}

#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_dot(iterations: usize) -> f32 {
    let mut acc = [_mm512_setzero_ps(); CHAINS];
    // bf16 pairs (1.0, 1.0) and (2^-31, 2^-31): normal numbers, so no denormal handling.
    let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3f80_3f80));
    let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3000_3000));
    for _ in 0..iterations {
        for c in acc.iter_mut() {
            *c = _mm512_dpbf16_ps(*c, a, b);
        }
    }
    _mm512_reduce_add_ps(acc.iter().fold(_mm512_setzero_ps(), |s, &c| _mm512_add_ps(s, c)))
}

fn rate(flops_per_instruction: usize, run: impl Fn() -> f32) -> f64 {
    let start = Instant::now();
    std::hint::black_box(run());
    (ITERATIONS * CHAINS * flops_per_instruction) as f64 / start.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).unwrap_or("");
    let (avx512, bf16) = (is_x86_feature_detected!("avx512f"), is_x86_feature_detected!("avx512bf16"));
    println!("{}: avx512f {avx512}, avx512bf16 {bf16}, amx-bf16 {}", model.trim(), cpuinfo.contains(" amx_bf16"));
    if !avx512 {
        println!("no AVX-512 here: nothing to measure");
        return;
    }
    let f32_rate = (0..2).map(|_| rate(32, || unsafe { f32_fma(ITERATIONS) })).fold(0.0, f64::max);
    println!("f32 FMA (zmm), one core: {f32_rate:.1} GFLOP/s");
    if bf16 {
        let bf16_rate = (0..2).map(|_| rate(64, || unsafe { bf16_dot(ITERATIONS) })).fold(0.0, f64::max);
        println!("bf16 dot (zmm), one core: {bf16_rate:.1} GFLOP/s = {:.2}x f32", bf16_rate / f32_rate);
    }
}
