//! LayerNorm over the last dimension: y = (x - mean) / sqrt(var + eps) * gamma + beta.
//!
//! LayerNorm over the last dimension: y = (x - mean) / sqrt(var + eps) * gamma + beta

use candle_core::{backend::BackendStorage, bail, CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

use super::*;
use crate::float::Float;

struct LayerNorm {
    eps: f64,
}

/// The normalised width: the last dimension of x, which weight and bias must match.
fn affine_width(x: &Layout, weight: &Layout, bias: &Layout) -> candle_core::Result<usize> {
    let d = *x.dims().last().unwrap_or(&1);
    if weight.shape().elem_count() != d || bias.shape().elem_count() != d {
        bail!("layer-norm: weight and bias must have {d} elements");
    }
    Ok(d)
}

/// Mean and 1/sqrt(variance + eps) of one row (two passes, for accuracy).
fn mean_rstd<T: Float>(row: &[T], inv_d: T, eps: T) -> (T, T) {
    let mut mean = T::ZERO;
    for &v in row {
        mean += v;
    }
    mean = mean * inv_d;
    let mut var = T::ZERO;
    for &v in row {
        var += (v - mean) * (v - mean);
    }
    (mean, T::ONE / (var * inv_d + eps).sqrt())
}

fn layer_norm_fwd<T: Float>(x: &[T], gamma: &[T], beta: &[T], d: usize, eps: f64) -> Vec<T> {
    let mut y = vec![T::ZERO; x.len()];
    let eps = T::from_f64(eps);
    let inv_d = T::from_f64(1.0 / d as f64);
    y.par_chunks_mut(d * rows_per_task(d)).zip(x.par_chunks(d * rows_per_task(d))).for_each(|(ys, xs)| {
        for (yr, xr) in ys.chunks_mut(d).zip(xs.chunks(d)) {
            let (mean, rstd) = mean_rstd(xr, inv_d, eps);
            for i in 0..d {
                yr[i] = (xr[i] - mean) * rstd * gamma[i] + beta[i];
            }
        }
    });
    y
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = affine_width(l1, l2, l3)?;
        let out = dispatch_float!(self.name(), s1, |v| {
            let x = contiguous(v, l1, self.name())?;
            let g = same_dtype_slices(self.name(), s2, l2)?;
            let b = same_dtype_slices(self.name(), s3, l3)?;
            into_storage(layer_norm_fwd(x, g, b, d, self.eps))
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
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        fn typed<T: crate::cuda::Element>(
            op: &LayerNorm,
            inputs: [(&CudaStorage, &Layout); 3],
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            use crate::cuda::*;
            let [(s1, l1), (s2, l2), (s3, l3)] = inputs;
            let d = affine_width(l1, l2, l3)?;
            let rows = l1.shape().elem_count() / d;
            let dev = s1.device();
            let name = op.name();
            let (x, gamma, beta) = (input::<T>(name, s1, l1)?, input::<T>(name, s2, l2)?, input::<T>(name, s3, l3)?);
            let y = output::<T>(dev, rows * d)?;
            let (width, eps) = (d as i32, op.eps as f32);
            launch!(dev, &kernel::<T>("layer_norm_fwd"), per_row(rows, d), [&x, &gamma, &beta, &y, &width, &eps])?;
            Ok((storage(y, dev), l1.shape().clone()))
        }
        crate::cuda::with_element!(self.name(), s1.dtype(), typed(self, [(s1, l1), (s2, l2), (s3, l3)]))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = gamma.elem_count();
        let rows = x.elem_count() / d;
        let packed = x.apply_op3_no_bwd(gamma, &grad.contiguous()?, &LayerNormBackward { eps: self.eps })?;
        // The packed gradients are f32 on CUDA whatever the input type (see LayerNormBackward).
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?.to_dtype(x.dtype())?;
        let dgamma = packed.narrow(0, rows, 1)?.reshape(gamma.shape())?.to_dtype(gamma.dtype())?;
        let dbeta = packed.narrow(0, rows + 1, 1)?.reshape(gamma.shape())?.to_dtype(gamma.dtype())?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// Backward of [`LayerNorm`]: returns [rows + 2, d] = dx rows, then dgamma, then dbeta. On
/// CUDA it is f32 for bf16 inputs too: the parameter rows are accumulated atomically in f32.
struct LayerNormBackward {
    eps: f64,
}

fn layer_norm_bwd<T: Float>(x: &[T], gamma: &[T], g: &[T], d: usize, eps: f64) -> Vec<T> {
    let rows = x.len() / d;
    let mut out = vec![T::ZERO; (rows + 2) * d];
    let (dx, dparams) = out.split_at_mut(rows * d);
    let eps = T::from_f64(eps);
    let inv_d = T::from_f64(1.0 / d as f64);
    let chunk = d * rows_per_task(d);
    // Each task returns its partial dgamma/dbeta; they are summed afterwards.
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .zip(g.par_chunks(chunk))
        .map(|((dxs, xs), gs)| {
            let mut acc = vec![T::ZERO; 2 * d];
            let mut xhat = vec![T::ZERO; d];
            for ((dxr, xr), gr) in dxs.chunks_mut(d).zip(xs.chunks(d)).zip(gs.chunks(d)) {
                let (mean, rstd) = mean_rstd(xr, inv_d, eps);
                let mut mean_gh = T::ZERO;
                let mut mean_gh_xhat = T::ZERO;
                for i in 0..d {
                    xhat[i] = (xr[i] - mean) * rstd;
                    let gh = gr[i] * gamma[i];
                    mean_gh += gh;
                    mean_gh_xhat += gh * xhat[i];
                    acc[i] += gr[i] * xhat[i];
                    acc[d + i] += gr[i];
                }
                mean_gh = mean_gh * inv_d;
                mean_gh_xhat = mean_gh_xhat * inv_d;
                for i in 0..d {
                    dxr[i] = rstd * (gr[i] * gamma[i] - mean_gh - xhat[i] * mean_gh_xhat);
                }
            }
            acc
        })
        .collect();
    add_partials(dparams, partials);
    out
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = l2.shape().elem_count();
        let rows = l1.shape().elem_count() / d;
        let out = dispatch_float!(self.name(), s1, |v| {
            let x = contiguous(v, l1, self.name())?;
            let gamma = same_dtype_slices(self.name(), s2, l2)?;
            let g = same_dtype_slices(self.name(), s3, l3)?;
            into_storage(layer_norm_bwd(x, gamma, g, d, self.eps))
        });
        Ok((out, Shape::from((rows + 2, d))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        fn typed<T: crate::cuda::Element>(
            op: &LayerNormBackward,
            inputs: [(&CudaStorage, &Layout); 3],
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            use crate::cuda::*;
            let [(s1, l1), (s2, l2), (s3, l3)] = inputs;
            let d = l2.shape().elem_count();
            let rows = l1.shape().elem_count() / d;
            let dev = s1.device();
            let name = op.name();
            let (x, gamma, g) = (input::<T>(name, s1, l1)?, input::<T>(name, s2, l2)?, input::<T>(name, s3, l3)?);
            // dx rows, then dgamma and dbeta, which the second kernel accumulates from zero.
            let packed = zeros(dev, (rows + 2) * d)?;
            let stats = output::<f32>(dev, 2 * rows)?;
            let (width, height, chunk, eps) = (d as i32, rows as i32, ROWS_PER_CHUNK as i32, op.eps as f32);
            launch!(
                dev,
                &kernel::<T>("layer_norm_bwd_rows"),
                per_row(rows, d),
                [&x, &gamma, &g, &packed, &stats, &width, &eps]
            )?;
            launch!(
                dev,
                &kernel::<T>("layer_norm_bwd_params"),
                per_column(rows, d),
                [&x, &g, &stats, &packed, &height, &width, &chunk]
            )?;
            Ok((storage(packed, dev), Shape::from((rows + 2, d))))
        }
        crate::cuda::with_element!(self.name(), s1.dtype(), typed(self, [(s1, l1), (s2, l2), (s3, l3)]))
    }
}

/// LayerNorm over the last dimension with affine weight and bias, differentiable in all three.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if let Some(y) = bf16_on_cpu_via_f32(&[x, gamma, beta], |t| layer_norm(&t[0], &t[1], &t[2], eps))? {
        return Ok(y);
    }
    x.contiguous()?.apply_op3(gamma, beta, LayerNorm { eps })
}
