//! GEMMs on bf16 inputs with f32 accumulation: the engine's mixed precision, the contract of
//! PyTorch's bf16 autocast and of beit's CUDA path (bf16 operands, f32 sums), over the same
//! f32 buffers and strided views as [`super::matmul`]. The operands are rounded to bf16 while
//! they are packed (round to nearest even, subnormals flushed to zero as `vdpbf16ps` reads
//! them), and the output is f32.
//!
//! The micro-kernel multiplies a 12 x 32 tile of the output by pairs of k: AVX512-BF16's
//! `vdpbf16ps` adds two bf16 products into each f32 lane, twice the f32 FMA rate on AMD Zen 4/5
//! (and half of it on Intel's Sapphire Rapids cores, where bf16 wants AMX instead). Elsewhere
//! an emulated kernel computes the same sums with f32 arithmetic in the instruction's order
//! (the odd k's product first, then the even one's; bf16 products are exact in f32), so the two
//! kernels agree bit for bit and tests can run either.
//!
//! Blocking as in BLIS: B packed once into depth blocks of [`KC`] and panels of [`NR`]
//! columns, then tasks of [`MC`] rows each pack their rows of A block by block and sweep every
//! panel of B with one panel of A at a time.

use std::sync::atomic::{AtomicU8, Ordering};

use rayon::prelude::*;

use super::matmul::{Mat, Threads};
use super::simd::multiversion;
use super::{sized, SharedMut};
use crate::config::Precision;

/// Rows of a micro-tile: 12 x 2 accumulator registers, leaving 8 of AVX-512's 32.
const MR: usize = 12;
/// Columns of a micro-tile: two registers of 16 f32 lanes.
const NR: usize = 32;
/// Depth of a packed block (128 pairs): one panel of B, 16 KB, stays in L1.
const KC: usize = 256;
/// Rows a task packs: 8 panels of A, 48 KB at full depth, in L2.
const MC: usize = 8 * MR;

/// Multiply-adds below which a GEMM runs on the calling thread only.
const MIN_POOL_WORK: usize = 1 << 18;

/// The micro-kernel a bf16 GEMM runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AVX512-BF16's `vdpbf16ps`.
    Avx512Bf16,
    /// The same sums in f32 arithmetic (any CPU).
    Emulated,
}

const UNSET: u8 = 0;
static KERNEL: AtomicU8 = AtomicU8::new(UNSET);

fn encode(kernel: Bf16Kernel) -> u8 {
    match kernel {
        Bf16Kernel::Avx512Bf16 => 1,
        Bf16Kernel::Emulated => 2,
    }
}

/// Whether this CPU runs `vdpbf16ps` (with the AVX-512 the kernel's loads and stores use).
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn detect() -> Bf16Kernel {
    if has_avx512_bf16() {
        Bf16Kernel::Avx512Bf16
    } else {
        Bf16Kernel::Emulated
    }
}

/// The kernel bf16 GEMMs run: the best this CPU has, unless [`set_bf16_kernel`] chose one.
pub fn bf16_kernel() -> Bf16Kernel {
    match KERNEL.load(Ordering::Relaxed) {
        1 => Bf16Kernel::Avx512Bf16,
        2 => Bf16Kernel::Emulated,
        _ => {
            let detected = detect();
            KERNEL.store(encode(detected), Ordering::Relaxed);
            detected
        }
    }
}

/// Chooses the kernel (tests and benchmarks); returns the one chosen, which is the emulated
/// one where the CPU lacks the wanted instructions.
pub fn set_bf16_kernel(wanted: Bf16Kernel) -> Bf16Kernel {
    let chosen = if wanted == Bf16Kernel::Avx512Bf16 && !has_avx512_bf16() { Bf16Kernel::Emulated } else { wanted };
    KERNEL.store(encode(chosen), Ordering::Relaxed);
    chosen
}

