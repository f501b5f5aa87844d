//! Mixed precision (bf16 activations, f32 master weights) on the CPU: the ops' bf16 contract
//! (compute in f32, round the output once), gradients reaching every f32 parameter, and bf16
//! training that tracks f32 training. The CUDA bf16 kernels are compared with these CPU
//! results in tests/cuda.rs.

mod common;

use beit_core::config::{ClassifierConfig, Pooling};
use beit_core::device::Precision;
use beit_core::model::mim::{mask_tensors, masked_loss};
use beit_core::rng::Draws;
use beit_core::{
    ops, AdamWConfig, BeitConfig, BeitTrainer, ClassifierTrainer, ClassifierTrainingOptions, DvaeTrainer,
    DvaeTrainingOptions, ImageBatch,
};
use candle_core::{DType, Device, Tensor, Var};
use common::*;

fn bf16(shape: &[usize], seed: u64) -> Tensor {
    random_tensor(shape, seed, DType::BF16)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
}

/// `op` on bf16 inputs is `op` on the same values in f32, rounded to bf16 once; and the
/// gradients it passes back are bf16 too.
fn check_bf16_op(name: &str, inputs: &[Tensor], op: impl Fn(&[Tensor]) -> Tensor) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = op(&ts);
    assert_eq!(y.dtype(), DType::BF16, "{name}: output dtype");
    let up: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(DType::F32).unwrap()).collect();
    let expected = op(&up).to_dtype(DType::BF16).unwrap();
    assert_eq!(values(&y), values(&expected), "{name}: not the f32 result rounded once");
    let grads = (y.to_dtype(DType::F32).unwrap() * random_tensor(y.dims(), 9, DType::F32))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (i, v) in vars.iter().enumerate() {
        let g = grads.get(v).unwrap_or_else(|| panic!("{name}: input {i} got no gradient"));
        assert_eq!(g.dtype(), DType::BF16, "{name}: gradient {i} dtype");
        assert!(values(g).iter().any(|&x| x != 0.0), "{name}: gradient {i} is all zero");
    }
}

#[test]
fn bf16_ops_compute_in_f32_and_round_once() {
    check_bf16_op("layer_norm", &[bf16(&[3, 5, 16], 1), bf16(&[16], 2), bf16(&[16], 3)], |t| {
        ops::layer_norm(&t[0], &t[1], &t[2], 1e-6).unwrap()
    });
    check_bf16_op("scaled_softmax", &[bf16(&[2, 3, 7, 7], 4), bf16(&[3, 7, 7], 5)], |t| {
        ops::scaled_softmax(&t[0], Some(&t[1]), 0.3).unwrap()
    });
    check_bf16_op("gelu", &[bf16(&[4, 9], 6)], |t| ops::gelu_erf(&t[0]).unwrap());
    check_bf16_op("add_bias", &[bf16(&[6, 10], 7), bf16(&[10], 8)], |t| ops::add_bias(&t[0], &t[1]).unwrap());
    check_bf16_op("scale_columns", &[bf16(&[6, 10], 7), bf16(&[10], 8)], |t| ops::scale_columns(&t[0], &t[1]).unwrap());
}

#[test]
fn precision_is_parsed_with_a_clear_error() {
    assert_eq!(Precision::parse("bf16").unwrap(), Precision::Bf16);
    assert_eq!(Precision::parse("f32").unwrap().dtype(), DType::F32);
    let err = Precision::parse("fp16").unwrap_err().to_string();
    assert!(err.contains("precision must be \"f32\" or \"bf16\", got \"fp16\""), "{err}");
}

