//! Separable resampling of NHWC feature maps: bilinear resizing (PyTorch's `interpolate(mode=
//! "bilinear", align_corners=False)`) and adaptive average pooling (`AdaptiveAvgPool2d`). Both
//! are linear along each axis, out = R_h . x . R_w^T, so each is two small matmuls with a
//! weight matrix built once, and the backward pass is candle's matmul backward (the transposed
//! matrices), exact on every device and dtype. Bilinear resizing in f32 or f64 on the CPU (the
//! segmentation head's upsampling, several passes over its largest maps per step) is a direct
//! two-tap pass each way instead, and the head's two uses of it, resize-then-add
//! ([`add_resized`]) and resize-then-concatenate ([`concat_resized`]), are fused so that the
//! resized maps are never held for the backward pass.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, dispatch_float, into_storage, same_dtype_slices};
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
    if kind != Resampling::Bilinear || !direct_bilinear(x) || (h, w) == (h_in, w_in) {
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
    /// sum, then each output pixel the column taps' sum of `mix`, written to (or, with `add`,
    /// added to) the first `c` values of every `stride` in `out`.
    fn resize_row<T>(
        x: &[T],
        w_in: usize,
        c: usize,
        row: Taps<T>,
        cols: &[Taps<T>],
        mix: &mut [T],
        out: &mut [T],
        stride: usize,
        add: bool,
    ) {
        let [a0, a1] = row.weights;
        let (x0, x1) = (&x[row.first * w_in * c..][..w_in * c], &x[row.second * w_in * c..][..w_in * c]);
        for ((m, &u), &v) in mix.iter_mut().zip(x0).zip(x1) {
            *m = a0 * u + a1 * v;
        }
        for (o, col) in out.chunks_mut(stride).zip(cols) {
            let [b0, b1] = col.weights;
            let (m0, m1) = (&mix[col.first * c..][..c], &mix[col.second * c..][..c]);
            let pixel = o[..c].iter_mut().zip(m0).zip(m1);
            if add {
                pixel.for_each(|((d, &u), &v)| *d += b0 * u + b1 * v);
            } else {
                pixel.for_each(|((d, &u), &v)| *d = b0 * u + b1 * v);
            }
        }
    }
}

multiversion! {
    /// out += weight x (the column taps' transpose applied to the output-gradient row `g`, whose
    /// pixels are the first `c` values of every `stride`): each output pixel's gradient spread
    /// over its two input columns, in `spread`.
    fn gather_row<T>(g: &[T], c: usize, stride: usize, cols: &[Taps<T>], weight: T, spread: &mut [T], out: &mut [T]) {
        spread.fill(T::ZERO);
        for (gp, col) in g.chunks(stride).zip(cols) {
            for (ix, wx) in [col.first, col.second].into_iter().zip(col.weights) {
                for (d, &v) in spread[ix * c..][..c].iter_mut().zip(&gp[..c]) {
                    *d += wx * v;
                }
            }
        }
        for (d, &v) in out.iter_mut().zip(spread.iter()) {
            *d += weight * v;
        }
    }
}

/// `x` resized to (h, w), or, given `base` (of the output's shape), `base` plus `x` resized.
fn bilinear_forward<T: Real>(
    x: &[T],
    (b, h_in, w_in, c): (usize, usize, usize, usize),
    (h, w): (usize, usize),
    base: Option<&[T]>,
) -> Vec<T> {
    let (rows, cols) = (axis_taps::<T>(h_in, h), axis_taps::<T>(w_in, w));
    let image = h_in * w_in * c;
    let mut y = base.map_or_else(|| vec![T::ZERO; b * h * w * c], <[T]>::to_vec);
    let add = base.is_some();
    y.par_chunks_mut(w * c).enumerate().for_each_init(
        || vec![T::ZERO; w_in * c],
        |mix, (r, out)| resize_row(&x[r / h * image..][..image], w_in, c, rows[r % h], &cols, mix, out, c, add),
    );
    y
}

fn bilinear_backward<T: Real>(
    g: &[T],
    (b, h_in, w_in, c): (usize, usize, usize, usize),
    (h, w): (usize, usize),
) -> Vec<T> {
    let mut dx = vec![T::ZERO; b * h_in * w_in * c];
    let rows: Vec<_> = dx.chunks_mut(w_in * c).enumerate().map(|(r, out)| (r / h_in, r % h_in, out)).collect();
    gather_rows(g, Placement { stride: c, offset: 0 }, (h_in, w_in, c), (h, w), rows);
    dx
}

/// Where a map's pixels sit in a wider NHWC map: its `c` channels at `offset` of every `stride`.
#[derive(Clone, Copy)]
struct Placement {
    stride: usize,
    offset: usize,
}

