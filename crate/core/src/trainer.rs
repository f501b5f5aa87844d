//! One trainer shape for every model (the BEiT MIM model, the classifier, the dVAE
//! tokenizer): a config and options, the weights with their AdamW state (and EMA) on a
//! backend, the caller's opaque training state, and the same creation, checkpoint and
//! placement code. What differs between the models is a [`Kind`]; the model-specific steps
//! live with each kind (mim.rs, classify.rs, tokenizer.rs).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{de::DeserializeOwned, Serialize};

use crate::backend::{Backend, ModelSpec};
use crate::checkpoint::{self, Loaded};
use crate::config::BeitConfig;
use crate::device::Precision;
use crate::engine::FlatEngine;
use crate::error::{Error, Result};
use crate::optim::{self, AdamW, AdamWConfig};
use crate::params::ParamStore;

/// Metadata key of the caller's training state (schedule position, RNG states), saved with
/// the weights so a checkpoint is one atomic file.
const TRAIN_STATE_KEY: &str = "trainState";
/// Checkpoint tensors of the weights' EMA.
const EMA_PREFIX: &str = "ema.";

/// What differs between the models a [`Trainer`] trains.
pub trait Kind: Sized {
    /// The model's shape, saved under "config".
    type Config: Clone;
    /// Training options saved with the model (under `OPTIONS_KEY`).
    type Options: Clone + Serialize + DeserializeOwned;
    /// The candle model (GPU path and reference).
    type Model;
    /// The CPU engine.
    type Engine: FlatEngine;
    /// The checkpoint's "format" entry, and what to call such a file in errors.
    const FORMAT: &'static str;
    const WHAT: &'static str;
    const OPTIONS_KEY: Option<&'static str>;

    fn config_json(config: &Self::Config) -> String;
    /// Parses and validates a config.
    fn parse_config(json: &str) -> Result<Self::Config>;
    fn validate(config: &Self::Config, options: &Self::Options) -> Result<()>;
    fn spec<'a>(
        config: &'a Self::Config,
        options: &'a Self::Options,
        optimizer: &AdamWConfig,
        cpu_engine: bool,
    ) -> ModelSpec<'a, Self::Model, Self::Engine>;
    /// The decay of the weights' EMA, 0 when the model keeps none.
    fn ema_decay(_options: &Self::Options) -> f64 {
        0.0
    }
    /// The optimizer settings a checkpoint without an "optimizer" entry implies (the
    /// tokenizer's files before the trainers shared one format).
    fn legacy_optimizer(_options: &Self::Options) -> Option<AdamWConfig> {
        None
    }
}

pub struct Trainer<K: Kind> {
    pub config: K::Config,
    pub options: K::Options,
    /// Opaque JSON from the caller, saved and loaded with the checkpoint.
    pub train_state: Option<String>,
    optimizer: AdamWConfig,
    pub(crate) backend: Backend<K::Model, K::Engine>,
    precision: Precision,
    cpu_engine: bool,
}

impl<K: Kind> Trainer<K> {
    /// A model from `store` (an initialisation or checkpoint tensors) on the CPU, in f32.
    pub(crate) fn build(
        config: K::Config,
        options: K::Options,
        optimizer: AdamWConfig,
        store: ParamStore,
        ema: Option<ParamStore>,
    ) -> Result<Self> {
        K::validate(&config, &options)?;
        let backend =
            Backend::build(&K::spec(&config, &options, &optimizer, true), store, ema, &Device::Cpu, Precision::F32)?;
        Ok(Self { config, options, train_state: None, optimizer, backend, precision: Precision::F32, cpu_engine: true })
    }

    /// Reads a checkpoint written by [`Trainer::save`]: its config (unless `config` is given,
    /// which the file's tensors must then fit), options, weights, optimizer state, EMA and
    /// training state.
    pub fn load(path: &Path, config: Option<K::Config>) -> Result<Self> {
        let mut file = checkpoint::load(path)?;
        file.expect_format(path, K::FORMAT, K::WHAT)?;
        let in_file = |e: Error| Error::Checkpoint(format!("{}: {e}", path.display()));
        let config = match config {
            Some(c) => c,
            None => K::parse_config(file.meta("config", path)?)?,
        };
        let options: K::Options = match K::OPTIONS_KEY {
            Some(key) => serde_json::from_str(file.meta(key, path)?)
                .map_err(|e| in_file(Error::Checkpoint(format!("bad {key} metadata: {e}"))))?,
            None => serde_json::from_str("null").map_err(|e| in_file(Error::Checkpoint(e.to_string())))?,
        };
        let (optimizer, step, moments) = saved_optimizer::<K>(&mut file, path, &options)?;
        let train_state = file.metadata.remove(TRAIN_STATE_KEY);
        let ema = file.take_prefixed(EMA_PREFIX);
        let ema = (!ema.is_empty()).then(|| ParamStore::from_tensors(ema));
        let mut trainer =
            Self::build(config, options, optimizer, ParamStore::from_tensors(file.tensors), ema).map_err(in_file)?;
        // Weights converted from elsewhere (DALL-E's) come at step 0 without optimizer state.
        if step > 0 || !moments.is_empty() {
            trainer.backend.restore_optimizer(moments, step).map_err(in_file)?;
        }
        trainer.train_state = train_state;
        Ok(trainer)
    }

