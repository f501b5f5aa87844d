//! Training and inference of the dVAE tokenizer: Gumbel-softmax relaxation, logit-Laplace (or
//! MSE) reconstruction, KL to a uniform prior, AdamW, optional EMA of the weights.

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, ModelSpec};
use crate::dvae::{map_pixels, Dvae, DvaeConfig};
use crate::engine::dvae::DvaeEngine;
use crate::error::{Error, Result};
use crate::ops::{scaled_softmax, softmax_last_dim};
use crate::optim::AdamWConfig;
use crate::params::ParamStore;
use crate::trainer::{Kind, Trainer};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ReconLoss {
    /// DALL-E's logit-Laplace likelihood on mapped pixels.
    LogitLaplace,
    /// Squared error of sigmoid(mu) against the mapped pixels.
    Mse,
}

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

/// The tokenizer's kind: DALL-E's dVAE, trained with `DvaeTrainingOptions`.
pub struct Tokenizer;

pub type DvaeTrainer = Trainer<Tokenizer>;

impl Kind for Tokenizer {
    type Config = DvaeConfig;
    type Options = DvaeTrainingOptions;
    type Model = Dvae;
    type Engine = DvaeEngine<f32>;
    const FORMAT: &'static str = "beit-dvae/1";
    const WHAT: &'static str = "a tokenizer checkpoint";
    const OPTIONS_KEY: Option<&'static str> = Some("training");

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

    fn spec<'a>(
        config: &'a DvaeConfig,
        training: &'a DvaeTrainingOptions,
        optimizer: &AdamWConfig,
        cpu_engine: bool,
    ) -> ModelSpec<'a, Dvae, DvaeEngine<f32>> {
        ModelSpec {
            new: Box::new(move |vb| Dvae::new(config, vb)),
            engine: Box::new(move |layout, params| DvaeEngine::from_layout(config, layout, params)),
            lr_scale: Box::new(|_| 1.0),
            optimizer: optimizer.clone(),
            ema: training.ema_decay > 0.0,
            cpu_engine,
        }
    }

    fn ema_decay(training: &DvaeTrainingOptions) -> f64 {
        training.ema_decay
    }

    fn legacy_optimizer(training: &DvaeTrainingOptions) -> Option<AdamWConfig> {
        Some(training.optimizer.clone())
    }
}

/// Token ids, flat u32: on the host, or a tensor on the device that computed them.
pub(crate) enum TokenIds {
    Host(Vec<u32>),
    Device(Tensor),
}

impl TokenIds {
    pub fn len(&self) -> usize {
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
        Self::build(config, training, optimizer, ParamStore::initialise(seed), None)
    }

    /// Checks [B, C, H, W] images in [0, 1] of a size the tokenizer can take; returns B.
    fn check_images(&self, batch: &ImageBatch) -> Result<usize> {
        check_images(&self.config, batch)
    }

    pub fn train_step(
        &mut self,
        batch: &ImageBatch,
        temperature: f64,
        kl_weight: f64,
        lr: f64,
        seed: u64,
    ) -> Result<DvaeStepMetrics> {
        if !(temperature > 0.0 && temperature.is_finite()) {
            return Err(Error::Input(format!("temperature must be a finite number > 0, got {temperature}")));
        }
        if !(kl_weight >= 0.0 && kl_weight.is_finite()) {
            return Err(Error::Input(format!("klWeight must be a finite number >= 0, got {kl_weight}")));
        }
        self.check_images(batch)?;
        let recon = self.options.recon_loss;
        let (loss, recon_loss, kl, codes, grads) = match &mut self.backend {
            Backend::Engine(e) => {
                let mut codes = Vec::new();
                let out = e.engine.loss_and_grads(
                    batch.pixels,
                    batch.height,
                    batch.width,
                    temperature,
                    kl_weight,
                    recon,
                    seed,
                    &mut codes,
                )?;
                (out.loss, out.recon, out.kl, codes, None)
            }
            Backend::Candle(c) => {
                let x = map_pixels(&images(&self.config, batch, &c.device)?)?;
                let logits = c.model.encoder.forward(&x)?;
                let (b, h, w, _) = logits.dims4()?;
                let soft = scaled_softmax(
                    &(&logits + gumbel_noise(logits.dims(), seed, &c.device)?)?,
                    None,
                    1.0 / temperature,
                )?;
                let out = c.model.decoder.forward(&soft)?;
                let recon_t = reconstruction_loss(&out, &x, recon)?;
                let kl_t = kl_to_uniform(&logits)?;
                let values_per_position = (x.elem_count() / (b * h * w)) as f64;
                let loss = (&recon_t + (&kl_t * (kl_weight / values_per_position))?)?;
                let value = loss.to_scalar::<f32>()? as f64;
                // A non-finite loss is refused by `update`, before any gradient is applied.
                let grads = if value.is_finite() { Some(loss.backward()?) } else { None };
                let codes = logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?;
                (value, recon_t.to_scalar::<f32>()? as f64, kl_t.to_scalar::<f32>()? as f64, codes, grads)
            }
        };
        let grad_norm = self.update(loss, grads.as_ref(), lr)?;
        let (perplexity, codes_used) = code_usage(&codes, self.config.vocab_size);
        Ok(DvaeStepMetrics { loss, recon_loss, kl, perplexity, codes_used, grad_norm })
    }

