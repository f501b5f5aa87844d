//! GELU, exact (erf) form: x * Phi(x).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

use super::*;
use crate::engine::simd::{multiversion, Real};

struct Gelu;

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
const CHUNK: usize = 16384;

multiversion! {
    /// y = x Phi(x), with the engine's Phi (the same numbers as its fused bias + GELU).
    fn gelu_rows<T>(x: &[T], y: &mut [T]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = v * v.normal_cdf();
        }
    }
}

fn gelu<T: Real>(x: &[T]) -> Vec<T> {
    let mut y = vec![T::ZERO; x.len()];
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(ys, xs)| gelu_rows(xs, ys));
    y
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = dispatch_float!(self.name(), s, |v| into_storage(gelu(contiguous(v, l, self.name())?)));
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

multiversion! {
    /// dx = g GELU'(x) = g (Phi(x) + x phi(x)).
    fn gelu_backward_rows<T>(x: &[T], g: &[T], dx: &mut [T]) {
        let c = T::from_f64(FRAC_1_SQRT_2PI);
        let minus_half = T::from_f64(-0.5);
        for ((d, &v), &gv) in dx.iter_mut().zip(x).zip(g) {
            let pdf = c * (minus_half * v * v).exp_v();
            *d = gv * (v.normal_cdf() + v * pdf);
        }
    }
}

fn gelu_bwd<T: Real>(x: &[T], g: &[T]) -> Vec<T> {
    let mut dx = vec![T::ZERO; x.len()];
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|((ds, xs), gs)| gelu_backward_rows(xs, gs, ds));
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
