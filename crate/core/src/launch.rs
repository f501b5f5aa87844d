//! Launch geometry of the CUDA kernels (`cuda/kernels.cu`): how many blocks of how many threads
//! each kind of kernel runs. Plain data without the `cuda` feature, so that the kernel
//! emulation tests (crate/kernel-emulation) launch the kernels exactly as the GPU build does.

/// Blocks in x, y and z, and threads per block (kernels only use x threads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub grid: (u32, u32, u32),
    pub threads: u32,
}

/// One block per row of `d`, sized to the row (32 to 1024 threads, a power of two, so a whole
/// number of warps).
pub fn per_row(rows: usize, d: usize) -> Geometry {
    let threads = d.next_power_of_two().clamp(32, 1024) as u32;
    Geometry { grid: (rows as u32, 1, 1), threads }
}

/// Grid-stride loops over n elements.
pub fn elementwise(n: usize) -> Geometry {
    let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
    Geometry { grid: (blocks, 1, 1), threads: 256 }
}

/// One block per pixel whose threads stride over the pixel's `row` values (a whole number of
/// warps, at most 256). Callers keep `pixels` within the grid's 2^31 - 1 blocks.
pub fn per_pixel(pixels: usize, row: usize) -> Geometry {
    Geometry { grid: (pixels as u32, 1, 1), threads: row.next_multiple_of(32).clamp(32, 256) as u32 }
}

/// Rows of a column reduction handled by one block (partial sums are added atomically).
pub const ROWS_PER_CHUNK: usize = 64;

/// One thread per column, one block row per `ROWS_PER_CHUNK` rows.
pub fn per_column(rows: usize, n: usize) -> Geometry {
    let chunks = rows.div_ceil(ROWS_PER_CHUNK).max(1) as u32;
    Geometry { grid: (n.div_ceil(256) as u32, chunks, 1), threads: 256 }
}
