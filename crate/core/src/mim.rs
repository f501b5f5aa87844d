//! Masked image modeling: the BEiT model with its MIM head as a [`Trainer`] kind, its steps
//! on the CPU engine or candle, evaluation and probe features.

use std::path::Path;

use candle_core::Tensor;

use crate::backend::{Backend, ModelSpec};
use crate::config::{BeitConfig, Pooling};
use crate::engine::{BeitEngine, Head};
use crate::error::{Error, Result};
use crate::hf::{self, HfCheckpoint, HfLayout};
use crate::model::{mask_tensors, masked_loss, BeitForMaskedImageModeling};
use crate::optim::AdamWConfig;
use crate::params::ParamStore;
use crate::rng::SplitMix64;
use crate::tokenizer::{DvaeTrainer, ImageBatch, TokenIds};
use crate::trainer::{argmax_rows, check_pixels, f32_values, image_tensor, Kind, Trainer};

/// The MIM model's kind (no options of its own).
pub struct Mim;

pub type BeitTrainer = Trainer<Mim>;

impl Kind for Mim {
    type Config = BeitConfig;
    type Options = ();
    type Model = BeitForMaskedImageModeling;
    type Engine = BeitEngine<f32>;
    const FORMAT: &'static str = "beit-mim/1";
    const WHAT: &'static str = "a BEiT MIM checkpoint";
    const OPTIONS_KEY: Option<&'static str> = None;

    fn config_json(config: &BeitConfig) -> String {
        config.to_json()
    }

    fn parse_config(json: &str) -> Result<BeitConfig> {
        BeitConfig::from_json(json)
    }

    fn validate(config: &BeitConfig, _: &()) -> Result<()> {
        config.validate()
    }

    fn spec<'a>(
        config: &'a BeitConfig,
        _: &'a (),
        optimizer: &AdamWConfig,
        cpu_engine: bool,
    ) -> ModelSpec<'a, Self::Model, Self::Engine> {
        ModelSpec {
            new: Box::new(move |vb| BeitForMaskedImageModeling::new(config, vb)),
            engine: Box::new(move |layout, params| {
                BeitEngine::from_layout(config, Head::MaskedImageModeling, layout, params)
            }),
            lr_scale: Box::new(|_| 1.0),
            optimizer: optimizer.clone(),
            ema: false,
            cpu_engine,
        }
    }
}

/// One pretraining batch: the model's view and the tokenizer's view of the same crops.
pub struct PretrainBatch<'a> {
    /// [B, C, H, W], already normalised.
    pub pixels: &'a [f32],
    /// [B, N], 1 = masked.
    pub mask: &'a [u8],
    /// [B, C', h, w] in [0, 1], whose token grid is the patch grid.
    pub tokenizer_images: ImageBatch<'a>,
}

/// A step's targets: the masked patches' ids on the host, or every patch's ids as the
/// tokenizer computed them on its device.
enum Targets {
    Masked(Vec<u32>),
    All(Tensor),
}

/// The share of the most frequent id.
fn majority_share(ids: &[u32]) -> f64 {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    let longest = sorted.chunk_by(|a, b| a == b).map(<[u32]>::len).max().unwrap_or(0);
    longest as f64 / ids.len().max(1) as f64
}

