//! Differentiable fused ops for training on candle.
//!
//! candle's own fused softmax / layer-norm ops have no backward pass (gradients are cut
//! silently), so every op the model trains through is defined here as a `CustomOp` with a
//! `bwd`. Each backward is itself a fused no-backward op. CPU kernels are generic over f32/f64
//! (f64 is what the finite-difference gradient checks use).

mod batch_norm;
mod cross_entropy;
mod gelu;
mod layer_norm;
mod matmul;
mod replicas;
mod resample;
mod resized_cross_entropy;
mod row_lookup;
mod row_vector;
mod softmax;
mod sums;

pub use batch_norm::{batch_norm_train, BatchStatistics};
pub use cross_entropy::cross_entropy_rows;
pub use gelu::gelu_erf;
pub use layer_norm::layer_norm;
pub use matmul::matmul;
pub use replicas::{sum_over_replicas, sum_values_over_replicas};
pub use resample::{
    adaptive_average_weights, add_resized, bilinear_weights, concat_resized, interpolation_taps, resample,
    resample_by_matmuls, Resampling,
};
pub use resized_cross_entropy::{resized_argmax, resized_cross_entropy};
pub use row_lookup::RowLookup;
pub(crate) use row_vector::with_row_vector;
pub use row_vector::{add_bias, scale_columns};
pub use softmax::{scaled_softmax, softmax_last_dim};
pub(crate) use sums::column_chunk_rows;
pub use sums::{sum_of_squares, sum_rows};

use candle_core::{backend::BackendStorage, bail, CpuStorage, DType, Layout, Tensor};

use crate::float::Float;

/// The contiguous slice a storage/layout pair describes.
pub(crate) fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// The contiguous u32 slice (targets, labels) a storage/layout pair describes.
pub(crate) fn u32_slice<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    match s {
        CpuStorage::U32(v) => contiguous(v, l, op),
        other => bail!("{op}: class ids must be u32, got {:?}", other.dtype()),
    }
}

/// Rows of `n` elements processed in parallel, in chunks large enough to amortise rayon.
pub(crate) fn rows_per_task(n: usize) -> usize {
    (16384 / n.max(1)).max(1)
}

/// Dispatches a CPU kernel over the float dtypes the ops support.
macro_rules! dispatch_float {
    ($op:expr, $storage:expr, |$v:ident| $body:expr) => {
        match $storage {
            CpuStorage::F32($v) => $body,
            CpuStorage::F64($v) => $body,
            other => bail!("{}: unsupported dtype {:?}, expected f32 or f64", $op, other.dtype()),
        }
    };
}
pub(crate) use dispatch_float;

pub(crate) fn same_dtype_slices<'a, T: 'static>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [T]> {
    let any: &dyn std::any::Any = match storage {
        CpuStorage::F32(v) => v,
        CpuStorage::F64(v) => v,
        other => bail!("{op}: unsupported dtype {:?}", other.dtype()),
    };
    match any.downcast_ref::<Vec<T>>() {
        Some(v) => contiguous(v, layout, op),
        None => bail!("{op}: all inputs must share one dtype, got {:?}", storage.dtype()),
    }
}

pub(crate) fn into_storage<T: Float>(v: Vec<T>) -> CpuStorage {
    let mut any: Box<dyn std::any::Any> = Box::new(v);
    if let Some(v) = any.downcast_mut::<Vec<f32>>() {
        return CpuStorage::F32(std::mem::take(v));
    }
    match any.downcast::<Vec<f64>>() {
        Ok(v) => CpuStorage::F64(*v),
        Err(_) => unreachable!("Float is only implemented for f32 and f64"),
    }
}

/// The CPU kernels compute in f32 or f64. A bf16 op on the CPU (mixed precision off the GPU,
/// as in the tests) runs in f32, what the CUDA bf16 kernels compute in, on its inputs cast up,
/// and its output is cast back to bf16. The casts are differentiable. None: not that case.
pub(crate) fn bf16_on_cpu_via_f32(
    inputs: &[&Tensor],
    op: impl FnOnce(&[Tensor]) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    let first = inputs[0];
    if first.dtype() != DType::BF16 || !first.device().is_cpu() {
        return Ok(None);
    }
    let up = inputs.iter().map(|t| t.to_dtype(DType::F32)).collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Some(op(&up)?.to_dtype(DType::BF16)?))
}

/// Adds per-task partial sums into `total`, in task order (so results are deterministic).
pub(crate) fn add_partials<T: Float>(total: &mut [T], partials: Vec<Vec<T>>) {
    for partial in partials {
        for (t, v) in total.iter_mut().zip(partial) {
            *t += v;
        }
    }
}