/// How many times faster this CPU runs the engine's bf16 GEMMs than its f32 ones: the best of
/// several timings of a 256^3 product in each precision on the calling thread, measured once per
/// process (about 10 ms). The CPU's features do not tell: `vdpbf16ps` runs at twice the f32 FMA
/// rate on AMD Zen 4/5 and at half of it on Intel Xeons (without AMX), and the emulated kernel
/// is slower than f32 everywhere.
pub fn bf16_gemm_speedup() -> f64 {
    static SPEEDUP: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *SPEEDUP.get_or_init(|| {
        const N: usize = 256;
        let a: Vec<f32> = (0..N * N).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3).collect();
        let mut dst = vec![0f32; N * N];
        let m = Mat::dense(N, N);
        let mut best = |precision: Precision| {
            (0..7)
                .map(|_| {
                    let t = std::time::Instant::now();
                    super::matmul::matmul_at(precision, &mut dst, m, &a, m, &a, m, false, 1.0, Threads::Caller);
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        };
        let f32_seconds = best(Precision::F32);
        f32_seconds / best(Precision::Bf16)
    })
}

/// x rounded to bf16 (nearest, ties to even), as its 16 bits: NaN stays NaN (quiet), and
/// subnormals become zeros of their sign, as `vdpbf16ps` reads them.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u32 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    let magnitude = bits & 0x7fff_ffff;
    if magnitude > 0x7f80_0000 {
        (bits >> 16) | 0x40
    } else if magnitude < 0x0080_0000 {
        (bits >> 16) & 0x8000
    } else {
        rounded
    }
}

/// The f32 value of bf16 bits.
#[inline(always)]
pub fn bf16_value(bits: u32) -> f32 {
    f32::from_bits(bits << 16)
}

/// Two values of consecutive k as one 32-bit lane: the even k in the low half.
#[inline(always)]
fn pair(even: f32, odd: f32) -> u32 {
    bf16_bits(even) | (bf16_bits(odd) << 16)
}

/// The mask of the first `n` of 16 lanes (all 16 for n >= 16).
#[inline(always)]
fn first_lanes(n: usize) -> u16 {
    ((1u32 << n.min(16)) - 1) as u16
}

/// A strided f32 matrix behind a raw pointer.
#[derive(Clone, Copy)]
struct Source {
    ptr: *const f32,
    m: Mat,
}

// SAFETY: read-only, and the caller of the GEMM keeps the buffer alive and unwritten.
unsafe impl Send for Source {}
unsafe impl Sync for Source {}

impl Source {
    #[inline(always)]
    unsafe fn at(&self, i: usize, j: usize) -> f32 {
        *self.ptr.add(self.m.offset + i * self.m.row_stride + j * self.m.col_stride)
    }
}

multiversion! {
    /// Rows r0..r0 + rows, depth k0..k0 + kc of `src` (a row per output row of the tile, the
    /// depth along its columns) as panels of `width` rows: [panel][pair][width] lanes, rows
    /// past the matrix and the odd depth's last lane zero. Used for A (width MR, rows of A)
    /// and for B (width NR, with `src` = B^T: columns of B).
    fn pack(src: Source, r0: usize, rows: usize, k0: usize, kc: usize, width: usize, out: &mut [u32]) {
        let kp = kc.div_ceil(2);
        let panels = rows.div_ceil(width);
        let out = &mut out[..panels * kp * width];
        let m = src.m;
        // SAFETY (the slices below): rows r0..r0 + rows and depths k0..k0 + kc lie inside the
        // caller's view, which lies inside its buffer.
        if m.col_stride == 1 {
            // Each row's depth is contiguous: rounded into a lane buffer whose u16 pairs are
            // the 32-bit lanes, then spread `width` apart.
            let mut lane_values = [0u32; KC / 2];
            for (panel, block) in out.chunks_exact_mut(kp * width).enumerate() {
                for lane in 0..width {
                    let r = panel * width + lane;
                    if r >= rows {
                        for p in 0..kp {
                            block[p * width + lane] = 0;
                        }
                        continue;
                    }
                    let row = unsafe { std::slice::from_raw_parts(src.ptr.add(m.offset + (r0 + r) * m.row_stride + k0), kc) };
                    for (v, x) in lane_values.iter_mut().zip(row.chunks_exact(2)) {
                        *v = pair(x[0], x[1]);
                    }
                    if kc % 2 == 1 {
                        lane_values[kp - 1] = pair(row[kc - 1], 0.0);
                    }
                    for (p, &v) in lane_values[..kp].iter().enumerate() {
                        block[p * width + lane] = v;
                    }
                }
            }
        } else if m.row_stride == 1 {
            // The rows are contiguous at each depth (a transposed view): two depths at a time,
            // across the rows.
            for (panel, block) in out.chunks_exact_mut(kp * width).enumerate() {
                let live = (rows - panel * width).min(width);
                let first = m.offset + r0 + panel * width;
                for (p, lanes) in block.chunks_exact_mut(width).enumerate() {
                    let k = k0 + 2 * p;
                    let even = unsafe { std::slice::from_raw_parts(src.ptr.add(first + k * m.col_stride), live) };
                    if 2 * p + 1 < kc {
                        let odd = unsafe { std::slice::from_raw_parts(src.ptr.add(first + (k + 1) * m.col_stride), live) };
                        for ((v, &e), &o) in lanes.iter_mut().zip(even).zip(odd) {
                            *v = pair(e, o);
                        }
                    } else {
                        for (v, &e) in lanes.iter_mut().zip(even) {
                            *v = pair(e, 0.0);
                        }
                    }
                    lanes[live..].fill(0);
                }
            }
        } else {
            for (panel, block) in out.chunks_exact_mut(kp * width).enumerate() {
                for lane in 0..width {
                    let r = panel * width + lane;
                    for p in 0..kp {
                        let k = k0 + 2 * p;
                        block[p * width + lane] = if r >= rows {
                            0
                        } else {
                            let odd = if 2 * p + 1 < kc { unsafe { src.at(r0 + r, k + 1) } } else { 0.0 };
                            pair(unsafe { src.at(r0 + r, k) }, odd)
                        };
                    }
                }
            }
        }
    }
}

