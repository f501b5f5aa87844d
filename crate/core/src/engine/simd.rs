//! Run-time CPU-feature dispatch for the engine's row kernels, and the vectorisable math they
//! use (exp, the normal CDF), written so that LLVM vectorises the loops.
//!
//! The release binary targets baseline x86-64; [`multiversion!`] compiles a kernel body three
//! times (AVX-512, AVX2+FMA, baseline) and picks one per call from [`level`], detected once.
//! Bodies only use `+ - * /`, comparisons/selects, `sqrt` and bit casts, and reduce through
//! [`LANES`] independent accumulators, so every level computes bit-identical results (no
//! contraction into FMA, same summation order): the level changes speed, never numbers.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::float::Float;

/// Independent accumulators of a reduction: one AVX-512 register of f32.
pub const LANES: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// AVX-512 F/BW/DQ/VL (x86-64-v4).
    Avx512,
    /// AVX2 + FMA (x86-64-v3).
    Avx2,
    /// Whatever the target guarantees (SSE2 on x86-64).
    Baseline,
}

const UNSET: u8 = 0;
static LEVEL: AtomicU8 = AtomicU8::new(UNSET);

fn encode(level: Level) -> u8 {
    match level {
        Level::Avx512 => 1,
        Level::Avx2 => 2,
        Level::Baseline => 3,
    }
}

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        // Every feature the level's kernels are compiled with (a VM may hide any one of them).
        let avx2 = std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("bmi1")
            && std::is_x86_feature_detected!("bmi2")
            && std::is_x86_feature_detected!("lzcnt")
            && std::is_x86_feature_detected!("popcnt");
        if avx2
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512vl")
        {
            return Level::Avx512;
        }
        if avx2 {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

/// The level the kernels run at: the best this CPU supports, unless [`set_level`] chose one.
pub fn level() -> Level {
    match LEVEL.load(Ordering::Relaxed) {
        1 => Level::Avx512,
        2 => Level::Avx2,
        3 => Level::Baseline,
        _ => {
            let detected = detect();
            LEVEL.store(encode(detected), Ordering::Relaxed);
            detected
        }
    }
}

/// Chooses the kernels' level (for tests and benchmarks). A level the CPU lacks falls back
/// to the best it has, so nothing can run an unsupported instruction.
pub fn set_level(wanted: Level) -> Level {
    let best = detect();
    let rank = |l: Level| encode(l);
    let chosen = if rank(wanted) < rank(best) { best } else { wanted };
    LEVEL.store(encode(chosen), Ordering::Relaxed);
    chosen
}

/// Defines `fn name(args) -> ret` or `fn name<T: Real>(args) -> ret` whose body is compiled
/// for each [`Level`] and dispatched at run time. Helpers the body calls must be `#[inline(always)]` so that they
/// are compiled with the caller's features.
macro_rules! multiversion {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                match $crate::engine::simd::level() {
                    // SAFETY: level() only reports features the CPU was detected to have.
                    $crate::engine::simd::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::engine::simd::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::engine::simd::Level::Baseline => {}
                }
            }
            body($($arg),*)
        }
    };
    ($(#[$attr:meta])* $vis:vis fn $name:ident<$T:ident>($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<$T: $crate::engine::simd::Real>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body<$T: $crate::engine::simd::Real>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512<$T: $crate::engine::simd::Real>($($arg: $ty),*) $(-> $ret)? { body::<$T>($($arg),*) }
                #[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2<$T: $crate::engine::simd::Real>($($arg: $ty),*) $(-> $ret)? { body::<$T>($($arg),*) }
                match $crate::engine::simd::level() {
                    // SAFETY: level() only reports features the CPU was detected to have.
                    $crate::engine::simd::Level::Avx512 => return unsafe { avx512::<$T>($($arg),*) },
                    $crate::engine::simd::Level::Avx2 => return unsafe { avx2::<$T>($($arg),*) },
                    $crate::engine::simd::Level::Baseline => {}
                }
            }
            body::<$T>($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// The float types the engine runs on: f32 for training, f64 for the finite-difference checks.
pub trait Real: Float + Default + std::fmt::Debug + 'static {
    /// exp for vectorised loops: f32 uses a branch-free polynomial (Cephes' expf, ~1 ulp;
    /// inputs below -87.3 give ~1e-38 instead of 0), f64 the exact function.
    fn exp_v(self) -> Self;
    /// Phi(x), the standard normal CDF, for GELU: f32 from a branch-free erfc (Numerical
    /// Recipes' Chebyshev fit, relative error ~1e-7 in f64 arithmetic; absolute error of Phi
    /// below 2e-7 in f32), f64 from the exact erf.
    fn normal_cdf(self) -> Self;
    fn max_v(self, other: Self) -> Self {
        if self > other {
            self
        } else {
            other
        }
    }
}

/// `v` as f32 values when T is f32 (the engine's bf16 GEMMs and AVX kernels take f32 buffers).
pub fn as_f32<T: Real>(v: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32.
        .then(|| unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len()) })
}

