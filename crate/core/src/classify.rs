//! Classification on a BEiT backbone: fine-tuning (label smoothing, layer-wise learning-rate
//! decay, stochastic depth) and linear probing of frozen features.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use serde::{Deserialize, Serialize};

use crate::arch::classification::ClassifierParams;
use crate::checkpoint;
use crate::config::{given_class_names, ClassifierConfig, Pooling, Precision};
use crate::engine::heads::classification::ClassifierEngine;
use crate::engine::{on_pool, Flat};
use crate::error::{Error, Result};
use crate::hf::{self, HfCheckpoint, HfLayout};
use crate::model::classification::{classification_loss, BeitForImageClassification};
use crate::model::{Linear, Vars};
use crate::optim::{flatten_grads, AdamW};
use crate::optimizer::{check_lr, AdamWConfig};
use crate::params::{Init, ParamTable, Source};
use crate::rng::Draws;
use crate::runner::{flat_values, CandleRunner, EngineRunner, Runner, RunnerSpec};
use crate::trainer::{backbone_of, check_pixels, f32_values, BackboneSource, Images, Kind, Trainer, UpdateMetrics};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ClassifierTrainingOptions {
    /// Label smoothing of the cross-entropy. BEiT: 0.1.
    pub label_smoothing: f64,
    /// Layer-wise LR decay: the learning rate of layer id i is scaled by decay^(L + 1 - i)
    /// (embeddings 0, block j j + 1, head and shared relative bias L + 1). 1 disables.
    pub layer_decay: f64,
}

impl Default for ClassifierTrainingOptions {
    fn default() -> Self {
        Self { label_smoothing: 0.1, layer_decay: 1.0 }
    }
}

impl ClassifierTrainingOptions {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(Error::Config(format!("labelSmoothing must be in [0, 1), got {}", self.label_smoothing)));
        }
        if !(self.layer_decay > 0.0 && self.layer_decay <= 1.0) {
            return Err(Error::Config(format!("layerDecay must be in (0, 1], got {}", self.layer_decay)));
        }
        Ok(())
    }
}

/// What `loss_and_grads` reports.
#[derive(Debug, Clone, Copy)]
pub struct ClassifierLossMetrics {
    /// Mean label-smoothed cross-entropy over the images.
    pub loss: f64,
    /// Share of the images classified right (argmax).
    pub accuracy: f64,
}

/// What a whole step reports.
#[derive(Debug, Clone, Copy)]
pub struct ClassifierStepMetrics {
    pub loss: f64,
    pub accuracy: f64,
    pub grad_norm: f64,
}

impl ClassifierStepMetrics {
    fn of(l: ClassifierLossMetrics, u: UpdateMetrics) -> Self {
        Self { loss: l.loss, accuracy: l.accuracy, grad_norm: u.grad_norm }
    }
}

/// The classifier's kind: a BEiT with a classification head, fine-tuned with `ClassifierTrainingOptions`.
pub struct Classification;

pub type ClassifierTrainer = Trainer<Classification>;

impl Kind for Classification {
    type Config = ClassifierConfig;
    type Options = ClassifierTrainingOptions;
    type Runner = dyn ClassifierRunner;
    const FORMAT: &'static str = "beit-cls/1";
    const WHAT: &'static str = "a BEiT classifier checkpoint";
    const LEGACY_OPTIONS_KEY: Option<&'static str> = Some("finetune");

    fn config_json(config: &ClassifierConfig) -> String {
        config.to_json()
    }

    fn parse_config(json: &str) -> Result<ClassifierConfig> {
        ClassifierConfig::from_json(json)
    }

    fn validate(config: &ClassifierConfig, options: &ClassifierTrainingOptions) -> Result<()> {
        config.validate()?;
        options.validate()
    }

    fn table(config: &ClassifierConfig) -> ParamTable {
        ClassifierParams::new(config).0
    }

    /// unilm's layer-wise decay: decay^(L + 1 - layer id).
    fn lr_scales(config: &ClassifierConfig, options: &ClassifierTrainingOptions, table: &ParamTable) -> Vec<f64> {
        table.layer_decay_scales(config.model.num_hidden_layers, options.layer_decay)
    }