/// Where one micro-tile's outputs go.
#[derive(Clone, Copy)]
struct Tile {
    c: *mut f32,
    row_stride: usize,
    col_stride: usize,
    rows: usize,
    cols: usize,
    /// Add to the values there (else overwrite them).
    accumulate: bool,
    scale: f32,
}

impl Tile {
    /// Writes a tile of sums held as [MR][NR] values.
    #[inline(always)]
    unsafe fn store(&self, sums: &[[f32; NR]; MR]) {
        for (i, row) in sums.iter().enumerate().take(self.rows) {
            for (j, &s) in row.iter().enumerate().take(self.cols) {
                let c = self.c.add(i * self.row_stride + j * self.col_stride);
                *c = if self.accumulate { *c + self.scale * s } else { self.scale * s };
            }
        }
    }
}

/// [MR][NR] sums of the pairs of a panel of A ([kp][MR]) and one of B ([kp][NR]), in the
/// order `vdpbf16ps` adds them: the odd k's product, then the even k's.
#[inline(always)]
fn emulated_sums(kp: usize, a: &[u32], b: &[u32]) -> [[f32; NR]; MR] {
    let mut sums = [[0f32; NR]; MR];
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)).take(kp) {
        let (b_even, b_odd): ([f32; NR], [f32; NR]) =
            (std::array::from_fn(|j| bf16_value(bp[j] & 0xffff)), std::array::from_fn(|j| bf16_value(bp[j] >> 16)));
        for (row, &av) in sums.iter_mut().zip(ap) {
            let (a_even, a_odd) = (bf16_value(av & 0xffff), bf16_value(av >> 16));
            for j in 0..NR {
                row[j] += a_odd * b_odd[j];
                row[j] += a_even * b_even[j];
            }
        }
    }
    sums
}