/// `v` as f32 values when T is f32.
pub fn as_f32_mut<T: Real>(v: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32.
        .then(|| unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len()) })
}

impl Real for f64 {
    #[inline(always)]
    fn exp_v(self) -> Self {
        self.exp()
    }
    #[inline(always)]
    fn normal_cdf(self) -> Self {
        0.5 * (1.0 + Float::erf(self * std::f64::consts::FRAC_1_SQRT_2))
    }
}

impl Real for f32 {
    #[inline(always)]
    fn exp_v(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn normal_cdf(self) -> Self {
        let z = self.abs() * std::f32::consts::FRAC_1_SQRT_2;
        let tail = 0.5 * erfc_nonnegative(z);
        if self < 0.0 {
            tail
        } else {
            1.0 - tail
        }
    }
}

/// e^x: x = n ln2 + r with |r| <= ln2/2, e^r by Cephes' degree-6 polynomial, 2^n through the
/// exponent bits. Rounding to n uses the 1.5 * 2^23 trick, so no float->int instruction
/// beyond SSE2 is needed.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23
    let x = x.clamp(-87.336_54, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let er = p * r * r + r + 1.0;
    // t's low mantissa bits hold n + 2^22 (as an integer): add the exponent bias there.
    let bits = (t.to_bits() as i32 - 0x4B40_0000 + 127) << 23;
    er * f32::from_bits(bits as u32)
}

/// ln x for positive normal f32 (Cephes' logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)),
/// ln m by a degree-9 polynomial; ~1 ulp), branch-free so that loops over it vectorise.
#[inline(always)]
pub fn ln_f32(x: f32) -> f32 {
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 126;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000); // in [0.5, 1)
    let small = m < std::f32::consts::FRAC_1_SQRT_2;
    e -= small as i32;
    m = if small { m + m - 1.0 } else { m - 1.0 };
    let z = m * m;
    let mut y = 7.037_683_6e-2f32;
    y = y * m - 1.151_461e-1;
    y = y * m + 1.167_699_9e-1;
    y = y * m - 1.242_014_1e-1;
    y = y * m + 1.424_932_3e-1;
    y = y * m - 1.666_805_8e-1;
    y = y * m + 2.000_071_4e-1;
    y = y * m - 2.499_999_4e-1;
    y = y * m + 3.333_333e-1;
    let ef = e as f32;
    y = y * m * z + ef * -2.121_944_4e-4 - 0.5 * z;
    m + y + ef * 0.693_359_4
}

/// erfc(z) for z >= 0 (Numerical Recipes' erfcc).
#[inline(always)]
fn erfc_nonnegative(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let mut p = 0.170_872_77f32;
    p = p * t - 0.822_152_23;
    p = p * t + 1.488_515_9;
    p = p * t - 1.135_204;
    p = p * t + 0.278_868_07;
    p = p * t - 0.186_288_06;
    p = p * t + 0.096_784_18;
    p = p * t + 0.374_091_96;
    p = p * t + 1.000_023_7;
    p = p * t - 1.265_512_2;
    t * exp_f32(p - z * z)
}

/// Sum of a slice through [`LANES`] accumulators (vectorisable; the order is fixed).
#[inline(always)]
pub fn sum<T: Real>(x: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] += c[j];
        }
    }
    for (j, &v) in rest.iter().enumerate() {
        acc[j] += v;
    }
    reduce(acc)
}

/// Sum of x_i * y_i, as [`sum`].
#[inline(always)]
pub fn dot<T: Real>(x: &[T], y: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    let full = n / LANES * LANES;
    for (cx, cy) in x[..full].chunks_exact(LANES).zip(y[..full].chunks_exact(LANES)) {
        for j in 0..LANES {
            acc[j] += cx[j] * cy[j];
        }
    }
    for j in full..n {
        acc[j - full] += x[j] * y[j];
    }
    reduce(acc)
}

/// Largest element (the first of a slice of NaNs-free values).
#[inline(always)]
pub fn max<T: Real>(x: &[T]) -> T {
    let mut acc = [x[0]; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] = c[j].max_v(acc[j]);
        }
    }
    for (j, &v) in rest.iter().enumerate() {
        acc[j] = v.max_v(acc[j]);
    }
    let mut m = acc[0];
    for &v in &acc[1..] {
        m = v.max_v(m);
    }
    m
}

/// Pairwise sum of the accumulators (fixed order).
#[inline(always)]
fn reduce<T: Real>(mut acc: [T; LANES]) -> T {
    let mut width = LANES / 2;
    while width > 0 {
        for j in 0..width {
            acc[j] += acc[j + width];
        }
        width /= 2;
    }
    acc[0]
}
