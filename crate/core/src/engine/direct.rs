//! "Same" 3x3 convolutions into few channels (at most [`MAX_CHANNELS`]), summed directly: each
//! output pixel's channels are one vector of accumulators, and every input value of its window,
//! read from a zero-padded copy of the k input rows around it, is multiplied by the kernel's row
//! for that tap and channel. An im2col GEMM with 8 output columns spends most of its time
//! writing and reading the columns (k*k copies of the input) and runs its micro-kernel on tiles
//! mostly of padding: the `tiny` tokenizer's im2col passes took over half of its encode. Here
//! its 28 px layers (32 -> 8 and 8 -> 8 channels, batch 64, 2 threads) run 1.5-1.7x faster.
//! The sums run in im2col's order (taps row by row, channels within), in f32 or f64 as the
//! buffers are, with AVX's 8-lane registers for f32 into 8 channels or fewer (the same products
//! and sums in the same order, so every SIMD level gives the same bits). [`super::conv`] sends
//! here only what would be an f32 GEMM (under bf16 too, all GEMMs into fewer than 16 channels,
//! see [`super::conv::gemm_precision`]), so the numbers stay those of an f32 im2col but for the
//! order of the rounding.

use rayon::prelude::*;

use super::conv::Nhwc;
#[cfg(target_arch = "x86_64")]
use super::simd::{as_f32, as_f32_mut};
use super::simd::{multiversion, Real};
use super::sized;

/// Most output channels (one AVX-512 register of f32 accumulators per pixel).
pub const MAX_CHANNELS: usize = 16;
/// Output pixels summed together: 8 vectors of accumulators, each kernel row read once for all.
const PIXELS: usize = 8;

/// Whether a k x k convolution into `c_out` channels runs here: 3x3 ones (the sums below take
/// any odd k; the tests cover 3).
pub fn applies(k: usize, c_out: usize) -> bool {
    k == 3 && c_out <= MAX_CHANNELS
}

/// y [pixels, c_out] = f(x) * kernel + bias, f = ReLU when `relu`, for `packed` in
/// [`super::conv::pack`]'s layout ([k*k*c_in, c_out]). `scratch` holds the kernel's rows padded
/// to [`MAX_CHANNELS`].
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Real>(
    x: &[T],
    s: Nhwc,
    relu: bool,
    k: usize,
    packed: &[T],
    c_out: usize,
    bias: Option<&[T]>,
    y: &mut [T],
    scratch: &mut Vec<T>,
) {
    assert!(applies(k, c_out), "direct convolution: {k}x{k} into {c_out} channels");
    let taps = k * k * s.c;
    assert!(packed.len() >= taps * c_out && x.len() >= s.len() && y.len() >= s.pixels() * c_out);
    let rows = sized(scratch, taps * MAX_CHANNELS);
    for (row, w) in rows.chunks_exact_mut(MAX_CHANNELS).zip(packed.chunks_exact(c_out)) {
        row[..c_out].copy_from_slice(w);
        row[c_out..].fill(T::ZERO);
    }
    let rows = &*rows;
    // Each rayon job gets one strip buffer (a few KB) for all the rows it computes.
    let strip_len = k * (s.w + k - 1) * s.c;
    let y = &mut y[..s.pixels() * c_out];
    #[cfg(target_arch = "x86_64")]
    if c_out <= 8 && super::simd::level() != super::simd::Level::Baseline {
        if let (Some(x), Some(rows), Some(y)) = (as_f32(x), as_f32(rows), as_f32_mut(y)) {
            let bias = bias.map(|b| as_f32(b).expect("f32 like the rest"));
            y.par_chunks_mut(s.w * c_out).enumerate().for_each_init(
                || vec![0f32; strip_len],
                // SAFETY: the level says the CPU has AVX2 (so AVX).
                |strip, (line, out)| unsafe { output_row_avx8(x, s, relu, k, line, rows, c_out, bias, strip, out) },
            );
            return;
        }
    }
    y.par_chunks_mut(s.w * c_out).enumerate().for_each_init(
        || vec![T::ZERO; strip_len],
        |strip, (line, out)| output_row(x, s, relu, k, line, rows, c_out, bias, strip, out),
    );
}

/// The k input rows around output row `line` (image line / s.h, row line % s.h) into `strip`
/// ([k][s.w + k - 1][c]): ReLU applied when `relu`, zero outside the image.
#[inline(always)]
fn fill_strip<T: Real>(x: &[T], s: Nhwc, relu: bool, k: usize, line: usize, strip: &mut [T]) {
    let (b, yy, pad) = (line / s.h, line % s.h, (k - 1) / 2);
    for (ky, padded) in strip.chunks_exact_mut((s.w + k - 1) * s.c).enumerate() {
        let sy = (yy + ky).wrapping_sub(pad);
        padded.fill(T::ZERO);
        if sy < s.h {
            let src = &x[(b * s.h + sy) * s.w * s.c..][..s.w * s.c];
            let dst = &mut padded[pad * s.c..][..s.w * s.c];
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = if relu { v.max_v(T::ZERO) } else { v };
            }
        }
    }
}

