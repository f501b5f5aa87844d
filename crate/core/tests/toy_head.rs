//! The seam for a new head, shown with one: a per-patch regression head that predicts each
//! patch's pixels from the hidden states of two backbone layers (an intermediate one and the
//! last), written in this one file on the engine path (its parameter table, forward, loss and
//! backward) with no change to the backbone, and checked against finite differences in f64.

mod common;

use beit_core::arch::backbone::BackboneParams;
use beit_core::config::BeitConfig;
use beit_core::config::Precision;
use beit_core::engine::backbone::Backbone;
use beit_core::engine::linear::Linear;
use beit_core::engine::Flat;
use beit_core::params::{Init, LinearParams, ParamTable, Source};
use beit_core::rng::Draws;
use common::*;

/// The head's parameter table: one linear map from a patch's hidden state to its pixels,
/// under `regression_head.` (layer id L + 1, as BEiT's heads).
struct RegressionHeadParams {
    projection: LinearParams,
}

impl RegressionHeadParams {
    fn new(cfg: &BeitConfig, table: &mut ParamTable) -> Self {
        let pixels = cfg.num_channels * cfg.patch_size * cfg.patch_size;
        let mut s = table.scope("regression_head.projection", cfg.num_hidden_layers + 1);
        Self { projection: s.linear(cfg.hidden_size, pixels, true, Init::TruncatedNormal(0.02)) }
    }
}

/// Backbone + head over one flat buffer.
struct RegressionModel {
    flat: Flat<f64>,
    backbone: Backbone<f64>,
    head: Linear,
    /// The backbone layers the head reads; their hidden states are summed.
    layers: [usize; 2],
}

impl RegressionModel {
    fn new(cfg: &BeitConfig, seed: u64) -> Self {
        let mut table = ParamTable::new();
        let backbone = BackboneParams::new(cfg, false, &mut table);
        let head = RegressionHeadParams::new(cfg, &mut table);
        let values: Vec<f64> = Source::Init(seed)
            .values(&table)
            .unwrap()
            .iter()
            .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .map(f64::from)
            .collect();
        let flat = Flat::new(table, values).unwrap();
        let backbone_engine = Backbone::new(cfg, &backbone, &flat.layout, Precision::F32).unwrap();
        let head = Linear::new(&head.projection, &flat.layout, Precision::F32);
        Self { flat, backbone: backbone_engine, head, layers: [1, cfg.num_hidden_layers] }
    }

    /// The patch rows of x [B*T, D] (each image's [CLS] row dropped), and per row the target:
    /// the patch's pixels in the projection weight's order (c, py, px).
    fn patch_rows(&self, x: &[f64], b: usize) -> Vec<f64> {
        let (d, t) = (self.head.n_in, x.len() / (b * self.head.n_in));
        (0..b).flat_map(|i| x[(i * t + 1) * d..(i + 1) * t * d].to_vec()).collect()
    }

    /// Mean squared error over every pixel of every patch; adds its gradient.
    fn loss_and_grads(&mut self, pixels: &[f64], targets: &[f64], seed: u64) -> f64 {
        let p = &self.flat.params;
        let s = self.backbone.forward_train(p, pixels, None, Draws { seed, first_sample: 0 }).unwrap();
        let (a, z) = (
            self.patch_rows(self.backbone.hidden(self.layers[0]), s.batch),
            self.patch_rows(self.backbone.hidden(self.layers[1]), s.batch),
        );
        let input: Vec<f64> = a.iter().zip(&z).map(|(a, z)| a + z).collect();
        let mut out = vec![0.0; targets.len()];
        self.head.forward(p, &input, &mut out);
        let n = targets.len() as f64;
        let loss = out.iter().zip(targets).map(|(o, t)| (o - t) * (o - t)).sum::<f64>() / n;
        let dout: Vec<f64> = out.iter().zip(targets).map(|(o, t)| 2.0 * (o - t) / n).collect();
        self.flat.grads_mut();
        let mut dinput = vec![0.0; input.len()];
        self.head.backward(&self.flat.params, &mut self.flat.grads, &input, &dout, Some(&mut dinput), &mut Vec::new());
        // d input reaches both layers' patch rows; [CLS] rows get none.
        let d = s.d;
        for layer in self.layers {
            let dx = self.backbone.hidden_grad(layer);
            for i in 0..s.batch {
                for j in 0..s.patches {
                    let (row, src) = (i * s.tokens + 1 + j, i * s.patches + j);
                    for k in 0..d {
                        dx[row * d + k] += dinput[src * d + k];
                    }
                }
            }
        }
        self.backbone.backward(&self.flat.params, &mut self.flat.grads, None);
        loss
    }
}

#[test]
fn a_regression_head_on_two_layers_trains_through_the_backbone_seam() {
    let cfg = BeitConfig {
        num_hidden_layers: 3,
        drop_path_rate: 0.3,
        use_absolute_position_embeddings: true,
        ..tiny_config()
    };
    let mut model = RegressionModel::new(&cfg, 4);
    // Away from the initialisation (zero biases, near-uniform attention), so that every
    // gradient is large enough for finite differences to resolve.
    let mut rng = beit_core::rng::SplitMix64::new(9);
    model.flat.params.iter_mut().for_each(|v| *v = 0.5 * rng.normal());
    let batch = 2;
    let pixels: Vec<f64> = random_tensor(&[batch * 24], 5, candle_core::DType::F64).to_vec1().unwrap();
    let targets: Vec<f64> =
        random_tensor(&[batch * cfg.num_patches() * 4], 6, candle_core::DType::F64).to_vec1().unwrap();
    let seed = 11;
    model.loss_and_grads(&pixels, &targets, seed);
    let analytic = model.flat.grads.clone();
    let (table, layout) = (model.flat.table.clone(), model.flat.layout.clone());
    for (p, s) in table.params().iter().zip(layout.slots()) {
        let g = s.of(&analytic);
        assert!(g.iter().any(|&v| v != 0.0), "{}: all-zero gradient", p.name);
        let (mut worst, mut scale) = (0.0f64, 1e-6f64);
        for i in (0..s.len).step_by((s.len / 4).max(1)) {
            let at = s.offset + i;
            let base = model.flat.params[at];
            let mut f = |v: f64| {
                model.flat.params[at] = v;
                model.loss_and_grads(&pixels, &targets, seed)
            };
            let numeric = (f(base + 1e-5) - f(base - 1e-5)) / 2e-5;
            model.flat.params[at] = base;
            worst = worst.max((numeric - analytic[at]).abs());
            scale = scale.max(numeric.abs()).max(analytic[at].abs());
        }
        assert!(worst / scale < 1e-6, "{}: finite-difference error {:e}", p.name, worst / scale);
    }
}
