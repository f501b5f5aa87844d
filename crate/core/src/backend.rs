//! Where a model's training steps run: a CPU engine (`engine`, f32 on the CPU) or candle's
//! autograd over the candle model (CUDA, and bf16 on any device). Both hold the same named
//! parameters, AdamW state and (when the model keeps one) EMA of the weights, so a model moves
//! between them (`place`) and writes the same checkpoints whichever it is on.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::device::Precision;
use crate::engine::adamw::FlatAdamW;
use crate::engine::layout::Layout;
use crate::engine::FlatEngine;
use crate::error::Result;
use crate::optim::{AdamW, AdamWConfig};
use crate::params::{NamedVars, ParamStore};

/// How to build one kind of model: its candle constructor, its engine constructor and its
/// optimizer settings.
pub struct ModelSpec<'a, M, E> {
    pub new: Box<dyn Fn(VarBuilder) -> candle_core::Result<M> + 'a>,
    /// The engine over weights laid out by `Layout::new` of the model's tensors.
    pub engine: Box<dyn Fn(Layout, Vec<f32>) -> Result<E> + 'a>,
    /// Learning-rate multiplier of each parameter (layer-wise decay), by name.
    pub lr_scale: Box<dyn Fn(&str) -> f64 + 'a>,
    pub optimizer: AdamWConfig,
    /// Whether an EMA of the weights is kept.
    pub ema: bool,
    /// false: the CPU runs candle's autograd too (the reference the engine is tested against).
    pub cpu_engine: bool,
}

