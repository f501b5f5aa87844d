//! One trainer shape for every model (the BEiT MIM model, the classifier, the dVAE
//! tokenizer): a config and options, a parameter table, the weights with their AdamW state
//! (and EMA) on a runner, the caller's opaque training state, and the same creation,
//! checkpoint, placement and update code. What differs between the models is a [`Kind`]; the
//! model-specific steps live with each kind (mim.rs, classify.rs, tokenizer.rs).
//!
//! A step is three parts: the kind's `loss_and_grads` adds a batch's gradient to the runner's
//! buffer, [`Trainer::gradients`] exposes that buffer (all-reduce, accumulation), and
//! [`Trainer::apply_update`] clips, steps AdamW (and the EMA) and empties it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{de::DeserializeOwned, Serialize};

use crate::checkpoint::{self, Loaded};
use crate::config::BeitConfig;
use crate::config::Precision;
use crate::distributed::Communicator;
use crate::error::{Error, Result};
use crate::optimizer::{self, AdamWConfig};
use crate::params::{values, ParamTable, Source};
use crate::runner::{flat_values, unflatten, GradientValues, Gradients, Placement, Runner, RunnerSpec};

/// Metadata key of the caller's training state (schedule position, RNG states), saved with
/// the weights so a checkpoint is one atomic file.
const TRAIN_STATE_KEY: &str = "trainState";
/// Metadata key of a kind's training options.
const OPTIONS_KEY: &str = "training";
/// The most parameters a model may have (8.6 billion; BEiT-L has 0.3).
const MAX_PARAMETERS: usize = 1 << 33;
/// Checkpoint tensors of the weights' EMA.
const EMA_PREFIX: &str = "ema.";

/// What differs between the models a [`Trainer`] trains.
pub trait Kind: Sized + 'static {
    /// The model's shape, saved under "config".
    type Config: Clone;
    /// Training options saved with the model (under "training").
    type Options: Clone + Serialize + DeserializeOwned;
    /// The kind's runner: its operations on either path (`dyn MimRunner`, ...).
    type Runner: ?Sized + Runner;
    /// The checkpoint's "format" entry, and what to call such a file in errors.
    const FORMAT: &'static str;
    const WHAT: &'static str;
    /// Where files written before the options key was "training" keep the options.
    const LEGACY_OPTIONS_KEY: Option<&'static str> = None;

    fn config_json(config: &Self::Config) -> String;
    /// Parses and validates a config.
    fn parse_config(json: &str) -> Result<Self::Config>;
    fn validate(config: &Self::Config, options: &Self::Options) -> Result<()>;
    /// The model's parameter table.
    fn table(config: &Self::Config) -> ParamTable;
    /// Each parameter's learning-rate multiplier (table order).
    fn lr_scales(_config: &Self::Config, _options: &Self::Options, table: &ParamTable) -> Vec<f64> {
        vec![1.0; table.len()]
    }
    /// The decay of the weights' EMA, 0 when the model keeps none.
    fn ema_decay(_options: &Self::Options) -> f64 {
        0.0
    }
    /// The optimizer settings a checkpoint without an "optimizer" entry implies (the
    /// tokenizer's files before the trainers shared one format).
    fn legacy_optimizer(_options: &Self::Options) -> Option<AdamWConfig> {
        None
    }
    /// The runner of the model over `values` (table order) where `spec` places it: the CPU
    /// engine or candle.
    fn runner(
        config: &Self::Config,
        options: &Self::Options,
        spec: &RunnerSpec,
        values: Vec<Tensor>,
        ema: Option<Vec<Tensor>>,
    ) -> Result<Box<Self::Runner>>;
}

/// What an update reports.
#[derive(Debug, Clone, Copy)]
pub struct UpdateMetrics {
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Seconds spent summing gradients across ranks (waiting for the slowest rank included);
    /// 0 for a model that is not distributed.
    pub all_reduce_seconds: f64,
}

