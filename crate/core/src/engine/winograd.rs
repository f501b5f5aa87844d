//! 3x3 "same" convolutions by Winograd's minimal filtering (Lavin and Gray, "Fast Algorithms for
//! Convolutional Neural Networks", 2016). F(4x4, 3x3) makes a 4x4 block of outputs from a 6x6
//! input tile with 36 multiplies per channel pair instead of im2col's 144 (4x less GEMM work);
//! F(2x2, 3x3) a 2x2 block from a 4x4 tile with 16 instead of 36 (2.25x). Each convolution takes
//! the one with fewer multiplies ([`block_side`]): F(4x4) unless the image is so small (2 rows,
//! say) that most of a 4x4 block would fall outside it, or the kernel so wide that its 36
//! transformed copies would pass `KERNEL_VALUES`. Tiles are transformed (B^T d B), multiplied
//! by the transformed kernel (G g G^T) in one GEMM per point of the transform domain, and
//! transformed back (A^T m A). The transforms only add, subtract and scale by 2, 4, 5 or 8
//! (F(4x4): interpolation points 0, 1, -1, 2, -2, infinity) or halve (F(2x2)). The input gradient
//! is this same pass with the flipped kernel.
//!
//! F(4x4, 3x3) rounds more: in f32 its forward and input gradient differ from the exact
//! convolution by 2-5e-6 (relative RMS), against 4-7e-7 for F(2x2) (on the segmentation head's
//! shapes), which the split-batch trajectories (`tests/steps.rs`) and the transformers
//! parity fixtures hold within their tolerances. The weight gradient stays a direct sum
//! ([`super::conv`]): done the Winograd way (G^T [sum over tiles of (A dy A^T) . (B^T d B)] G) it
//! rounded ~10x worse already with F(2x2), enough to move a 3-step AdamW trajectory of a batch
//! split in halves against the whole batch from 1e-6 to 1e-5 of the weights. Under bf16 that
//! rule turns around: the direct sum then reads bf16-rounded inputs (2.4e-3 off the exact sum),
//! the Winograd way in f32 ([`weight_gradient`]) is 1.75e-6 off at a quarter of the multiplies,
//! and the segmenter's bf16 step takes it (see [`super::conv::backward_params_f32_activations`]).
//!
//! Buffers are [`super::conv`]'s: kernels in its packed layout, activations NHWC, and every
//! intermediate in the caller's `cols`, so a steady training step allocates nothing here.

use rayon::prelude::*;

use super::conv::Nhwc;
use super::matmul::{matmul_raw_at, Mat, Threads};
use super::simd::{multiversion, Real};
use super::{sized, SharedMut};
use crate::config::Precision;

/// Values of one chunk's transformed tiles (the larger of input and output side): 2M, 8 MB of
/// f32, as [`super::conv`]'s im2col tiles.
const CHUNK_VALUES: usize = 1 << 21;
/// Points (rows of channels) of the transformed tiles per parallel task of the input and output
/// transforms: 8 tiles of F(2x2, 3x3), 3 of F(4x4, 3x3).
const POINTS_PER_TASK: usize = 128;
/// Entries of a kernel's tap matrices per task of its transform: 9 x 2 KB of f32 read, 36 x 2 KB
/// written, in L1.
const KERNEL_BLOCK: usize = 512;
/// Most values of a transformed kernel for F(4x4, 3x3): 16M, 64 MB of f32. The widest kernels
/// (DALL-E's 2048 -> 512) would take 151 MB as 36 transformed copies, enough to lift the
/// tokenizer step's peak memory above PyTorch's; F(2x2) keeps them at 16 copies.
const KERNEL_VALUES: usize = 1 << 24;
/// Fewer channels than this on either side and the GEMMs are too thin to pay for the
/// transforms: im2col stays.
const MIN_CHANNELS: usize = 16;

