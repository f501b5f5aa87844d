mod common;

use beit_core::arch::backbone::relative_position_index;
use beit_core::model::mim::{mask_tensors, masked_loss};
use beit_core::rng::Draws;
use beit_core::{AdamWConfig, BeitConfig, BeitTrainer, Error};
use candle_core::DType;
use common::*;

#[test]
fn beit_base_has_the_reference_parameter_count() {
    let cfg = beit_core::presets::beit("base").unwrap();
    let (_, vars) = mim_model(&cfg, 0, DType::F32);
    let count: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    assert_eq!(count, 91_965_776);
    assert!(vars.iter().any(|(n, _)| n == "beit.encoder.relative_position_bias.relative_position_bias_table"));
    assert!(vars.iter().any(|(n, _)| n == "beit.encoder.layer.11.attention.attention.query.weight"));
    assert!(vars.iter().all(|(n, _)| !n.contains("key.bias")), "k has no bias");
}

#[test]
fn presets_differ_only_in_size() {
    for (name, d, layers, heads) in [("tiny", 192, 12, 3), ("small", 384, 12, 6), ("large", 1024, 24, 16)] {
        let c = beit_core::presets::beit(name).unwrap();
        assert_eq!((c.hidden_size, c.num_hidden_layers, c.num_attention_heads), (d, layers, heads));
        assert_eq!(c.intermediate_size, 4 * d);
        c.validate().unwrap();
    }
    let err = beit_core::presets::beit("huge").unwrap_err().to_string();
    assert!(err.contains("huge") && err.contains("mini, tiny, small, base, large"), "{err}");
}

#[test]
fn impossible_configs_are_rejected_with_the_reason() {
    let cases: Vec<(BeitConfig, &str)> = vec![
        (BeitConfig { image_size: [30, 32], patch_size: 4, ..tiny_config() }, "multiple of patchSize"),
        (BeitConfig { hidden_size: 10, num_attention_heads: 3, ..tiny_config() }, "divisible by numAttentionHeads"),
        (BeitConfig { num_channels: 0, ..tiny_config() }, "numChannels must be positive"),
        (BeitConfig { use_relative_position_bias: true, ..tiny_config() }, "exclusive"),
        (BeitConfig { drop_path_rate: 1.0, ..tiny_config() }, "dropPathRate"),
    ];
    for (cfg, expected) in cases {
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(expected), "{err:?} should mention {expected:?}");
    }
    let err = BeitConfig::from_json(r#"{"hiddenSize": 8}"#).unwrap_err().to_string();
    assert!(err.contains("missing field"), "{err}");
    let mut json: serde_json::Value = serde_json::from_str(&tiny_config().to_json()).unwrap();
    json["hidenSize"] = 3.into();
    let err = BeitConfig::from_json(&json.to_string()).unwrap_err().to_string();
    assert!(err.contains("unknown field") && err.contains("hidenSize"), "{err}");
    // Errors name the field and what it takes, never a JSON line and column.
    let with = |key: &str, value: serde_json::Value| {
        let mut json: serde_json::Value = serde_json::from_str(&tiny_config().to_json()).unwrap();
        json[key] = value;
        BeitConfig::from_json(&json.to_string())
    };
    let err = with("numHiddenLayers", (-1).into()).unwrap_err().to_string();
    assert!(err.contains("numHiddenLayers") && err.contains("whole number >= 0") && !err.contains("line"), "{err}");
    let err = with("imageSize", "big".into()).unwrap_err().to_string();
    assert!(
        err.contains("imageSize: expected a whole number of pixels or [height, width]") && !err.contains("column"),
        "{err}"
    );
    // A number is a square image size.
    assert_eq!(with("imageSize", 8.into()).unwrap().image_size, [8, 8]);
}

