//! The dVAE tokenizer: conv ops against candle's reference conv, gradient checks, and
//! training / encode / decode / checkpoint behaviour.
mod common;

use beit_core::arch::dvae::DvaeParams;
use beit_core::config::Precision;
use beit_core::conv::{conv2d_same, conv2d_same_by_columns, in_batch_chunks, max_pool2, upsample2};
use beit_core::model::dvae::map_pixels;
use beit_core::ops::softmax_last_dim;
use beit_core::tokenizer::{kl_to_uniform, reconstruction_loss};
use beit_core::DvaeConfig;
use beit_core::{DvaeTrainer, DvaeTrainingOptions, ImageBatch, ReconLoss};
use candle_core::{DType, Device, Tensor, Var};
use common::*;

const TOL: f64 = 1e-6;

fn tiny_dvae() -> DvaeConfig {
    DvaeConfig {
        image_size: [8, 8],
        num_channels: 2,
        hidden_size: 8,
        num_groups: 2,
        blocks_per_group: 1,
        vocab_size: 5,
        decoder_input_size: 4,
    }
}

fn check_vars(vars: &[(String, Var)], objective: &dyn Fn() -> Tensor, coords: usize) {
    let grads = objective().backward().unwrap();
    let f = || objective().to_scalar::<f64>().unwrap();
    for (name, var) in vars {
        let g = grads.get(var).unwrap_or_else(|| panic!("{name} got no gradient"));
        let err = grad_check(var, g, &f, coords);
        assert!(err < TOL, "{name}: relative gradient error {err:e}");
    }
}

