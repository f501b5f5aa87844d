//! Separable resampling of NHWC feature maps: bilinear resizing (PyTorch's `interpolate(mode=
//! "bilinear", align_corners=False)`) and adaptive average pooling (`AdaptiveAvgPool2d`). Both
//! are linear along each axis, out = R_h . x . R_w^T, so each is two small matmuls with a
//! weight matrix built once, and the backward pass is candle's matmul backward (the transposed
//! matrices), exact on every device and dtype. Bilinear resizing in f32 or f64 on the CPU (the
//! segmentation head's upsampling, several passes over its largest maps per step) is a direct
//! two-tap pass each way instead.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, dispatch_float, into_storage};
use crate::engine::simd::{multiversion, Real};

/// Taps and weights of 1-D resampling from `n_in` to `n_out` samples, PyTorch's
/// `interpolate(..., align_corners=False)` without antialiasing.
pub fn interpolation_taps(n_in: usize, n_out: usize, cubic: bool) -> Vec<Vec<(usize, f64)>> {
    let scale = n_in as f64 / n_out as f64;
    let last = n_in as isize - 1;
    let clamp = |i: isize| i.clamp(0, last) as usize;
    (0..n_out)
        .map(|o| {
            let src = scale * (o as f64 + 0.5) - 0.5;
            if cubic {
                // Keys' cubic convolution with A = -0.75; taps beyond the border repeat it.
                const A: f64 = -0.75;
                let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
                let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
                let i = src.floor();
                let t = src - i;
                let i = i as isize;
                vec![
                    (clamp(i - 1), far(t + 1.0)),
                    (clamp(i), near(t)),
                    (clamp(i + 1), near(1.0 - t)),
                    (clamp(i + 2), far(2.0 - t)),
                ]
            } else {
                let src = src.max(0.0);
                let i = src.floor() as isize;
                let t = src - i as f64;
                vec![(clamp(i), 1.0 - t), (clamp(i + 1), t)]
            }
        })
        .collect()
}

/// [n_out, n_in]: PyTorch's bilinear resize (align_corners = false) as a matrix.
pub fn bilinear_weights(n_in: usize, n_out: usize) -> Vec<f64> {
    let mut w = vec![0.0; n_out * n_in];
    for (i, taps) in interpolation_taps(n_in, n_out, false).into_iter().enumerate() {
        for (j, t) in taps {
            w[i * n_in + j] += t;
        }
    }
    w
}

/// [n_out, n_in], row i: PyTorch's adaptive average pooling window for output i, [floor(i n_in / n_out),
/// ceil((i + 1) n_in / n_out)), each input weighted 1 / window length.
pub fn adaptive_average_weights(n_in: usize, n_out: usize) -> Vec<f64> {
    let mut w = vec![0.0; n_out * n_in];
    for i in 0..n_out {
        let start = i * n_in / n_out;
        let end = ((i + 1) * n_in).div_ceil(n_out);
        for j in start..end {
            w[i * n_in + j] = 1.0 / (end - start) as f64;
        }
    }
    w
}

/// How a map is resampled to a new size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resampling {
    Bilinear,
    AdaptiveAverage,
}

impl Resampling {
    fn weights(self, n_in: usize, n_out: usize) -> Vec<f64> {
        match self {
            Resampling::Bilinear => bilinear_weights(n_in, n_out),
            Resampling::AdaptiveAverage => adaptive_average_weights(n_in, n_out),
        }
    }
}

/// [n_out, n_in] weights in `x`'s dtype on its device, broadcast over `batch`, or None where the
/// axis keeps its size (both resamplings are then the identity).
fn axis_matrix(kind: Resampling, n_in: usize, n_out: usize, batch: usize, x: &Tensor) -> Result<Option<Tensor>> {
    if n_in == n_out {
        return Ok(None);
    }
    let m = Tensor::from_vec(kind.weights(n_in, n_out), (1, n_out, n_in), &Device::Cpu)?;
    let m = m.to_dtype(x.dtype())?.to_device(x.device())?;
    Ok(Some(m.broadcast_as((batch, n_out, n_in))?.contiguous()?))
}

