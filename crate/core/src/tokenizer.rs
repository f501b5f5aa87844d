//! Training and inference of the dVAE tokenizer: Gumbel-softmax relaxation, logit-Laplace (or
//! MSE) reconstruction, KL to a uniform prior, AdamW, optional EMA of the weights.

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::arch::dvae::DvaeParams;
pub use crate::config::{DvaeConfig, ReconLoss};
use crate::engine::dvae::{DvaeEngine, Objective};
use crate::engine::on_pool;
use crate::error::{Error, Result};
use crate::model::dvae::{map_pixels, Dvae};
use crate::ops::{scaled_softmax, softmax_last_dim};
use crate::optimizer::{check_lr, AdamWConfig};
use crate::params::{ParamTable, Source};
use crate::rng::Draws;
use crate::runner::{flat_values, CandleRunner, EngineRunner, Runner, RunnerSpec};
use crate::trainer::{Kind, Trainer, UpdateMetrics};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DvaeTrainingOptions {
    pub optimizer: AdamWConfig,
    /// EMA decay of the weights (DALL-E: 0.999); 0 turns EMA off. Encode/decode use the EMA
    /// weights when it is on.
    pub ema_decay: f64,
    pub recon_loss: ReconLoss,
}

impl Default for DvaeTrainingOptions {
    /// DALL-E's dVAE recipe: AdamW (0.9, 0.999, 1e-8), wd 1e-4, EMA 0.999, logit-Laplace.
    fn default() -> Self {
        Self {
            optimizer: AdamWConfig { weight_decay: 1e-4, clip_grad_norm: 0.0, ..AdamWConfig::default() },
            ema_decay: 0.999,
            recon_loss: ReconLoss::LogitLaplace,
        }
    }
}

/// What `loss_and_grads` reports.
#[derive(Debug, Clone, Copy)]
pub struct DvaeLossMetrics {
    /// The optimised objective: recon + klWeight * KL, both per pixel value.
    pub loss: f64,
    /// Reconstruction loss per pixel value.
    pub recon_loss: f64,
    /// KL(q || uniform) per token position, in nats.
    pub kl: f64,
    /// exp(entropy) of the batch's argmax-code histogram.
    pub perplexity: f64,
    /// Distinct argmax codes in the batch.
    pub codes_used: usize,
}

/// What a whole step reports.
#[derive(Debug, Clone, Copy)]
pub struct DvaeStepMetrics {
    /// The optimised objective: recon + klWeight * KL, both per pixel value.
    pub loss: f64,
    /// Reconstruction loss per pixel value.
    pub recon_loss: f64,
    /// KL(q || uniform) per token position, in nats.
    pub kl: f64,
    /// exp(entropy) of the batch's argmax-code histogram.
    pub perplexity: f64,
    /// Distinct argmax codes in the batch.
    pub codes_used: usize,
    pub grad_norm: f64,
}

impl DvaeStepMetrics {
    fn of(l: DvaeLossMetrics, u: UpdateMetrics) -> Self {
        let DvaeLossMetrics { loss, recon_loss, kl, perplexity, codes_used } = l;
        Self { loss, recon_loss, kl, perplexity, codes_used, grad_norm: u.grad_norm }
    }
}

/// The tokenizer's kind: DALL-E's dVAE, trained with `DvaeTrainingOptions`.
pub struct Tokenizer;

pub type DvaeTrainer = Trainer<Tokenizer>;

impl Kind for Tokenizer {
    type Config = DvaeConfig;
    type Options = DvaeTrainingOptions;
    type Runner = dyn DvaeRunner;
    const FORMAT: &'static str = "beit-dvae/1";
    const WHAT: &'static str = "a tokenizer checkpoint";

    fn config_json(config: &DvaeConfig) -> String {
        config.to_json()
    }

    fn parse_config(json: &str) -> Result<DvaeConfig> {
        DvaeConfig::from_json(json)
    }

    fn validate(config: &DvaeConfig, training: &DvaeTrainingOptions) -> Result<()> {
        config.validate()?;
        training.optimizer.validate()?;
        if !(0.0..1.0).contains(&training.ema_decay) {
            return Err(Error::Config(format!("emaDecay must be in [0, 1), got {}", training.ema_decay)));
        }
        Ok(())
    }

    fn table(config: &DvaeConfig) -> ParamTable {
        DvaeParams::new(config).0
    }

    fn ema_decay(training: &DvaeTrainingOptions) -> f64 {
        training.ema_decay
    }

    fn legacy_optimizer(training: &DvaeTrainingOptions) -> Option<AdamWConfig> {
        Some(training.optimizer.clone())
    }