/// G's rows for F(2x2, 3x3): one 3-tap filter to 4 points (0, 1, -1, infinity).
const G2: [[f64; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];
/// G's rows for F(4x4, 3x3): one 3-tap filter to 6 points (0, 1, -1, 2, -2, infinity).
const G4: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// Whether a k x k convolution from `c_in` to `c_out` channels runs here.
pub fn applies(k: usize, c_in: usize, c_out: usize) -> bool {
    k == 3 && c_in >= MIN_CHANNELS && c_out >= MIN_CHANNELS
}

/// Side of the block of outputs per tile, 2 or 4, for an h x w image and a `c_in` -> `c_out`
/// kernel: 2 where F(4x4)'s transformed kernel (36 copies of c_in x c_out, against F(2x2)'s 16)
/// would exceed `KERNEL_VALUES` (a private bound), else whichever needs fewer multiplies (on a
/// tie 2, which rounds less): 4 unless the image is so small that much of a 4x4 block would fall
/// outside it.
pub fn block_side(h: usize, w: usize, c_in: usize, c_out: usize) -> usize {
    let multiplies = |m: usize| h.div_ceil(m) * w.div_ceil(m) * (m + 2) * (m + 2);
    if Tiling::points_of(4) * c_in * c_out <= KERNEL_VALUES && multiplies(4) < multiplies(2) {
        4
    } else {
        2
    }
}

/// The tiling of an image batch: `tiles_h` x `tiles_w` tiles of `block` x `block` outputs per
/// image, processed in chunks of whole tile rows.
#[derive(Clone, Copy)]
struct Tiling {
    s: Nhwc,
    block: usize,
    tiles_h: usize,
    tiles_w: usize,
    rows_per_chunk: usize,
}

impl Tiling {
    fn new(s: Nhwc, block: usize, widest: usize) -> Self {
        let (tiles_h, tiles_w) = (s.h.div_ceil(block), s.w.div_ceil(block));
        let rows_per_chunk = (CHUNK_VALUES / (Self::points_of(block) * widest * tiles_w)).max(1);
        Self { s, block, tiles_h, tiles_w, rows_per_chunk }
    }

    fn points_of(block: usize) -> usize {
        (block + 2) * (block + 2)
    }

    /// Points of the transform domain: (block + 2)^2, one input tile.
    fn points(&self) -> usize {
        Self::points_of(self.block)
    }

    fn tile_rows(&self) -> usize {
        self.s.b * self.tiles_h
    }

    fn chunk_tiles(&self) -> usize {
        self.rows_per_chunk.min(self.tile_rows()) * self.tiles_w
    }

    /// (first tile, tile count) of each chunk.
    fn chunks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.tile_rows())
            .step_by(self.rows_per_chunk)
            .map(|r| (r * self.tiles_w, (self.rows_per_chunk.min(self.tile_rows() - r)) * self.tiles_w))
    }

    /// (image, top output row, left output column) of tile `t`.
    fn origin(&self, t: usize) -> (usize, usize, usize) {
        let (row, tx) = (t / self.tiles_w, t % self.tiles_w);
        (row / self.tiles_h, self.block * (row % self.tiles_h), self.block * tx)
    }

    /// Tiles per parallel task of the input and output transforms.
    fn tiles_per_task(&self) -> usize {
        (POINTS_PER_TASK / self.points()).max(1)
    }
}

/// Rows of `n` values of one line of a tile, equally long.
type Line<'a, T, const N: usize> = [&'a mut [T]; N];

/// The 1-D input transform of F(2x2, 3x3), B^T on four rows, in place:
/// (d0 - d2, d1 + d2, d2 - d1, d1 - d3).
#[inline(always)]
fn input_transform_2<T: Real>(rows: Line<'_, T, 4>) {
    let [r0, r1, r2, r3] = rows;
    let n = r0.len();
    let (r1, r2, r3) = (&mut r1[..n], &mut r2[..n], &mut r3[..n]);
    for i in 0..n {
        let (d0, d1, d2, d3) = (r0[i], r1[i], r2[i], r3[i]);
        r0[i] = d0 - d2;
        r1[i] = d1 + d2;
        r2[i] = d2 - d1;
        r3[i] = d1 - d3;
    }
}

/// The 1-D output transform of F(2x2, 3x3), A^T on four rows, into the first two:
/// (m0 + m1 + m2, m1 - m2 - m3).
#[inline(always)]
fn output_transform_2<T: Real>(rows: Line<'_, T, 4>) {
    let [r0, r1, r2, r3] = rows;
    let n = r0.len();
    let (r1, r2, r3) = (&mut r1[..n], &r2[..n], &r3[..n]);
    for i in 0..n {
        let (m0, m1) = (r0[i], r1[i]);
        r0[i] = m0 + m1 + r2[i];
        r1[i] = m1 - r2[i] - r3[i];
    }
}

