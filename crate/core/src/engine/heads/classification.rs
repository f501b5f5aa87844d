//! Classification on the engine: the backbone without a mask token, and the classification
//! head (mean-pooled patches or [CLS], LayerNorm, `classifier`) with the label-smoothed
//! cross-entropy.

use super::norm_linear::{NormLinear, Pool};
use crate::arch::classification::ClassifierParams;
use crate::config::Precision;
use crate::config::{ClassifierConfig, Pooling};
use crate::engine::backbone::Backbone;
use crate::engine::block::Shapes;
use crate::engine::simd::Real;
use crate::engine::{finite, kernels, EngineModel, Flat, Loss};
use crate::error::{Error, Result};
use crate::rng::Draws;

pub struct ClassifierEngine<T> {
    pub flat: Flat<T>,
    backbone: Backbone<T>,
    head: NormLinear<T>,
}

impl<T: Real> ClassifierEngine<T> {
    /// The classifier of `p` over `flat`, its linear layers' GEMMs at `precision`.
    pub fn new(cfg: &ClassifierConfig, p: &ClassifierParams, flat: Flat<T>, precision: Precision) -> Result<Self> {
        let backbone = Backbone::new(&cfg.model, &p.backbone, &flat.layout, precision)?;
        let pool = match p.head.pooling {
            Pooling::Mean => Pool::MeanOfPatches,
            Pooling::Cls => Pool::Rows,
        };
        let head = NormLinear::new(&p.head.norm, &p.head.classifier, pool, &flat.layout, precision);
        Ok(Self { flat, backbone, head })
    }

    /// Adds the gradient of `loss_weight` x the mean label-smoothed cross-entropy over the
    /// images (`labels`: one per image) to the gradient buffer.
    pub fn loss_and_grads(
        &mut self,
        pixels: &[T],
        labels: &[u32],
        smoothing: f64,
        draws: Draws,
        loss_weight: f64,
    ) -> Result<Loss> {
        let s = self.backbone.shapes(pixels.len(), None)?;
        if labels.len() != s.batch {
            return Err(Error::Input(format!(
                "labels: expected {} values (one per image), got {}",
                s.batch,
                labels.len()
            )));
        }
        cls_rows(&mut self.head.rows, s);
        let p = &self.flat.params;
        self.backbone.forward_train(p, pixels, None, draws)?;
        let last = self.backbone.num_layers();
        let logits = self.head.forward(p, self.backbone.hidden(last), s);
        let (sum, hits) = kernels::cross_entropy(logits, labels, smoothing, loss_weight / s.batch as f64);
        let loss = finite(sum / s.batch as f64)?;
        self.flat.grads_mut();
        self.head.backward(&self.flat.params, &mut self.flat.grads, s, self.backbone.hidden_grad(last));
        self.backbone.backward(&self.flat.params, &mut self.flat.grads, None);
        Ok(Loss { loss, hits, rows: s.batch })
    }

    /// Class logits [images, labels] (no stochastic depth).
    pub fn logits(&mut self, pixels: &[T]) -> Result<Vec<T>> {
        let p = &self.flat.params;
        let (s, x) = self.backbone.forward_eval(p, pixels, None, self.backbone.num_layers())?;
        cls_rows(&mut self.head.rows, s);
        Ok(self.head.forward(p, x, s).to_vec())
    }
}

/// Each image's [CLS] row.
fn cls_rows(rows: &mut Vec<usize>, s: Shapes) {
    rows.clear();
    rows.extend((0..s.batch).map(|b| b * s.tokens));
}

impl EngineModel for ClassifierEngine<f32> {
    fn flat(&self) -> &Flat<f32> {
        &self.flat
    }
    fn flat_mut(&mut self) -> &mut Flat<f32> {
        &mut self.flat
    }
    fn release_buffers(&mut self) {
        self.backbone.release_buffers();
    }

    fn set_precision(&mut self, precision: Precision) {
        self.backbone.set_precision(precision);
        self.head.set_precision(precision);
    }
}
