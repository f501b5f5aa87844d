//! 3x3 "same" convolutions by Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2016): a 2x2 block of outputs comes from a 4x4
//! input tile with 16 multiplies per channel pair instead of im2col's 36, so the GEMMs do 2.25x
//! less work. Tiles are transformed (B^T d B), multiplied by the transformed kernel (G g G^T) in
//! 16 GEMMs (one per point of the 4x4 transform domain) and transformed back (A^T m A). The
//! transforms only add, subtract and halve. The input gradient is this same pass with the
//! flipped kernel.
//!
//! The weight gradient stays a direct sum ([`super::conv`]): done the Winograd way (G^T [sum
//! over tiles of (A dy A^T) . (B^T d B)] G) it rounded ~10x worse, enough to move a 3-step AdamW trajectory of
//! a batch split in halves against the whole batch from 1e-6 to 1e-5 of the weights
//! (`tests/steps.rs`), while forward and input gradient stay at im2col's 1e-6.
//!
//! Buffers are [`super::conv`]'s: kernels in its packed layout, activations NHWC, and every
//! intermediate in the caller's `cols`, so a steady training step allocates nothing here.

use rayon::prelude::*;

use super::conv::Nhwc;
use super::matmul::{matmul_raw, Mat, Threads};
use super::simd::{multiversion, Real};
use super::{sized, SharedMut};

/// Points of the transform domain: 4x4.
const POINTS: usize = 16;
/// Values of one chunk's transformed tiles (the larger of input and output side): 2M, 8 MB of
/// f32, as [`super::conv`]'s im2col tiles.
const CHUNK_VALUES: usize = 1 << 21;
/// Tiles per parallel task of the input and output transforms.
const TILES_PER_TASK: usize = 8;
/// Fewer channels than this on either side and the GEMMs are too thin to pay for the
/// transforms: im2col stays.
const MIN_CHANNELS: usize = 16;

