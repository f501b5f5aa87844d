//! Sums over rows (parameter gradients) and sums of squares (gradient norms).
//!

use candle_core::{backend::BackendStorage, bail, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

use super::*;
use crate::float::Float;

struct SumRows;

/// Rows per parallel task of a column sum: fixed, so the partial sums are added in the same
/// order on any number of threads.
pub(crate) fn column_chunk_rows(n: usize) -> usize {
    rows_per_task(n).max(64)
}

/// Per-column sums over the rows of x [rows, n].
fn column_sums<T: Float>(x: &[T], n: usize) -> Vec<T> {
    let partials: Vec<Vec<T>> = x
        .par_chunks(n * column_chunk_rows(n))
        .map(|xs| {
            let mut acc = vec![T::ZERO; n];
            for row in xs.chunks(n) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
            acc
        })
        .collect();
    let mut total = vec![T::ZERO; n];
    add_partials(&mut total, partials);
    total
}

impl CustomOp1 for SumRows {
    fn name(&self) -> &'static str {
        "sum-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = *l.dims().last().unwrap_or(&1);
        let out = dispatch_float!(self.name(), s, |v| into_storage(column_sums(contiguous(v, l, self.name())?, n)));
        Ok((out, Shape::from(n)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        fn typed<T: crate::cuda::Element>(s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            use crate::cuda::*;
            let n = *l.dims().last().unwrap_or(&1);
            let rows = l.shape().elem_count() / n;
            let dev = s.device();
            let x = input::<T>("sum-rows", s, l)?;
            let sums = zeros(dev, n)?;
            let (height, width, chunk) = (rows as i32, n as i32, ROWS_PER_CHUNK as i32);
            launch!(dev, &kernel::<T>("sum_rows"), per_column(rows, n), [&x, &sums, &height, &width, &chunk])?;
            Ok((storage(sums, dev), Shape::from(n)))
        }
        crate::cuda::with_element!(self.name(), s.dtype(), typed(s, l))
    }
}

/// Sum over every dimension but the last (no backward: used inside backward passes). On CUDA
/// the sums are f32 whatever the input type.
pub fn sum_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&SumRows)
}

/// The sum of f(x) in f64 over fixed chunks added in order, so the result does not depend on
/// how the threads split the work.
fn chunked_sum<T: Copy + Sync>(x: &[T], f: impl Fn(T) -> f64 + Sync) -> f64 {
    let parts: Vec<f64> = x.par_chunks(65536).map(|c| c.iter().map(|&v| f(v)).sum::<f64>()).collect();
    parts.iter().sum()
}

/// Sum of squares of all elements of all `tensors` (for gradient norms): accumulated in f64 on
/// the CPU; on a GPU, summed there in f32 and read back once for all of them (each read is a
/// synchronisation, and a model has hundreds of parameter tensors).
pub fn sum_of_squares(tensors: &[&Tensor]) -> candle_core::Result<f64> {
    let mut total = 0.0f64;
    let mut on_device: Option<Tensor> = None;
    for x in tensors {
        if !x.device().is_cpu() {
            let squares = sum_all_by_rows(&x.to_dtype(DType::F32)?.sqr()?)?;
            on_device = Some(match on_device {
                Some(sum) => (sum + squares)?,
                None => squares,
            });
            continue;
        }
        let x = x.flatten_all()?;
        total += match x.dtype() {
            DType::F32 => chunked_sum(&x.to_vec1::<f32>()?, |v| (v as f64) * (v as f64)),
            DType::F64 => chunked_sum(&x.to_vec1::<f64>()?, |v| v * v),
            other => bail!("sum-of-squares: unsupported dtype {other:?}"),
        };
    }
    if let Some(sum) = on_device {
        total += sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(total)
}

/// The sum of all of `x`, as row sums then their sum. candle's CUDA sum runs one block per
/// output value, so a plain `sum_all` of a model's flat gradient buffer (86M values for BEiT-B)
/// ran on a single block: 4.4 ms of an H200 step, as long as all the step's LayerNorms.
fn sum_all_by_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    const ROW: usize = 4096;
    let x = x.flatten_all()?;
    let n = x.elem_count();
    let rows = n / ROW;
    let tail = x.narrow(0, rows * ROW, n - rows * ROW)?.sum_all()?;
    if rows == 0 {
        return Ok(tail);
    }
    x.narrow(0, 0, rows * ROW)?.reshape((rows, ROW))?.sum(1)?.sum_all()? + tail
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    #[test]
    fn sums_by_rows_equal_plain_sums() {
        // Shorter than a row, whole rows, whole rows and a tail.
        for n in [0usize, 5, 4096, 3 * 4096, 3 * 4096 + 17] {
            let x = Tensor::arange(0u32, n as u32, &Device::Cpu).unwrap().to_dtype(candle_core::DType::F64).unwrap();
            let by_rows = super::sum_all_by_rows(&x).unwrap().to_scalar::<f64>().unwrap();
            assert_eq!(by_rows, (n * n.saturating_sub(1) / 2) as f64, "n = {n}");
        }
    }
}
