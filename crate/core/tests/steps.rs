//! A step in three parts on every trainer and both runners: `loss_and_grads` adds a batch's
//! gradient to the buffer, `gradients` exposes it (count of loss terms included), and
//! `apply_update` consumes it. `train_step` is the two in one call, bit for bit; batches
//! accumulate into exactly the gradient of one big batch (the MIM loss weighted by the
//! masked-patch counts, not averaged per half); and the buffer is the hook an all-reduce
//! works on.

mod common;

use beit_core::rng::Draws;
use beit_core::runner::GradientValues;
use beit_core::{
    AdamWConfig, BeitConfig, BeitTrainer, ClassifierConfig, ClassifierTrainer, ClassifierTrainingOptions, DvaeTrainer,
    DvaeTrainingOptions, ImageBatch, MimBatch, Pooling,
};
use candle_core::Tensor;
use common::*;

fn cfg() -> BeitConfig {
    BeitConfig { image_size: [8, 8], patch_size: 4, drop_path_rate: 0.3, ..tiny_config() }
}

fn draws(seed: u64, first_sample: usize) -> Draws {
    Draws { seed, first_sample }
}

fn weights_bits(w: Vec<(String, Tensor)>) -> Vec<(String, Vec<u32>)> {
    w.into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()))
        .collect()
}

/// max |a - b| / max |b| over every tensor.
fn weights_rel_diff(a: Vec<(String, Tensor)>, b: Vec<(String, Tensor)>) -> f64 {
    let mut worst = 0.0f64;
    for ((name, x), (other, y)) in a.iter().zip(&b) {
        assert_eq!(name, other);
        let (x, y) =
            (x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), y.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let scale = y.iter().fold(1e-12f64, |m, &v| m.max(v.abs() as f64));
        let diff = x.iter().zip(&y).fold(0f64, |m, (&p, &q)| m.max((p - q).abs() as f64));
        worst = worst.max(diff / scale);
    }
    worst
}

/// The accumulated gradient divided by its count (the mean the update applies).
fn mean_gradient(g: beit_core::runner::Gradients) -> Vec<f64> {
    let values = match g.values {
        GradientValues::Host(v) => v.to_vec(),
        GradientValues::Device(t) => t.as_ref().unwrap().to_vec1::<f32>().unwrap(),
    };
    values.iter().map(|&v| v as f64 / *g.count as f64).collect()
}