    fn runner(
        config: &ClassifierConfig,
        _: &ClassifierTrainingOptions,
        spec: &RunnerSpec,
        values: Vec<Tensor>,
        ema: Option<Vec<Tensor>>,
    ) -> Result<Box<dyn ClassifierRunner>> {
        let (table, params) = ClassifierParams::new(config);
        if spec.placement.uses_engine() {
            let flat = Flat::new(table, flat_values(&values)?)?;
            let engine = ClassifierEngine::new(config, &params, flat, spec.placement.precision)?;
            Ok(Box::new(EngineRunner::new(engine, spec, ema)?))
        } else {
            let new = |vars: &_, device: &_| BeitForImageClassification::new(config, &params, vars, device);
            Ok(Box::new(CandleRunner::new(spec, values, ema, new)?))
        }
    }
}

/// The classifier's operations on a runner.
pub trait ClassifierRunner: Runner {
    /// Adds the gradient of the summed label-smoothed cross-entropy over the images.
    fn loss_and_grads(
        &mut self,
        images: Images,
        labels: Vec<u32>,
        smoothing: f64,
        draws: Draws,
    ) -> Result<ClassifierLossMetrics>;
    /// Class logits [B, K] (no stochastic depth).
    fn logits(&mut self, images: Images) -> Result<Vec<f32>>;
}

impl ClassifierRunner for EngineRunner<ClassifierEngine<f32>> {
    fn loss_and_grads(
        &mut self,
        images: Images,
        labels: Vec<u32>,
        smoothing: f64,
        draws: Draws,
    ) -> Result<ClassifierLossMetrics> {
        let rows = labels.len();
        let model = &mut self.model;
        let out = on_pool(|| model.loss_and_grads(images.values, &labels, smoothing, draws, rows as f64))?;
        self.added(rows);
        Ok(ClassifierLossMetrics { loss: out.loss, accuracy: out.hits as f64 / rows as f64 })
    }

    fn logits(&mut self, images: Images) -> Result<Vec<f32>> {
        let model = &mut self.model;
        on_pool(|| model.logits(images.values))
    }
}

impl ClassifierRunner for CandleRunner<BeitForImageClassification> {
    fn loss_and_grads(
        &mut self,
        images: Images,
        labels: Vec<u32>,
        smoothing: f64,
        draws: Draws,
    ) -> Result<ClassifierLossMetrics> {
        let pixels = images.tensor(&self.device, self.precision)?;
        let rows = labels.len();
        let labels = Tensor::from_vec(labels, rows, &self.device)?;
        let logits = self.model.forward(&pixels, Some(draws))?;
        let (loss, accuracy) = classification_loss(&logits, &labels, smoothing)?;
        let loss = self.backward(&loss, rows)?;
        Ok(ClassifierLossMetrics { loss, accuracy })
    }

    fn logits(&mut self, images: Images) -> Result<Vec<f32>> {
        f32_values(&self.model.forward(&images.tensor(&self.device, self.precision)?, None)?)
    }
}

impl Trainer<Classification> {
    pub fn new(
        config: ClassifierConfig,
        optim: AdamWConfig,
        training: ClassifierTrainingOptions,
        seed: u64,
    ) -> Result<Self> {
        Self::build(config, training, optim, Source::Init(seed), None)
    }

    /// Starts from the backbone of a MIM or classifier checkpoint: its `beit.*` tensors (not the
    /// mask token); the classes are initialised from `seed`. With [CLS] pooling the MIM's final
    /// LayerNorm becomes `beit.layernorm`; a classifier's pooling LayerNorm is kept when it
    /// pools the same way (intermediate fine-tuning, as BEiT's 22k -> 1k), else initialised.
    /// `config.model` must match the checkpoint's shapes, except that another image size
    /// resizes the position tables (drop path may differ too).
    pub fn from_pretrained(
        path: &Path,
        config: ClassifierConfig,
        optim: AdamWConfig,
        training: ClassifierTrainingOptions,
        seed: u64,
    ) -> Result<Self> {
        // Shapes alone would take a grid's tables for its transpose's: the file's config says
        // which grid they are of, and another image size resizes them.
        let mut file = checkpoint::load(path)?;
        let (source, saved) = backbone_of(&file.metadata, path)?;
        let in_file = |e: Error| Error::Checkpoint(format!("{}: {e}", path.display()));
        // The model's tensors, not its optimizer state; from a classifier, not its classes
        // either, and its pooling's LayerNorm only when the new head pools the same way.
        let pooling_norm = match config.pooling {
            Pooling::Mean => "beit.pooler.layernorm.",
            Pooling::Cls => "beit.layernorm.",
        };
        file.tensors.retain(|name, _| match source {
            BackboneSource::Mim => {
                name.starts_with("beit.") || name.starts_with("layernorm.") || name.starts_with("lm_head.")
            }
            BackboneSource::Classifier => {
                let other_norm = (name.starts_with("beit.pooler.") || name.starts_with("beit.layernorm."))
                    && !name.starts_with(pooling_norm);
                name.starts_with("beit.") && !other_norm
            }
        });
        hf::fit_backbone(&mut file.tensors, &saved, &config.model, "the classifier's model").map_err(in_file)?;
        Self::from_backbone(file.tensors, config, optim, training, seed).map_err(in_file)
    }