multiversion! {
    fn emulated_tile(kp: usize, a: &[u32], b: &[u32], tile: Tile) {
        let sums = emulated_sums(kp, a, b);
        // SAFETY: the tile lies inside the GEMM's output (the caller's bounds).
        unsafe { tile.store(&sums) }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
/// The `vdpbf16ps` micro-kernel.
///
/// # Safety
/// The CPU has AVX512-BF16; `a` holds kp * MR lanes, `b` kp * NR, and the tile lies in the
/// output.
unsafe fn avx512_bf16_tile(kp: usize, a: *const u32, b: *const u32, tile: Tile) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kp {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16) as *const _));
        let ap = a.add(p * MR);
        for (r, row) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r) as i32));
            row[0] = _mm512_dpbf16_ps(row[0], av, b0);
            row[1] = _mm512_dpbf16_ps(row[1], av, b1);
        }
    }
    let scale = _mm512_set1_ps(tile.scale);
    if tile.col_stride == 1 {
        for (i, row) in acc.iter().enumerate().take(tile.rows) {
            for (half, &v) in row.iter().enumerate() {
                let live = tile.cols.saturating_sub(16 * half);
                if live == 0 {
                    break;
                }
                let mask = first_lanes(live);
                let c = tile.c.add(i * tile.row_stride + 16 * half);
                let mut out = _mm512_mul_ps(v, scale);
                if tile.accumulate {
                    out = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, c), out);
                }
                _mm512_mask_storeu_ps(c, mask, out);
            }
        }
    } else {
        // Two registers of 16 lanes per row are the row's 32 values (no zeroed copy).
        tile.store(&std::mem::transmute::<[[__m512; 2]; MR], [[f32; NR]; MR]>(acc));
    }
}

/// [`pack`] with AVX512-BF16's conversion (`vcvtne2ps2bf16`: round to nearest even, as
/// [`bf16_bits`]; the GEMM reads subnormals as zeros either way) for the two layouts the
/// engine's GEMMs have: depth contiguous, or rows contiguous. Returns false for others.
///
/// # Safety
/// The CPU has AVX512-BF16; the rows and depths lie in `src`'s view and buffer.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pack_avx512_bf16(
    src: Source,
    r0: usize,
    rows: usize,
    k0: usize,
    kc: usize,
    width: usize,
    out: &mut [u32],
) -> bool {
    use std::arch::x86_64::*;
    let m = src.m;
    let kp = kc.div_ceil(2);
    let panels = rows.div_ceil(width);
    let out = &mut out[..panels * kp * width];
    // 16 pairs of f32 (32 values, `live` of them read, the rest 0) as 16 lanes of bf16 pairs.
    let pairs_of = |x: *const f32, live: usize| -> __m512i {
        let lo = _mm512_maskz_loadu_ps(first_lanes(live), x);
        let hi = _mm512_maskz_loadu_ps(first_lanes(live.saturating_sub(16)), x.add(16.min(live)));
        std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo))
    };
    if m.col_stride == 1 {
        // 16 rows at a time (rows past the matrix zero): each row's next 16 pairs in a register,
        // transposed so that each register holds one pair of all 16 rows, a line of the panel.
        for (panel, block) in out.chunks_exact_mut(kp * width).enumerate() {
            for g in (0..width).step_by(16) {
                let lanes = (width - g).min(16);
                let first = panel * width + g;
                let live = rows.saturating_sub(first).min(lanes);
                let row = |l: usize| src.ptr.add(m.offset + (r0 + first + l) * m.row_stride + k0);
                let store = first_lanes(lanes);
                for p0 in (0..kp).step_by(16) {
                    let mut v = [_mm512_setzero_si512(); 16];
                    for (l, v) in v.iter_mut().enumerate().take(live) {
                        *v = pairs_of(row(l).add(2 * p0), kc - 2 * p0);
                    }
                    transpose_16x16(&mut v);
                    for (q, v) in v.iter().enumerate().take(kp - p0) {
                        _mm512_mask_storeu_epi32(block.as_mut_ptr().add((p0 + q) * width + g).cast(), store, *v);
                    }
                }
            }
        }
        true
    } else if m.row_stride == 1 {
        // Interleaves the even depth's 16 words with the odd depth's: word 2j from 0..16, 2j+1 from 16..32.
        let interleave = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
            1, 16, 0,
        );
        // Depth pair by depth pair across all panels: the rows of one depth are read in order,
        // each cache line once, instead of one panel's slice of every depth at a time.
        let out = out.as_mut_ptr();
        for p in 0..kp {
            let k = k0 + 2 * p;
            let has_odd = 2 * p + 1 < kc;
            for panel in 0..panels {
                let live = (rows - panel * width).min(width);
                let even = src.ptr.add(m.offset + r0 + panel * width + k * m.col_stride);
                let lanes = std::slice::from_raw_parts_mut(out.add((panel * kp + p) * width), width);
                for j0 in (0..width).step_by(16) {
                    let mask = first_lanes(live.saturating_sub(j0));
                    let e = _mm512_maskz_loadu_ps(mask, even.add(j0));
                    let o = if has_odd {
                        _mm512_maskz_loadu_ps(mask, even.add(m.col_stride + j0))
                    } else {
                        _mm512_setzero_ps()
                    };
                    let words: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(o, e));
                    let pairs = _mm512_permutexvar_epi16(interleave, words);
                    let store = first_lanes(width - j0);
                    _mm512_mask_storeu_epi32(lanes.as_mut_ptr().add(j0).cast(), store, pairs);
                }
            }
        }
        true
    } else {
        false
    }
}

