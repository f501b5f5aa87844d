//! Masked image modeling: the BEiT model with its MIM head as a [`Trainer`] kind, its steps
//! on either runner, evaluation and probe features.

use std::path::Path;

use candle_core::Tensor;

use crate::arch::mim::MimParams;
use crate::config::{BeitConfig, Pooling};
use crate::engine::heads::mim::MimEngine;
use crate::engine::{on_pool, Flat};
use crate::error::{Error, Result};
use crate::hf::{self, HfCheckpoint, HfLayout};
use crate::model::mim::{mask_tensors, masked_loss, BeitForMaskedImageModeling};
use crate::optimizer::{check_lr, AdamWConfig};
use crate::params::{ParamTable, Source};
use crate::rng::Draws;
use crate::runner::{flat_values, CandleRunner, EngineRunner, Runner, RunnerSpec};
use crate::tokenizer::{DvaeTrainer, ImageBatch, TokenIds};
use crate::trainer::{check_pixels, f32_values, Images, Kind, Trainer, UpdateMetrics};

/// The MIM model's kind (no options of its own).
pub struct Mim;

pub type BeitTrainer = Trainer<Mim>;

impl Kind for Mim {
    type Config = BeitConfig;
    type Options = ();
    type Runner = dyn MimRunner;
    const FORMAT: &'static str = "beit-mim/1";
    const WHAT: &'static str = "a BEiT MIM checkpoint";

    fn config_json(config: &BeitConfig) -> String {
        config.to_json()
    }

    fn parse_config(json: &str) -> Result<BeitConfig> {
        BeitConfig::from_json(json)
    }

    fn validate(config: &BeitConfig, _: &()) -> Result<()> {
        config.validate()
    }

    fn table(config: &BeitConfig) -> ParamTable {
        MimParams::new(config).0
    }

    fn runner(
        config: &BeitConfig,
        _: &(),
        spec: &RunnerSpec,
        values: Vec<Tensor>,
        ema: Option<Vec<Tensor>>,
    ) -> Result<Box<dyn MimRunner>> {
        let (table, params) = MimParams::new(config);
        if spec.placement.uses_engine() {
            let flat = Flat::new(table, flat_values(&values)?)?;
            let engine = MimEngine::new(config, &params, flat, spec.placement.precision)?;
            Ok(Box::new(EngineRunner::new(engine, spec, ema)?))
        } else {
            let new = |vars: &_, device: &_| BeitForMaskedImageModeling::new(config, &params, vars, device);
            Ok(Box::new(CandleRunner::new(spec, values, ema, new)?))
        }
    }
}

/// A step's targets: the masked patches' ids on the host, or every patch's ids as the
/// tokenizer computed them on its device.
pub enum Targets {
    Masked(Vec<u32>),
    All(Tensor),
}

/// The MIM model's operations on a runner.
pub trait MimRunner: Runner {
    /// Adds the gradient of the summed cross-entropy over the masked patches.
    fn loss_and_grads(
        &mut self,
        images: Images,
        mask: &[u8],
        targets: Targets,
        draws: Draws,
    ) -> Result<BeitLossMetrics>;
    /// Logits [masked patches, vocab] (no stochastic depth).
    fn logits(&mut self, images: Images, mask: &[u8]) -> Result<Vec<f32>>;
    /// [CLS] and mean patch token of layer `layer`, [B, 2D].
    fn probe_features(&mut self, images: Images, layer: usize) -> Result<Vec<f32>>;
}

impl MimRunner for EngineRunner<MimEngine<f32>> {
    fn loss_and_grads(
        &mut self,
        images: Images,
        mask: &[u8],
        targets: Targets,
        draws: Draws,
    ) -> Result<BeitLossMetrics> {
        let ids = match targets {
            Targets::Masked(ids) => ids,
            Targets::All(all) => masked(&all.to_vec1::<u32>()?, mask),
        };
        let rows = ids.len();
        let model = &mut self.model;
        let out = on_pool(|| model.loss_and_grads(images.values, mask, &ids, draws, rows as f64))?;
        self.added(rows);
        let mlm_acc = out.hits as f64 / rows as f64;
        Ok(BeitLossMetrics { loss: out.loss, mlm_acc, num_masked: rows, majority_baseline: majority_share(&ids) })
    }

    fn logits(&mut self, images: Images, mask: &[u8]) -> Result<Vec<f32>> {
        let model = &mut self.model;
        on_pool(|| model.logits(images.values, mask))
    }

    fn probe_features(&mut self, images: Images, layer: usize) -> Result<Vec<f32>> {
        let model = &mut self.model;
        on_pool(|| model.probe_features(images.values, layer))
    }
}

impl MimRunner for CandleRunner<BeitForMaskedImageModeling> {
    fn loss_and_grads(
        &mut self,
        images: Images,
        mask: &[u8],
        targets: Targets,
        draws: Draws,
    ) -> Result<BeitLossMetrics> {
        let px = images.tensor(&self.device, self.precision)?;
        let n = mask.len() / images.batch();
        let (weights, positions) = mask_tensors(mask, images.batch(), n, &self.device)?;
        let targets = match targets {
            Targets::Masked(ids) => Tensor::from_vec(ids, positions.elem_count(), &self.device)?,
            Targets::All(all) => all.to_device(&self.device)?.index_select(&positions, 0)?,
        };
        let hidden = self.model.hidden_states(&px, Some(&weights), Some(draws))?;
        let (loss, mlm_acc) = masked_loss(&self.model.logits_at(&hidden, &positions)?, &targets)?;
        let rows = positions.elem_count();
        let loss = self.backward(&loss, rows)?;
        // The baseline's targets come to the host; the step itself did not need them.
        let majority_baseline = majority_share(&targets.to_vec1::<u32>()?);
        Ok(BeitLossMetrics { loss, mlm_acc, num_masked: rows, majority_baseline })
    }