/// The input gradient of a bilinear resize from (h_in, w_in) to (h, w), read from the output
/// gradient `g` ([B, h, w, stride], the map's channels placed in it), into `rows`: (image, input
/// row, its w_in * c values), each added to, in parallel.
fn gather_rows<T: Real>(
    g: &[T],
    at: Placement,
    (h_in, w_in, c): (usize, usize, usize),
    (h, w): (usize, usize),
    rows: Vec<(usize, usize, &mut [T])>,
) {
    let (taps, cols) = (axis_taps::<T>(h_in, h), axis_taps::<T>(w_in, w));
    // The output rows that read each input row, with their weights.
    let mut readers: Vec<Vec<(usize, T)>> = vec![Vec::new(); h_in];
    for (oy, row) in taps.iter().enumerate() {
        for (iy, wy) in [row.first, row.second].into_iter().zip(row.weights) {
            readers[iy].push((oy, wy));
        }
    }
    let row_len = w * at.stride;
    rows.into_par_iter().for_each_init(
        || vec![T::ZERO; w_in * c],
        |spread, (image, iy, out)| {
            for &(oy, wy) in &readers[iy] {
                let g_row = &g[(image * h + oy) * row_len..][..row_len];
                gather_row(&g_row[at.offset..], c, at.stride, &cols, wy, spread, out);
            }
        },
    );
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
            self.size,
            None
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

/// Whether bilinear resizing of `x` runs as the CPU's direct pass.
fn direct_bilinear(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

fn size_of(x: &Tensor) -> Result<(usize, usize)> {
    let (_, h, w, _) = x.dims4()?;
    Ok((h, w))
}

/// `fine` [B, h, w, C] + `coarse` [B, h', w', C] resized bilinearly to (h, w): the UperHead's
/// top-down path. On the CPU one pass adds each resized row into a copy of `fine`, so the
/// resized map is never held for the backward pass (which is `fine`'s gradient as it is and the
/// resize's backward for `coarse`).
pub fn add_resized(fine: &Tensor, coarse: &Tensor) -> Result<Tensor> {
    if !direct_bilinear(fine) || size_of(fine)? == size_of(coarse)? {
        return fine + resample(coarse, Resampling::Bilinear, size_of(fine)?)?;
    }
    fine.contiguous()?.apply_op2(&coarse.contiguous()?, AddResized)
}

struct AddResized;

impl CustomOp2 for AddResized {
    fn name(&self) -> &'static str {
        "add-resized"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = l1.shape().dims4()?;
        let (b2, h_in, w_in, c2) = l2.shape().dims4()?;
        if (b2, c2) != (b, c) {
            bail!("{}: [{b}, _, _, {c}] and [{b2}, _, _, {c2}] maps", self.name());
        }
        let out = dispatch_float!(self.name(), s1, |v| {
            let coarse = same_dtype_slices(self.name(), s2, l2)?;
            let fine = contiguous(v, l1, self.name())?;
            into_storage(bilinear_forward(coarse, (b, h_in, w_in, c), (h, w), Some(fine)))
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, coarse: &Tensor, _: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, h_in, w_in, _) = coarse.dims4()?;
        let dcoarse = grad.contiguous()?.apply_op1_no_bwd(&BilinearResizeBackward { input: (h_in, w_in) })?;
        Ok((Some(grad.clone()), Some(dcoarse)))
    }
}

/// `first` [B, h, w, C0] and each of `rest` ([B, h_i, w_i, C_i]) resized bilinearly to (h, w),
/// concatenated along the channels: the pyramid pooling's and the UperHead's fusion. On the CPU
/// each resized map is written straight into its channels of the output, so the resized maps
/// (as large as the output's finest level, one per input) are not held for the backward pass;
/// the inputs travel as one flat [B, sum of their sizes] tensor, since a custom op takes at most
/// three.
pub fn concat_resized(first: &Tensor, rest: &[Tensor]) -> Result<Tensor> {
    let size = size_of(first)?;
    if !direct_bilinear(first) || rest.is_empty() {
        let mut all = vec![first.clone()];
        for x in rest {
            all.push(resample(x, Resampling::Bilinear, size)?);
        }
        return Tensor::cat(&all, 3);
    }
    let b = first.dim(0)?;
    let mut maps = Vec::with_capacity(rest.len());
    let mut flat = Vec::with_capacity(rest.len());
    for x in rest {
        let (xb, h, w, c) = x.dims4()?;
        if xb != b {
            bail!("concat_resized: a map of {xb} images with maps of {b}");
        }
        maps.push((h, w, c));
        flat.push(x.reshape((b, h * w * c))?);
    }
    let op = ConcatResized { channels: first.dim(3)?, maps };
    first.contiguous()?.apply_op2(&Tensor::cat(&flat, 1)?, op)
}

#[derive(Clone)]
struct ConcatResized {
    /// The first map's channels.
    channels: usize,
    /// (h, w, c) of each resized map, in the order of their channels.
    maps: Vec<(usize, usize, usize)>,
}

impl ConcatResized {
    fn width(&self) -> usize {
        self.channels + self.maps.iter().map(|m| m.2).sum::<usize>()
    }

    /// (placement in the output, offset in one image's flat inputs) of each map.
    fn layout(&self) -> Vec<(Placement, usize)> {
        let (stride, mut channel, mut flat) = (self.width(), self.channels, 0);
        let mut at = Vec::with_capacity(self.maps.len());
        for &(h, w, c) in &self.maps {
            at.push((Placement { stride, offset: channel }, flat));
            channel += c;
            flat += h * w * c;
        }
        at
    }

    fn flat_len(&self) -> usize {
        self.maps.iter().map(|&(h, w, c)| h * w * c).sum()
    }

    fn forward<T: Real>(&self, first: &[T], flat: &[T], (b, h, w): (usize, usize, usize)) -> Vec<T> {
        let (stride, c0, per_image) = (self.width(), self.channels, self.flat_len());
        let taps: Vec<_> =
            self.maps.iter().map(|&(h_in, w_in, _)| (axis_taps::<T>(h_in, h), axis_taps::<T>(w_in, w))).collect();
        let widest = self.maps.iter().map(|&(_, w_in, c)| w_in * c).max().unwrap_or(0);
        let layout = self.layout();
        let mut y = vec![T::ZERO; b * h * w * stride];
        y.par_chunks_mut(w * stride).enumerate().for_each_init(
            || vec![T::ZERO; widest],
            |mix, (r, out)| {
                for (o, x) in out.chunks_exact_mut(stride).zip(first[r * w * c0..][..w * c0].chunks_exact(c0)) {
                    o[..c0].copy_from_slice(x);
                }
                let image = &flat[r / h * per_image..][..per_image];
                for ((&(h_in, w_in, c), (rows, cols)), &(at, offset)) in self.maps.iter().zip(&taps).zip(&layout) {
                    let x = &image[offset..][..h_in * w_in * c];
                    resize_row(
                        x,
                        w_in,
                        c,
                        rows[r % h],
                        cols,
                        &mut mix[..w_in * c],
                        &mut out[at.offset..],
                        stride,
                        false,
                    );
                }
            },
        );
        y
    }
}

impl CustomOp2 for ConcatResized {
    fn name(&self) -> &'static str {
        "concat-resized"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, w, c0) = l1.shape().dims4()?;
        if c0 != self.channels || l2.shape().dims2()? != (b, self.flat_len()) {
            bail!(
                "{}: inputs {:?} and {:?} do not match the maps {:?}",
                self.name(),
                l1.shape(),
                l2.shape(),
                self.maps
            );
        }
        let out = dispatch_float!(self.name(), s1, |v| {
            let flat = same_dtype_slices(self.name(), s2, l2)?;
            into_storage(self.forward(contiguous(v, l1, self.name())?, flat, (b, h, w)))
        });
        Ok((out, Shape::from((b, h, w, self.width()))))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dfirst = grad.narrow(3, 0, self.channels)?.contiguous()?;
        let op = ConcatResizedBackward(self.clone());
        Ok((Some(dfirst), Some(grad.apply_op1_no_bwd(&op)?)))
    }
}