pub struct Trainer<K: Kind> {
    pub config: K::Config,
    pub options: K::Options,
    /// Opaque JSON from the caller, saved and loaded with the checkpoint.
    pub train_state: Option<String>,
    optimizer: AdamWConfig,
    table: ParamTable,
    pub(crate) runner: Box<K::Runner>,
    placement: Placement,
    /// Set by [`Trainer::distribute`]: updates sum the gradient buffers of every rank.
    communicator: Option<Arc<Communicator>>,
}

impl<K: Kind> Trainer<K> {
    /// A model with the values `source` gives (an initialisation or checkpoint tensors) on the
    /// CPU, in f32; the EMA (when the kind keeps one) from `ema` or a copy of the weights.
    pub(crate) fn build(
        config: K::Config,
        options: K::Options,
        optimizer: AdamWConfig,
        source: Source,
        ema: Option<Source>,
    ) -> Result<Self> {
        K::validate(&config, &options)?;
        let table = K::table(&config);
        // Refused here, before allocating: an allocation that large aborts the process.
        let count = table.checked_num_values();
        if count.is_none_or(|n| n > MAX_PARAMETERS) {
            let count = count.map_or("more than 2^64".to_string(), |n| n.to_string());
            return Err(Error::Config(format!(
                "the config gives the model {count} parameters, more than the 2^33 beit trains (over 128 GiB \
                 with gradients and AdamW moments): check its sizes"
            )));
        }
        let values = source.values(&table)?;
        // Its names are the weights' after the prefix: say they are the EMA's.
        let in_ema = |e: Error| Error::Checkpoint(format!("the weights' EMA (tensors named {EMA_PREFIX}*): {e}"));
        let ema = ema.map(|s| s.values(&table).map_err(in_ema)).transpose()?;
        let placement = Placement::cpu();
        let runner = Self::runner(&config, &options, &optimizer, &table, &placement, values, ema)?;
        Ok(Self { config, options, train_state: None, optimizer, table, runner, placement, communicator: None })
    }

    fn runner(
        config: &K::Config,
        options: &K::Options,
        optimizer: &AdamWConfig,
        table: &ParamTable,
        placement: &Placement,
        values: Vec<Tensor>,
        ema: Option<Vec<Tensor>>,
    ) -> Result<Box<K::Runner>> {
        // A learning rate of 0 and no decay: AdamW leaves buffers exactly as they are.
        let lr_scales = K::lr_scales(config, options, table)
            .into_iter()
            .zip(table.params())
            .map(|(scale, p)| if p.trainable { scale } else { 0.0 })
            .collect();
        let spec = RunnerSpec { table, optimizer, lr_scales, ema_decay: K::ema_decay(options), placement };
        K::runner(config, options, &spec, values, ema)
    }

    /// Reads a checkpoint written by [`Trainer::save`]: its config (unless `config` is given,
    /// which the file's tensors must then fit), options, weights, optimizer state, EMA and
    /// training state.
    pub fn load(path: &Path, config: Option<K::Config>) -> Result<Self> {
        let mut file = checkpoint::load(path)?;
        file.expect_format(path, K::FORMAT, K::WHAT)?;
        let in_file = |e: Error| Error::Checkpoint(format!("{}: {e}", path.display()));
        let config = match config {
            Some(c) => {
                // Tensor shapes alone would let a grid's table load as its transpose's (the
                // same length): the file's own config, when it has one, must be this one.
                if let Some(saved) = file.metadata.get("config") {
                    // Both through the current config type, so that fields added since the file
                    // was written compare at their defaults.
                    let saved = K::config_json(&K::parse_config(saved).map_err(in_file)?);
                    let differ = config_differences(&saved, &K::config_json(&c));
                    if !differ.is_empty() {
                        return Err(Error::Config(format!(
                            "{}: the checkpoint's config differs from the one given in {}",
                            path.display(),
                            differ.join(", ")
                        )));
                    }
                }
                c
            }
            None => K::parse_config(file.meta("config", path)?)?,
        };
        let options = saved_options::<K>(&file, path)?;
        let (optimizer, step, moments) = saved_optimizer::<K>(&mut file, path, &options)?;
        let train_state = file.metadata.remove(TRAIN_STATE_KEY);
        let ema = file.take_prefixed(EMA_PREFIX);
        let ema = (!ema.is_empty()).then(|| Source::tensors(ema));
        let mut trainer =
            Self::build(config, options, optimizer, Source::tensors(file.tensors), ema).map_err(in_file)?;
        // Weights converted from elsewhere (DALL-E's) come at step 0 without optimizer state.
        if step > 0 || !moments.is_empty() {
            trainer.runner.restore_optimizer(moments, step).map_err(in_file)?;
        }
        trainer.train_state = train_state;
        Ok(trainer)
    }

