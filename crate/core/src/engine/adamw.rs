//! AdamW over the engine's flat buffers: one global gradient norm, clipping and the update
//! of every parameter group in one pass each. Same settings, state and arithmetic as
//! `optim::AdamW` (the candle path), whose checkpoint format it shares.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::kernels::{adamw, sum_of_squares, AdamStep};
use super::simd::Real;
use crate::error::{Error, Result};
use crate::optimizer::{check_lr, reject_unused, take_moment, AdamWConfig};
use crate::params::{Layout, ParamTable, Slot};

struct Group {
    name: String,
    shape: Vec<usize>,
    slot: Slot,
    decay: bool,
    lr_scale: f64,
}

pub struct FlatAdamW<T> {
    pub config: AdamWConfig,
    /// Updates taken (bias correction uses it).
    pub step: u64,
    pub exp_avg: Vec<T>,
    pub exp_avg_sq: Vec<T>,
    groups: Vec<Group>,
}

impl<T: Real> FlatAdamW<T> {
    /// AdamW over the parameters of `table` (in `layout`), with each one's learning-rate
    /// multiplier.
    pub fn new(config: AdamWConfig, table: &ParamTable, layout: &Layout, lr_scales: &[f64]) -> Result<Self> {
        config.validate()?;
        let groups = table
            .params()
            .iter()
            .zip(layout.slots())
            .zip(lr_scales)
            .map(|((p, &slot), &lr_scale)| Group {
                name: p.name.clone(),
                shape: p.shape.clone(),
                slot,
                decay: p.decay,
                lr_scale,
            })
            .collect();
        // The moments are allocated by the first update (or restore): a model that is only
        // evaluated never holds them.
        Ok(Self { config, step: 0, exp_avg: Vec::new(), exp_avg_sq: Vec::new(), groups })
    }

    pub fn lr_scales(&self) -> Vec<(String, f64)> {
        self.groups.iter().map(|g| (g.name.clone(), g.lr_scale)).collect()
    }

    /// One update at learning rate `lr` from `grads` times `grad_scale` (1 / the number of
    /// loss terms the buffer sums); returns the norm of the scaled gradient before clipping. A
    /// non-finite norm leaves everything untouched and is an error.
    pub fn update(&mut self, params: &mut [T], grads: &[T], grad_scale: f64, lr: f64) -> Result<f64> {
        check_lr(lr)?;
        let norm = sum_of_squares(grads).sqrt() * grad_scale;
        if !norm.is_finite() {
            return Err(Error::Numeric(format!(
                "gradient norm is {norm}: the update was skipped (parameters unchanged)"
            )));
        }
        let c = &self.config;
        let len = grads.len();
        for m in [&mut self.exp_avg, &mut self.exp_avg_sq] {
            if m.len() != len {
                *m = vec![T::ZERO; len];
            }
        }
        let clip = c.clip_grad_norm;
        let grad_scale = grad_scale * if clip > 0.0 && norm > clip { clip / (norm + 1e-6) } else { 1.0 };
        self.step += 1;
        let t = self.step as i32;
        for g in &self.groups {
            let h = AdamStep {
                grad_scale,
                beta1: c.beta1,
                beta2: c.beta2,
                lr: lr * g.lr_scale,
                weight_decay: if g.decay { c.weight_decay } else { 0.0 },
                eps: c.eps,
                bias_correction1: 1.0 - c.beta1.powi(t),
                bias_correction2: 1.0 - c.beta2.powi(t),
            };
            adamw(
                g.slot.of_mut(params),
                g.slot.of(grads),
                g.slot.of_mut(&mut self.exp_avg),
                g.slot.of_mut(&mut self.exp_avg_sq),
                h,
            );
        }
        Ok(norm)
    }
}

impl FlatAdamW<f32> {
    /// The moments as named tensors (`exp_avg.<param>`, `exp_avg_sq.<param>`), the format of
    /// `optim::AdamW::state_tensors`.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.groups.len());
        for g in &self.groups {
            for (kind, buf) in [("exp_avg", &self.exp_avg), ("exp_avg_sq", &self.exp_avg_sq)] {
                let t = if buf.is_empty() {
                    Tensor::zeros(g.shape.as_slice(), candle_core::DType::F32, &Device::Cpu)?
                } else {
                    Tensor::from_slice(g.slot.of(buf), g.shape.as_slice(), &Device::Cpu)?
                };
                out.push((format!("{kind}.{}", g.name), t));
            }
        }
        Ok(out)
    }

    /// Restores moments in that format; every one must be present with the parameter's
    /// shape, and no other may be.
    pub fn restore(&mut self, mut moments: HashMap<String, Tensor>, step: u64) -> Result<()> {
        let len = self.groups.iter().map(|g| g.slot.offset + g.slot.len).max().unwrap_or(0);
        for m in [&mut self.exp_avg, &mut self.exp_avg_sq] {
            if m.len() != len {
                *m = vec![0.0; len];
            }
        }
        for g in &self.groups {
            for (kind, buf) in [("exp_avg", &mut self.exp_avg), ("exp_avg_sq", &mut self.exp_avg_sq)] {
                let t = take_moment(&mut moments, kind, &g.name, &g.shape)?;
                g.slot.of_mut(buf).copy_from_slice(&t.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        reject_unused(&moments)?;
        self.step = step;
        Ok(())
    }
}