    fn logits(&mut self, images: Images, mask: &[u8]) -> Result<Vec<f32>> {
        let px = images.tensor(&self.device, self.precision)?;
        let (weights, positions) = mask_tensors(mask, images.batch(), mask.len() / images.batch(), &self.device)?;
        let hidden = self.model.hidden_states(&px, Some(&weights), None)?;
        f32_values(&self.model.logits_at(&hidden, &positions)?)
    }

    fn probe_features(&mut self, images: Images, layer: usize) -> Result<Vec<f32>> {
        f32_values(&self.model.backbone().probe_features(&images.tensor(&self.device, self.precision)?, layer)?)
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

/// What `loss_and_grads` reports.
#[derive(Debug, Clone, Copy)]
pub struct BeitLossMetrics {
    /// Mean cross-entropy over the batch's masked patches.
    pub loss: f64,
    pub mlm_acc: f64,
    pub num_masked: usize,
    /// The share of the most frequent target among the masked patches: the accuracy of
    /// always guessing it, the floor MIM accuracy has to beat.
    pub majority_baseline: f64,
}

/// What a whole step (`train_step`, `pretrain_step`) reports.
#[derive(Debug, Clone, Copy)]
pub struct BeitStepMetrics {
    pub loss: f64,
    pub mlm_acc: f64,
    pub grad_norm: f64,
    pub num_masked: usize,
    pub majority_baseline: f64,
}

impl BeitStepMetrics {
    fn of(l: BeitLossMetrics, u: UpdateMetrics) -> Self {
        let BeitLossMetrics { loss, mlm_acc, num_masked, majority_baseline } = l;
        Self { loss, mlm_acc, grad_norm: u.grad_norm, num_masked, majority_baseline }
    }
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
        Self::build(config, (), optim, Source::Init(seed), None)
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
        Self::build(ckpt.config, (), optim, Source::tensors(ckpt.tensors), None)
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
        let images = check_pixels(cfg, pixels)?;
        self.runner.probe_features(images, layer)
    }

    /// Checks a batch: returns its images and the target ids of the masked patches, in order.
    fn check_batch<'a>(
        &self,
        pixels: &'a [f32],
        mask: &[u8],
        targets: Option<&[i32]>,
    ) -> Result<(Images<'a>, Vec<u32>)> {
        let cfg = &self.config;
        let n = cfg.num_patches();
        let images = check_pixels(cfg, pixels)?;
        let b = images.batch();
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
        Ok((images, ids))
    }

    /// Adds the gradient of the batch's summed masked cross-entropy to the gradient buffer
    /// (`draws`: the step's seed and the batch's first sample in the step).
    pub fn loss_and_grads(&mut self, batch: &MimBatch, draws: Draws) -> Result<BeitLossMetrics> {
        let (images, ids) = self.check_batch(batch.pixels, batch.mask, Some(batch.targets))?;
        self.runner.loss_and_grads(images, batch.mask, Targets::Masked(ids), draws)
    }

    /// [`Self::loss_and_grads`] with the tokenizer's ids of `batch.tokenizer_images` (the same
    /// crops at the tokenizer's resolution) as the targets. On a GPU they stay there.
    pub fn pretrain_loss_and_grads(
        &mut self,
        tokenizer: &mut DvaeTrainer,
        batch: &PretrainBatch,
        draws: Draws,
    ) -> Result<BeitLossMetrics> {
        let (images, _) = self.check_batch(batch.pixels, batch.mask, None)?;
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
        if ids.count() != images.batch() * self.config.num_patches() {
            return Err(Error::Input(format!(
                "tokenizer view: {} images for a batch of {}",
                ids.count() / self.config.num_patches(),
                images.batch()
            )));
        }
        let targets = match ids {
            TokenIds::Host(all) => Targets::Masked(masked(&all, batch.mask)),
            TokenIds::Device(all) => Targets::All(all),
        };
        self.runner.loss_and_grads(images, batch.mask, targets, draws)
    }

    /// One optimisation step: [`Self::loss_and_grads`] then [`Trainer::apply_update`]; `seed`
    /// drives stochastic depth so a step can be replayed.
    pub fn train_step(&mut self, batch: &MimBatch, lr: f64, seed: u64) -> Result<BeitStepMetrics> {
        check_lr(lr)?;
        let loss = self.loss_and_grads(batch, Draws { seed, first_sample: 0 })?;
        Ok(BeitStepMetrics::of(loss, self.apply_update(lr)?))
    }

    /// One pretraining step in one call: [`Self::pretrain_loss_and_grads`] then the update.
    pub fn pretrain_step(
        &mut self,
        tokenizer: &mut DvaeTrainer,
        batch: &PretrainBatch,
        lr: f64,
        seed: u64,
    ) -> Result<BeitStepMetrics> {
        check_lr(lr)?;
        let loss = self.pretrain_loss_and_grads(tokenizer, batch, Draws { seed, first_sample: 0 })?;
        Ok(BeitStepMetrics::of(loss, self.apply_update(lr)?))
    }

    /// Evaluation forward pass (no stochastic depth): logits and argmax ids at masked patches.
    pub fn forward(&mut self, pixels: &[f32], mask: &[u8]) -> Result<Predictions> {
        let (images, _) = self.check_batch(pixels, mask, None)?;
        let logits = self.runner.logits(images, mask)?;
        let mut ids = Vec::new();
        crate::engine::kernels::argmax_rows(&logits, self.config.vocab_size, &mut ids);
        let num_masked = ids.len();
        Ok(Predictions { logits, ids: ids.into_iter().map(|i| i as i32).collect(), num_masked })
    }
}
