//! A BEiT MIM model with its optimizer: the unit the bindings train, evaluate and checkpoint.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint;
use crate::config::BeitConfig;
use crate::error::{Error, Result};
use crate::model::{mask_tensors, masked_loss, BeitForMaskedImageModeling};
use crate::optim::{AdamW, AdamWConfig};
use crate::params::{NamedVars, ParamStore};
use crate::rng::SplitMix64;

const FORMAT: &str = "beit-mim/1";
const OPTIM_PREFIX: &str = "optimizer.";

pub struct MimTrainer {
    pub config: BeitConfig,
    pub model: BeitForMaskedImageModeling,
    pub vars: NamedVars,
    pub optimizer: AdamW,
    device: Device,
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
        Ok(Self { config, model, vars, optimizer, device })
    }

    pub fn num_parameters(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Loads a checkpoint. With `expected`, the file's tensors must fit that config (an error
    /// names the first tensor whose shape differs); otherwise the config stored in the file is used.
    pub fn load(path: &Path, expected: Option<&BeitConfig>) -> Result<Self> {
        let mut file = checkpoint::load(path)?;
        let format = file.meta("format", path)?;
        if format != FORMAT {
            return Err(Error::Checkpoint(format!(
                "{} has format {format:?}, expected {FORMAT:?}",
                path.display()
            )));
        }
        let config = match expected {
            Some(c) => c.clone(),
            None => BeitConfig::from_json(file.meta("config", path)?)?,
        };
        let optim: OptimizerMeta = serde_json::from_str(file.meta("optimizer", path)?)
            .map_err(|e| Error::Checkpoint(format!("{}: bad optimizer metadata: {e}", path.display())))?;
        let moments = file.take_prefixed(OPTIM_PREFIX);
        let in_file = |e: Error| Error::Checkpoint(format!("{}: {e}", path.display()));
        let mut trainer =
            Self::build(config, optim.config, ParamStore::from_tensors(file.tensors)).map_err(in_file)?;
        trainer.optimizer.restore(moments, optim.step).map_err(in_file)?;
        Ok(trainer)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> =
            self.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        for (name, t) in self.optimizer.state_tensors() {
            tensors.push((format!("{OPTIM_PREFIX}{name}"), t));
        }
        let optim = OptimizerMeta { config: self.optimizer.config.clone(), step: self.optimizer.step };
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("config".to_string(), self.config.to_json()),
            ("optimizer".to_string(), serde_json::to_string(&optim).expect("serialisable")),
        ]);
        checkpoint::save(path, &tensors, metadata)
    }

    fn batch_tensors(&self, pixels: &[f32], mask: &[u8], targets: Option<&[i32]>) -> Result<BatchTensors> {
        let cfg = &self.config;
        let [h, w] = cfg.image_size;
        let per_image = cfg.num_channels * h * w;
        let n = cfg.num_patches();
        if pixels.is_empty() || pixels.len() % per_image != 0 {
            return Err(Error::Input(format!(
                "pixels: expected a multiple of {per_image} values (C*H*W = {}*{h}*{w}) and at least one image, got {}",
                cfg.num_channels,
                pixels.len()
            )));
        }
        let b = pixels.len() / per_image;
        if let Some(i) = pixels.iter().position(|v| !v.is_finite()) {
            return Err(Error::Input(format!("pixels: value {} at index {i} is not finite", pixels[i])));
        }
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
            pixels: Tensor::from_slice(pixels, (b, cfg.num_channels, h, w), &self.device)?,
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
            logits: logits.flatten_all()?.to_vec1::<f32>()?,
            ids,
            num_masked: t.num_masked,
        })
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct OptimizerMeta {
    config: AdamWConfig,
    step: u64,
}
