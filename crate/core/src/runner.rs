//! Where a model's steps run, chosen once when the model is placed: the CPU engine (on the
//! CPU, f32 or bf16 GEMMs) or candle's autograd over the candle model (CUDA, the CPU with the
//! engine off, and the segmenter everywhere). Both
//! hold the model's parameters in table order, the AdamW state, the EMA of the weights when
//! the kind keeps one, and a gradient buffer that each model kind's `loss_and_grads` adds to
//! and [`Runner::apply_update`] consumes, so a model moves between them and writes the same
//! checkpoints whichever it is on.
//!
//! The buffer holds the gradient of the *summed* losses of every batch since the last update,
//! and how many loss terms (masked patches, images) they sum: the update divides by that
//! count, so batches accumulate into exactly the gradient of one big batch, and a
//! data-parallel hook can sum buffers and counts across ranks.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::config::Precision;
use crate::engine::adamw::FlatAdamW;
use crate::engine::{kernels, on_pool, EngineModel, Flat};
use crate::error::{Error, Result};
use crate::model::Vars;
use crate::optim::{ema_update, flatten_grads, AdamW};
use crate::optimizer::{check_lr, AdamWConfig};
use crate::params::ParamTable;

/// Where and how a model runs.
#[derive(Debug, Clone)]
pub struct Placement {
    pub device: Device,
    pub precision: Precision,
    /// false: the CPU runs candle's autograd too (the reference the engine is tested against).
    pub cpu_engine: bool,
}

impl Placement {
    pub fn cpu() -> Self {
        Self { device: Device::Cpu, precision: Precision::F32, cpu_engine: true }
    }

    /// The engine runs the steps on the CPU, in f32 or with bf16 GEMMs (the segmenter: its
    /// convolutions on the engine inside candle's autograd); everything else goes through candle.
    pub fn uses_engine(&self) -> bool {
        self.cpu_engine && self.device.is_cpu()
    }
}

/// What a runner is built from besides the model and its values.
pub struct RunnerSpec<'a> {
    pub table: &'a ParamTable,
    pub optimizer: &'a AdamWConfig,
    /// Each parameter's learning-rate multiplier (layer-wise decay), table order.
    pub lr_scales: Vec<f64>,
    /// The decay of the weights' EMA; 0: the model keeps none.
    pub ema_decay: f64,
    pub placement: &'a Placement,
}

/// The gradient buffer between a step's `loss_and_grads` and `apply_update`: where gradient
/// all-reduce and inspection go.
pub struct Gradients<'a> {
    pub values: GradientValues<'a>,
    /// Loss terms the buffer sums.
    pub count: &'a mut u64,
}