    fn runner(
        config: &DvaeConfig,
        _: &DvaeTrainingOptions,
        spec: &RunnerSpec,
        values: Vec<Tensor>,
        ema: Option<Vec<Tensor>>,
    ) -> Result<Box<dyn DvaeRunner>> {
        let (table, params) = DvaeParams::new(config);
        if spec.placement.uses_engine() {
            let engine = DvaeEngine::new(config, &params, table, flat_values(&values)?, spec.placement.precision)?;
            Ok(Box::new(EngineRunner::new(engine, spec, ema)?))
        } else {
            let new = |vars: &_, _: &_| Ok(Dvae::new(config, &params, vars));
            Ok(Box::new(CandleRunner::new(spec, values, ema, new)?))
        }
    }
}

/// The tokenizer's operations on a runner.
pub trait DvaeRunner: Runner {
    /// Adds the gradient of the objective summed over the `images` of the batch; returns the
    /// loss and every position's argmax code.
    fn loss_and_grads(
        &mut self,
        batch: &ImageBatch,
        images: usize,
        objective: &Objective,
        draws: Draws,
    ) -> Result<(DvaeLoss, Vec<u32>)>;
    /// Argmax token ids, from the EMA weights when kept.
    fn encode_ids(&mut self, batch: &ImageBatch) -> Result<TokenIds>;
    /// Images [B, C, h*d, w*d] in [0, 1] from in-range ids [B, h, w], from the EMA weights when kept.
    fn decode(&mut self, ids: &[u32], height: usize, width: usize) -> Result<Vec<f32>>;
}

/// A step's loss parts.
pub struct DvaeLoss {
    pub loss: f64,
    pub recon: f64,
    pub kl: f64,
}

impl DvaeRunner for EngineRunner<DvaeEngine<f32>> {
    fn loss_and_grads(
        &mut self,
        batch: &ImageBatch,
        images: usize,
        objective: &Objective,
        draws: Draws,
    ) -> Result<(DvaeLoss, Vec<u32>)> {
        let mut codes = Vec::new();
        let (pixels, h, w) = (batch.pixels, batch.height, batch.width);
        let model = &mut self.model;
        let out = on_pool(|| model.loss_and_grads(pixels, h, w, objective, draws, images as f64, &mut codes))?;
        self.added(images);
        Ok((DvaeLoss { loss: out.loss, recon: out.recon, kl: out.kl }, codes))
    }

    fn encode_ids(&mut self, batch: &ImageBatch) -> Result<TokenIds> {
        let (model, ema) = (&mut self.model, self.ema.own());
        Ok(TokenIds::Host(on_pool(|| model.encode(ema, batch.pixels, batch.height, batch.width))?))
    }

    fn decode(&mut self, ids: &[u32], height: usize, width: usize) -> Result<Vec<f32>> {
        let (model, ema) = (&mut self.model, self.ema.own());
        on_pool(|| model.decode(ema, ids, height, width))
    }
}

impl DvaeRunner for CandleRunner<Dvae> {
    fn loss_and_grads(
        &mut self,
        batch: &ImageBatch,
        _: usize,
        objective: &Objective,
        draws: Draws,
    ) -> Result<(DvaeLoss, Vec<u32>)> {
        let x = map_pixels(&images(&self.model.config, batch, &self.device)?)?;
        let logits = self.model.encoder.forward(&x)?;
        let (b, h, w, v) = logits.dims4()?;
        let noise = gumbel_noise(logits.dims(), draws.seed, draws.first_sample * h * w * v, &self.device)?;
        let soft = scaled_softmax(&(&logits + noise)?, None, 1.0 / objective.temperature)?;
        let out = self.model.decoder.forward(&soft)?;
        let recon = reconstruction_loss(&out, &x, objective.recon)?;
        let kl = kl_to_uniform(&logits)?;
        let values_per_position = (x.elem_count() / (b * h * w)) as f64;
        let loss = (&recon + (&kl * (objective.kl_weight / values_per_position))?)?;
        let loss = self.backward(&loss, b)?;
        let codes = logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?;
        let (recon, kl) = (recon.to_scalar::<f32>()? as f64, kl.to_scalar::<f32>()? as f64);
        Ok((DvaeLoss { loss, recon, kl }, codes))
    }

    fn encode_ids(&mut self, batch: &ImageBatch) -> Result<TokenIds> {
        let x = map_pixels(&images(&self.model.config, batch, &self.device)?)?.to_dtype(self.precision.dtype())?;
        let encoder = self.eval_model().encoder.detached();
        Ok(TokenIds::Device(encoder.forward(&x)?.argmax(D::Minus1)?.flatten_all()?))
    }

