//! AdamW with fp32 moments, decoupled weight decay by parameter group, global gradient-norm
//! clipping and a per-step learning rate from the caller. Its state is plain tensors so it
//! can be checkpointed with the model. Updates are fused in-place ops (no temporaries).

use candle_core::{backprop::GradStore, bail, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use serde::{Deserialize, Serialize};

#[cfg(feature = "cuda")]
use candle_core::{backend::BackendStorage, CudaStorage};

use std::collections::HashMap;
use std::path::Path;

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

/// Parameters exempt from weight decay, as in unilm/timm BEiT: 1-D tensors (biases, norms,
/// LayerScale), [CLS] and mask tokens, position embeddings and relative-position tables.
pub fn is_decay_exempt(name: &str, rank: usize) -> bool {
    const EXEMPT: [&str; 4] = ["cls_token", "mask_token", "position_embeddings", "relative_position_bias_table"];
    rank <= 1 || name.ends_with(".bias") || EXEMPT.iter().any(|e| name.ends_with(e))
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

pub struct ParamState {
    pub name: String,
    pub var: Var,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub decay: bool,
    /// Multiplies the step's learning rate (layer-wise LR decay); 1 by default.
    pub lr_scale: f64,
}

pub struct AdamW {
    pub config: AdamWConfig,
    pub params: Vec<ParamState>,
    /// Number of updates taken (bias correction uses it).
    pub step: u64,
}

impl AdamW {
    pub fn new(config: AdamWConfig, vars: &[(String, Var)]) -> Result<Self> {
        config.validate()?;
        let params = vars
            .iter()
            .map(|(name, var)| {
                Ok(ParamState {
                    name: name.clone(),
                    var: var.clone(),
                    exp_avg: var.zeros_like()?.to_dtype(DType::F32)?,
                    exp_avg_sq: var.zeros_like()?.to_dtype(DType::F32)?,
                    decay: !is_decay_exempt(name, var.rank()),
                    lr_scale: 1.0,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { config, params, step: 0 })
    }

    /// Points the optimizer at `vars` (the same parameters, rebuilt on `device` by
    /// `params::rebuild_on`) and moves its moments there.
    pub fn move_to(&mut self, vars: &[(String, Var)], device: &candle_core::Device) -> Result<()> {
        if vars.len() != self.params.len() {
            return Err(Error::Config(format!(
                "optimizer has {} parameters, the model {}",
                self.params.len(),
                vars.len()
            )));
        }
        for (p, (name, var)) in self.params.iter_mut().zip(vars) {
            if &p.name != name {
                return Err(Error::Config(format!(
                    "optimizer parameter {} does not match model parameter {name}",
                    p.name
                )));
            }
            p.var = var.clone();
            p.exp_avg = p.exp_avg.to_device(device)?;
            p.exp_avg_sq = p.exp_avg_sq.to_device(device)?;
        }
        Ok(())
    }

    /// Sets each parameter's learning-rate multiplier from its name.
    pub fn set_lr_scales(&mut self, scale: impl Fn(&str) -> f64) {
        for p in &mut self.params {
            p.lr_scale = scale(&p.name);
        }
    }

    /// The optimizer part of a checkpoint written by [`write_checkpoint`] (its tensors are
    /// taken out of `file`).
    pub fn read_checkpoint(file: &mut Loaded, path: &Path) -> Result<SavedOptimizer> {
        let meta: OptimizerMeta = serde_json::from_str(file.meta("optimizer", path)?)
            .map_err(|e| Error::Checkpoint(format!("{}: bad optimizer metadata: {e}", path.display())))?;
        Ok(SavedOptimizer { config: meta.config, step: meta.step, moments: file.take_prefixed(CHECKPOINT_PREFIX) })
    }

    /// The moments as named tensors (`exp_avg.<param>`, `exp_avg_sq.<param>`) for checkpoints.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .flat_map(|p| {
                [
                    (format!("exp_avg.{}", p.name), p.exp_avg.clone()),
                    (format!("exp_avg_sq.{}", p.name), p.exp_avg_sq.clone()),
                ]
            })
            .collect()
    }

    /// Restores moments written by [`AdamW::state_tensors`]; every one must be present with
    /// the parameter's shape, and no other may be.
    pub fn restore(&mut self, mut moments: HashMap<String, Tensor>, step: u64) -> Result<()> {
        for p in &mut self.params {
            for (kind, slot) in [("exp_avg", &mut p.exp_avg), ("exp_avg_sq", &mut p.exp_avg_sq)] {
                *slot = take_moment(&mut moments, kind, &p.name, slot.dims())?.to_device(slot.device())?;
            }
        }
        reject_unused(&moments)?;
        self.step = step;
        Ok(())
    }

    /// Global L2 norm of all gradients.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let present: Vec<&Tensor> = self.params.iter().filter_map(|p| grads.get(&p.var)).collect();
        Ok(crate::ops::sum_of_squares(&present)?.sqrt())
    }

    /// One update at learning rate `lr`. Returns the gradient norm before clipping. A
    /// non-finite norm leaves the parameters untouched and is an error.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<f64> {
        if !(lr >= 0.0 && lr.is_finite()) {
            return Err(Error::Input(format!("lr must be a finite number >= 0, got {lr}")));
        }
        let norm = self.grad_norm(grads)?;
        if !norm.is_finite() {
            return Err(Error::Numeric(format!(
                "gradient norm is {norm}: the update was skipped (parameters unchanged)"
            )));
        }
        let clip = self.config.clip_grad_norm;
        let grad_scale = if clip > 0.0 && norm > clip { clip / (norm + 1e-6) } else { 1.0 };
        self.step += 1;
        let c = &self.config;
        let t = self.step as i32;
        for p in &self.params {
            // Parameters that took no part in this loss get no update, as in PyTorch.
            let Some(g) = grads.get(&p.var) else { continue };
            let g = g.contiguous()?;
            p.exp_avg.inplace_op2(&g, &Moment { beta: c.beta1, grad_scale, squared: false })?;
            p.exp_avg_sq.inplace_op2(&g, &Moment { beta: c.beta2, grad_scale, squared: true })?;
            p.var.as_tensor().inplace_op3(
                &p.exp_avg,
                &p.exp_avg_sq,
                &ParamUpdate {
                    lr: lr * p.lr_scale,
                    weight_decay: if p.decay { c.weight_decay } else { 0.0 },
                    eps: c.eps,
                    bias_correction1: 1.0 - c.beta1.powi(t),
                    bias_correction2: 1.0 - c.beta2.powi(t),
                },
            )?;
        }
        Ok(norm)
    }
}

