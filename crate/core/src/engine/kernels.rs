//! The engine's fused passes: each is a serial row kernel compiled per SIMD level
//! ([`multiversion!`]) and a driver that runs it over row chunks on rayon. Chunk boundaries
//! depend only on the shapes, and per-chunk partial sums are added in chunk order, so results
//! do not depend on the number of threads.

use rayon::prelude::*;

use super::simd::{dot, max, multiversion, sum, Real, LANES};

/// Rows per parallel task for rows of `d` values: tasks of ~16k values amortise rayon.
pub fn grain(d: usize) -> usize {
    (16384 / d.max(1)).max(1)
}

/// Zeroed per-chunk partial sums: `chunks` slices of `width` in `scratch` (grown once).
fn partials<T: Real>(scratch: &mut Vec<T>, chunks: usize, width: usize) -> &mut [T] {
    if scratch.len() < chunks * width {
        scratch.resize(chunks * width, T::ZERO);
    }
    let p = &mut scratch[..chunks * width];
    p.fill(T::ZERO);
    p
}

/// `out[j] += sum over chunks of partial[c][j]`, in chunk order.
fn add_partials<T: Real>(partial: &[T], width: usize, outs: &mut [&mut [T]]) {
    let mut offset = 0;
    for out in outs.iter_mut() {
        let n = out.len();
        for chunk in partial.chunks_exact(width) {
            for (o, &v) in out.iter_mut().zip(&chunk[offset..offset + n]) {
                *o += v;
            }
        }
        offset += n;
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

multiversion! {
    /// y = (x - mean) * rstd * gamma + beta for each row of `gamma.len()` values; the row's
    /// mean and 1/sqrt(var + eps) go to `mean` and `rstd` (two-pass variance).
    fn layer_norm_rows<T>(x: &[T], gamma: &[T], beta: &[T], eps: T, y: &mut [T], mean: &mut [T], rstd: &mut [T]) {
        let d = gamma.len();
        let inv_d = T::from_f64(1.0 / d as f64);
        for (((xr, yr), m), r) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).zip(mean.iter_mut()).zip(rstd.iter_mut()) {
            let mu = sum(xr) * inv_d;
            let s = T::ONE / (squared_deviation(xr, mu) * inv_d + eps).sqrt();
            // Every operand a slice of `d` values: no bounds checks, so the loop vectorises.
            for (((y, &x), &g), &b) in yr.iter_mut().zip(xr).zip(gamma).zip(&beta[..d]) {
                *y = (x - mu) * s * g + b;
            }
            *m = mu;
            *r = s;
        }
    }
}

/// Sum of (x - mu)^2, through lane accumulators.
#[inline(always)]
fn squared_deviation<T: Real>(x: &[T], mu: T) -> T {
    let mut acc = [T::ZERO; LANES];
    let full = x.len() / LANES * LANES;
    for c in x[..full].chunks_exact(LANES) {
        for j in 0..LANES {
            acc[j] += (c[j] - mu) * (c[j] - mu);
        }
    }
    for (j, &v) in x[full..].iter().enumerate() {
        acc[j] += (v - mu) * (v - mu);
    }
    sum(&acc)
}

pub fn layer_norm<T: Real>(x: &[T], gamma: &[T], beta: &[T], eps: f64, y: &mut [T], mean: &mut [T], rstd: &mut [T]) {
    let d = gamma.len();
    let g = grain(d);
    let eps = T::from_f64(eps);
    y.par_chunks_mut(g * d)
        .zip(x.par_chunks(g * d))
        .zip(mean.par_chunks_mut(g).zip(rstd.par_chunks_mut(g)))
        .for_each(|((y, x), (m, r))| layer_norm_rows(x, gamma, beta, eps, y, m, r));
}

/// The first `n` <= [`LANES`] values of a LayerNorm backward row's block: value j goes to lane
/// j's sums and to its dgamma, dbeta. Inlined into each SIMD level's kernel; with n = LANES a
/// constant there, the loop has no bounds checks and vectorises.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn ln_backward_lanes<T: Real>(
    n: usize,
    x: &[T],
    dy: &[T],
    gamma: &[T],
    mu: T,
    s: T,
    acc_gh: &mut [T; LANES],
    acc_ghx: &mut [T; LANES],
    dgamma: &mut [T],
    dbeta: &mut [T],
) {
    let (x, dy, gamma, dgamma, dbeta) = (&x[..n], &dy[..n], &gamma[..n], &mut dgamma[..n], &mut dbeta[..n]);
    for j in 0..n {
        let xhat = (x[j] - mu) * s;
        let gh = dy[j] * gamma[j];
        acc_gh[j] += gh;
        acc_ghx[j] += gh * xhat;
        dgamma[j] += dy[j] * xhat;
        dbeta[j] += dy[j];
    }
}

