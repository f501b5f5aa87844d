//! Classification: the whole fine-tuning loss against finite differences (both poolings, label
//! smoothing), gradients reach every tensor, layer-wise LR decay, starting from a pretrained
//! MIM checkpoint, checkpoints with training state, learning, and the linear probe.

mod common;

use beit_core::arch::classification::ClassifierParams;
use beit_core::arch::mim::MimParams;
use beit_core::config::{BeitConfig, ClassifierConfig, Pooling};
use beit_core::model::classification::classification_loss;
use beit_core::rng::SplitMix64;
use beit_core::AdamWConfig;
use beit_core::{BeitTrainer, ClassifierTrainer, ClassifierTrainingOptions, LinearProbe};
use candle_core::{DType, Device, Tensor};
use common::*;

fn classifier_config(pooling: Pooling) -> ClassifierConfig {
    ClassifierConfig { model: tiny_config(), num_labels: 3, pooling, class_names: None }
}

fn no_decay_adamw() -> AdamWConfig {
    AdamWConfig { weight_decay: 0.0, clip_grad_norm: 0.0, ..AdamWConfig::default() }
}

#[test]
fn whole_classification_loss_gradients_with_label_smoothing() {
    for pooling in [Pooling::Mean, Pooling::Cls] {
        let cfg = ClassifierConfig {
            model: BeitConfig { use_absolute_position_embeddings: true, ..tiny_config() },
            ..classifier_config(pooling)
        };
        let (model, vars) = classifier_model(&cfg, 3, DType::F64);
        randomise(&vars, 40, 0.5);
        let pixels = random_tensor(&[3, 1, 4, 6], 8, DType::F64);
        let labels = Tensor::new(&[2u32, 0, 1], &Device::Cpu).unwrap();
        let objective = || classification_loss(&model.forward(&pixels, None).unwrap(), &labels, 0.1).unwrap().0;
        let grads = objective().backward().unwrap();
        let f = || objective().to_scalar::<f64>().unwrap();
        for (name, var) in &vars {
            let g = grads.get(var).unwrap_or_else(|| panic!("{pooling:?} {name} got no gradient"));
            assert!(
                g.abs().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap() > 0.0,
                "{pooling:?} {name}: zero gradient"
            );
            let err = grad_check(var, g, &f, 6);
            assert!(err < 1e-6, "{pooling:?} {name}: relative gradient error {err:e}");
        }
    }
}

#[test]
fn label_smoothing_matches_its_definition() {
    let logits = Tensor::new(&[[1.0f64, 2.0, -0.5], [0.3, 0.1, 0.2]], &Device::Cpu).unwrap();
    let labels = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
    let (loss, accuracy) = classification_loss(&logits, &labels, 0.2).unwrap();
    let rows = logits.to_vec2::<f64>().unwrap();
    let mut want = 0.0;
    for (row, label) in rows.iter().zip([1usize, 0]) {
        let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
        let nll: Vec<f64> = row.iter().map(|v| lse - v).collect();
        want += 0.8 * nll[label] + 0.2 * nll.iter().sum::<f64>() / 3.0;
    }
    assert!((loss.to_scalar::<f64>().unwrap() - want / 2.0).abs() < 1e-12);
    assert_eq!(accuracy, 1.0);
}

#[test]
fn layer_ids_and_decayed_learning_rates_follow_unilm() {
    let (mim, _) = MimParams::new(&tiny_config());
    let layer_id = |name: &str| mim.get(mim.find(name).unwrap()).layer;
    assert_eq!(layer_id("beit.embeddings.cls_token"), 0);
    assert_eq!(layer_id("beit.embeddings.patch_embeddings.projection.weight"), 0);
    assert_eq!(layer_id("beit.encoder.layer.0.attention.attention.query.weight"), 1);
    assert_eq!(layer_id("beit.encoder.layer.1.output.dense.bias"), 2);
    assert_eq!(layer_id("beit.encoder.relative_position_bias.relative_position_bias_table"), 3);
    assert_eq!(layer_id("lm_head.weight"), 3);
    let (cls, _) = ClassifierParams::new(&classifier_config(Pooling::Cls));
    assert_eq!(cls.get(cls.find("classifier.weight").unwrap()).layer, 3);
    assert_eq!(cls.get(cls.find("beit.layernorm.bias").unwrap()).layer, 3);
    let cfg = ClassifierConfig {
        model: BeitConfig { use_shared_relative_position_bias: true, ..tiny_config() },
        ..classifier_config(Pooling::Mean)
    };
    let trainer = ClassifierTrainer::new(
        cfg,
        AdamWConfig::default(),
        ClassifierTrainingOptions { layer_decay: 0.5, label_smoothing: 0.0 },
        1,
    )
    .unwrap();
    let scales = trainer.lr_scales();
    let scale = |name: &str| scales.iter().find(|(n, _)| n == name).unwrap().1;
    assert_eq!(scale("beit.embeddings.cls_token"), 0.125);
    assert_eq!(scale("beit.encoder.layer.0.attention.attention.query.weight"), 0.25);
    assert_eq!(scale("beit.encoder.layer.1.intermediate.dense.weight"), 0.5);
    assert_eq!(scale("classifier.bias"), 1.0);
    assert_eq!(scale("beit.pooler.layernorm.weight"), 1.0);
}

