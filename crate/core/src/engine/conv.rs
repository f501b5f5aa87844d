//! "Same" k x k convolutions (stride 1, zero padding (k-1)/2) on NHWC buffers for the dVAE
//! engine, as GEMMs over im2col tiles: the columns of a few thousand output pixels at a time
//! (a few MB, cache-resident) instead of the whole im2col matrix, which is k*k times the
//! input (close to a GB for DALL-E's first 3x3 convolutions at batch 8). The data gradient is
//! the convolution of the output gradient with the flipped, transposed kernel, tiled the same
//! way, so no col2im scatter is needed. The forward pass and the data gradient of 3x3 kernels
//! between layers of 16 channels or more go through [`super::winograd`] instead (4x fewer
//! multiplies, 2.25x on tiny maps), with the same buffers, and the f32 ones into 16 channels or
//! fewer through [`super::direct`] (no columns at all); the weight gradient stays a direct sum
//! (see there why; but for bf16 over f32 activations, [`backward_params_f32_activations`]), for
//! inputs of 16 channels or more without im2col: over zero-padded copies of the input, one GEMM
//! per window row reads it at shifted offsets (`backward_params_shifted`).
//!
//! Under bf16 (the engine's mixed precision) the im2col GEMMs and the weight gradients read
//! their inputs rounded to bf16, but for im2col GEMMs too thin for the bf16 kernel
//! ([`gemm_precision`]); Winograd's passes keep their f32 GEMMs. The shifted weight gradient's
//! taps then share one bf16 copy of the band ([`frame_weight_gradient`]) instead of each
//! packing its own. Winograd's transforms scale bf16's rounding up: on the segmentation
//! head's shapes F(4x4) in bf16 is 2.6% off the exact result (relative RMS) and F(2x2) 0.4%,
//! against 0.22% for im2col in bf16, and F(2x2) in bf16 was slower than F(4x4) in f32 (16 x 56
//! x 56 maps, 128 -> 128 channels: forward 130-141 ms against 48-76 on a Zen 4), so F(4x4) in
//! f32 is both the faster and the closer choice.

use rayon::prelude::*;

use super::direct;
use super::kernels::{add_bias, add_column_sums};
use super::matmul::{add_partials, matmul_accumulate_split, matmul_at, reduction_groups, Mat, Threads};
use super::matmul_bf16::frame_weight_gradient;
use super::simd::{as_f32, as_f32_mut, multiversion, Real};
use super::winograd;
use super::{sized, SharedMut};
use crate::config::Precision;

/// An NHWC activation's dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nhwc {
    pub b: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

// A shape: `len` is its number of values, and a batch shape is never empty.
#[allow(clippy::len_without_is_empty)]
impl Nhwc {
    pub fn pixels(&self) -> usize {
        self.b * self.h * self.w
    }

    pub fn len(&self) -> usize {
        self.pixels() * self.c
    }

    pub fn with_channels(self, c: usize) -> Self {
        Self { c, ..self }
    }
}

/// Values of one im2col tile: 2M (8 MB of f32).
const TILE_VALUES: usize = 1 << 21;

/// Pixels per tile for rows of `row` values.
fn tile_pixels(row: usize) -> usize {
    (TILE_VALUES / row.max(1)).max(1)
}

/// The im2col rows of output pixels p0..p0+n: cols[i, (ky, kx, c)] = f(x[b, y+ky-pad, x+kx-pad, c])
/// (0 outside the image), f = ReLU when `relu`.
fn im2col_tile<T: Real>(x: &[T], s: Nhwc, k: usize, relu: bool, p0: usize, cols: &mut [T]) {
    let row = k * k * s.c;
    const ROWS: usize = 64;
    cols.par_chunks_mut(row * ROWS)
        .enumerate()
        .for_each(|(chunk, out)| im2col_rows(x, s, k, relu, p0 + chunk * ROWS, out));
}