    /// Writes the weights, optimizer state, EMA, config, options and training state
    /// atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = self.weights()?;
        if let Some(ema) = self.runner.ema_weights()? {
            let named = values::named(&self.table, ema);
            tensors.extend(named.into_iter().map(|(n, t)| (format!("{EMA_PREFIX}{n}"), t)));
        }
        let mut metadata = HashMap::from([
            ("format".to_string(), K::FORMAT.to_string()),
            ("config".to_string(), K::config_json(&self.config)),
            (OPTIONS_KEY.to_string(), self.options_json()),
        ]);
        optimizer::write_checkpoint(
            &self.optimizer,
            self.runner.optimizer_step(),
            self.runner.optimizer_state()?,
            &mut tensors,
            &mut metadata,
        );
        if let Some(state) = &self.train_state {
            metadata.insert(TRAIN_STATE_KEY.to_string(), state.clone());
        }
        checkpoint::save(path, &tensors, metadata)
    }

    pub fn device(&self) -> Device {
        self.runner.device()
    }

    /// Moves the weights, optimizer state and EMA to `device`; later steps run there.
    pub fn to_device(&mut self, device: &Device) -> Result<()> {
        self.place(Placement { device: device.clone(), ..self.placement.clone() })
    }

    pub fn precision(&self) -> Precision {
        self.placement.precision
    }

    /// Sets the activation precision of later steps (weights, moments, losses stay f32).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.place(Placement { precision, ..self.placement.clone() })
    }

    /// On by default. Off, the CPU runs candle's autograd, the path GPUs take: the reference
    /// the engine is tested against.
    pub fn set_cpu_engine(&mut self, on: bool) -> Result<()> {
        self.place(Placement { cpu_engine: on, ..self.placement.clone() })
    }

    /// Rebuilds the runner with the same weights, optimizer state and EMA where `placement`
    /// says (nothing to do when the path, device and precision stay the same, or only the
    /// precision changes on the engine). On an error the model stays as it was.
    fn place(&mut self, placement: Placement) -> Result<()> {
        let (old, new) = (&self.placement, &placement);
        let same_path = new.uses_engine() == old.uses_engine() && new.device.same_device(&old.device);
        // On the engine a precision is a setting of the GEMMs: switched in place, the model is
        // not copied (a copy would hold the weights, EMA and moments twice at once).
        if same_path && (new.precision == old.precision || self.runner.switch_precision(new.precision)) {
            self.placement = placement;
            return Ok(());
        }
        if *self.runner.gradients().count > 0 {
            return Err(Error::Input(
                "the model holds gradients not yet applied: call applyUpdate before moving it".into(),
            ));
        }
        self.runner.release_buffers();
        let moments = self.runner.optimizer_state()?.into_iter().collect();
        let (values, ema) = (self.runner.weights()?, self.runner.ema_weights()?);
        self.runner = self.runner_holding(&placement, values, ema, moments, self.runner.optimizer_step())?;
        self.placement = placement;
        Ok(())
    }

    /// A runner where `placement` says, holding `values`, `ema` and the AdamW `moments` at
    /// `step` (a move to another placement, or rank 0's state on every rank).
    fn runner_holding(
        &self,
        placement: &Placement,
        values: Vec<Tensor>,
        ema: Option<Vec<Tensor>>,
        moments: HashMap<String, Tensor>,
        step: u64,
    ) -> Result<Box<K::Runner>> {
        let mut runner =
            Self::runner(&self.config, &self.options, &self.optimizer, &self.table, placement, values, ema)?;
        runner.restore_optimizer(moments, step)?;
        Ok(runner)
    }

    /// Trainable values (buffers such as BatchNorm statistics not counted, as PyTorch counts).
    pub fn num_parameters(&self) -> usize {
        self.table.params().iter().filter(|p| p.trainable).map(|p| p.len()).sum()
    }

    pub fn table(&self) -> &ParamTable {
        &self.table
    }

    /// Optimizer updates taken so far.
    pub fn optimizer_step(&self) -> u64 {
        self.runner.optimizer_step()
    }

    pub fn config_json(&self) -> String {
        K::config_json(&self.config)
    }

    pub fn options_json(&self) -> String {
        serde_json::to_string(&self.options).expect("serialisable")
    }

    pub fn optimizer_config(&self) -> &AdamWConfig {
        &self.optimizer
    }

    /// The parameters (checkpoint names, table order), wherever the model runs.
    pub fn weights(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(values::named(&self.table, self.runner.weights()?))
    }

    /// Each parameter's learning-rate multiplier (layer-wise decay), by name.
    pub fn lr_scales(&self) -> Vec<(String, f64)> {
        self.runner.lr_scales()
    }

    /// The gradient buffer the kind's `loss_and_grads` calls add to and [`Self::apply_update`]
    /// consumes: the gradient of the summed losses, in table order, and its count of terms.
    pub fn gradients(&mut self) -> Gradients<'_> {
        self.runner.gradients()
    }

    /// Clip, AdamW and the EMA's move from the gradients added since the last update (their
    /// mean over the loss terms they sum, on every rank when the model is distributed);
    /// empties the buffer.
    pub fn apply_update(&mut self, lr: f64) -> Result<UpdateMetrics> {
        optimizer::check_lr(lr)?;
        let started = std::time::Instant::now();
        self.sum_across_ranks()?;
        let all_reduce_seconds = if self.communicator.is_some() { started.elapsed().as_secs_f64() } else { 0.0 };
        Ok(UpdateMetrics { grad_norm: self.runner.apply_update(lr)?, all_reduce_seconds })
    }

    /// Makes this model one replica of a data-parallel job: rank 0's config, options and
    /// optimizer settings must be every rank's (else an error on every rank naming the rank
    /// and the field), rank 0's weights, EMA and optimizer state replace every rank's (PyTorch
    /// DDP's start), and from now on every update sums the gradient buffers and their counts
    /// across ranks first.
    pub fn distribute(&mut self, communicator: Arc<Communicator>) -> Result<()> {
        let pending = *self.runner.gradients().count;
        communicator.agree(if pending > 0 {
            Err(Error::Input("the model holds gradients not yet applied: call applyUpdate before distribute".into()))
        } else {
            Ok(())
        })?;
        let setup = serde_json::json!({
            "config": serde_json::from_str::<serde_json::Value>(&self.config_json()).expect("config JSON"),
            "options": serde_json::from_str::<serde_json::Value>(&self.options_json()).expect("options JSON"),
            "optimizer": self.optimizer,
            "device": if self.placement.device.is_cpu() { "cpu" } else { "cuda" },
            "precision": self.placement.precision.name(),
        });
        communicator.check_same(&format!("{} setup", K::WHAT), &setup.to_string())?;
        let mut values = flat_values(&self.runner.weights()?)?;
        communicator.broadcast_f32(&mut values)?;
        let ema = match self.runner.ema_weights()? {
            Some(ema) => {
                let mut ema = flat_values(&ema)?;
                communicator.broadcast_f32(&mut ema)?;
                Some(unflatten(&self.table, &ema)?)
            }
            None => None,
        };
        let mut moments = HashMap::new();
        for (name, t) in self.runner.optimizer_state()? {
            let mut v = flat_values(std::slice::from_ref(&t))?;
            communicator.broadcast_f32(&mut v)?;
            moments.insert(name, candle_core::Tensor::from_vec(v, t.shape(), &Device::Cpu)?);
        }
        let mut step = [self.runner.optimizer_step() as f64];
        communicator.broadcast_f64(&mut step)?;
        let values = unflatten(&self.table, &values)?;
        self.runner = self.runner_holding(&self.placement, values, ema, moments, step[0] as u64)?;
        self.communicator = Some(communicator);
        Ok(())
    }

    /// The job this model is a replica of, after [`Self::distribute`].
    pub fn communicator(&self) -> Option<Arc<Communicator>> {
        self.communicator.clone()
    }

    /// The data-parallel hook: sums the gradient buffers and their loss-term counts of every
    /// rank, so each divides the global sum by the global count (N ranks x B images take the
    /// step 1 rank x N*B takes).
    fn sum_across_ranks(&mut self) -> Result<()> {
        let Some(communicator) = self.communicator.clone() else { return Ok(()) };
        let n = self.table.num_values();
        let device = self.runner.device();
        let Gradients { values, count } = self.runner.gradients();
        let mut total = [*count as f64];
        communicator.sum_f64(&mut total)?;
        *count = total[0] as u64;
        match values {
            GradientValues::Host(buf) => communicator.sum_f32(buf),
            GradientValues::Device(slot) => {
                // A rank whose batch added no loss terms still takes part, with zeros.
                let grads = match slot.take() {
                    Some(t) => t,
                    None => Tensor::zeros(n, DType::F32, &device)?,
                };
                #[cfg(feature = "cuda")]
                if device.is_cuda() {
                    if let Some(nccl) = communicator.nccl(&device)? {
                        nccl.sum_in_place(&grads)?;
                        *slot = Some(grads);
                        return Ok(());
                    }
                }
                let mut host = grads.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                communicator.sum_f32(&mut host)?;
                *slot = Some(Tensor::from_vec(host, n, &device)?);
                Ok(())
            }
        }
    }
}

