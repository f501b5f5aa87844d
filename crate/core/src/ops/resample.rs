//! Separable resampling of NHWC feature maps: bilinear resizing (PyTorch's `interpolate(mode=
//! "bilinear", align_corners=False)`) and adaptive average pooling (`AdaptiveAvgPool2d`). Both
//! are linear along each axis, out = R_h . x . R_w^T, so each is two small matmuls with a
//! weight matrix built once, and the backward pass is candle's matmul backward (the transposed
//! matrices), exact on every device and dtype.

use candle_core::{Device, Result, Tensor};

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

/// x [B, H, W, C] -> [B, h, w, C].
pub fn resample(x: &Tensor, kind: Resampling, (h, w): (usize, usize)) -> Result<Tensor> {
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
