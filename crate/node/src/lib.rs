//! N-API bindings: a small, typed surface over beit-core. Heavy calls return Promises and run
//! on libuv worker threads; Rust errors and panics become JS `Error`s, never aborts.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use beit_core::AdamWConfig;
use napi::bindgen_prelude::*;
use napi_derive::napi;

// Public so that every #[napi] item counts as used in test builds too (they are registered
// with Node at load, which the compiler does not see).
pub mod classify;
pub mod distributed;
pub mod images;
pub mod mim;
pub mod segment;
pub mod shared;
pub mod tokenizer;

// Training allocates and frees many large activation buffers each step; glibc malloc hands
// those back to the kernel and page-faults them in again every time. mimalloc reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (index 15 in both v2's and v3's mimalloc.h;
/// libmimalloc-sys builds v3 by default): -1 keeps freed pages for reuse instead of returning
/// them to the OS after a delay (v2: 10 ms), which made the kernel zero the same activation
/// memory again every step (17% of a CPU training step). RSS stays at its peak.
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

pub(crate) fn image_size_pair(size: Option<Vec<u32>>) -> beit_core::Result<Option<[usize; 2]>> {
    size.map(|s| size_pair("imageSize", &s)).transpose()
}

/// A `[height, width]` from JS, or an error naming `what`.
pub(crate) fn size_pair(what: &str, v: &[u32]) -> beit_core::Result<[usize; 2]> {
    match v {
        &[h, w] => Ok([h as usize, w as usize]),
        other => Err(beit_core::Error::Input(format!("{what}: expected [height, width], got {other:?}"))),
    }
}

/// AdamW settings; a missing field takes the model kind's default.
#[napi(object)]
#[derive(Default)]
pub struct AdamWOptions {
    /// Default 0.9.
    pub beta1: Option<f64>,
    /// Default 0.999.
    pub beta2: Option<f64>,
    /// Default 1e-8.
    pub eps: Option<f64>,
    /// Decoupled weight decay; biases, norms, tokens and position tables are exempt. Default
    /// 0.05 (BEiT), 1e-4 for the tokenizer (DALL-E).
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clip; 0 disables. Default 3.0, 0 for the tokenizer.
    pub clip_grad_norm: Option<f64>,
}

impl AdamWOptions {
    /// `base` with these overrides, validated.
    pub(crate) fn over(&self, base: AdamWConfig) -> beit_core::Result<AdamWConfig> {
        let c = AdamWConfig {
            beta1: self.beta1.unwrap_or(base.beta1),
            beta2: self.beta2.unwrap_or(base.beta2),
            eps: self.eps.unwrap_or(base.eps),
            weight_decay: self.weight_decay.unwrap_or(base.weight_decay),
            clip_grad_norm: self.clip_grad_norm.unwrap_or(base.clip_grad_norm),
        };
        c.validate()?;
        Ok(c)
    }

    pub(crate) fn of(c: &AdamWConfig) -> Self {
        Self {
            beta1: Some(c.beta1),
            beta2: Some(c.beta2),
            eps: Some(c.eps),
            weight_decay: Some(c.weight_decay),
            clip_grad_norm: Some(c.clip_grad_norm),
        }
    }
}

/// AdamW with BEiT's defaults and these overrides.
pub(crate) fn optimizer(options: Option<AdamWOptions>) -> beit_core::Result<AdamWConfig> {
    options.unwrap_or_default().over(AdamWConfig::default())
}

/// A step's random draws (stochastic depth, Gumbel noise) for one batch.
#[napi(object)]
#[derive(Clone, Copy)]
pub struct StepDraws {
    /// Seeds the step's draws, so a step can be replayed.
    pub seed: u32,
    /// The batch's first sample in the step, when a step is split into batches whose
    /// gradients accumulate (draws are keyed by sample, so the halves of a batch draw what the
    /// whole batch draws). Default 0.
    pub first_sample: Option<u32>,
}

impl From<StepDraws> for beit_core::Draws {
    fn from(d: StepDraws) -> Self {
        Self { seed: d.seed as u64, first_sample: d.first_sample.unwrap_or(0) as usize }
    }
}

#[napi(object)]
pub struct UpdateMetrics {
    /// Global gradient norm (of the mean gradient) before clipping.
    pub grad_norm: f64,
    /// Seconds spent summing gradients across ranks (waiting for the slowest rank included);
    /// 0 for a model that is not distributed.
    pub all_reduce_seconds: f64,
}

