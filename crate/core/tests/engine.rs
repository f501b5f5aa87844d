//! The CPU training engine against the candle model it stands in for (same loss, same
//! gradient for every tensor, same logits and probe features) and against finite
//! differences of its own loss, in f64 on tiny shapes.

mod common;

use beit_core::config::Precision;
use beit_core::config::{BeitConfig, ClassifierConfig, Pooling};
use beit_core::engine::heads::classification::ClassifierEngine;
use beit_core::engine::heads::mim::MimEngine;
use beit_core::engine::Flat;
use beit_core::model::classification::classification_loss;
use beit_core::model::mim::{mask_tensors, masked_loss};
use beit_core::rng::Draws;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use common::*;

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
}

fn draws(seed: u64) -> Draws {
    Draws { seed, first_sample: 0 }
}

/// max |a - b| / max(max |b|, 1e-12)
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Every tensor's engine gradient against candle's, and non-zero.
fn compare_grads(context: &str, flat: &Flat<f64>, vars: &NamedVars, grads: &GradStore) {
    for (name, var) in vars {
        let reference = values(grads.get(var).unwrap_or_else(|| panic!("{context}{name}: candle gave no gradient")));
        let ours = slot(flat, name).of(&flat.grads);
        assert!(ours.iter().any(|&g| g != 0.0), "{context}{name}: the engine's gradient is all zero");
        let err = rel_err(ours, &reference);
        assert!(err < 1e-9, "{context}{name}: engine vs candle gradient error {err:e}");
    }
}

/// Central differences of an engine model's own loss at a few coordinates of every tensor.
fn finite_differences<E>(
    context: &str,
    eng: &mut E,
    flat: fn(&mut E) -> &mut Flat<f64>,
    loss: &mut dyn FnMut(&mut E) -> f64,
) {
    let analytic = flat(eng).grads.clone();
    let (table, layout) = (flat(eng).table.clone(), flat(eng).layout.clone());
    // 1e-5: small gradients (the key weights') stay above the round-off of the difference.
    let h = 1e-5;
    for (p, s) in table.params().iter().zip(layout.slots()) {
        let stride = (s.len / 4).max(1);
        let mut worst = 0.0f64;
        let mut scale = 1e-6f64;
        for i in (0..s.len).step_by(stride) {
            let at = s.offset + i;
            let base = flat(eng).params[at];
            flat(eng).params[at] = base + h;
            let plus = loss(eng);
            flat(eng).params[at] = base - h;
            let minus = loss(eng);
            flat(eng).params[at] = base;
            let numeric = (plus - minus) / (2.0 * h);
            worst = worst.max((numeric - analytic[at]).abs());
            scale = scale.max(numeric.abs()).max(analytic[at].abs());
        }
        assert!(worst / scale < 1e-6, "{context}{}: finite-difference error {:e}", p.name, worst / scale);
    }
}

fn mim_case(cfg: &BeitConfig, batch: usize, seed: u64) {
    let context = format!("{cfg:?}: ");
    let (mim, vars) = mim_model(cfg, 2, DType::F64);
    randomise(&vars, 70, 0.5);
    let n = cfg.num_patches();
    let mask: Vec<u8> = (0..batch * n).map(|i| (i % 3 == 0) as u8).collect();
    let (weights, positions) = mask_tensors(&mask, batch, n, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..positions.elem_count() as u32).map(|i| (i * 5 + 1) % cfg.vocab_size as u32).collect();
    let targets = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
    let [h, w] = cfg.image_size;
    let pixels = random_tensor(&[batch, cfg.num_channels, h, w], 5, DType::F64);
    let hidden = mim.hidden_states(&pixels, Some(&weights), Some(draws(seed))).unwrap();
    let logits = mim.logits_at(&hidden, &positions).unwrap();
    let (loss, acc) = masked_loss(&logits, &targets).unwrap();
    let grads = loss.backward().unwrap();

    let mut eng = mim_engine::<f64>(cfg, &vars);
    let px = values(&pixels);
    let out = eng.loss_and_grads(&px, &mask, &ids, draws(seed), 1.0).unwrap();
    let reference = loss.to_scalar::<f64>().unwrap();
    assert!((out.loss - reference).abs() < 1e-12 * reference.abs(), "{context}loss {} vs candle {reference}", out.loss);
    assert_eq!(out.rows, ids.len());
    assert!((out.hits as f64 / out.rows as f64 - acc).abs() < 1e-12);
    compare_grads(&context, &eng.flat, &vars, &grads);

    // Evaluation: logits at the masked patches without stochastic depth.
    let eval = mim.logits_at(&mim.hidden_states(&pixels, Some(&weights), None).unwrap(), &positions).unwrap();
    let err = rel_err(&eng.logits(&px, &mask).unwrap(), &values(&eval));
    assert!(err < 1e-12, "{context}eval logits error {err:e}");
    for layer in [0, 1, cfg.num_hidden_layers] {
        let reference = values(&mim.backbone().probe_features(&pixels, layer).unwrap());
        let err = rel_err(&eng.probe_features(&px, layer).unwrap(), &reference);
        assert!(err < 1e-12, "{context}probe features of layer {layer}: error {err:e}");
    }

    let loss = &mut |e: &mut MimEngine<f64>| e.loss_and_grads(&px, &mask, &ids, draws(seed), 1.0).unwrap().loss;
    finite_differences(&context, &mut eng, |e| &mut e.flat, loss);
}

