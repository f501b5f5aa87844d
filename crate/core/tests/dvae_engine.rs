//! The dVAE on the CPU engine against the candle model it stands in for (same loss, same
//! gradient for every tensor, same codes and reconstructions) and against finite differences
//! of its own loss, in f64 on tiny shapes; and its tiled convolutions at tile boundaries.

mod common;

use beit_core::config::Precision;
use beit_core::engine::conv::{self, Nhwc};
use beit_core::engine::dvae::{DvaeEngine, Objective};
use beit_core::engine::matmul_bf16::{bf16_bits, bf16_value};
use beit_core::engine::simd::Real;
use beit_core::engine::EngineModel;
use beit_core::engine::{direct, winograd};
use beit_core::model::dvae::map_pixels;
use beit_core::ops::scaled_softmax;
use beit_core::rng::Draws;
use beit_core::tokenizer::{gumbel_noise, kl_to_uniform, reconstruction_loss};
use beit_core::{DvaeConfig, ReconLoss};
use candle_core::{DType, Device, Tensor, D};
use common::*;

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// tokenizer.rs's noise (the candle path's), in f64.
fn gumbel(dims: &[usize], seed: u64) -> Tensor {
    gumbel_noise(dims, seed, 0, &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap()
}

fn case(cfg: &DvaeConfig, recon: ReconLoss, batch: usize) {
    let context = format!("{recon:?} {cfg:?}: ");
    let (model, vars) = dvae_model(cfg, 4, DType::F64);
    randomise(&vars, 30, 0.4);
    let [h, w] = cfg.image_size;
    let c = cfg.num_channels;
    let pixels: Vec<f64> = random_tensor(&[batch * c * h * w], 7, DType::F64)
        .to_vec1::<f64>()
        .unwrap()
        .iter()
        .map(|v| (v.abs() * 0.4).min(1.0))
        .collect();
    let (temperature, kl_weight, seed) = (0.7, 0.3, 21);
    // The reference: tokenizer.rs's objective through candle's autograd.
    let nhwc = Tensor::from_slice(&pixels, (batch, c, h, w), &Device::Cpu)
        .unwrap()
        .permute((0, 2, 3, 1))
        .unwrap()
        .contiguous()
        .unwrap();
    let x = map_pixels(&nhwc).unwrap();
    let logits = model.encoder.forward(&x).unwrap();
    let (b, gh, gw, _) = logits.dims4().unwrap();
    let soft = scaled_softmax(&(&logits + gumbel(logits.dims(), seed)).unwrap(), None, 1.0 / temperature).unwrap();
    let out = model.decoder.forward(&soft).unwrap();
    let recon_t = reconstruction_loss(&out, &x, recon).unwrap();
    let kl_t = kl_to_uniform(&logits).unwrap();
    let per_position = (x.elem_count() / (b * gh * gw)) as f64;
    let loss = (&recon_t + (&kl_t * (kl_weight / per_position)).unwrap()).unwrap();
    let grads = loss.backward().unwrap();

    let mut eng = dvae_engine::<f64>(cfg, &vars);
    let mut codes = Vec::new();
    let objective = Objective { temperature, kl_weight, recon };
    let draws = Draws { seed, first_sample: 0 };
    let ours = eng.loss_and_grads(&pixels, h, w, &objective, draws, 1.0, &mut codes).unwrap();
    let reference = loss.to_scalar::<f64>().unwrap();
    assert!(
        (ours.loss - reference).abs() < 1e-10 * reference.abs(),
        "{context}loss {} vs candle {reference}",
        ours.loss
    );
    assert!((ours.kl - kl_t.to_scalar::<f64>().unwrap()).abs() < 1e-10, "{context}kl");
    let ids: Vec<u32> = logits.argmax(D::Minus1).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap();
    assert_eq!(codes, ids, "{context}codes");
    for (name, var) in &vars {
        let reference = values(grads.get(var).unwrap_or_else(|| panic!("{context}{name}: candle gave no gradient")));
        let g = slot(&eng.flat, name).of(&eng.flat.grads);
        let err = rel_err(g, &reference);
        assert!(err < 1e-9, "{context}{name}: engine vs candle gradient error {err:e}");
        // MSE ignores log b, so its output rows get no gradient; every other tensor does.
        if recon == ReconLoss::LogitLaplace {
            assert!(g.iter().any(|&v| v != 0.0), "{context}{name}: all-zero gradient");
        }
    }
    // Encode and decode with the engine's weights, and with other weights given (an EMA's).
    assert_eq!(eng.encode(None, &pixels, h, w).unwrap(), ids, "{context}encode");
    let zeros = vec![0.0; eng.flat.params.len()];
    assert!(
        eng.encode(Some(&zeros), &pixels, h, w).unwrap().iter().all(|&i| i == 0),
        "{context}encode with zero weights"
    );
    let one_hot = Tensor::eye(cfg.vocab_size, DType::F64, &Device::Cpu)
        .unwrap()
        .index_select(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap(), 0)
        .unwrap()
        .reshape((b, gh, gw, cfg.vocab_size))
        .unwrap();
    let images =
        model.reconstruction(&model.decoder.forward(&one_hot).unwrap()).unwrap().permute((0, 3, 1, 2)).unwrap();
    let err = rel_err(&eng.decode(None, &ids, gh, gw).unwrap(), &values(&images));
    assert!(err < 1e-12, "{context}decode error {err:e}");

    // Finite differences of the engine's own loss at a few coordinates of every tensor.
    let analytic = eng.flat.grads.clone();
    let hstep = 1e-5;
    let (table, layout) = (eng.flat.table.clone(), eng.flat.layout.clone());
    let (mut kinks, mut checked) = (0, 0);
    for (p, e) in table.params().iter().zip(layout.slots()) {
        let (mut worst, mut scale) = (0.0f64, 1e-6f64);
        for i in (0..e.len).step_by((e.len / 3).max(1)) {
            let at = e.offset + i;
            let base = eng.flat.params[at];
            let mut f = |v: f64| {
                eng.flat.params[at] = v;
                eng.loss_and_grads(&pixels, h, w, &objective, draws, 1.0, &mut codes).unwrap().loss
            };
            checked += 1;
            let (up, down) = (f(base + hstep), f(base - hstep));
            eng.flat.params[at] = base;
            // A ReLU's kink within one step (a pre-activation that the step pushes across zero)
            // leaves one side flat and the other not: no derivative to compare there.
            let (right, left) = ((up - ours.loss) / hstep, (ours.loss - down) / hstep);
            if (right == 0.0) != (left == 0.0) {
                kinks += 1;
                continue;
            }
            let numeric = (up - down) / (2.0 * hstep);
            worst = worst.max((numeric - analytic[at]).abs());
            scale = scale.max(numeric.abs()).max(analytic[at].abs());
        }
        assert!(worst / scale < 1e-6, "{context}{}: finite-difference error {:e}", p.name, worst / scale);
    }
    eprintln!("{context}{kinks} of {checked} coordinates at a kink");
    assert!(kinks * 20 <= checked, "{context}{kinks} of {checked} coordinates at a kink");
}

/// Two and three groups (max-pooling and upsampling between them), id-path convs and
/// identity id paths, both reconstruction losses.
#[test]
fn dvae_matches_candle_and_finite_differences() {
    let two = DvaeConfig {
        image_size: [8, 8],
        num_channels: 2,
        hidden_size: 16,
        num_groups: 2,
        blocks_per_group: 1,
        vocab_size: 5,
        decoder_input_size: 4,
    };
    case(&two, ReconLoss::LogitLaplace, 2);
    case(&two, ReconLoss::Mse, 2);
    let three = DvaeConfig {
        image_size: [8, 12],
        num_channels: 1,
        hidden_size: 16,
        num_groups: 3,
        blocks_per_group: 2,
        vocab_size: 6,
        decoder_input_size: 8,
    };
    case(&three, ReconLoss::LogitLaplace, 1);
}

/// Convolutions whose im2col is split into several tiles (tile boundaries inside an image row
/// and across images) equal one direct evaluation, both passes.
#[test]
fn tiled_convolutions_match_the_direct_sum() {
    assert!(!winograd::applies(3, 70, 5));
    convolution_matches_the_direct_sum(Nhwc { b: 3, h: 37, w: 41, c: 70 }, 5);
}

/// Convolutions through Winograd's F(4x4, 3x3) and F(2x2, 3x3) (forward and input gradient)
/// equal one direct evaluation: odd image sizes (tiles that reach past the right and bottom
/// edges) and chunks of tile rows that split an image.
#[test]
fn winograd_convolutions_match_the_direct_sum() {
    assert!(winograd::applies(3, 128, 24) && winograd::applies(3, 24, 128));
    assert_eq!(winograd::block_side(37, 41, 128, 24), 4);
    convolution_matches_the_direct_sum(Nhwc { b: 3, h: 37, w: 41, c: 128 }, 24);
    assert_eq!(winograd::block_side(7, 6, 16, 40), 4);
    convolution_matches_the_direct_sum(Nhwc { b: 2, h: 7, w: 6, c: 16 }, 40);
    assert_eq!(winograd::block_side(2, 6, 16, 16), 2);
    convolution_matches_the_direct_sum(Nhwc { b: 1, h: 2, w: 6, c: 16 }, 16);
    assert_eq!(winograd::block_side(5, 5, 24, 16), 2);
    convolution_matches_the_direct_sum(Nhwc { b: 3, h: 5, w: 5, c: 24 }, 16);
    assert_eq!(winograd::block_side(56, 56, 2048, 512), 2, "a transformed kernel too large for F(4x4)");
}

/// Winograd's weight gradient (the one the candle ops take under bf16) equals the direct sum in
/// f64 with F(4x4) and F(2x2): tiles past the right and bottom edges, several chunks of tile
/// rows (one splitting an image) summed into the same GEMM outputs. In f32 it stays within
/// 1e-5 of the exact sum, over 10x closer than the direct sum over bf16-rounded inputs.
#[test]
fn winograd_weight_gradients_match_the_direct_sum() {
    let passes = |s: Nhwc, c_out: usize| {
        let x = values(&random_tensor(&[s.len()], 1, DType::F64));
        let w = values(&random_tensor(&[c_out * s.c * 9], 2, DType::F64));
        let dy = values(&random_tensor(&[s.pixels() * c_out], 4, DType::F64));
        (direct_sums(s, c_out, &x, &w, &vec![0.0; c_out], &dy).1, x, dy)
    };
    let winograd_sum = |s: Nhwc, c_out: usize, x: &[f64], dy: &[f64], f32: bool| {
        let mut packed = vec![0.0; c_out * 9 * s.c];
        if f32 {
            let t = |v: &[f64]| v.iter().map(|&v| v as f32).collect::<Vec<f32>>();
            let mut dw = vec![0f32; packed.len()];
            winograd::weight_gradient(&t(x), s, true, &t(dy), c_out, &mut dw, &mut Vec::new());
            packed = dw.iter().map(|&v| v as f64).collect();
        } else {
            winograd::weight_gradient(x, s, true, dy, c_out, &mut packed, &mut Vec::new());
        }
        let mut dw = vec![0.0; packed.len()];
        conv::unpack_add(&packed, s.c, 3, &mut dw);
        dw
    };
    for (s, c_out, block) in [
        (Nhwc { b: 3, h: 37, w: 41, c: 128 }, 24, 4),
        (Nhwc { b: 2, h: 62, w: 63, c: 240 }, 16, 4),
        (Nhwc { b: 2, h: 7, w: 6, c: 16 }, 40, 4),
        (Nhwc { b: 1, h: 2, w: 6, c: 16 }, 16, 2),
        (Nhwc { b: 3, h: 5, w: 5, c: 24 }, 16, 2),
    ] {
        assert!(winograd::applies(3, s.c, c_out));
        assert_eq!(winograd::block_side(s.h, s.w, s.c, c_out), block);
        let (exact, x, dy) = passes(s, c_out);
        let ours = winograd_sum(s, c_out, &x, &dy, false);
        assert!(rel_err(&ours, &exact) < 1e-12, "{s:?} -> {c_out}: {:e}", rel_err(&ours, &exact));
    }
    let round = |v: &[f64]| v.iter().map(|&v| bf16_value(bf16_bits(v as f32)) as f64).collect::<Vec<f64>>();
    let s = Nhwc { b: 2, h: 28, w: 28, c: 128 };
    let (exact, x, dy) = passes(s, 64);
    let ours = rel_rms(&winograd_sum(s, 64, &x, &dy, true), &exact);
    let w = vec![0.0; 64 * s.c * 9];
    let bf16 = rel_rms(&direct_sums(s, 64, &round(&x), &w, &vec![0.0; 64], &round(&dy)).1, &exact);
    println!("weight gradient off the exact sum: Winograd F(4x4) in f32 {ours:.2e}, bf16 inputs {bf16:.2e}");
    assert!(ours < 1e-5 && ours * 10.0 < bf16, "Winograd in f32 {ours:e} off, bf16 inputs {bf16:e}");
}

/// Convolutions into 16 channels or fewer, summed directly (the forward, and the input
/// gradient of a convolution from so few channels), equal one direct evaluation: rows whose
/// width is not a multiple of the 8 pixels summed together, one input or output channel.
#[test]
fn narrow_convolutions_match_the_direct_sum() {
    assert!(direct::applies(3, 8) && direct::applies(3, 16) && !direct::applies(3, 17) && !direct::applies(1, 8));
    assert!(!winograd::applies(3, 32, 8) && !winograd::applies(3, 16, 1));
    convolution_matches_the_direct_sum(Nhwc { b: 2, h: 9, w: 13, c: 32 }, 8);
    convolution_matches_the_direct_sum(Nhwc { b: 2, h: 7, w: 5, c: 8 }, 8);
    convolution_matches_the_direct_sum(Nhwc { b: 1, h: 4, w: 17, c: 1 }, 16);
    convolution_matches_the_direct_sum(Nhwc { b: 3, h: 3, w: 3, c: 5 }, 1);
}

/// Weight gradients summed over bands of image rows (an image too large for one band) and
/// in one group (a weight gradient too large to copy per group) equal one direct evaluation.
#[test]
fn banded_weight_gradients_match_the_direct_sum() {
    convolution_matches_the_direct_sum(Nhwc { b: 1, h: 62, w: 63, c: 240 }, 16);
    convolution_matches_the_direct_sum(Nhwc { b: 2, h: 3, w: 5, c: 700 }, 700);
}

/// Max pooling that records each window's argmax (what a training pass keeps instead of the
/// pooled input) pools the same values and routes the same gradients as the backward pass that
/// compares the input with the output, ties included (the first maximum, row-major).
#[test]
fn max_pooling_by_recorded_argmax_matches_the_comparing_backward() {
    let s = Nhwc { b: 2, h: 6, w: 4, c: 3 };
    // Values from a small set, so many windows hold ties (of zeros, of negatives, of maxima).
    let x: Vec<f32> = (0..s.len()).map(|i| ((i * 7919 % 13) as f32 - 6.0).clamp(-2.0, 2.0)).collect();
    let n = s.len() / 4;
    let (mut y, mut want) = (vec![0.0; n], vec![0.0; n]);
    let mut argmax = vec![9u8; n];
    conv::max_pool2_argmax(&x, s, &mut y, &mut argmax);
    conv::max_pool2(&x, s, &mut want);
    assert_eq!(y, want);
    assert!(argmax.iter().all(|&k| k < 4));
    // Windows whose maximum occurs twice or more, and windows whose maximum is not the first.
    let (oh, ow) = (s.h / 2, s.w / 2);
    let window = |o: usize| {
        let (ch, ox, oy, b) = (o % s.c, o / s.c % ow, o / s.c / ow % oh, o / s.c / ow / oh);
        [(0, 0), (0, 1), (1, 0), (1, 1)].map(|(dy, dx)| x[((b * s.h + 2 * oy + dy) * s.w + 2 * ox + dx) * s.c + ch])
    };
    let ties = (0..n).filter(|&o| window(o).iter().filter(|&&v| v == y[o]).count() > 1).count();
    assert!(ties > 0 && argmax.iter().any(|&k| k > 0), "{ties} windows with ties");
    let dy: Vec<f32> = (0..n).map(|i| i as f32 + 1.0).collect();
    let (mut dx, mut dx_want) = (vec![f32::NAN; s.len()], vec![f32::NAN; s.len()]);
    conv::max_pool2_backward_at(&argmax, s, &dy, &mut dx);
    conv::max_pool2_backward(&x, s, &y, &dy, &mut dx_want);
    assert_eq!(dx, dx_want);
}

#[test]
fn packed_and_flipped_kernels_hold_each_tap_where_the_gemm_reads_it() {
    // Channel counts on both sides of the pack's 16-channel blocks, and a single block.
    for (c_out, c_in, k) in [(35, 19, 3), (16, 33, 1), (3, 5, 7), (40, 64, 3)] {
        let kk = k * k;
        let w: Vec<f32> = (0..c_out * c_in * kk).map(|i| i as f32).collect();
        let (mut packed, mut flipped) = (vec![f32::NAN; w.len()], vec![f32::NAN; w.len()]);
        conv::pack(&w, c_out, c_in, k, &mut packed);
        conv::flip(&w, c_out, c_in, k, &mut flipped);
        for o in 0..c_out {
            for i in 0..c_in {
                for j in 0..kk {
                    let want = w[(o * c_in + i) * kk + j];
                    assert_eq!(
                        packed[(j * c_in + i) * c_out + o],
                        want,
                        "pack {c_out}x{c_in}x{k}: o {o}, i {i}, tap {j}"
                    );
                    // The flipped kernel maps c_out -> c_in with the window reversed.
                    let flipped = flipped[((kk - 1 - j) * c_out + o) * c_in + i];
                    assert_eq!(flipped, want, "flip {c_out}x{c_in}x{k}: o {o}, i {i}, tap {j}");
                }
            }
        }
    }
}

/// Encode and decode run each group over as many images as a budget of buffer values allows,
/// in stages: every budget gives the codes and images of one pass over the whole batch.
#[test]
fn staged_evaluation_matches_one_pass_over_the_batch() {
    for precision in [Precision::F32, Precision::Bf16] {
        let cfg = DvaeConfig { blocks_per_group: 2, ..small_dvae_config(16) };
        let (_, vars) = dvae_model(&cfg, 4, DType::F32);
        randomise(&vars, 30, 0.4);
        let [h, w] = cfg.image_size;
        let (b, d) = (5, cfg.downsample());
        let pixels: Vec<f32> = unit_pixels(b * cfg.num_channels * h * w, 9);
        let mut eng = dvae_engine_at::<f32>(&cfg, &vars, precision);
        eng.limit_evaluation_to(usize::MAX);
        let ids = eng.encode(None, &pixels, h, w).unwrap();
        let images = eng.decode(None, &ids, h / d, w / d).unwrap();
        let grid = ids.len() / b;
        assert!(ids.chunks(grid).any(|g| g != &ids[..grid]), "{precision:?}: every image has the same codes");
        // From one image per chunk everywhere, through stages of different chunks, to all.
        let mut distinct = std::collections::HashSet::new();
        for budget in (0..16).map(|e| 1usize << (e + 4)) {
            eng.limit_evaluation_to(budget);
            let staged = eng.encode(None, &pixels, h, w).unwrap();
            assert_eq!(staged, ids, "{precision:?}, {budget} values: codes");
            let decoded = eng.decode(None, &ids, h / d, w / d).unwrap();
            let differ = decoded.iter().zip(&images).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(differ, 0, "{precision:?}, {budget} values: {differ} pixel values differ");
            distinct.insert(eng.evaluation_stages());
        }
        assert!(distinct.len() >= 4, "{precision:?}: the budgets made only {distinct:?}");
    }
}

fn convolution_matches_the_direct_sum(s: Nhwc, c_out: usize) {
    let k = 3;
    let x = values(&random_tensor(&[s.len()], 1, DType::F64));
    let w = values(&random_tensor(&[c_out * s.c * k * k], 2, DType::F64));
    let bias = values(&random_tensor(&[c_out], 3, DType::F64));
    let dy = values(&random_tensor(&[s.pixels() * c_out], 4, DType::F64));
    let (y, dw, dx, db) = engine_passes::<f64>(Precision::F32, s, c_out, &x, &w, &bias, &dy);
    let (y_ref, dw_ref, dx_ref) = direct_sums(s, c_out, &x, &w, &bias, &dy);
    assert!(rel_err(&y, &y_ref) < 1e-12, "forward");
    assert!(rel_err(&dw, &dw_ref) < 1e-12, "weight gradient");
    assert!(rel_err(&dx, &dx_ref) < 1e-12, "input gradient");
    let db_ref: Vec<f64> = (0..c_out).map(|o| (0..s.pixels()).map(|p| dy[p * c_out + o]).sum()).collect();
    assert!(rel_err(&db, &db_ref) < 1e-12, "bias gradient");
}

/// The engine's forward, weight gradient (checkpoint layout), input gradient and bias gradient
/// of a 3x3 convolution of ReLU(x), in T at `precision`.
fn engine_passes<T: Real>(
    precision: Precision,
    s: Nhwc,
    c_out: usize,
    x: &[f64],
    w: &[f64],
    bias: &[f64],
    dy: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let k = 3;
    let t = |v: &[f64]| v.iter().map(|&v| T::from_f64(v)).collect::<Vec<T>>();
    let f = |v: &[T]| v.iter().map(|v| v.to_f64()).collect::<Vec<f64>>();
    let (x, w, bias, dy) = (t(x), t(w), t(bias), t(dy));
    let mut packed = vec![T::ZERO; w.len()];
    conv::pack(&w, c_out, s.c, k, &mut packed);
    let mut y = vec![T::ZERO; s.pixels() * c_out];
    let mut cols = Vec::new();
    conv::forward(precision, &x, s, true, k, &packed, &bias, &mut y, &mut cols);
    assert!(s.pixels() < 1000 || cols.len() < s.pixels() * k * k * s.c, "the columns should be tiled");
    let mut dw = vec![T::ZERO; w.len()];
    let mut db = vec![T::ZERO; c_out];
    conv::backward_params(precision, &x, s, true, k, &dy, &mut dw, &mut db, &mut cols, &mut Vec::new());
    let mut dw_ckpt = vec![T::ZERO; w.len()];
    conv::unpack_add(&dw, s.c, k, &mut dw_ckpt);
    let mut flipped = vec![T::ZERO; w.len()];
    conv::flip(&w, c_out, s.c, k, &mut flipped);
    let mut dx = vec![T::ZERO; s.len()];
    conv::backward_input(precision, &x, s, true, k, &flipped, c_out, &dy, &mut dx, &mut cols);
    (f(&y), f(&dw_ckpt), f(&dx), f(&db))
}

/// The forward, weight gradient and input gradient of a 3x3 convolution of ReLU(x), summed
/// directly in f64.
fn direct_sums(
    s: Nhwc,
    c_out: usize,
    x: &[f64],
    w: &[f64],
    bias: &[f64],
    dy: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let k = 3;
    let at = |b: usize, y: isize, xx: isize, c: usize| {
        if y < 0 || xx < 0 || y >= s.h as isize || xx >= s.w as isize {
            0.0
        } else {
            x[((b * s.h + y as usize) * s.w + xx as usize) * s.c + c].max(0.0)
        }
    };
    let (mut y, mut dx, mut dw) = (vec![0.0; s.pixels() * c_out], vec![0.0; s.len()], vec![0.0; w.len()]);
    for b in 0..s.b {
        for yy in 0..s.h {
            for xx in 0..s.w {
                let p = (b * s.h + yy) * s.w + xx;
                for o in 0..c_out {
                    let mut acc = bias[o];
                    for i in 0..s.c {
                        for ky in 0..k {
                            for kx in 0..k {
                                let (sy, sx) = (yy as isize + ky as isize - 1, xx as isize + kx as isize - 1);
                                let wi = ((o * s.c + i) * k + ky) * k + kx;
                                acc += w[wi] * at(b, sy, sx, i);
                                dw[wi] += dy[p * c_out + o] * at(b, sy, sx, i);
                                if sy >= 0 && sx >= 0 && sy < s.h as isize && sx < s.w as isize {
                                    let q = ((b * s.h + sy as usize) * s.w + sx as usize) * s.c + i;
                                    if x[q] >= 0.0 {
                                        dx[q] += dy[p * c_out + o] * w[wi];
                                    }
                                }
                            }
                        }
                    }
                    y[p * c_out + o] = acc;
                }
            }
        }
    }
    (y, dw, dx)
}

/// Relative RMS difference of `a` from `b`.
fn rel_rms(a: &[f64], b: &[f64]) -> f64 {
    let square = |v: f64| v * v;
    (a.iter().zip(b).map(|(x, y)| square(x - y)).sum::<f64>() / b.iter().map(|&y| square(y)).sum::<f64>()).sqrt()
}

/// bf16 convolutions (f32 buffers): the direct sums (the weight gradient, and im2col's forward
/// and input gradient) equal the exact sums over the bf16-rounded inputs up to f32 summation;
/// Winograd's passes, and im2col GEMMs too thin for the bf16 kernel, keep f32 GEMMs, so they
/// equal the exact sums over the unrounded inputs.
#[test]
fn bf16_convolutions_match_the_direct_sum_of_rounded_inputs() {
    let round = |v: &[f64]| v.iter().map(|&v| bf16_value(bf16_bits(v as f32)) as f64).collect::<Vec<f64>>();
    // Winograd both ways (16 and 24 channels); im2col (8 channels: too thin for Winograd, and
    // the 8 input channels for the shifted weight gradient) in bf16 forward (8 -> 16) and
    // backward (16 -> 8), and in f32 both ways (8 -> 6: too thin for the bf16 kernel).
    let shape = |c| Nhwc { b: 2, h: 9, w: 11, c };
    for (s, c_out) in [(shape(24), 16), (shape(8), 16), (shape(16), 8), (shape(8), 6)] {
        let k = 3;
        let x = values(&random_tensor(&[s.len()], 1, DType::F64));
        let w = values(&random_tensor(&[c_out * s.c * k * k], 2, DType::F64));
        let bias = values(&random_tensor(&[c_out], 3, DType::F64));
        let dy = values(&random_tensor(&[s.pixels() * c_out], 4, DType::F64));
        let (y, dw, dx, _) = engine_passes::<f32>(Precision::Bf16, s, c_out, &x, &w, &bias, &dy);
        let exact = direct_sums(s, c_out, &x, &w, &bias, &dy);
        let rounded = direct_sums(s, c_out, &round(&x), &round(&w), &bias, &round(&dy));
        let context = format!("{s:?} -> {c_out}");
        assert!(rel_err(&dw, &rounded.1) < 1e-5, "{context}: weight gradient");
        let winograd = winograd::applies(k, s.c, c_out);
        for (name, ours, exact, rounded, columns, depth) in [
            ("forward", &y, &exact.0, &rounded.0, c_out, k * k * s.c),
            ("input gradient", &dx, &exact.2, &rounded.2, s.c, k * k * c_out),
        ] {
            let (ours_off, rounding) = (rel_rms(ours, exact), rel_rms(rounded, exact));
            println!("{context} {name}: {ours_off:.2e} from the exact result, rounded inputs {rounding:.2e}");
            assert!(rounding > 1e-4, "{context}: the inputs should round");
            if winograd || conv::gemm_precision(Precision::Bf16, columns, depth) == Precision::F32 {
                assert!(ours_off < 1e-5, "{context}: {name} {ours_off:e} off, rounding alone {rounding:e}");
            } else {
                assert!(rel_err(ours, rounded) < 1e-5, "{context}: {name}");
            }
        }
    }
}

/// A bf16 training pass that keeps its activations in bf16 (half their memory) computes the
/// same loss, codes and gradients, bit for bit, as one that keeps them in f32: its backward
/// pass reads them only as GEMM inputs that it rounds to bf16 anyway, and for ReLU's sign.
#[test]
fn bf16_training_keeps_activations_in_bf16_with_the_same_results() {
    for cfg in [small_dvae_config(16), DvaeConfig { hidden_size: 32, blocks_per_group: 2, ..small_dvae_config(16) }] {
        let (_, vars) = dvae_model(&cfg, 4, DType::F32);
        randomise(&vars, 30, 0.05);
        let [h, w] = cfg.image_size;
        let pixels: Vec<f32> = unit_pixels(3 * cfg.num_channels * h * w, 9);
        let objective = Objective { temperature: 0.7, kl_weight: 0.3, recon: ReconLoss::LogitLaplace };
        let pass = |eng: &mut DvaeEngine<f32>| {
            let mut codes = Vec::new();
            let draws = Draws { seed: 21, first_sample: 0 };
            eng.flat.grads.fill(0.0);
            let loss = eng.loss_and_grads(&pixels, h, w, &objective, draws, 1.0, &mut codes).unwrap();
            (loss.loss, codes, eng.flat.grads.clone(), eng.keeps_bf16_activations())
        };
        let run = |precision, kept_from| {
            let mut eng = dvae_engine_at::<f32>(&cfg, &vars, precision);
            eng.keep_bf16_activations_from(kept_from);
            pass(&mut eng)
        };
        let (kept_bf16, kept_f32, f32) =
            (run(Precision::Bf16, 0), run(Precision::Bf16, usize::MAX), run(Precision::F32, 0));
        assert!(kept_bf16.3 && !kept_f32.3 && !f32.3, "{cfg:?}: which passes keep bf16");
        // Switched to f32 after a pass that kept bf16 activations: the next pass is f32's.
        let mut switched = dvae_engine_at::<f32>(&cfg, &vars, Precision::Bf16);
        switched.keep_bf16_activations_from(0);
        pass(&mut switched);
        switched.set_precision(Precision::F32);
        let after = pass(&mut switched);
        assert!(!after.3, "{cfg:?}: an f32 pass kept bf16 activations");
        assert_eq!((after.0.to_bits(), &after.1), (f32.0.to_bits(), &f32.1), "{cfg:?}: f32 loss and codes");
        assert!(after.2 == f32.2, "{cfg:?}: f32 gradients after a switch differ from a fresh f32 engine's");
        assert_eq!(kept_bf16.0.to_bits(), kept_f32.0.to_bits(), "{cfg:?}: loss");
        assert_eq!(kept_bf16.1, kept_f32.1, "{cfg:?}: codes");
        let differ = kept_bf16.2.iter().zip(&kept_f32.2).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differ, 0, "{cfg:?}: {differ} gradient values differ");
        // ... and bf16 is not f32: the GEMMs did round.
        assert!(kept_f32.2 != f32.2, "{cfg:?}: bf16 gradients equal f32's");
    }
}

