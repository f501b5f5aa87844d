//! The BEiT model with its MIM head.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use beit_core::{BeitConfig, BeitTrainer, ImageBatch, MimBatch, PretrainBatch};
use napi::bindgen_prelude::*;
use napi_derive::napi;

use crate::tokenizer::NativeDvae;
use crate::{guarded, image_size_pair, job, lock, parse_optimizer, trainer_methods, Job};

/// A BEiT model with its MIM head and AdamW state.
#[napi]
pub struct NativeBeit {
    inner: Arc<Mutex<BeitTrainer>>,
}

fn wrap(trainer: BeitTrainer) -> Result<NativeBeit> {
    Ok(NativeBeit { inner: Arc::new(Mutex::new(trainer)) })
}

trainer_methods!(NativeBeit);

#[napi]
impl NativeBeit {
    /// `configJson`: a full model config (camelCase, as `BeitConfig`); `optimizerJson`: AdamW
    /// settings (missing fields take BEiT's defaults); `seed` drives the initialisation.
    #[napi(factory)]
    pub fn create(config_json: String, optimizer_json: String, seed: u32) -> Result<Self> {
        guarded(|| {
            BeitTrainer::new(BeitConfig::from_json(&config_json)?, parse_optimizer(&optimizer_json)?, seed as u64)
        })
        .and_then(wrap)
    }

    /// Reads a checkpoint written by `save`. With `expectedConfigJson`, the file must fit that
    /// config (a mismatch names the tensor and both shapes).
    #[napi(ts_return_type = "Promise<NativeBeit>")]
    pub fn load(path: String, expected_config_json: Option<String>) -> AsyncTask<Job<BeitTrainer, NativeBeit>> {
        job(
            move || {
                let expected = expected_config_json.as_deref().map(BeitConfig::from_json).transpose()?;
                BeitTrainer::load(&PathBuf::from(path), expected)
            },
            wrap,
        )
    }

    /// Reads a transformers `BeitForMaskedImageModeling` folder (config.json +
    /// model.safetensors); `imageSize` [height, width] resizes the position tables to it.
    #[napi(ts_return_type = "Promise<NativeBeit>")]
    pub fn from_hugging_face(
        dir: String,
        image_size: Option<Vec<u32>>,
        optimizer_json: String,
    ) -> AsyncTask<Job<BeitTrainer, NativeBeit>> {
        job(
            move || {
                let ckpt = beit_core::hf::read(&PathBuf::from(dir), image_size_pair(image_size)?)?;
                BeitTrainer::from_hf(ckpt, parse_optimizer(&optimizer_json)?)
            },
            wrap,
        )
    }

    /// Writes a transformers `BeitForMaskedImageModeling` folder.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn export_hugging_face(&self, dir: String) -> AsyncTask<Job<(), ()>> {
        let model = self.inner.clone();
        job(move || lock(&model)?.export_hf(&PathBuf::from(dir)), |()| Ok(()))
    }

    /// One AdamW step on the masked-image-modeling loss. `seed` drives stochastic depth.
    #[napi(ts_return_type = "Promise<BeitStepMetrics>")]
    pub fn train_step(
        &self,
        pixels: Float32Array,
        mask: Uint8Array,
        targets: Int32Array,
        lr: f64,
        seed: u32,
    ) -> AsyncTask<Job<beit_core::BeitStepMetrics, BeitStepMetrics>> {
        let model = self.inner.clone();
        job(
            move || {
                lock(&model)?.train_step(&MimBatch { pixels: &pixels, mask: &mask, targets: &targets }, lr, seed as u64)
            },
            metrics,
        )
    }

    /// One pretraining step in one native call: `tokenizer` encodes `tokenizerPixels` ([B, C,
    /// tokenizerHeight, tokenizerWidth] in [0, 1], the same crops) into the targets, which never
    /// come back to JS (nor leave the GPU).
    #[napi(ts_return_type = "Promise<BeitStepMetrics>")]
    #[allow(clippy::too_many_arguments)]
    pub fn pretrain_step(
        &self,
        tokenizer: &NativeDvae,
        pixels: Float32Array,
        tokenizer_pixels: Float32Array,
        tokenizer_height: u32,
        tokenizer_width: u32,
        mask: Uint8Array,
        lr: f64,
        seed: u32,
    ) -> AsyncTask<Job<beit_core::BeitStepMetrics, BeitStepMetrics>> {
        let (model, tokenizer) = (self.inner.clone(), tokenizer.shared());
        job(
            move || {
                // Always the model first, then the tokenizer: no other call holds both.
                let mut model = lock(&model)?;
                let mut tokenizer = lock(&tokenizer)?;
                let images = ImageBatch {
                    pixels: &tokenizer_pixels,
                    height: tokenizer_height as usize,
                    width: tokenizer_width as usize,
                };
                model.pretrain_step(
                    &mut tokenizer,
                    &PretrainBatch { pixels: &pixels, mask: &mask, tokenizer_images: images },
                    lr,
                    seed as u64,
                )
            },
            metrics,
        )
    }

    /// Linear-probe features of layer `layer` (0 = embeddings): [CLS] and the mean patch token,
    /// [B, 2 * hiddenSize].
    #[napi(ts_return_type = "Promise<Float32Array>")]
    pub fn probe_features(&self, pixels: Float32Array, layer: u32) -> AsyncTask<Job<Vec<f32>, Float32Array>> {
        let model = self.inner.clone();
        job(move || lock(&model)?.probe_features(&pixels, layer as usize), |v| Ok(Float32Array::new(v)))
    }

    /// Evaluation forward pass: logits and argmax ids at the masked patches.
    #[napi(ts_return_type = "Promise<MaskedPredictions>")]
    pub fn forward(
        &self,
        pixels: Float32Array,
        mask: Uint8Array,
    ) -> AsyncTask<Job<beit_core::Predictions, MaskedPredictions>> {
        let model = self.inner.clone();
        job(
            move || lock(&model)?.forward(&pixels, &mask),
            |p| {
                Ok(MaskedPredictions {
                    logits: Float32Array::new(p.logits),
                    ids: Int32Array::new(p.ids),
                    num_masked: p.num_masked as u32,
                })
            },
        )
    }
}

fn metrics(m: beit_core::BeitStepMetrics) -> Result<BeitStepMetrics> {
    Ok(BeitStepMetrics {
        loss: m.loss,
        mlm_acc: m.mlm_acc,
        grad_norm: m.grad_norm,
        num_masked: m.num_masked as u32,
        majority_baseline: m.majority_baseline,
    })
}

#[napi(object)]
pub struct BeitStepMetrics {
    pub loss: f64,
    pub mlm_acc: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub num_masked: u32,
    /// Share of the most frequent target among the masked patches: the accuracy of always
    /// guessing it.
    pub majority_baseline: f64,
}

#[napi(object)]
pub struct MaskedPredictions {
    /// [numMasked, vocabSize] row-major.
    pub logits: Float32Array,
    /// [numMasked] argmax token ids.
    pub ids: Int32Array,
    pub num_masked: u32,
}
