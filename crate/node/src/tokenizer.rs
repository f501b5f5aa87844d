//! The dVAE visual tokenizer.

use std::path::PathBuf;
use std::sync::Arc;

use beit_core::{DvaeConfig, DvaeTrainer, DvaeTrainingOptions, ImageBatch, ReconLoss};
use napi::bindgen_prelude::*;
use napi_derive::napi;

use crate::shared::{Shared, Turn};
use crate::{guarded, job, trainer_methods, AdamWOptions, Job, StepDraws};

/// The tokenizer's training options, saved with it; missing fields take DALL-E's recipe.
#[napi(object, js_name = "DvaeTrainingOptions")]
#[derive(Default)]
pub struct TrainingOptions {
    /// Default: AdamW (0.9, 0.999, 1e-8), weight decay 1e-4, no clipping.
    pub optimizer: Option<AdamWOptions>,
    /// EMA decay of the weights; encode and decode use the EMA weights. 0 disables. Default 0.999.
    pub ema_decay: Option<f64>,
    /// Default 'logitLaplace' (DALL-E); 'mse' is the squared error of the mean.
    #[napi(ts_type = "'logitLaplace' | 'mse'")]
    pub recon_loss: Option<String>,
}

impl TrainingOptions {
    fn resolve(self) -> beit_core::Result<DvaeTrainingOptions> {
        let d = DvaeTrainingOptions::default();
        let recon_loss = match self.recon_loss.as_deref() {
            None => d.recon_loss,
            Some("logitLaplace") => ReconLoss::LogitLaplace,
            Some("mse") => ReconLoss::Mse,
            Some(other) => {
                return Err(beit_core::Error::Config(format!(
                    "reconLoss must be 'logitLaplace' or 'mse', got {other:?}"
                )))
            }
        };
        Ok(DvaeTrainingOptions {
            optimizer: self.optimizer.unwrap_or_default().over(d.optimizer)?,
            ema_decay: self.ema_decay.unwrap_or(d.ema_decay),
            recon_loss,
        })
    }

    fn of(o: &DvaeTrainingOptions) -> Self {
        let recon_loss = match o.recon_loss {
            ReconLoss::LogitLaplace => "logitLaplace",
            ReconLoss::Mse => "mse",
        };
        Self {
            optimizer: Some(AdamWOptions::of(&o.optimizer)),
            ema_decay: Some(o.ema_decay),
            recon_loss: Some(recon_loss.to_string()),
        }
    }
}

/// What `lossAndGrads` reports.
#[napi(object)]
pub struct DvaeLossMetrics {
    /// The optimised objective: reconstruction + klWeight * KL, per pixel value.
    pub loss: f64,
    /// Reconstruction loss per pixel value.
    pub recon_loss: f64,
    /// KL to the uniform prior per token, in nats.
    pub kl: f64,
    /// exp(entropy) of the batch's code histogram.
    pub perplexity: f64,
    /// Distinct codes in the batch.
    pub codes_used: u32,
}

/// The codebook usage of token ids: perplexity (exp of the entropy of their histogram) and the
/// number of distinct codes.
#[napi(object)]
pub struct CodebookUsage {
    pub perplexity: f64,
    pub codes_used: u32,
}

/// The perplexity and distinct codes of `ids` (each in [0, vocabSize)), as the training steps
/// report them for a batch.
#[napi]
pub fn codebook_usage(ids: Int32Array, vocab_size: u32) -> Result<CodebookUsage> {
    guarded(|| {
        let v = vocab_size as i32;
        if let Some(i) = ids.iter().position(|&id| id < 0 || id >= v) {
            return Err(beit_core::Error::Input(format!(
                "ids: token id {} at index {i} is out of range [0, {v})",
                ids[i]
            )));
        }
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        let (perplexity, codes_used) = beit_core::tokenizer::codebook_usage(&ids, vocab_size as usize);
        Ok(CodebookUsage { perplexity, codes_used: codes_used as u32 })
    })
}

/// The dVAE visual tokenizer with its AdamW (and EMA) state.
#[napi(custom_finalize)]
pub struct NativeDvae {
    inner: Arc<Shared<DvaeTrainer>>,
    held: i64,
}

impl NativeDvae {
    /// The next turn on the tokenizer, for a call that runs on it and another model.
    pub(crate) fn turn(&self) -> Turn<DvaeTrainer> {
        self.inner.turn()
    }
}

trainer_methods!(NativeDvae, DvaeTrainer);

#[napi]
impl NativeDvae {
    /// `configJson`: a full `DvaeConfig`.
    #[napi(factory)]
    pub fn create(env: Env, config_json: String, training: Option<TrainingOptions>, seed: u32) -> Result<Self> {
        guarded(|| {
            let config = DvaeConfig::from_json(&config_json)?;
            DvaeTrainer::new(config, training.unwrap_or_default().resolve()?, seed as u64)
        })
        .and_then(wrap)
        .map(|model| model.told(&env))
    }

