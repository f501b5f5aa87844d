//! Cross-entropy per row: loss_i = logsumexp(z_i) - z_i[t_i].
//!
//! Cross-entropy per row: loss_i = logsumexp(z_i) - z_i[t_i]. Targets are u32 and get no gradient.

use candle_core::{backend::BackendStorage, bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

use super::*;
use crate::float::Float;

struct CrossEntropy;

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
        let targets = u32_slice(self.name(), s2, l2)?;
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
        let targets = u32_slice(self.name(), s2, l2)?;
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
