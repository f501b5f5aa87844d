//! Strided matrix views into flat buffers and one matmul over the `gemm` crate, which picks
//! AVX-512 / AVX2 micro-kernels at run time (its `x86-v4` feature). Views let the attention
//! read q, k, v straight out of the fused QKV buffer and write each head's output into its
//! columns of the context buffer: no transposes, no copies.

use super::simd::Real;

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

/// dst = scale * a b, or dst += scale * a b with `accumulate`. Views are bounds-checked.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Real>(
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
    check_shapes(&d, &am, &bm);
    assert!(d.end() <= dst.len() && am.end() <= a.len() && bm.end() <= b.len(), "matmul: a view exceeds its buffer");
    // SAFETY: bounds checked above; `dst` is a unique borrow, so it aliases neither input.
    unsafe { matmul_raw(dst.as_mut_ptr(), d, a.as_ptr(), am, b.as_ptr(), bm, accumulate, scale, threads) }
}

/// [`matmul`] through raw pointers, for tasks that write disjoint parts of one buffer.
///
/// # Safety
/// Every view must lie inside its allocation, `dst`'s elements must not be written or read
/// by anyone else during the call, and must not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_raw<T: Real>(
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
