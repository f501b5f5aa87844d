//! Classification bindings: a fine-tunable BEiT classifier and a linear probe.

use std::path::PathBuf;
use std::sync::Arc;

use beit_core::{ClassifierConfig, ClassifierTrainer, ClassifierTrainingOptions, LinearProbe};
use napi::bindgen_prelude::*;
use napi_derive::napi;

use crate::shared::Shared;
use crate::{guarded, image_size_pair, job, trainer_methods, AdamWOptions, Job, StepDraws};

/// Fine-tuning options saved with the classifier.
#[napi(object, js_name = "ClassifierTrainingOptions")]
#[derive(Default)]
pub struct TrainingOptions {
    /// Label smoothing. Default 0.1.
    pub label_smoothing: Option<f64>,
    /// Layer-wise LR decay (0.65 for BEiT-B); 1 disables. Default 1.
    pub layer_decay: Option<f64>,
}

impl TrainingOptions {
    fn resolve(options: Option<Self>) -> beit_core::Result<ClassifierTrainingOptions> {
        let (o, d) = (options.unwrap_or_default(), ClassifierTrainingOptions::default());
        let resolved = ClassifierTrainingOptions {
            label_smoothing: o.label_smoothing.unwrap_or(d.label_smoothing),
            layer_decay: o.layer_decay.unwrap_or(d.layer_decay),
        };
        resolved.validate()?;
        Ok(resolved)
    }
}

/// What `lossAndGrads` reports.
#[napi(object)]
pub struct ClassifierLossMetrics {
    /// Mean label-smoothed cross-entropy over the images.
    pub loss: f64,
    /// Share of the batch classified right (argmax).
    pub accuracy: f64,
}