/// The MIM objective with absolute and shared relative positions, LayerScale and stochastic
/// depth (rate 0.5 in the second block), and without any of them.
#[test]
fn mim_matches_candle_and_finite_differences() {
    let full = BeitConfig { use_absolute_position_embeddings: true, drop_path_rate: 0.5, ..tiny_config() };
    mim_case(&full, 3, 11);
    let bare = BeitConfig {
        layer_scale_init_value: 0.0,
        use_shared_relative_position_bias: false,
        num_attention_heads: 1,
        ..tiny_config()
    };
    mim_case(&bare, 2, 0);
}

/// Fine-tuning: per-layer relative tables, mean and [CLS] pooling, label smoothing, drop path.
#[test]
fn classification_matches_candle_and_finite_differences() {
    for (pooling, absolute) in [(Pooling::Mean, false), (Pooling::Cls, true)] {
        let model_cfg = BeitConfig {
            use_shared_relative_position_bias: false,
            use_relative_position_bias: true,
            use_absolute_position_embeddings: absolute,
            drop_path_rate: 0.5,
            ..tiny_config()
        };
        let context = format!("{pooling:?}: ");
        let cfg = ClassifierConfig { model: model_cfg.clone(), num_labels: 3, pooling, class_names: None };
        let (classifier, vars) = classifier_model(&cfg, 3, DType::F64);
        randomise(&vars, 90, 0.5);
        let pixels = random_tensor(&[3, 1, 4, 6], 6, DType::F64);
        let labels = [2u32, 0, 1];
        let seed = 5;
        let logits = classifier.forward(&pixels, Some(draws(seed))).unwrap();
        let (loss, _) = classification_loss(&logits, &Tensor::new(&labels, &Device::Cpu).unwrap(), 0.1).unwrap();
        let grads = loss.backward().unwrap();

        let mut eng = classifier_engine::<f64>(&cfg, &vars);
        let px = values(&pixels);
        let out = eng.loss_and_grads(&px, &labels, 0.1, draws(seed), 1.0).unwrap();
        let reference = loss.to_scalar::<f64>().unwrap();
        assert!(
            (out.loss - reference).abs() < 1e-12 * reference.abs(),
            "{context}loss {} vs candle {reference}",
            out.loss
        );
        compare_grads(&context, &eng.flat, &vars, &grads);
        let err = rel_err(&eng.logits(&px).unwrap(), &values(&classifier.forward(&pixels, None).unwrap()));
        assert!(err < 1e-12, "{context}eval logits error {err:e}");
        let loss =
            &mut |e: &mut ClassifierEngine<f64>| e.loss_and_grads(&px, &labels, 0.1, draws(seed), 1.0).unwrap().loss;
        finite_differences(&context, &mut eng, |e| &mut e.flat, loss);
    }
}

/// Inputs that do not fit are errors naming what was expected, never panics.
#[test]
fn bad_inputs_are_errors() {
    let cfg = tiny_config();
    let (_, vars) = mim_model(&cfg, 2, DType::F64);
    let mut eng = mim_engine::<f64>(&cfg, &vars);
    let per = 24;
    let mask = vec![1u8; 12];
    let err = eng.loss_and_grads(&vec![0.0; per * 2 - 1], &mask, &[0; 12], draws(0), 1.0).unwrap_err().to_string();
    assert!(err.contains("multiple of 24"), "{err}");
    let err = eng.loss_and_grads(&vec![0.0; per * 2], &mask[..5], &[0; 5], draws(0), 1.0).unwrap_err().to_string();
    assert!(err.contains("mask: expected 12"), "{err}");
    let err = eng.loss_and_grads(&vec![0.0; per * 2], &mask, &[0; 3], draws(0), 1.0).unwrap_err().to_string();
    assert!(err.contains("targets: expected 12"), "{err}");
    let err = eng.probe_features(&vec![0.0; per], 3).unwrap_err().to_string();
    assert!(err.contains("layer 3 does not exist"), "{err}");
}

