//! Finite-difference gradient checks (f64, tiny shapes) for every custom op and for whole
//! blocks, the whole MIM loss and the whole classification loss.

mod common;

use beit_core::arch::backbone::BackboneParams;
use beit_core::config::{BeitConfig, ClassifierConfig, Pooling, Precision};
use beit_core::model::backbone::Layer;
use beit_core::model::classification::classification_loss;
use beit_core::model::mim::{mask_tensors, masked_loss};
use beit_core::ops;
use beit_core::params::ParamTable;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use common::*;

const TOL: f64 = OP_TOLERANCE;

/// Every named variable's gradient against finite differences of `f` (up to `coords` entries
/// each); `context` prefixes the messages.
fn check_vars(context: &str, vars: &NamedVars, grads: &GradStore, f: &dyn Fn() -> f64, coords: usize) {
    for (name, var) in vars {
        let g = grads.get(var).unwrap_or_else(|| panic!("{context}{name} got no gradient"));
        let err = grad_check(var, g, f, coords);
        assert!(err < TOL, "{context}{name}: relative gradient error {err:e}");
    }
}

#[test]
fn layer_norm_gradients() {
    check_op(&[&[3, 4, 5], &[5], &[5]], |t| ops::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap());
}

#[test]
fn softmax_gradients() {
    check_op(&[&[2, 3, 6]], |t| ops::softmax_last_dim(&(&t[0] * 3.0).unwrap()).unwrap());
}

#[test]
fn scaled_softmax_gradients() {
    check_op(&[&[2, 3, 4, 5], &[3, 4, 5]], |t| ops::scaled_softmax(&t[0], Some(&t[1]), 2.5).unwrap());
    check_op(&[&[3, 6]], |t| ops::scaled_softmax(&t[0], None, 0.4).unwrap());
}

#[test]
fn gelu_gradients() {
    check_op(&[&[4, 9]], |t| ops::gelu_erf(&(&t[0] * 2.0).unwrap()).unwrap());
}

#[test]
fn cross_entropy_gradients() {
    let targets = Tensor::new(&[0u32, 4, 2, 2], &Device::Cpu).unwrap();
    check_op(&[&[4, 5]], |t| ops::cross_entropy_rows(&t[0], &targets).unwrap());
}

/// Every parameter and the input of one transformer block (with its own relative bias table
/// and LayerScale) against finite differences.
#[test]
fn transformer_block_gradients() {
    let cfg =
        BeitConfig { use_shared_relative_position_bias: false, use_relative_position_bias: true, ..tiny_config() };
    let mut table = ParamTable::new();
    let backbone = BackboneParams::new(&cfg, false, &mut table);
    let (layer, vars) =
        build(&table, 1, DType::F64, |v| Layer::new(&cfg, &backbone.layers[0], v, &Device::Cpu, Precision::F32));
    // The block's own tensors (the table holds the whole backbone).
    let vars: NamedVars = vars.into_iter().filter(|(n, _)| n.starts_with("beit.encoder.layer.0.")).collect();
    assert_eq!(vars.len(), 18, "the block's tensors: {:?}", vars.iter().map(|(n, _)| n).collect::<Vec<_>>());
    randomise(&vars, 50, 0.5);
    let x = Var::from_tensor(&random_tensor(&[2, cfg.num_patches() + 1, cfg.hidden_size], 3, DType::F64)).unwrap();
    let probe = random_tensor(x.dims(), 4, DType::F64);
    let objective = || layer.forward(x.as_tensor(), None, None).unwrap().mul(&probe).unwrap().sum_all().unwrap();
    let grads = objective().backward().unwrap();
    let f = || objective().to_scalar::<f64>().unwrap();
    let err = grad_check(&x, grads.get(&x).unwrap(), &f, 40);
    assert!(err < TOL, "input: relative gradient error {err:e}");
    check_vars("", &vars, &grads, &f, 24);
}