#[test]
fn relative_position_index_follows_the_reference_layout() {
    // 14x14: the three [CLS] entries are 729 (query), 730 (key), 731 (CLS-CLS).
    let idx = relative_position_index(14, 14);
    let t = 197;
    assert_eq!(idx[0], 731);
    assert!((1..t).all(|k| idx[k] == 729 && idx[k * t] == 730));
    // Same patch: offset (0, 0) -> (h-1)*(2w-1) + (w-1) = 13*27 + 13.
    assert_eq!(idx[t + 1], 364);
    // Non-square 2x3 grid: query (0,0), key (1,2): dy=-1, dx=-2 -> (0)*(5) + 0 = 0.
    let idx = relative_position_index(2, 3);
    let t = 7;
    assert_eq!(idx[t + 6], 0);
    // Query (1,2), key (0,0): dy=1, dx=2 -> 2*5 + 4 = 14, the largest patch entry.
    assert_eq!(idx[6 * t + 1], 14);
    assert_eq!(*idx.iter().max().unwrap(), 17);
}

fn trainer(cfg: BeitConfig, seed: u64) -> BeitTrainer {
    BeitTrainer::new(cfg, AdamWConfig::default(), seed).unwrap()
}

/// At the reference initialisation, through both training paths: candle's autograd (the GPU
/// path) and the CPU engine.
#[test]
fn every_trainable_tensor_receives_a_finite_nonzero_gradient() {
    for cfg in [
        BeitConfig { use_absolute_position_embeddings: true, drop_path_rate: 0.1, ..tiny_config() },
        BeitConfig { use_shared_relative_position_bias: false, use_relative_position_bias: true, ..tiny_config() },
    ] {
        let (model, vars) = mim_model(&cfg, 3, DType::F32);
        let b = batch(&cfg, 3, 1);
        let px = candle_core::Tensor::from_slice(&b.pixels, (3, 1, 4, 6), &candle_core::Device::Cpu).unwrap();
        let (w, pos) = mask_tensors(&b.mask, 3, cfg.num_patches(), &candle_core::Device::Cpu).unwrap();
        let ids: Vec<u32> = b.mask.iter().zip(&b.targets).filter(|(m, _)| **m == 1).map(|(_, &t)| t as u32).collect();
        let targets = candle_core::Tensor::new(ids.as_slice(), &candle_core::Device::Cpu).unwrap();
        let draws = Draws { seed: 5, first_sample: 0 };
        let hidden = model.hidden_states(&px, Some(&w), Some(draws)).unwrap();
        let (loss, _) = masked_loss(&model.logits_at(&hidden, &pos).unwrap(), &targets).unwrap();
        let grads = loss.backward().unwrap();
        let mut engine = mim_engine::<f32>(&cfg, &vars);
        engine.loss_and_grads(&b.pixels, &b.mask, &ids, draws, 1.0).unwrap();
        for (name, var) in &vars {
            let g = grads.get(var).unwrap_or_else(|| panic!("{name}: no gradient"));
            let candle = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let ours = slot(&engine.flat, name).of(&engine.flat.grads);
            for (path, v) in [("candle", &candle[..]), ("engine", ours)] {
                assert!(v.iter().all(|x| x.is_finite()), "{path}: {name}: non-finite gradient");
                assert!(v.iter().any(|&x| x != 0.0), "{path}: {name}: all-zero gradient");
            }
        }
    }
}

