//! GELU, exact (erf) form: x * Phi(x).
//!
//! GELU, exact (erf) form: x * Phi(x).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

use super::*;
use crate::float::Float;

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