fn images(cfg: &BeitConfig, b: usize, seed: u64) -> Vec<f32> {
    let n = b * cfg.num_channels * cfg.image_size[0] * cfg.image_size[1];
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.normal() as f32).collect()
}

#[test]
fn finetuning_starts_from_the_pretrained_backbone() {
    let dir = std::env::temp_dir().join(format!("beit-classify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mim_path = dir.join("mim.safetensors");
    let mut mim = BeitTrainer::new(tiny_config(), AdamWConfig::default(), 11).unwrap();
    // Away from the initialisation, so that a freshly initialised tensor cannot pass as copied.
    let b = batch(&tiny_config(), 2, 3);
    for step in 0..3 {
        mim.train_step(&b.view(), 5e-2, step).unwrap();
    }
    mim.save(&mim_path).unwrap();
    let mim_weights = mim.weights().unwrap();
    for pooling in [Pooling::Mean, Pooling::Cls] {
        let cls = ClassifierTrainer::from_pretrained(
            &mim_path,
            classifier_config(pooling),
            AdamWConfig::default(),
            ClassifierTrainingOptions::default(),
            2,
        )
        .unwrap();
        let mim_var = |name: &str| mim_weights.iter().find(|(n, _)| n == name).unwrap().1.clone();
        let mut from_mim = 0;
        for (name, var) in &cls.weights().unwrap() {
            assert_ne!(name, "beit.embeddings.mask_token", "classifiers have no mask token");
            let source = match name.as_str() {
                "beit.layernorm.weight" => Some("layernorm.weight".to_string()),
                "beit.layernorm.bias" => Some("layernorm.bias".to_string()),
                n if n.starts_with("beit.") && !n.starts_with("beit.pooler") => Some(n.to_string()),
                _ => None,
            };
            if let Some(source) = source {
                let diff =
                    var.sub(&mim_var(&source)).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert_eq!(diff, 0.0, "{pooling:?}: {name} differs from the pretrained {source}");
                from_mim += 1;
            }
        }
        let backbone =
            mim_weights.iter().filter(|(n, _)| n.starts_with("beit.") && n != "beit.embeddings.mask_token").count();
        assert_eq!(from_mim, backbone + if pooling == Pooling::Cls { 2 } else { 0 });
    }
    // A checkpoint of another shape is refused naming the tensor.
    let wider =
        ClassifierConfig { model: BeitConfig { hidden_size: 12, ..tiny_config() }, ..classifier_config(Pooling::Mean) };
    let err = ClassifierTrainer::from_pretrained(
        &mim_path,
        wider,
        AdamWConfig::default(),
        ClassifierTrainingOptions::default(),
        2,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("shape"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn finetuning_starts_from_a_classifier_backbone_with_new_classes() {
    let dir = std::env::temp_dir().join(format!("beit-classify-intermediate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cls.safetensors");
    let cfg = classifier_config(Pooling::Mean);
    let mut first = ClassifierTrainer::new(cfg.clone(), AdamWConfig::default(), Default::default(), 4).unwrap();
    // Away from the initialisation (the pooling LayerNorm's is ones and zeros).
    let pixels = images(&cfg.model, 3, 5);
    for step in 0..3 {
        first.train_step(&pixels, &[0, 1, 2], 5e-2, step).unwrap();
    }
    first.save(&path).unwrap();
    let saved = first.weights().unwrap();
    let saved_var = |name: &str| saved.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    for pooling in [Pooling::Mean, Pooling::Cls] {
        let config = ClassifierConfig { num_labels: 5, pooling, ..cfg.clone() };
        let next =
            ClassifierTrainer::from_pretrained(&path, config, AdamWConfig::default(), Default::default(), 2).unwrap();
        let mut kept = 0;
        for (name, var) in &next.weights().unwrap() {
            let new_head =
                name.starts_with("classifier.") || (pooling == Pooling::Cls && name.starts_with("beit.layernorm."));
            match saved_var(name) {
                Some(old) if !new_head => {
                    let diff = var.sub(&old).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    assert_eq!(diff, 0.0, "{pooling:?}: {name} differs from the first classifier's");
                    kept += 1;
                }
                _ => assert!(new_head, "{pooling:?}: {name} is not in the first classifier"),
            }
        }
        assert_eq!(next.weights().unwrap().iter().find(|(n, _)| n == "classifier.weight").unwrap().1.dims()[0], 5);
        let backbone = saved.iter().filter(|(n, _)| n.starts_with("beit.") && !n.starts_with("beit.pooler.")).count();
        assert_eq!(kept, backbone + if pooling == Pooling::Mean { 2 } else { 0 }, "{pooling:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn checkpoint_round_trip_keeps_weights_optimizer_and_training_state() {
    let dir = std::env::temp_dir().join(format!("beit-classify-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = classifier_config(Pooling::Cls);
    let mut a = ClassifierTrainer::new(
        cfg.clone(),
        AdamWConfig::default(),
        ClassifierTrainingOptions { label_smoothing: 0.1, layer_decay: 0.7 },
        4,
    )
    .unwrap();
    let pixels = images(&cfg.model, 4, 1);
    a.train_step(&pixels, &[0, 1, 2, 0], 1e-3, 7).unwrap();
    a.train_state = Some(r#"{"step":1}"#.into());
    let path = dir.join("cls.safetensors");
    a.save(&path).unwrap();
    let mut b = ClassifierTrainer::load(&path, None).unwrap();
    assert_eq!(b.train_state.as_deref(), Some(r#"{"step":1}"#));
    assert_eq!(b.options.layer_decay, 0.7);
    assert_eq!(b.optimizer_step(), 1);
    let ma = a.train_step(&pixels, &[0, 1, 2, 0], 1e-3, 8).unwrap();
    let mb = b.train_step(&pixels, &[0, 1, 2, 0], 1e-3, 8).unwrap();
    assert_eq!(ma.loss, mb.loss);
    assert_eq!(a.predict(&pixels).unwrap(), b.predict(&pixels).unwrap());
    let err = BeitTrainer::load(&path, None).err().unwrap().to_string();
    assert!(err.contains("expected \"beit-mim/1\""), "{err}");
    // The options are saved under "training"; files written when the key was "finetune" load.
    let mut file = beit_core::checkpoint::load(&path).unwrap();
    let options = file.metadata.remove("training").expect("saved under \"training\"");
    file.metadata.insert("finetune".into(), options);
    let tensors: Vec<_> = file.tensors.into_iter().collect();
    let old = dir.join("old.safetensors");
    beit_core::checkpoint::save(&old, &tensors, file.metadata).unwrap();
    let c = ClassifierTrainer::load(&old, None).unwrap();
    assert_eq!((c.options.layer_decay, c.options.label_smoothing), (0.7, 0.1));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_tiny_classifier_learns_and_bad_labels_are_errors() {
    let cfg = classifier_config(Pooling::Mean);
    let mut t = ClassifierTrainer::new(
        cfg.clone(),
        no_decay_adamw(),
        ClassifierTrainingOptions { label_smoothing: 0.0, layer_decay: 1.0 },
        3,
    )
    .unwrap();
    let pixels = images(&cfg.model, 6, 2);
    let labels = [0, 1, 2, 2, 1, 0];
    let first = t.train_step(&pixels, &labels, 3e-3, 0).unwrap().loss;
    let mut last = first;
    for step in 1..120 {
        last = t.train_step(&pixels, &labels, 3e-3, step).unwrap().loss;
    }
    assert!(last < 0.1 * first, "loss {first} -> {last}");
    let err = t.train_step(&pixels, &[0, 1, 3, 0, 0, 0], 1e-3, 0).err().unwrap().to_string();
    assert!(err.contains("label 3 at index 2 is out of range [0, 3)"), "{err}");
    let err = t.train_step(&pixels, &[0, 1], 1e-3, 0).err().unwrap().to_string();
    assert!(err.contains("expected 6 values"), "{err}");
}

#[test]
fn the_linear_probe_separates_separable_features() {
    // Two Gaussian blobs in 5-D, offset along the first axis, with a large shared shift (the
    // standardisation removes it).
    let mut rng = SplitMix64::new(9);
    let (n, d) = (200, 5);
    let mut features = Vec::with_capacity(n * d);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let label = (i % 2) as i32;
        for j in 0..d {
            let centre = if j == 0 { label as f64 * 3.0 } else { 0.0 };
            features.push((100.0 + centre + rng.normal()) as f32);
        }
        labels.push(label);
    }
    let mut probe =
        LinearProbe::new(d, 2, &features, AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() }, 1).unwrap();
    for _ in 0..100 {
        probe.train_step(&features, &labels, 0.05).unwrap();
    }
    let logits = probe.predict(&features).unwrap();
    let correct = (0..n).filter(|&i| ((logits[2 * i + 1] > logits[2 * i]) as i32) == labels[i]).count();
    assert!(correct as f64 / n as f64 > 0.9, "accuracy {}", correct as f64 / n as f64);
}

#[test]
fn probe_features_are_cls_and_mean_patch_of_the_chosen_layer() {
    let cfg = tiny_config();
    let mut mim = BeitTrainer::new(cfg.clone(), AdamWConfig::default(), 5).unwrap();
    let pixels = images(&cfg, 2, 3);
    let f0 = mim.probe_features(&pixels, 0).unwrap();
    let f2 = mim.probe_features(&pixels, 2).unwrap();
    assert_eq!(f0.len(), 2 * 2 * cfg.hidden_size);
    assert_ne!(f0, f2);
    // Layer 0 is the embeddings: [CLS] is the same learned token for every image.
    let d = cfg.hidden_size;
    assert_eq!(f0[..d], f0[2 * d..3 * d]);
    let err = mim.probe_features(&pixels, 3).err().unwrap().to_string();
    assert!(err.contains("layer 3 does not exist"), "{err}");
}
