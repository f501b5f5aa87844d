//! Where a BEiT model's training steps run: the CPU engine (`engine`, f32 on the CPU) or
//! candle's autograd over `model.rs` (CUDA, and bf16 on any device). Both hold the same named
//! parameters and AdamW state, so a model moves between them (`place`) and writes the same
//! checkpoints whichever it is on.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::config::BeitConfig;
use crate::device::Precision;
use crate::engine::adamw::FlatAdamW;
use crate::engine::{BeitEngine, Head};
use crate::error::Result;
use crate::optim::{AdamW, AdamWConfig};
use crate::params::{NamedVars, ParamStore};

/// How to build one kind of model: its engine shape and its candle constructor.
pub(crate) struct ModelSpec<'a, M> {
    pub config: &'a BeitConfig,
    pub head: Head,
    pub new: Box<dyn Fn(VarBuilder) -> candle_core::Result<M> + 'a>,
    /// Learning-rate multiplier of each parameter (layer-wise decay), by name.
    pub lr_scale: Box<dyn Fn(&str) -> f64 + 'a>,
    pub optimizer: AdamWConfig,
    /// false: the CPU runs candle's autograd too (the reference the engine is tested against).
    pub cpu_engine: bool,
}

pub(crate) struct EngineModel {
    pub engine: BeitEngine<f32>,
    pub optimizer: FlatAdamW<f32>,
}

pub(crate) struct CandleModel<M> {
    pub model: M,
    pub vars: NamedVars,
    pub optimizer: AdamW,
    pub device: Device,
}

pub(crate) enum Backend<M> {
    Engine(Box<EngineModel>),
    Candle(CandleModel<M>),
}

impl<M> ModelSpec<'_, M> {
    /// The engine runs f32 on the CPU; everything else goes through candle.
    fn uses_engine(&self, device: &Device, precision: Precision) -> bool {
        self.cpu_engine && device.is_cpu() && precision == Precision::F32
    }
}

impl<M> Backend<M> {
    /// A model whose parameters come from `store` (an initialisation or checkpoint tensors),
    /// with a fresh optimizer, on `device` in `precision`.
    pub fn build(spec: &ModelSpec<M>, store: ParamStore, device: &Device, precision: Precision) -> Result<Self> {
        if spec.uses_engine(device, precision) {
            // The candle model is built once for the names, shapes and initial values.
            let (_, vars) = store.build(DType::F32, &Device::Cpu, |vb| (spec.new)(vb))?;
            let tensors = vars
                .iter()
                .map(|(name, v)| Ok((name.clone(), v.dims().to_vec(), v.flatten_all()?.to_vec1::<f32>()?)))
                .collect::<Result<Vec<_>>>()?;
            let engine = BeitEngine::new(spec.config, spec.head, &tensors)?;
            let mut optimizer = FlatAdamW::new(spec.optimizer.clone(), engine.layout())?;
            optimizer.set_lr_scales(&spec.lr_scale);
            Ok(Self::Engine(Box::new(EngineModel { engine, optimizer })))
        } else {
            let (model, vars) = store.build(DType::F32, device, |vb| (spec.new)(vb))?;
            let mut optimizer = AdamW::new(spec.optimizer.clone(), &vars)?;
            optimizer.set_lr_scales(&spec.lr_scale);
            Ok(Self::Candle(CandleModel { model, vars, optimizer, device: device.clone() }))
        }
    }

    /// Rebuilds the model with the same weights and optimizer state on `device` in
    /// `precision` (nothing to do when the backend and device stay the same). On an error the
    /// model stays as it was.
    pub fn place(&mut self, spec: &ModelSpec<M>, device: &Device, precision: Precision) -> Result<()> {
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
        let tensors: HashMap<String, Tensor> = self.weights()?.into_iter().collect();
        let moments = self.optimizer_state()?.into_iter().collect();
        let mut placed = Self::build(spec, ParamStore::from_tensors(tensors), device, precision)?;
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
            Self::Engine(e) => e
                .engine
                .layout()
                .entries
                .iter()
                .map(|en| Ok((en.name.clone(), Tensor::from_slice(en.slot.of(&e.engine.params), en.shape.as_slice(), &Device::Cpu)?)))
                .collect(),
            Self::Candle(c) => Ok(c.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect()),
        }
    }

    pub fn num_parameters(&self) -> usize {
        match self {
            Self::Engine(e) => e.engine.params.len(),
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

    pub fn optimizer_config(&self) -> &AdamWConfig {
        match self {
            Self::Engine(e) => &e.optimizer.config,
            Self::Candle(c) => &c.optimizer.config,
        }
    }
}