pub enum GradientValues<'a> {
    /// The engine's flat f32 buffer (table layout).
    Host(&'a mut [f32]),
    /// candle's: one flat f32 tensor on the model's device (table order), None before the
    /// first backward pass since the last update.
    Device(&'a mut Option<Tensor>),
}

/// What every runner does, whatever the model kind.
pub trait Runner: Send {
    fn device(&self) -> Device;
    /// The parameters, in table order, as tensors on their device.
    fn weights(&self) -> Result<Vec<Tensor>>;
    /// The EMA of the weights, if the model keeps one.
    fn ema_weights(&self) -> Result<Option<Vec<Tensor>>>;
    /// AdamW moments as `exp_avg.<name>` / `exp_avg_sq.<name>` tensors.
    fn optimizer_state(&self) -> Result<Vec<(String, Tensor)>>;
    fn restore_optimizer(&mut self, moments: HashMap<String, Tensor>, step: u64) -> Result<()>;
    fn optimizer_step(&self) -> u64;
    /// Each parameter's learning-rate multiplier, by name.
    fn lr_scales(&self) -> Vec<(String, f64)>;
    fn gradients(&mut self) -> Gradients<'_>;
    /// Clip and AdamW from the gradient buffer divided by its count, then the EMA's move;
    /// empties the buffer (also when the gradient norm is not finite: that step is skipped).
    /// Returns the gradient norm before clipping. A bad `lr` is refused first, and keeps the
    /// buffer. Where losses were computed but added no loss terms (a segmentation update whose
    /// every pixel is ignored, on every rank) nothing moves: the buffer is emptied and the norm
    /// is 0.
    fn apply_update(&mut self, lr: f64) -> Result<f64>;
    /// Frees the activation buffers (rebuilt on the next call).
    fn release_buffers(&mut self);
    /// Switches the precision of later steps in place, without copying the model, where the
    /// runner can (the engine's); false where the model must be rebuilt.
    fn switch_precision(&mut self, precision: Precision) -> bool;
}

fn nothing_to_apply() -> Error {
    Error::Input("no gradients to apply: lossAndGrads adds them, applyUpdate consumes them".into())
}

/// The values of `tensors` (table order) in one f32 buffer.
pub fn flat_values(tensors: &[Tensor]) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(tensors.iter().map(Tensor::elem_count).sum());
    for t in tensors {
        out.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Tensors of the table's shapes from a flat buffer (table layout).
pub fn unflatten(table: &ParamTable, values: &[f32]) -> Result<Vec<Tensor>> {
    let mut offset = 0;
    table
        .params()
        .iter()
        .map(|p| {
            let t = Tensor::from_slice(&values[offset..offset + p.len()], p.shape.as_slice(), &Device::Cpu)?;
            offset += p.len();
            Ok(t)
        })
        .collect()
}

/// The EMA of the weights on the engine.
pub enum Ema {
    Off,
    /// Equal to the weights (no update yet): not stored until the first update.
    Weights,
    Own(Vec<f32>),
}

impl Ema {
    /// The EMA's values, when they differ from the weights'.
    pub fn own(&self) -> Option<&[f32]> {
        match self {
            Self::Own(v) => Some(v),
            _ => None,
        }
    }
}

/// A model on the CPU engine.
pub struct EngineRunner<E> {
    pub model: E,
    optimizer: FlatAdamW<f32>,
    pub ema: Ema,
    ema_decay: f64,
    count: u64,
}

impl<E: EngineModel> EngineRunner<E> {
    pub fn new(model: E, spec: &RunnerSpec, ema: Option<Vec<Tensor>>) -> Result<Self> {
        let flat = model.flat();
        let optimizer = FlatAdamW::new(spec.optimizer.clone(), &flat.table, &flat.layout, &spec.lr_scales)?;
        let ema = match ema {
            _ if spec.ema_decay == 0.0 => Ema::Off,
            Some(values) => Ema::Own(flat_values(&values)?),
            None => Ema::Weights,
        };
        Ok(Self { model, optimizer, ema, ema_decay: spec.ema_decay, count: 0 })
    }

    /// Counts `rows` loss terms the model just added to the gradient buffer.
    pub fn added(&mut self, rows: usize) {
        self.count += rows as u64;
    }

    fn flat(&self) -> &Flat<f32> {
        self.model.flat()
    }
}

impl<E: EngineModel> Runner for EngineRunner<E> {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn weights(&self) -> Result<Vec<Tensor>> {
        unflatten(&self.flat().table, &self.flat().params)
    }

    fn ema_weights(&self) -> Result<Option<Vec<Tensor>>> {
        match &self.ema {
            Ema::Off => Ok(None),
            Ema::Weights => self.weights().map(Some),
            Ema::Own(ema) => unflatten(&self.flat().table, ema).map(Some),
        }
    }

    fn optimizer_state(&self) -> Result<Vec<(String, Tensor)>> {
        self.optimizer.state_tensors()
    }

    fn restore_optimizer(&mut self, moments: HashMap<String, Tensor>, step: u64) -> Result<()> {
        self.optimizer.restore(moments, step)
    }

    fn optimizer_step(&self) -> u64 {
        self.optimizer.step
    }

    fn lr_scales(&self) -> Vec<(String, f64)> {
        self.optimizer.lr_scales()
    }

    fn gradients(&mut self) -> Gradients<'_> {
        let flat = self.model.flat_mut();
        flat.grads_mut();
        Gradients { values: GradientValues::Host(&mut flat.grads), count: &mut self.count }
    }

    fn apply_update(&mut self, lr: f64) -> Result<f64> {
        check_lr(lr)?;
        if self.count == 0 {
            return Err(nothing_to_apply());
        }
        let grad_scale = 1.0 / self.count as f64;
        self.count = 0;
        on_pool(|| {
            if let Ema::Weights = self.ema {
                self.ema = Ema::Own(self.model.flat().params.clone());
            }
            let flat = self.model.flat_mut();
            let norm = self.optimizer.update(&mut flat.params, &flat.grads, grad_scale, lr);
            flat.zero_grads();
            let norm = norm?;
            if let Ema::Own(ema) = &mut self.ema {
                kernels::ema(ema, &self.model.flat().params, self.ema_decay);
            }
            Ok(norm)
        })
    }

    fn release_buffers(&mut self) {
        self.model.release_buffers();
    }

    fn switch_precision(&mut self, precision: Precision) -> bool {
        self.model.set_precision(precision);
        true
    }
}

/// A model on candle's autograd.
pub struct CandleRunner<M> {
    pub model: M,
    pub vars: Vars,
    optimizer: AdamW,
    pub device: Device,
    pub precision: Precision,
    /// The EMA of the weights, as a model of its own (encoding reads it).
    ema: Option<(M, Vars)>,
    ema_decay: f64,
    grads: Option<Tensor>,
    count: u64,
}

impl<M: Send> CandleRunner<M> {
    /// The model `new` builds over `values` (table order) on the placement's device; the EMA
    /// (when the spec keeps one) from `ema`, or a copy of the weights.
    pub fn new(
        spec: &RunnerSpec,
        values: Vec<Tensor>,
        ema: Option<Vec<Tensor>>,
        new: impl Fn(&Vars, &Device) -> candle_core::Result<M>,
    ) -> Result<Self> {
        let device = spec.placement.device.clone();
        let vars = Vars::new(values, DType::F32, &device)?;
        let model = new(&vars, &device)?;
        let optimizer = AdamW::new(spec.optimizer.clone(), spec.table, vars.vars(), &spec.lr_scales)?;
        let ema = if spec.ema_decay > 0.0 {
            let values = match ema {
                Some(values) => values,
                None => vars.tensors().iter().map(Tensor::copy).collect::<candle_core::Result<_>>()?,
            };
            let ema_vars = Vars::new(values, DType::F32, &device)?;
            Some((new(&ema_vars, &device)?, ema_vars))
        } else {
            None
        };
        Ok(Self {
            model,
            vars,
            optimizer,
            device,
            precision: spec.placement.precision,
            ema,
            ema_decay: spec.ema_decay,
            grads: None,
            count: 0,
        })
    }

    /// The backward pass of a batch's mean loss over `rows` loss terms: a non-finite loss is
    /// refused before any gradient is added; otherwise the gradient of `rows` x the loss (the
    /// summed loss) is added to the buffer. Returns the loss. A loss over no terms (zero, from
    /// a synchronised replica with nothing labelled) is differentiated as it is: candle would
    /// drop the graph of `0 x loss`, and that replica's backward pass must still run.
    pub fn backward(&mut self, loss: &Tensor, rows: usize) -> Result<f64> {
        let value = crate::engine::finite(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)?;
        let summed = if rows == 0 { loss.clone() } else { (loss * rows as f64)? };
        let grads = flatten_grads(self.vars.vars(), &summed.backward()?)?;
        self.grads = Some(match self.grads.take() {
            Some(sum) => (sum + grads)?,
            None => grads,
        });
        self.count += rows as u64;
        Ok(value)
    }

    /// Notes a batch that adds no loss terms without running its backward pass: the update it
    /// belongs to then has a (zero) gradient buffer to apply, which leaves the weights as they
    /// are.
    pub fn add_no_terms(&mut self) -> Result<()> {
        if self.grads.is_none() {
            let n = self.vars.vars().iter().map(|v| v.elem_count()).sum::<usize>();
            self.grads = Some(Tensor::zeros(n, DType::F32, &self.device)?);
        }
        Ok(())
    }

    /// The model evaluation reads: the EMA's when it keeps one, else the trained one.
    pub fn eval_model(&self) -> &M {
        self.ema.as_ref().map_or(&self.model, |(m, _)| m)
    }
}

impl<M: Send> Runner for CandleRunner<M> {
    fn device(&self) -> Device {
        self.device.clone()
    }

    fn weights(&self) -> Result<Vec<Tensor>> {
        Ok(self.vars.tensors())
    }

    fn ema_weights(&self) -> Result<Option<Vec<Tensor>>> {
        Ok(self.ema.as_ref().map(|(_, vars)| vars.tensors()))
    }

    fn optimizer_state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.optimizer.state_tensors())
    }

    fn restore_optimizer(&mut self, moments: HashMap<String, Tensor>, step: u64) -> Result<()> {
        self.optimizer.restore(moments, step)
    }

    fn optimizer_step(&self) -> u64 {
        self.optimizer.step
    }

    fn lr_scales(&self) -> Vec<(String, f64)> {
        self.optimizer.lr_scales()
    }

    fn gradients(&mut self) -> Gradients<'_> {
        Gradients { values: GradientValues::Device(&mut self.grads), count: &mut self.count }
    }

    fn apply_update(&mut self, lr: f64) -> Result<f64> {
        check_lr(lr)?;
        let (Some(grads), count) = (self.grads.take(), std::mem::take(&mut self.count)) else {
            return Err(nothing_to_apply());
        };
        if count == 0 {
            // Losses were computed, none with a term: no step (AdamW's step count, moments and
            // weight decay included) and no EMA move.
            return Ok(0.0);
        }
        let norm = self.optimizer.step(&grads, 1.0 / count as f64, lr)?;
        if let Some((_, ema)) = &self.ema {
            for (e, p) in ema.vars().iter().zip(self.vars.vars()) {
                ema_update(e.as_tensor(), p.as_tensor(), self.ema_decay)?;
            }
        }
        Ok(norm)
    }

    fn release_buffers(&mut self) {}

    fn switch_precision(&mut self, _: Precision) -> bool {
        false
    }
}
