//! Masked image modeling on the engine: the backbone with its mask token, and the MIM head
//! (final LayerNorm, `lm_head`) on the masked patches only, with the cross-entropy against
//! the tokenizer's ids.

use super::norm_linear::{NormLinear, Pool};
use crate::arch::mim::MimParams;
use crate::config::BeitConfig;
use crate::config::Precision;
use crate::engine::backbone::Backbone;
use crate::engine::block::Shapes;
use crate::engine::simd::Real;
use crate::engine::{finite, kernels, EngineModel, Flat, Loss};
use crate::error::{Error, Result};
use crate::rng::Draws;

pub struct MimEngine<T> {
    pub flat: Flat<T>,
    backbone: Backbone<T>,
    head: NormLinear<T>,
}

impl<T: Real> MimEngine<T> {
    /// The model of `p` over `flat` (weights in the layout of `p`'s table), its linear layers'
    /// GEMMs at `precision`.
    pub fn new(cfg: &BeitConfig, p: &MimParams, flat: Flat<T>, precision: Precision) -> Result<Self> {
        let backbone = Backbone::new(cfg, &p.backbone, &flat.layout, precision)?;
        let head = NormLinear::new(&p.head.layernorm, &p.head.lm_head, Pool::Rows, &flat.layout, precision);
        Ok(Self { flat, backbone, head })
    }

    /// Adds the gradient of `loss_weight` x the mean cross-entropy over the masked patches
    /// (`targets`: their ids, in order) to the gradient buffer.
    pub fn loss_and_grads(
        &mut self,
        pixels: &[T],
        mask: &[u8],
        targets: &[u32],
        draws: Draws,
        loss_weight: f64,
    ) -> Result<Loss> {
        let s = self.backbone.shapes(pixels.len(), Some(mask))?;
        masked_rows(&mut self.head.rows, mask, s);
        let m = self.head.rows.len();
        if m == 0 || targets.len() != m {
            return Err(Error::Input(format!(
                "targets: expected {m} values (one per masked patch), got {}",
                targets.len()
            )));
        }
        let p = &self.flat.params;
        self.backbone.forward_train(p, pixels, Some(mask), draws)?;
        let last = self.backbone.num_layers();
        let logits = self.head.forward(p, self.backbone.hidden(last), s);
        let (sum, hits) = kernels::cross_entropy(logits, targets, 0.0, loss_weight / m as f64);
        let loss = finite(sum / m as f64)?;
        self.flat.grads_mut();
        self.head.backward(&self.flat.params, &mut self.flat.grads, s, self.backbone.hidden_grad(last));
        self.backbone.backward(&self.flat.params, &mut self.flat.grads, Some(mask));
        Ok(Loss { loss, hits, rows: m })
    }

    /// Evaluation logits [masked patches, vocab] (no stochastic depth).
    pub fn logits(&mut self, pixels: &[T], mask: &[u8]) -> Result<Vec<T>> {
        let p = &self.flat.params;
        let (s, x) = self.backbone.forward_eval(p, pixels, Some(mask), self.backbone.num_layers())?;
        masked_rows(&mut self.head.rows, mask, s);
        Ok(self.head.forward(p, x, s).to_vec())
    }

    /// Linear-probe features of layer `layer` (0 = embeddings), [B, 2D].
    pub fn probe_features(&mut self, pixels: &[T], layer: usize) -> Result<Vec<T>> {
        self.backbone.probe_features(&self.flat.params, pixels, layer)
    }
}

/// The rows of x of the masked patches, in batch-major, row-major patch order.
fn masked_rows(rows: &mut Vec<usize>, mask: &[u8], s: Shapes) {
    rows.clear();
    let masked = mask.iter().enumerate().filter(|(_, &m)| m != 0);
    rows.extend(masked.map(|(i, _)| (i / s.patches) * s.tokens + 1 + i % s.patches));
}

impl EngineModel for MimEngine<f32> {
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
