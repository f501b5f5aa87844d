//! Device selection: parsing and its errors, and moving a model mid-training (weights and
//! optimizer state) without changing what training computes.

mod common;

use beit_core::config::{ClassifierConfig, Pooling};
use beit_core::device::{self, CUDA_BUILD};
use beit_core::{
    AdamWConfig, BeitTrainer, ClassifierTrainer, ClassifierTrainingOptions, DvaeConfig, DvaeTrainer,
    DvaeTrainingOptions, ImageBatch,
};
use candle_core::Device;
use common::*;

#[test]
fn device_specs_parse_or_say_what_is_wrong() {
    assert!(device::parse("cpu").unwrap().is_cpu());
    assert_eq!(device::name(&Device::Cpu), "cpu");
    for bad in ["gpu", "cuda:", "cuda:x", "CPU", ""] {
        let err = device::parse(bad).err().unwrap().to_string();
        assert!(err.contains("\"cpu\", \"cuda\" or \"cuda:N\""), "{bad:?}: {err}");
    }
    if !CUDA_BUILD {
        assert_eq!(device::cuda_device_count(), 0);
        let err = device::parse("cuda:1").err().unwrap().to_string();
        assert!(err.contains("no CUDA support") && err.contains("beit-linux-x64-gnu-cuda"), "{err}");
    }
}

fn values(weights: Vec<(String, candle_core::Tensor)>) -> Vec<Vec<f32>> {
    weights.iter().map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

#[test]
fn moving_a_model_mid_training_keeps_weights_moments_and_step() {
    // Four steps in place against two, a move from the CPU engine to candle's autograd and
    // back (the conversions a GPU move makes), and two more: the same weights.
    let cfg = tiny_config();
    let batch = batch(&cfg, 3, 4);
    let mut still = BeitTrainer::new(cfg.clone(), AdamWConfig::default(), 9).unwrap();
    let mut moved = BeitTrainer::new(cfg.clone(), AdamWConfig::default(), 9).unwrap();
    for step in 0..4 {
        if step == 2 {
            moved.set_cpu_engine(false).unwrap();
            moved.to_device(&Device::Cpu).unwrap();
            moved.set_cpu_engine(true).unwrap();
        }
        let a = still.train_step(&batch.view(), 1e-3, step).unwrap();
        let b = moved.train_step(&batch.view(), 1e-3, step).unwrap();
        assert_eq!(a.loss, b.loss, "step {step}");
    }
    assert_eq!(moved.optimizer_step(), 4);
    assert_eq!(values(still.weights().unwrap()), values(moved.weights().unwrap()));

    let cls = ClassifierConfig { model: cfg.clone(), num_labels: 3, pooling: Pooling::Mean, class_names: None };
    let mut still =
        ClassifierTrainer::new(cls.clone(), AdamWConfig::default(), ClassifierTrainingOptions::default(), 1).unwrap();
    let mut moved =
        ClassifierTrainer::new(cls, AdamWConfig::default(), ClassifierTrainingOptions::default(), 1).unwrap();
    let labels = [0, 2, 1];
    for step in 0..4 {
        if step == 2 {
            moved.set_cpu_engine(false).unwrap();
            moved.set_cpu_engine(true).unwrap();
        }
        let a = still.train_step(&batch.pixels, &labels, 1e-3, step).unwrap();
        let b = moved.train_step(&batch.pixels, &labels, 1e-3, step).unwrap();
        assert_eq!(a.loss, b.loss, "classifier step {step}");
    }
    assert_eq!(values(still.weights().unwrap()), values(moved.weights().unwrap()));
}

#[test]
fn moving_a_tokenizer_keeps_its_ema() {
    let cfg = DvaeConfig {
        image_size: [8, 8],
        num_channels: 1,
        hidden_size: 8,
        num_groups: 2,
        blocks_per_group: 1,
        vocab_size: 8,
        decoder_input_size: 8,
    };
    let training = DvaeTrainingOptions { ema_decay: 0.5, ..DvaeTrainingOptions::default() };
    let pixels: Vec<f32> = random_tensor(&[2 * 64], 3, candle_core::DType::F32)
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.abs().min(1.0))
        .collect();
    let batch = ImageBatch { pixels: &pixels, height: 8, width: 8 };
    let mut still = DvaeTrainer::new(cfg.clone(), training.clone(), 5).unwrap();
    let mut moved = DvaeTrainer::new(cfg, training, 5).unwrap();
    for step in 0..3 {
        if step == 1 {
            moved.set_cpu_engine(false).unwrap();
            moved.set_cpu_engine(true).unwrap();
        }
        let a = still.train_step(&batch, 1.0, 0.01, 1e-3, step).unwrap();
        let b = moved.train_step(&batch, 1.0, 0.01, 1e-3, step).unwrap();
        assert_eq!(a.loss, b.loss, "tokenizer step {step}");
    }
    // encode reads the EMA weights: equal ids mean the EMA moved with the model.
    assert_eq!(still.encode(&batch).unwrap(), moved.encode(&batch).unwrap());
    assert_eq!(values(still.weights().unwrap()), values(moved.weights().unwrap()));
}