    /// A classifier from a transformers checkpoint. A `BeitForImageClassification` keeps its
    /// head unless `num_labels` asks for another number of classes; a `BeitModel` or
    /// `BeitForMaskedImageModeling` gets a new head of `num_labels` classes (required then).
    pub fn from_hf(
        ckpt: HfCheckpoint,
        num_labels: Option<usize>,
        optim: AdamWConfig,
        training: ClassifierTrainingOptions,
        seed: u64,
    ) -> Result<Self> {
        let HfCheckpoint { layout, config: model, pooling, labels, mut tensors, .. } = ckpt;
        if layout == HfLayout::SemanticSegmentation {
            // The backbone alone: the pyramid and the heads have no place in a classifier.
            tensors.retain(|name, _| name.starts_with("beit."));
        }
        let num_labels = match (layout, num_labels) {
            (HfLayout::ImageClassification, None) => labels.len(),
            (HfLayout::ImageClassification, Some(n)) => {
                if n != labels.len() {
                    tensors.retain(|name, _| !name.starts_with("classifier."));
                }
                n
            }
            (_, Some(n)) => n,
            (_, None) => {
                return Err(Error::Config(format!(
                    "a {} checkpoint has no classification head: numLabels is required for the new one",
                    layout.architecture()
                )))
            }
        };
        // The kept head's class names.
        let head_kept = layout == HfLayout::ImageClassification && num_labels == labels.len();
        let class_names = if head_kept { given_class_names(labels) } else { None };
        let config = ClassifierConfig { model, num_labels, pooling, class_names };
        Self::from_backbone(tensors, config, optim, training, seed)
    }

    /// `tensors`: a backbone under `beit.*`, with a MIM's `layernorm.*` and `lm_head.*` or a
    /// classifier's head possibly alongside. Only the head and the pooling norm may be absent.
    fn from_backbone(
        mut tensors: HashMap<String, Tensor>,
        config: ClassifierConfig,
        optim: AdamWConfig,
        training: ClassifierTrainingOptions,
        seed: u64,
    ) -> Result<Self> {
        tensors.retain(|name, _| !name.starts_with("lm_head.") && name != "beit.embeddings.mask_token");
        for part in ["weight", "bias"] {
            if let Some(t) = tensors.remove(&format!("layernorm.{part}")) {
                if config.pooling == Pooling::Cls {
                    tensors.insert(format!("beit.layernorm.{part}"), t);
                }
            }
        }
        // The head may be absent (a new one is initialised from `seed`), nothing else.
        let head = ClassifierParams::new(&config).1.head.ids().into_iter().collect();
        Self::build(config, training, optim, Source::Tensors { tensors, init: Some((seed, head)) }, None)
    }

    /// Writes a transformers `BeitForImageClassification` folder (`id2label` from the config's
    /// class names, else LABEL_i).
    pub fn export_hf(&self, dir: &Path) -> Result<()> {
        let labels = self.config.label_names();
        hf::write(
            dir,
            HfLayout::ImageClassification,
            &self.config.model,
            self.config.pooling,
            &labels,
            &self.weights()?,
        )
    }

    /// Adds the gradient of the batch's summed label-smoothed cross-entropy to the gradient
    /// buffer (`draws`: the step's seed and the batch's first sample in the step).
    pub fn loss_and_grads(&mut self, pixels: &[f32], labels: &[i32], draws: Draws) -> Result<ClassifierLossMetrics> {
        let images = check_pixels(&self.config.model, pixels)?;
        let labels = check_labels(labels, images.batch(), self.config.num_labels)?;
        let smoothing = self.options.label_smoothing;
        self.runner.loss_and_grads(images, labels, smoothing, draws)
    }

    /// One optimisation step: [`Self::loss_and_grads`] then [`Trainer::apply_update`]; `seed`
    /// drives stochastic depth.
    pub fn train_step(&mut self, pixels: &[f32], labels: &[i32], lr: f64, seed: u64) -> Result<ClassifierStepMetrics> {
        check_lr(lr)?;
        let loss = self.loss_and_grads(pixels, labels, Draws { seed, first_sample: 0 })?;
        Ok(ClassifierStepMetrics::of(loss, self.apply_update(lr)?))
    }

