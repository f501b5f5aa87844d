//! N-API bindings: a small, typed surface over beit-core. Heavy calls return Promises and run
//! on libuv worker threads; Rust errors and panics become JS `Error`s, never aborts.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use beit_core::{
    AdamWConfig, BeitConfig, DvaeConfig, ImageBatch, MimBatch, MimTrainer, TokenizerTrainer, TokenizerTraining,
};
use napi::bindgen_prelude::*;
use napi_derive::napi;

mod classify;
mod images;

// Training allocates and frees many large activation buffers each step; glibc malloc hands
// those back to the kernel and page-faults them in again every time. mimalloc reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc v2's `mi_option_purge_delay` (see its mimalloc.h): -1 keeps freed pages for reuse
/// instead of returning them to the OS 10 ms later, which made the kernel zero the same
/// activation memory again every step (17% of a CPU training step). RSS stays at its peak.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[napi_derive::module_init]
fn keep_freed_pages() {
    // SAFETY: mi_option_set only stores an integer option; called once at load.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

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

/// Native work for a libuv worker thread; `finish` turns its result into a JS value on the JS
/// thread.
pub struct Job<O: Send + 'static, J> {
    work: Option<Box<dyn FnOnce() -> beit_core::Result<O> + Send>>,
    finish: fn(O) -> Result<J>,
}

impl<O: Send + 'static, J: ToNapiValue + TypeName> Task for Job<O, J> {
    type Output = O;
    type JsValue = J;

    fn compute(&mut self) -> Result<O> {
        let work = self.work.take().ok_or_else(|| Error::new(Status::GenericFailure, "a native job ran twice"))?;
        guarded(work)
    }

    fn resolve(&mut self, _: Env, output: O) -> Result<J> {
        (self.finish)(output)
    }
}

pub(crate) fn job<O: Send + 'static, J: ToNapiValue + TypeName>(
    work: impl FnOnce() -> beit_core::Result<O> + Send + 'static,
    finish: fn(O) -> Result<J>,
) -> AsyncTask<Job<O, J>> {
    AsyncTask::new(Job { work: Some(Box::new(work)), finish })
}

type Shared = Arc<Mutex<MimTrainer>>;

fn lock<T>(model: &Arc<Mutex<T>>) -> beit_core::Result<MutexGuard<'_, T>> {
    model.lock().map_err(|_| {
        beit_core::Error::Numeric(
            "this model is unusable: an earlier call failed inside native code while updating it".into(),
        )
    })
}

pub(crate) fn image_size_pair(size: Option<Vec<u32>>) -> beit_core::Result<Option<[usize; 2]>> {
    match size.as_deref() {
        None => Ok(None),
        Some(&[h, w]) => Ok(Some([h as usize, w as usize])),
        Some(other) => Err(beit_core::Error::Input(format!("imageSize: expected [height, width], got {other:?}"))),
    }
}

pub(crate) fn parse_optimizer(json: &str) -> beit_core::Result<AdamWConfig> {
    let cfg: AdamWConfig = serde_json::from_str(json)
        .map_err(|e| beit_core::Error::Config(format!("invalid optimizer config: {e}")))?;
    cfg.validate()?;
    Ok(cfg)
}