/// The 1-D input transform of F(4x4, 3x3), B^T on six rows, in place:
/// (4 d0 - 5 d2 + d4, (d4 - 4 d2) +- (d3 - 4 d1), (d4 - d2) +- 2 (d3 - d1), 4 d1 - 5 d3 + d5).
#[inline(always)]
fn input_transform_4<T: Real>(rows: Line<'_, T, 6>) {
    let [r0, r1, r2, r3, r4, r5] = rows;
    let n = r0.len();
    let (r1, r2, r3, r4, r5) = (&mut r1[..n], &mut r2[..n], &mut r3[..n], &mut r4[..n], &mut r5[..n]);
    let (two, four, five) = (T::from_f64(2.0), T::from_f64(4.0), T::from_f64(5.0));
    for i in 0..n {
        let (d0, d1, d2, d3, d4, d5) = (r0[i], r1[i], r2[i], r3[i], r4[i], r5[i]);
        let (near, far) = (d4 - four * d2, d3 - four * d1);
        let (even, odd) = (d4 - d2, two * (d3 - d1));
        r0[i] = four * d0 - five * d2 + d4;
        r1[i] = near + far;
        r2[i] = near - far;
        r3[i] = even + odd;
        r4[i] = even - odd;
        r5[i] = four * d1 - five * d3 + d5;
    }
}

/// The 1-D output transform of F(4x4, 3x3), A^T on six rows, into the first four:
/// (m0 + a + c, b + 2 d, a + 4 c, b + 8 d + m5) with a, b = m1 +- m2 and c, d = m3 +- m4.
#[inline(always)]
fn output_transform_4<T: Real>(rows: Line<'_, T, 6>) {
    let [r0, r1, r2, r3, r4, r5] = rows;
    let n = r0.len();
    let (r1, r2, r3, r4, r5) = (&mut r1[..n], &mut r2[..n], &mut r3[..n], &r4[..n], &r5[..n]);
    let (two, four, eight) = (T::from_f64(2.0), T::from_f64(4.0), T::from_f64(8.0));
    for i in 0..n {
        let (m0, m5) = (r0[i], r5[i]);
        let (a, b) = (r1[i] + r2[i], r1[i] - r2[i]);
        let (c, d) = (r3[i] + r4[i], r3[i] - r4[i]);
        r0[i] = m0 + a + c;
        r1[i] = b + two * d;
        r2[i] = a + four * c;
        r3[i] = b + eight * d + m5;
    }
}