multiversion! {
    /// [`im2col_tile`] for the rows of `out`, starting at output pixel `first`.
    fn im2col_rows<T>(x: &[T], s: Nhwc, k: usize, relu: bool, first: usize, out: &mut [T]) {
        let row = k * k * s.c;
        let pad = (k - 1) / 2;
        for (i, dst) in out.chunks_exact_mut(row).enumerate() {
            let p = first + i;
            let (bi, yx) = (p / (s.h * s.w), p % (s.h * s.w));
            let (y, xx) = (yx / s.w, yx % s.w);
            // The k taps of a window row are k neighbouring pixels, contiguous in NHWC: one copy
            // of k*c values unless the row crosses the image's left or right edge.
            let inside = xx >= pad && xx + k - pad <= s.w;
            for ky in 0..k {
                let sy = (y + ky).wrapping_sub(pad);
                let o = &mut dst[ky * k * s.c..(ky + 1) * k * s.c];
                if sy >= s.h {
                    o.fill(T::ZERO);
                } else if inside {
                    let src = &x[((bi * s.h + sy) * s.w + xx - pad) * s.c..][..k * s.c];
                    copy_relu(src, o, relu);
                } else {
                    for kx in 0..k {
                        let sx = (xx + kx).wrapping_sub(pad);
                        let o = &mut o[kx * s.c..(kx + 1) * s.c];
                        if sx < s.w {
                            copy_relu(&x[((bi * s.h + sy) * s.w + sx) * s.c..][..s.c], o, relu);
                        } else {
                            o.fill(T::ZERO);
                        }
                    }
                }
            }
        }
    }
}

/// dst = f(src), f = ReLU when `relu`.
#[inline(always)]
fn copy_relu<T: Real>(src: &[T], dst: &mut [T], relu: bool) {
    if relu {
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = v.max_v(T::ZERO);
        }
    } else {
        dst.copy_from_slice(src);
    }
}

/// Calls `f(p0, cols)` for each tile of output pixels with its im2col rows of f(x) (the
/// rows of x themselves, without a copy, for a 1x1 kernel without ReLU).
fn for_each_tile<T: Real>(
    x: &[T],
    s: Nhwc,
    k: usize,
    relu: bool,
    cols: &mut Vec<T>,
    mut f: impl FnMut(usize, usize, &[T]),
) {
    let row = k * k * s.c;
    let p = s.pixels();
    if k == 1 && !relu {
        return f(0, p, x);
    }
    let tile = tile_pixels(row).min(p);
    if cols.len() < tile * row {
        cols.resize(tile * row, T::ZERO);
    }
    let mut p0 = 0;
    while p0 < p {
        let n = tile.min(p - p0);
        im2col_tile(x, s, k, relu, p0, &mut cols[..n * row]);
        f(p0, n, &cols[..n * row]);
        p0 += n;
    }
}

/// The precision of an im2col or 1x1 GEMM with `n` output columns summed over `depth`:
/// `precision`, except that GEMMs too thin for the bf16 kernel's 12 x 32 tiles stay f32, where
/// packing their operands costs more than the faster products gain (the `tiny` tokenizer's
/// 8-channel layers made its bf16 encode 1.2-1.6x slower than f32; 1.0-1.3x faster now).
pub fn gemm_precision(precision: Precision, n: usize, depth: usize) -> Precision {
    if n < 16 || depth < 64 {
        Precision::F32
    } else {
        precision
    }
}

/// y[p, :] = bias + im2col(f(x))[p] . W for `packed` [k*k*c_in, c_out] (see [`pack`]), the
/// GEMMs' inputs at `precision`, as in this module's other passes, except where Winograd
/// applies, whose GEMMs stay f32 (see the module's notes on bf16).
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Real>(
    precision: Precision,
    x: &[T],
    s: Nhwc,
    relu: bool,
    k: usize,
    packed: &[T],
    bias: &[T],
    y: &mut [T],
    cols: &mut Vec<T>,
) {
    let (row, c_out) = (k * k * s.c, bias.len());
    if winograd::applies(k, s.c, c_out) {
        return winograd::forward(x, s, relu, packed, c_out, Some(bias), y, cols);
    }
    let precision = gemm_precision(precision, c_out, row);
    if direct::applies(k, c_out) && precision == Precision::F32 {
        return direct::forward(x, s, relu, k, packed, c_out, Some(bias), y, cols);
    }
    for_each_tile(x, s, k, relu, cols, |p0, n, tile| {
        let out = &mut y[p0 * c_out..(p0 + n) * c_out];
        matmul_at(
            precision,
            out,
            Mat::dense(n, c_out),
            tile,
            Mat::dense(n, row),
            packed,
            Mat::dense(row, c_out),
            false,
            T::ONE,
            Threads::Pool,
        );
    });
    add_bias(&mut y[..s.pixels() * c_out], bias);
}

