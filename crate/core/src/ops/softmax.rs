//! Softmax over the last dimension of scale * x + bias, the attention-score form.
//!
//! Softmax over the last dimension of scale * x + bias, the attention-score form: the scale
//! and the relative-position bias are applied inside the kernel instead of as separate passes
//! over the [B, heads, T, T] scores.

use candle_core::{backend::BackendStorage, bail, CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

use super::*;
use crate::float::Float;

struct ScaledSoftmax {
    scale: f64,
}

const SCALED_SOFTMAX: &str = "scaled-softmax";

/// `bias` (if any) holds `bias.len() / d` rows, repeated over the rows of x.
fn softmax_fwd<T: Float>(x: &[T], bias: Option<&[T]>, d: usize, scale: T) -> Vec<T> {
    let mut y = vec![T::ZERO; x.len()];
    let rows_per_chunk = rows_per_task(d);
    let bias_rows = bias.map_or(1, |b| b.len() / d);
    y.par_chunks_mut(d * rows_per_chunk).zip(x.par_chunks(d * rows_per_chunk)).enumerate().for_each(
        |(chunk, (ys, xs))| {
            for (r, (yr, xr)) in ys.chunks_mut(d).zip(xs.chunks(d)).enumerate() {
                let b = (chunk * rows_per_chunk + r) % bias_rows;
                let br = bias.map(|bias| &bias[b * d..(b + 1) * d]);
                for (i, (o, &v)) in yr.iter_mut().zip(xr).enumerate() {
                    *o = v * scale + br.map_or(T::ZERO, |br| br[i]);
                }
                let mut max = yr[0];
                for &v in yr.iter() {
                    if v > max {
                        max = v;
                    }
                }
                let mut sum = T::ZERO;
                for o in yr.iter_mut() {
                    *o = (*o - max).exp();
                    sum += *o;
                }
                let inv = T::ONE / sum;
                for o in yr.iter_mut() {
                    *o = *o * inv;
                }
            }
        },
    );
    y
}

impl ScaledSoftmax {
    fn cpu(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = *xl.dims().last().unwrap_or(&1);
        let out = dispatch_float!(SCALED_SOFTMAX, x, |v| {
            let bias = match bias {
                Some((s, l)) => Some(same_dtype_slices(SCALED_SOFTMAX, s, l)?),
                None => None,
            };
            into_storage(softmax_fwd(contiguous(v, xl, SCALED_SOFTMAX)?, bias, d, Float::from_f64(self.scale)))
        });
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        bias: Option<(&CudaStorage, &Layout)>,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let d = *xl.dims().last().unwrap_or(&1);
        let bias_rows = bias.map_or(0, |(_, l)| l.shape().elem_count() / d.max(1));
        // Without a bias the kernel never reads its bias argument; x stands in for it.
        let bias = bias.unwrap_or((x, xl));
        crate::cuda::same_shape(
            SCALED_SOFTMAX,
            "softmax_fwd",
            &[(x, xl), bias],
            crate::cuda::Walk::Rows(d),
            &[crate::cuda::Scalar::I32(bias_rows as i32), crate::cuda::Scalar::F32(self.scale as f32)],
        )
    }

    /// dz = y * (g - sum(g * y)) per row; dx = scale * dz, dbias = dz summed over the repeats.
    fn backward(&self, y: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward)
    }

    fn scaled(&self, dz: &Tensor) -> candle_core::Result<Tensor> {
        if self.scale == 1.0 {
            Ok(dz.clone())
        } else {
            dz.affine(self.scale, 0.0)
        }
    }
}

impl CustomOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        SCALED_SOFTMAX
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu(s, l, None)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        self.cuda(s, l, None)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.scaled(&self.backward(y, grad)?)?))
    }
}

impl CustomOp2 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        SCALED_SOFTMAX
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu(s1, l1, Some((s2, l2)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.cuda(s1, l1, Some((s2, l2)))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        bias: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dz = self.backward(y, grad)?;
        let repeats = dz.elem_count() / bias.elem_count();
        // sum_rows accumulates in f32 on CUDA for bf16 too (the batch is summed here).
        let dbias = sum_rows(&dz.reshape((repeats, bias.elem_count()))?)?;
        let dbias = dbias.to_dtype(bias.dtype())?.reshape(bias.shape())?;
        Ok((Some(self.scaled(&dz)?), Some(dbias)))
    }
}

/// dx = y * (g - sum(g * y)) per row.
struct SoftmaxBackward;

fn softmax_bwd<T: Float>(y: &[T], g: &[T], d: usize) -> Vec<T> {
    let mut dx = vec![T::ZERO; y.len()];
    let chunk = d * rows_per_task(d);
    dx.par_chunks_mut(chunk).zip(y.par_chunks(chunk)).zip(g.par_chunks(chunk)).for_each(|((dxs, ys), gs)| {
        for ((dxr, yr), gr) in dxs.chunks_mut(d).zip(ys.chunks(d)).zip(gs.chunks(d)) {
            let mut dot = T::ZERO;
            for i in 0..d {
                dot += yr[i] * gr[i];
            }
            for i in 0..d {
                dxr[i] = yr[i] * (gr[i] - dot);
            }
        }
    });
    dx
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = *l1.dims().last().unwrap_or(&1);
        let out = dispatch_float!(self.name(), s1, |v| {
            let y = contiguous(v, l1, self.name())?;
            let g = same_dtype_slices(self.name(), s2, l2)?;
            into_storage(softmax_bwd(y, g, d))
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
        let d = *l1.dims().last().unwrap_or(&1);
        crate::cuda::same_shape(self.name(), "softmax_bwd", &[(s1, l1), (s2, l2)], crate::cuda::Walk::Rows(d), &[])
    }
}

/// Softmax over the last dimension, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    scaled_softmax(x, None, 1.0)
}

/// softmax(scale * x + bias) over the last dimension, differentiable in x and bias. `bias`
/// has x's trailing dimensions (e.g. [heads, T, T] for scores [B, heads, T, T]) and is
/// repeated over the leading ones.
pub fn scaled_softmax(x: &Tensor, bias: Option<&Tensor>, scale: f64) -> candle_core::Result<Tensor> {
    let inputs: Vec<&Tensor> = std::iter::once(x).chain(bias).collect();
    if let Some(y) = bf16_on_cpu_via_f32(&inputs, |t| scaled_softmax(&t[0], t.get(1), scale))? {
        return Ok(y);
    }
    let op = ScaledSoftmax { scale };
    let x = x.contiguous()?;
    match bias {
        None => x.apply_op1(op),
        Some(bias) => {
            let (dims, bias_dims) = (x.dims(), bias.dims());
            if bias_dims.is_empty()
                || bias_dims.len() > dims.len()
                || dims[dims.len() - bias_dims.len()..] != *bias_dims
            {
                bail!("scaled-softmax: bias of shape {bias_dims:?} must match the trailing dimensions of x {dims:?}");
            }
            x.apply_op2(&bias.contiguous()?, op)
        }
    }
}
