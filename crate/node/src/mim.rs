//! The BEiT model with its MIM head.

use std::path::PathBuf;
use std::sync::Arc;

use beit_core::{BeitConfig, BeitTrainer, DvaeTrainer, ImageBatch, MimBatch, PretrainBatch};
use napi::bindgen_prelude::*;
use napi_derive::napi;

use crate::shared::Shared;
use crate::tokenizer::NativeDvae;
use crate::{guarded, image_size_pair, job, trainer_methods, AdamWOptions, Job, StepDraws};

/// A BEiT model with its MIM head and AdamW state.
#[napi(custom_finalize)]
pub struct NativeBeit {
    inner: Arc<Shared<BeitTrainer>>,
    held: i64,
}

trainer_methods!(NativeBeit, BeitTrainer);

#[napi]
impl NativeBeit {
    /// `configJson`: a full model config (camelCase, as `BeitConfig`; JSON, so that a wrong
    /// field is named in the error); `seed` drives the initialisation.
    #[napi(factory)]
    pub fn create(env: Env, config_json: String, optimizer: Option<AdamWOptions>, seed: u32) -> Result<Self> {
        guarded(|| BeitTrainer::new(BeitConfig::from_json(&config_json)?, crate::optimizer(optimizer)?, seed as u64))
            .and_then(wrap)
            .map(|model| model.told(&env))
    }

    /// Reads a checkpoint written by `save`. With `expectedConfigJson`, the file must fit that
    /// config (a mismatch names the tensor and both shapes).
    #[napi(ts_return_type = "Promise<NativeBeit>")]
    pub fn load(
        path: String,
        expected_config_json: Option<String>,
    ) -> AsyncTask<Job<BeitTrainer, crate::Reported<NativeBeit>>> {
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
        optimizer: Option<AdamWOptions>,
    ) -> AsyncTask<Job<BeitTrainer, crate::Reported<NativeBeit>>> {
        job(
            move || {
                let ckpt = beit_core::hf::read(&PathBuf::from(dir), image_size_pair(image_size)?)?;
                BeitTrainer::from_hf(ckpt, crate::optimizer(optimizer)?)
            },
            wrap,
        )
    }