impl<M, E> ModelSpec<'_, M, E> {
    /// The engine runs f32 on the CPU; everything else goes through candle.
    fn uses_engine(&self, device: &Device, precision: Precision) -> bool {
        self.cpu_engine && device.is_cpu() && precision == Precision::F32
    }

    /// The candle model and its variables from `store` on `device`.
    fn candle(&self, store: ParamStore, device: &Device) -> Result<(M, NamedVars)> {
        store.build(DType::F32, device, |vb| (self.new)(vb))
    }

    /// The engine layout of the model's parameters and the values `store` gives them (the
    /// candle model is built on the CPU for the names, shapes and values, one copy at a time).
    fn values(&self, store: ParamStore) -> Result<(Layout, Vec<f32>)> {
        let (_, vars) = self.candle(store, &Device::Cpu)?;
        let layout = Layout::new(&vars.iter().map(|(name, v)| (name.clone(), v.dims().to_vec())).collect::<Vec<_>>());
        let mut values = vec![0f32; layout.len];
        for ((_, var), entry) in vars.iter().zip(&layout.entries) {
            entry.slot.of_mut(&mut values).copy_from_slice(&var.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok((layout, values))
    }
}

/// The EMA of the weights on the engine.
pub(crate) enum Ema {
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

pub(crate) struct EngineModel<E> {
    pub engine: E,
    pub optimizer: FlatAdamW<f32>,
    /// The EMA of the weights, in the engine's layout.
    pub ema: Ema,
}

pub(crate) struct CandleModel<M> {
    pub model: M,
    pub vars: NamedVars,
    pub optimizer: AdamW,
    pub device: Device,
    /// The EMA of the weights, as a model of its own (encoding reads it).
    pub ema: Option<(M, NamedVars)>,
}

pub(crate) enum Backend<M, E> {
    Engine(Box<EngineModel<E>>),
    Candle(CandleModel<M>),
}

/// Named CPU tensors from a flat buffer in `engine`'s layout.
fn engine_tensors<E: FlatEngine>(engine: &E, values: &[f32]) -> Result<Vec<(String, Tensor)>> {
    engine
        .layout()
        .entries
        .iter()
        .map(|en| Ok((en.name.clone(), Tensor::from_slice(en.slot.of(values), en.shape.as_slice(), &Device::Cpu)?)))
        .collect()
}

fn var_tensors(vars: &NamedVars) -> Vec<(String, Tensor)> {
    vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect()
}

impl<M, E: FlatEngine> Backend<M, E> {
    /// A model whose parameters come from `store` (an initialisation or checkpoint tensors),
    /// with a fresh optimizer, on `device` in `precision`. The EMA (if the spec keeps one)
    /// comes from `ema`, or starts as a copy of the weights.
    pub fn build(
        spec: &ModelSpec<M, E>,
        store: ParamStore,
        ema: Option<ParamStore>,
        device: &Device,
        precision: Precision,
    ) -> Result<Self> {
        let ema = if spec.ema { ema } else { None };
        if spec.uses_engine(device, precision) {
            let (layout, values) = spec.values(store)?;
            let engine = (spec.engine)(layout, values)?;
            let mut optimizer = FlatAdamW::new(spec.optimizer.clone(), engine.layout())?;
            optimizer.set_lr_scales(&spec.lr_scale);
            let ema = match ema {
                Some(store) => Ema::Own(spec.values(store)?.1),
                None if spec.ema => Ema::Weights,
                None => Ema::Off,
            };
            Ok(Self::Engine(Box::new(EngineModel { engine, optimizer, ema })))
        } else {
            let (model, vars) = spec.candle(store, device)?;
            let mut optimizer = AdamW::new(spec.optimizer.clone(), &vars)?;
            optimizer.set_lr_scales(&spec.lr_scale);
            let ema = match ema {
                Some(store) => Some(spec.candle(store, device)?),
                None if spec.ema => {
                    let copies = vars
                        .iter()
                        .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
                        .collect::<Result<HashMap<_, _>>>()?;
                    Some(spec.candle(ParamStore::from_tensors(copies), device)?)
                }
                None => None,
            };
            Ok(Self::Candle(CandleModel { model, vars, optimizer, device: device.clone(), ema }))
        }
    }

    /// Rebuilds the model with the same weights, optimizer state and EMA on `device` in
    /// `precision` (nothing to do when the backend and device stay the same). On an error the
    /// model stays as it was.
    pub fn place(&mut self, spec: &ModelSpec<M, E>, device: &Device, precision: Precision) -> Result<()> {
        let same = match &*self {
            Self::Engine(_) => spec.uses_engine(device, precision),
            Self::Candle(c) => !spec.uses_engine(device, precision) && c.device.same_device(device),
        };
        if same {
            return Ok(());
        }
        if let Self::Engine(e) = self {
            e.engine.release_buffers();
        }
        let store = |t: Vec<(String, Tensor)>| ParamStore::from_tensors(t.into_iter().collect());
        let ema = self.ema_weights()?.map(store);
        let moments = self.optimizer_state()?.into_iter().collect();
        let mut placed = Self::build(spec, store(self.weights()?), ema, device, precision)?;
        placed.restore_optimizer(moments, self.optimizer_step())?;
        *self = placed;
        Ok(())
    }

    pub fn device(&self) -> Device {
        match self {
            Self::Engine(_) => Device::Cpu,
            Self::Candle(c) => c.device.clone(),
        }
    }

    /// The parameters (name, tensor) in the model's creation order.
    pub fn weights(&self) -> Result<Vec<(String, Tensor)>> {
        match self {
            Self::Engine(e) => engine_tensors(&e.engine, e.engine.params()),
            Self::Candle(c) => Ok(var_tensors(&c.vars)),
        }
    }

    /// The EMA of the weights, if the model keeps one.
    pub fn ema_weights(&self) -> Result<Option<Vec<(String, Tensor)>>> {
        match self {
            Self::Engine(e) => match &e.ema {
                Ema::Off => Ok(None),
                Ema::Weights => Some(engine_tensors(&e.engine, e.engine.params())).transpose(),
                Ema::Own(ema) => Some(engine_tensors(&e.engine, ema)).transpose(),
            },
            Self::Candle(c) => Ok(c.ema.as_ref().map(|(_, vars)| var_tensors(vars))),
        }
    }

    pub fn num_parameters(&self) -> usize {
        match self {
            Self::Engine(e) => e.engine.params().len(),
            Self::Candle(c) => c.vars.iter().map(|(_, v)| v.elem_count()).sum(),
        }
    }

    /// AdamW moments as `exp_avg.<name>` / `exp_avg_sq.<name>` tensors.
    pub fn optimizer_state(&self) -> Result<Vec<(String, Tensor)>> {
        match self {
            Self::Engine(e) => e.optimizer.state_tensors(),
            Self::Candle(c) => Ok(c.optimizer.state_tensors()),
        }
    }

    pub fn restore_optimizer(&mut self, moments: HashMap<String, Tensor>, step: u64) -> Result<()> {
        match self {
            Self::Engine(e) => e.optimizer.restore(moments, step),
            Self::Candle(c) => c.optimizer.restore(moments, step),
        }
    }

    pub fn optimizer_step(&self) -> u64 {
        match self {
            Self::Engine(e) => e.optimizer.step,
            Self::Candle(c) => c.optimizer.step,
        }
    }

    /// Each parameter's learning-rate multiplier, by name.
    pub fn lr_scales(&self) -> Vec<(String, f64)> {
        match self {
            Self::Engine(e) => e.optimizer.lr_scales(),
            Self::Candle(c) => c.optimizer.params.iter().map(|p| (p.name.clone(), p.lr_scale)).collect(),
        }
    }

    /// One optimizer update from the gradients of the last engine step, or of `grads`
    /// (candle); then the EMA moves towards the new weights. Returns the gradient norm.
    pub fn update(&mut self, grads: Option<&candle_core::backprop::GradStore>, lr: f64, ema_decay: f64) -> Result<f64> {
        match self {
            Self::Engine(e) => {
                if let Ema::Weights = e.ema {
                    e.ema = Ema::Own(e.engine.params().to_vec());
                }
                let (params, g) = e.engine.params_and_grads();
                let norm = e.optimizer.update(params, g, lr)?;
                if let Ema::Own(ema) = &mut e.ema {
                    crate::engine::kernels::ema(ema, e.engine.params(), ema_decay);
                }
                Ok(norm)
            }
            Self::Candle(c) => {
                let norm = c.optimizer.step(grads.expect("candle steps pass their gradients"), lr)?;
                if let Some((_, ema)) = &c.ema {
                    for ((_, e), (_, p)) in ema.iter().zip(&c.vars) {
                        crate::optim::ema_update(e.as_tensor(), p.as_tensor(), ema_decay)?;
                    }
                }
                Ok(norm)
            }
        }
    }
}