/// NVIDIA GPUs this build can use: 0 in the CPU build, or where the driver reports none.
#[napi]
pub fn cuda_device_count() -> u32 {
    beit_core::device::cuda_device_count() as u32
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
    pub fn load(path: String, expected_config_json: Option<String>) -> AsyncTask<Job<MimTrainer, NativeMimModel>> {
        job(
            move || {
                let expected = expected_config_json.as_deref().map(BeitConfig::from_json).transpose()?;
                MimTrainer::load(&PathBuf::from(path), expected.as_ref())
            },
            |trainer| Ok(NativeMimModel { inner: Arc::new(Mutex::new(trainer)) }),
        )
    }

    /// Reads a transformers `BeitForMaskedImageModeling` folder (config.json +
    /// model.safetensors); `imageSize` [height, width] resizes the position tables to it.
    #[napi(ts_return_type = "Promise<NativeMimModel>")]
    pub fn from_hugging_face(dir: String, image_size: Option<Vec<u32>>, optimizer_json: String) -> AsyncTask<Job<MimTrainer, NativeMimModel>> {
        job(
            move || {
                let ckpt = beit_core::hf::read(&PathBuf::from(dir), image_size_pair(image_size)?)?;
                MimTrainer::from_hf(ckpt, parse_optimizer(&optimizer_json)?)
            },
            |trainer| Ok(NativeMimModel { inner: Arc::new(Mutex::new(trainer)) }),
        )
    }

    /// Writes a transformers `BeitForMaskedImageModeling` folder.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn export_hugging_face(&self, dir: String) -> AsyncTask<Job<(), ()>> {
        let model = self.inner.clone();
        job(move || lock(&model)?.export_hf(&PathBuf::from(dir)), |()| Ok(()))
    }

    /// Moves the model (weights and optimizer state) to "cpu", "cuda" or "cuda:N".
    #[napi]
    pub fn to_device(&self, device: String) -> Result<()> {
        guarded(|| lock(&self.inner)?.to_device(&beit_core::device::parse(&device)?))
    }

    /// Where the model runs: "cpu" or "cuda:N".
    #[napi(getter)]
    pub fn device(&self) -> Result<String> {
        guarded(|| Ok(beit_core::device::name(&lock(&self.inner)?.device())))
    }

    /// Activation precision of training and inference: "f32" or "bf16" (mixed precision:
    /// bf16 activations and matmuls, f32 weights, moments, reductions and loss).
    #[napi(getter)]
    pub fn precision(&self) -> Result<String> {
        guarded(|| Ok(lock(&self.inner)?.precision().name().to_string()))
    }

    #[napi(setter)]
    pub fn set_precision(&self, precision: String) -> Result<()> {
        guarded(|| {
            lock(&self.inner)?.set_precision(beit_core::device::Precision::parse(&precision)?)?;
            Ok(())
        })
    }

    #[napi(getter)]
    pub fn config_json(&self) -> Result<String> {
        guarded(|| Ok(lock(&self.inner)?.config.to_json()))
    }

    #[napi(getter)]
    pub fn optimizer_json(&self) -> Result<String> {
        guarded(|| Ok(serde_json::to_string(&lock(&self.inner)?.optimizer_config()).expect("serialisable")))
    }

    #[napi(getter)]
    pub fn num_parameters(&self) -> Result<f64> {
        guarded(|| Ok(lock(&self.inner)?.num_parameters() as f64))
    }

    /// Optimizer updates taken so far.
    #[napi(getter)]
    pub fn optimizer_step(&self) -> Result<f64> {
        guarded(|| Ok(lock(&self.inner)?.optimizer_step() as f64))
    }

    /// Writes weights, config and optimizer state atomically.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn save(&self, path: String) -> AsyncTask<Job<(), ()>> {
        let model = self.inner.clone();
        job(move || lock(&model)?.save(&PathBuf::from(path)), |()| Ok(()))
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
    ) -> AsyncTask<Job<beit_core::StepMetrics, StepMetrics>> {
        let model = self.inner.clone();
        job(
            move || lock(&model)?.train_step(&MimBatch { pixels: &pixels, mask: &mask, targets: &targets }, lr, seed as u64),
            |m| Ok(StepMetrics { loss: m.loss, mlm_acc: m.mlm_acc, grad_norm: m.grad_norm, num_masked: m.num_masked as u32 }),
        )
    }

    /// The caller's training state (JSON), saved with and loaded from checkpoints.
    #[napi(getter)]
    pub fn train_state(&self) -> Result<Option<String>> {
        guarded(|| Ok(lock(&self.inner)?.train_state.clone()))
    }

    #[napi(setter)]
    pub fn set_train_state(&self, state: Option<String>) -> Result<()> {
        guarded(|| {
            lock(&self.inner)?.train_state = state;
            Ok(())
        })
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
    pub fn predict(&self, pixels: Float32Array, mask: Uint8Array) -> AsyncTask<Job<beit_core::Predictions, MaskedPredictions>> {
        let model = self.inner.clone();
        job(
            move || lock(&model)?.predict(&pixels, &mask),
            |p| Ok(MaskedPredictions { logits: Float32Array::new(p.logits), ids: Int32Array::new(p.ids), num_masked: p.num_masked as u32 }),
        )
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

type SharedTokenizer = Arc<Mutex<TokenizerTrainer>>;

/// The dVAE visual tokenizer with its AdamW (and EMA) state.
#[napi]
pub struct NativeTokenizer {
    inner: SharedTokenizer,
}

#[napi]
impl NativeTokenizer {
    /// `configJson`: a full `DvaeConfig`; `trainingJson`: optimizer, EMA and reconstruction-loss
    /// settings (missing fields take DALL-E's recipe).
    #[napi(factory)]
    pub fn create(config_json: String, training_json: String, seed: u32) -> Result<Self> {
        guarded(|| {
            let config = DvaeConfig::from_json(&config_json)?;
            let training: TokenizerTraining = serde_json::from_str(&training_json)
                .map_err(|e| beit_core::Error::Config(format!("invalid tokenizer training options: {e}")))?;
            training.optimizer.validate()?;
            let trainer = TokenizerTrainer::new(config, training, seed as u64)?;
            Ok(Self { inner: Arc::new(Mutex::new(trainer)) })
        })
    }

    #[napi(ts_return_type = "Promise<NativeTokenizer>")]
    pub fn load(path: String) -> AsyncTask<Job<TokenizerTrainer, NativeTokenizer>> {
        job(move || TokenizerTrainer::load(&PathBuf::from(path)), |t| Ok(NativeTokenizer { inner: Arc::new(Mutex::new(t)) }))
    }

    /// Moves the model (weights and optimizer state) to "cpu", "cuda" or "cuda:N".
    #[napi]
    pub fn to_device(&self, device: String) -> Result<()> {
        guarded(|| lock(&self.inner)?.to_device(&beit_core::device::parse(&device)?))
    }

    /// Where the model runs: "cpu" or "cuda:N".
    #[napi(getter)]
    pub fn device(&self) -> Result<String> {
        guarded(|| Ok(beit_core::device::name(lock(&self.inner)?.device())))
    }

    /// Precision of `encode`: "f32" or "bf16" (MIM targets need only the argmax). The
    /// tokenizer's own training and decoding run in f32.
    #[napi(getter)]
    pub fn precision(&self) -> Result<String> {
        guarded(|| Ok(lock(&self.inner)?.encode_precision().name().to_string()))
    }

    #[napi(setter)]
    pub fn set_precision(&self, precision: String) -> Result<()> {
        guarded(|| {
            lock(&self.inner)?.set_encode_precision(beit_core::device::Precision::parse(&precision)?);
            Ok(())
        })
    }

    #[napi(getter)]
    pub fn config_json(&self) -> Result<String> {
        guarded(|| Ok(lock(&self.inner)?.config.to_json()))
    }

    #[napi(getter)]
    pub fn training_json(&self) -> Result<String> {
        guarded(|| Ok(serde_json::to_string(&lock(&self.inner)?.training).expect("serialisable")))
    }

    #[napi(getter)]
    pub fn num_parameters(&self) -> Result<f64> {
        guarded(|| Ok(lock(&self.inner)?.num_parameters() as f64))
    }

    #[napi(getter)]
    pub fn optimizer_step(&self) -> Result<f64> {
        guarded(|| Ok(lock(&self.inner)?.optimizer.step as f64))
    }

    #[napi(ts_return_type = "Promise<void>")]
    pub fn save(&self, path: String) -> AsyncTask<Job<(), ()>> {
        let model = self.inner.clone();
        job(move || lock(&model)?.save(&PathBuf::from(path)), |()| Ok(()))
    }

    /// One step on [B, C, height, width] images in [0, 1]; `seed` drives the Gumbel noise.
    #[napi(ts_return_type = "Promise<TokenizerStepMetrics>")]
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
    ) -> AsyncTask<Job<beit_core::TokenizerStepMetrics, TokenizerStepMetrics>> {
        let model = self.inner.clone();
        job(
            move || {
                let batch = ImageBatch { pixels: &pixels, height: height as usize, width: width as usize };
                lock(&model)?.train_step(&batch, temperature, kl_weight, lr, seed as u64)
            },
            |m| {
                Ok(TokenizerStepMetrics {
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
            move || lock(&model)?.encode(&ImageBatch { pixels: &pixels, height: height as usize, width: width as usize }),
            |ids| Ok(Int32Array::new(ids)),
        )
    }

    /// Images [B, C, gridHeight*d, gridWidth*d] in [0, 1] from ids [B, gridHeight, gridWidth].
    #[napi(ts_return_type = "Promise<Float32Array>")]
    pub fn decode(&self, ids: Int32Array, grid_height: u32, grid_width: u32) -> AsyncTask<Job<Vec<f32>, Float32Array>> {
        let model = self.inner.clone();
        job(move || lock(&model)?.decode(&ids, grid_height as usize, grid_width as usize), |images| Ok(Float32Array::new(images)))
    }
}

#[napi(object)]
pub struct TokenizerStepMetrics {
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