    /// Writes a transformers `BeitForMaskedImageModeling` folder.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn export_hugging_face(&self, dir: String) -> AsyncTask<Job<(), ()>> {
        let turn = self.inner.turn();
        job(move || turn.run(|model| model.export_hf(&PathBuf::from(dir))), |()| Ok(()))
    }

    /// Adds the gradient of the batch's masked cross-entropy (summed over its masked patches)
    /// to the model's gradients, for `applyUpdate`.
    #[napi(ts_return_type = "Promise<BeitLossMetrics>")]
    pub fn loss_and_grads(
        &self,
        pixels: Float32Array,
        mask: Uint8Array,
        targets: Int32Array,
        draws: StepDraws,
    ) -> AsyncTask<Job<beit_core::BeitLossMetrics, BeitLossMetrics>> {
        let turn = self.inner.turn();
        let (pixels, mask, targets) = (pixels.to_vec(), mask.to_vec(), targets.to_vec());
        job(
            move || {
                let batch = MimBatch { pixels: &pixels, mask: &mask, targets: &targets };
                turn.run(|model| model.loss_and_grads(&batch, draws.into()))
            },
            loss_metrics,
        )
    }

    /// `lossAndGrads` with the tokenizer's ids of the tokenizer view as the targets (they stay
    /// native, and on a GPU on the GPU).
    #[napi(ts_return_type = "Promise<BeitLossMetrics>")]
    pub fn pretrain_loss_and_grads(
        &self,
        tokenizer: &NativeDvae,
        batch: PretrainInput,
        draws: StepDraws,
    ) -> AsyncTask<Job<beit_core::BeitLossMetrics, BeitLossMetrics>> {
        let step = move |m: &mut BeitTrainer, t: &mut DvaeTrainer, b: &PretrainBatch| {
            m.pretrain_loss_and_grads(t, b, draws.into())
        };
        self.pretrain(tokenizer, batch, step, loss_metrics)
    }

    /// One AdamW step on the masked-image-modeling loss: `lossAndGrads` then `applyUpdate`.
    /// `seed` drives stochastic depth.
    #[napi(ts_return_type = "Promise<BeitStepMetrics>")]
    pub fn train_step(
        &self,
        pixels: Float32Array,
        mask: Uint8Array,
        targets: Int32Array,
        lr: f64,
        seed: u32,
    ) -> AsyncTask<Job<beit_core::BeitStepMetrics, BeitStepMetrics>> {
        let turn = self.inner.turn();
        let (pixels, mask, targets) = (pixels.to_vec(), mask.to_vec(), targets.to_vec());
        job(
            move || {
                turn.run(|model| {
                    model.train_step(&MimBatch { pixels: &pixels, mask: &mask, targets: &targets }, lr, seed as u64)
                })
            },
            metrics,
        )
    }

    /// One pretraining step in one native call: the tokenizer encodes the tokenizer view into
    /// the targets, which never come back to JS (nor leave the GPU), then `applyUpdate`.
    #[napi(ts_return_type = "Promise<BeitStepMetrics>")]
    pub fn pretrain_step(
        &self,
        tokenizer: &NativeDvae,
        batch: PretrainInput,
        lr: f64,
        seed: u32,
    ) -> AsyncTask<Job<beit_core::BeitStepMetrics, BeitStepMetrics>> {
        let step =
            move |m: &mut BeitTrainer, t: &mut DvaeTrainer, b: &PretrainBatch| m.pretrain_step(t, b, lr, seed as u64);
        self.pretrain(tokenizer, batch, step, metrics)
    }

    /// Linear-probe features of layer `layer` (0 = embeddings): [CLS] and the mean patch token,
    /// [B, 2 * hiddenSize].
    #[napi(ts_return_type = "Promise<Float32Array>")]
    pub fn probe_features(&self, pixels: Float32Array, layer: u32) -> AsyncTask<Job<Vec<f32>, Float32Array>> {
        let (turn, pixels) = (self.inner.turn(), pixels.to_vec());
        job(move || turn.run(|model| model.probe_features(&pixels, layer as usize)), |v| Ok(Float32Array::new(v)))
    }

    /// Evaluation forward pass: logits and argmax ids at the masked patches.
    #[napi(ts_return_type = "Promise<MaskedPredictions>")]
    pub fn forward(
        &self,
        pixels: Float32Array,
        mask: Uint8Array,
    ) -> AsyncTask<Job<beit_core::Predictions, MaskedPredictions>> {
        let (turn, pixels, mask) = (self.inner.turn(), pixels.to_vec(), mask.to_vec());
        job(
            move || turn.run(|model| model.forward(&pixels, &mask)),
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

impl NativeBeit {
    /// A job running `step` on the model and the tokenizer, locked in that order (no other call
    /// holds both), with the pretraining batch.
    fn pretrain<O: Send + 'static, J: ToNapiValue + TypeName>(
        &self,
        tokenizer: &NativeDvae,
        input: PretrainInput,
        step: impl FnOnce(&mut BeitTrainer, &mut DvaeTrainer, &PretrainBatch) -> beit_core::Result<O> + Send + 'static,
        finish: fn(O) -> Result<J>,
    ) -> AsyncTask<Job<O, J>> {
        let (turn, tokenizer_turn) = (self.inner.turn(), tokenizer.turn());
        let (height, width) = (input.tokenizer_height as usize, input.tokenizer_width as usize);
        let (pixels, mask, tokenizer_pixels) =
            (input.pixels.to_vec(), input.mask.to_vec(), input.tokenizer_pixels.to_vec());
        job(
            move || {
                let images = ImageBatch { pixels: &tokenizer_pixels, height, width };
                let batch = PretrainBatch { pixels: &pixels, mask: &mask, tokenizer_images: images };
                // Both turns, the model's first: every call takes its turns in that order.
                turn.run(|model| tokenizer_turn.run(|tokenizer| step(model, tokenizer, &batch)))
            },
            finish,
        )
    }
}

/// One pretraining batch: the model's view and the tokenizer's view of the same crops.
#[napi(object)]
pub struct PretrainInput {
    /// [B, C, H, W], normalised: the model's view.
    pub pixels: Float32Array,
    /// [B, C, tokenizerHeight, tokenizerWidth] in [0, 1]: the tokenizer's view, whose token grid
    /// is the model's patch grid.
    pub tokenizer_pixels: Float32Array,
    pub tokenizer_height: u32,
    pub tokenizer_width: u32,
    /// [B, N], 1 = masked.
    pub mask: Uint8Array,
}

fn loss_metrics(m: beit_core::BeitLossMetrics) -> Result<BeitLossMetrics> {
    Ok(BeitLossMetrics {
        loss: m.loss,
        mlm_acc: m.mlm_acc,
        num_masked: m.num_masked as u32,
        majority_baseline: m.majority_baseline,
    })
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
pub struct BeitLossMetrics {
    /// Mean cross-entropy over the batch's masked patches.
    pub loss: f64,
    pub mlm_acc: f64,
    pub num_masked: u32,
    /// Share of the most frequent target among the masked patches: the accuracy of always
    /// guessing it.
    pub majority_baseline: f64,
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