/// Transposes a 16 x 16 matrix of 32-bit values held as 16 row registers: register c then holds
/// column c.
///
/// # Safety
/// The CPU has AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_16x16(r: &mut [std::arch::x86_64::__m512i; 16]) {
    use std::arch::x86_64::*;
    // Rows interleaved in pairs, then in pairs of pairs: register 4i + j then holds, in its
    // 128-bit lane l, column 4l + j of rows 4i..4i + 4.
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for i in 0..4 {
        let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
        r[4 * i] = _mm512_unpacklo_epi64(a, c);
        r[4 * i + 1] = _mm512_unpackhi_epi64(a, c);
        r[4 * i + 2] = _mm512_unpacklo_epi64(b, d);
        r[4 * i + 3] = _mm512_unpackhi_epi64(b, d);
    }
    // Then the 128-bit lanes: the even and the odd lanes of row groups 0 and 1 (and of 2 and 3)
    // side by side, and those gathered into column j, 4 + j, 8 + j and 12 + j of all 16 rows.
    for j in 0..4 {
        t[j] = _mm512_shuffle_i32x4::<0x88>(r[j], r[4 + j]);
        t[4 + j] = _mm512_shuffle_i32x4::<0xdd>(r[j], r[4 + j]);
        t[8 + j] = _mm512_shuffle_i32x4::<0x88>(r[8 + j], r[12 + j]);
        t[12 + j] = _mm512_shuffle_i32x4::<0xdd>(r[8 + j], r[12 + j]);
    }
    for j in 0..4 {
        r[j] = _mm512_shuffle_i32x4::<0x88>(t[j], t[8 + j]);
        r[4 + j] = _mm512_shuffle_i32x4::<0x88>(t[4 + j], t[12 + j]);
        r[8 + j] = _mm512_shuffle_i32x4::<0xdd>(t[j], t[8 + j]);
        r[12 + j] = _mm512_shuffle_i32x4::<0xdd>(t[4 + j], t[12 + j]);
    }
}

/// [`pack`] with the conversion instructions of `kernel`'s CPU where the layout allows.
#[allow(clippy::too_many_arguments)]
fn pack_for(
    kernel: Bf16Kernel,
    src: Source,
    r0: usize,
    rows: usize,
    k0: usize,
    kc: usize,
    width: usize,
    out: &mut [u32],
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the kernel is AVX512-BF16 only on CPUs that have it; the views are the caller's.
    if kernel == Bf16Kernel::Avx512Bf16 && unsafe { pack_avx512_bf16(src, r0, rows, k0, kc, width, out) } {
        return;
    }
    pack(src, r0, rows, k0, kc, width, out)
}

/// Scratch buffers reused across calls on each thread, taken out while in use, so that a
/// GEMM that runs inside another on the same thread (rayon work stealing) gets its own.
fn with_buffer<R>(
    key: &'static std::thread::LocalKey<std::cell::Cell<Vec<u32>>>,
    f: impl FnOnce(&mut Vec<u32>) -> R,
) -> R {
    let mut v = key.take();
    let r = f(&mut v);
    key.set(v);
    r
}