/// d loss / d (the flat resized inputs) of [`ConcatResized`] from the output's gradient.
struct ConcatResizedBackward(ConcatResized);

impl ConcatResizedBackward {
    fn run<T: Real>(&self, g: &[T], (b, h, w): (usize, usize, usize)) -> Vec<T> {
        let Self(op) = self;
        let mut dflat = vec![T::ZERO; b * op.flat_len()];
        // Each map's rows of every image, gathered map by map.
        let mut per_map: Vec<Vec<(usize, usize, &mut [T])>> = op.maps.iter().map(|_| Vec::new()).collect();
        for (image, mut rest) in dflat.chunks_mut(op.flat_len()).enumerate() {
            for (m, &(h_in, w_in, c)) in op.maps.iter().enumerate() {
                let (map, tail) = rest.split_at_mut(h_in * w_in * c);
                per_map[m].extend(map.chunks_mut(w_in * c).enumerate().map(|(iy, row)| (image, iy, row)));
                rest = tail;
            }
        }
        for ((&(h_in, w_in, c), (at, _)), rows) in op.maps.iter().zip(op.layout()).zip(per_map) {
            gather_rows(g, at, (h_in, w_in, c), (h, w), rows);
        }
        dflat
    }
}

impl CustomOp1 for ConcatResizedBackward {
    fn name(&self) -> &'static str {
        "concat-resized-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, w, _) = l.shape().dims4()?;
        let out =
            dispatch_float!(self.name(), s, |v| into_storage(self.run(contiguous(v, l, self.name())?, (b, h, w))));
        Ok((out, Shape::from((b, self.0.flat_len()))))
    }
}