#[napi(object)]
pub struct ClassifierStepMetrics {
    pub loss: f64,
    /// Share of the batch classified right (argmax).
    pub accuracy: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

fn metrics(m: beit_core::ClassifierStepMetrics) -> Result<ClassifierStepMetrics> {
    Ok(ClassifierStepMetrics { loss: m.loss, accuracy: m.accuracy, grad_norm: m.grad_norm })
}

/// A BEiT backbone with a classification head and its AdamW state.
#[napi(custom_finalize)]
pub struct NativeClassifier {
    inner: Arc<Shared<ClassifierTrainer>>,
    held: i64,
}

trainer_methods!(NativeClassifier, ClassifierTrainer);

#[napi]
impl NativeClassifier {
    /// `configJson`: a `ClassifierConfig` ({ model, numLabels, pooling }). Weights are
    /// initialised from `seed`.
    #[napi(factory)]
    pub fn create(
        env: Env,
        config_json: String,
        optimizer: Option<AdamWOptions>,
        training: Option<TrainingOptions>,
        seed: u32,
    ) -> Result<Self> {
        guarded(|| {
            let config = ClassifierConfig::from_json(&config_json)?;
            ClassifierTrainer::new(
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
        guarded(|| {
            self.inner.now(|model| {
                let o = &model.options;
                Ok(TrainingOptions { label_smoothing: Some(o.label_smoothing), layer_decay: Some(o.layer_decay) })
            })
        })
    }

    /// Starts from the backbone of a MIM checkpoint; the head is initialised from `seed`.
    #[napi(ts_return_type = "Promise<NativeClassifier>")]
    pub fn from_pretrained(
        path: String,
        config_json: String,
        optimizer: Option<AdamWOptions>,
        training: Option<TrainingOptions>,
        seed: u32,
    ) -> AsyncTask<Job<ClassifierTrainer, crate::Reported<NativeClassifier>>> {
        job(
            move || {
                let config = ClassifierConfig::from_json(&config_json)?;
                let (optimizer, training) = (crate::optimizer(optimizer)?, TrainingOptions::resolve(training)?);
                ClassifierTrainer::from_pretrained(&PathBuf::from(path), config, optimizer, training, seed as u64)
            },
            wrap,
        )
    }

    /// Reads a transformers BEiT folder: a `BeitForImageClassification` keeps its head unless
    /// `numLabels` differs; a `BeitModel` or `BeitForMaskedImageModeling` gets a new head of
    /// `numLabels` classes, initialised from `seed`.
    #[napi(ts_return_type = "Promise<NativeClassifier>")]
    pub fn from_hugging_face(
        dir: String,
        image_size: Option<Vec<u32>>,
        num_labels: Option<u32>,
        optimizer: Option<AdamWOptions>,
        training: Option<TrainingOptions>,
        seed: u32,
    ) -> AsyncTask<Job<ClassifierTrainer, crate::Reported<NativeClassifier>>> {
        job(
            move || {
                let ckpt = beit_core::hf::read(&PathBuf::from(dir), image_size_pair(image_size)?)?;
                let (optimizer, training) = (crate::optimizer(optimizer)?, TrainingOptions::resolve(training)?);
                ClassifierTrainer::from_hf(ckpt, num_labels.map(|n| n as usize), optimizer, training, seed as u64)
            },
            wrap,
        )
    }

    /// Writes a transformers `BeitForImageClassification` folder.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn export_hugging_face(&self, dir: String) -> AsyncTask<Job<(), ()>> {
        let turn = self.inner.turn();
        job(move || turn.run(|model| model.export_hf(&PathBuf::from(dir))), |()| Ok(()))
    }

    /// Reads a checkpoint written by `save`.
    #[napi(ts_return_type = "Promise<NativeClassifier>")]
    pub fn load(path: String) -> AsyncTask<Job<ClassifierTrainer, crate::Reported<NativeClassifier>>> {
        job(move || ClassifierTrainer::load(&PathBuf::from(path), None), wrap)
    }

    /// Adds the gradient of the batch's label-smoothed cross-entropy (summed over its images)
    /// to the model's gradients, for `applyUpdate`.
    #[napi(ts_return_type = "Promise<ClassifierLossMetrics>")]
    pub fn loss_and_grads(
        &self,
        pixels: Float32Array,
        labels: Int32Array,
        draws: StepDraws,
    ) -> AsyncTask<Job<beit_core::ClassifierLossMetrics, ClassifierLossMetrics>> {
        let (turn, pixels, labels) = (self.inner.turn(), pixels.to_vec(), labels.to_vec());
        job(
            move || turn.run(|model| model.loss_and_grads(&pixels, &labels, draws.into())),
            |m| Ok(ClassifierLossMetrics { loss: m.loss, accuracy: m.accuracy }),
        )
    }

    /// One AdamW step on the label-smoothed cross-entropy (`lossAndGrads` then
    /// `applyUpdate`); `seed` drives stochastic depth.
    #[napi(ts_return_type = "Promise<ClassifierStepMetrics>")]
    pub fn train_step(
        &self,
        pixels: Float32Array,
        labels: Int32Array,
        lr: f64,
        seed: u32,
    ) -> AsyncTask<Job<beit_core::ClassifierStepMetrics, ClassifierStepMetrics>> {
        let (turn, pixels, labels) = (self.inner.turn(), pixels.to_vec(), labels.to_vec());
        job(move || turn.run(|model| model.train_step(&pixels, &labels, lr, seed as u64)), metrics)
    }

    /// Class logits [B, numLabels].
    #[napi(ts_return_type = "Promise<Float32Array>")]
    pub fn predict(&self, pixels: Float32Array) -> AsyncTask<Job<Vec<f32>, Float32Array>> {
        let (turn, pixels) = (self.inner.turn(), pixels.to_vec());
        job(move || turn.run(|model| model.predict(&pixels)), |v| Ok(Float32Array::new(v)))
    }
}

/// A linear classifier on frozen, standardised features.
#[napi]
pub struct NativeLinearProbe {
    inner: Arc<Shared<LinearProbe>>,
}

#[napi]
impl NativeLinearProbe {
    /// `trainFeatures` [N, numFeatures] sets the standardisation (mean and std per feature).
    #[napi(constructor)]
    pub fn new(
        num_features: u32,
        num_labels: u32,
        train_features: Float32Array,
        optimizer: Option<AdamWOptions>,
        seed: u32,
    ) -> Result<Self> {
        guarded(|| {
            let probe = LinearProbe::new(
                num_features as usize,
                num_labels as usize,
                &train_features,
                crate::optimizer(optimizer)?,
                seed as u64,
            )?;
            Ok(Self { inner: Shared::new(probe) })
        })
    }

    #[napi(ts_return_type = "Promise<ClassifierStepMetrics>")]
    pub fn train_step(
        &self,
        features: Float32Array,
        labels: Int32Array,
        lr: f64,
    ) -> AsyncTask<Job<beit_core::ClassifierStepMetrics, ClassifierStepMetrics>> {
        let (turn, features, labels) = (self.inner.turn(), features.to_vec(), labels.to_vec());
        job(move || turn.run(|probe| probe.train_step(&features, &labels, lr)), metrics)
    }

    /// Class logits [N, numLabels].
    #[napi(ts_return_type = "Promise<Float32Array>")]
    pub fn predict(&self, features: Float32Array) -> AsyncTask<Job<Vec<f32>, Float32Array>> {
        let (turn, features) = (self.inner.turn(), features.to_vec());
        job(move || turn.run(|probe| probe.predict(&features)), |v| Ok(Float32Array::new(v)))
    }
}