/// The whole MIM objective (patch embedding, mask token, [CLS], absolute and shared relative
/// positions, blocks, final norm, head, masked cross-entropy) against finite differences.
#[test]
fn whole_mim_loss_gradients() {
    let cfg = BeitConfig { use_absolute_position_embeddings: true, ..tiny_config() };
    let (mim, vars) = mim_model(&cfg, 2, DType::F64);
    randomise(&vars, 70, 0.5);
    let n = cfg.num_patches();
    let mask: Vec<u8> = (0..2 * n).map(|i| (i % 3 == 0) as u8).collect();
    let (weights, positions) = mask_tensors(&mask, 2, n, &Device::Cpu).unwrap();
    let targets: Vec<u32> = (0..positions.elem_count() as u32).map(|i| i % 7).collect();
    let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
    let pixels = random_tensor(&[2, 1, 4, 6], 5, DType::F64);
    let objective = || {
        let hidden = mim.hidden_states(&pixels, Some(&weights), None).unwrap();
        let logits = mim.logits_at(&hidden, &positions).unwrap();
        masked_loss(&logits, &targets).unwrap().0
    };
    let grads = objective().backward().unwrap();
    let f = || objective().to_scalar::<f64>().unwrap();
    check_vars("", &vars, &grads, &f, 6);
}

/// The whole fine-tuning objective (backbone with per-layer relative positions, mean pooling or
/// [CLS], the pooled LayerNorm, head, label-smoothed cross-entropy) against finite differences.
#[test]
fn whole_classification_loss_gradients() {
    for pooling in [Pooling::Mean, Pooling::Cls] {
        let model_cfg =
            BeitConfig { use_shared_relative_position_bias: false, use_relative_position_bias: true, ..tiny_config() };
        let cfg = ClassifierConfig { model: model_cfg, num_labels: 3, pooling, class_names: None };
        let (classifier, vars) = classifier_model(&cfg, 3, DType::F64);
        randomise(&vars, 90, 0.5);
        let pixels = random_tensor(&[2, 1, 4, 6], 6, DType::F64);
        let labels = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
        let objective = || {
            let logits = classifier.forward(&pixels, None).unwrap();
            classification_loss(&logits, &labels, 0.1).unwrap().0
        };
        let grads = objective().backward().unwrap();
        let f = || objective().to_scalar::<f64>().unwrap();
        check_vars(&format!("{pooling:?}: "), &vars, &grads, &f, 6);
    }
}

#[test]
fn add_bias_gradients() {
    check_op(&[&[3, 4, 5], &[5]], |t| ops::add_bias(&t[0], &t[1]).unwrap());
}

#[test]
fn scale_columns_gradients() {
    check_op(&[&[3, 4, 5], &[5]], |t| ops::scale_columns(&t[0], &t[1]).unwrap());
}

/// Table rows picked several times, once, and never (row 4 gets no picks: zero gradient).
#[test]
fn row_lookup_gradients() {
    let lookup = ops::RowLookup::new(&[2, 0, 2, 1, 3, 2, 0], 5, &Device::Cpu).unwrap();
    check_op(&[&[5, 3]], |t| lookup.forward(&t[0]).unwrap());
    let table = Tensor::arange(0f64, 15.0, &Device::Cpu).unwrap().reshape((5, 3)).unwrap();
    let rows = lookup.forward(&table).unwrap().to_vec2::<f64>().unwrap();
    assert_eq!(rows[0], vec![6.0, 7.0, 8.0]);
    assert_eq!(rows[4], vec![9.0, 10.0, 11.0]);
    let err = ops::RowLookup::new(&[0, 5], 5, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("index[1] = 5 but the table has 5 rows"), "{err}");
    let err = lookup.forward(&Tensor::zeros((4, 3), candle_core::DType::F64, &Device::Cpu).unwrap()).unwrap_err();
    assert!(err.to_string().contains("expected a [5, n] table, got shape [4, 3]"), "{err}");
}