#[test]
fn every_parameter_gets_an_f32_gradient_through_bf16_activations() {
    for cfg in [
        BeitConfig { use_absolute_position_embeddings: true, drop_path_rate: 0.1, ..tiny_config() },
        BeitConfig { use_shared_relative_position_bias: false, use_relative_position_bias: true, ..tiny_config() },
    ] {
        let (model, vars) = mim_model(&cfg, 3, DType::F32);
        let b = batch(&cfg, 3, 1);
        let px = Tensor::from_slice(&b.pixels, (3, 1, 4, 6), &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
        let (w, pos) = mask_tensors(&b.mask, 3, cfg.num_patches(), &Device::Cpu).unwrap();
        let targets: Vec<u32> =
            b.mask.iter().zip(&b.targets).filter(|(m, _)| **m == 1).map(|(_, &t)| t as u32).collect();
        let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
        let hidden = model.hidden_states(&px, Some(&w), Some(Draws { seed: 5, first_sample: 0 })).unwrap();
        assert_eq!(hidden.dtype(), DType::BF16, "activations should be bf16");
        let (loss, _) = masked_loss(&model.logits_at(&hidden, &pos).unwrap(), &targets).unwrap();
        assert_eq!(loss.dtype(), DType::F32, "the loss should be f32");
        let grads = loss.backward().unwrap();
        for (name, var) in &vars {
            let g = grads.get(var).unwrap_or_else(|| panic!("{name}: no gradient"));
            assert_eq!(g.dtype(), DType::F32, "{name}: gradient dtype");
            let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{name}: non-finite gradient");
            assert!(v.iter().any(|&x| x != 0.0), "{name}: all-zero gradient");
        }
    }
}

#[test]
fn bf16_training_tracks_f32_training() {
    let cfg = BeitConfig {
        image_size: [16, 16],
        patch_size: 4,
        hidden_size: 32,
        num_attention_heads: 4,
        intermediate_size: 64,
        vocab_size: 16,
        ..tiny_config()
    };
    let b = batch(&cfg, 4, 2);
    let optim = AdamWConfig { weight_decay: 0.0, ..Default::default() };
    let mut full = BeitTrainer::new(cfg.clone(), optim.clone(), 7).unwrap();
    let mut mixed = BeitTrainer::new(cfg.clone(), optim, 7).unwrap();
    mixed.set_precision(Precision::Bf16).unwrap();
    let (mut first, mut last) = (None, None);
    for step in 0..60 {
        let a = full.train_step(&b.view(), 5e-3, step).unwrap();
        let m = mixed.train_step(&b.view(), 5e-3, step).unwrap();
        if step < 5 {
            // bf16 keeps 8 bits of mantissa: early losses agree to about 1%.
            assert!((a.loss - m.loss).abs() < 0.02 * a.loss, "step {step}: f32 loss {} vs bf16 {}", a.loss, m.loss);
        }
        first.get_or_insert(m.loss);
        last = Some((a.loss, m.loss));
    }
    let (first, (f32_last, bf16_last)) = (first.unwrap(), last.unwrap());
    assert!(bf16_last < 0.6 * first, "bf16 loss fell from {first} only to {bf16_last}");
    assert!((bf16_last - f32_last).abs() < 0.1 * f32_last, "after 60 steps bf16 is at {bf16_last}, f32 at {f32_last}");
    for (name, weight) in mixed.weights().unwrap() {
        assert_eq!(weight.dtype(), DType::F32, "{name}: master weights must stay f32");
    }
    let predictions = mixed.forward(&b.pixels, &b.mask).unwrap();
    assert!(predictions.logits.iter().all(|v| v.is_finite()), "bf16 predictions must be finite");
}

#[test]
fn bf16_classifier_logits_are_close_to_f32() {
    let cfg = ClassifierConfig { model: tiny_config(), num_labels: 5, pooling: Pooling::Mean };
    let mut t = ClassifierTrainer::new(cfg, AdamWConfig::default(), ClassifierTrainingOptions::default(), 4).unwrap();
    let b = batch(&tiny_config(), 3, 2);
    // Away from the initialisation first (f32, on the CPU engine), then onto candle in bf16.
    for step in 0..5 {
        t.train_step(&b.pixels, &[1, 2, 0], 3e-2, step).unwrap();
    }
    let f32_logits = t.predict(&b.pixels).unwrap();
    t.set_precision(Precision::Bf16).unwrap();
    let bf16_logits = t.predict(&b.pixels).unwrap();
    let scale = f32_logits.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    let diff = f32_logits.iter().zip(&bf16_logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff < 0.05 * scale, "bf16 logits differ by {diff} (scale {scale})");
    let step = t.train_step(&b.pixels, &[0, 3, 4], 1e-3, 0).unwrap();
    assert!(step.loss.is_finite() && step.grad_norm > 0.0, "bf16 classifier step: {step:?}");
}

#[test]
fn bf16_tokenizer_encoding_agrees_with_f32() {
    let config = small_dvae_config(16);
    let mut t = DvaeTrainer::new(config, DvaeTrainingOptions::default(), 5).unwrap();
    let pixels: Vec<f32> = unit_pixels(4 * 3 * 256, 6);
    let images = ImageBatch { pixels: &pixels, height: 16, width: 16 };
    let full = t.encode(&images).unwrap();
    t.set_precision(Precision::Bf16).unwrap();
    let mixed = t.encode(&images).unwrap();
    let agree = full.iter().zip(&mixed).filter(|(a, b)| a == b).count();
    // Near-ties of the argmax may flip under bf16 rounding; most ids must not.
    assert!(agree * 10 >= full.len() * 8, "bf16 ids agree with f32 at {agree}/{} positions", full.len());
}