/// The weight and bias gradients of [`forward`] from dy [P, c_out]: dweight [c_out, k*k*c_in]
/// and dbias are added to.
#[allow(clippy::too_many_arguments)]
pub fn backward_params<T: Real>(
    precision: Precision,
    x: &[T],
    s: Nhwc,
    relu: bool,
    k: usize,
    dy: &[T],
    dweight: &mut [T],
    dbias: &mut [T],
    cols: &mut Vec<T>,
    scratch: &mut Vec<T>,
) {
    let (row, c_out) = (k * k * s.c, dbias.len());
    if k > 1 && s.c >= SHIFTED_MIN_CHANNELS {
        backward_params_shifted(precision, x, s, relu, k, dy, dweight, c_out, cols);
    } else {
        for_each_tile(x, s, k, relu, cols, |p0, n, tile| {
            let g = &dy[p0 * c_out..(p0 + n) * c_out];
            let (d, gm, tm) = (Mat::dense(c_out, row), Mat::dense(n, c_out).t(), Mat::dense(n, row));
            matmul_accumulate_split(precision, dweight, d, g, gm, tile, tm, scratch);
        });
    }
    add_column_sums(&dy[..s.pixels() * c_out], c_out, 0, dbias, scratch);
}

/// [`backward_params`] over activations held in f32 (not kept rounded to bf16, as the dVAE
/// engine's are): under bf16, a 3x3 weight gradient that Winograd takes runs there in f32
/// ([`winograd::weight_gradient`]), a quarter of the multiplies at half the bf16 kernel's rate
/// and closer to the exact sum than the direct sum over bf16-rounded inputs. The candle ops'
/// convolutions (the segmenter's head) take this.
#[allow(clippy::too_many_arguments)]
pub fn backward_params_f32_activations<T: Real>(
    precision: Precision,
    x: &[T],
    s: Nhwc,
    k: usize,
    dy: &[T],
    dweight: &mut [T],
    dbias: &mut [T],
    cols: &mut Vec<T>,
    scratch: &mut Vec<T>,
) {
    let c_out = dbias.len();
    if precision == Precision::Bf16 && winograd::applies(k, s.c, c_out) {
        winograd::weight_gradient(x, s, false, dy, c_out, dweight, cols);
        add_column_sums(&dy[..s.pixels() * c_out], c_out, 0, dbias, scratch);
    } else {
        backward_params(precision, x, s, false, k, dy, dweight, dbias, cols, scratch);
    }
}

/// Fewer input channels than this and the per-tap GEMMs of [`backward_params_shifted`] are
/// too thin: im2col stays.
const SHIFTED_MIN_CHANNELS: usize = 16;

/// Values of one band's padded input and output gradient: 1M (4 MB of f32).
const BAND_VALUES: usize = 1 << 20;
/// Output rows [y0, y0 + rows) of images [b0, b0 + images) (whole images when more than one).
#[derive(Clone, Copy)]
struct Band {
    b0: usize,
    images: usize,
    y0: usize,
    rows: usize,
}

/// The bands of a batch: whole images, as many as fit in [`BAND_VALUES`] while leaving at least
/// `groups` bands, or runs of rows of one image when a whole image does not fit.
fn bands(s: Nhwc, k: usize, c_out: usize, groups: usize) -> Vec<Band> {
    let (wp, channels) = (s.w + k - 1, s.c + c_out);
    let frame = (s.h + k - 1) * wp * channels;
    if frame <= BAND_VALUES {
        let per = (BAND_VALUES / frame).min(s.b.div_ceil(groups)).max(1);
        return (0..s.b).step_by(per).map(|b0| Band { b0, images: per.min(s.b - b0), y0: 0, rows: s.h }).collect();
    }
    let rows = (BAND_VALUES / (wp * channels)).saturating_sub(k - 1).max(1);
    (0..s.b)
        .flat_map(|b0| (0..s.h).step_by(rows).map(move |y0| Band { b0, images: 1, y0, rows: rows.min(s.h - y0) }))
        .collect()
}

