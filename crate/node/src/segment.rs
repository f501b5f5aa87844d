//! Segmentation bindings: a fine-tunable BEiT + UperNet segmenter (transformers'
//! `BeitForSemanticSegmentation`). Masks cross the boundary as bytes: class ids and the
//! ignore index are 8-bit, as in PNG masks.

use std::path::PathBuf;
use std::sync::Arc;

use beit_core::{SegmentedImage, SegmenterConfig, SegmenterTrainer, SegmenterTrainingOptions};
use napi::bindgen_prelude::*;
use napi_derive::napi;

use crate::shared::Shared;
use crate::{guarded, image_size_pair, job, size_pair, trainer_methods, AdamWOptions, Job, StepDraws};

/// Fine-tuning options saved with the segmenter.
#[napi(object, js_name = "SegmenterTrainingOptions")]
#[derive(Default)]
pub struct TrainingOptions {
    /// Layer-wise LR decay (0.65 for BEiT-B on ADE20K); 1 disables. Default 1.
    pub layer_decay: Option<f64>,
}

impl TrainingOptions {
    fn resolve(options: Option<Self>) -> beit_core::Result<SegmenterTrainingOptions> {
        let (o, d) = (options.unwrap_or_default(), SegmenterTrainingOptions::default());
        let resolved = SegmenterTrainingOptions { layer_decay: o.layer_decay.unwrap_or(d.layer_decay) };
        resolved.validate()?;
        Ok(resolved)
    }
}

/// What `lossAndGrads` reports.
#[napi(object)]
pub struct SegmenterLossMetrics {
    /// Mean cross-entropy over the labelled pixels (main head + weight x auxiliary head).
    pub loss: f64,
    /// Share of the labelled pixels the main head classifies right.
    pub pixel_accuracy: f64,
    /// Pixels not labelled with the ignore index: the batch's loss terms.
    pub labelled_pixels: f64,
}

#[napi(object)]
pub struct SegmenterStepMetrics {
    pub loss: f64,
    pub pixel_accuracy: f64,
    pub labelled_pixels: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// Main-head logits and their shape [B, K, h, w] (NCHW).
/// One image segmented by sliding windows.
#[napi(object)]
pub struct SegmentedPixels {
    /// Class ids [H, W] at the requested output size.
    pub classes: Uint8Array,
    /// Softmax probabilities [numLabels, H, W], when asked for.
    pub probabilities: Option<Float32Array>,
}

#[napi(object)]
pub struct SegmentationLogits {
    pub values: Float32Array,
    pub shape: Vec<u32>,
}

/// Values and their shape [B, K, h, w].
type ShapedValues = (Vec<f32>, [usize; 4]);

/// The JS API's masks are bytes: every class id and the ignore index must fit.
fn byte_labels(config: SegmenterConfig) -> beit_core::Result<SegmenterConfig> {
    if config.num_labels > 255 || config.semantic_loss_ignore_index > 255 {
        return Err(beit_core::Error::Config(format!(
            "masks are 8-bit: numLabels must be at most 255 and semanticLossIgnoreIndex at most 255, got {} and {}",
            config.num_labels, config.semantic_loss_ignore_index
        )));
    }
    Ok(config)
}

fn checked(trainer: SegmenterTrainer) -> beit_core::Result<SegmenterTrainer> {
    byte_labels(trainer.config.clone())?;
    Ok(trainer)
}

/// A BEiT backbone with UperNet (and the FCN auxiliary head), BatchNorm statistics and AdamW
/// state.
#[napi(custom_finalize)]
pub struct NativeSegmenter {
    inner: Arc<Shared<SegmenterTrainer>>,
    held: i64,
}

trainer_methods!(NativeSegmenter, SegmenterTrainer);

#[napi]
impl NativeSegmenter {
    /// `configJson`: a `SegmenterConfig` (transformers' segmentation fields, camelCase).
    /// Weights are initialised from `seed`.
    #[napi(factory)]
    pub fn create(
        env: Env,
        config_json: String,
        optimizer: Option<AdamWOptions>,
        training: Option<TrainingOptions>,
        seed: u32,
    ) -> Result<Self> {
        guarded(|| {
            let config = byte_labels(SegmenterConfig::from_json(&config_json)?)?;
            SegmenterTrainer::new(
                config,
                crate::optimizer(optimizer)?,
                TrainingOptions::resolve(training)?,
                seed as u64,
            )
        })
        .and_then(wrap)
        .map(|model| model.told(&env))
    }