    fn decode(&mut self, ids: &[u32], height: usize, width: usize) -> Result<Vec<f32>> {
        let v = self.model.config.vocab_size;
        let b = ids.len() / (height * width);
        let one_hot = Tensor::eye(v, DType::F32, &self.device)?
            .index_select(&Tensor::from_slice(ids, ids.len(), &self.device)?, 0)?
            .reshape((b, height, width, v))?;
        let model = self.eval_model().detached();
        let images = model.reconstruction(&model.decoder.forward(&one_hot)?)?;
        Ok(images.permute((0, 3, 1, 2))?.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// Token ids, flat u32: on the host, or a tensor on the device that computed them.
pub enum TokenIds {
    Host(Vec<u32>),
    Device(Tensor),
}

impl TokenIds {
    pub fn count(&self) -> usize {
        match self {
            Self::Host(v) => v.len(),
            Self::Device(t) => t.elem_count(),
        }
    }
}

/// Images of a batch: [B, C, H, W] in [0, 1].
pub struct ImageBatch<'a> {
    pub pixels: &'a [f32],
    pub height: usize,
    pub width: usize,
}

impl Trainer<Tokenizer> {
    /// A new tokenizer: weights from `seed`, the EMA (when on) starting as their copy.
    pub fn new(config: DvaeConfig, training: DvaeTrainingOptions, seed: u64) -> Result<Self> {
        let optimizer = training.optimizer.clone();
        Self::build(config, training, optimizer, Source::Init(seed), None)
    }

    /// Adds the gradient of the batch's objective, summed over its images, to the gradient
    /// buffer (`draws`: the step's seed and the batch's first image in the step).
    pub fn loss_and_grads(
        &mut self,
        batch: &ImageBatch,
        temperature: f64,
        kl_weight: f64,
        draws: Draws,
    ) -> Result<DvaeLossMetrics> {
        if !(temperature > 0.0 && temperature.is_finite()) {
            return Err(Error::Input(format!("temperature must be a finite number > 0, got {temperature}")));
        }
        if !(kl_weight >= 0.0 && kl_weight.is_finite()) {
            return Err(Error::Input(format!("klWeight must be a finite number >= 0, got {kl_weight}")));
        }
        let images = check_images(&self.config, batch)?;
        let objective = Objective { temperature, kl_weight, recon: self.options.recon_loss };
        let (loss, codes) = self.runner.loss_and_grads(batch, images, &objective, draws)?;
        let (perplexity, codes_used) = codebook_usage(&codes, self.config.vocab_size);
        Ok(DvaeLossMetrics { loss: loss.loss, recon_loss: loss.recon, kl: loss.kl, perplexity, codes_used })
    }

    /// One step: [`Self::loss_and_grads`] then [`Trainer::apply_update`]; `seed` drives the
    /// Gumbel noise.
    pub fn train_step(
        &mut self,
        batch: &ImageBatch,
        temperature: f64,
        kl_weight: f64,
        lr: f64,
        seed: u64,
    ) -> Result<DvaeStepMetrics> {
        check_lr(lr)?;
        let loss = self.loss_and_grads(batch, temperature, kl_weight, Draws { seed, first_sample: 0 })?;
        Ok(DvaeStepMetrics::of(loss, self.apply_update(lr)?))
    }

    /// Token ids [B, H/d, W/d] (argmax of the encoder logits; deterministic), from the EMA
    /// weights when the tokenizer keeps them. Runs in the tokenizer's precision (bf16 suits MIM
    /// targets, which need only the argmax).
    pub fn encode(&mut self, batch: &ImageBatch) -> Result<Vec<i32>> {
        let ids = match self.encode_ids(batch)? {
            TokenIds::Host(ids) => ids,
            TokenIds::Device(ids) => ids.to_vec1::<u32>()?,
        };
        Ok(ids.into_iter().map(|i| i as i32).collect())
    }

    /// [`Self::encode`]'s ids where they are computed: on the host (engine) or the device.
    pub(crate) fn encode_ids(&mut self, batch: &ImageBatch) -> Result<TokenIds> {
        check_images(&self.config, batch)?;
        self.runner.encode_ids(batch)
    }

    /// Images [B, C, h*d, w*d] in [0, 1] from ids [B, h, w], from the EMA weights when kept.
    pub fn decode(&mut self, ids: &[i32], height: usize, width: usize) -> Result<Vec<f32>> {
        let v = self.config.vocab_size;
        if height == 0 || width == 0 || ids.is_empty() || !ids.len().is_multiple_of(height * width) {
            return Err(Error::Input(format!(
                "ids: expected a positive multiple of {} values (token grid {height}x{width}), got {}",
                height * width,
                ids.len()
            )));
        }
        if let Some(i) = ids.iter().position(|&id| id < 0 || id as usize >= v) {
            return Err(Error::Input(format!("ids: token id {} at index {i} is out of range [0, {v})", ids[i])));
        }
        let flat: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.runner.decode(&flat, height, width)
    }
}

/// Checks [B, C, H, W] images in [0, 1] of a size the tokenizer can take; returns B.
fn check_images(config: &DvaeConfig, batch: &ImageBatch) -> Result<usize> {
    let c = config.num_channels;
    let (h, w) = (batch.height, batch.width);
    let d = config.downsample();
    if h == 0 || w == 0 || h % d != 0 || w % d != 0 {
        return Err(Error::Input(format!(
            "image size {h}x{w}: height and width must be positive multiples of the tokenizer's downsampling factor {d}"
        )));
    }
    // Checked: a wrapped product could pass the length test below.
    let Some(per) = c.checked_mul(h).and_then(|v| v.checked_mul(w)) else {
        return Err(Error::Input(format!("image size {h}x{w} with {c} channels is too large")));
    };
    if batch.pixels.is_empty() || !batch.pixels.len().is_multiple_of(per) {
        return Err(Error::Input(format!(
            "pixels: expected a positive multiple of {per} values (C*H*W = {c}*{h}*{w}), got {}",
            batch.pixels.len()
        )));
    }
    if let Some(i) = batch.pixels.iter().position(|v| !(0.0..=1.0).contains(v)) {
        return Err(Error::Input(format!(
            "pixels: tokenizer inputs must be in [0, 1], got {} at index {i}",
            batch.pixels[i]
        )));
    }
    Ok(batch.pixels.len() / per)
}

/// [B, C, H, W] in [0, 1] -> [B, H, W, C] tensor on `device`, checked.
fn images(config: &DvaeConfig, batch: &ImageBatch, device: &Device) -> Result<Tensor> {
    let b = check_images(config, batch)?;
    let shape = (b, config.num_channels, batch.height, batch.width);
    Ok(Tensor::from_slice(batch.pixels, shape, device)?.permute((0, 2, 3, 1))?.contiguous()?)
}

/// Gumbel(0, 1) noise from a seeded generator, so a step can be replayed: draws `offset..` of
/// the step's stream (`engine::kernels::gumbel_noise`).
pub fn gumbel_noise(dims: &[usize], seed: u64, offset: usize, device: &Device) -> Result<Tensor> {
    let mut g = vec![0f32; dims.iter().product()];
    crate::engine::kernels::gumbel_noise(seed, offset, &mut g);
    Ok(Tensor::from_vec(g, dims, device)?)
}

/// Mean reconstruction loss per pixel value. `out`: [B, H, W, 2C] (mu, log b); `x`: mapped
/// pixels [B, H, W, C].
pub fn reconstruction_loss(out: &Tensor, x: &Tensor, kind: ReconLoss) -> candle_core::Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    let mu = out.narrow(D::Minus1, 0, c)?;
    match kind {
        ReconLoss::LogitLaplace => {
            // -log f(x | mu, b) = log(2 b x (1 - x)) + |logit(x) - mu| / b
            let log_b = out.narrow(D::Minus1, c, c)?;
            let logit_x = (x.log()? - x.affine(-1.0, 1.0)?.log()?)?;
            let x_term = (x.log()? + x.affine(-1.0, 1.0)?.log()?)?;
            let nll = ((&log_b + x_term)? + ((logit_x - &mu)?.abs()? * log_b.neg()?.exp()?)?)?;
            (nll + std::f64::consts::LN_2)?.mean_all()
        }
        ReconLoss::Mse => (candle_nn::ops::sigmoid(&mu)? - x)?.sqr()?.mean_all(),
    }
}

/// Mean over positions of KL(softmax(logits) || uniform) = sum q log q + log V.
pub fn kl_to_uniform(logits: &Tensor) -> candle_core::Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    let q = softmax_last_dim(logits)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?;
    let expected_logit = (&q * logits)?.sum_keepdim(D::Minus1)?;
    ((expected_logit - lse)? + (v as f64).ln())?.mean_all()
}

/// The codebook perplexity (exp of the entropy of the code histogram) and the number of
/// distinct codes of `ids`.
pub fn codebook_usage(ids: &[u32], vocab: usize) -> (f64, usize) {
    let mut counts = vec![0usize; vocab];
    for &i in ids {
        counts[i as usize] += 1;
    }
    let n = ids.len() as f64;
    let entropy: f64 = counts.iter().filter(|&&c| c > 0).map(|&c| -(c as f64 / n) * (c as f64 / n).ln()).sum();
    (entropy.exp(), counts.iter().filter(|&&c| c > 0).count())
}