/// The weight gradient of a "same" k x k convolution without im2col's k*k copies of the input.
/// Each image of a band is laid out as a frame of (rows + k - 1) x (w + k - 1) pixels: f(x) with
/// its zero padding, and dy at the frame's top-left (zeros elsewhere). On that grid, tap
/// (ky, kx) of output pixel q reads f(x) at pixel q + ky * (w + k - 1) + kx, so the taps of a
/// window row are one GEMM over the band: dweight[:, ky] += dy^T . f(x) rows from ky * (w + k - 1)
/// on, each k * c_in values long (overlapping).
#[allow(clippy::too_many_arguments)]
fn backward_params_shifted<T: Real>(
    precision: Precision,
    x: &[T],
    s: Nhwc,
    relu: bool,
    k: usize,
    dy: &[T],
    dweight: &mut [T],
    c_out: usize,
    buffer: &mut Vec<T>,
) {
    // The bands are summed in groups, each into its own copy of the weight gradient with
    // one-thread GEMMs, so that the threads split the long reduction over pixels (as
    // `matmul_accumulate_split`, whose rules these are).
    let grads = c_out * k * k * s.c;
    let groups = reduction_groups(grads).min(s.b * s.h);
    let bands = bands(s, k, c_out, groups);
    let per_group = bands.len().div_ceil(groups);
    let band_len = bands.iter().map(|b| b.images * (b.rows + k - 1)).max().unwrap_or(0) * (s.w + k - 1) * (s.c + c_out);
    if groups == 1 {
        let band_buffer = sized(buffer, band_len);
        for band in &bands {
            band_gradient(precision, x, s, relu, k, dy, *band, band_buffer, dweight, c_out, Threads::Pool);
        }
        return;
    }
    let work = sized(buffer, groups * (band_len + grads));
    let (band_buffers, partials) = work.split_at_mut(groups * band_len);
    band_buffers
        .par_chunks_mut(band_len)
        .zip(partials.par_chunks_mut(grads))
        .zip(bands.par_chunks(per_group))
        .for_each(|((band_buffer, partial), mine)| {
            partial.fill(T::ZERO);
            for band in mine {
                band_gradient(precision, x, s, relu, k, dy, *band, band_buffer, partial, c_out, Threads::Caller);
            }
        });
    let used = bands.len().div_ceil(per_group);
    add_partials(dweight, Mat::dense(c_out, k * k * s.c), &partials[..used * grads]);
}

/// One band's share of [`backward_params_shifted`], added to `dweight`.
#[allow(clippy::too_many_arguments)]
fn band_gradient<T: Real>(
    precision: Precision,
    x: &[T],
    s: Nhwc,
    relu: bool,
    k: usize,
    dy: &[T],
    band: Band,
    buffer: &mut [T],
    dweight: &mut [T],
    c_out: usize,
    threads: Threads,
) {
    let (pad, wp, row) = (k / 2, s.w + k - 1, k * k * s.c);
    let fh = band.rows + k - 1;
    let pixels = band.images * fh * wp;
    let (xs, gs) = buffer[..pixels * (s.c + c_out)].split_at_mut(pixels * s.c);
    // Frame row r of image i holds input row y0 + r - pad and output-gradient row y0 + r.
    for (fr, (xr, gr)) in xs.chunks_exact_mut(wp * s.c).zip(gs.chunks_exact_mut(wp * c_out)).enumerate() {
        let (b, r) = (band.b0 + fr / fh, fr % fh);
        let sy = (band.y0 + r).wrapping_sub(pad);
        if sy < s.h {
            let (left, right) = xr.split_at_mut(pad * s.c);
            let (inside, right) = right.split_at_mut(s.w * s.c);
            left.fill(T::ZERO);
            right.fill(T::ZERO);
            copy_relu(&x[(b * s.h + sy) * s.w * s.c..][..s.w * s.c], inside, relu);
        } else {
            xr.fill(T::ZERO);
        }
        let (inside, right) = gr.split_at_mut(s.w * c_out);
        if r < band.rows {
            inside.copy_from_slice(&dy[(b * s.h + band.y0 + r) * s.w * c_out..][..s.w * c_out]);
        } else {
            inside.fill(T::ZERO);
        }
        right.fill(T::ZERO);
    }
    let n = pixels - ((k - 1) * wp + k - 1);
    if precision == Precision::Bf16 {
        // The frame is packed once for all taps; bf16 GEMMs take f32 buffers (as `matmul_at`).
        const F32: &str = "bf16 GEMMs take f32 buffers";
        let (gs, xs) = (as_f32(gs).expect(F32), as_f32(xs).expect(F32));
        let dweight = as_f32_mut(dweight).expect(F32);
        return frame_weight_gradient(dweight, gs, c_out, xs, s.c, n, wp, k, threads);
    }
    for ky in 0..k {
        matmul_at(
            precision,
            dweight,
            Mat::strided(ky * k * s.c, c_out, k * s.c, row),
            gs,
            Mat::dense(n, c_out).t(),
            xs,
            Mat::strided(ky * wp * s.c, n, k * s.c, s.c),
            true,
            T::ONE,
            threads,
        );
    }
}

