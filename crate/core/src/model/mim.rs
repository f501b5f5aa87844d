//! BEiT with the masked-image-modeling head on candle (Hugging Face's
//! `BeitForMaskedImageModeling`), and the masked cross-entropy.

use candle_core::{DType, Device, Module, Result, Tensor, D};

use super::backbone::BeitModel;
use super::{at_least_f32, LayerNorm, Linear, Vars};
use crate::arch::mim::MimParams;
use crate::config::{BeitConfig, Precision};
use crate::ops;
use crate::rng::Draws;

pub struct BeitForMaskedImageModeling {
    beit: BeitModel,
    layernorm: LayerNorm,
    lm_head: Linear,
}

impl BeitForMaskedImageModeling {
    pub fn new(cfg: &BeitConfig, p: &MimParams, vars: &Vars, device: &Device) -> Result<Self> {
        Ok(Self {
            beit: BeitModel::new(cfg, &p.backbone, vars, device, Precision::F32)?,
            layernorm: LayerNorm::new(&p.head.layernorm, vars),
            lm_head: Linear::new(&p.head.lm_head, vars, Precision::F32),
        })
    }

    /// Final hidden states [B, N+1, D] (after the final LayerNorm).
    pub fn hidden_states(&self, pixels: &Tensor, mask: Option<&Tensor>, draws: Option<Draws>) -> Result<Tensor> {
        self.layernorm.forward(&self.beit.forward(pixels, mask, draws, self.beit.num_layers())?)
    }

    pub fn backbone(&self) -> &BeitModel {
        &self.beit
    }

    /// Vocabulary logits [M, V] of the patches at `positions` (flat indices b * N + n), so the
    /// head runs on masked patches only.
    pub fn logits_at(&self, hidden: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let (b, t, d) = hidden.dims3()?;
        let patches = hidden.narrow(1, 1, t - 1)?.contiguous()?.reshape((b * (t - 1), d))?;
        self.lm_head.forward(&patches.index_select(positions, 0)?)
    }
}

/// Mask [B, N] as 0/1 floats for the embeddings, and the flat masked positions.
pub fn mask_tensors(mask: &[u8], batch: usize, n: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let weights: Vec<f32> = mask.iter().map(|&m| m as f32).collect();
    let positions: Vec<u32> = mask.iter().enumerate().filter(|(_, &m)| m != 0).map(|(i, _)| i as u32).collect();
    let count = positions.len();
    Ok((Tensor::from_vec(weights, (batch, n), dev)?, Tensor::from_vec(positions, count, dev)?))
}

/// Mean cross-entropy and accuracy of `logits` [M, V] against `targets` [M] (u32).
pub fn masked_loss(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, f64)> {
    let logits = &at_least_f32(logits)?;
    let losses = ops::cross_entropy_rows(logits, targets)?;
    let loss = losses.mean_all()?;
    let hits = logits.argmax(D::Minus1)?.eq(targets)?.to_dtype(DType::F64)?.mean_all()?;
    Ok((loss, hits.to_scalar::<f64>()?))
}