/// The fields (dotted paths, with both values) in which two configs' JSON differ; drop-path
/// rates aside, which a load may change.
fn config_differences(saved: &str, given: &str) -> Vec<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                let keys: std::collections::BTreeSet<_> = a.keys().chain(b.keys()).collect();
                for key in keys.into_iter().filter(|k| *k != "dropPathRate") {
                    let null = serde_json::Value::Null;
                    let at = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                    walk(&at, a.get(key).unwrap_or(&null), b.get(key).unwrap_or(&null), out);
                }
            }
            _ if a != b => out.push(format!("{path} ({a} in the file, {b} given)")),
            _ => {}
        }
    }
    let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or(serde_json::Value::Null);
    let mut out = vec![];
    walk("", &parse(saved), &parse(given), &mut out);
    out
}

/// A checkpoint's training options (under "training", or the kind's legacy key).
fn saved_options<K: Kind>(file: &Loaded, path: &Path) -> Result<K::Options> {
    let key = [Some(OPTIONS_KEY), K::LEGACY_OPTIONS_KEY].into_iter().flatten().find(|k| file.metadata.contains_key(*k));
    let json = match key {
        Some(key) => file.meta(key, path)?,
        // Kinds without options (the MIM model's are `()`) wrote no entry.
        None => "null",
    };
    serde_json::from_str(json)
        .map_err(|e| Error::Checkpoint(format!("{}: bad {} metadata: {e}", path.display(), key.unwrap_or(OPTIONS_KEY))))
}