/// d loss / d x of [`forward`] from dy [P, c_out]: the convolution of dy with `flipped`
/// [k*k*c_out, c_in] (see [`flip`]; for k = 1, the weight [c_out, c_in] itself), then the
/// ReLU's mask (x >= 0, as candle's ReLU backward) when the forward applied one.
#[allow(clippy::too_many_arguments)]
pub fn backward_input<T: Real>(
    precision: Precision,
    x: &[T],
    s: Nhwc,
    relu: bool,
    k: usize,
    flipped: &[T],
    c_out: usize,
    dy: &[T],
    dx: &mut [T],
    cols: &mut Vec<T>,
) {
    let ds = s.with_channels(c_out);
    let row = k * k * c_out;
    let precision = gemm_precision(precision, s.c, row);
    if k == 1 {
        let p = s.pixels();
        matmul_at(
            precision,
            &mut dx[..p * s.c],
            Mat::dense(p, s.c),
            dy,
            Mat::dense(p, c_out),
            flipped,
            Mat::dense(c_out, s.c),
            false,
            T::ONE,
            Threads::Pool,
        );
    } else if winograd::applies(k, c_out, s.c) {
        winograd::forward(dy, ds, false, flipped, s.c, None, dx, cols);
    } else if direct::applies(k, s.c) && precision == Precision::F32 {
        direct::forward(dy, ds, false, k, flipped, s.c, None, dx, cols);
    } else {
        for_each_tile(dy, ds, k, false, cols, |p0, n, tile| {
            let out = &mut dx[p0 * s.c..(p0 + n) * s.c];
            matmul_at(
                precision,
                out,
                Mat::dense(n, s.c),
                tile,
                Mat::dense(n, row),
                flipped,
                Mat::dense(row, s.c),
                false,
                T::ONE,
                Threads::Pool,
            );
        });
    }
    if relu {
        relu_mask(&x[..s.len()], &mut dx[..s.len()]);
    }
}

multiversion! {
    fn relu_mask_rows<T>(x: &[T], dx: &mut [T]) {
        for (d, &v) in dx.iter_mut().zip(x) {
            *d = if v >= T::ZERO { *d } else { T::ZERO };
        }
    }
}

/// dx *= (x >= 0).
pub fn relu_mask<T: Real>(x: &[T], dx: &mut [T]) {
    dx.par_chunks_mut(16384).zip(x.par_chunks(16384)).for_each(|(d, x)| relu_mask_rows(x, d));
}