thread_local! {
    static PACKED_A: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
    static PACKED_B: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// dst = scale * a b (dst += with `accumulate`) on bf16-rounded inputs, f32 sums.
///
/// # Safety
/// As [`super::matmul::matmul_raw_at`]: every view inside its allocation, `dst`'s elements
/// written or read by no one else during the call and overlapping neither input.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_bf16_raw(
    dst: *mut f32,
    d: Mat,
    a: *const f32,
    am: Mat,
    b: *const f32,
    bm: Mat,
    accumulate: bool,
    scale: f32,
    threads: Threads,
) {
    let (m, n, k) = (d.rows, d.cols, am.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *dst.add(d.offset + i * d.row_stride + j * d.col_stride) = 0.0;
                }
            }
        }
        return;
    }
    let kernel = bf16_kernel();
    let (a, b_t) = (Source { ptr: a, m: am }, Source { ptr: b, m: bm.t() });
    let c = SharedMut(dst.add(d.offset));
    let n_panels = n.div_ceil(NR);
    let m_blocks = m.div_ceil(MC);
    // Small products stay on the calling thread: handing them out costs more than they do.
    let pool = threads == Threads::Pool && rayon::current_num_threads() > 1 && m * n * k >= MIN_POOL_WORK;
    // Tasks split the columns too where the rows alone would leave threads idle.
    let column_parts = if pool { (2 * rayon::current_num_threads()).div_ceil(m_blocks).min(n_panels) } else { 1 };
    let panels_per_part = n_panels.div_ceil(column_parts);
    // All of B is packed first, depth block by depth block ([block][panel][KC / 2][NR]), so that
    // each task sweeps the whole depth over its rows while their outputs stay in cache.
    let k_blocks = k.div_ceil(KC);
    let block_len = n_panels * (KC / 2) * NR;
    let depth = |kb: usize| (kb * KC, KC.min(k - kb * KC));
    with_buffer(&PACKED_B, |packed_b| {
        let packed_b = sized(packed_b, k_blocks * block_len);
        let pack_b = |(i, out): (usize, &mut [u32])| {
            let (kb, panel) = (i / n_panels, i % n_panels);
            let (k0, kc) = depth(kb);
            pack_for(kernel, b_t, panel * NR, NR.min(n - panel * NR), k0, kc, NR, out);
        };
        if pool {
            packed_b.par_chunks_mut((KC / 2) * NR).enumerate().for_each(pack_b);
        } else {
            packed_b.chunks_mut((KC / 2) * NR).enumerate().for_each(pack_b);
        }
        let packed_b = &*packed_b;
        let task = |t: usize| {
            let (block, part) = (t / column_parts, t % column_parts);
            let (i0, rows) = (block * MC, MC.min(m - block * MC));
            let panels = (part * panels_per_part)..((part + 1) * panels_per_part).min(n_panels);
            // The whole wrapper, not its pointer field, is what the closure must capture (Sync).
            let out = c;
            with_buffer(&PACKED_A, |packed_a| {
                for kb in 0..k_blocks {
                    let (k0, kc) = depth(kb);
                    let kp = kc.div_ceil(2);
                    let packed_a = sized(packed_a, rows.div_ceil(MR) * kp * MR);
                    pack_for(kernel, a, i0, rows, k0, kc, MR, packed_a);
                    for jp in panels.clone() {
                        let b_panel = &packed_b[kb * block_len + jp * (KC / 2) * NR..][..kp * NR];
                        for (ip, a_panel) in packed_a.chunks_exact(kp * MR).enumerate() {
                            let (i, j) = (i0 + ip * MR, jp * NR);
                            let tile = Tile {
                                c: out.0.add(i * d.row_stride + j * d.col_stride),
                                row_stride: d.row_stride,
                                col_stride: d.col_stride,
                                rows: MR.min(m - i),
                                cols: NR.min(n - j),
                                accumulate: accumulate || kb > 0,
                                scale,
                            };
                            run_tile(kernel, kp, a_panel, b_panel, tile);
                        }
                    }
                }
            });
        };
        let tasks = m_blocks * column_parts;
        if pool {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
    });
}

/// One micro-tile on `kernel`.
///
/// # Safety
/// The tile lies in the output; the panels hold kp pairs.
#[inline(always)]
unsafe fn run_tile(kernel: Bf16Kernel, kp: usize, a_panel: &[u32], b_panel: &[u32], tile: Tile) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Bf16Kernel::Avx512Bf16 => avx512_bf16_tile(kp, a_panel.as_ptr(), b_panel.as_ptr(), tile),
        _ => emulated_tile(kp, a_panel, b_panel, tile),
    }
}