/// The optimizer settings, step and moments of a checkpoint.
fn saved_optimizer<K: Kind>(
    file: &mut Loaded,
    path: &Path,
    options: &K::Options,
) -> Result<(AdamWConfig, u64, HashMap<String, Tensor>)> {
    if file.metadata.contains_key("optimizer") {
        let saved = optimizer::read_checkpoint(file, path)?;
        return Ok((saved.config, saved.step, saved.moments));
    }
    let Some(config) = K::legacy_optimizer(options) else {
        return Err(Error::Checkpoint(format!("{} has no \"optimizer\" entry in its metadata", path.display())));
    };
    let step = match file.metadata.get("step") {
        Some(s) => s.parse().map_err(|e| Error::Checkpoint(format!("{}: bad step: {e}", path.display())))?,
        None => 0,
    };
    Ok((config, step, file.take_prefixed("optimizer.")))
}

/// Checked images [B, C, H, W], row-major.
#[derive(Debug, Clone, Copy)]
pub struct Images<'a> {
    pub values: &'a [f32],
    pub shape: [usize; 4],
}

impl Images<'_> {
    pub fn batch(&self) -> usize {
        self.shape[0]
    }

    /// On `device` in the activation dtype of `precision`.
    pub fn tensor(&self, device: &Device, precision: Precision) -> Result<Tensor> {
        Ok(Tensor::from_slice(self.values, self.shape.as_slice(), device)?.to_dtype(precision.dtype())?)
    }
}

