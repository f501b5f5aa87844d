//! Differentiable fused ops for training on candle.
//!
//! candle's own fused softmax / layer-norm ops have no backward pass (gradients are cut
//! silently), so every op the model trains through is defined here as a `CustomOp` with a
//! `bwd`. Each backward is itself a fused no-backward op. CPU kernels are generic over f32/f64
//! (f64 is what the finite-difference gradient checks use).

use candle_core::{
    backend::BackendStorage, bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor,
};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

/// Float element types the CPU kernels run on.
pub trait Float:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn erf(self) -> Self;
}

macro_rules! impl_float {
    ($t:ty, $erf:path) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn erf(self) -> Self {
                $erf(self)
            }
        }
    };
}
impl_float!(f32, candle_core::cpu::erf::erf_f32);
impl_float!(f64, candle_core::cpu::erf::erf_f64);

/// The contiguous slice a storage/layout pair describes.
pub(crate) fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// Rows of `n` elements processed in parallel, in chunks large enough to amortise rayon.
fn rows_per_task(n: usize) -> usize {
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

// ---------------------------------------------------------------------------------------------
// LayerNorm over the last dimension: y = (x - mean) / sqrt(var + eps) * gamma + beta

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

/// Adds per-task partial sums into `total`, in task order (so results are deterministic).
fn add_partials<T: Float>(total: &mut [T], partials: Vec<Vec<T>>) {
    for partial in partials {
        for (t, v) in total.iter_mut().zip(partial) {
            *t += v;
        }
    }
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

// ---------------------------------------------------------------------------------------------
// Softmax over the last dimension of scale * x + bias, the attention-score form: the scale
// and the relative-position bias are applied inside the kernel instead of as separate passes
// over the [B, heads, T, T] scores.

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

// ---------------------------------------------------------------------------------------------
// GELU, exact (erf) form: x * Phi(x).

struct Gelu;

const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

fn map_parallel<T: Float>(x: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    let mut y = vec![T::ZERO; x.len()];
    y.par_chunks_mut(16384).zip(x.par_chunks(16384)).for_each(|(ys, xs)| {
        for (o, &v) in ys.iter_mut().zip(xs) {
            *o = f(v);
        }
    });
    y
}

fn gelu<T: Float>(v: T) -> T {
    T::from_f64(0.5) * v * (T::ONE + (v * T::from_f64(FRAC_1_SQRT_2)).erf())
}

fn gelu_grad<T: Float>(v: T) -> T {
    let cdf = T::from_f64(0.5) * (T::ONE + (v * T::from_f64(FRAC_1_SQRT_2)).erf());
    let pdf = T::from_f64(FRAC_1_SQRT_2PI) * (T::from_f64(-0.5) * v * v).exp();
    cdf + v * pdf
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = dispatch_float!(self.name(), s, |v| into_storage(map_parallel(contiguous(v, l, self.name())?, gelu)));
        Ok((out, l.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        crate::cuda::same_shape(self.name(), "gelu_fwd", &[(s, l)], crate::cuda::Walk::Elements, &[])
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)?))
    }
}

struct GeluBackward;

fn gelu_bwd<T: Float>(x: &[T], g: &[T]) -> Vec<T> {
    let mut dx = vec![T::ZERO; x.len()];
    dx.par_chunks_mut(16384).zip(x.par_chunks(16384)).zip(g.par_chunks(16384)).for_each(|((ds, xs), gs)| {
        for ((d, &xv), &gv) in ds.iter_mut().zip(xs).zip(gs) {
            *d = gelu_grad(xv) * gv;
        }
    });
    dx
}

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "gelu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = dispatch_float!(self.name(), s1, |v| {
            let x = contiguous(v, l1, self.name())?;
            into_storage(gelu_bwd(x, same_dtype_slices(self.name(), s2, l2)?))
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
        crate::cuda::same_shape(self.name(), "gelu_bwd", &[(s1, l1), (s2, l2)], crate::cuda::Walk::Elements, &[])
    }
}

/// GELU with the exact erf formulation (as BEiT uses), differentiable.
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    if let Some(y) = bf16_on_cpu_via_f32(&[x], |t| gelu_erf(&t[0]))? {
        return Ok(y);
    }
    x.contiguous()?.apply_op1(Gelu)
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy per row: loss_i = logsumexp(z_i) - z_i[t_i]. Targets are u32 and get no gradient.

struct CrossEntropy;

fn targets_slice<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    match s {
        CpuStorage::U32(v) => contiguous(v, l, op),
        other => bail!("{op}: targets must be u32, got {:?}", other.dtype()),
    }
}

