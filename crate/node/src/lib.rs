//! N-API bindings: a small, typed surface over beit-core. Heavy calls return Promises and run
//! on libuv worker threads; Rust errors and panics become JS `Error`s, never aborts.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard};

use beit_core::AdamWConfig;
use napi::bindgen_prelude::*;
use napi_derive::napi;

mod classify;
mod images;
mod mim;
mod tokenizer;

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

pub(crate) fn lock<T>(model: &Arc<Mutex<T>>) -> beit_core::Result<MutexGuard<'_, T>> {
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
    let cfg: AdamWConfig = beit_core::config::parse_json("optimizer config", json)?;
    cfg.validate()?;
    Ok(cfg)
}

/// NVIDIA GPUs this build can use: 0 in the CPU build, or where the driver reports none.
#[napi]
pub fn cuda_device_count() -> u32 {
    beit_core::device::cuda_device_count() as u32
}

/// The methods every model class has: one trainer shape (`beit_core::Trainer`) behind each,
/// in `inner: Arc<Mutex<Trainer<Kind>>>`.
macro_rules! trainer_methods {
    ($class:ident) => {
        #[napi]
        impl $class {
            /// Moves the model (weights, optimizer state, EMA) to "cpu", "cuda" or "cuda:N".
            #[napi]
            pub fn to_device(&self, device: String) -> Result<()> {
                guarded(|| lock(&self.inner)?.to_device(&beit_core::device::parse(&device)?))
            }

            /// Where the model runs: "cpu" or "cuda:N".
            #[napi(getter)]
            pub fn device(&self) -> Result<String> {
                guarded(|| Ok(beit_core::device::name(&lock(&self.inner)?.device())))
            }

            /// Activation precision: "f32" or "bf16" (mixed precision: bf16 activations and
            /// matmuls, f32 weights, moments, reductions and losses; the tokenizer encodes in
            /// it and trains and decodes in f32).
            #[napi(getter)]
            pub fn precision(&self) -> Result<String> {
                guarded(|| Ok(lock(&self.inner)?.precision().name().to_string()))
            }

            #[napi(setter)]
            pub fn set_precision(&self, precision: String) -> Result<()> {
                guarded(|| lock(&self.inner)?.set_precision(beit_core::device::Precision::parse(&precision)?))
            }

            /// The model's config (camelCase JSON).
            #[napi(getter)]
            pub fn config_json(&self) -> Result<String> {
                guarded(|| Ok(lock(&self.inner)?.config_json()))
            }

            /// The model kind's training options (JSON; null for the MIM model).
            #[napi(getter)]
            pub fn options_json(&self) -> Result<String> {
                guarded(|| Ok(lock(&self.inner)?.options_json()))
            }

            /// AdamW settings (JSON).
            #[napi(getter)]
            pub fn optimizer_json(&self) -> Result<String> {
                guarded(|| Ok(serde_json::to_string(lock(&self.inner)?.optimizer_config()).expect("serialisable")))
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

            /// Writes weights, optimizer state, EMA, config, options and training state atomically.
            #[napi(ts_return_type = "Promise<void>")]
            pub fn save(&self, path: String) -> AsyncTask<Job<(), ()>> {
                let model = self.inner.clone();
                job(move || lock(&model)?.save(&std::path::PathBuf::from(path)), |()| Ok(()))
            }
        }
    };
}
pub(crate) use trainer_methods;
