//! The engine's run-time SIMD dispatch: every level computes the same bits (it changes speed,
//! never numbers), and the vectorisable f32 math is accurate. Its own binary: the level is
//! process-wide.

mod common;

use beit_core::config::BeitConfig;
use beit_core::engine::simd::{self, Level, Real};
use beit_core::rng::Draws;
use candle_core::DType;
use common::*;

#[test]
fn every_level_gives_the_same_bits() {
    let cfg = BeitConfig {
        hidden_size: 40,
        intermediate_size: 72,
        num_attention_heads: 2,
        drop_path_rate: 0.3,
        ..tiny_config()
    };
    let (_, vars) = mim_model(&cfg, 4, DType::F32);
    randomise(&vars, 8, 0.3);
    let b = batch(&cfg, 5, 3);
    let ids: Vec<u32> = b.mask.iter().zip(&b.targets).filter(|(&m, _)| m != 0).map(|(_, &t)| t as u32).collect();
    let run = |level: Level| {
        simd::set_level(level);
        let mut eng = mim_engine::<f32>(&cfg, &vars);
        let loss = eng.loss_and_grads(&b.pixels, &b.mask, &ids, Draws { seed: 9, first_sample: 0 }, 1.0).unwrap().loss;
        (loss.to_bits(), eng.flat.grads.iter().map(|g| g.to_bits()).collect::<Vec<_>>())
    };
    let best = run(Level::Avx512);
    for level in [Level::Avx2, Level::Baseline] {
        assert!(run(level) == best, "{level:?} differs from the best level");
    }
}