    /// Class logits [B, K] row-major (no stochastic depth).
    pub fn predict(&mut self, pixels: &[f32]) -> Result<Vec<f32>> {
        let images = check_pixels(&self.config.model, pixels)?;
        self.runner.logits(images)
    }
}

/// Labels checked: one per image, each in [0, num_labels).
fn check_labels(labels: &[i32], batch: usize, num_labels: usize) -> Result<Vec<u32>> {
    if labels.len() != batch {
        return Err(Error::Input(format!("labels: expected {batch} values (one per image), got {}", labels.len())));
    }
    if let Some(i) = labels.iter().position(|&l| l < 0 || l as usize >= num_labels) {
        return Err(Error::Input(format!(
            "labels: label {} at index {i} is out of range [0, {num_labels})",
            labels[i]
        )));
    }
    Ok(labels.iter().map(|&l| l as u32).collect())
}

fn label_tensor(labels: &[i32], batch: usize, num_labels: usize, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(check_labels(labels, batch, num_labels)?, batch, device)?)
}

/// A linear classifier on frozen features, standardised with the training features' mean and
/// standard deviation (a BatchNorm without affine parameters, as MAE's and BEiT's probes).
pub struct LinearProbe {
    pub num_features: usize,
    pub num_labels: usize,
    linear: Linear,
    vars: Vars,
    optimizer: AdamW,
    mean: Tensor,
    inv_std: Tensor,
    device: Device,
}

impl LinearProbe {
    pub fn new(
        num_features: usize,
        num_labels: usize,
        train_features: &[f32],
        optim: AdamWConfig,
        seed: u64,
    ) -> Result<Self> {
        if num_features == 0 || num_labels < 2 {
            return Err(Error::Config(format!(
                "a probe needs features and at least 2 labels, got {num_features} features and {num_labels} labels"
            )));
        }
        let device = Device::Cpu;
        let train = features_tensor(train_features, num_features, &device)?;
        let mean = train.mean(0)?;
        let var = train.broadcast_sub(&mean)?.sqr()?.mean(0)?;
        let inv_std = var.affine(1.0, 1e-6)?.sqrt()?.recip()?;
        let mut table = ParamTable::new();
        let params = table.scope("", 0).linear(num_features, num_labels, true, Init::TruncatedNormal(0.01));
        let vars = Vars::from_source(&table, Source::Init(seed), DType::F32, &device)?;
        let optimizer = AdamW::new(optim, &table, vars.vars(), &vec![1.0; table.len()])?;
        Ok(Self {
            num_features,
            num_labels,
            linear: Linear::new(&params, &vars, Precision::F32),
            vars,
            optimizer,
            mean,
            inv_std,
            device,
        })
    }

    fn logits(&self, features: &[f32]) -> Result<Tensor> {
        let x = features_tensor(features, self.num_features, &self.device)?;
        Ok(self.linear.forward(&x.broadcast_sub(&self.mean)?.broadcast_mul(&self.inv_std)?)?)
    }

    pub fn train_step(&mut self, features: &[f32], labels: &[i32], lr: f64) -> Result<ClassifierStepMetrics> {
        let logits = self.logits(features)?;
        let labels = label_tensor(labels, logits.dim(0)?, self.num_labels, &self.device)?;
        let (loss, accuracy) = classification_loss(&logits, &labels, 0.0)?;
        let loss_value = loss.to_scalar::<f32>()? as f64;
        let grads = flatten_grads(self.vars.vars(), &loss.backward()?)?;
        let grad_norm = self.optimizer.step(&grads, 1.0, lr)?;
        Ok(ClassifierStepMetrics { loss: loss_value, accuracy, grad_norm })
    }

    pub fn predict(&self, features: &[f32]) -> Result<Vec<f32>> {
        Ok(self.logits(features)?.flatten_all()?.to_vec1::<f32>()?)
    }
}

fn features_tensor(features: &[f32], num_features: usize, device: &Device) -> Result<Tensor> {
    if features.is_empty() || !features.len().is_multiple_of(num_features) {
        return Err(Error::Input(format!(
            "features: expected a non-empty multiple of {num_features} values, got {}",
            features.len()
        )));
    }
    if let Some(i) = features.iter().position(|v| !v.is_finite()) {
        return Err(Error::Input(format!("features: value {} at index {i} is not finite", features[i])));
    }
    Ok(Tensor::from_slice(features, (features.len() / num_features, num_features), device)?)
}
