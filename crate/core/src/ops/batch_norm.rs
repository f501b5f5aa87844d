//! Training-mode BatchNorm over the last dimension of x [rows, C] (NHWC maps), fused on the CPU
//! with the ReLU a ConvModule applies after it: two passes for the statistics, one to
//! normalise, two for the backward, where the composed candle ops make a dozen passes over the
//! map (and as many gradient buffers). The statistics are the batch's, summed over the replicas
//! of a data-parallel job when given (SyncBatchNorm; as PyTorch's kernels, the backward pass
//! all-reduces the per-channel sums of g and g * x_hat).

use std::sync::{Arc, Mutex};

use candle_core::{backend::BackendStorage, bail, CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::*;
use crate::distributed::ReplicaSum;
use crate::float::Float;

/// What a training forward normalised by: per-channel mean and biased variance over the
/// (global) batch.
#[derive(Debug, Clone)]
pub struct BatchStatistics {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}

struct BatchNormTrain {
    replicas: Option<Arc<dyn ReplicaSum>>,
    /// Rows over every replica.
    rows: usize,
    relu: bool,
    eps: f64,
    /// Set by the forward pass, read by the caller (running statistics) and the backward.
    seen: Arc<Mutex<Option<BatchStatistics>>>,
}

impl BatchNormTrain {
    fn statistics(&self) -> candle_core::Result<BatchStatistics> {
        match self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            Some(s) => Ok(s),
            None => bail!("batch-norm: backward before forward"),
        }
    }

    fn forward<T: Float>(&self, x: &[T], gamma: &[T], beta: &[T]) -> candle_core::Result<Vec<T>> {
        let c = gamma.len();
        let n = self.rows as f64;
        let mut mean = column_sums_of(x, c, |_, v: T| v.to_f64());
        sum_values_over_replicas(self.replicas.as_ref(), &mut mean)?;
        mean.iter_mut().for_each(|m| *m /= n);
        // Centred squares (two passes, as the composed ops and PyTorch compute it).
        let mut var = column_sums_of(x, c, |i, v: T| (v.to_f64() - mean[i]).powi(2));
        sum_values_over_replicas(self.replicas.as_ref(), &mut var)?;
        var.iter_mut().for_each(|v| *v /= n);
        let scale: Vec<T> =
            var.iter().zip(gamma).map(|(v, g)| T::from_f64(g.to_f64() / (v + self.eps).sqrt())).collect();
        let shift: Vec<T> = (0..c).map(|i| T::from_f64(beta[i].to_f64() - mean[i] * scale[i].to_f64())).collect();
        let mut y = vec![T::ZERO; x.len()];
        y.par_chunks_mut(c * column_chunk_rows(c)).zip(x.par_chunks(c * column_chunk_rows(c))).for_each(|(ys, xs)| {
            for (yr, xr) in ys.chunks_mut(c).zip(xs.chunks(c)) {
                for i in 0..c {
                    let v = xr[i] * scale[i] + shift[i];
                    yr[i] = if self.relu && v < T::ZERO { T::ZERO } else { v };
                }
            }
        });
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(BatchStatistics { mean, var });
        Ok(y)
    }
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm"
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
        let out = dispatch_float!(self.name(), s1, |v| {
            let x = contiguous(v, l1, self.name())?;
            let gamma = same_dtype_slices(self.name(), s2, l2)?;
            let beta = same_dtype_slices(self.name(), s3, l3)?;
            into_storage(self.forward(x, gamma, beta)?)
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = gamma.elem_count();
        let rows = x.elem_count() / c;
        let backward = BatchNormBackward {
            statistics: self.statistics()?,
            gamma: gamma.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?,
            replicas: self.replicas.clone(),
            rows: self.rows,
            relu: self.relu,
            eps: self.eps,
        };
        let packed = x.apply_op3_no_bwd(y, &grad.contiguous()?, &backward)?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dgamma = packed.narrow(0, rows, 1)?.reshape(gamma.shape())?;
        let dbeta = packed.narrow(0, rows + 1, 1)?.reshape(gamma.shape())?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// Backward of [`BatchNormTrain`] from (x, y, dy): [rows + 2, C] = dx rows, then dgamma, then
/// dbeta (this replica's: the gradient all-reduce sums them with the others').
struct BatchNormBackward {
    statistics: BatchStatistics,
    gamma: Vec<f64>,
    replicas: Option<Arc<dyn ReplicaSum>>,
    rows: usize,
    relu: bool,
    eps: f64,
}

impl BatchNormBackward {
    fn backward<T: Float>(&self, x: &[T], y: &[T], dy: &[T]) -> candle_core::Result<Vec<T>> {
        let c = self.gamma.len();
        let BatchStatistics { mean, var } = &self.statistics;
        let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        let block = c * column_chunk_rows(c);
        // The ReLU's gradient passes where its output is positive.
        let g = |yv: T, dv: T| if self.relu && yv <= T::ZERO { 0.0 } else { dv.to_f64() };
        // Per-channel sums of g and g * x_hat, over this replica's rows.
        let partials: Vec<Vec<f64>> = x
            .par_chunks(block)
            .zip(y.par_chunks(block))
            .zip(dy.par_chunks(block))
            .map(|((xs, ys), ds)| {
                let mut acc = vec![0.0; 2 * c];
                for ((xr, yr), dr) in xs.chunks(c).zip(ys.chunks(c)).zip(ds.chunks(c)) {
                    for i in 0..c {
                        let gi = g(yr[i], dr[i]);
                        acc[i] += gi;
                        acc[c + i] += gi * (xr[i].to_f64() - mean[i]) * inv_std[i];
                    }
                }
                acc
            })
            .collect();
        let mut local = vec![0.0; 2 * c];
        add_partials(&mut local, partials);
        let mut global = local.clone();
        sum_values_over_replicas(self.replicas.as_ref(), &mut global)?;
        let n = self.rows as f64;
        let rows = x.len() / c;
        let mut out = vec![T::ZERO; (rows + 2) * c];
        let (dx, dparams) = out.split_at_mut(rows * c);
        dx.par_chunks_mut(block).zip(x.par_chunks(block)).zip(y.par_chunks(block)).zip(dy.par_chunks(block)).for_each(
            |(((dxs, xs), ys), ds)| {
                for (((dxr, xr), yr), dr) in dxs.chunks_mut(c).zip(xs.chunks(c)).zip(ys.chunks(c)).zip(ds.chunks(c)) {
                    for i in 0..c {
                        let x_hat = (xr[i].to_f64() - mean[i]) * inv_std[i];
                        let centred = g(yr[i], dr[i]) - global[i] / n - x_hat * global[c + i] / n;
                        dxr[i] = T::from_f64(self.gamma[i] * inv_std[i] * centred);
                    }
                }
            },
        );
        for i in 0..c {
            dparams[i] = T::from_f64(local[c + i]);
            dparams[c + i] = T::from_f64(local[i]);
        }
        Ok(out)
    }
}

impl CustomOp3 for BatchNormBackward {
    fn name(&self) -> &'static str {
        "batch-norm-backward"
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
        let c = self.gamma.len();
        let rows = l1.shape().elem_count() / c;
        let out = dispatch_float!(self.name(), s1, |v| {
            let x = contiguous(v, l1, self.name())?;
            let y = same_dtype_slices(self.name(), s2, l2)?;
            let dy = same_dtype_slices(self.name(), s3, l3)?;
            into_storage(self.backward(x, y, dy)?)
        });
        Ok((out, Shape::from((rows + 2, c))))
    }
}

/// Training BatchNorm of x [rows, C] (f32 or f64, on the CPU) with weight and bias [C], then a
/// ReLU when `relu`: the output and the statistics it normalised by, over `rows` rows in all
/// (this tensor's alone, or with `replicas` every replica's).
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    relu: bool,
    replicas: Option<&Arc<dyn ReplicaSum>>,
    rows: usize,
    eps: f64,
) -> candle_core::Result<(Tensor, BatchStatistics)> {
    let seen = Arc::new(Mutex::new(None));
    let op = BatchNormTrain { replicas: replicas.cloned(), rows, relu, eps, seen: seen.clone() };
    let y = x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
    let statistics = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    match statistics {
        Some(s) => Ok((y, s)),
        None => bail!("batch-norm: the forward pass left no statistics"),
    }
}