    /// Token ids [B, H/d, W/d] (argmax of the encoder logits; deterministic), from the EMA
    /// weights when the tokenizer keeps them. Runs in the tokenizer's precision (bf16 suits MIM
    /// targets, which need only the argmax; training and decoding stay f32).
    pub fn encode(&mut self, batch: &ImageBatch) -> Result<Vec<i32>> {
        let ids = match self.encode_ids(batch)? {
            TokenIds::Host(ids) => ids,
            TokenIds::Device(ids) => ids.to_vec1::<u32>()?,
        };
        Ok(ids.into_iter().map(|i| i as i32).collect())
    }

    /// [`Self::encode`]'s ids where they are computed: on the host (engine) or the device.
    pub(crate) fn encode_ids(&mut self, batch: &ImageBatch) -> Result<TokenIds> {
        self.check_images(batch)?;
        let precision = self.precision();
        match &mut self.backend {
            Backend::Engine(e) => {
                Ok(TokenIds::Host(e.engine.encode(e.ema.own(), batch.pixels, batch.height, batch.width)?))
            }
            Backend::Candle(c) => {
                let x = map_pixels(&images(&self.config, batch, &c.device)?)?.to_dtype(precision.dtype())?;
                let model = c.ema.as_ref().map_or(&c.model, |(m, _)| m);
                Ok(TokenIds::Device(model.encoder.forward(&x)?.argmax(D::Minus1)?.flatten_all()?))
            }
        }
    }

    /// Images [B, C, h*d, w*d] in [0, 1] from ids [B, h, w], from the EMA weights when kept.
    pub fn decode(&mut self, ids: &[i32], height: usize, width: usize) -> Result<Vec<f32>> {
        let v = self.config.vocab_size;
        if height == 0 || width == 0 || ids.is_empty() || ids.len() % (height * width) != 0 {
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
        match &mut self.backend {
            Backend::Engine(e) => e.engine.decode(e.ema.own(), &flat, height, width),
            Backend::Candle(c) => {
                let b = ids.len() / (height * width);
                let one_hot = Tensor::eye(v, DType::F32, &c.device)?
                    .index_select(&Tensor::from_vec(flat, ids.len(), &c.device)?, 0)?
                    .reshape((b, height, width, v))?;
                let model = c.ema.as_ref().map_or(&c.model, |(m, _)| m);
                let images = model.reconstruction(&model.decoder.forward(&one_hot)?)?;
                Ok(images.permute((0, 3, 1, 2))?.flatten_all()?.to_vec1::<f32>()?)
            }
        }
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
    let per = c * h * w;
    if batch.pixels.is_empty() || batch.pixels.len() % per != 0 {
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

/// Gumbel(0, 1) noise from a seeded generator, so a step can be replayed.
pub fn gumbel_noise(dims: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
    let mut g = vec![0f32; dims.iter().product()];
    crate::engine::kernels::gumbel_noise(seed, &mut g);
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

fn code_usage(ids: &[u32], vocab: usize) -> (f64, usize) {
    let mut counts = vec![0usize; vocab];
    for &i in ids {
        counts[i as usize] += 1;
    }
    let n = ids.len() as f64;
    let entropy: f64 = counts.iter().filter(|&&c| c > 0).map(|&c| -(c as f64 / n) * (c as f64 / n).ln()).sum();
    (entropy.exp(), counts.iter().filter(|&&c| c > 0).count())
}
