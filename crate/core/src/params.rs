//! Parameter storage behind the models' `VarBuilder`s.
//!
//! Models are written candle-style (`new(cfg, vb)`), and every `vb.get` lands here: either a
//! fresh reference initialisation from a seeded generator, or a tensor taken from a checkpoint
//! (with a shape check naming the tensor). Every parameter is recorded as a `Var` under its
//! Hugging Face key, in creation order, so the optimizer and the checkpoint writer see them all.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{var_builder::SimpleBackend, Init, VarBuilder};

use crate::rng::SplitMix64;

enum Source {
    /// Reference init: `Init::Randn { stdev }` means truncated normal at +-1 std (as unilm).
    Init(SplitMix64),
    /// Tensors from a checkpoint. Those it lacks are an error, except the ones `fallback`
    /// allows, which get the reference init (a new head over a pretrained backbone).
    Checkpoint { tensors: HashMap<String, Tensor>, fallback: Option<(SplitMix64, fn(&str) -> bool)> },
}

struct Store {
    source: Source,
    vars: Vec<(String, Var)>,
    /// Checkpoint tensors the model asked for and did not find, or found with another shape:
    /// collected (the model gets zeros meanwhile) so one error can list them all.
    missing: Vec<String>,
    mismatched: Vec<String>,
}

pub struct ParamStore {
    inner: Mutex<Store>,
}

/// The parameters of a model, in creation order.
pub type NamedVars = Vec<(String, Var)>;

impl ParamStore {
    pub fn initialise(seed: u64) -> Self {
        Self::new(Source::Init(SplitMix64::new(seed)))
    }

    pub fn from_tensors(tensors: HashMap<String, Tensor>) -> Self {
        Self::new(Source::Checkpoint { tensors, fallback: None })
    }

    /// `tensors` where they exist; the parameters `may_init` accepts get the reference
    /// initialisation from `seed` when absent, any other absent one is an error.
    pub fn from_tensors_or_init(tensors: HashMap<String, Tensor>, seed: u64, may_init: fn(&str) -> bool) -> Self {
        Self::new(Source::Checkpoint { tensors, fallback: Some((SplitMix64::new(seed), may_init)) })
    }

    fn new(source: Source) -> Self {
        Self { inner: Mutex::new(Store { source, vars: Vec::new(), missing: Vec::new(), mismatched: Vec::new() }) }
    }

    /// Consumes the store. For a checkpoint store, every missing tensor, shape mismatch and
    /// tensor no model part asked for is listed in one error.
    pub fn finish(self) -> crate::Result<NamedVars> {
        let store = self.inner.into_inner().expect("param store lock");
        let mut problems = Vec::new();
        if !store.missing.is_empty() {
            problems.push(format!("missing tensors: {}", store.missing.join(", ")));
        }
        if !store.mismatched.is_empty() {
            problems.push(format!("shape mismatches: {}", store.mismatched.join(", ")));
        }
        if let Source::Checkpoint { tensors: rest, .. } = &store.source {
            if !rest.is_empty() {
                let mut names: Vec<_> = rest.keys().cloned().collect();
                names.sort();
                problems.push(format!("tensors this model does not use: {}", names.join(", ")));
            }
        }
        if !problems.is_empty() {
            return Err(crate::Error::Checkpoint(format!(
                "checkpoint does not fit this model: {}",
                problems.join("; ")
            )));
        }
        Ok(store.vars)
    }

    /// Builds a module through this store and returns it with every parameter it created.
    pub fn build<M>(
        self,
        dtype: DType,
        device: &Device,
        new: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
    ) -> crate::Result<(M, NamedVars)> {
        let store = std::sync::Arc::new(self);
        let module = new(store.var_builder(dtype, device)).map_err(|e| crate::Error::Checkpoint(e.to_string()))?;
        let store = std::sync::Arc::try_unwrap(store)
            .map_err(|_| crate::Error::Config("a VarBuilder outlived model construction".into()))?;
        Ok((module, store.finish()?))
    }

    fn var_builder(self: &std::sync::Arc<Self>, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(SharedStore(self.clone())), dtype, device.clone())
    }
}

struct SharedStore(std::sync::Arc<ParamStore>);

impl SimpleBackend for SharedStore {
    fn get(&self, shape: Shape, name: &str, init: Init, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let mut store = self.0.inner.lock().expect("param store lock");
        let store = &mut *store;
        let tensor = match &mut store.source {
            Source::Init(rng) => initial_value(rng, &shape, init)?,
            Source::Checkpoint { tensors, fallback } => match (tensors.remove(name), fallback) {
                (Some(t), _) if t.shape() == &shape => t,
                (Some(t), _) => {
                    store.mismatched.push(format!("{name} is {:?}, expected {:?}", t.dims(), shape.dims()));
                    Tensor::zeros(&shape, DType::F32, &Device::Cpu)?
                }
                (None, Some((rng, may_init))) if may_init(name) => initial_value(rng, &shape, init)?,
                (None, _) => {
                    store.missing.push(format!("{name} {:?}", shape.dims()));
                    Tensor::zeros(&shape, DType::F32, &Device::Cpu)?
                }
            },
        };
        let var = Var::from_tensor(&tensor.to_dtype(dtype)?.to_device(device)?)?;
        let out = var.as_tensor().clone();
        store.vars.push((name.to_string(), var));
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("parameter {name} requested without a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let store = self.0.inner.lock().expect("param store lock");
        match &store.source {
            Source::Init(_) => false,
            Source::Checkpoint { tensors, .. } => tensors.contains_key(name),
        }
    }
}

fn initial_value(rng: &mut SplitMix64, shape: &Shape, init: Init) -> candle_core::Result<Tensor> {
    let n = shape.elem_count();
    match init {
        Init::Const(c) => Tensor::full(c as f32, shape, &Device::Cpu),
        Init::Randn { mean, stdev } => {
            let values: Vec<f32> = (0..n).map(|_| (mean + stdev * rng.truncated_normal(1.0)) as f32).collect();
            Tensor::from_vec(values, shape, &Device::Cpu)
        }
        // Kaiming normal (DALL-E's convs: std = gain / sqrt(fan_in)), untruncated.
        Init::Kaiming { dist: candle_nn::init::NormalOrUniform::Normal, fan, non_linearity } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            let values: Vec<f32> = (0..n).map(|_| (std * rng.normal()) as f32).collect();
            Tensor::from_vec(values, shape, &Device::Cpu)
        }
        other => candle_core::bail!("unsupported initialiser {other:?}"),
    }
}

/// The same model rebuilt on `device` from the current values of `vars`: new variables there,
/// in the same order.
pub fn rebuild_on<M>(
    vars: &NamedVars,
    device: &Device,
    new: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> crate::Result<(M, NamedVars)> {
    let tensors = vars
        .iter()
        .map(|(name, var)| Ok((name.clone(), var.as_tensor().to_device(device)?)))
        .collect::<candle_core::Result<HashMap<_, _>>>()?;
    ParamStore::from_tensors(tensors).build(DType::F32, device, new)
}
