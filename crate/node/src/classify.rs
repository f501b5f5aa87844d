//! Classification bindings: a fine-tunable BEiT classifier and a linear probe.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use beit_core::{ClassifierConfig, ClassifierTrainer, ClassifierTrainingOptions, LinearProbe};
use napi::bindgen_prelude::*;
use napi_derive::napi;

use crate::{guarded, image_size_pair, job, lock, parse_optimizer, trainer_methods, Job};

fn parse_training_options(json: &str) -> beit_core::Result<ClassifierTrainingOptions> {
    let options: ClassifierTrainingOptions = beit_core::config::parse_json("classifier training options", json)?;
    options.validate()?;
    Ok(options)
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
#[napi]
pub struct NativeClassifier {
    inner: Arc<Mutex<ClassifierTrainer>>,
}

fn wrap(trainer: ClassifierTrainer) -> Result<NativeClassifier> {
    Ok(NativeClassifier { inner: Arc::new(Mutex::new(trainer)) })
}

trainer_methods!(NativeClassifier);

#[napi]
impl NativeClassifier {
    /// `configJson`: a `ClassifierConfig` ({ model, numLabels, pooling }); `trainingJson`:
    /// { labelSmoothing, layerDecay }. Weights are initialised from `seed`.
    #[napi(factory)]
    pub fn create(config_json: String, optimizer_json: String, training_json: String, seed: u32) -> Result<Self> {
        guarded(|| {
            let config = ClassifierConfig::from_json(&config_json)?;
            ClassifierTrainer::new(
                config,
                parse_optimizer(&optimizer_json)?,
                parse_training_options(&training_json)?,
                seed as u64,
            )
        })
        .and_then(wrap)
    }

    /// Starts from the backbone of a MIM checkpoint; the head is initialised from `seed`.
    #[napi(ts_return_type = "Promise<NativeClassifier>")]
    pub fn from_pretrained(
        path: String,
        config_json: String,
        optimizer_json: String,
        training_json: String,
        seed: u32,
    ) -> AsyncTask<Job<ClassifierTrainer, NativeClassifier>> {
        job(
            move || {
                let config = ClassifierConfig::from_json(&config_json)?;
                let optimizer = parse_optimizer(&optimizer_json)?;
                ClassifierTrainer::from_pretrained(
                    &PathBuf::from(path),
                    config,
                    optimizer,
                    parse_training_options(&training_json)?,
                    seed as u64,
                )
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
        optimizer_json: String,
        training_json: String,
        seed: u32,
    ) -> AsyncTask<Job<ClassifierTrainer, NativeClassifier>> {
        job(
            move || {
                let ckpt = beit_core::hf::read(&PathBuf::from(dir), image_size_pair(image_size)?)?;
                let (optimizer, training) =
                    (parse_optimizer(&optimizer_json)?, parse_training_options(&training_json)?);
                ClassifierTrainer::from_hf(ckpt, num_labels.map(|n| n as usize), optimizer, training, seed as u64)
            },
            wrap,
        )
    }

    /// Writes a transformers `BeitForImageClassification` folder.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn export_hugging_face(&self, dir: String) -> AsyncTask<Job<(), ()>> {
        let model = self.inner.clone();
        job(move || lock(&model)?.export_hf(&PathBuf::from(dir)), |()| Ok(()))
    }

    /// Reads a checkpoint written by `save`.
    #[napi(ts_return_type = "Promise<NativeClassifier>")]
    pub fn load(path: String) -> AsyncTask<Job<ClassifierTrainer, NativeClassifier>> {
        job(move || ClassifierTrainer::load(&PathBuf::from(path), None), wrap)
    }

    /// One AdamW step on the label-smoothed cross-entropy; `seed` drives stochastic depth.
    #[napi(ts_return_type = "Promise<ClassifierStepMetrics>")]
    pub fn train_step(
        &self,
        pixels: Float32Array,
        labels: Int32Array,
        lr: f64,
        seed: u32,
    ) -> AsyncTask<Job<beit_core::ClassifierStepMetrics, ClassifierStepMetrics>> {
        let model = self.inner.clone();
        job(move || lock(&model)?.train_step(&pixels, &labels, lr, seed as u64), metrics)
    }

    /// Class logits [B, numLabels].
    #[napi(ts_return_type = "Promise<Float32Array>")]
    pub fn predict(&self, pixels: Float32Array) -> AsyncTask<Job<Vec<f32>, Float32Array>> {
        let model = self.inner.clone();
        job(move || lock(&model)?.predict(&pixels), |v| Ok(Float32Array::new(v)))
    }
}

/// A linear classifier on frozen, standardised features.
#[napi]
pub struct NativeLinearProbe {
    inner: Arc<Mutex<LinearProbe>>,
}

#[napi]
impl NativeLinearProbe {
    /// `trainFeatures` [N, numFeatures] sets the standardisation (mean and std per feature).
    #[napi(constructor)]
    pub fn new(
        num_features: u32,
        num_labels: u32,
        train_features: Float32Array,
        optimizer_json: String,
        seed: u32,
    ) -> Result<Self> {
        guarded(|| {
            let probe = LinearProbe::new(
                num_features as usize,
                num_labels as usize,
                &train_features,
                parse_optimizer(&optimizer_json)?,
                seed as u64,
            )?;
            Ok(Self { inner: Arc::new(Mutex::new(probe)) })
        })
    }

    #[napi(ts_return_type = "Promise<ClassifierStepMetrics>")]
    pub fn train_step(
        &self,
        features: Float32Array,
        labels: Int32Array,
        lr: f64,
    ) -> AsyncTask<Job<beit_core::ClassifierStepMetrics, ClassifierStepMetrics>> {
        let probe = self.inner.clone();
        job(move || lock(&probe)?.train_step(&features, &labels, lr), metrics)
    }

    /// Class logits [N, numLabels].
    #[napi(ts_return_type = "Promise<Float32Array>")]
    pub fn predict(&self, features: Float32Array) -> AsyncTask<Job<Vec<f32>, Float32Array>> {
        let probe = self.inner.clone();
        job(move || lock(&probe)?.predict(&features), |v| Ok(Float32Array::new(v)))
    }
}