/// f32 tokenizer training on the engine follows candle's autograd step for step (losses,
/// gradient norms, and the codes of the EMA that encode reads).
#[test]
fn tokenizer_training_on_the_engine_tracks_candle_autograd() {
    use beit_core::{DvaeTrainer, DvaeTrainingOptions, ImageBatch};
    let cfg = small_dvae_config(16);
    let training = DvaeTrainingOptions { ema_decay: 0.9, ..DvaeTrainingOptions::default() };
    let pixels: Vec<f32> = unit_pixels(4 * 3 * 256, 9);
    let batch = ImageBatch { pixels: &pixels, height: 16, width: 16 };
    let mut engine = DvaeTrainer::new(cfg.clone(), training.clone(), 4).unwrap();
    let mut candle = DvaeTrainer::new(cfg, training, 4).unwrap();
    candle.set_cpu_engine(false).unwrap();
    for step in 0..10 {
        let (e, c) = (
            engine.train_step(&batch, 0.8, 0.5, 3e-3, step).unwrap(),
            candle.train_step(&batch, 0.8, 0.5, 3e-3, step).unwrap(),
        );
        assert!((e.loss - c.loss).abs() < 1e-4 * c.loss.abs(), "step {step}: loss {} vs candle {}", e.loss, c.loss);
        assert!(
            (e.grad_norm - c.grad_norm).abs() < 1e-3 * c.grad_norm,
            "step {step}: gradient norm {} vs {}",
            e.grad_norm,
            c.grad_norm
        );
    }
    let (ids_e, ids_c) = (engine.encode(&batch).unwrap(), candle.encode(&batch).unwrap());
    let agree = ids_e.iter().zip(&ids_c).filter(|(a, b)| a == b).count();
    assert!(agree * 10 >= ids_e.len() * 9, "EMA codes agree at {agree}/{}", ids_e.len());
}

/// A uniform draw within 2^-25 of 1 rounds to 1.0 in f32: its noise, -ln(-ln u), must stay at
/// its true size (about 17.7 for draw 1,869,153 of seed 0) and not become -ln(-0.0) = +88.
#[test]
fn gumbel_noise_of_a_draw_next_to_one_stays_finite_and_near_its_value() {
    let at = |offset| gumbel_noise(&[1], 0, offset, &Device::Cpu).unwrap().to_vec1::<f32>().unwrap()[0];
    let noise = at(1_869_153);
    assert!((15.0..18.5).contains(&noise), "noise {noise}");
    // Its neighbours are ordinary draws.
    assert!(at(1_869_152) < 10.0 && at(1_869_154) < 10.0);
}