#[test]
fn a_tiny_model_overfits_one_batch() {
    let cfg = BeitConfig {
        image_size: [16, 16],
        patch_size: 4,
        num_channels: 1,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        vocab_size: 16,
        drop_path_rate: 0.0,
        ..tiny_config()
    };
    let mut t = BeitTrainer::new(cfg.clone(), AdamWConfig { weight_decay: 0.0, ..Default::default() }, 7).unwrap();
    let b = batch(&cfg, 4, 2);
    let first = t.train_step(&b.view(), 5e-3, 0).unwrap();
    let mut last = first;
    for step in 1..300 {
        last = t.train_step(&b.view(), 5e-3, step).unwrap();
    }
    assert!(first.loss > 2.0, "initial loss {} should be near ln(16)", first.loss);
    assert!(last.loss < 0.1 * first.loss, "loss fell from {} only to {}", first.loss, last.loss);
    assert!(last.mlm_acc > 0.95, "accuracy {}", last.mlm_acc);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let cfg = tiny_config();
    let mut t = trainer(cfg.clone(), 1);
    let good = batch(&cfg, 2, 3);
    let cases: Vec<(Batch, &str)> = vec![
        (Batch { pixels: good.pixels[..47].to_vec(), ..batch(&cfg, 2, 3) }, "pixels: expected a multiple of 24"),
        (Batch { mask: good.mask[..11].to_vec(), ..batch(&cfg, 2, 3) }, "mask: expected 12 values (B*N = 2*6), got 11"),
        (Batch { mask: vec![0; 12], ..batch(&cfg, 2, 3) }, "no patch of the batch is masked"),
        (Batch { mask: vec![2; 12], ..batch(&cfg, 2, 3) }, "values must be 0 or 1"),
        (Batch { targets: vec![7; 12], ..batch(&cfg, 2, 3) }, "token id 7 at index 1 is out of range [0, 7)"),
        (Batch { targets: vec![0; 5], ..batch(&cfg, 2, 3) }, "targets: expected 12 values"),
        (Batch { pixels: vec![f32::NAN; 48], ..batch(&cfg, 2, 3) }, "not finite"),
    ];
    for (b, expected) in cases {
        match t.train_step(&b.view(), 1e-3, 0) {
            Err(Error::Input(msg)) => assert!(msg.contains(expected), "{msg:?} should contain {expected:?}"),
            other => panic!("expected an input error containing {expected:?}, got {:?}", other.map(|m| m.loss)),
        }
    }
    // Targets at unmasked positions are never read, so any value is fine there.
    let mut b = batch(&cfg, 2, 3);
    for (m, t) in b.mask.iter().zip(b.targets.iter_mut()) {
        if *m == 0 {
            *t = -5;
        }
    }
    t.train_step(&b.view(), 1e-3, 0).unwrap();
    let err = t.train_step(&good.view(), f64::NAN, 0).unwrap_err().to_string();
    assert!(err.contains("lr must be a finite number"), "{err}");
}

#[test]
fn non_square_grayscale_and_rgb_inputs_train() {
    for channels in [1, 3] {
        let cfg = BeitConfig { image_size: [8, 12], patch_size: 4, num_channels: channels, ..tiny_config() };
        let mut t = trainer(cfg.clone(), 2);
        let m = t.train_step(&batch(&cfg, 2, 4).view(), 1e-3, 0).unwrap();
        assert!(m.loss.is_finite() && m.grad_norm > 0.0);
        let p = t.forward(&batch(&cfg, 2, 4).pixels, &batch(&cfg, 2, 4).mask).unwrap();
        assert_eq!(p.logits.len(), p.num_masked * cfg.vocab_size);
        assert!(p.ids.iter().all(|&i| (0..7).contains(&i)));
    }
}

#[test]
fn the_preset_table_reaches_json_in_its_order() {
    let json: serde_json::Value = serde_json::from_str(&beit_core::presets::presets_json()).unwrap();
    let names: Vec<_> = json["beit"].as_object().unwrap().keys().cloned().collect();
    let tokenizers: Vec<_> = json["tokenizer"].as_object().unwrap().keys().cloned().collect();
    // serde_json's maps sort their keys; the table's order is the one users read.
    let raw = beit_core::presets::presets_json();
    let position = |name: &str| raw.find(&format!("\"{name}\":")).unwrap();
    assert!(["mini", "tiny", "small", "base", "large"].windows(2).all(|w| position(w[0]) < position(w[1])));
    assert_eq!(names.len(), 5);
    assert_eq!(tokenizers.len(), 3);
    let base: BeitConfig = serde_json::from_value(json["beit"]["base"].clone()).unwrap();
    assert_eq!(base, beit_core::presets::beit("base").unwrap());
}