fn f32_slice<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => bail!("{op}: expected a contiguous f32 tensor"),
    }
}

fn f32_slice_mut<'a>(op: &str, s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => bail!("{op}: expected a contiguous f32 tensor"),
    }
}

/// m = beta * m + (1 - beta) * (s g)    or, squared,    v = beta * v + (1 - beta) * (s g)^2
struct Moment {
    beta: f64,
    grad_scale: f64,
    squared: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let m = f32_slice_mut(self.name(), s1, l1)?;
        let g = f32_slice(self.name(), s2, l2)?;
        let (beta, one_minus, scale) = (self.beta as f32, (1.0 - self.beta) as f32, self.grad_scale as f32);
        for (mi, &gi) in m.iter_mut().zip(g) {
            let gs = gi * scale;
            *mi = beta * *mi + one_minus * if self.squared { gs * gs } else { gs };
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &mut CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> candle_core::Result<()> {
        use crate::cuda::*;
        let dev = s2.device().clone();
        let g = input::<f32>(self.name(), s2, l2)?;
        let mut m = f32_in_out(self.name(), s1, l1)?;
        let (count, beta, scale, squared) =
            (l1.shape().elem_count() as u64, self.beta as f32, self.grad_scale as f32, self.squared as i32);
        launch!(dev, "adamw_moment", elementwise(count as usize), [&mut m, &g, &count, &beta, &scale, &squared])
    }
}

/// p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)
struct ParamUpdate {
    lr: f64,
    weight_decay: f64,
    eps: f64,
    bias_correction1: f64,
    bias_correction2: f64,
}

impl InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let p = f32_slice_mut(self.name(), s1, l1)?;
        let m = f32_slice(self.name(), s2, l2)?;
        let v = f32_slice(self.name(), s3, l3)?;
        let lr = self.lr as f32;
        let decay = (self.lr * self.weight_decay) as f32;
        let inv_bc1 = (1.0 / self.bias_correction1) as f32;
        let inv_sqrt_bc2 = (1.0 / self.bias_correction2.sqrt()) as f32;
        let eps = self.eps as f32;
        for ((pi, &mi), &vi) in p.iter_mut().zip(m).zip(v) {
            let update = (mi * inv_bc1) / (vi.sqrt() * inv_sqrt_bc2 + eps);
            *pi -= lr * update + decay * *pi;
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        use crate::cuda::*;
        let dev = s2.device().clone();
        let (m, v) = (input::<f32>(self.name(), s2, l2)?, input::<f32>(self.name(), s3, l3)?);
        let mut p = f32_in_out(self.name(), s1, l1)?;
        let count = l1.shape().elem_count() as u64;
        let (lr, decay, eps) = (self.lr as f32, (self.lr * self.weight_decay) as f32, self.eps as f32);
        let (inv_bc1, inv_sqrt_bc2) =
            ((1.0 / self.bias_correction1) as f32, (1.0 / self.bias_correction2.sqrt()) as f32);
        launch!(
            dev,
            "adamw_update",
            elementwise(count as usize),
            [&mut p, &m, &v, &count, &lr, &decay, &inv_bc1, &inv_sqrt_bc2, &eps]
        )
    }
}

/// ema = decay * ema + (1 - decay) * p
struct EmaUpdate {
    decay: f64,
}

impl InplaceOp2 for EmaUpdate {
    fn name(&self) -> &'static str {
        "ema-update"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        use candle_core::CpuStorage::F32;
        let (F32(e), F32(p)) = (s1, s2) else { candle_core::bail!("ema-update: expected f32 tensors") };
        let (Some((a1, b1)), Some((a2, b2))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("ema-update: expected contiguous tensors")
        };
        let (d, one_minus) = (self.decay as f32, (1.0 - self.decay) as f32);
        for (ei, &pi) in e[a1..b1].iter_mut().zip(&p[a2..b2]) {
            *ei = d * *ei + one_minus * pi;
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &mut CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> candle_core::Result<()> {
        use crate::cuda::*;
        let dev = s2.device().clone();
        let p = input::<f32>(self.name(), s2, l2)?;
        let mut e = f32_in_out(self.name(), s1, l1)?;
        let (count, decay) = (l1.shape().elem_count() as u64, self.decay as f32);
        launch!(dev, "ema_update", elementwise(count as usize), [&mut e, &p, &count, &decay])
    }
}

/// ema = decay * ema + (1 - decay) * p, in place (a weights' exponential moving average).
pub fn ema_update(ema: &Tensor, p: &Tensor, decay: f64) -> candle_core::Result<()> {
    ema.inplace_op2(p, &EmaUpdate { decay })
}