multiversion! {
    /// Output row `line` into `out` [s.w, c_out].
    #[allow(clippy::too_many_arguments)]
    fn output_row<T>(
        x: &[T],
        s: Nhwc,
        relu: bool,
        k: usize,
        line: usize,
        rows: &[T],
        c_out: usize,
        bias: Option<&[T]>,
        strip: &mut [T],
        out: &mut [T],
    ) {
        fill_strip(x, s, relu, k, line, strip);
        let width = s.w + k - 1;
        let mut x0 = 0;
        while x0 + PIXELS <= s.w {
            pixels::<T, PIXELS>(strip, width, s.c, k, x0, rows, c_out, bias, out);
            x0 += PIXELS;
        }
        while x0 + 4 <= s.w {
            pixels::<T, 4>(strip, width, s.c, k, x0, rows, c_out, bias, out);
            x0 += 4;
        }
        for x0 in x0..s.w {
            pixels::<T, 1>(strip, width, s.c, k, x0, rows, c_out, bias, out);
        }
    }
}

/// [`output_row`] for f32 into at most 8 channels, with AVX's 8-lane registers (the generic
/// sums use 16 lanes, half of them padding here): the same products and sums in the same order.
///
/// # Safety
/// The CPU has AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[allow(clippy::too_many_arguments)]
unsafe fn output_row_avx8(
    x: &[f32],
    s: Nhwc,
    relu: bool,
    k: usize,
    line: usize,
    rows: &[f32],
    c_out: usize,
    bias: Option<&[f32]>,
    strip: &mut [f32],
    out: &mut [f32],
) {
    fill_strip(x, s, relu, k, line, strip);
    let width = s.w + k - 1;
    assert!(c_out <= 8 && strip.len() >= k * width * s.c && rows.len() >= k * k * s.c * MAX_CHANNELS);
    assert!(out.len() >= s.w * c_out);
    let mut x0 = 0;
    while x0 + AVX8_PIXELS <= s.w {
        pixels_avx8::<AVX8_PIXELS>(strip, width, s.c, k, x0, rows, c_out, bias, out);
        x0 += AVX8_PIXELS;
    }
    // The rest in fours: one pixel's sums alone are one chain of dependent additions.
    while x0 + 4 <= s.w {
        pixels_avx8::<4>(strip, width, s.c, k, x0, rows, c_out, bias, out);
        x0 += 4;
    }
    for x0 in x0..s.w {
        pixels_avx8::<1>(strip, width, s.c, k, x0, rows, c_out, bias, out);
    }
}

/// Output pixels summed together by [`output_row_avx8`]: 12 registers of accumulators.
#[cfg(target_arch = "x86_64")]
const AVX8_PIXELS: usize = 12;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn pixels_avx8<const P: usize>(
    strip: &[f32],
    width: usize,
    c: usize,
    k: usize,
    x0: usize,
    rows: &[f32],
    c_out: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); P];
    for ky in 0..k {
        for kx in 0..k {
            // SAFETY (the reads): pixels x0..x0 + P of taps (ky, kx) lie in the strip, and the
            // kernel rows of those taps in `rows` (the caller's bounds).
            let inputs = strip.as_ptr().add((ky * width + x0 + kx) * c);
            let kernel = rows.as_ptr().add((ky * k + kx) * c * MAX_CHANNELS);
            for i in 0..c {
                let w = _mm256_loadu_ps(kernel.add(i * MAX_CHANNELS));
                for (j, a) in acc.iter_mut().enumerate() {
                    let v = _mm256_broadcast_ss(&*inputs.add(j * c + i));
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(v, w));
                }
            }
        }
    }
    let mut sums = [0f32; 8];
    for (j, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(sums.as_mut_ptr(), *a);
        store(&sums, bias, &mut out[(x0 + j) * c_out..][..c_out]);
    }
}

/// Output pixels x0..x0 + P of a row from its padded input rows `strip` ([k][width][c]).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn pixels<T: Real, const P: usize>(
    strip: &[T],
    width: usize,
    c: usize,
    k: usize,
    x0: usize,
    rows: &[T],
    c_out: usize,
    bias: Option<&[T]>,
    out: &mut [T],
) {
    let mut acc = [[T::ZERO; MAX_CHANNELS]; P];
    for ky in 0..k {
        for kx in 0..k {
            let inputs = &strip[(ky * width + x0 + kx) * c..];
            let kernel = &rows[(ky * k + kx) * c * MAX_CHANNELS..][..c * MAX_CHANNELS];
            for (i, w) in kernel.chunks_exact(MAX_CHANNELS).enumerate() {
                let w: &[T; MAX_CHANNELS] = w.try_into().expect("a kernel row");
                for (j, a) in acc.iter_mut().enumerate() {
                    let v = inputs[j * c + i];
                    for (a, &w) in a.iter_mut().zip(w) {
                        *a += v * w;
                    }
                }
            }
        }
    }
    for (j, a) in acc.iter().enumerate() {
        store(a, bias, &mut out[(x0 + j) * c_out..][..c_out]);
    }
}

/// One pixel's outputs: its sums (the first dst.len() of them) plus the bias when given.
#[inline(always)]
fn store<T: Real>(sums: &[T], bias: Option<&[T]>, dst: &mut [T]) {
    match bias {
        Some(bias) => {
            for ((d, &a), &b) in dst.iter_mut().zip(sums).zip(bias) {
                *d = a + b;
            }
        }
        None => dst.copy_from_slice(&sums[..dst.len()]),
    }
}