/// f32 training on the engine follows candle's autograd (the GPU path) step for step: the same
/// losses, gradient norms and weights up to float rounding, for MIM and for fine-tuning.
#[test]
fn training_on_the_engine_tracks_candle_autograd() {
    let cfg = BeitConfig { drop_path_rate: 0.2, ..small_mim_config() };
    let b = batch(&cfg, 4, 2);
    let close = |what: &str, a: f64, c: f64| {
        assert!((a - c).abs() <= 1e-4 * c.abs().max(1e-3), "{what}: engine {a} vs candle {c}")
    };
    let weights_close = |what: &str, a: Vec<(String, Tensor)>, c: Vec<(String, Tensor)>| {
        for ((name, x), (_, y)) in a.iter().zip(&c) {
            let err = rel_err(&values(x), &values(y));
            assert!(err < 1e-3, "{what}: {name} differs by {err:e} after training");
        }
    };
    let mut engine = beit_core::BeitTrainer::new(cfg.clone(), Default::default(), 7).unwrap();
    let mut candle = beit_core::BeitTrainer::new(cfg.clone(), Default::default(), 7).unwrap();
    candle.set_cpu_engine(false).unwrap();
    for step in 0..20 {
        let (e, c) =
            (engine.train_step(&b.view(), 2e-3, step).unwrap(), candle.train_step(&b.view(), 2e-3, step).unwrap());
        close(&format!("MIM step {step} loss"), e.loss, c.loss);
        close(&format!("MIM step {step} gradient norm"), e.grad_norm, c.grad_norm);
        assert_eq!(e.num_masked, c.num_masked);
    }
    weights_close("MIM", engine.weights().unwrap(), candle.weights().unwrap());

    let cls = ClassifierConfig { model: cfg.clone(), num_labels: 3, pooling: Pooling::Mean, class_names: None };
    let finetune = beit_core::ClassifierTrainingOptions { label_smoothing: 0.1, layer_decay: 0.75 };
    let mut engine = beit_core::ClassifierTrainer::new(cls.clone(), Default::default(), finetune.clone(), 3).unwrap();
    let mut candle = beit_core::ClassifierTrainer::new(cls, Default::default(), finetune, 3).unwrap();
    candle.set_cpu_engine(false).unwrap();
    let labels = [0, 2, 1, 2];
    for step in 0..20 {
        let e = engine.train_step(&b.pixels, &labels, 2e-3, step).unwrap();
        let c = candle.train_step(&b.pixels, &labels, 2e-3, step).unwrap();
        close(&format!("classifier step {step} loss"), e.loss, c.loss);
        close(&format!("classifier step {step} gradient norm"), e.grad_norm, c.grad_norm);
    }
    weights_close("classifier", engine.weights().unwrap(), candle.weights().unwrap());
}

#[test]
fn on_pool_runs_on_a_pool_thread_and_inline_inside_one() {
    // From outside the pool (as N-API jobs call it) the closure runs on a pool thread.
    assert_eq!(rayon::current_thread_index(), None);
    let (inside, nested) = beit_core::engine::on_pool(|| {
        let here = rayon::current_thread_index();
        // Already on a pool thread: run in place, on the same thread.
        (here, beit_core::engine::on_pool(rayon::current_thread_index))
    });
    assert!(inside.is_some(), "the closure ran outside the pool");
    assert_eq!(nested, inside);
    // Results and errors come back as the closure returned them.
    let failed: beit_core::Result<()> = beit_core::engine::on_pool(|| Err(beit_core::Error::Input("no".into())));
    assert!(matches!(failed, Err(beit_core::Error::Input(m)) if m == "no"));
}

/// Weight-gradient GEMMs with a long inner dimension, split over groups of one-thread GEMMs,
/// add the same as the direct sum: a transposed operand, an uneven last group, a strided
/// (transposed) destination, and a reduction too short to split (one GEMM).
#[test]
fn split_reductions_add_the_direct_sum() {
    use beit_core::engine::matmul::{matmul_accumulate_split, Mat};
    let check = |m: usize, n: usize, depth: usize, transposed_dst: bool| {
        let a = values(&random_tensor(&[depth * m], 1, DType::F64));
        let b = values(&random_tensor(&[depth * n], 2, DType::F64));
        let start = values(&random_tensor(&[m * n], 3, DType::F64));
        let mut dst = start.clone();
        let d = if transposed_dst { Mat::dense(n, m).t() } else { Mat::dense(m, n) };
        matmul_accumulate_split(
            Precision::F32,
            &mut dst,
            d,
            &a,
            Mat::dense(depth, m).t(),
            &b,
            Mat::dense(depth, n),
            &mut Vec::new(),
        );
        let at = |i: usize, j: usize| if transposed_dst { j * m + i } else { i * n + j };
        let mut expected = start.clone();
        for i in 0..m {
            for j in 0..n {
                expected[at(i, j)] += (0..depth).map(|k| a[k * m + i] * b[k * n + j]).sum::<f64>();
            }
        }
        assert!(rel_err(&dst, &expected) < 1e-13, "{m}x{n}x{depth}: {:e}", rel_err(&dst, &expected));
    };
    check(7, 5, 1501, false);
    check(9, 6, 4099, true);
    check(3, 4, 100, false);
}
