//! A BEiT MIM model with its optimizer: the unit the bindings train, evaluate and checkpoint.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint;
use crate::config::{BeitConfig, Pooling};
use crate::device::Precision;
use crate::hf::{self, HfCheckpoint, HfLayout};
use crate::error::{Error, Result};
use crate::model::{mask_tensors, masked_loss, BeitForMaskedImageModeling};
use crate::optim::{AdamW, AdamWConfig};
use crate::params::{rebuild_on, NamedVars, ParamStore};
use crate::rng::SplitMix64;

const FORMAT: &str = "beit-mim/1";
/// Metadata key of the caller's training state (schedule position, RNG states), saved with
/// the weights so a checkpoint is one atomic file.
const TRAIN_STATE_KEY: &str = "trainState";

pub struct MimTrainer {
    pub config: BeitConfig,
    pub model: BeitForMaskedImageModeling,
    pub vars: NamedVars,
    pub optimizer: AdamW,
    /// Opaque JSON from the caller, saved and loaded with the checkpoint.
    pub train_state: Option<String>,
    device: Device,
    precision: Precision,
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

/// Validated tensors of a batch.
struct BatchTensors {
    pixels: Tensor,
    mask: Tensor,
    positions: Tensor,
    targets: Option<Tensor>,
    num_masked: usize,
}

impl MimTrainer {
    pub fn new(config: BeitConfig, optim: AdamWConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        Self::build(config, optim, ParamStore::initialise(seed))
    }