/// G's rows: the kernel transform, one 3-tap filter to 4 points.
const G: [[f64; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];

/// Whether a k x k convolution from `c_in` to `c_out` channels runs here.
pub fn applies(k: usize, c_in: usize, c_out: usize) -> bool {
    k == 3 && c_in >= MIN_CHANNELS && c_out >= MIN_CHANNELS
}

/// The tiling of an image batch: `tiles_h` x `tiles_w` tiles of 2x2 outputs per image, processed
/// in chunks of whole tile rows.
#[derive(Clone, Copy)]
struct Tiling {
    s: Nhwc,
    tiles_h: usize,
    tiles_w: usize,
    rows_per_chunk: usize,
}

impl Tiling {
    fn new(s: Nhwc, widest: usize) -> Self {
        let (tiles_h, tiles_w) = (s.h.div_ceil(2), s.w.div_ceil(2));
        let rows_per_chunk = (CHUNK_VALUES / (POINTS * widest * tiles_w)).max(1);
        Self { s, tiles_h, tiles_w, rows_per_chunk }
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
        (row / self.tiles_h, 2 * (row % self.tiles_h), 2 * tx)
    }
}

/// The 1-D input transform B^T on four rows, in place: (d0 - d2, d1 + d2, d2 - d1, d1 - d3).
#[inline(always)]
fn input_transform<T: Real>(r0: &mut [T], r1: &mut [T], r2: &mut [T], r3: &mut [T]) {
    for (((a, b), c), d) in r0.iter_mut().zip(r1.iter_mut()).zip(r2.iter_mut()).zip(r3.iter_mut()) {
        let (d0, d1, d2, d3) = (*a, *b, *c, *d);
        *a = d0 - d2;
        *b = d1 + d2;
        *c = d2 - d1;
        *d = d1 - d3;
    }
}

/// The 1-D output transform A^T on four rows, into the first two: (m0 + m1 + m2, m1 - m2 - m3).
#[inline(always)]
fn output_transform<T: Real>(r0: &mut [T], r1: &mut [T], r2: &mut [T], r3: &mut [T]) {
    for (((a, b), &mut c), &mut d) in r0.iter_mut().zip(r1.iter_mut()).zip(r2).zip(r3) {
        let (m0, m1) = (*a, *b);
        *a = m0 + m1 + c;
        *b = m1 - c - d;
    }
}

/// The 16 rows of `c` values of one tile, split.
fn rows<T>(tile: &mut [T], c: usize) -> [&mut [T]; POINTS] {
    let mut it = tile.chunks_exact_mut(c);
    std::array::from_fn(|_| it.next().expect("a tile holds 16 rows"))
}

/// Applies a 1-D transform along both axes of a 4x4 tile of rows: down each column, then along
/// the first `rows_out` rows of the result (4 for B^T, 2 for A^T, whose results are 2 long).
#[inline(always)]
fn transform_2d<T: Real>(
    tile: &mut [T],
    c: usize,
    rows_out: usize,
    f: impl Fn(&mut [T], &mut [T], &mut [T], &mut [T]),
) {
    let [r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10, r11, r12, r13, r14, r15] = rows(tile, c);
    f(r0, r4, r8, r12);
    f(r1, r5, r9, r13);
    f(r2, r6, r10, r14);
    f(r3, r7, r11, r15);
    f(r0, r1, r2, r3);
    f(r4, r5, r6, r7);
    if rows_out == 4 {
        f(r8, r9, r10, r11);
        f(r12, r13, r14, r15);
    }
}

multiversion! {
    /// B^T d B of tiles first.. into `out` ([tiles][16][c]), d the 4x4 input patch of f(x) one
    /// pixel up and left of the tile's outputs (0 outside the image), f = ReLU when `relu`.
    fn input_tiles<T>(x: &[T], tiling: Tiling, relu: bool, first: usize, out: &mut [T]) {
        let (s, c) = (tiling.s, tiling.s.c);
        for (i, tile) in out.chunks_exact_mut(POINTS * c).enumerate() {
            let (b, y0, x0) = tiling.origin(first + i);
            for (p, dst) in tile.chunks_exact_mut(c).enumerate() {
                let (sy, sx) = ((y0 + p / 4).wrapping_sub(1), (x0 + p % 4).wrapping_sub(1));
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
            transform_2d(tile, c, 4, input_transform);
        }
    }
}

multiversion! {
    /// A^T m A of tiles first.. (`m`: [tiles][16][c], transformed in place) plus `bias`, written
    /// to the outputs of `y` inside the image.
    fn output_tiles<T>(m: &mut [T], tiling: Tiling, bias: Option<&[T]>, first: usize, y: SharedMut<T>) {
        let (s, c) = (tiling.s, tiling.s.c);
        for (i, tile) in m.chunks_exact_mut(POINTS * c).enumerate() {
            transform_2d(tile, c, 2, output_transform);
            let (b, y0, x0) = tiling.origin(first + i);
            // The 2x2 outputs are rows 0, 1 (top) and 4, 5 (bottom) of the transformed tile.
            for (p, row) in [0, 1, 4, 5].into_iter().enumerate() {
                let src = &tile[row * c..(row + 1) * c];
                let (oy, ox) = (y0 + p / 2, x0 + p % 2);
                if oy >= s.h || ox >= s.w {
                    continue;
                }
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
}

/// G g G^T of a kernel in [`super::conv::pack`]'s layout ([9][c_in][c_out]) into `u`
/// ([16][c_in][c_out]): each point a weighted sum of the nine taps' matrices.
fn transform_kernel<T: Real>(packed: &[T], c_in: usize, c_out: usize, u: &mut [T]) {
    let n = c_in * c_out;
    u.par_chunks_mut(n).enumerate().for_each(|(point, dst)| {
        dst.fill(T::ZERO);
        let (a, q) = (point / 4, point % 4);
        for tap in 0..9 {
            let coef = G[a][tap / 3] * G[q][tap % 3];
            if coef != 0.0 {
                let coef = T::from_f64(coef);
                for (d, &w) in dst.iter_mut().zip(&packed[tap * n..(tap + 1) * n]) {
                    *d += coef * w;
                }
            }
        }
    });
}

/// The 16 GEMMs of a chunk: for every point, out[t][point] = lhs[t][point] . rhs[point] for
/// `lhs` [tiles][16][k] and `rhs` [16][k][n], `out` [tiles][16][n]; one point per task.
fn pointwise_products<T: Real>(lhs: &[T], tiles: usize, k: usize, rhs: &[T], n: usize, out: &mut [T]) {
    assert!(lhs.len() >= tiles * POINTS * k && rhs.len() >= POINTS * k * n && out.len() >= tiles * POINTS * n);
    let dst = SharedMut(out.as_mut_ptr());
    (0..POINTS).into_par_iter().for_each(|point| {
        let (a, d) = (Mat::strided(point * k, tiles, k, POINTS * k), Mat::strided(point * n, tiles, n, POINTS * n));
        let out = dst;
        // SAFETY: the views lie in buffers checked above; point `point` writes only its own
        // columns point*n.. of each tile's row block, which no other task touches.
        unsafe {
            matmul_raw(
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
    let tiling = Tiling::new(s, s.c.max(c_out));
    let per_chunk = tiling.chunk_tiles();
    let kernel = POINTS * s.c * c_out;
    let buffers = sized(cols, kernel + per_chunk * POINTS * (s.c + c_out));
    let (u, rest) = buffers.split_at_mut(kernel);
    let (v, m) = rest.split_at_mut(per_chunk * POINTS * s.c);
    transform_kernel(packed, s.c, c_out, u);
    let (out_tiling, y_len) = (Tiling { s: s.with_channels(c_out), ..tiling }, s.pixels() * c_out);
    assert!(y.len() >= y_len, "winograd: output of {} values, expected {y_len}", y.len());
    let y = SharedMut(y.as_mut_ptr());
    for (first, tiles) in tiling.chunks() {
        let v = &mut v[..tiles * POINTS * s.c];
        v.par_chunks_mut(TILES_PER_TASK * POINTS * s.c)
            .enumerate()
            .for_each(|(task, out)| input_tiles(x, tiling, relu, first + task * TILES_PER_TASK, out));
        let m = &mut m[..tiles * POINTS * c_out];
        pointwise_products(v, tiles, s.c, u, c_out, m);
        m.par_chunks_mut(TILES_PER_TASK * POINTS * c_out)
            .enumerate()
            .for_each(|(task, tile)| output_tiles(tile, out_tiling, bias, first + task * TILES_PER_TASK, y));
    }
}
