//! Strided matrix views into flat buffers and one matmul over the `gemm` crate, which picks
//! AVX-512 / AVX2 micro-kernels at run time (its `x86-v4` feature). Views let the attention
//! read q, k, v straight out of the fused QKV buffer and write each head's output into its
//! columns of the context buffer: no transposes, no copies.

use rayon::prelude::*;

use super::matmul_bf16::matmul_bf16_raw;
use super::simd::Real;
use super::SharedMut;
use crate::config::Precision;

/// A rows x cols matrix at `offset` in a buffer: element (i, j) at offset + i*rs + j*cs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mat {
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl Mat {
    /// A dense row-major matrix at the start of a buffer.
    pub fn dense(rows: usize, cols: usize) -> Self {
        Self { offset: 0, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// Rows of `cols` values `row_stride` apart, starting at `offset`.
    pub fn strided(offset: usize, rows: usize, cols: usize, row_stride: usize) -> Self {
        Self { offset, rows, cols, row_stride, col_stride: 1 }
    }

    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    /// One past the largest index the view touches (0 for an empty view).
    fn end(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return 0;
        }
        self.offset + (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// The whole rayon pool (large GEMMs).
    Pool,
    /// The calling thread (GEMMs inside an already parallel loop).
    Caller,
}

fn check_shapes(d: &Mat, a: &Mat, b: &Mat) {
    assert!(
        d.rows == a.rows && a.cols == b.rows && b.cols == d.cols,
        "matmul: [{}x{}] = [{}x{}] x [{}x{}] does not fit",
        d.rows,
        d.cols,
        a.rows,
        a.cols,
        b.rows,
        b.cols
    );
}

/// Panics unless the shapes fit and every view lies inside its buffer.
fn check_views<T>(dst: &[T], d: &Mat, a: &[T], am: &Mat, b: &[T], bm: &Mat) {
    check_shapes(d, am, bm);
    assert!(d.end() <= dst.len() && am.end() <= a.len() && bm.end() <= b.len(), "matmul: a view exceeds its buffer");
}

/// dst = scale * a b, or dst += scale * a b with `accumulate`, with the inputs at `precision`:
/// as they are for f32 (the `gemm` crate), rounded to bf16 (f32 sums, [`super::matmul_bf16`])
/// for bf16, the engine's mixed precision, which takes f32 buffers. Views are bounds-checked.
#[allow(clippy::too_many_arguments)]
pub fn matmul_at<T: Real>(
    precision: Precision,
    dst: &mut [T],
    d: Mat,
    a: &[T],
    am: Mat,
    b: &[T],
    bm: Mat,
    accumulate: bool,
    scale: T,
    threads: Threads,
) {
    check_views(dst, &d, a, &am, b, &bm);
    // SAFETY: bounds checked above; `dst` is a unique borrow, so it aliases neither input.
    unsafe { matmul_raw_at(precision, dst.as_mut_ptr(), d, a.as_ptr(), am, b.as_ptr(), bm, accumulate, scale, threads) }
}

/// [`matmul_at`] through raw pointers, for tasks that write disjoint parts of one buffer.
///
/// # Safety
/// Every view must lie inside its allocation, `dst`'s elements must not be written or read
/// by anyone else during the call, and must not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_raw_at<T: Real>(
    precision: Precision,
    dst: *mut T,
    d: Mat,
    a: *const T,
    am: Mat,
    b: *const T,
    bm: Mat,
    accumulate: bool,
    scale: T,
    threads: Threads,
) {
    check_shapes(&d, &am, &bm);
    match precision {
        // The `gemm` crate, in the buffers' type (f32, or f64 in the gradient checks).
        Precision::F32 => {
            if d.rows == 0 || d.cols == 0 {
                return;
            }
            let parallelism = match threads {
                Threads::Pool => gemm::Parallelism::Rayon(0),
                Threads::Caller => gemm::Parallelism::None,
            };
            let s = |x: usize| x as isize;
            gemm::gemm(
                d.rows,
                d.cols,
                am.cols,
                dst.add(d.offset),
                s(d.col_stride),
                s(d.row_stride),
                accumulate,
                a.add(am.offset),
                s(am.col_stride),
                s(am.row_stride),
                b.add(bm.offset),
                s(bm.col_stride),
                s(bm.row_stride),
                T::ONE,
                scale,
                false,
                false,
                false,
                parallelism,
            );
        }
        Precision::Bf16 => {
            assert!(
                std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>(),
                "bf16 GEMMs take f32 buffers (the finite-difference checks run f64 at f32 precision)"
            );
            let scale = scale.to_f64() as f32;
            // SAFETY: T is f32 (asserted above); the rest is the caller's contract.
            matmul_bf16_raw(dst.cast(), d, a.cast(), am, b.cast(), bm, accumulate, scale, threads)
        }
    }
}

/// The groups a long reduction is split into by [`matmul_accumulate_split`]: fixed, not the
/// thread count, so that the sums are the same on every machine.
const REDUCTION_GROUPS: usize = 4;
/// Inner dimensions shorter than this stay one GEMM (each group's share would be too short).
const MIN_SPLIT_DEPTH: usize = 1024;
/// Outputs whose copies for all groups hold more values than this stay one GEMM (16 MB of f32):
/// beyond it, writing and adding the copies costs more than the split gains (the MIM head's
/// 8192 x 192 gradient: 21-23 ms as one GEMM, 24.5-27 ms split, on 2 threads of an Intel Xeon).
const MAX_SPLIT_VALUES: usize = 1 << 22;

/// How many groups, each with its own copy of an output of `values` values, a long reduction
/// into it is split into: [`REDUCTION_GROUPS`], or 1 where the copies would be too large.
pub fn reduction_groups(values: usize) -> usize {
    if values * REDUCTION_GROUPS <= MAX_SPLIT_VALUES {
        REDUCTION_GROUPS
    } else {
        1
    }
}

/// dst += a b, for the weight gradients' shape: a long inner dimension (every row of a batch)
/// and a small output. The `gemm` crate parallelises over the output only, which leaves such
/// GEMMs at 60-75% of its rate on 2 threads; here the inner dimension is split into
/// [`REDUCTION_GROUPS`] parts, each a one-thread GEMM into its own copy of the output (in
/// `scratch`), and the copies are added to `dst` in order.
#[allow(clippy::too_many_arguments)]
pub fn matmul_accumulate_split<T: Real>(
    precision: Precision,
    dst: &mut [T],
    d: Mat,
    a: &[T],
    am: Mat,
    b: &[T],
    bm: Mat,
    scratch: &mut Vec<T>,
) {
    let (depth, values) = (am.cols, d.rows * d.cols);
    if depth < MIN_SPLIT_DEPTH || reduction_groups(values) == 1 {
        return matmul_at(precision, dst, d, a, am, b, bm, true, T::ONE, Threads::Pool);
    }
    check_views(dst, &d, a, &am, b, &bm);
    let share = depth.div_ceil(REDUCTION_GROUPS);
    let partials = super::sized(scratch, REDUCTION_GROUPS * values);
    partials.par_chunks_mut(values).enumerate().for_each(|(g, partial)| {
        let (k0, k1) = (g * share, ((g + 1) * share).min(depth));
        let am = Mat { offset: am.offset + k0 * am.col_stride, cols: k1 - k0, ..am };
        let bm = Mat { offset: bm.offset + k0 * bm.row_stride, rows: k1 - k0, ..bm };
        matmul_at(precision, partial, Mat::dense(d.rows, d.cols), a, am, b, bm, false, T::ONE, Threads::Caller);
    });
    add_partials(dst, d, partials);
}

/// dst (the view `d`) += the sum, in order, of the dense [d.rows, d.cols] matrices in `partials`.
pub fn add_partials<T: Real>(dst: &mut [T], d: Mat, partials: &[T]) {
    let values = d.rows * d.cols;
    assert!(
        d.end() <= dst.len() && partials.len().is_multiple_of(values.max(1)),
        "add_partials: a view exceeds its buffer"
    );
    let shared = SharedMut(dst.as_mut_ptr());
    (0..d.rows).into_par_iter().with_min_len(16).for_each(|i| {
        // The whole wrapper, not its pointer field, is what the closure must capture (Sync).
        let out = shared;
        let rows = partials.chunks_exact(values).map(|p| &p[i * d.cols..(i + 1) * d.cols]);
        if d.col_stride == 1 {
            // SAFETY: within `d` (checked above), and each task owns its row i of it.
            let o = unsafe { std::slice::from_raw_parts_mut(out.0.add(d.offset + i * d.row_stride), d.cols) };
            // Whole rows at a time (vectorised), each element's additions in the same order.
            rows.for_each(|p| o.iter_mut().zip(p).for_each(|(o, &x)| *o += x));
        } else {
            for (j, p) in rows.flat_map(|p| p.iter().enumerate()) {
                // SAFETY: as above.
                unsafe { *out.0.add(d.offset + i * d.row_stride + j * d.col_stride) += *p };
            }
        }
    });
}