/// x [B, H, W, C] -> [B, h, w, C]. Bilinear resizing of f32 and f64 maps on the CPU is one
/// pass over the map each way ([`BilinearResize`]); the rest is [`resample_by_matmuls`].
pub fn resample(x: &Tensor, kind: Resampling, (h, w): (usize, usize)) -> Result<Tensor> {
    let (_, h_in, w_in, _) = x.dims4()?;
    let direct = kind == Resampling::Bilinear && x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    if !direct || (h, w) == (h_in, w_in) {
        return resample_by_matmuls(x, kind, (h, w));
    }
    x.contiguous()?.apply_op1(BilinearResize { size: (h, w) })
}

/// [`resample`] as two matmuls with the axes' weight matrices, whose backward pass is candle's
/// matmul backward: every device and dtype (and on the CPU the reference [`BilinearResize`]
/// is tested against).
pub fn resample_by_matmuls(x: &Tensor, kind: Resampling, (h, w): (usize, usize)) -> Result<Tensor> {
    let (b, h_in, w_in, c) = x.dims4()?;
    let x = match axis_matrix(kind, h_in, h, b, x)? {
        Some(rows) => rows.matmul(&x.reshape((b, h_in, w_in * c))?)?,
        None => x.reshape((b, h_in, w_in * c))?,
    };
    let x = match axis_matrix(kind, w_in, w, b * h, &x)? {
        Some(cols) => cols.matmul(&x.reshape((b * h, w_in, c))?)?,
        None => x,
    };
    x.reshape((b, h, w, c))
}

/// Bilinear resizing of a contiguous NHWC map to `size` on the CPU: each output row mixes its
/// two input rows, then each output pixel its two columns of that mix (2 + 2 multiply-adds per
/// value, where the matmuls spend n_in + n_in: 14 + 14 for the head's 4x upsampling, and their
/// weight matrices are copied per image row). The backward pass gathers, per input row, the
/// output rows that read it ([`BilinearResizeBackward`]): no two tasks write one value.
struct BilinearResize {
    size: (usize, usize),
}

/// One output coordinate's two bilinear taps (input index, weight); the second index is the
/// first or the next one (PyTorch's align_corners = false, clamped at the borders).
#[derive(Clone, Copy)]
pub(crate) struct Taps<T> {
    pub first: usize,
    pub second: usize,
    pub weights: [T; 2],
}

/// The bilinear taps of each of `n_out` samples from `n_in`, in T.
pub(crate) fn axis_taps<T: Real>(n_in: usize, n_out: usize) -> Vec<Taps<T>> {
    interpolation_taps(n_in, n_out, false)
        .into_iter()
        .map(|t| Taps { first: t[0].0, second: t[1].0, weights: [T::from_f64(t[0].1), T::from_f64(t[1].1)] })
        .collect()
}

multiversion! {
    /// One output row from its two input rows of `x` ([h_in][w_in][c]): `mix` = the row taps'
    /// sum, then each output pixel the column taps' sum of `mix`.
    fn resize_row<T>(x: &[T], w_in: usize, c: usize, row: Taps<T>, cols: &[Taps<T>], mix: &mut [T], out: &mut [T]) {
        let [a0, a1] = row.weights;
        let (x0, x1) = (&x[row.first * w_in * c..][..w_in * c], &x[row.second * w_in * c..][..w_in * c]);
        for ((m, &u), &v) in mix.iter_mut().zip(x0).zip(x1) {
            *m = a0 * u + a1 * v;
        }
        for (o, col) in out.chunks_exact_mut(c).zip(cols) {
            let [b0, b1] = col.weights;
            let (m0, m1) = (&mix[col.first * c..][..c], &mix[col.second * c..][..c]);
            for ((d, &u), &v) in o.iter_mut().zip(m0).zip(m1) {
                *d = b0 * u + b1 * v;
            }
        }
    }
}