multiversion! {
    /// dx += d LN(x) / dx . dy per row; partial[0..d] += dy * xhat (dgamma), partial[d..2d] += dy (dbeta).
    fn layer_norm_backward_rows<T>(x: &[T], gamma: &[T], mean: &[T], rstd: &[T], dy: &[T], dx: &mut [T], partial: &mut [T]) {
        let d = gamma.len();
        let inv_d = T::from_f64(1.0 / d as f64);
        let (dgamma, dbeta) = partial.split_at_mut(d);
        let dbeta = &mut dbeta[..d];
        for ((((xr, dyr), dxr), &mu), &s) in x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d)).zip(mean).zip(rstd) {
            let mut acc_gh = [T::ZERO; LANES];
            let mut acc_ghx = [T::ZERO; LANES];
            // Lane j takes every value at j mod LANES: whole blocks, then the tail.
            let full = d / LANES * LANES;
            for base in (0..full).step_by(LANES) {
                let (dg, db) = (&mut dgamma[base..], &mut dbeta[base..]);
                ln_backward_lanes(LANES, &xr[base..], &dyr[base..], &gamma[base..], mu, s, &mut acc_gh, &mut acc_ghx, dg, db);
            }
            let (dg, db) = (&mut dgamma[full..], &mut dbeta[full..]);
            ln_backward_lanes(d - full, &xr[full..], &dyr[full..], &gamma[full..], mu, s, &mut acc_gh, &mut acc_ghx, dg, db);
            let mean_gh = sum(&acc_gh) * inv_d;
            let mean_ghx = sum(&acc_ghx) * inv_d;
            for (((dx, &x), &dy), &g) in dxr.iter_mut().zip(xr).zip(dyr).zip(gamma) {
                let xhat = (x - mu) * s;
                *dx += s * (dy * g - mean_gh - xhat * mean_ghx);
            }
        }
    }
}

/// `dx += dLN/dx . dy`, `dgamma += sum dy * xhat`, `dbeta += sum dy` (over rows).
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward<T: Real>(
    x: &[T],
    gamma: &[T],
    mean: &[T],
    rstd: &[T],
    dy: &[T],
    dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
    scratch: &mut Vec<T>,
) {
    let d = gamma.len();
    let g = grain(d);
    let rows = mean.len();
    let chunks = rows.div_ceil(g);
    let partial = partials(scratch, chunks, 2 * d);
    dx.par_chunks_mut(g * d)
        .zip(x.par_chunks(g * d).zip(dy.par_chunks(g * d)))
        .zip(mean.par_chunks(g).zip(rstd.par_chunks(g)))
        .zip(partial.par_chunks_mut(2 * d))
        .for_each(|(((dx, (x, dy)), (m, r)), p)| layer_norm_backward_rows(x, gamma, m, r, dy, dx, p));
    add_partials(partial, 2 * d, &mut [dgamma, dbeta]);
}

// ---------------------------------------------------------------------------------------------
// Softmax over rows (attention), with the score scale and a bias repeated over row blocks

multiversion! {
    /// In place: each row of `s` becomes softmax(scale * s + bias_row); `bias` holds as many
    /// rows as `s`, or is empty (no bias). Serial: the attention parallelises over heads.
    pub fn softmax_rows<T>(s: &mut [T], bias: &[T], d: usize, scale: T) {
        for (r, row) in s.chunks_exact_mut(d).enumerate() {
            if bias.is_empty() {
                for v in row.iter_mut() {
                    *v = *v * scale;
                }
            } else {
                let b = &bias[r * d..(r + 1) * d];
                for i in 0..d {
                    row[i] = row[i] * scale + b[i];
                }
            }
            let m = max(row);
            for v in row.iter_mut() {
                *v = (*v - m).exp_v();
            }
            let inv = T::ONE / sum(row);
            for v in row.iter_mut() {
                *v = *v * inv;
            }
        }
    }
}