/// [c_out, c_in, k, k] (checkpoint layout) -> [k*k*c_in, c_out]: rows in im2col column order,
/// output channels contiguous, the layout the GEMM reads without repacking it for every tile.
///
/// A transpose over blocks of [`PACK_BLOCK`] input and output channels. Each output row's
/// block is written whole, one cache line of f32, from kernel rows that stay in L1: a walk down
/// each output row read the kernel a cache line per value (stride `c_in * k * k`; 10% of a
/// `dall-e` encode's samples), and writing a column of rows at a time thrashed L1, whose sets
/// the power-of-two row strides alias.
pub fn pack<T: Real>(w: &[T], c_out: usize, c_in: usize, k: usize, out: &mut [T]) {
    let kk = k * k;
    assert!(w.len() >= c_out * c_in * kk && out.len() >= kk * c_in * c_out, "pack: buffers too short");
    let out = SharedMut(out.as_mut_ptr());
    (0..c_in.div_ceil(PACK_BLOCK)).into_par_iter().for_each(|block| {
        let dst = out;
        let inputs = block * PACK_BLOCK..((block + 1) * PACK_BLOCK).min(c_in);
        for o0 in (0..c_out).step_by(PACK_BLOCK) {
            let outputs = o0..(o0 + PACK_BLOCK).min(c_out);
            for j in 0..kk {
                for i in inputs.clone() {
                    let row = (j * c_in + i) * c_out;
                    for o in outputs.clone() {
                        // SAFETY: in bounds (checked above); task `block` writes only the rows
                        // (j, i) of its own input channels, which no other task writes.
                        unsafe { *dst.0.add(row + o) = w[(o * c_in + i) * kk + j] };
                    }
                }
            }
        }
    });
}

/// Input and output channels per block of [`pack`]'s transpose: a cache line of f32 on the
/// output side.
const PACK_BLOCK: usize = 16;

/// [c_out, c_in, k, k] -> [k*k*c_out, c_in] with the window reversed: the kernel whose "same"
/// convolution of dy is d loss / d x, in [`pack`]'s layout.
///
/// One output channel's kernel at a time, so that its taps are read from cache for every tap's
/// row (a task per tap read the whole kernel from memory once per tap).
pub fn flip<T: Real>(w: &[T], c_out: usize, c_in: usize, k: usize, out: &mut [T]) {
    let kk = k * k;
    assert!(w.len() >= c_out * c_in * kk && out.len() >= kk * c_out * c_in, "flip: buffers too short");
    let out = SharedMut(out.as_mut_ptr());
    w[..c_out * c_in * kk].par_chunks(c_in * kk).enumerate().for_each(|(o, taps)| {
        let dst = out;
        for j in 0..kk {
            // SAFETY: in bounds (checked above); row (tap, o) is written by task `o` only.
            let row = unsafe { std::slice::from_raw_parts_mut(dst.0.add(((kk - 1 - j) * c_out + o) * c_in), c_in) };
            for (d, tap) in row.iter_mut().zip(taps.chunks_exact(kk)) {
                *d = tap[j];
            }
        }
    });
}

/// The adjoint of [`pack`]: adds packed [c_out, k*k*c_in] gradients to a checkpoint-layout one.
pub fn unpack_add<T: Real>(packed: &[T], c_in: usize, k: usize, out: &mut [T]) {
    out.par_chunks_mut(c_in * k * k).enumerate().for_each(|(o, dst)| {
        for i in 0..c_in {
            for j in 0..k * k {
                dst[i * k * k + j] += packed[o * k * k * c_in + j * c_in + i];
            }
        }
    });
}

/// 2x2 max-pooling, stride 2.
pub fn max_pool2<T: Real>(x: &[T], s: Nhwc, y: &mut [T]) {
    let row = s.w / 2 * s.c;
    y[..s.len() / 4].par_chunks_mut(row).enumerate().for_each(|(boy, out)| max_pool2_row(x, s, boy, out, None));
}

/// Output row `boy` (an image's row of windows) of [`max_pool2`]: each window's first maximum
/// (row-major), and where it lies (0-3) into `at_max` when given.
fn max_pool2_row<T: Real>(x: &[T], s: Nhwc, boy: usize, out: &mut [T], mut at_max: Option<&mut [u8]>) {
    let (oh, ow, c) = (s.h / 2, s.w / 2, s.c);
    let (bi, oy) = (boy / oh, boy % oh);
    for ox in 0..ow {
        let at = |dy: usize, dx: usize| ((bi * s.h + 2 * oy + dy) * s.w + 2 * ox + dx) * c;
        let window = [at(0, 0), at(0, 1), at(1, 0), at(1, 1)];
        for ch in 0..c {
            let (mut m, mut k) = (x[window[0] + ch], 0);
            for (j, &w) in window.iter().enumerate().skip(1) {
                if x[w + ch] > m {
                    (m, k) = (x[w + ch], j);
                }
            }
            out[ox * c + ch] = m;
            if let Some(at_max) = at_max.as_deref_mut() {
                at_max[ox * c + ch] = k as u8;
            }
        }
    }
}

