//! BEiT with a classification head on candle (Hugging Face's `BeitForImageClassification`),
//! and the label-smoothed cross-entropy.

use candle_core::{DType, Device, Module, Result, Tensor, D};

use super::backbone::BeitModel;
use super::{at_least_f32, LayerNorm, Linear, Vars};
use crate::arch::classification::ClassifierParams;
use crate::config::{ClassifierConfig, Pooling, Precision};
use crate::ops;
use crate::rng::Draws;

pub struct BeitForImageClassification {
    beit: BeitModel,
    norm: LayerNorm,
    pooling: Pooling,
    classifier: Linear,
}

impl BeitForImageClassification {
    pub fn new(cfg: &ClassifierConfig, p: &ClassifierParams, vars: &Vars, device: &Device) -> Result<Self> {
        Ok(Self {
            beit: BeitModel::new(&cfg.model, &p.backbone, vars, device, Precision::F32)?,
            norm: LayerNorm::new(&p.head.norm, vars),
            pooling: cfg.pooling,
            classifier: Linear::new(&p.head.classifier, vars, Precision::F32),
        })
    }

    pub fn backbone(&self) -> &BeitModel {
        &self.beit
    }

    /// The normalised pooled features [B, D] the head reads (transformers' `pooler_output` for
    /// mean pooling).
    pub fn pooled(&self, pixels: &Tensor, draws: Option<Draws>) -> Result<Tensor> {
        let h = self.beit.forward(pixels, None, draws, self.beit.num_layers())?;
        let t = h.dim(1)?;
        let pooled = match self.pooling {
            Pooling::Mean => h.narrow(1, 1, t - 1)?.mean(1)?,
            Pooling::Cls => h.narrow(1, 0, 1)?.squeeze(1)?,
        };
        self.norm.forward(&pooled)
    }

    /// Class logits [B, K]. `draws` drives stochastic depth (training only).
    pub fn forward(&self, pixels: &Tensor, draws: Option<Draws>) -> Result<Tensor> {
        self.classifier.forward(&self.pooled(pixels, draws)?)
    }
}

/// Mean label-smoothed cross-entropy of `logits` [M, K] against `labels` [M] (u32) and the
/// accuracy: (1 - s) * CE(label) + s * CE(uniform) = CE(label) + s * (x_label - mean_k x_k).
pub fn classification_loss(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Result<(Tensor, f64)> {
    let logits = &at_least_f32(logits)?;
    let mut rows = ops::cross_entropy_rows(logits, labels)?;
    if smoothing > 0.0 {
        let picked = logits.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?;
        let spread = picked.sub(&logits.mean(1)?)?.affine(smoothing, 0.0)?;
        rows = rows.add(&spread)?;
    }
    let hits = logits.argmax(D::Minus1)?.eq(labels)?.to_dtype(DType::F64)?.mean_all()?;
    Ok((rows.mean_all()?, hits.to_scalar::<f64>()?))
}