/// The values of `all` where `mask` is set, in order.
fn masked(all: &[u32], mask: &[u8]) -> Vec<u32> {
    all.iter().zip(mask).filter(|(_, &m)| m != 0).map(|(&id, _)| id).collect()
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
pub struct BeitStepMetrics {
    pub loss: f64,
    pub mlm_acc: f64,
    pub grad_norm: f64,
    pub num_masked: usize,
    /// The share of the most frequent target among the masked patches: the accuracy of
    /// always guessing it, the floor MIM accuracy has to beat.
    pub majority_baseline: f64,
}

pub struct Predictions {
    /// [M, V] logits of the masked patches, in batch-major, row-major patch order.
    pub logits: Vec<f32>,
    /// [M] argmax ids.
    pub ids: Vec<i32>,
    pub num_masked: usize,
}

impl Trainer<Mim> {
    pub fn new(config: BeitConfig, optim: AdamWConfig, seed: u64) -> Result<Self> {
        Self::build(config, (), optim, ParamStore::initialise(seed), None)
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
        Self::build(ckpt.config, (), optim, ParamStore::from_tensors(ckpt.tensors), None)
    }

    /// Writes a transformers `BeitForMaskedImageModeling` folder.
    pub fn export_hf(&self, dir: &Path) -> Result<()> {
        hf::write(dir, HfLayout::MaskedImageModeling, &self.config, Pooling::Mean, &[], &self.weights()?)
    }

    /// Linear-probe features ([CLS] and mean patch token of layer `layer`), [B, 2D] row-major.
    pub fn probe_features(&mut self, pixels: &[f32], layer: usize) -> Result<Vec<f32>> {
        let cfg = &self.config;
        if layer > cfg.num_hidden_layers {
            return Err(Error::Input(format!(
                "layer {layer} does not exist: the model has {} layers (0 = embeddings)",
                cfg.num_hidden_layers
            )));
        }
        check_pixels(cfg, pixels)?;
        let precision = self.precision();
        match &mut self.backend {
            Backend::Engine(e) => e.engine.probe_features(pixels, layer),
            Backend::Candle(c) => {
                let pixels = image_tensor(cfg, pixels, &c.device, precision)?;
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
            return Err(Error::Input(format!("mask: expected {} values (B*N = {b}*{n}), got {}", b * n, mask.len())));
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
    pub fn train_step(&mut self, batch: &MimBatch, lr: f64, seed: u64) -> Result<BeitStepMetrics> {
        let (b, ids) = self.check_batch(batch.pixels, batch.mask, Some(batch.targets))?;
        self.step(batch.pixels, batch.mask, b, Targets::Masked(ids), lr, seed)
    }

    /// One pretraining step in one call: the tokenizer's ids of `tokenizer_pixels` (the same
    /// crops at the tokenizer's resolution) are the targets. On a GPU they stay there.
    pub fn pretrain_step(
        &mut self,
        tokenizer: &mut DvaeTrainer,
        batch: &PretrainBatch,
        lr: f64,
        seed: u64,
    ) -> Result<BeitStepMetrics> {
        let (b, _) = self.check_batch(batch.pixels, batch.mask, None)?;
        let d = tokenizer.config.downsample();
        let (th, tw) = (batch.tokenizer_images.height, batch.tokenizer_images.width);
        if (th / d, tw / d) != self.config.grid() {
            let (gh, gw) = self.config.grid();
            return Err(Error::Input(format!(
                "tokenizer view {th}x{tw} gives a {}x{} token grid, but the model has a {gh}x{gw} patch grid",
                th / d,
                tw / d
            )));
        }
        if tokenizer.config.vocab_size > self.config.vocab_size {
            return Err(Error::Config(format!(
                "the tokenizer's vocabulary of {} exceeds the model's vocabSize {}",
                tokenizer.config.vocab_size, self.config.vocab_size
            )));
        }
        let ids = tokenizer.encode_ids(&batch.tokenizer_images)?;
        if ids.len() != b * self.config.num_patches() {
            return Err(Error::Input(format!(
                "tokenizer view: {} images for a batch of {b}",
                ids.len() / self.config.num_patches()
            )));
        }
        let targets = match ids {
            TokenIds::Host(all) => Targets::Masked(masked(&all, batch.mask)),
            TokenIds::Device(all) => Targets::All(all),
        };
        self.step(batch.pixels, batch.mask, b, targets, lr, seed)
    }

    /// The step of a checked batch.
    fn step(
        &mut self,
        pixels: &[f32],
        mask: &[u8],
        b: usize,
        targets: Targets,
        lr: f64,
        seed: u64,
    ) -> Result<BeitStepMetrics> {
        let precision = self.precision();
        let n = self.config.num_patches();
        let (loss, mlm_acc, num_masked, majority_baseline, grads) = match &mut self.backend {
            Backend::Engine(e) => {
                let ids = match targets {
                    Targets::Masked(ids) => ids,
                    Targets::All(all) => masked(&all.to_vec1::<u32>()?, mask),
                };
                let out = e.engine.loss_and_grads(pixels, Some(mask), &ids, 0.0, seed)?;
                (out.loss, out.hits as f64 / out.rows as f64, out.rows, majority_share(&ids), None)
            }
            Backend::Candle(c) => {
                let px = image_tensor(&self.config, pixels, &c.device, precision)?;
                let (weights, positions) = mask_tensors(mask, b, n, &c.device)?;
                let targets = match targets {
                    Targets::Masked(ids) => Tensor::from_vec(ids, positions.elem_count(), &c.device)?,
                    Targets::All(all) => all.to_device(&c.device)?.index_select(&positions, 0)?,
                };
                let hidden = c.model.hidden_states(&px, Some(&weights), Some(&mut SplitMix64::new(seed)))?;
                let (loss, mlm_acc) = masked_loss(&c.model.logits_at(&hidden, &positions)?, &targets)?;
                let value = loss.to_scalar::<f32>()? as f64;
                // A non-finite loss is refused by `update`, before any gradient is applied.
                let grads = if value.is_finite() { Some(loss.backward()?) } else { None };
                // The baseline's targets come to the host; the step itself did not need them.
                (value, mlm_acc, positions.elem_count(), majority_share(&targets.to_vec1::<u32>()?), grads)
            }
        };
        let grad_norm = self.update(loss, grads.as_ref(), lr)?;
        Ok(BeitStepMetrics { loss, mlm_acc, grad_norm, num_masked, majority_baseline })
    }

    /// Evaluation forward pass (no stochastic depth): logits and argmax ids at masked patches.
    pub fn forward(&mut self, pixels: &[f32], mask: &[u8]) -> Result<Predictions> {
        let (b, _) = self.check_batch(pixels, mask, None)?;
        let precision = self.precision();
        let logits = match &mut self.backend {
            Backend::Engine(e) => e.engine.logits(pixels, Some(mask))?,
            Backend::Candle(c) => {
                let px = image_tensor(&self.config, pixels, &c.device, precision)?;
                let (mask, positions) = mask_tensors(mask, b, self.config.num_patches(), &c.device)?;
                let hidden = c.model.hidden_states(&px, Some(&mask), None)?;
                f32_values(&c.model.logits_at(&hidden, &positions)?)?
            }
        };
        let ids = argmax_rows(&logits, self.config.vocab_size);
        let num_masked = ids.len();
        Ok(Predictions { logits, ids, num_masked })
    }
}