/// max |a - b| / max |b|.
fn rel_diff(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn both_runners(mut f: impl FnMut(bool)) {
    for engine in [true, false] {
        f(engine);
    }
}

/// A MIM batch of `b` images whose halves mask different numbers of patches.
fn uneven_batch(cfg: &BeitConfig, b: usize) -> Batch {
    let mut batch = batch(cfg, b, 3);
    let n = cfg.num_patches();
    for (i, m) in batch.mask.iter_mut().enumerate() {
        // The first half masks 1 patch of 4, the second 3 of 4.
        *m = if i < b / 2 * n { (i % 4 == 0) as u8 } else { (i % 4 != 0) as u8 };
    }
    batch
}

fn half(b: &Batch, part: usize, images: usize, cfg: &BeitConfig) -> Batch {
    let (per, n) = (b.pixels.len() / images, cfg.num_patches());
    let range = |len: usize| part * images / 2 * len..(part + 1) * images / 2 * len;
    Batch {
        pixels: b.pixels[range(per)].to_vec(),
        mask: b.mask[range(n)].to_vec(),
        targets: b.targets[range(n)].to_vec(),
    }
}

#[test]
fn mim_loss_and_grads_then_apply_update_is_train_step_bit_for_bit() {
    both_runners(|engine| {
        let cfg = cfg();
        let b = uneven_batch(&cfg, 4);
        let mut one = BeitTrainer::new(cfg.clone(), AdamWConfig::default(), 7).unwrap();
        let mut split = BeitTrainer::new(cfg.clone(), AdamWConfig::default(), 7).unwrap();
        one.set_cpu_engine(engine).unwrap();
        split.set_cpu_engine(engine).unwrap();
        for step in 0..3 {
            let whole = one.train_step(&b.view(), 2e-3, step).unwrap();
            let loss = split.loss_and_grads(&b.view(), draws(step, 0)).unwrap();
            assert_eq!(*split.gradients().count, loss.num_masked as u64);
            let update = split.apply_update(2e-3).unwrap();
            assert_eq!(whole.loss.to_bits(), loss.loss.to_bits(), "engine {engine}: step {step} loss");
            assert_eq!(whole.grad_norm.to_bits(), update.grad_norm.to_bits(), "engine {engine}: step {step} norm");
        }
        assert_eq!(weights_bits(one.weights().unwrap()), weights_bits(split.weights().unwrap()), "engine {engine}");
    });
}

#[test]
fn mim_halves_weighted_by_masked_patches_equal_the_whole_batch() {
    both_runners(|engine| {
        let cfg = cfg();
        let b = uneven_batch(&cfg, 4);
        let (first, second) = (half(&b, 0, 4, &cfg), half(&b, 1, 4, &cfg));
        let mut whole = BeitTrainer::new(cfg.clone(), AdamWConfig::default(), 7).unwrap();
        let mut halves = BeitTrainer::new(cfg.clone(), AdamWConfig::default(), 7).unwrap();
        whole.set_cpu_engine(engine).unwrap();
        halves.set_cpu_engine(engine).unwrap();
        for step in 0..3 {
            let w = whole.loss_and_grads(&b.view(), draws(step, 0)).unwrap();
            let l1 = halves.loss_and_grads(&first.view(), draws(step, 0)).unwrap();
            let l2 = halves.loss_and_grads(&second.view(), draws(step, 2)).unwrap();
            assert_ne!(l1.num_masked, l2.num_masked, "the halves mask different numbers of patches");
            assert_eq!(*halves.gradients().count, w.num_masked as u64);
            let diff = rel_diff(&mean_gradient(halves.gradients()), &mean_gradient(whole.gradients()));
            assert!(diff < 1e-6, "engine {engine}: step {step}: gradients differ by {diff:e}");
            let (u, w_norm) = (halves.apply_update(2e-3).unwrap(), whole.apply_update(2e-3).unwrap().grad_norm);
            let combined = (l1.loss * l1.num_masked as f64 + l2.loss * l2.num_masked as f64) / w.num_masked as f64;
            let averaged = (l1.loss + l2.loss) / 2.0;
            assert!(
                (combined - w.loss).abs() < 1e-6 * w.loss,
                "engine {engine}: step {step}: {combined} vs {}",
                w.loss
            );
            assert!((averaged - w.loss).abs() > 1e-3, "the plain average would differ");
            assert!((u.grad_norm - w_norm).abs() < 1e-6 * w_norm, "engine {engine}: step {step} norm");
        }
        let diff = weights_rel_diff(halves.weights().unwrap(), whole.weights().unwrap());
        assert!(diff < 1e-5, "engine {engine}: weights differ by {diff:e}");
    });
}

#[test]
fn classifier_halves_equal_the_whole_batch_and_the_split_step_is_train_step() {
    both_runners(|engine| {
        let cfg = ClassifierConfig { model: cfg(), num_labels: 3, pooling: Pooling::Mean, class_names: None };
        let training = ClassifierTrainingOptions { label_smoothing: 0.1, layer_decay: 0.75 };
        let new = || {
            let mut t = ClassifierTrainer::new(cfg.clone(), AdamWConfig::default(), training.clone(), 5).unwrap();
            t.set_cpu_engine(engine).unwrap();
            t
        };
        let (mut whole, mut halves, mut split) = (new(), new(), new());
        let pixels = batch(&cfg.model, 4, 8).pixels;
        let labels = [0, 2, 1, 2];
        let per = pixels.len() / 4;
        for step in 0..3 {
            let w = whole.loss_and_grads(&pixels, &labels, draws(step, 0)).unwrap();
            let l1 = halves.loss_and_grads(&pixels[..2 * per], &labels[..2], draws(step, 0)).unwrap();
            let l2 = halves.loss_and_grads(&pixels[2 * per..], &labels[2..], draws(step, 2)).unwrap();
            assert_eq!(*halves.gradients().count, 4);
            let diff = rel_diff(&mean_gradient(halves.gradients()), &mean_gradient(whole.gradients()));
            assert!(diff < 1e-6, "engine {engine}: step {step}: gradients differ by {diff:e}");
            let w = beit_core::ClassifierStepMetrics {
                loss: w.loss,
                accuracy: w.accuracy,
                grad_norm: whole.apply_update(2e-3).unwrap().grad_norm,
            };
            let u = halves.apply_update(2e-3).unwrap();
            assert!(((l1.loss + l2.loss) / 2.0 - w.loss).abs() < 1e-6 * w.loss, "engine {engine}: step {step} loss");
            assert!((u.grad_norm - w.grad_norm).abs() < 1e-6 * w.grad_norm, "engine {engine}: step {step} norm");
            let m = split.train_step(&pixels, &labels, 2e-3, step).unwrap();
            assert_eq!((m.loss.to_bits(), m.grad_norm.to_bits()), (w.loss.to_bits(), w.grad_norm.to_bits()));
        }
        let diff = weights_rel_diff(halves.weights().unwrap(), whole.weights().unwrap());
        assert!(diff < 1e-5, "engine {engine}: weights differ by {diff:e}");
        assert_eq!(weights_bits(split.weights().unwrap()), weights_bits(whole.weights().unwrap()));
    });
}

#[test]
fn tokenizer_halves_equal_the_whole_batch_and_the_split_step_is_train_step() {
    both_runners(|engine| {
        let cfg = small_dvae_config(8);
        let training = DvaeTrainingOptions { ema_decay: 0.9, ..DvaeTrainingOptions::default() };
        let new = || {
            let mut t = DvaeTrainer::new(cfg.clone(), training.clone(), 3).unwrap();
            t.set_cpu_engine(engine).unwrap();
            t
        };
        let (mut whole, mut halves, mut split) = (new(), new(), new());
        let pixels = unit_pixels(4 * 3 * 64, 2);
        let images = |p: &'static [f32]| ImageBatch { pixels: p, height: 8, width: 8 };
        let pixels: &'static [f32] = Box::leak(pixels.into_boxed_slice());
        let per = pixels.len() / 4;
        for step in 0..3 {
            let l = whole.loss_and_grads(&images(pixels), 0.8, 0.5, draws(step, 0)).unwrap();
            let l1 = halves.loss_and_grads(&images(&pixels[..2 * per]), 0.8, 0.5, draws(step, 0)).unwrap();
            let l2 = halves.loss_and_grads(&images(&pixels[2 * per..]), 0.8, 0.5, draws(step, 2)).unwrap();
            assert_eq!(*halves.gradients().count, 4);
            let diff = rel_diff(&mean_gradient(halves.gradients()), &mean_gradient(whole.gradients()));
            assert!(diff < 1e-6, "engine {engine}: step {step}: gradients differ by {diff:e}");
            let w = beit_core::DvaeStepMetrics {
                loss: l.loss,
                recon_loss: l.recon_loss,
                kl: l.kl,
                perplexity: l.perplexity,
                codes_used: l.codes_used,
                grad_norm: whole.apply_update(3e-3).unwrap().grad_norm,
            };
            let u = halves.apply_update(3e-3).unwrap();
            assert!(
                ((l1.loss + l2.loss) / 2.0 - w.loss).abs() < 1e-6 * w.loss.abs(),
                "engine {engine}: step {step} loss"
            );
            assert!((u.grad_norm - w.grad_norm).abs() < 1e-6 * w.grad_norm, "engine {engine}: step {step} norm");
            let m = split.train_step(&images(pixels), 0.8, 0.5, 3e-3, step).unwrap();
            assert_eq!((m.loss.to_bits(), m.grad_norm.to_bits()), (w.loss.to_bits(), w.grad_norm.to_bits()));
        }
        let diff = weights_rel_diff(halves.weights().unwrap(), whole.weights().unwrap());
        assert!(diff < 1e-5, "engine {engine}: weights differ by {diff:e}");
        assert_eq!(weights_bits(split.weights().unwrap()), weights_bits(whole.weights().unwrap()));
    });
}

/// What a data-parallel all-reduce does to the buffer of two identical ranks (sum the
/// gradients, sum the counts) leaves the update unchanged; a failed step adds nothing; an
/// update with nothing to apply is an error.
#[test]
fn the_gradient_buffer_is_the_hook_an_all_reduce_works_on() {
    both_runners(|engine| {
        let cfg = cfg();
        let b = uneven_batch(&cfg, 4);
        let mut plain = BeitTrainer::new(cfg.clone(), AdamWConfig::default(), 7).unwrap();
        let mut reduced = BeitTrainer::new(cfg.clone(), AdamWConfig::default(), 7).unwrap();
        plain.set_cpu_engine(engine).unwrap();
        reduced.set_cpu_engine(engine).unwrap();
        let err = reduced.apply_update(1e-3).unwrap_err().to_string();
        assert!(err.contains("no gradients to apply"), "{err}");
        let p = plain.loss_and_grads(&b.view(), draws(1, 0)).unwrap();
        reduced.loss_and_grads(&b.view(), draws(1, 0)).unwrap();
        // A batch that fails its checks adds nothing.
        let bad = MimBatch { pixels: &b.pixels[..10], mask: &b.mask, targets: &b.targets };
        assert!(reduced.loss_and_grads(&bad, draws(1, 0)).is_err());
        let grads = reduced.gradients();
        assert_eq!(*grads.count, p.num_masked as u64);
        *grads.count *= 2;
        match grads.values {
            GradientValues::Host(g) => g.iter_mut().for_each(|v| *v *= 2.0),
            GradientValues::Device(g) => *g = Some((g.take().unwrap() * 2.0).unwrap()),
        }
        let (u1, u2) = (plain.apply_update(1e-3).unwrap(), reduced.apply_update(1e-3).unwrap());
        assert_eq!(u1.grad_norm.to_bits(), u2.grad_norm.to_bits(), "engine {engine}");
        assert_eq!(weights_bits(plain.weights().unwrap()), weights_bits(reduced.weights().unwrap()));
        assert_eq!(*reduced.gradients().count, 0, "the update empties the buffer");
        // A bad learning rate is refused before anything is applied, and keeps the buffer.
        reduced.loss_and_grads(&b.view(), draws(2, 0)).unwrap();
        assert!(reduced.apply_update(f64::NAN).is_err());
        assert_eq!(*reduced.gradients().count, p.num_masked as u64);
        // A model with gradients not yet applied does not move.
        let err = reduced.set_cpu_engine(!engine).unwrap_err().to_string();
        assert!(err.contains("applyUpdate"), "{err}");
    });
}
