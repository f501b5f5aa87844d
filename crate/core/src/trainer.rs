//! A BEiT MIM model with its optimizer: the unit the bindings train, evaluate and checkpoint.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::backend::{Backend, ModelSpec};
use crate::checkpoint;
use crate::config::{BeitConfig, Pooling};
use crate::device::Precision;
use crate::engine::Head;
use crate::error::{Error, Result};
use crate::hf::{self, HfCheckpoint, HfLayout};
use crate::model::{mask_tensors, masked_loss, BeitForMaskedImageModeling};
use crate::optim::{self, AdamW, AdamWConfig};
use crate::params::ParamStore;
use crate::rng::SplitMix64;

const FORMAT: &str = "beit-mim/1";
/// Metadata key of the caller's training state (schedule position, RNG states), saved with
/// the weights so a checkpoint is one atomic file.
const TRAIN_STATE_KEY: &str = "trainState";

pub struct MimTrainer {
    pub config: BeitConfig,
    /// Opaque JSON from the caller, saved and loaded with the checkpoint.
    pub train_state: Option<String>,
    optimizer: AdamWConfig,
    backend: Backend<BeitForMaskedImageModeling>,
    precision: Precision,
    cpu_engine: bool,
}

/// One batch for the MIM objective, as flat row-major buffers.
pub struct MimBatch<'a> {
    /// [B, C, H, W], already normalised.
    pub pixels: &'a [f32],
    /// [B, N], 1 = masked.
    pub mask: &'a [u8],
    /// [B, N] token ids; only masked positions are read.
    pub targets: &'a [i32],
}

#[derive(Debug, Clone, Copy)]
pub struct StepMetrics {
    pub loss: f64,
    pub mlm_acc: f64,
    pub grad_norm: f64,
    pub num_masked: usize,
}

pub struct Predictions {
    /// [M, V] logits of the masked patches, in batch-major, row-major patch order.
    pub logits: Vec<f32>,
    /// [M] argmax ids.
    pub ids: Vec<i32>,
    pub num_masked: usize,
}

impl MimTrainer {
    pub fn new(config: BeitConfig, optim: AdamWConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        Self::build(config, optim, ParamStore::initialise(seed))
    }

