//! N-API bindings: a small, typed surface over beit-core. Heavy calls return Promises and run
//! on libuv worker threads; Rust errors and panics become JS `Error`s, never aborts.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use beit_core::{AdamWConfig, BeitConfig, MimBatch, MimTrainer};
use napi::bindgen_prelude::*;
use napi_derive::napi;

/// Runs `f`, turning core errors and panics into JS errors.
fn guarded<T>(f: impl FnOnce() -> beit_core::Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result.map_err(|e| Error::new(Status::GenericFailure, e.to_string())),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(Error::new(Status::GenericFailure, format!("internal error in beit native code: {msg}")))
        }
    }
}

type Shared = Arc<Mutex<MimTrainer>>;

fn lock(model: &Shared) -> beit_core::Result<MutexGuard<'_, MimTrainer>> {
    model.lock().map_err(|_| {
        beit_core::Error::Numeric(
            "this model is unusable: an earlier call failed inside native code while updating it".into(),
        )
    })
}

fn parse_optimizer(json: &str) -> beit_core::Result<AdamWConfig> {
    let cfg: AdamWConfig = serde_json::from_str(json)
        .map_err(|e| beit_core::Error::Config(format!("invalid optimizer config: {e}")))?;
    cfg.validate()?;
    Ok(cfg)
}

/// A BEiT model with its MIM head and AdamW state.
#[napi]
pub struct NativeMimModel {
    inner: Shared,
}

#[napi]
impl NativeMimModel {
    /// `configJson`: a full model config (camelCase, as `BeitConfig`); `optimizerJson`: AdamW
    /// settings (missing fields take BEiT's defaults); `seed` drives the initialisation.
    #[napi(factory)]
    pub fn create(config_json: String, optimizer_json: String, seed: u32) -> Result<Self> {
        guarded(|| {
            let config = BeitConfig::from_json(&config_json)?;
            let trainer = MimTrainer::new(config, parse_optimizer(&optimizer_json)?, seed as u64)?;
            Ok(Self { inner: Arc::new(Mutex::new(trainer)) })
        })
    }

    /// Reads a checkpoint written by `save`. With `expectedConfigJson`, the file must fit that
    /// config (a mismatch names the tensor and both shapes).
    #[napi(ts_return_type = "Promise<NativeMimModel>")]
    pub fn load(path: String, expected_config_json: Option<String>) -> AsyncTask<LoadTask> {
        AsyncTask::new(LoadTask { path: PathBuf::from(path), expected_config_json })
    }

    #[napi(getter)]
    pub fn config_json(&self) -> Result<String> {
        guarded(|| Ok(lock(&self.inner)?.config.to_json()))
    }

    #[napi(getter)]
    pub fn optimizer_json(&self) -> Result<String> {
        guarded(|| Ok(serde_json::to_string(&lock(&self.inner)?.optimizer.config).expect("serialisable")))
    }

    #[napi(getter)]
    pub fn num_parameters(&self) -> Result<f64> {
        guarded(|| Ok(lock(&self.inner)?.num_parameters() as f64))
    }

    /// Optimizer updates taken so far.
    #[napi(getter)]
    pub fn optimizer_step(&self) -> Result<f64> {
        guarded(|| Ok(lock(&self.inner)?.optimizer.step as f64))
    }

    /// Writes weights, config and optimizer state atomically.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn save(&self, path: String) -> AsyncTask<SaveTask> {
        AsyncTask::new(SaveTask { model: self.inner.clone(), path: PathBuf::from(path) })
    }

    /// One AdamW step on the masked-image-modeling loss. `seed` drives stochastic depth.
    #[napi(ts_return_type = "Promise<StepMetrics>")]
    pub fn train_step(
        &self,
        pixels: Float32Array,
        mask: Uint8Array,
        targets: Int32Array,
        lr: f64,
        seed: u32,
    ) -> AsyncTask<TrainStepTask> {
        AsyncTask::new(TrainStepTask { model: self.inner.clone(), pixels, mask, targets, lr, seed })
    }

    /// Evaluation forward pass: logits and argmax ids at the masked patches.
    #[napi(ts_return_type = "Promise<MaskedPredictions>")]
    pub fn predict(&self, pixels: Float32Array, mask: Uint8Array) -> AsyncTask<PredictTask> {
        AsyncTask::new(PredictTask { model: self.inner.clone(), pixels, mask })
    }
}

#[napi(object)]
pub struct StepMetrics {
    pub loss: f64,
    pub mlm_acc: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub num_masked: u32,
}

#[napi(object)]
pub struct MaskedPredictions {
    /// [numMasked, vocabSize] row-major.
    pub logits: Float32Array,
    /// [numMasked] argmax token ids.
    pub ids: Int32Array,
    pub num_masked: u32,
}

pub struct LoadTask {
    path: PathBuf,
    expected_config_json: Option<String>,
}

impl Task for LoadTask {
    type Output = MimTrainer;
    type JsValue = NativeMimModel;

    fn compute(&mut self) -> Result<MimTrainer> {
        guarded(|| {
            let expected = match &self.expected_config_json {
                Some(json) => Some(BeitConfig::from_json(json)?),
                None => None,
            };
            MimTrainer::load(&self.path, expected.as_ref())
        })
    }

    fn resolve(&mut self, _: Env, trainer: MimTrainer) -> Result<NativeMimModel> {
        Ok(NativeMimModel { inner: Arc::new(Mutex::new(trainer)) })
    }
}

pub struct SaveTask {
    model: Shared,
    path: PathBuf,
}

impl Task for SaveTask {
    type Output = ();
    type JsValue = ();

    fn compute(&mut self) -> Result<()> {
        guarded(|| lock(&self.model)?.save(&self.path))
    }

    fn resolve(&mut self, _: Env, _: ()) -> Result<()> {
        Ok(())
    }
}

pub struct TrainStepTask {
    model: Shared,
    pixels: Float32Array,
    mask: Uint8Array,
    targets: Int32Array,
    lr: f64,
    seed: u32,
}

impl Task for TrainStepTask {
    type Output = beit_core::StepMetrics;
    type JsValue = StepMetrics;

    fn compute(&mut self) -> Result<Self::Output> {
        guarded(|| {
            let batch = MimBatch { pixels: &self.pixels, mask: &self.mask, targets: &self.targets };
            lock(&self.model)?.train_step(&batch, self.lr, self.seed as u64)
        })
    }

    fn resolve(&mut self, _: Env, m: Self::Output) -> Result<StepMetrics> {
        Ok(StepMetrics {
            loss: m.loss,
            mlm_acc: m.mlm_acc,
            grad_norm: m.grad_norm,
            num_masked: m.num_masked as u32,
        })
    }
}

pub struct PredictTask {
    model: Shared,
    pixels: Float32Array,
    mask: Uint8Array,
}

impl Task for PredictTask {
    type Output = beit_core::Predictions;
    type JsValue = MaskedPredictions;

    fn compute(&mut self) -> Result<Self::Output> {
        guarded(|| lock(&self.model)?.predict(&self.pixels, &self.mask))
    }

    fn resolve(&mut self, _: Env, p: Self::Output) -> Result<MaskedPredictions> {
        Ok(MaskedPredictions {
            logits: Float32Array::new(p.logits),
            ids: Int32Array::new(p.ids),
            num_masked: p.num_masked as u32,
        })
    }
}
