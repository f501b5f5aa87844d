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
use crate::engine::simd::{multiversion, Real};

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

    fn forward<T: Real>(&self, x: &[T], gamma: &[T], beta: &[T]) -> candle_core::Result<Vec<T>> {
        let c = gamma.len();
        let n = self.rows as f64;
        let block = c * column_chunk_rows(c);
        let mut mean = channel_sums(x, c, &vec![T::ZERO; c], false);
        sum_values_over_replicas(self.replicas.as_ref(), &mut mean)?;
        mean.iter_mut().for_each(|m| *m /= n);
        // Centred squares (two passes, as the composed ops and PyTorch compute it).
        let shift_by: Vec<T> = mean.iter().map(|&m| T::from_f64(m)).collect();
        let mut var = channel_sums(x, c, &shift_by, true);
        sum_values_over_replicas(self.replicas.as_ref(), &mut var)?;
        var.iter_mut().for_each(|v| *v /= n);
        let scale: Vec<T> =
            var.iter().zip(gamma).map(|(v, g)| T::from_f64(g.to_f64() / (v + self.eps).sqrt())).collect();
        let shift: Vec<T> = (0..c).map(|i| T::from_f64(beta[i].to_f64() - mean[i] * scale[i].to_f64())).collect();
        let mut y = vec![T::ZERO; x.len()];
        y.par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .for_each(|(ys, xs)| normalise_rows(xs, &scale, &shift, self.relu, ys));
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(BatchStatistics { mean, var });
        Ok(y)
    }
}

/// Rows summed in the element type before each flush into the f64 totals: short enough that
/// f32 rounding stays at f64-accumulation level, long enough for the flush to cost nothing.
const FLUSH_ROWS: usize = 32;

multiversion! {
    /// totals[i] += sum over the rows of x [rows, C] of (x[., i] - shift[i]), squared when
    /// `square`; per-channel in the element type for [`FLUSH_ROWS`] rows at a time, then in f64.
    fn channel_sums_rows<T>(x: &[T], shift: &[T], square: bool, partial: &mut [T], totals: &mut [f64]) {
        let c = shift.len();
        for rows in x.chunks(c * FLUSH_ROWS) {
            partial.fill(T::ZERO);
            for row in rows.chunks_exact(c) {
                if square {
                    for i in 0..c {
                        let d = row[i] - shift[i];
                        partial[i] += d * d;
                    }
                } else {
                    for i in 0..c {
                        partial[i] += row[i] - shift[i];
                    }
                }
            }
            for i in 0..c {
                totals[i] += partial[i].to_f64();
            }
        }
    }
}

/// Per-channel sums over the rows of x [rows, C] of x - shift (or its square), in parallel.
fn channel_sums<T: Real>(x: &[T], c: usize, shift: &[T], square: bool) -> Vec<f64> {
    let partials: Vec<Vec<f64>> = x
        .par_chunks(c * column_chunk_rows(c))
        .map(|xs| {
            let mut totals = vec![0.0; c];
            channel_sums_rows(xs, shift, square, &mut vec![T::ZERO; c], &mut totals);
            totals
        })
        .collect();
    let mut total = vec![0.0; c];
    add_partials(&mut total, partials);
    total
}

