mod common;

use beit_core::arch::classification::ClassifierParams;
use beit_core::arch::mim::MimParams;
use beit_core::optim::{flatten_grads, AdamW};
use beit_core::params::{Init, ParamTable};
use beit_core::{AdamWConfig, ClassifierConfig, Pooling};
use candle_core::{Device, Tensor, Var};
use common::tiny_config;

/// A table of one linear layer `lin` (weight decayed, bias not).
fn linear_table(n_in: usize, n_out: usize) -> ParamTable {
    let mut table = ParamTable::new();
    table.scope("lin", 0).linear(n_in, n_out, true, Init::Constant(0.0));
    table
}

/// Plain scalar AdamW (PyTorch's formulation) as the reference.
#[allow(clippy::too_many_arguments)]
fn reference(p: &mut [f64], m: &mut [f64], v: &mut [f64], g: &[f64], t: i32, lr: f64, c: &AdamWConfig, decay: bool) {
    for i in 0..p.len() {
        if decay {
            p[i] -= lr * c.weight_decay * p[i];
        }
        m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g[i];
        v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * g[i] * g[i];
        let mh = m[i] / (1.0 - c.beta1.powi(t));
        let vh = v[i] / (1.0 - c.beta2.powi(t));
        p[i] -= lr * mh / (vh.sqrt() + c.eps);
    }
}

#[test]
fn matches_reference_adamw_with_groups_and_clipping() {
    let cfg = AdamWConfig { weight_decay: 0.1, clip_grad_norm: 0.5, ..Default::default() };
    let w = Var::from_tensor(&Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &Device::Cpu).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::new(&[0.3f32, -0.7], &Device::Cpu).unwrap()).unwrap();
    let mut opt = AdamW::new(cfg.clone(), &linear_table(2, 2), &[w.clone(), b.clone()], &[1.0, 1.0]).unwrap();
    let mut rp = [vec![0.5, -1.0, 2.0, 0.25], vec![0.3, -0.7]];
    let mut rm = [vec![0.0; 4], vec![0.0; 2]];
    let mut rv = [vec![0.0; 4], vec![0.0; 2]];
    let x = Tensor::new(&[[1.0f32, 2.0], [-3.0, 0.5]], &Device::Cpu).unwrap();
    for t in 1..=5 {
        let loss = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap().sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let gw: Vec<f64> =
            grads.get(&w).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|&v| v as f64).collect();
        let gb: Vec<f64> = grads.get(&b).unwrap().to_vec1::<f32>().unwrap().iter().map(|&v| v as f64).collect();
        let norm = (gw.iter().chain(&gb).map(|g| g * g).sum::<f64>()).sqrt();
        let scale = if norm > cfg.clip_grad_norm { cfg.clip_grad_norm / (norm + 1e-6) } else { 1.0 };
        let reported = opt.step(&flatten_grads(&[w.clone(), b.clone()], &grads).unwrap(), 1.0, 0.01).unwrap();
        assert!((reported - norm).abs() < 1e-4 * norm, "grad norm {reported} vs {norm}");
        for (i, g) in [gw, gb].iter().enumerate() {
            let g: Vec<f64> = g.iter().map(|v| v * scale).collect();
            reference(&mut rp[i], &mut rm[i], &mut rv[i], &g, t, 0.01, &cfg, i == 0);
        }
        let ours: Vec<f32> =
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().chain(b.to_vec1::<f32>().unwrap()).collect();
        for (o, r) in ours.iter().zip(rp[0].iter().chain(&rp[1])) {
            assert!((*o as f64 - r).abs() < 1e-5, "step {t}: {o} vs {r}");
        }
    }
}

/// unilm/timm BEiT's rule, as the oracle: no decay for 1-D tensors (biases, norms,
/// LayerScale), [CLS] and mask tokens, position embeddings and relative-position tables.
fn reference_exempt(name: &str, rank: usize) -> bool {
    const EXEMPT: [&str; 4] = ["cls_token", "mask_token", "position_embeddings", "relative_position_bias_table"];
    rank <= 1 || name.ends_with(".bias") || EXEMPT.iter().any(|e| name.ends_with(e))
}

#[test]
fn decay_groups_of_the_tables_follow_the_reference_exemptions() {
    let cfg = beit_core::BeitConfig { use_absolute_position_embeddings: true, ..tiny_config() };
    let per_layer = beit_core::BeitConfig {
        use_shared_relative_position_bias: false,
        use_relative_position_bias: true,
        ..cfg.clone()
    };
    let tables = [
        MimParams::new(&cfg).0,
        ClassifierParams::new(&ClassifierConfig {
            model: per_layer.clone(),
            num_labels: 3,
            pooling: Pooling::Mean,
            class_names: None,
        })
        .0,
        ClassifierParams::new(&ClassifierConfig {
            model: per_layer,
            num_labels: 3,
            pooling: Pooling::Cls,
            class_names: None,
        })
        .0,
    ];
    let mut decayed = 0;
    for table in &tables {
        for p in table.params() {
            assert_eq!(p.decay, !reference_exempt(&p.name, p.shape.len()), "{}", p.name);
            decayed += p.decay as usize;
        }
    }
    assert!(decayed > 0);
}

#[test]
fn invalid_hyperparameters_and_non_finite_gradients_are_errors() {
    let err = AdamW::new(AdamWConfig { beta1: 1.0, ..Default::default() }, &ParamTable::new(), &[], &[])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("beta1 must be in [0, 1)"), "{err}");
    let w = Var::from_tensor(&Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap()).unwrap();
    let mut table = ParamTable::new();
    table.scope("", 0).weight("w", &[2], Init::Constant(0.0));
    let mut opt = AdamW::new(AdamWConfig::default(), &table, std::slice::from_ref(&w), &[1.0]).unwrap();
    let loss = (w.as_tensor() * f64::INFINITY).unwrap().sum_all().unwrap();
    let grads = flatten_grads(std::slice::from_ref(&w), &loss.backward().unwrap()).unwrap();
    let err = opt.step(&grads, 1.0, 0.1).unwrap_err().to_string();
    assert!(err.contains("gradient norm is") && err.contains("unchanged"), "{err}");
    assert_eq!(w.to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
    assert_eq!(opt.step, 0);
}
