//! AdamW on candle (the candle runner and the linear probe): fp32 moments, decoupled weight
//! decay by parameter group, global gradient-norm clipping and a per-step learning rate from
//! the caller, over one flat gradient tensor in table order. Its state is plain tensors so it
//! can be checkpointed with the model. Updates are fused in-place ops (no temporaries).

use std::collections::HashMap;

use candle_core::{backprop::GradStore, bail, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};

#[cfg(feature = "cuda")]
use candle_core::{backend::BackendStorage, CudaStorage};

use crate::error::{Error, Result};
use crate::optimizer::{check_lr, reject_unused, take_moment, AdamWConfig};
use crate::params::ParamTable;

struct ParamState {
    name: String,
    var: Var,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
    /// Multiplies the step's learning rate (layer-wise LR decay).
    lr_scale: f64,
    /// Where its gradient lies in the flat gradient tensor.
    offset: usize,
}

pub struct AdamW {
    pub config: AdamWConfig,
    params: Vec<ParamState>,
    /// Number of updates taken (bias correction uses it).
    pub step: u64,
}

impl AdamW {
    /// AdamW over `vars`, the parameters of `table` in its order, with each one's
    /// learning-rate multiplier.
    pub fn new(config: AdamWConfig, table: &ParamTable, vars: &[Var], lr_scales: &[f64]) -> Result<Self> {
        config.validate()?;
        let mut offset = 0;
        let params = table
            .params()
            .iter()
            .zip(vars)
            .zip(lr_scales)
            .map(|((p, var), &lr_scale)| {
                let state = ParamState {
                    name: p.name.clone(),
                    var: var.clone(),
                    exp_avg: var.zeros_like()?.to_dtype(DType::F32)?,
                    exp_avg_sq: var.zeros_like()?.to_dtype(DType::F32)?,
                    decay: p.decay,
                    lr_scale,
                    offset,
                };
                offset += p.len();
                Ok(state)
            })
            .collect::<Result<_>>()?;
        Ok(Self { config, params, step: 0 })
    }

    /// Each parameter's learning-rate multiplier, by name.
    pub fn lr_scales(&self) -> Vec<(String, f64)> {
        self.params.iter().map(|p| (p.name.clone(), p.lr_scale)).collect()
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

    /// One update at learning rate `lr` from `grads`, every parameter's gradient flattened in
    /// table order into one f32 tensor on their device, times `grad_scale` (1 / the number of
    /// loss terms it sums). Returns the norm of the scaled gradient before clipping. A
    /// non-finite norm leaves the parameters untouched and is an error.
    pub fn step(&mut self, grads: &Tensor, grad_scale: f64, lr: f64) -> Result<f64> {
        check_lr(lr)?;
        let norm = crate::ops::sum_of_squares(&[grads])?.sqrt() * grad_scale;
        if !norm.is_finite() {
            return Err(Error::Numeric(format!(
                "gradient norm is {norm}: the update was skipped (parameters unchanged)"
            )));
        }
        let clip = self.config.clip_grad_norm;
        let grad_scale = grad_scale * if clip > 0.0 && norm > clip { clip / (norm + 1e-6) } else { 1.0 };
        self.step += 1;
        let c = &self.config;
        let t = self.step as i32;
        for p in &self.params {
            let g = grads.narrow(0, p.offset, p.var.elem_count())?;
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

/// The gradients of `vars` in `grads` as one flat f32 tensor (zeros for a variable the loss
/// did not reach).
pub fn flatten_grads(vars: &[Var], grads: &GradStore) -> Result<Tensor> {
    let parts = vars
        .iter()
        .map(|v| match grads.get(v) {
            Some(g) => g.to_dtype(DType::F32)?.flatten_all(),
            None => Tensor::zeros(v.elem_count(), DType::F32, v.device()),
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
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
