//! A row vector over the last dimension: bias add and column scaling.
//!
//! A row vector over the last dimension: y[.., n] = x[.., n] + b[n] (the bias of every linear
//! layer) or x[.., n] * b[n] (LayerScale; the mask token's blend). candle's broadcast ops and
//! their backward reductions are generic strided loops, and on bf16 that reduction would sum the
//! ~50k rows of a batch in bf16; here the vector's gradient is a sum_rows, f32 on CUDA.

use candle_core::{backend::BackendStorage, bail, CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

use super::*;
use crate::float::Float;

#[derive(Clone, Copy)]
enum RowVector {
    AddBias,
    ScaleColumns,
}

impl RowVector {
    /// The CUDA kernel's base name (`kernels.cu`).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn kernel(self) -> &'static str {
        match self {
            RowVector::AddBias => "add_bias",
            RowVector::ScaleColumns => "scale_columns",
        }
    }

    fn check_width(self, x: &Layout, v: &Layout) -> candle_core::Result<usize> {
        let n = *x.dims().last().unwrap_or(&1);
        if v.shape().elem_count() != n {
            bail!("{}: the vector has {} elements, rows have {n}", self.name(), v.shape().elem_count());
        }
        Ok(n)
    }
}

impl CustomOp2 for RowVector {
    fn name(&self) -> &'static str {
        match self {
            RowVector::AddBias => "add-bias",
            RowVector::ScaleColumns => "scale-columns",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.check_width(l1, l2)?;
        let out = dispatch_float!(self.name(), s1, |v| {
            let x = contiguous(v, l1, self.name())?;
            let b = same_dtype_slices(self.name(), s2, l2)?;
            into_storage(match self {
                RowVector::AddBias => with_row_vector(x, b, |x, b| x + b),
                RowVector::ScaleColumns => with_row_vector(x, b, |x, b| x * b),
            })
        });
        Ok((out, l1.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = self.check_width(l1, l2)?;
        // The kernel's last argument is the row width.
        crate::cuda::same_shape(
            self.name(),
            self.kernel(),
            &[(s1, l1), (s2, l2)],
            crate::cuda::Walk::Elements,
            &[crate::cuda::Scalar::I32(n as i32)],
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dv) = match self {
            RowVector::AddBias => (grad.clone(), sum_rows(grad)?),
            RowVector::ScaleColumns => (scale_columns(grad, v)?, sum_rows(&grad.mul(x)?)?),
        };
        Ok((Some(dx), Some(dv.to_dtype(v.dtype())?.reshape(v.shape())?)))
    }
}

/// y[.., i] = op(x[.., i], b[i]) over rows of b's width, in parallel.
pub(crate) fn with_row_vector<T: Float>(x: &[T], b: &[T], op: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let n = b.len();
    let mut y = vec![T::ZERO; x.len()];
    let chunk = n * rows_per_task(n);
    y.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(ys, xs)| {
        for (yr, xr) in ys.chunks_mut(n).zip(xs.chunks(n)) {
            for i in 0..n {
                yr[i] = op(xr[i], b[i]);
            }
        }
    });
    y
}

fn row_vector(x: &Tensor, v: &Tensor, op: RowVector) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&v.contiguous()?, op)
}

/// `x + bias` over the last dimension, differentiable in both.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    if let Some(y) = bf16_on_cpu_via_f32(&[x, bias], |t| add_bias(&t[0], &t[1]))? {
        return Ok(y);
    }
    row_vector(x, bias, RowVector::AddBias)
}

/// `x * scale` with `scale` over the last dimension, differentiable in both.
pub fn scale_columns(x: &Tensor, scale: &Tensor) -> candle_core::Result<Tensor> {
    if let Some(y) = bf16_on_cpu_via_f32(&[x, scale], |t| scale_columns(&t[0], &t[1]))? {
        return Ok(y);
    }
    row_vector(x, scale, RowVector::ScaleColumns)
}