multiversion! {
    /// out += weight x (the column taps' transpose applied to the output-gradient row `g`):
    /// each output pixel's gradient spread over its two input columns, in `spread`.
    fn gather_row<T>(g: &[T], c: usize, cols: &[Taps<T>], weight: T, spread: &mut [T], out: &mut [T]) {
        spread.fill(T::ZERO);
        for (gp, col) in g.chunks_exact(c).zip(cols) {
            for (ix, wx) in [col.first, col.second].into_iter().zip(col.weights) {
                for (d, &v) in spread[ix * c..][..c].iter_mut().zip(gp) {
                    *d += wx * v;
                }
            }
        }
        for (d, &v) in out.iter_mut().zip(spread.iter()) {
            *d += weight * v;
        }
    }
}

fn bilinear_forward<T: Real>(
    x: &[T],
    (b, h_in, w_in, c): (usize, usize, usize, usize),
    (h, w): (usize, usize),
) -> Vec<T> {
    let (rows, cols) = (axis_taps::<T>(h_in, h), axis_taps::<T>(w_in, w));
    let image = h_in * w_in * c;
    let mut y = vec![T::ZERO; b * h * w * c];
    y.par_chunks_mut(w * c).enumerate().for_each_init(
        || vec![T::ZERO; w_in * c],
        |mix, (r, out)| resize_row(&x[r / h * image..][..image], w_in, c, rows[r % h], &cols, mix, out),
    );
    y
}

fn bilinear_backward<T: Real>(
    g: &[T],
    (b, h_in, w_in, c): (usize, usize, usize, usize),
    (h, w): (usize, usize),
) -> Vec<T> {
    let (rows, cols) = (axis_taps::<T>(h_in, h), axis_taps::<T>(w_in, w));
    // The output rows that read each input row, with their weights.
    let mut readers: Vec<Vec<(usize, T)>> = vec![Vec::new(); h_in];
    for (oy, row) in rows.iter().enumerate() {
        for (iy, wy) in [row.first, row.second].into_iter().zip(row.weights) {
            readers[iy].push((oy, wy));
        }
    }
    let mut dx = vec![T::ZERO; b * h_in * w_in * c];
    dx.par_chunks_mut(w_in * c).enumerate().for_each_init(
        || vec![T::ZERO; w_in * c],
        |spread, (r, out)| {
            let (image, iy) = (r / h_in, r % h_in);
            for &(oy, wy) in &readers[iy] {
                gather_row(&g[(image * h + oy) * w * c..][..w * c], c, &cols, wy, spread, out);
            }
        },
    );
    dx
}

impl CustomOp1 for BilinearResize {
    fn name(&self) -> &'static str {
        "bilinear-resize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims4()?;
        let (h, w) = self.size;
        let out = dispatch_float!(self.name(), s, |v| into_storage(bilinear_forward(
            contiguous(v, l, self.name())?,
            dims,
            self.size
        )));
        Ok((out, Shape::from((dims.0, h, w, dims.3))))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, h_in, w_in, _) = x.dims4()?;
        let op = BilinearResizeBackward { input: (h_in, w_in) };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// d loss / d input of [`BilinearResize`] from the output's gradient.
struct BilinearResizeBackward {
    input: (usize, usize),
}

impl CustomOp1 for BilinearResizeBackward {
    fn name(&self) -> &'static str {
        "bilinear-resize-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = l.shape().dims4()?;
        let (h_in, w_in) = self.input;
        let out = dispatch_float!(self.name(), s, |v| into_storage(bilinear_backward(
            contiguous(v, l, self.name())?,
            (b, h_in, w_in, c),
            (h, w)
        )));
        Ok((out, Shape::from((b, h_in, w_in, c))))
    }
}