/// Backward of [`max_pool2`]: each window's gradient goes to its first maximum (row-major).
pub fn max_pool2_backward<T: Real>(x: &[T], s: Nhwc, y: &[T], dy: &[T], dx: &mut [T]) {
    max_pool2_scatter(s, dy, dx, |o, window| window.iter().position(|&i| x[i] == y[o]));
}

/// dx of a 2x2 max pooling from dy: each output's gradient goes to the window position (0-3,
/// row-major) that `pick` gives for the output's index and its window's input indices; none
/// (a NaN window) gets nothing.
fn max_pool2_scatter<T: Real>(
    s: Nhwc,
    dy: &[T],
    dx: &mut [T],
    pick: impl Fn(usize, [usize; 4]) -> Option<usize> + Sync,
) {
    let (oh, ow, c) = (s.h / 2, s.w / 2, s.c);
    dx[..s.len()].par_chunks_mut(2 * s.w * c).enumerate().for_each(|(boy, out)| {
        out.fill(T::ZERO);
        let (bi, oy) = (boy / oh, boy % oh);
        for ox in 0..ow {
            for ch in 0..c {
                let o = ((bi * oh + oy) * ow + ox) * c + ch;
                let window = [(0, 0), (0, 1), (1, 0), (1, 1)]
                    .map(|(ddy, ddx)| ((bi * s.h + 2 * oy + ddy) * s.w + 2 * ox + ddx) * c + ch);
                if let Some(k) = pick(o, window) {
                    out[((k / 2) * s.w + 2 * ox + k % 2) * c + ch] = dy[o];
                }
            }
        }
    });
}

/// [`max_pool2`] that also records where each window's first maximum (row-major) lies, 0-3,
/// so that a training pass can drop the input: [`max_pool2_backward_at`] needs only these.
pub fn max_pool2_argmax<T: Real>(x: &[T], s: Nhwc, y: &mut [T], argmax: &mut [u8]) {
    let (n, row) = (s.len() / 4, s.w / 2 * s.c);
    let rows = y[..n].par_chunks_mut(row).zip(argmax[..n].par_chunks_mut(row));
    rows.enumerate().for_each(|(boy, (out, at_max))| max_pool2_row(x, s, boy, out, Some(at_max)));
}

/// Backward of [`max_pool2_argmax`] from its recorded positions: each window's gradient goes
/// to its first maximum, as [`max_pool2_backward`].
pub fn max_pool2_backward_at<T: Real>(argmax: &[u8], s: Nhwc, dy: &[T], dx: &mut [T]) {
    max_pool2_scatter(s, dy, dx, |o, _| Some(argmax[o] as usize));
}

/// 2x nearest-neighbour upsampling: [b, h, w, c] -> [b, 2h, 2w, c].
pub fn upsample2<T: Real>(x: &[T], s: Nhwc, y: &mut [T]) {
    let c = s.c;
    y[..4 * s.len()].par_chunks_mut(2 * s.w * c).enumerate().for_each(|(boy, out)| {
        let (bi, iy) = (boy / (2 * s.h), boy % (2 * s.h) / 2);
        for ix in 0..s.w {
            let src = &x[((bi * s.h + iy) * s.w + ix) * c..][..c];
            out[2 * ix * c..][..c].copy_from_slice(src);
            out[(2 * ix + 1) * c..][..c].copy_from_slice(src);
        }
    });
}

/// Backward of [`upsample2`] (`s`: the input's dimensions): the sum of each 2x2 block.
pub fn upsample2_backward<T: Real>(dy: &[T], s: Nhwc, dx: &mut [T]) {
    let c = s.c;
    dx[..s.len()].par_chunks_mut(s.w * c).enumerate().for_each(|(biy, out)| {
        let (bi, iy) = (biy / s.h, biy % s.h);
        for ix in 0..s.w {
            let o = &mut out[ix * c..][..c];
            o.fill(T::ZERO);
            for (ddy, ddx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                let src = &dy[((bi * 2 * s.h + 2 * iy + ddy) * 2 * s.w + 2 * ix + ddx) * c..][..c];
                for (d, &v) in o.iter_mut().zip(src) {
                    *d += v;
                }
            }
        }
    });
}