multiversion! {
    /// In place: `dp` (d loss / d probs) becomes d loss / d logits = p * (dp - <dp, p>).
    pub fn softmax_backward_rows<T>(p: &[T], dp: &mut [T], d: usize) {
        for (pr, dr) in p.chunks_exact(d).zip(dp.chunks_exact_mut(d)) {
            let inner = dot(pr, dr);
            for i in 0..d {
                dr[i] = pr[i] * (dr[i] - inner);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bias, GELU, residual

multiversion! {
    fn add_bias_rows<T>(y: &mut [T], bias: &[T]) {
        let d = bias.len();
        for row in y.chunks_exact_mut(d) {
            for i in 0..d {
                row[i] += bias[i];
            }
        }
    }
}

/// y[r, :] += bias for rows of `bias.len()`.
pub fn add_bias<T: Real>(y: &mut [T], bias: &[T]) {
    let d = bias.len();
    y.par_chunks_mut(grain(d) * d).for_each(|y| add_bias_rows(y, bias));
}

multiversion! {
    /// h += bias (pre-activation, kept for the backward pass); g = h * Phi(h).
    fn bias_gelu_rows<T>(h: &mut [T], bias: &[T], g: &mut [T]) {
        let d = bias.len();
        for (hr, gr) in h.chunks_exact_mut(d).zip(g.chunks_exact_mut(d)) {
            for i in 0..d {
                let v = hr[i] + bias[i];
                hr[i] = v;
                gr[i] = v * v.normal_cdf();
            }
        }
    }
}

pub fn bias_gelu<T: Real>(h: &mut [T], bias: &[T], g: &mut [T]) {
    let d = bias.len();
    let n = grain(d) * d;
    h.par_chunks_mut(n).zip(g.par_chunks_mut(n)).for_each(|(h, g)| bias_gelu_rows(h, bias, g));
}

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

multiversion! {
    /// In place: dg *= GELU'(h) = Phi(h) + h * phi(h), with Phi(h) read back from the
    /// forward's output as GELU(h) / h (within 2 ulp of recomputing it: one exp instead of
    /// erfc's exp and division plus the density's exp); Phi = 1/2 where h is too small to
    /// divide by.
    fn gelu_backward_rows<T>(h: &[T], gelu: &[T], dg: &mut [T]) {
        let c = T::from_f64(FRAC_1_SQRT_2PI);
        let minus_half = T::from_f64(-0.5);
        let half = T::from_f64(0.5);
        let (tiny, minus_tiny) = (T::from_f64(1e-30), T::from_f64(-1e-30));
        for ((&v, &g), d) in h.iter().zip(gelu).zip(dg.iter_mut()) {
            let pdf = c * (minus_half * v * v).exp_v();
            let quotient = g / v;
            let cdf = if (v < tiny) & (v > minus_tiny) { half } else { quotient };
            *d = *d * (cdf + v * pdf);
        }
    }
}

/// dg *= GELU'(h), given the pre-activation `h` and the forward's output `gelu` = GELU(h).
pub fn gelu_backward<T: Real>(h: &[T], gelu: &[T], dg: &mut [T]) {
    const CHUNK: usize = 16384;
    assert!(h.len() == gelu.len() && h.len() == dg.len(), "gelu_backward: buffers of different lengths");
    h.par_chunks(CHUNK)
        .zip(gelu.par_chunks(CHUNK))
        .zip(dg.par_chunks_mut(CHUNK))
        .for_each(|((h, gelu), dg)| gelu_backward_rows(h, gelu, dg));
}

multiversion! {
    /// out = x + (branch * gamma) * scale per row (`gamma` empty: no LayerScale).
    fn residual_rows<T>(x: &[T], branch: &[T], gamma: &[T], scale: T, out: &mut [T]) {
        if gamma.is_empty() {
            for i in 0..x.len() {
                out[i] = x[i] + branch[i] * scale;
            }
        } else {
            let d = gamma.len();
            for ((xr, br), or) in x.chunks_exact(d).zip(branch.chunks_exact(d)).zip(out.chunks_exact_mut(d)) {
                for i in 0..d {
                    or[i] = xr[i] + br[i] * gamma[i] * scale;
                }
            }
        }
    }
}

/// The residual update of a block: out[b] = x[b] + (branch[b] * gamma) * scales[b] for each
/// sample b of `rows_per_sample` rows of `d` (`gamma` empty: no LayerScale; scales are the
/// stochastic-depth factors, 1 when off).
pub fn residual<T: Real>(x: &[T], branch: &[T], gamma: &[T], scales: &[T], d: usize, out: &mut [T]) {
    let per = x.len() / scales.len();
    out.par_chunks_mut(per).zip(x.par_chunks(per).zip(branch.par_chunks(per))).zip(scales.par_iter()).for_each(
        |((o, (x, b)), &s)| {
            for ((o, x), b) in o.chunks_mut(grain(d) * d).zip(x.chunks(grain(d) * d)).zip(b.chunks(grain(d) * d)) {
                residual_rows(x, b, gamma, s, o)
            }
        },
    );
}

multiversion! {
    /// dbranch = (dx * scale) * gamma; partial += (dx * scale) * branch (dgamma).
    fn residual_backward_rows<T>(dx: &[T], branch: &[T], gamma: &[T], scale: T, dbranch: &mut [T], partial: &mut [T]) {
        if gamma.is_empty() {
            for i in 0..dx.len() {
                dbranch[i] = dx[i] * scale;
            }
        } else {
            let d = gamma.len();
            let partial = &mut partial[..d];
            for ((dr, br), or) in dx.chunks_exact(d).zip(branch.chunks_exact(d)).zip(dbranch.chunks_exact_mut(d)) {
                for ((((o, p), &dv), &b), &g) in or.iter_mut().zip(partial.iter_mut()).zip(dr).zip(br).zip(gamma) {
                    let ds = dv * scale;
                    *o = ds * g;
                    *p += ds * b;
                }
            }
        }
    }
}

/// Backward of [`residual`] for the branch: dbranch, and dgamma += its sum (if LayerScale).
#[allow(clippy::too_many_arguments)]
pub fn residual_backward<T: Real>(
    dx: &[T],
    branch: &[T],
    gamma: &[T],
    scales: &[T],
    d: usize,
    dbranch: &mut [T],
    dgamma: &mut [T],
    scratch: &mut Vec<T>,
) {
    let per = dx.len() / scales.len();
    let partial = partials(scratch, scales.len(), d);
    dbranch
        .par_chunks_mut(per)
        .zip(dx.par_chunks(per).zip(branch.par_chunks(per)))
        .zip(scales.par_iter().zip(partial.par_chunks_mut(d)))
        .for_each(|((o, (dx, b)), (&s, p))| residual_backward_rows(dx, b, gamma, s, o, p));
    if !gamma.is_empty() {
        add_partials(partial, d, &mut [dgamma]);
    }
}

multiversion! {
    fn column_sums_rows<T>(x: &[T], stride: usize, offset: usize, partial: &mut [T]) {
        let w = partial.len();
        for row in x.chunks_exact(stride) {
            let row = &row[offset..offset + w];
            for i in 0..w {
                partial[i] += row[i];
            }
        }
    }
}

/// out += sum over rows of x[r, offset..offset + out.len()], for rows of `stride` values.
pub fn add_column_sums<T: Real>(x: &[T], stride: usize, offset: usize, out: &mut [T], scratch: &mut Vec<T>) {
    let w = out.len();
    let g = grain(stride);
    let rows = x.len() / stride;
    let chunks = rows.div_ceil(g);
    let partial = partials(scratch, chunks, w);
    x.par_chunks(g * stride).zip(partial.par_chunks_mut(w)).for_each(|(x, p)| column_sums_rows(x, stride, offset, p));
    add_partials(partial, w, &mut [out]);
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy

multiversion! {
    /// Per row of `logits`: loss = lse - (1 - s) z_t - s mean(z) (label smoothing s), and in
    /// place the gradient (softmax - (1 - s) onehot(t) - s / K) * grad_scale. Returns the sum
    /// of the losses (f64) and the number of rows whose argmax (first maximum) is the target.
    fn cross_entropy_rows<T>(logits: &mut [T], targets: &[u32], smoothing: T, grad_scale: T) -> (f64, usize) {
        let k = logits.len() / targets.len();
        let inv_k = T::from_f64(1.0 / k as f64);
        let mut loss = 0.0f64;
        let mut hits = 0;
        for (z, &t) in logits.chunks_exact_mut(k).zip(targets) {
            let t = t as usize;
            let m = max(z);
            if z.iter().position(|&v| v == m) == Some(t) {
                hits += 1;
            }
            let (zt, mean) = (z[t], sum(z) * inv_k);
            for v in z.iter_mut() {
                *v = (*v - m).exp_v();
            }
            let total = sum(z);
            let lse = m + total.ln();
            loss += (lse - (T::ONE - smoothing) * zt - smoothing * mean).to_f64();
            let scale = grad_scale / total;
            let uniform = smoothing * inv_k * grad_scale;
            for v in z.iter_mut() {
                *v = *v * scale - uniform;
            }
            z[t] = z[t] - (T::ONE - smoothing) * grad_scale;
        }
        (loss, hits)
    }
}

/// Cross-entropy over rows of `logits` [rows, K] against `targets` [rows], turned in place
/// into the gradient of `grad_scale * sum of losses`. Returns (sum of losses, argmax hits).
pub fn cross_entropy<T: Real>(logits: &mut [T], targets: &[u32], smoothing: f64, grad_scale: f64) -> (f64, usize) {
    let k = logits.len() / targets.len();
    let g = grain(k).max(1);
    let (s, gs) = (T::from_f64(smoothing), T::from_f64(grad_scale));
    logits
        .par_chunks_mut(g * k)
        .zip(targets.par_chunks(g))
        .map(|(z, t)| cross_entropy_rows(z, t, s, gs))
        .collect::<Vec<_>>()
        .into_iter()
        .fold((0.0, 0), |(l, h), (a, b)| (l + a, h + b))
}

// ---------------------------------------------------------------------------------------------
// Noise and argmax

multiversion! {
    /// -ln(-ln u) of uniform draws u in (0, 1) (given as f32 in `v`), in place.
    fn gumbel_rows(v: &mut [f32]) {
        for x in v.iter_mut() {
            *x = -super::simd::ln_f32(-super::simd::ln_f32(*x));
        }
    }
}

/// Gumbel(0, 1) noise: one SplitMix64 stream from `seed`, draw `offset + i` to element i,
/// generated in parallel chunks by jumping the stream ahead (the same values whatever the
/// threads, and whatever part of the stream a micro-batch starts at).
pub fn gumbel_noise(seed: u64, offset: usize, out: &mut [f32]) {
    out.par_chunks_mut(GUMBEL_CHUNK)
        .enumerate()
        .for_each(|(i, o)| gumbel_noise_serial(seed, offset + i * GUMBEL_CHUNK, o));
}

/// Draws per parallel task of the noise (any split gives the same values: the stream is a counter).
pub const GUMBEL_CHUNK: usize = 16384;

/// The largest f32 below 1 (1 - 2^-24).
const LARGEST_BELOW_ONE: f64 = 1.0 - 1.0 / (1u64 << 24) as f64;

/// [`gumbel_noise`] on the calling thread: draws `offset..offset + out.len()` of the same
/// stream, for a caller that draws it a block at a time.
pub fn gumbel_noise_serial(seed: u64, offset: usize, out: &mut [f32]) {
    let mut rng = crate::rng::SplitMix64::new(seed);
    rng.skip(offset as u64);
    for v in out.iter_mut() {
        // Below 2^-64 the second log would see -ln u > 44 and still be finite; 1e-20 keeps u a
        // normal f32. Above 1 - 2^-25 u would round to 1.0 in f32, ln u to 0, and the noise to
        // -ln(-0.0) = +88: the largest f32 below 1 keeps it finite and at its true size (~17).
        *v = rng.uniform().clamp(1e-20, LARGEST_BELOW_ONE) as f32;
    }
    gumbel_rows(out);
}

/// Index of the first largest value of each row of `width`.
pub fn argmax_rows<T: Real>(x: &[T], width: usize, out: &mut Vec<u32>) {
    out.clear();
    out.resize(x.len() / width, 0);
    let g = grain(width);
    out.par_chunks_mut(g).zip(x.par_chunks(g * width)).for_each(|(o, x)| {
        for (o, row) in o.iter_mut().zip(x.chunks_exact(width)) {
            let m = max(row);
            *o = row.iter().position(|&v| v == m).unwrap_or(0) as u32;
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Optimizer

/// AdamW hyper-parameters of one update of one parameter group.
#[derive(Clone, Copy)]
pub struct AdamStep {
    pub grad_scale: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub lr: f64,
    pub weight_decay: f64,
    pub eps: f64,
    pub bias_correction1: f64,
    pub bias_correction2: f64,
}

multiversion! {
    /// m, v <- moments of (g * scale); p -= lr * (m_hat / (sqrt(v_hat) + eps)) + lr * wd * p.
    /// The operations and their order are those of beit's candle AdamW (optim.rs).
    fn adamw_rows<T>(p: &mut [T], g: &[T], m: &mut [T], v: &mut [T], h: AdamStep) {
        let (b1, one_minus_b1) = (T::from_f64(h.beta1), T::from_f64(1.0 - h.beta1));
        let (b2, one_minus_b2) = (T::from_f64(h.beta2), T::from_f64(1.0 - h.beta2));
        let scale = T::from_f64(h.grad_scale);
        let lr = T::from_f64(h.lr);
        let decay = T::from_f64(h.lr * h.weight_decay);
        let inv_bc1 = T::from_f64(1.0 / h.bias_correction1);
        let inv_sqrt_bc2 = T::from_f64(1.0 / h.bias_correction2.sqrt());
        let eps = T::from_f64(h.eps);
        for i in 0..p.len() {
            let gs = g[i] * scale;
            m[i] = b1 * m[i] + one_minus_b1 * gs;
            v[i] = b2 * v[i] + one_minus_b2 * (gs * gs);
            let update = (m[i] * inv_bc1) / (v[i].sqrt() * inv_sqrt_bc2 + eps);
            p[i] = p[i] - (lr * update + decay * p[i]);
        }
    }
}

/// One AdamW update of a parameter tensor (slices of the same length), in parallel chunks.
pub fn adamw<T: Real>(p: &mut [T], g: &[T], m: &mut [T], v: &mut [T], h: AdamStep) {
    const CHUNK: usize = 16384;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| adamw_rows(p, g, m, v, h));
}

multiversion! {
    fn ema_rows<T>(ema: &mut [T], p: &[T], d: T, one_minus: T) {
        for (e, &v) in ema.iter_mut().zip(p) {
            *e = d * *e + one_minus * v;
        }
    }
}

/// ema = decay * ema + (1 - decay) * p, the operations of `optim::ema_update`.
pub fn ema<T: Real>(ema: &mut [T], p: &[T], decay: f64) {
    let (d, one_minus) = (T::from_f64(decay), T::from_f64(1.0 - decay));
    ema.par_chunks_mut(16384).zip(p.par_chunks(16384)).for_each(|(e, p)| ema_rows(e, p, d, one_minus));
}

multiversion! {
    fn sum_of_squares_rows<T>(x: &[T]) -> f64 {
        let mut acc = [0.0f64; LANES];
        let full = x.len() / LANES * LANES;
        for c in x[..full].chunks_exact(LANES) {
            for j in 0..LANES {
                let v = c[j].to_f64();
                acc[j] += v * v;
            }
        }
        for (j, &v) in x[full..].iter().enumerate() {
            acc[j] += v.to_f64() * v.to_f64();
        }
        acc.iter().sum()
    }
}

/// Sum of squares in f64 (gradient norms), in fixed chunks.
pub fn sum_of_squares<T: Real>(x: &[T]) -> f64 {
    let parts: Vec<f64> = x.par_chunks(65536).map(sum_of_squares_rows).collect();
    parts.iter().sum()
}
