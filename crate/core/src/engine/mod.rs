//! The CPU training engine: explicit forward and backward passes per layer, llm.c-style, over
//! buffers allocated once per batch size and reused every step, for the BEiT backbone
//! (`backbone`, `block`), its heads (`heads`: masked image modeling, classification) and the
//! dVAE tokenizer (`dvae`).
//!
//! Why not candle's autograd on the CPU: it allocates (and the kernel zeroes) every
//! activation and gradient anew each step, adds each gradient contribution into a fresh
//! zero tensor, computes gradients nobody needs (drop-path factors, masks), and its
//! elementwise ops are single-threaded baseline-x86 loops. Here every weight gradient is
//! added by GEMMs into its slot of a flat gradient buffer, the elementwise work is fused into a few
//! multi-threaded passes compiled for AVX-512 / AVX2 / baseline and chosen at run time, and
//! the attention reads q, k, v in place from the fused QKV output.
//!
//! The numbers are those of the candle models in `model` (the reference, and the GPU path):
//! same parameter tables (`arch`), same stochastic-depth draws, same AdamW arithmetic; the
//! tests compare the two step for step, and check every gradient by finite differences in f64.
//!
//! A model here is a backbone and a head over one [`Flat`] buffer of weights and gradients.
//! Its `loss_and_grads` *adds* the gradient of `loss_weight` x its mean loss into the gradient
//! buffer, so that batches accumulate until the runner's update zeroes it.

pub mod adamw;
pub mod backbone;
pub mod block;
pub mod conv;
pub mod direct;
pub mod dvae;
pub mod heads;
pub mod kernels;
pub mod linear;
pub mod matmul;
pub mod matmul_bf16;
pub mod simd;
pub mod winograd;

use rayon::prelude::*;

use crate::config::Precision;
use crate::error::{Error, Result};
use crate::params::{Layout, ParamTable};
pub use simd::Real;

/// A model's weights and gradient in flat buffers, in the layout of its parameter table.
pub struct Flat<T> {
    pub table: ParamTable,
    pub layout: Layout,
    pub params: Vec<T>,
    /// The sum of the gradients since the buffer was last zeroed; allocated by the first
    /// backward pass (a model that only evaluates never holds it).
    pub grads: Vec<T>,
}

impl<T: Real> Flat<T> {
    pub fn new(table: ParamTable, params: Vec<T>) -> Result<Self> {
        let layout = Layout::new(&table);
        if params.len() != layout.len {
            return Err(Error::Config(format!("engine: {} weights for a table of {}", params.len(), layout.len)));
        }
        Ok(Self { table, layout, params, grads: Vec::new() })
    }

    /// The gradient buffer, allocated zeroed by the first call.
    pub fn grads_mut(&mut self) -> &mut [T] {
        if self.grads.len() != self.layout.len {
            self.grads = vec![T::ZERO; self.layout.len];
        }
        &mut self.grads
    }

    /// Zeroes the gradient buffer (after an update).
    pub fn zero_grads(&mut self) {
        self.grads.par_chunks_mut(65536).for_each(|g| g.fill(T::ZERO));
    }
}

/// What the runner needs of an engine model.
pub trait EngineModel: Send {
    fn flat(&self) -> &Flat<f32>;
    fn flat_mut(&mut self) -> &mut Flat<f32>;
    /// Frees the activation buffers (rebuilt on the next call).
    fn release_buffers(&mut self);
    /// The precision of the GEMMs from the next pass on (a tokenizer's decode stays f32).
    fn set_precision(&mut self, precision: Precision);
}

/// Loss of one batch and what the metrics need.
#[derive(Debug, Clone, Copy)]
pub struct Loss {
    /// Mean over the rows the loss is taken on (masked patches, or images).
    pub loss: f64,
    /// Rows whose argmax is the target.
    pub hits: usize,
    pub rows: usize,
}

/// The loss, or the error of a non-finite one (checked before the backward pass, so nothing
/// is added to the gradient).
pub fn finite(loss: f64) -> Result<f64> {
    if loss.is_finite() {
        Ok(loss)
    } else {
        Err(Error::Numeric(format!("loss is {loss}: the update was skipped")))
    }
}

/// Runs `f` on a thread of rayon's global pool while the caller waits (at once when the caller
/// is one). A step's parallel loops then split work among the pool's threads directly, instead
/// of each loop waking the pool from outside and putting the calling thread to sleep until it
/// ends (about 1,350 futex calls in a classifier step called from a libuv thread).
///
/// `f` must not wait for a lock: a pool thread waiting in a join may run another queued job
/// meanwhile, and a job that blocked on a lock held further down its own stack would never
/// return. Callers take their model's lock first (the N-API jobs do) and call this inside it.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}

/// The first `n` values of `v`, grown to hold them. Never shrunk: a buffer that several passes
/// share at different sizes (a scratch buffer, the convolutions' columns) would otherwise be
/// zero-filled again each time it grows back. The values are whatever was there.
pub(crate) fn sized<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
}

/// A raw pointer that parallel tasks share to write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(pub *mut T);
// SAFETY: used only where each task writes a disjoint region (see the call sites).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}