    /// The training options.
    #[napi(getter)]
    pub fn training(&self) -> Result<TrainingOptions> {
        guarded(|| self.inner.now(|model| Ok(TrainingOptions::of(&model.options))))
    }

    #[napi(ts_return_type = "Promise<NativeDvae>")]
    pub fn load(path: String) -> AsyncTask<Job<DvaeTrainer, crate::Reported<NativeDvae>>> {
        job(move || DvaeTrainer::load(&PathBuf::from(path), None), wrap)
    }

    /// Adds the gradient of the tokenizer objective on [B, C, height, width] images in [0, 1]
    /// (summed over the images) to the model's gradients, for `applyUpdate`.
    #[napi(ts_return_type = "Promise<DvaeLossMetrics>")]
    pub fn loss_and_grads(
        &self,
        pixels: Float32Array,
        height: u32,
        width: u32,
        temperature: f64,
        kl_weight: f64,
        draws: StepDraws,
    ) -> AsyncTask<Job<beit_core::DvaeLossMetrics, DvaeLossMetrics>> {
        let (turn, pixels) = (self.inner.turn(), pixels.to_vec());
        job(
            move || {
                let batch = ImageBatch { pixels: &pixels, height: height as usize, width: width as usize };
                turn.run(|model| model.loss_and_grads(&batch, temperature, kl_weight, draws.into()))
            },
            |m| {
                let beit_core::DvaeLossMetrics { loss, recon_loss, kl, perplexity, codes_used } = m;
                Ok(DvaeLossMetrics { loss, recon_loss, kl, perplexity, codes_used: codes_used as u32 })
            },
        )
    }

    /// One step (`lossAndGrads` then `applyUpdate`) on [B, C, height, width] images in [0, 1];
    /// `seed` drives the Gumbel noise.
    #[napi(ts_return_type = "Promise<DvaeStepMetrics>")]
    #[allow(clippy::too_many_arguments)]
    pub fn train_step(
        &self,
        pixels: Float32Array,
        height: u32,
        width: u32,
        temperature: f64,
        kl_weight: f64,
        lr: f64,
        seed: u32,
    ) -> AsyncTask<Job<beit_core::DvaeStepMetrics, DvaeStepMetrics>> {
        let (turn, pixels) = (self.inner.turn(), pixels.to_vec());
        job(
            move || {
                let batch = ImageBatch { pixels: &pixels, height: height as usize, width: width as usize };
                turn.run(|model| model.train_step(&batch, temperature, kl_weight, lr, seed as u64))
            },
            |m| {
                let beit_core::DvaeStepMetrics { loss, recon_loss, kl, perplexity, codes_used, grad_norm } = m;
                Ok(DvaeStepMetrics { loss, recon_loss, kl, perplexity, codes_used: codes_used as u32, grad_norm })
            },
        )
    }

    /// Token ids [B, height/d, width/d] of [B, C, height, width] images in [0, 1].
    #[napi(ts_return_type = "Promise<Int32Array>")]
    pub fn encode(&self, pixels: Float32Array, height: u32, width: u32) -> AsyncTask<Job<Vec<i32>, Int32Array>> {
        let (turn, pixels) = (self.inner.turn(), pixels.to_vec());
        job(
            move || {
                turn.run(|model| {
                    model.encode(&ImageBatch { pixels: &pixels, height: height as usize, width: width as usize })
                })
            },
            |ids| Ok(Int32Array::new(ids)),
        )
    }

    /// Images [B, C, gridHeight*d, gridWidth*d] in [0, 1] from ids [B, gridHeight, gridWidth].
    #[napi(ts_return_type = "Promise<Float32Array>")]
    pub fn decode(&self, ids: Int32Array, grid_height: u32, grid_width: u32) -> AsyncTask<Job<Vec<f32>, Float32Array>> {
        let (turn, ids) = (self.inner.turn(), ids.to_vec());
        job(
            move || turn.run(|model| model.decode(&ids, grid_height as usize, grid_width as usize)),
            |images| Ok(Float32Array::new(images)),
        )
    }
}

#[napi(object)]
pub struct DvaeStepMetrics {
    /// The optimised objective: reconstruction + klWeight * KL, per pixel value.
    pub loss: f64,
    /// Reconstruction loss per pixel value.
    pub recon_loss: f64,
    /// KL to the uniform prior per token, in nats.
    pub kl: f64,
    /// exp(entropy) of the batch's code histogram.
    pub perplexity: f64,
    /// Distinct codes in the batch.
    pub codes_used: u32,
    pub grad_norm: f64,
}