/// Narrow convolutions (into 8 channels or fewer: AVX's 8-lane sums above the baseline level)
/// give the same bits at every level, forward and input gradient, with ReLU and without.
#[test]
fn narrow_convolutions_give_the_same_bits_at_every_level() {
    use beit_core::config::Precision;
    use beit_core::engine::conv::{self, Nhwc};
    let (s, c_out, k) = (Nhwc { b: 2, h: 5, w: 31, c: 12 }, 7, 3);
    let values = |n: usize, seed: u64| random_tensor(&[n], seed, DType::F32).to_vec1::<f32>().unwrap();
    let (x, w, bias, dy) =
        (values(s.len(), 1), values(c_out * s.c * 9, 2), values(c_out, 3), values(s.pixels() * c_out, 4));
    let mut packed = vec![0f32; w.len()];
    conv::pack(&w, c_out, s.c, k, &mut packed);
    let wide = Nhwc { c: 5, ..s };
    let mut flipped = vec![0f32; c_out * wide.c * 9];
    conv::flip(&values(c_out * wide.c * 9, 5), c_out, wide.c, k, &mut flipped);
    let run = |level: Level| {
        simd::set_level(level);
        let (mut y, mut dx, mut cols) = (vec![0f32; s.pixels() * c_out], vec![0f32; wide.len()], Vec::new());
        conv::forward(Precision::F32, &x, s, true, k, &packed, &bias, &mut y, &mut cols);
        let x_wide = values(wide.len(), 6);
        conv::backward_input(Precision::F32, &x_wide, wide, false, k, &flipped, c_out, &dy, &mut dx, &mut cols);
        y.iter().chain(&dx).map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    let best = run(Level::Avx512);
    for level in [Level::Avx2, Level::Baseline] {
        assert!(run(level) == best, "{level:?} differs from the best level");
    }
}

#[test]
fn f32_exp_and_normal_cdf_are_accurate() {
    let mut worst_exp = 0.0f64;
    let mut worst_cdf = 0.0f64;
    for i in 0..=400_000 {
        let x = -87.0 + 175.0 * i as f64 / 400_000.0;
        let e = (x as f32).exp_v() as f64;
        let reference = (x as f32 as f64).exp();
        worst_exp = worst_exp.max((e - reference).abs() / reference);
        let z = -12.0 + 24.0 * i as f64 / 400_000.0;
        let cdf = (z as f32).normal_cdf() as f64;
        worst_cdf = worst_cdf.max((cdf - (z as f32 as f64).normal_cdf()).abs());
    }
    assert!(worst_exp < 2.5e-7, "exp: relative error {worst_exp:e}");
    let mut worst_ln = 0.0f64;
    for i in 0..=400_000 {
        let x = (10f64).powf(-20.0 + 22.0 * i as f64 / 400_000.0) as f32;
        let reference = (x as f64).ln();
        worst_ln = worst_ln.max(((simd::ln_f32(x) as f64) - reference).abs() / reference.abs().max(1.0));
    }
    assert!(worst_ln < 2e-7, "ln: error {worst_ln:e}");
    assert!(worst_cdf < 3e-7, "normal cdf: absolute error {worst_cdf:e}");
}

/// GELU's backward reads Phi(h) back from the forward's output (GELU(h) / h): the derivative
/// stays within 1e-6 of Phi + h phi in f64, at zero, at denormal and huge inputs and far into
/// both tails, and the f64 path (the finite-difference checks') within 1e-13.
#[test]
fn gelu_backward_reads_phi_back_from_the_forward_output() {
    use beit_core::engine::kernels::{bias_gelu, gelu_backward};
    let mut inputs = vec![0.0, 1e-40, -1e-40, 1e-31, -1e-29, 1e-6, -1e-6, 20.0, -13.0, -20.0, 40.0, -100.0, 1e30];
    inputs.extend((0..=4000).map(|i| -10.0 + 20.0 * i as f64 / 4000.0));
    let exact = |h: f64| h.normal_cdf() + h * (-0.5 * h * h).exp() / (2.0 * std::f64::consts::PI).sqrt();
    fn derivative<T: Real>(h: &[T]) -> Vec<T> {
        let (mut pre, mut gelu, mut dg) = (h.to_vec(), vec![T::ZERO; h.len()], vec![T::ONE; h.len()]);
        bias_gelu(&mut pre, &[T::ZERO], &mut gelu);
        gelu_backward(&pre, &gelu, &mut dg);
        dg
    }
    let h32: Vec<f32> = inputs.iter().map(|&h| h as f32).collect();
    for (&h, d) in h32.iter().zip(derivative(&h32)) {
        let err = (d as f64 - exact(h as f64)).abs();
        assert!(err < 1e-6, "f32 GELU'({h:e}) = {d:e}, expected {:e}", exact(h as f64));
    }
    for (&h, d) in inputs.iter().zip(derivative(&inputs)) {
        assert!((d - exact(h)).abs() < 1e-13, "f64 GELU'({h:e}) = {d:e}, expected {:e}", exact(h));
    }
}

/// The parallel Gumbel generator is one SplitMix64 stream (chunked by jumping ahead) and has
/// Gumbel(0, 1)'s mean (Euler's gamma) and variance (pi^2 / 6).
#[test]
fn gumbel_noise_is_one_stream_with_the_right_moments() {
    let mut noise = vec![0f32; 1 << 20];
    beit_core::engine::kernels::gumbel_noise(7, 0, &mut noise);
    let mut rng = beit_core::rng::SplitMix64::new(7);
    for (i, &g) in noise.iter().enumerate().take(40_000) {
        let u = rng.uniform().max(1e-20) as f32;
        assert_eq!(g, -simd::ln_f32(-simd::ln_f32(u)), "draw {i}");
    }
    // A micro-batch starting further on draws the same stream from there.
    let mut later = vec![0f32; 30_000];
    beit_core::engine::kernels::gumbel_noise(7, 20_001, &mut later);
    assert_eq!(later[..], noise[20_001..50_001]);
    let n = noise.len() as f64;
    let mean = noise.iter().map(|&g| g as f64).sum::<f64>() / n;
    let var = noise.iter().map(|&g| (g as f64 - mean).powi(2)).sum::<f64>() / n;
    assert!((mean - 0.577_215_66).abs() < 5e-3, "mean {mean}");
    assert!((var - std::f64::consts::PI.powi(2) / 6.0).abs() < 1e-2, "variance {var}");
}