    fn spec<'a>(config: &'a BeitConfig, optimizer: &AdamWConfig, cpu_engine: bool) -> ModelSpec<'a, BeitForMaskedImageModeling> {
        ModelSpec {
            config,
            head: Head::MaskedImageModeling,
            new: Box::new(move |vb| BeitForMaskedImageModeling::new(config, vb)),
            lr_scale: Box::new(|_| 1.0),
            optimizer: optimizer.clone(),
            cpu_engine,
        }
    }

    fn build(config: BeitConfig, optimizer: AdamWConfig, store: ParamStore) -> Result<Self> {
        let backend = Backend::build(&Self::spec(&config, &optimizer, true), store, &Device::Cpu, Precision::F32)?;
        Ok(Self { config, train_state: None, optimizer, backend, precision: Precision::F32, cpu_engine: true })
    }

    pub fn device(&self) -> Device {
        self.backend.device()
    }

    /// Moves the weights and the optimizer state to `device`; later steps run there.
    pub fn to_device(&mut self, device: &Device) -> Result<()> {
        self.place(device, self.precision)
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Sets the activation precision of later steps and predictions (weights stay f32).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.place(&self.device(), precision)
    }

    /// On by default. Off, the CPU runs candle's autograd, the path GPUs take: the reference
    /// the engine is tested against.
    pub fn set_cpu_engine(&mut self, on: bool) -> Result<()> {
        self.backend.place(&Self::spec(&self.config, &self.optimizer, on), &self.device(), self.precision)?;
        self.cpu_engine = on;
        Ok(())
    }

    fn place(&mut self, device: &Device, precision: Precision) -> Result<()> {
        self.backend.place(&Self::spec(&self.config, &self.optimizer, self.cpu_engine), device, precision)?;
        self.precision = precision;
        Ok(())
    }

    pub fn num_parameters(&self) -> usize {
        self.backend.num_parameters()
    }

    pub fn optimizer_step(&self) -> u64 {
        self.backend.optimizer_step()
    }

    pub fn optimizer_config(&self) -> &AdamWConfig {
        &self.optimizer
    }

    /// The parameters (Hugging Face names, creation order), wherever the model runs.
    pub fn weights(&self) -> Result<Vec<(String, Tensor)>> {
        self.backend.weights()
    }

    /// Loads a checkpoint. With `expected`, the file's tensors must fit that config (an error
    /// names the first tensor whose shape differs); otherwise the config stored in the file is used.
    pub fn load(path: &Path, expected: Option<&BeitConfig>) -> Result<Self> {
        let mut file = checkpoint::load(path)?;
        file.expect_format(path, FORMAT, "a BEiT MIM checkpoint")?;
        let config = match expected {
            Some(c) => c.clone(),
            None => BeitConfig::from_json(file.meta("config", path)?)?,
        };
        let optimizer = AdamW::read_checkpoint(&mut file, path)?;
        let train_state = take_train_state(&mut file);
        let in_file = |e: Error| Error::Checkpoint(format!("{}: {e}", path.display()));
        let mut trainer = Self::build(config, optimizer.config.clone(), ParamStore::from_tensors(file.tensors)).map_err(in_file)?;
        trainer.backend.restore_optimizer(optimizer.moments, optimizer.step).map_err(in_file)?;
        trainer.train_state = train_state;
        Ok(trainer)
    }

    /// A MIM model from a transformers `BeitForMaskedImageModeling` checkpoint, with a fresh
    /// optimizer.
    pub fn from_hf(ckpt: HfCheckpoint, optim: AdamWConfig) -> Result<Self> {
        if ckpt.layout != HfLayout::MaskedImageModeling {
            return Err(Error::Checkpoint(format!(
                "a {} checkpoint cannot be pretrained further: masked image modeling needs a \
                 BeitForMaskedImageModeling checkpoint (mask token and lm_head)",
                ckpt.layout.architecture()
            )));
        }
        Self::build(ckpt.config, optim, ParamStore::from_tensors(ckpt.tensors))
    }

    /// Writes a transformers `BeitForMaskedImageModeling` folder.
    pub fn export_hf(&self, dir: &Path) -> Result<()> {
        hf::write(dir, HfLayout::MaskedImageModeling, &self.config, Pooling::Mean, &[], &self.weights()?)
    }

    /// Writes weights, config, optimizer state and `train_state` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let metadata = [("format", FORMAT.to_string()), ("config", self.config.to_json())];
        save_trainer(path, &metadata, &self.backend, self.train_state.as_deref())
    }

    /// Linear-probe features ([CLS] and mean patch token of layer `layer`), [B, 2D] row-major.
    pub fn probe_features(&mut self, pixels: &[f32], layer: usize) -> Result<Vec<f32>> {
        let cfg = &self.config;
        if layer > cfg.num_hidden_layers {
            return Err(Error::Input(format!("layer {layer} does not exist: the model has {} layers (0 = embeddings)", cfg.num_hidden_layers)));
        }
        check_pixels(cfg, pixels)?;
        match &mut self.backend {
            Backend::Engine(e) => e.engine.probe_features(pixels, layer),
            Backend::Candle(c) => {
                let pixels = image_tensor(cfg, pixels, &c.device, self.precision)?;
                f32_values(&c.model.backbone().probe_features(&pixels, layer)?)
            }
        }
    }

    /// Checks a batch: returns its size and the target ids of the masked patches, in order.
    fn check_batch(&self, pixels: &[f32], mask: &[u8], targets: Option<&[i32]>) -> Result<(usize, Vec<u32>)> {
        let cfg = &self.config;
        let n = cfg.num_patches();
        let b = check_pixels(cfg, pixels)?;
        if mask.len() != b * n {
            return Err(Error::Input(format!(
                "mask: expected {} values (B*N = {b}*{n}), got {}",
                b * n,
                mask.len()
            )));
        }
        if let Some(i) = mask.iter().position(|&m| m > 1) {
            return Err(Error::Input(format!("mask: values must be 0 or 1, got {} at index {i}", mask[i])));
        }
        if !mask.contains(&1) {
            return Err(Error::Input(
                "mask: no patch of the batch is masked; the MIM loss needs at least one masked patch".into(),
            ));
        }
        let mut ids = Vec::new();
        if let Some(t) = targets {
            if t.len() != b * n {
                return Err(Error::Input(format!(
                    "targets: expected {} values (B*N = {b}*{n}), got {}",
                    b * n,
                    t.len()
                )));
            }
            let v = cfg.vocab_size;
            for (i, (&m, &id)) in mask.iter().zip(t).enumerate() {
                if m == 0 {
                    continue;
                }
                if id < 0 || id as usize >= v {
                    return Err(Error::Input(format!("targets: token id {id} at index {i} is out of range [0, {v})")));
                }
                ids.push(id as u32);
            }
        }
        Ok((b, ids))
    }

    /// One optimisation step; `seed` drives stochastic depth so a step can be replayed.
    pub fn train_step(&mut self, batch: &MimBatch, lr: f64, seed: u64) -> Result<StepMetrics> {
        let (b, ids) = self.check_batch(batch.pixels, batch.mask, Some(batch.targets))?;
        let num_masked = ids.len();
        let (loss, mlm_acc, grad_norm) = match &mut self.backend {
            Backend::Engine(e) => {
                let out = e.engine.loss_and_grads(batch.pixels, Some(batch.mask), &ids, 0.0, seed)?;
                finite_loss(out.loss)?;
                let norm = e.optimizer.update(&mut e.engine.params, &e.engine.grads, lr)?;
                (out.loss, out.hits as f64 / out.rows as f64, norm)
            }
            Backend::Candle(c) => {
                let n = self.config.num_patches();
                let pixels = image_tensor(&self.config, batch.pixels, &c.device, self.precision)?;
                let (mask, positions) = mask_tensors(batch.mask, b, n, &c.device)?;
                let targets = Tensor::from_vec(ids, num_masked, &c.device)?;
                let mut rng = SplitMix64::new(seed);
                let hidden = c.model.hidden_states(&pixels, Some(&mask), Some(&mut rng))?;
                let logits = c.model.logits_at(&hidden, &positions)?;
                let (loss, mlm_acc) = masked_loss(&logits, &targets)?;
                let loss_value = finite_loss(loss.to_scalar::<f32>()? as f64)?;
                let grads = loss.backward()?;
                (loss_value, mlm_acc, c.optimizer.step(&grads, lr)?)
            }
        };
        Ok(StepMetrics { loss, mlm_acc, grad_norm, num_masked })
    }

    /// Evaluation forward pass (no stochastic depth): logits and argmax ids at masked patches.
    pub fn predict(&mut self, pixels: &[f32], mask: &[u8]) -> Result<Predictions> {
        let (b, _) = self.check_batch(pixels, mask, None)?;
        let v = self.config.vocab_size;
        let logits = match &mut self.backend {
            Backend::Engine(e) => e.engine.logits(pixels, Some(mask))?,
            Backend::Candle(c) => {
                let px = image_tensor(&self.config, pixels, &c.device, self.precision)?;
                let (mask, positions) = mask_tensors(mask, b, self.config.num_patches(), &c.device)?;
                let hidden = c.model.hidden_states(&px, Some(&mask), None)?;
                f32_values(&c.model.logits_at(&hidden, &positions)?)?
            }
        };
        let ids = argmax_rows(&logits, v);
        let num_masked = ids.len();
        Ok(Predictions { logits, ids, num_masked })
    }
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
        .map(|row| row.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0 as i32)
        .collect()
}

/// Checkpoint of a model with its optimizer: weights, `optimizer.*` moments, and metadata
/// (format, config, optimizer settings, optional training state), written atomically.
pub(crate) fn save_trainer<M>(path: &Path, metadata: &[(&str, String)], backend: &Backend<M>, train_state: Option<&str>) -> Result<()> {
    let mut tensors = backend.weights()?;
    let mut metadata: HashMap<String, String> = metadata.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    optim::write_checkpoint(backend.optimizer_config(), backend.optimizer_step(), backend.optimizer_state()?, &mut tensors, &mut metadata);
    if let Some(state) = train_state {
        metadata.insert(TRAIN_STATE_KEY.to_string(), state.to_string());
    }
    checkpoint::save(path, &tensors, metadata)
}

pub(crate) fn take_train_state(file: &mut checkpoint::Loaded) -> Option<String> {
    file.metadata.remove(TRAIN_STATE_KEY)
}

/// All values of `t`, flattened, as f32 (activations may be bf16).
pub(crate) fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// Checks [B, C, H, W] pixels for a model of `cfg` (length, finiteness); returns B.
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