/// The model presets as JSON, `{"beit": {name: config}, "tokenizer": {name: config}}`: the one
/// table behind the TypeScript API's PRESETS and DVAE_PRESETS.
#[napi]
pub fn presets_json() -> String {
    beit_core::presets::presets_json()
}

/// A safetensors file's metadata (beit's "format", "config", ...), read from its header alone.
#[napi(ts_return_type = "Promise<Record<string, string>>")]
pub fn checkpoint_metadata(path: String) -> AsyncTask<Job<HashMap<String, String>, HashMap<String, String>>> {
    job(move || beit_core::checkpoint::read_metadata(std::path::Path::new(&path)), Ok)
}

/// The backbone config (JSON, as `BeitConfig`) of a beit MIM or classifier checkpoint, read
/// from the file's header alone.
#[napi(ts_return_type = "Promise<string>")]
pub fn pretrained_backbone_config(path: String) -> AsyncTask<Job<String, String>> {
    job(move || Ok(beit_core::trainer::pretrained_backbone(std::path::Path::new(&path))?.1.to_json()), Ok)
}

/// NVIDIA GPUs this build can use: 0 in the CPU build, or where the driver reports none.
#[napi]
pub fn cuda_device_count() -> u32 {
    beit_core::device::cuda_device_count() as u32
}

/// How many times faster this CPU runs the engine's bf16 GEMMs than its f32 ones, measured once
/// per process (about 10 ms): `precision: 'bf16'` pays on the CPU where this is well above 1.
#[napi]
pub fn bf16_gemm_speedup() -> f64 {
    beit_core::engine::matmul_bf16::bf16_gemm_speedup()
}

/// A model's JS object and the native bytes it keeps alive (its f32 weights, gradients and two
/// AdamW moments), told to V8 when the object is made and taken back when it is collected: the
/// collector then weighs a dropped model by them. Without it a model's wrapper is a few bytes
/// of JS heap, and a loop that loaded models kept gigabytes alive until a collection came by
/// chance.
pub struct Reported<T> {
    value: T,
    bytes: i64,
}

/// The bytes a model of `parameters` holds: four f32 values a parameter.
pub(crate) fn held_bytes(parameters: usize) -> i64 {
    (parameters as i64).saturating_mul(16)
}

impl<T> Reported<T> {
    pub(crate) fn new(value: T, bytes: i64) -> Self {
        Reported { value, bytes }
    }

    /// The object, its bytes told to V8.
    pub(crate) fn told(self, env: &Env) -> T {
        // Advisory: a failure only leaves the collector without the hint.
        let _ = env.adjust_external_memory(self.bytes);
        self.value
    }
}

impl<T: ToNapiValue> ToNapiValue for Reported<T> {
    unsafe fn to_napi_value(env: napi::sys::napi_env, val: Self) -> Result<napi::sys::napi_value> {
        let value = val.told(&Env::from_raw(env));
        // SAFETY: `env` is the live environment napi passes to this conversion.
        unsafe { T::to_napi_value(env, value) }
    }
}

impl<T: TypeName> TypeName for Reported<T> {
    fn type_name() -> &'static str {
        T::type_name()
    }

    fn value_type() -> ValueType {
        T::value_type()
    }
}