/// Applies a 1-D transform along both axes of an N x N tile of rows of `c` values: down each
/// column, then along the first `rows_out` rows of the result (N for B^T; N - 2 for A^T, whose
/// results are N - 2 long).
#[inline(always)]
fn transform_2d<T: Real, const N: usize>(tile: &mut [T], c: usize, rows_out: usize, f: impl Fn(Line<'_, T, N>)) {
    let mut it = tile.chunks_exact_mut(c);
    let mut grid: [Line<'_, T, N>; N] =
        std::array::from_fn(|_| std::array::from_fn(|_| it.next().expect("a tile holds N x N rows")));
    for column in 0..N {
        f(grid.each_mut().map(|row| &mut *row[column]));
    }
    for row in grid.iter_mut().take(rows_out) {
        f(row.each_mut().map(|r| &mut **r));
    }
}

/// The input transforms of tiles first.. into `out` ([tiles][N * N][c]) for N = block + 2.
#[inline(always)]
fn input_tiles_of<T: Real, const N: usize>(
    x: &[T],
    tiling: Tiling,
    relu: bool,
    first: usize,
    out: &mut [T],
    f: impl Fn(Line<'_, T, N>) + Copy,
) {
    let (s, c) = (tiling.s, tiling.s.c);
    for (i, tile) in out.chunks_exact_mut(N * N * c).enumerate() {
        let (b, y0, x0) = tiling.origin(first + i);
        for (p, dst) in tile.chunks_exact_mut(c).enumerate() {
            let (sy, sx) = ((y0 + p / N).wrapping_sub(1), (x0 + p % N).wrapping_sub(1));
            if sy < s.h && sx < s.w {
                let src = &x[((b * s.h + sy) * s.w + sx) * c..][..c];
                if relu {
                    for (d, &v) in dst.iter_mut().zip(src) {
                        *d = v.max_v(T::ZERO);
                    }
                } else {
                    dst.copy_from_slice(src);
                }
            } else {
                dst.fill(T::ZERO);
            }
        }
        transform_2d(tile, c, N, f);
    }
}

/// The output transforms of tiles first.. (`m`: [tiles][N * N][c], transformed in place) plus
/// `bias`, written to the outputs of `y` inside the image.
#[inline(always)]
fn output_tiles_of<T: Real, const N: usize>(
    m: &mut [T],
    tiling: Tiling,
    bias: Option<&[T]>,
    first: usize,
    y: SharedMut<T>,
    f: impl Fn(Line<'_, T, N>) + Copy,
) {
    let (s, c, block) = (tiling.s, tiling.s.c, N - 2);
    for (i, tile) in m.chunks_exact_mut(N * N * c).enumerate() {
        transform_2d(tile, c, block, f);
        let (b, y0, x0) = tiling.origin(first + i);
        // Output (dy, dx) of the block is row dy * N + dx of the transformed tile.
        for p in 0..block * block {
            let (dy, dx) = (p / block, p % block);
            let (oy, ox) = (y0 + dy, x0 + dx);
            if oy >= s.h || ox >= s.w {
                continue;
            }
            let row = dy * N + dx;
            let src = &tile[row * c..(row + 1) * c];
            // SAFETY: each output pixel belongs to exactly one tile, and each tile to one task.
            let dst = unsafe { std::slice::from_raw_parts_mut(y.0.add(((b * s.h + oy) * s.w + ox) * c), c) };
            match bias {
                Some(bias) => {
                    for ((d, &v), &b) in dst.iter_mut().zip(src).zip(bias) {
                        *d = v + b;
                    }
                }
                None => dst.copy_from_slice(src),
            }
        }
    }
}

multiversion! {
    /// B^T d B of tiles first.. into `out` ([tiles][points][c]), d the input patch of f(x) one
    /// pixel up and left of the tile's outputs (0 outside the image), f = ReLU when `relu`.
    fn input_tiles<T>(x: &[T], tiling: Tiling, relu: bool, first: usize, out: &mut [T]) {
        match tiling.block {
            2 => input_tiles_of::<T, 4>(x, tiling, relu, first, out, input_transform_2),
            _ => input_tiles_of::<T, 6>(x, tiling, relu, first, out, input_transform_4),
        }
    }
}

multiversion! {
    /// A^T m A of tiles first.. (`m`: [tiles][points][c], transformed in place) plus `bias`,
    /// written to the outputs of `y` inside the image.
    fn output_tiles<T>(m: &mut [T], tiling: Tiling, bias: Option<&[T]>, first: usize, y: SharedMut<T>) {
        match tiling.block {
            2 => output_tiles_of::<T, 4>(m, tiling, bias, first, y, output_transform_2),
            _ => output_tiles_of::<T, 6>(m, tiling, bias, first, y, output_transform_4),
        }
    }
}

/// G g G^T of a kernel in [`super::conv::pack`]'s layout ([9][c_in][c_out]) into `u`
/// ([points][c_in][c_out]): each point a weighted sum of the nine taps' matrices, computed over
/// blocks of [`KERNEL_BLOCK`] entries so that the taps are read from memory once, not once per
/// point (36 times for F(4x4): the wide kernels of a small batch spent more time here than in
/// their GEMMs).
fn transform_kernel<T: Real>(packed: &[T], block: usize, c_in: usize, c_out: usize, u: &mut [T]) {
    let n = c_in * c_out;
    let coefs = &kernel_coefs::<T>(block)[..];
    assert!(packed.len() >= 9 * n && u.len() >= coefs.len() * n);
    let u = SharedMut(u.as_mut_ptr());
    (0..n.div_ceil(KERNEL_BLOCK)).into_par_iter().for_each(|b| {
        let first = b * KERNEL_BLOCK;
        kernel_block(packed, n, first, KERNEL_BLOCK.min(n - first), coefs, u);
    });
}

multiversion! {
    /// Entries first..first + len of every point of [`transform_kernel`]'s `u`.
    fn kernel_block<T>(packed: &[T], n: usize, first: usize, len: usize, coefs: &[[T; 9]], u: SharedMut<T>) {
        for (point, c) in coefs.iter().enumerate() {
            // SAFETY: `u` holds coefs.len() * n values (checked by the caller), and each task
            // writes only its own entries first..first + len of every point.
            let dst = unsafe { std::slice::from_raw_parts_mut(u.0.add(point * n + first), len) };
            dst.fill(T::ZERO);
            for (tap, &coef) in c.iter().enumerate() {
                if coef != T::ZERO {
                    for (d, &w) in dst.iter_mut().zip(&packed[tap * n + first..][..len]) {
                        *d += coef * w;
                    }
                }
            }
        }
    }
}

/// The GEMMs of a chunk, one per point of the transform domain: out[t][point] = lhs[t][point] .
/// rhs[point] for `lhs` [tiles][points][k] and `rhs` [points][k][n], `out` [tiles][points][n];
/// one point per task.
fn pointwise_products<T: Real>(lhs: &[T], tiles: usize, points: usize, k: usize, rhs: &[T], n: usize, out: &mut [T]) {
    assert!(lhs.len() >= tiles * points * k && rhs.len() >= points * k * n && out.len() >= tiles * points * n);
    let dst = SharedMut(out.as_mut_ptr());
    (0..points).into_par_iter().for_each(|point| {
        let (a, d) = (Mat::strided(point * k, tiles, k, points * k), Mat::strided(point * n, tiles, n, points * n));
        let out = dst;
        // SAFETY: the views lie in buffers checked above; point `point` writes only its own
        // columns point*n.. of each tile's row block, which no other task touches.
        unsafe {
            matmul_raw_at(
                Precision::F32,
                out.0,
                d,
                lhs.as_ptr(),
                a,
                rhs.as_ptr(),
                Mat::strided(point * k * n, k, n, n),
                false,
                T::ONE,
                Threads::Caller,
            )
        }
    });
}

/// The convolution of f(x) with a kernel in [`super::conv::pack`]'s layout ([9 * c_in, c_out]),
/// f = ReLU when `relu`, plus `bias` when given: y [pixels, c_out].
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Real>(
    x: &[T],
    s: Nhwc,
    relu: bool,
    packed: &[T],
    c_out: usize,
    bias: Option<&[T]>,
    y: &mut [T],
    cols: &mut Vec<T>,
) {
    let tiling = Tiling::new(s, block_side(s.h, s.w, s.c, c_out), s.c.max(c_out));
    let (points, per_chunk, per_task) = (tiling.points(), tiling.chunk_tiles(), tiling.tiles_per_task());
    let kernel = points * s.c * c_out;
    let buffers = sized(cols, kernel + per_chunk * points * (s.c + c_out));
    let (u, rest) = buffers.split_at_mut(kernel);
    let (v, m) = rest.split_at_mut(per_chunk * points * s.c);
    transform_kernel(packed, tiling.block, s.c, c_out, u);
    let (out_tiling, y_len) = (Tiling { s: s.with_channels(c_out), ..tiling }, s.pixels() * c_out);
    assert!(y.len() >= y_len, "winograd: output of {} values, expected {y_len}", y.len());
    let y = SharedMut(y.as_mut_ptr());
    for (first, tiles) in tiling.chunks() {
        let v = &mut v[..tiles * points * s.c];
        v.par_chunks_mut(per_task * points * s.c)
            .enumerate()
            .for_each(|(task, out)| input_tiles(x, tiling, relu, first + task * per_task, out));
        let m = &mut m[..tiles * points * c_out];
        pointwise_products(v, tiles, points, s.c, u, c_out, m);
        m.par_chunks_mut(per_task * points * c_out)
            .enumerate()
            .for_each(|(task, tile)| output_tiles(tile, out_tiling, bias, first + task * per_task, y));
    }
}

/// The 1-D transform of F(2x2, 3x3)'s output gradient, A on two values into four rows, in place
/// (the transpose of [`output_transform_2`]): (g0, g0 + g1, g0 - g1, -g1).
#[inline(always)]
fn gradient_transform_2<T: Real>(rows: Line<'_, T, 4>) {
    let [r0, r1, r2, r3] = rows;
    let n = r0.len();
    let (r1, r2, r3) = (&mut r1[..n], &mut r2[..n], &mut r3[..n]);
    for i in 0..n {
        let (g0, g1) = (r0[i], r1[i]);
        r1[i] = g0 + g1;
        r2[i] = g0 - g1;
        r3[i] = T::ZERO - g1;
    }
}

/// The 1-D transform of F(4x4, 3x3)'s output gradient, A on four values into six rows, in place
/// (the transpose of [`output_transform_4`]): (g0, e + o, e - o, f + p, f - p, g3) with
/// e, o = g0 + g2, g1 + g3 and f, p = g0 + 4 g2, 2 g1 + 8 g3.
#[inline(always)]
fn gradient_transform_4<T: Real>(rows: Line<'_, T, 6>) {
    let [r0, r1, r2, r3, r4, r5] = rows;
    let n = r0.len();
    let (r1, r2, r3, r4, r5) = (&mut r1[..n], &mut r2[..n], &mut r3[..n], &mut r4[..n], &mut r5[..n]);
    let (two, four, eight) = (T::from_f64(2.0), T::from_f64(4.0), T::from_f64(8.0));
    for i in 0..n {
        let (g0, g1, g2, g3) = (r0[i], r1[i], r2[i], r3[i]);
        let (e, o) = (g0 + g2, g1 + g3);
        let (f, p) = (g0 + four * g2, two * g1 + eight * g3);
        r1[i] = e + o;
        r2[i] = e - o;
        r3[i] = f + p;
        r4[i] = f - p;
        r5[i] = g3;
    }
}

/// A dy A^T of tiles first.. into `out` ([tiles][N * N][c]) for N = block + 2: each tile's block
/// x block outputs of dy (0 outside the image) in its top-left corner, transformed along both
/// axes (its last two columns are zeros, and stay zeros, in the pass down the columns).
#[inline(always)]
fn gradient_tiles_of<T: Real, const N: usize>(
    dy: &[T],
    tiling: Tiling,
    first: usize,
    out: &mut [T],
    f: impl Fn(Line<'_, T, N>) + Copy,
) {
    let (s, c, block) = (tiling.s, tiling.s.c, N - 2);
    for (i, tile) in out.chunks_exact_mut(N * N * c).enumerate() {
        let (b, y0, x0) = tiling.origin(first + i);
        for (p, dst) in tile.chunks_exact_mut(c).enumerate() {
            let (ty, tx) = (p / N, p % N);
            let (oy, ox) = (y0 + ty, x0 + tx);
            if ty < block && tx < block && oy < s.h && ox < s.w {
                dst.copy_from_slice(&dy[((b * s.h + oy) * s.w + ox) * c..][..c]);
            } else {
                dst.fill(T::ZERO);
            }
        }
        transform_2d(tile, c, N, f);
    }
}

multiversion! {
    /// A dy A^T of tiles first.. into `out` ([tiles][points][c]).
    fn gradient_tiles<T>(dy: &[T], tiling: Tiling, first: usize, out: &mut [T]) {
        match tiling.block {
            2 => gradient_tiles_of::<T, 4>(dy, tiling, first, out, gradient_transform_2),
            _ => gradient_tiles_of::<T, 6>(dy, tiling, first, out, gradient_transform_4),
        }
    }
}

multiversion! {
    /// Rows `rows` of c_out of the weight gradient ([c_out][9][c_in], added to) from the
    /// transform domain's sums `m` ([points][c_out][c_in]): G^T m G, tap (ky, kx) the sum over
    /// points (i, j) of G[i][ky] G[j][kx] m[point].
    fn untransform_rows<T>(m: &[T], coefs: &[[T; 9]], c_out: usize, c_in: usize, rows: std::ops::Range<usize>, dweight: &mut [T]) {
        for (o, out) in rows.zip(dweight.chunks_exact_mut(9 * c_in)) {
            for (point, c) in coefs.iter().enumerate() {
                let src = &m[(point * c_out + o) * c_in..][..c_in];
                for (tap, &coef) in c.iter().enumerate() {
                    if coef != T::ZERO {
                        for (d, &v) in out[tap * c_in..(tap + 1) * c_in].iter_mut().zip(src) {
                            *d += coef * v;
                        }
                    }
                }
            }
        }
    }
}

/// The coefficients of G g G^T for F(block x block, 3x3): [point][tap] = G[i][ky] G[j][kx] for
/// point (i, j) and tap (ky, kx).
fn kernel_coefs<T: Real>(block: usize) -> Vec<[T; 9]> {
    let g: &[[f64; 3]] = if block == 2 { &G2 } else { &G4 };
    let side = g.len();
    (0..side * side)
        .map(|point| std::array::from_fn(|tap| T::from_f64(g[point / side][tap / 3] * g[point % side][tap % 3])))
        .collect()
}

/// The weight gradient of [`forward`] (without bias) from dy [pixels, c_out], added to
/// `dweight` ([c_out][9 * c_in], tap-major rows as the direct sums write them): per point of the
/// transform domain, the sum over tiles of (A dy A^T) (B^T f(x) B) as one GEMM [c_out x tiles] .
/// [tiles x c_in] (f = ReLU when `relu`), then G^T . G back to the nine taps. In f32 it rounds
/// more than the direct sum (see the module's notes) and far less than the direct sum over
/// bf16-rounded inputs, at a quarter of the multiplies with F(4x4).
#[allow(clippy::too_many_arguments)]
pub fn weight_gradient<T: Real>(
    x: &[T],
    s: Nhwc,
    relu: bool,
    dy: &[T],
    c_out: usize,
    dweight: &mut [T],
    cols: &mut Vec<T>,
) {
    if s.pixels() == 0 {
        return;
    }
    let tiling = Tiling::new(s, block_side(s.h, s.w, s.c, c_out), s.c.max(c_out));
    let (points, per_chunk, per_task) = (tiling.points(), tiling.chunk_tiles(), tiling.tiles_per_task());
    let sums = points * c_out * s.c;
    let buffers = sized(cols, sums + per_chunk * points * (s.c + c_out));
    let (m, rest) = buffers.split_at_mut(sums);
    let (v, g) = rest.split_at_mut(per_chunk * points * s.c);
    let g_tiling = Tiling { s: s.with_channels(c_out), ..tiling };
    assert!(dy.len() >= s.pixels() * c_out && dweight.len() >= c_out * 9 * s.c, "winograd: weight gradient buffers");
    for (chunk, (first, tiles)) in tiling.chunks().enumerate() {
        let v = &mut v[..tiles * points * s.c];
        v.par_chunks_mut(per_task * points * s.c)
            .enumerate()
            .for_each(|(task, out)| input_tiles(x, tiling, relu, first + task * per_task, out));
        let g = &mut g[..tiles * points * c_out];
        g.par_chunks_mut(per_task * points * c_out)
            .enumerate()
            .for_each(|(task, out)| gradient_tiles(dy, g_tiling, first + task * per_task, out));
        let (v, g) = (&*v, &*g);
        m.par_chunks_mut(c_out * s.c).enumerate().for_each(|(point, sum)| {
            let lhs = Mat::strided(point * c_out, tiles, c_out, points * c_out).t();
            let rhs = Mat::strided(point * s.c, tiles, s.c, points * s.c);
            // SAFETY: both views lie in their chunk's buffers (tiles * points rows of c_out and
            // c_in values), and `sum` is this task's own c_out x c_in block of `m`.
            unsafe {
                matmul_raw_at(
                    Precision::F32,
                    sum.as_mut_ptr(),
                    Mat::dense(c_out, s.c),
                    g.as_ptr(),
                    lhs,
                    v.as_ptr(),
                    rhs,
                    chunk > 0,
                    T::ONE,
                    Threads::Caller,
                )
            }
        });
    }
    let coefs = kernel_coefs::<T>(tiling.block);
    const ROWS_PER_TASK: usize = 8;
    dweight[..c_out * 9 * s.c].par_chunks_mut(ROWS_PER_TASK * 9 * s.c).enumerate().for_each(|(task, out)| {
        let first = task * ROWS_PER_TASK;
        untransform_rows(m, &coefs, c_out, s.c, first..(first + ROWS_PER_TASK).min(c_out), out);
    });
}