    /// Writes the weights, optimizer state, EMA, config, options and training state
    /// atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = self.backend.weights()?;
        if let Some(ema) = self.backend.ema_weights()? {
            tensors.extend(ema.into_iter().map(|(n, t)| (format!("{EMA_PREFIX}{n}"), t)));
        }
        let mut metadata = HashMap::from([
            ("format".to_string(), K::FORMAT.to_string()),
            ("config".to_string(), K::config_json(&self.config)),
        ]);
        if let Some(key) = K::OPTIONS_KEY {
            metadata.insert(key.to_string(), serde_json::to_string(&self.options).expect("serialisable"));
        }
        optim::write_checkpoint(
            &self.optimizer,
            self.backend.optimizer_step(),
            self.backend.optimizer_state()?,
            &mut tensors,
            &mut metadata,
        );
        if let Some(state) = &self.train_state {
            metadata.insert(TRAIN_STATE_KEY.to_string(), state.clone());
        }
        checkpoint::save(path, &tensors, metadata)
    }

    pub fn device(&self) -> Device {
        self.backend.device()
    }

    /// Moves the weights, optimizer state and EMA to `device`; later steps run there.
    pub fn to_device(&mut self, device: &Device) -> Result<()> {
        self.place(device, self.precision)
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Sets the activation precision of later steps (weights, moments, losses stay f32).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.place(&self.device(), precision)
    }

    /// On by default. Off, the CPU runs candle's autograd, the path GPUs take: the reference
    /// the engine is tested against.
    pub fn set_cpu_engine(&mut self, on: bool) -> Result<()> {
        let device = self.device();
        self.backend.place(&K::spec(&self.config, &self.options, &self.optimizer, on), &device, self.precision)?;
        self.cpu_engine = on;
        Ok(())
    }

    fn place(&mut self, device: &Device, precision: Precision) -> Result<()> {
        self.backend.place(
            &K::spec(&self.config, &self.options, &self.optimizer, self.cpu_engine),
            device,
            precision,
        )?;
        self.precision = precision;
        Ok(())
    }

    pub fn num_parameters(&self) -> usize {
        self.backend.num_parameters()
    }

    /// Optimizer updates taken so far.
    pub fn optimizer_step(&self) -> u64 {
        self.backend.optimizer_step()
    }

    pub fn config_json(&self) -> String {
        K::config_json(&self.config)
    }

    pub fn options_json(&self) -> String {
        serde_json::to_string(&self.options).expect("serialisable")
    }

    pub fn optimizer_config(&self) -> &AdamWConfig {
        &self.optimizer
    }

    /// The parameters (checkpoint names, creation order), wherever the model runs.
    pub fn weights(&self) -> Result<Vec<(String, Tensor)>> {
        self.backend.weights()
    }

    /// Each parameter's learning-rate multiplier (layer-wise decay), by name.
    pub fn lr_scales(&self) -> Vec<(String, f64)> {
        self.backend.lr_scales()
    }

    /// The optimizer update after a step's backward pass (`grads`: candle's), the EMA's
    /// move, and the loss check: a non-finite loss skips the update and is an error.
    pub(crate) fn update(
        &mut self,
        loss: f64,
        grads: Option<&candle_core::backprop::GradStore>,
        lr: f64,
    ) -> Result<f64> {
        finite_loss(loss)?;
        self.backend.update(grads, lr, K::ema_decay(&self.options))
    }
}

/// The optimizer settings, step and moments of a checkpoint.
fn saved_optimizer<K: Kind>(
    file: &mut Loaded,
    path: &Path,
    options: &K::Options,
) -> Result<(AdamWConfig, u64, HashMap<String, Tensor>)> {
    if file.metadata.contains_key("optimizer") {
        let saved = AdamW::read_checkpoint(file, path)?;
        return Ok((saved.config, saved.step, saved.moments));
    }
    let Some(config) = K::legacy_optimizer(options) else {
        return Err(Error::Checkpoint(format!("{} has no \"optimizer\" entry in its metadata", path.display())));
    };
    let step = match file.metadata.get("step") {
        Some(s) => s.parse().map_err(|e| Error::Checkpoint(format!("{}: bad step: {e}", path.display())))?,
        None => 0,
    };
    Ok((config, step, file.take_prefixed("optimizer.")))
}

/// The loss, or the error of a non-finite one (the update is then skipped).
pub(crate) fn finite_loss(loss: f64) -> Result<f64> {
    if loss.is_finite() {
        Ok(loss)
    } else {
        Err(Error::Numeric(format!("loss is {loss}: the update was skipped")))
    }
}

/// Index of the first largest value of each row of `width`.
pub(crate) fn argmax_rows(values: &[f32], width: usize) -> Vec<i32> {
    values
        .chunks_exact(width)
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best })
                .0 as i32
        })
        .collect()
}

/// All values of `t`, flattened, as f32 (activations may be bf16).
pub(crate) fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// Checks [B, C, H, W] pixels for a BEiT of `cfg` (length, finiteness); returns B.
pub(crate) fn check_pixels(cfg: &BeitConfig, pixels: &[f32]) -> Result<usize> {
    let [h, w] = cfg.image_size;
    let per_image = cfg.num_channels * h * w;
    if pixels.is_empty() || pixels.len() % per_image != 0 {
        return Err(Error::Input(format!(
            "pixels: expected a multiple of {per_image} values (C*H*W = {}*{h}*{w}) and at least one image, got {}",
            cfg.num_channels,
            pixels.len()
        )));
    }
    if let Some(i) = pixels.iter().position(|v| !v.is_finite()) {
        return Err(Error::Input(format!("pixels: value {} at index {i} is not finite", pixels[i])));
    }
    Ok(pixels.len() / per_image)
}

/// Pixels [B, C, H, W] on `device` in the activation dtype of `precision`, checked.
pub(crate) fn image_tensor(cfg: &BeitConfig, pixels: &[f32], device: &Device, precision: Precision) -> Result<Tensor> {
    let b = check_pixels(cfg, pixels)?;
    let [h, w] = cfg.image_size;
    Ok(Tensor::from_slice(pixels, (b, cfg.num_channels, h, w), device)?.to_dtype(precision.dtype())?)
}