    /// The fine-tuning options.
    #[napi(getter)]
    pub fn training(&self) -> Result<TrainingOptions> {
        guarded(|| self.inner.now(|model| Ok(TrainingOptions { layer_decay: Some(model.options.layer_decay) })))
    }

    /// Starts from the backbone of a beit MIM or classifier checkpoint (position tables resized
    /// to the config's image size); the head is initialised from `seed`.
    #[napi(ts_return_type = "Promise<NativeSegmenter>")]
    pub fn from_pretrained(
        path: String,
        config_json: String,
        optimizer: Option<AdamWOptions>,
        training: Option<TrainingOptions>,
        seed: u32,
    ) -> AsyncTask<Job<SegmenterTrainer, crate::Reported<NativeSegmenter>>> {
        job(
            move || {
                let config = byte_labels(SegmenterConfig::from_json(&config_json)?)?;
                let (optimizer, training) = (crate::optimizer(optimizer)?, TrainingOptions::resolve(training)?);
                SegmenterTrainer::from_pretrained(&PathBuf::from(path), config, optimizer, training, seed as u64)
            },
            wrap,
        )
    }

    /// Reads a transformers `BeitForSemanticSegmentation` folder (optionally at another image
    /// size: position tables resized).
    #[napi(ts_return_type = "Promise<NativeSegmenter>")]
    pub fn from_hugging_face(
        dir: String,
        image_size: Option<Vec<u32>>,
        optimizer: Option<AdamWOptions>,
        training: Option<TrainingOptions>,
    ) -> AsyncTask<Job<SegmenterTrainer, crate::Reported<NativeSegmenter>>> {
        job(
            move || {
                let ckpt = beit_core::hf::read(&PathBuf::from(dir), image_size_pair(image_size)?)?;
                let (optimizer, training) = (crate::optimizer(optimizer)?, TrainingOptions::resolve(training)?);
                checked(SegmenterTrainer::from_hf(ckpt, optimizer, training)?)
            },
            wrap,
        )
    }

    /// Writes a transformers `BeitForSemanticSegmentation` folder.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn export_hugging_face(&self, dir: String) -> AsyncTask<Job<(), ()>> {
        let turn = self.inner.turn();
        job(move || turn.run(|model| model.export_hf(&PathBuf::from(dir))), |()| Ok(()))
    }

    /// Reads a checkpoint written by `save`.
    #[napi(ts_return_type = "Promise<NativeSegmenter>")]
    pub fn load(path: String) -> AsyncTask<Job<SegmenterTrainer, crate::Reported<NativeSegmenter>>> {
        job(move || checked(SegmenterTrainer::load(&PathBuf::from(path), None)?), wrap)
    }

    /// Adds the gradient of the batch's per-pixel loss (summed over its labelled pixels) to
    /// the model's gradients, for `applyUpdate`, and moves the BatchNorm statistics. `masks`
    /// [B, H, W]: class ids, or the ignore index.
    #[napi(ts_return_type = "Promise<SegmenterLossMetrics>")]
    pub fn loss_and_grads(
        &self,
        pixels: Float32Array,
        masks: Uint8Array,
        draws: StepDraws,
    ) -> AsyncTask<Job<beit_core::SegmenterLossMetrics, SegmenterLossMetrics>> {
        let (turn, pixels) = (self.inner.turn(), pixels.to_vec());
        let labels: Vec<u32> = masks.iter().map(|&m| u32::from(m)).collect();
        job(
            move || turn.run(|model| model.loss_and_grads(&pixels, &labels, draws.into())),
            |m| {
                Ok(SegmenterLossMetrics {
                    loss: m.loss,
                    pixel_accuracy: m.pixel_accuracy,
                    labelled_pixels: m.labelled_pixels as f64,
                })
            },
        )
    }

