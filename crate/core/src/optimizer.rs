//! AdamW's settings and its checkpoint format (moments as `optimizer.exp_avg.<param>` and
//! `optimizer.exp_avg_sq.<param>` tensors, settings and step in the "optimizer" metadata
//! entry), shared by the engine's flat AdamW and the candle AdamW.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::Loaded;
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 disables clipping.
    pub clip_grad_norm: f64,
}

impl Default for AdamWConfig {
    /// BEiT pretraining: betas (0.9, 0.999), eps 1e-8, weight decay 0.05, clip 3.0.
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05, clip_grad_norm: 3.0 }
    }
}

impl AdamWConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f64| Err(Error::Config(format!("optimizer {what}, got {v}")));
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("beta1 must be in [0, 1)", self.beta1);
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("beta2 must be in [0, 1)", self.beta2);
        }
        if !(self.eps > 0.0) {
            return bad("eps must be positive", self.eps);
        }
        if !(self.weight_decay >= 0.0) {
            return bad("weightDecay must be >= 0", self.weight_decay);
        }
        if !(self.clip_grad_norm >= 0.0) {
            return bad("clipGradNorm must be >= 0 (0 disables clipping)", self.clip_grad_norm);
        }
        Ok(())
    }
}

/// A learning rate must be a finite number >= 0.
pub fn check_lr(lr: f64) -> Result<()> {
    if lr >= 0.0 && lr.is_finite() {
        Ok(())
    } else {
        Err(Error::Input(format!("lr must be a finite number >= 0, got {lr}")))
    }
}

const CHECKPOINT_PREFIX: &str = "optimizer.";

#[derive(Serialize, Deserialize)]
struct OptimizerMeta {
    config: AdamWConfig,
    step: u64,
}

/// An optimizer as read from a checkpoint, to be restored once the model is built.
pub struct SavedOptimizer {
    pub config: AdamWConfig,
    pub step: u64,
    pub moments: HashMap<String, Tensor>,
}

/// The moment `kind` ("exp_avg" or "exp_avg_sq") of parameter `name`, taken out of
/// `moments` (a checkpoint's `optimizer.*` tensors), as f32 of `shape`.
pub fn take_moment(moments: &mut HashMap<String, Tensor>, kind: &str, name: &str, shape: &[usize]) -> Result<Tensor> {
    let key = format!("{kind}.{name}");
    let t = moments.remove(&key).ok_or_else(|| Error::Checkpoint(format!("missing optimizer tensor {key}")))?;
    if t.dims() != shape {
        return Err(Error::Checkpoint(format!("optimizer tensor {key} has shape {:?}, expected {shape:?}", t.dims())));
    }
    Ok(t.to_dtype(DType::F32)?)
}

/// An error naming a checkpoint moment no parameter took.
pub fn reject_unused(moments: &HashMap<String, Tensor>) -> Result<()> {
    match moments.keys().min() {
        Some(extra) => Err(Error::Checkpoint(format!("unexpected optimizer tensor {extra}"))),
        None => Ok(()),
    }
}

/// Adds an optimizer to a checkpoint: its moments `state` (from `state_tensors`) as
/// `optimizer.*` tensors, settings and step in the "optimizer" metadata entry.
pub fn write_checkpoint(
    config: &AdamWConfig,
    step: u64,
    state: Vec<(String, Tensor)>,
    tensors: &mut Vec<(String, Tensor)>,
    metadata: &mut HashMap<String, String>,
) {
    tensors.extend(state.into_iter().map(|(name, t)| (format!("{CHECKPOINT_PREFIX}{name}"), t)));
    let meta = OptimizerMeta { config: config.clone(), step };
    metadata.insert("optimizer".into(), serde_json::to_string(&meta).expect("serialisable"));
}

/// The optimizer part of a checkpoint written by [`write_checkpoint`] (its tensors are taken
/// out of `file`).
pub fn read_checkpoint(file: &mut Loaded, path: &Path) -> Result<SavedOptimizer> {
    let meta: OptimizerMeta = serde_json::from_str(file.meta("optimizer", path)?)
        .map_err(|e| Error::Checkpoint(format!("{}: bad optimizer metadata: {e}", path.display())))?;
    Ok(SavedOptimizer { config: meta.config, step: meta.step, moments: file.take_prefixed(CHECKPOINT_PREFIX) })
}