    fn build(config: BeitConfig, optim: AdamWConfig, store: ParamStore) -> Result<Self> {
        let device = Device::Cpu;
        let (model, vars) =
            store.build(DType::F32, &device, |vb| BeitForMaskedImageModeling::new(&config, vb))?;
        let optimizer = AdamW::new(optim, &vars)?;
        Ok(Self { config, model, vars, optimizer, train_state: None, device, precision: Precision::F32 })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Moves the weights and the optimizer state to `device`; later steps run there.
    pub fn to_device(&mut self, device: &Device) -> Result<()> {
        let config = &self.config;
        let (model, vars) = rebuild_on(&self.vars, device, |vb| BeitForMaskedImageModeling::new(config, vb))?;
        self.optimizer.move_to(&vars, device)?;
        (self.model, self.vars, self.device) = (model, vars, device.clone());
        Ok(())
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Sets the activation precision of later steps and predictions (weights stay f32).
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    pub fn num_parameters(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
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
        let mut trainer =
            Self::build(config, optimizer.config.clone(), ParamStore::from_tensors(file.tensors)).map_err(in_file)?;
        optimizer.restore_into(&mut trainer.optimizer).map_err(in_file)?;
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
        let tensors: Vec<_> = self.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        hf::write(dir, HfLayout::MaskedImageModeling, &self.config, Pooling::Mean, &[], &tensors)
    }

    /// Writes weights, config, optimizer state and `train_state` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let metadata = [("format", FORMAT.to_string()), ("config", self.config.to_json())];
        save_trainer(path, &metadata, &self.vars, &self.optimizer, self.train_state.as_deref())
    }

    /// Linear-probe features ([CLS] and mean patch token of layer `layer`), [B, 2D] row-major.
    pub fn probe_features(&self, pixels: &[f32], layer: usize) -> Result<Vec<f32>> {
        let cfg = &self.config;
        if layer > cfg.num_hidden_layers {
            return Err(Error::Input(format!("layer {layer} does not exist: the model has {} layers (0 = embeddings)", cfg.num_hidden_layers)));
        }
        let pixels = image_tensor(cfg, pixels, &self.device, self.precision)?;
        Ok(f32_values(&self.model.backbone().probe_features(&pixels, layer)?)?)
    }

    fn batch_tensors(&self, pixels: &[f32], mask: &[u8], targets: Option<&[i32]>) -> Result<BatchTensors> {
        let cfg = &self.config;
        let n = cfg.num_patches();
        let pixels = image_tensor(cfg, pixels, &self.device, self.precision)?;
        let b = pixels.dim(0)?;
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
        let (mask_weights, positions) = mask_tensors(mask, b, n, &self.device)?;
        let num_masked = positions.elem_count();
        if num_masked == 0 {
            return Err(Error::Input(
                "mask: no patch of the batch is masked; the MIM loss needs at least one masked patch".into(),
            ));
        }
        let targets = match targets {
            None => None,
            Some(t) => {
                if t.len() != b * n {
                    return Err(Error::Input(format!(
                        "targets: expected {} values (B*N = {b}*{n}), got {}",
                        b * n,
                        t.len()
                    )));
                }
                let v = cfg.vocab_size;
                let mut ids = Vec::with_capacity(num_masked);
                for (i, (&m, &id)) in mask.iter().zip(t).enumerate() {
                    if m == 0 {
                        continue;
                    }
                    if id < 0 || id as usize >= v {
                        return Err(Error::Input(format!(
                            "targets: token id {id} at index {i} is out of range [0, {v})"
                        )));
                    }
                    ids.push(id as u32);
                }
                Some(Tensor::from_vec(ids, num_masked, &self.device)?)
            }
        };
        Ok(BatchTensors {
            pixels,
            mask: mask_weights,
            positions,
            targets,
            num_masked,
        })
    }

    /// One optimisation step; `seed` drives stochastic depth so a step can be replayed.
    pub fn train_step(&mut self, batch: &MimBatch, lr: f64, seed: u64) -> Result<StepMetrics> {
        let t = self.batch_tensors(batch.pixels, batch.mask, Some(batch.targets))?;
        let targets = t.targets.expect("targets were given");
        let mut rng = SplitMix64::new(seed);
        let hidden = self.model.hidden_states(&t.pixels, Some(&t.mask), Some(&mut rng))?;
        let logits = self.model.logits_at(&hidden, &t.positions)?;
        let (loss, mlm_acc) = masked_loss(&logits, &targets)?;
        let loss_value = loss.to_scalar::<f32>()? as f64;
        if !loss_value.is_finite() {
            return Err(Error::Numeric(format!("loss is {loss_value}: the update was skipped")));
        }
        let grads = loss.backward()?;
        let grad_norm = self.optimizer.step(&grads, lr)?;
        Ok(StepMetrics { loss: loss_value, mlm_acc, grad_norm, num_masked: t.num_masked })
    }

    /// Evaluation forward pass (no stochastic depth): logits and argmax ids at masked patches.
    pub fn predict(&self, pixels: &[f32], mask: &[u8]) -> Result<Predictions> {
        let t = self.batch_tensors(pixels, mask, None)?;
        let hidden = self.model.hidden_states(&t.pixels, Some(&t.mask), None)?;
        let logits = self.model.logits_at(&hidden, &t.positions)?;
        let ids = logits.argmax(1)?.to_vec1::<u32>()?.into_iter().map(|i| i as i32).collect();
        Ok(Predictions {
            logits: f32_values(&logits)?,
            ids,
            num_masked: t.num_masked,
        })
    }
}

/// Checkpoint of a model with its optimizer: weights, `optimizer.*` moments, and metadata
/// (format, config, optimizer settings, optional training state), written atomically.
pub(crate) fn save_trainer(
    path: &Path,
    metadata: &[(&str, String)],
    vars: &NamedVars,
    optimizer: &AdamW,
    train_state: Option<&str>,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let mut metadata: HashMap<String, String> = metadata.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    optimizer.write_checkpoint(&mut tensors, &mut metadata);
    if let Some(state) = train_state {
        metadata.insert(TRAIN_STATE_KEY.to_string(), state.to_string());
    }
    checkpoint::save(path, &tensors, metadata)
}

pub(crate) fn take_train_state(file: &mut checkpoint::Loaded) -> Option<String> {
    file.metadata.remove(TRAIN_STATE_KEY)
}

/// [B, C, H, W] pixels for a model of `cfg`, checked for length and finiteness.
/// All values of `t`, flattened, as f32 (activations may be bf16).
pub(crate) fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// Pixels [B, C, H, W] on `device` in the activation dtype of `precision`, checked.
pub(crate) fn image_tensor(cfg: &BeitConfig, pixels: &[f32], device: &Device, precision: Precision) -> Result<Tensor> {
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
    let shape = (pixels.len() / per_image, cfg.num_channels, h, w);
    Ok(Tensor::from_slice(pixels, shape, device)?.to_dtype(precision.dtype())?)
}
