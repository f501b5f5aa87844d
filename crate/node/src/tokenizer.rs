//! The dVAE visual tokenizer.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use beit_core::{DvaeConfig, DvaeTrainer, DvaeTrainingOptions, ImageBatch};
use napi::bindgen_prelude::*;
use napi_derive::napi;

use crate::{guarded, job, lock, trainer_methods, Job};

/// The dVAE visual tokenizer with its AdamW (and EMA) state.
#[napi]
pub struct NativeDvae {
    inner: Arc<Mutex<DvaeTrainer>>,
}

impl NativeDvae {
    pub(crate) fn shared(&self) -> Arc<Mutex<DvaeTrainer>> {
        self.inner.clone()
    }
}

fn wrap(trainer: DvaeTrainer) -> Result<NativeDvae> {
    Ok(NativeDvae { inner: Arc::new(Mutex::new(trainer)) })
}

trainer_methods!(NativeDvae);

#[napi]
impl NativeDvae {
    /// `configJson`: a full `DvaeConfig`; `trainingJson`: optimizer, EMA and reconstruction-loss
    /// settings (missing fields take DALL-E's recipe).
    #[napi(factory)]
    pub fn create(config_json: String, training_json: String, seed: u32) -> Result<Self> {
        guarded(|| {
            let config = DvaeConfig::from_json(&config_json)?;
            let training: DvaeTrainingOptions =
                beit_core::config::parse_json("tokenizer training options", &training_json)?;
            DvaeTrainer::new(config, training, seed as u64)
        })
        .and_then(wrap)
    }

    #[napi(ts_return_type = "Promise<NativeDvae>")]
    pub fn load(path: String) -> AsyncTask<Job<DvaeTrainer, NativeDvae>> {
        job(move || DvaeTrainer::load(&PathBuf::from(path), None), wrap)
    }

    /// One step on [B, C, height, width] images in [0, 1]; `seed` drives the Gumbel noise.
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
        let model = self.inner.clone();
        job(
            move || {
                let batch = ImageBatch { pixels: &pixels, height: height as usize, width: width as usize };
                lock(&model)?.train_step(&batch, temperature, kl_weight, lr, seed as u64)
            },
            |m| {
                Ok(DvaeStepMetrics {
                    loss: m.loss,
                    recon_loss: m.recon_loss,
                    kl: m.kl,
                    perplexity: m.perplexity,
                    codes_used: m.codes_used as u32,
                    grad_norm: m.grad_norm,
                })
            },
        )
    }

    /// Token ids [B, height/d, width/d] of [B, C, height, width] images in [0, 1].
    #[napi(ts_return_type = "Promise<Int32Array>")]
    pub fn encode(&self, pixels: Float32Array, height: u32, width: u32) -> AsyncTask<Job<Vec<i32>, Int32Array>> {
        let model = self.inner.clone();
        job(
            move || {
                lock(&model)?.encode(&ImageBatch { pixels: &pixels, height: height as usize, width: width as usize })
            },
            |ids| Ok(Int32Array::new(ids)),
        )
    }

    /// Images [B, C, gridHeight*d, gridWidth*d] in [0, 1] from ids [B, gridHeight, gridWidth].
    #[napi(ts_return_type = "Promise<Float32Array>")]
    pub fn decode(&self, ids: Int32Array, grid_height: u32, grid_width: u32) -> AsyncTask<Job<Vec<f32>, Float32Array>> {
        let model = self.inner.clone();
        job(
            move || lock(&model)?.decode(&ids, grid_height as usize, grid_width as usize),
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