#[test]
fn conv2d_same_matches_candle_conv2d() {
    for k in [1, 3, 7] {
        let x = random_tensor(&[2, 9, 8, 3], 1, DType::F64);
        let w = random_tensor(&[4, 3, k, k], 2, DType::F64);
        let b = random_tensor(&[4], 3, DType::F64);
        let ours = conv2d_same(&x, &w, &b, Precision::F32).unwrap();
        let reference = x
            .permute((0, 3, 1, 2))
            .unwrap()
            .conv2d(&w, (k - 1) / 2, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap())
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap();
        // The engine's CPU path and the GPU's formulation (im2col + one GEMM), here on the CPU.
        for (path, y) in [("engine", ours), ("by columns", conv2d_same_by_columns(&x, &w, &b).unwrap())] {
            let d = (y - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(d < 1e-12, "{path}, k={k}: max difference {d}");
        }
    }
}

/// The GPU's convolution (im2col, matmul, bias) by finite differences, for 1x1, 3x3 and a 5x5
/// kernel wider than half the image: the columns' backward sums every tap back to its pixel.
#[test]
fn convolution_by_columns_gradients() {
    for k in [1, 3, 5] {
        let x = Var::from_tensor(&random_tensor(&[2, 4, 3, 3], 41, DType::F64)).unwrap();
        let w = Var::from_tensor(&random_tensor(&[2, 3, k, k], 42, DType::F64)).unwrap();
        let b = Var::from_tensor(&random_tensor(&[2], 43, DType::F64)).unwrap();
        let probe = random_tensor(&[2, 4, 3, 2], 44, DType::F64);
        let objective = || {
            let y = conv2d_same_by_columns(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
            y.mul(&probe).unwrap().sum_all().unwrap()
        };
        check_vars(&[("x".into(), x.clone()), ("w".into(), w.clone()), ("b".into(), b.clone())], &objective, 64);
    }
}

/// The CPU path runs the engine's tiled im2col GEMMs (8 MB tiles: at 40x40x128 three tiles over
/// a batch of three, the last uneven, crossing images); values and gradients equal candle's own
/// convolution's.
#[test]
fn cpu_convolution_tiles_agree_with_candle_values_and_gradients() {
    let x = Var::from_tensor(&random_tensor(&[3, 40, 40, 128], 31, DType::F32)).unwrap();
    let w = Var::from_tensor(&random_tensor(&[8, 128, 3, 3], 32, DType::F32)).unwrap();
    let b = Var::from_tensor(&random_tensor(&[8], 33, DType::F32)).unwrap();
    let probe = random_tensor(&[3, 40, 40, 8], 34, DType::F32);
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let run = |ours: bool| {
        let y = if ours {
            conv2d_same(x.as_tensor(), w.as_tensor(), b.as_tensor(), Precision::F32).unwrap()
        } else {
            let nchw = x.as_tensor().permute((0, 3, 1, 2)).unwrap();
            let y = nchw.conv2d(w.as_tensor(), 1, 1, 1, 1).unwrap().permute((0, 2, 3, 1)).unwrap();
            y.broadcast_add(b.as_tensor()).unwrap()
        };
        let grads = y.mul(&probe).unwrap().sum_all().unwrap().backward().unwrap();
        [values(&y), values(grads.get(&x).unwrap()), values(grads.get(&w).unwrap()), values(grads.get(&b).unwrap())]
    };
    let (ours, reference) = (run(true), run(false));
    for (name, (a, r)) in ["y", "dx", "dw", "db"].iter().zip(ours.iter().zip(&reference)) {
        let scale = r.iter().fold(1f32, |m, v| m.max(v.abs()));
        let d = a.iter().zip(r).fold(0f32, |m, (a, r)| m.max((a - r).abs()));
        assert!(d / scale < 1e-5, "{name}: max difference {d} (scale {scale})");
    }
}

/// The GPU path splits large batches (its column matrix stays under 2^31 elements): chunked and
/// whole convolutions agree, values and gradients, with an uneven last chunk.
#[test]
fn convolution_in_batch_chunks_equals_the_whole_batch() {
    let x = Var::from_tensor(&random_tensor(&[5, 6, 6, 3], 21, DType::F64)).unwrap();
    let w = Var::from_tensor(&random_tensor(&[4, 3, 3, 3], 22, DType::F64)).unwrap();
    let b = Var::from_tensor(&random_tensor(&[4], 23, DType::F64)).unwrap();
    let probe = random_tensor(&[5, 6, 6, 4], 24, DType::F64);
    let run = |per_chunk: usize| {
        let y =
            in_batch_chunks(x.as_tensor(), per_chunk, |x| conv2d_same(x, w.as_tensor(), b.as_tensor(), Precision::F32))
                .unwrap();
        let grads = y.mul(&probe).unwrap().sum_all().unwrap().backward().unwrap();
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let grad = |v: &Var| values(grads.get(v).unwrap());
        (values(&y), grad(&x), grad(&w), grad(&b))
    };
    let whole = run(5);
    for per_chunk in [1, 2, 4] {
        let chunked = run(per_chunk);
        for (name, a, b) in [
            ("output", &chunked.0, &whole.0),
            ("dx", &chunked.1, &whole.1),
            ("dw", &chunked.2, &whole.2),
            ("db", &chunked.3, &whole.3),
        ] {
            let d = a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max);
            assert!(d < 1e-12, "chunks of {per_chunk}: {name} differs by {d}");
        }
    }
}

#[test]
fn pooling_and_upsampling_values() {
    let x = Tensor::arange(0f64, 16.0, &Device::Cpu).unwrap().reshape((1, 4, 4, 1)).unwrap();
    let p = max_pool2(&x).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(p, vec![5.0, 7.0, 13.0, 15.0]);
    let u =
        upsample2(&Tensor::new(&[1f64, 2.0, 3.0, 4.0], &Device::Cpu).unwrap().reshape((1, 2, 2, 1)).unwrap()).unwrap();
    assert_eq!(
        u.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        vec![1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 3.0, 3.0, 4.0, 4.0]
    );
}

#[test]
fn conv_pool_upsample_gradients() {
    let x = Var::from_tensor(&random_tensor(&[2, 4, 6, 3], 4, DType::F64)).unwrap();
    let w = Var::from_tensor(&random_tensor(&[5, 3, 3, 3], 5, DType::F64)).unwrap();
    let b = Var::from_tensor(&random_tensor(&[5], 6, DType::F64)).unwrap();
    let probe = random_tensor(&[2, 4, 6, 5], 7, DType::F64);
    let objective = || {
        // conv -> pool -> upsample keeps the shape, so one probe covers all three ops.
        let y = conv2d_same(x.as_tensor(), w.as_tensor(), b.as_tensor(), Precision::F32).unwrap();
        upsample2(&max_pool2(&y).unwrap()).unwrap().mul(&probe).unwrap().sum_all().unwrap()
    };
    check_vars(&[("x".into(), x.clone()), ("w".into(), w.clone()), ("b".into(), b.clone())], &objective, 64);
}

/// The whole tokenizer objective (encoder, Gumbel-softmax relaxation with fixed noise, decoder,
/// logit-Laplace or MSE reconstruction, KL) for every parameter, in f64.
#[test]
fn whole_dvae_objective_gradients() {
    for kind in [ReconLoss::LogitLaplace, ReconLoss::Mse] {
        let cfg = tiny_dvae();
        let (dvae, vars) = dvae_model(&cfg, 3, DType::F64);
        randomise(&vars, 80, 0.5);
        let x = map_pixels(&random_tensor(&[2, 4, 4, 2], 8, DType::F64).affine(0.2, 0.5).unwrap()).unwrap();
        let noise = random_tensor(&[2, 2, 2, 5], 9, DType::F64);
        let objective = || {
            let logits = dvae.encoder.forward(&x).unwrap();
            let soft = softmax_last_dim(&((&logits + &noise).unwrap() / 0.7).unwrap()).unwrap();
            let out = dvae.decoder.forward(&soft).unwrap();
            let recon = reconstruction_loss(&out, &x, kind).unwrap();
            (recon + (kl_to_uniform(&logits).unwrap() * 0.3).unwrap()).unwrap()
        };
        check_vars(&vars, &objective, 6);
    }
}

#[test]
fn kl_to_uniform_is_zero_for_flat_logits_and_log_v_for_one_hot() {
    let flat = Tensor::zeros((3, 8), DType::F64, &Device::Cpu).unwrap();
    assert!(kl_to_uniform(&flat).unwrap().to_scalar::<f64>().unwrap().abs() < 1e-12);
    let peaked = Tensor::new(&[[100f64, 0.0, 0.0, 0.0]], &Device::Cpu).unwrap();
    let kl = kl_to_uniform(&peaked).unwrap().to_scalar::<f64>().unwrap();
    assert!((kl - 4f64.ln()).abs() < 1e-9, "{kl}");
}

#[test]
fn dall_e_preset_has_the_dall_e_layout() {
    let cfg = beit_core::presets::dvae("dall-e").unwrap();
    assert_eq!(cfg.downsample(), 8, "112 px -> 14x14 tokens");
    let (table, _) = DvaeParams::new(&cfg);
    let shape = |name: &str| table.get(table.find(name).unwrap_or_else(|| panic!("{name}"))).shape.clone();
    assert_eq!(shape("encoder.blocks.input.w"), vec![256, 3, 7, 7]);
    assert_eq!(shape("encoder.blocks.group_4.block_1.id_path.w"), vec![2048, 1024, 1, 1]);
    assert_eq!(shape("encoder.blocks.group_4.block_2.res_path.conv_4.w"), vec![2048, 512, 1, 1]);
    assert_eq!(shape("encoder.blocks.output.conv.w"), vec![8192, 2048, 1, 1]);
    assert_eq!(shape("decoder.blocks.input.w"), vec![128, 8192, 1, 1]);
    assert_eq!(shape("decoder.blocks.group_1.block_1.res_path.conv_4.w"), vec![2048, 512, 3, 3]);
    assert_eq!(shape("decoder.blocks.output.conv.w"), vec![6, 256, 1, 1]);
    assert!(
        table.params().iter().all(|p| !p.name.starts_with("encoder.blocks.group_1.block_1.id_path")),
        "no id path where widths agree"
    );
}

/// Simple structured images: a bright square at one of four places on a dark background.
fn squares(batch: usize, channels: usize, size: usize) -> Vec<f32> {
    let mut v = vec![0.1f32; batch * channels * size * size];
    for b in 0..batch {
        let (oy, ox) = [(0, 0), (0, size / 2), (size / 2, 0), (size / 2, size / 2)][b % 4];
        for c in 0..channels {
            for y in oy..oy + size / 2 {
                for x in ox..ox + size / 2 {
                    v[((b * channels + c) * size + y) * size + x] = 0.9;
                }
            }
        }
    }
    v
}

fn tiny_training() -> DvaeTrainingOptions {
    DvaeTrainingOptions { ema_decay: 0.0, ..DvaeTrainingOptions::default() }
}

#[test]
fn training_learns_to_reconstruct_and_encode_is_deterministic() {
    let cfg = DvaeConfig {
        image_size: [8, 8],
        num_channels: 1,
        hidden_size: 16,
        num_groups: 2,
        blocks_per_group: 1,
        vocab_size: 16,
        decoder_input_size: 16,
    };
    let mut t = DvaeTrainer::new(cfg, tiny_training(), 1).unwrap();
    let pixels = squares(8, 1, 8);
    let batch = ImageBatch { pixels: &pixels, height: 8, width: 8 };
    let first = t.train_step(&batch, 1.0, 0.0, 3e-3, 0).unwrap();
    let mut last = first;
    for s in 1..150 {
        last = t.train_step(&batch, 1.0, 0.0, 3e-3, s).unwrap();
    }
    assert!(last.recon_loss < first.recon_loss - 1.0, "recon {} -> {}", first.recon_loss, last.recon_loss);
    let ids = t.encode(&batch).unwrap();
    assert_eq!(ids.len(), 8 * 4 * 4);
    assert_eq!(ids, t.encode(&batch).unwrap(), "encode is deterministic");
    assert!(ids.iter().all(|&i| (0..16).contains(&i)));
    let recon = t.decode(&ids, 4, 4).unwrap();
    let mse = recon.iter().zip(&pixels).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / pixels.len() as f32;
    let mean = pixels.iter().sum::<f32>() / pixels.len() as f32;
    let baseline = pixels.iter().map(|p| (p - mean).powi(2)).sum::<f32>() / pixels.len() as f32;
    assert!(mse < 0.25 * baseline, "decode(encode(x)) mse {mse} vs mean-image baseline {baseline}");
}

#[test]
fn save_load_round_trips_exactly_with_ema() {
    let dir = std::env::temp_dir().join(format!("beit-dvae-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = tiny_dvae();
    let mut a =
        DvaeTrainer::new(cfg.clone(), DvaeTrainingOptions { ema_decay: 0.9, ..DvaeTrainingOptions::default() }, 2)
            .unwrap();
    let pixels = squares(4, 2, 8);
    let batch = ImageBatch { pixels: &pixels, height: 8, width: 8 };
    for s in 0..3 {
        a.train_step(&batch, 0.5, 0.1, 1e-3, s).unwrap();
    }
    let path = dir.join("tok.safetensors");
    a.save(&path).unwrap();
    let mut b = DvaeTrainer::load(&path, None).unwrap();
    assert_eq!(b.config, cfg);
    assert_eq!(b.optimizer_step(), 3);
    assert_eq!(a.encode(&batch).unwrap(), b.encode(&batch).unwrap());
    assert_eq!(a.decode(&[0, 1, 2, 3, 4, 0, 1, 2], 2, 2).unwrap(), b.decode(&[0, 1, 2, 3, 4, 0, 1, 2], 2, 2).unwrap());
    let (ma, mb) = (a.train_step(&batch, 0.5, 0.1, 1e-3, 9).unwrap(), b.train_step(&batch, 0.5, 0.1, 1e-3, 9).unwrap());
    assert_eq!(ma.loss, mb.loss);
    assert_eq!(a.encode(&batch).unwrap(), b.encode(&batch).unwrap(), "EMA weights resumed too");
    // A BEiT checkpoint is not a tokenizer.
    let mim = dir.join("mim.safetensors");
    beit_core::BeitTrainer::new(tiny_config(), Default::default(), 0).unwrap().save(&mim).unwrap();
    let err = DvaeTrainer::load(&mim, None).err().unwrap().to_string();
    assert!(err.contains("beit-mim/1") && err.contains("tokenizer checkpoint"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_tokenizer_inputs_are_clear_errors() {
    let mut t = DvaeTrainer::new(tiny_dvae(), tiny_training(), 0).unwrap();
    let px = squares(2, 2, 8);
    let cases: Vec<(Vec<f32>, usize, &str)> = vec![
        (px[..100].to_vec(), 8, "expected a positive multiple of 128 values (C*H*W = 2*8*8), got 100"),
        (vec![0.5; 2 * 2 * 5 * 5], 5, "multiples of the tokenizer's downsampling factor 2"),
        (px.iter().map(|v| v * 2.0).collect(), 8, "must be in [0, 1], got 1.8"),
    ];
    for (pixels, size, expected) in cases {
        let err = t.encode(&ImageBatch { pixels: &pixels, height: size, width: size }).unwrap_err().to_string();
        assert!(err.contains(expected), "{err:?} should contain {expected:?}");
    }
    let err = t.decode(&[0, 1, 5, 0], 2, 2).unwrap_err().to_string();
    assert!(err.contains("token id 5 at index 2 is out of range [0, 5)"), "{err}");
    let err = t.decode(&[0, 1, 2], 2, 2).unwrap_err().to_string();
    assert!(err.contains("expected a positive multiple of 4 values"), "{err}");
    let err = beit_core::presets::dvae("dalle").unwrap_err().to_string();
    assert!(err.contains("dall-e, small, tiny"), "{err}");
}