/// The weight gradient of a k x k convolution over a frame of pixels `wp` wide (the layout of
/// [`super::conv`]'s shifted weight gradient), on bf16-rounded inputs with f32 sums, on the
/// calling thread or, with `threads` = Pool, split by taps and panels over the pool:
/// dweight[o][(ky * k + kx) * c + ch] += sum over p < n of
/// gs[p][o] * xs[p + ky * wp + kx][ch], for gs [n.., c_out] and xs [pixels, c].
///
/// Each tap is the product of the same A (gs^T) with B = xs shifted by ky * wp + kx pixels.
/// Packing B per tap, as [`matmul_bf16_raw`] would, converts every value of xs k*k times; here
/// xs is packed once into panels of depth pairs over the whole frame, twice (pairs starting at
/// even and at odd pixels), so that every tap's B is a slice of one of them, and A once. Each
/// micro-tile then sums the whole depth in its registers.
#[allow(clippy::too_many_arguments)]
pub fn frame_weight_gradient(
    dweight: &mut [f32],
    gs: &[f32],
    c_out: usize,
    xs: &[f32],
    c: usize,
    n: usize,
    wp: usize,
    k: usize,
    threads: Threads,
) {
    let (row, taps, pixels) = (k * k * c, k * k, xs.len() / c);
    let last_shift = (k - 1) * wp + k - 1;
    assert!(n > 0 && gs.len() >= n * c_out && pixels >= n + last_shift && dweight.len() >= c_out * row);
    let kernel = bf16_kernel();
    let pairs = n.div_ceil(2);
    // The frame's pixels as depth pairs starting at even pixels (copy 0) and at odd ones (1).
    let copy_pairs = [pixels.div_ceil(2), (pixels - 1).div_ceil(2)];
    let (a_panels, b_panels) = (c_out.div_ceil(MR), c.div_ceil(NR));
    with_buffer(&PACKED_A, |packed_a| {
        with_buffer(&PACKED_B, |packed_b| {
            let packed_a = sized(packed_a, a_panels * pairs * MR);
            let a = Source { ptr: gs.as_ptr(), m: Mat::dense(n, c_out).t() };
            pack_for(kernel, a, 0, c_out, 0, n, MR, packed_a);
            let packed_b = sized(packed_b, b_panels * (copy_pairs[0] + copy_pairs[1]) * NR);
            let (even, odd) = packed_b.split_at_mut(b_panels * copy_pairs[0] * NR);
            let b_t = Source { ptr: xs.as_ptr(), m: Mat::dense(pixels, c).t() };
            pack_for(kernel, b_t, 0, c, 0, pixels, NR, even);
            pack_for(kernel, b_t, 0, c, 1, pixels - 1, NR, odd);
            let copies = [&*even, &*odd];
            let dst = SharedMut(dweight.as_mut_ptr());
            let packed_a = &*packed_a;
            // One task per (tap, panel of B): its columns of dweight are its own.
            let task = |t: usize| {
                let (tap, jp) = (t / b_panels, t % b_panels);
                let shift = (tap / k) * wp + tap % k;
                let (copy, per_panel, first) = (copies[shift % 2], copy_pairs[shift % 2], shift / 2);
                assert!(first + pairs <= per_panel, "tap {tap}'s pairs run past its copy of the frame");
                let b_panel = &copy[(jp * per_panel + first) * NR..][..pairs * NR];
                let out = dst;
                for (ip, a_panel) in packed_a.chunks_exact(pairs * MR).enumerate() {
                    let (i, j) = (ip * MR, jp * NR);
                    let tile = Tile {
                        // SAFETY: row i + r < c_out and column tap * c + j + l < row for the
                        // tile's live lanes, inside `dweight` (asserted above).
                        c: unsafe { out.0.add(i * row + tap * c + j) },
                        row_stride: row,
                        col_stride: 1,
                        rows: MR.min(c_out - i),
                        cols: NR.min(c - j),
                        accumulate: true,
                        scale: 1.0,
                    };
                    // SAFETY: the panels hold `pairs` pairs each; the tile is in `dweight` and
                    // no other task writes its columns.
                    unsafe { run_tile(kernel, pairs, a_panel, b_panel, tile) };
                }
            };
            if threads == Threads::Pool && rayon::current_num_threads() > 1 {
                (0..taps * b_panels).into_par_iter().for_each(task);
            } else {
                (0..taps * b_panels).for_each(task);
            }
        })
    });
}