    /// One AdamW step (`lossAndGrads` then `applyUpdate`); `seed` drives stochastic depth.
    #[napi(ts_return_type = "Promise<SegmenterStepMetrics>")]
    pub fn train_step(
        &self,
        pixels: Float32Array,
        masks: Uint8Array,
        lr: f64,
        seed: u32,
    ) -> AsyncTask<Job<beit_core::SegmenterStepMetrics, SegmenterStepMetrics>> {
        let (turn, pixels) = (self.inner.turn(), pixels.to_vec());
        let labels: Vec<u32> = masks.iter().map(|&m| u32::from(m)).collect();
        job(
            move || turn.run(|model| model.train_step(&pixels, &labels, lr, seed as u64)),
            |m| {
                Ok(SegmenterStepMetrics {
                    loss: m.loss,
                    pixel_accuracy: m.pixel_accuracy,
                    labelled_pixels: m.labelled_pixels as f64,
                    grad_norm: m.grad_norm,
                })
            },
        )
    }

    /// Class ids [B, H, W] at the input's size (evaluation mode).
    #[napi(ts_return_type = "Promise<Uint8Array>")]
    pub fn predict(&self, pixels: Float32Array) -> AsyncTask<Job<Vec<u32>, Uint8Array>> {
        let (turn, pixels) = (self.inner.turn(), pixels.to_vec());
        job(
            move || turn.run(|model| model.predict(&pixels)),
            |ids| Ok(Uint8Array::new(ids.into_iter().map(|i| i as u8).collect())),
        )
    }

    /// One image [C, height, width] of any size by sliding windows of the input size every
    /// `stride` ([rows, columns]) pixels, overlaps averaged; class ids (and probabilities) at
    /// `outputSize` ([height, width]).
    #[napi(ts_return_type = "Promise<SegmentedPixels>")]
    pub fn segment(
        &self,
        pixels: Float32Array,
        size: Vec<u32>,
        stride: Vec<u32>,
        output_size: Vec<u32>,
        probabilities: bool,
    ) -> AsyncTask<Job<SegmentedImage, SegmentedPixels>> {
        let (turn, pixels) = (self.inner.turn(), pixels.to_vec());
        job(
            move || {
                let (size, stride, out) =
                    (size_pair("size", &size)?, size_pair("stride", &stride)?, size_pair("outputSize", &output_size)?);
                turn.run(|model| model.segment(&pixels, size, stride, out, probabilities))
            },
            |s| {
                Ok(SegmentedPixels {
                    classes: Uint8Array::new(s.classes.into_iter().map(|i| i as u8).collect()),
                    probabilities: s.probabilities.map(Float32Array::new),
                })
            },
        )
    }

    /// Main-head logits [B, numLabels, h, w] (evaluation mode).
    #[napi(ts_return_type = "Promise<SegmentationLogits>")]
    pub fn logits(&self, pixels: Float32Array) -> AsyncTask<Job<ShapedValues, SegmentationLogits>> {
        let (turn, pixels) = (self.inner.turn(), pixels.to_vec());
        job(
            move || turn.run(|model| model.logits(&pixels)),
            |(values, shape)| {
                Ok(SegmentationLogits { values: Float32Array::new(values), shape: shape.map(|d| d as u32).to_vec() })
            },
        )
    }
}

/// transformers' segmentation defaults around a backbone (`modelJson`, a BeitConfig): the
/// full `SegmenterConfig` as camelCase JSON, which the TS API overlays with the caller's fields.
#[napi]
pub fn default_segmenter_config(model_json: String, num_labels: u32) -> Result<String> {
    guarded(|| {
        let model = beit_core::BeitConfig::from_json(&model_json)?;
        Ok(SegmenterConfig::new(model, num_labels as usize).to_json())
    })
}