/// Checks [B, C, H, W] pixels for a BEiT of `cfg` (length, finiteness).
pub(crate) fn check_pixels<'a>(cfg: &BeitConfig, pixels: &'a [f32]) -> Result<Images<'a>> {
    let [h, w] = cfg.image_size;
    let per_image = cfg.num_channels * h * w;
    if pixels.is_empty() || !pixels.len().is_multiple_of(per_image) {
        return Err(Error::Input(format!(
            "pixels: expected a multiple of {per_image} values (C*H*W = {}*{h}*{w}) and at least one image, got {}",
            cfg.num_channels,
            pixels.len()
        )));
    }
    if let Some(i) = pixels.iter().position(|v| !v.is_finite()) {
        return Err(Error::Input(format!("pixels: value {} at index {i} is not finite", pixels[i])));
    }
    Ok(Images { values: pixels, shape: [pixels.len() / per_image, cfg.num_channels, h, w] })
}

/// All values of `t`, flattened, as f32 (activations may be bf16).
pub(crate) fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// The kinds of beit checkpoint that a classifier or segmenter takes its backbone from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackboneSource {
    Mim,
    Classifier,
}

/// Which kind of checkpoint `path` is, and its backbone's config, from the file's header alone
/// (a checkpoint with its AdamW moments is three times the weights).
pub fn pretrained_backbone(path: &Path) -> Result<(BackboneSource, BeitConfig)> {
    backbone_of(&checkpoint::read_metadata(path)?, path)
}

/// [`pretrained_backbone`] from the metadata of the checkpoint at `path`, already read.
pub(crate) fn backbone_of(metadata: &HashMap<String, String>, path: &Path) -> Result<(BackboneSource, BeitConfig)> {
    use crate::{classify::Classification, config::ClassifierConfig, mim::Mim};
    let in_file = |e: Error| Error::Checkpoint(format!("{}: {e}", path.display()));
    let config = || {
        metadata
            .get("config")
            .map(String::as_str)
            .ok_or_else(|| Error::Checkpoint(format!("{} has no \"config\" entry in its metadata", path.display())))
    };
    match metadata.get("format").map(String::as_str) {
        Some(Mim::FORMAT) => Ok((BackboneSource::Mim, BeitConfig::from_json(config()?).map_err(in_file)?)),
        Some(Classification::FORMAT) => {
            Ok((BackboneSource::Classifier, ClassifierConfig::from_json(config()?).map_err(in_file)?.model))
        }
        other => Err(Error::Checkpoint(format!(
            "{}: format {:?} is not a beit MIM (\"{}\") or classifier (\"{}\") checkpoint",
            path.display(),
            other.unwrap_or(""),
            Mim::FORMAT,
            Classification::FORMAT
        ))),
    }
}