/// The methods every model class has: one trainer shape (`beit_core::Trainer`) behind each,
/// in `inner: Arc<Shared<Trainer<Kind>>>`, with `held`, the bytes told to V8 (see [`Reported`]).
macro_rules! trainer_methods {
    ($class:ident, $trainer:ty) => {
        fn wrap(trainer: $trainer) -> Result<$crate::Reported<$class>> {
            let held = $crate::held_bytes(trainer.num_parameters());
            Ok($crate::Reported::new($class { inner: Shared::new(trainer), held }, held))
        }

        impl ObjectFinalize for $class {
            fn finalize(self, env: Env) -> Result<()> {
                env.adjust_external_memory(-self.held)?;
                Ok(())
            }
        }

        #[napi]
        impl $class {
            /// Moves the model (weights, optimizer state, EMA) to "cpu", "cuda" or "cuda:N".
            #[napi]
            pub fn to_device(&self, device: String) -> Result<()> {
                guarded(|| self.inner.now(|model| model.to_device(&beit_core::device::parse(&device)?)))
            }

            /// Where the model runs: "cpu" or "cuda:N".
            #[napi(getter)]
            pub fn device(&self) -> Result<String> {
                guarded(|| self.inner.now(|model| Ok(beit_core::device::name(&model.device()))))
            }

            /// Activation precision: "f32" or "bf16" (mixed precision: bf16 activations and
            /// matmuls, f32 weights, moments, reductions and losses). A tokenizer decodes in
            /// f32, and trains in bf16 only on the CPU engine (in f32 on a GPU).
            #[napi(getter)]
            pub fn precision(&self) -> Result<String> {
                guarded(|| self.inner.now(|model| Ok(model.precision().name().to_string())))
            }

            #[napi(setter)]
            pub fn set_precision(&self, precision: String) -> Result<()> {
                guarded(|| {
                    let precision = beit_core::config::Precision::parse(&precision)?;
                    self.inner.now(|model| model.set_precision(precision))
                })
            }

            /// The model's config (camelCase JSON).
            #[napi(getter)]
            pub fn config_json(&self) -> Result<String> {
                guarded(|| self.inner.now(|model| Ok(model.config_json())))
            }

            /// AdamW settings.
            #[napi(getter)]
            pub fn optimizer(&self) -> Result<$crate::AdamWOptions> {
                guarded(|| self.inner.now(|model| Ok($crate::AdamWOptions::of(model.optimizer_config()))))
            }

            #[napi(getter)]
            pub fn num_parameters(&self) -> Result<f64> {
                guarded(|| self.inner.now(|model| Ok(model.num_parameters() as f64)))
            }

            /// Optimizer updates taken so far.
            #[napi(getter)]
            pub fn optimizer_step(&self) -> Result<f64> {
                guarded(|| self.inner.now(|model| Ok(model.optimizer_step() as f64)))
            }

            /// Loss terms (masked patches, images) whose gradients `lossAndGrads` has added and
            /// `applyUpdate` has not yet applied.
            #[napi(getter)]
            pub fn pending_loss_terms(&self) -> Result<f64> {
                guarded(|| self.inner.now(|model| Ok(*model.gradients().count as f64)))
            }

            /// Clip, AdamW (and the EMA) from the gradients `lossAndGrads` added since the last
            /// update (their mean over the loss terms); empties them.
            #[napi(ts_return_type = "Promise<UpdateMetrics>")]
            pub fn apply_update(&self, lr: f64) -> AsyncTask<Job<beit_core::UpdateMetrics, $crate::UpdateMetrics>> {
                let turn = self.inner.turn();
                job(
                    move || turn.run(|model| model.apply_update(lr)),
                    |m| Ok($crate::UpdateMetrics { grad_norm: m.grad_norm, all_reduce_seconds: m.all_reduce_seconds }),
                )
            }

            /// Makes this model one replica of the data-parallel job `initDistributed` joined:
            /// rank 0's weights, EMA and optimizer state replace every rank's (the setups must
            /// match), and every later update averages the gradients of all ranks.
            #[napi(ts_return_type = "Promise<void>")]
            pub fn distribute(&self) -> AsyncTask<Job<(), ()>> {
                let turn = self.inner.turn();
                job(
                    move || {
                        let communicator = $crate::distributed::communicator()?;
                        turn.run(|model| model.distribute(communicator))
                    },
                    |()| Ok(()),
                )
            }

            /// The caller's training state (JSON), saved with and loaded from checkpoints.
            #[napi(getter)]
            pub fn train_state(&self) -> Result<Option<String>> {
                guarded(|| self.inner.now(|model| Ok(model.train_state.clone())))
            }

            #[napi(setter)]
            pub fn set_train_state(&self, state: Option<String>) -> Result<()> {
                guarded(|| {
                    self.inner.now(|model| {
                        model.train_state = state;
                        Ok(())
                    })
                })
            }

            /// Writes weights, optimizer state, EMA, config, options and training state atomically.
            #[napi(ts_return_type = "Promise<void>")]
            pub fn save(&self, path: String) -> AsyncTask<Job<(), ()>> {
                let turn = self.inner.turn();
                job(move || turn.run(|model| model.save(&std::path::PathBuf::from(path))), |()| Ok(()))
            }
        }
    };
}
pub(crate) use trainer_methods;