multiversion! {
    /// y = x * scale + shift per channel, then max(y, 0) when `relu`.
    fn normalise_rows<T>(x: &[T], scale: &[T], shift: &[T], relu: bool, y: &mut [T]) {
        let c = scale.len();
        for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            for i in 0..c {
                let v = xr[i] * scale[i] + shift[i];
                yr[i] = if relu && v < T::ZERO { T::ZERO } else { v };
            }
        }
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
    fn backward<T: Real>(&self, x: &[T], y: &[T], dy: &[T]) -> candle_core::Result<Vec<T>> {
        let c = self.gamma.len();
        let BatchStatistics { mean, var } = &self.statistics;
        let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        let mean_t: Vec<T> = mean.iter().map(|&m| T::from_f64(m)).collect();
        let inv_std_t: Vec<T> = inv_std.iter().map(|&s| T::from_f64(s)).collect();
        let block = c * column_chunk_rows(c);
        // Per-channel sums of g and g * x_hat over this replica's rows (g: dy where the ReLU
        // passed it).
        let partials: Vec<Vec<f64>> = x
            .par_chunks(block)
            .zip(y.par_chunks(block))
            .zip(dy.par_chunks(block))
            .map(|((xs, ys), ds)| {
                let mut totals = vec![0.0; 2 * c];
                gradient_sums_rows(xs, ys, ds, &mean_t, &inv_std_t, self.relu, &mut vec![T::ZERO; 2 * c], &mut totals);
                totals
            })
            .collect();
        let mut local = vec![0.0; 2 * c];
        add_partials(&mut local, partials);
        let mut global = local.clone();
        sum_values_over_replicas(self.replicas.as_ref(), &mut global)?;
        let n = self.rows as f64;
        // dx = gamma inv_std (g - sum(g) / n - x_hat sum(g x_hat) / n).
        let factor: Vec<T> = (0..c).map(|i| T::from_f64(self.gamma[i] * inv_std[i])).collect();
        let mean_g: Vec<T> = (0..c).map(|i| T::from_f64(global[i] / n)).collect();
        let mean_gx: Vec<T> = (0..c).map(|i| T::from_f64(global[c + i] / n)).collect();
        let rows = x.len() / c;
        let mut out = vec![T::ZERO; (rows + 2) * c];
        let (dx, dparams) = out.split_at_mut(rows * c);
        dx.par_chunks_mut(block).zip(x.par_chunks(block)).zip(y.par_chunks(block)).zip(dy.par_chunks(block)).for_each(
            |(((dxs, xs), ys), ds)| {
                let centred = Centred { mean: &mean_t, inv_std: &inv_std_t, mean_g: &mean_g, mean_gx: &mean_gx };
                input_gradient_rows(xs, ys, ds, centred, &factor, self.relu, dxs)
            },
        );
        for i in 0..c {
            dparams[i] = T::from_f64(local[c + i]);
            dparams[c + i] = T::from_f64(local[i]);
        }
        Ok(out)
    }
}

multiversion! {
    /// totals[i] += sum of g, totals[C + i] += sum of g * x_hat over the rows, where g is dy
    /// with the ReLU's gradient applied; flushed to f64 every [`FLUSH_ROWS`] rows.
    fn gradient_sums_rows<T>(x: &[T], y: &[T], dy: &[T], mean: &[T], inv_std: &[T], relu: bool, partial: &mut [T], totals: &mut [f64]) {
        let c = mean.len();
        let span = c * FLUSH_ROWS;
        for ((xs, ys), ds) in x.chunks(span).zip(y.chunks(span)).zip(dy.chunks(span)) {
            partial.fill(T::ZERO);
            let (sum_g, sum_gx) = partial.split_at_mut(c);
            for ((xr, yr), dr) in xs.chunks_exact(c).zip(ys.chunks_exact(c)).zip(ds.chunks_exact(c)) {
                for i in 0..c {
                    let g = if relu && yr[i] <= T::ZERO { T::ZERO } else { dr[i] };
                    sum_g[i] += g;
                    sum_gx[i] += g * ((xr[i] - mean[i]) * inv_std[i]);
                }
            }
            for (t, p) in totals.iter_mut().zip(partial.iter()) {
                *t += p.to_f64();
            }
        }
    }
}

/// Per-channel terms of the input gradient.
#[derive(Clone, Copy)]
struct Centred<'a, T> {
    mean: &'a [T],
    inv_std: &'a [T],
    /// sum(g) / n and sum(g x_hat) / n over the (global) batch.
    mean_g: &'a [T],
    mean_gx: &'a [T],
}

multiversion! {
    /// dx = factor (g - mean_g - x_hat mean_gx) per channel.
    fn input_gradient_rows<T>(x: &[T], y: &[T], dy: &[T], centred: Centred<'_, T>, factor: &[T], relu: bool, dx: &mut [T]) {
        let Centred { mean, inv_std, mean_g, mean_gx } = centred;
        let c = factor.len();
        for (((dxr, xr), yr), dr) in dx.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(y.chunks_exact(c)).zip(dy.chunks_exact(c)) {
            for i in 0..c {
                let g = if relu && yr[i] <= T::ZERO { T::ZERO } else { dr[i] };
                let x_hat = (xr[i] - mean[i]) * inv_std[i];
                dxr[i] = factor[i] * (g - mean_g[i] - x_hat * mean_gx[i]);
            }
        }
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