fn log_sum_exp<T: Float>(row: &[T]) -> T {
    let mut max = row[0];
    for &v in row {
        if v > max {
            max = v;
        }
    }
    let mut sum = T::ZERO;
    for &v in row {
        sum += (v - max).exp();
    }
    max + sum.ln()
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, v) = l1.shape().dims2()?;
        let targets = targets_slice(self.name(), s2, l2)?;
        if targets.len() != rows {
            bail!("cross-entropy: {} targets for {rows} rows", targets.len());
        }
        if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
            bail!("cross-entropy: target {bad} out of range for a vocabulary of {v}");
        }
        let out = dispatch_float!(self.name(), s1, |z| {
            let z = contiguous(z, l1, self.name())?;
            let losses: Vec<_> =
                z.par_chunks(v).zip(targets.par_iter()).map(|(row, &t)| log_sum_exp(row) - row[t as usize]).collect();
            into_storage(losses)
        });
        Ok((out, Shape::from(rows)))
    }
    #[cfg(feature = "cuda")]
    /// Targets are not range-checked on the device: the callers validate them on the host
    /// (batch and label tensors) before they are uploaded.
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        use crate::cuda::*;
        let (rows, v) = l1.shape().dims2()?;
        if l2.shape().elem_count() != rows {
            bail!("cross-entropy: {} targets for {rows} rows", l2.shape().elem_count());
        }
        let dev = s1.device();
        let (z, targets) = (input::<f32>(self.name(), s1, l1)?, u32_in(self.name(), s2, l2)?);
        let loss = output::<f32>(dev, rows)?;
        let width = v as i32;
        launch!(dev, "cross_entropy_fwd", per_row(rows, v), [&z, &targets, &loss, &width])?;
        Ok((storage(loss, dev), Shape::from(rows)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dlogits = logits.apply_op3_no_bwd(targets, &grad.contiguous()?, &CrossEntropyBackward)?;
        Ok((Some(dlogits), None))
    }
}

/// d loss_i / d z_i = (softmax(z_i) - onehot(t_i)) * g_i.
struct CrossEntropyBackward;

fn cross_entropy_bwd<T: Float>(z: &[T], targets: &[u32], g: &[T], v: usize) -> Vec<T> {
    let mut dz = vec![T::ZERO; z.len()];
    dz.par_chunks_mut(v).zip(z.par_chunks(v)).zip(targets.par_iter().zip(g.par_iter())).for_each(
        |((dr, zr), (&t, &gi))| {
            let lse = log_sum_exp(zr);
            for (d, &zv) in dr.iter_mut().zip(zr) {
                *d = (zv - lse).exp() * gi;
            }
            dr[t as usize] = dr[t as usize] - gi;
        },
    );
    dz
}

impl CustomOp3 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross-entropy-backward"
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
        let (_, v) = l1.shape().dims2()?;
        let targets = targets_slice(self.name(), s2, l2)?;
        let out = dispatch_float!(self.name(), s1, |z| {
            let z = contiguous(z, l1, self.name())?;
            into_storage(cross_entropy_bwd(z, targets, same_dtype_slices(self.name(), s3, l3)?, v))
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
        use crate::cuda::*;
        let (rows, v) = l1.shape().dims2()?;
        let dev = s1.device();
        let (z, targets, g) =
            (input::<f32>(self.name(), s1, l1)?, u32_in(self.name(), s2, l2)?, input::<f32>(self.name(), s3, l3)?);
        let dz = output::<f32>(dev, rows * v)?;
        let width = v as i32;
        launch!(dev, "cross_entropy_bwd", per_row(rows, v), [&z, &targets, &g, &dz, &width])?;
        Ok((storage(dz, dev), l1.shape().clone()))
    }
}

/// Per-row cross-entropy of `logits` [rows, vocab] against u32 `targets` [rows].
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    if targets.dtype() != DType::U32 {
        bail!("cross-entropy: targets must be u32, got {:?}", targets.dtype());
    }
    logits.contiguous()?.apply_op2(&targets.contiguous()?, CrossEntropy)
}

// ---------------------------------------------------------------------------------------------
// A row vector over the last dimension: y[.., n] = x[.., n] + b[n] (the bias of every linear
// layer) or x[.., n] * b[n] (LayerScale; the mask token's blend). candle's broadcast ops and
// their backward reductions are generic strided loops, and on bf16 that reduction would sum the
// ~50k rows of a batch in bf16; here the vector's gradient is a sum_rows, f32 on CUDA.

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
fn with_row_vector<T: Float>(x: &[T], b: &[T], op: impl Fn(T, T) -> T + Sync) -> Vec<T> {
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

struct SumRows;

fn column_sums<T: Float>(x: &[T], n: usize) -> Vec<T> {
    let chunk = n * rows_per_task(n).max(64);
    let partials: Vec<Vec<T>> = x
        .par_chunks(chunk)
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

/// Sum of squares of all elements of all `tensors` (for gradient norms): accumulated in f64 on
/// the CPU; on a GPU, summed there in f32 and read back once for all of them (each read is a
/// synchronisation, and a model has hundreds of parameter tensors).
pub fn sum_of_squares(tensors: &[&Tensor]) -> candle_core::Result<f64> {
    let mut total = 0.0f64;
    let mut on_device: Option<Tensor> = None;
    for x in tensors {
        if !x.device().is_cpu() {
            let squares = x.to_dtype(DType::F32)?.sqr()?.sum_all()?;
            on_device = Some(match on_device {
                Some(sum) => (sum + squares)?,
                None => squares,
            });
            continue;
        }
        let x = x.flatten_all()?;
        total += match x.dtype() {
            DType::F32 => x.to_vec1::<f32>()?.par_iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>(),
            DType::F64 => x.to_vec1::<f64>()?.par_iter().map(|&v| v * v).sum::<f64>(),
            other => bail!("sum-of-squares: unsupported dtype {other:?}"),
        };
    }
    if let Some(sum) = on_device {
        total += sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(total)
}
