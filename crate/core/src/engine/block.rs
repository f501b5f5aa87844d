//! One pre-LN BEiT block on the engine: x_mid = x + drop(lambda_1 * attn(LN1 x)),
//! x_out = x_mid + drop(lambda_2 * mlp(LN2 x_mid)); forward and backward over a batch's
//! buffers. The attention runs per (image, head), reading q, k and v in place from the QKV
//! output and writing its context into its columns (no transposes, no copies), with the scale
//! and relative position bias inside the softmax.

use rayon::prelude::*;

use super::kernels::{
    self, add_bias, add_column_sums, bias_gelu, layer_norm, layer_norm_backward, residual, residual_backward,
};
use super::linear::Linear;
use super::matmul::{matmul_at, matmul_raw_at, Mat, Threads};
use super::simd::Real;
use super::SharedMut;
use crate::arch::backbone::BlockParams;
use crate::config::Precision;
use crate::error::Result;
use crate::params::{slots_mut, Layout, NormParams, Slot};

/// The sizes of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shapes {
    pub batch: usize,
    pub patches: usize,
    pub tokens: usize,
    /// batch * tokens
    pub rows: usize,
    pub d: usize,
    pub f: usize,
    pub heads: usize,
    /// Values of one flattened patch.
    pub patch_values: usize,
}

/// A LayerNorm's slots.
#[derive(Debug, Clone, Copy)]
pub struct Norm {
    pub w: Slot,
    pub b: Slot,
    pub eps: f64,
}

impl Norm {
    pub fn new(p: &NormParams, layout: &Layout) -> Self {
        Self { w: layout.slot(p.weight), b: layout.slot(p.bias), eps: p.eps }
    }

    pub fn forward<T: Real>(&self, p: &[T], x: &[T], y: &mut [T], mean: &mut [T], rstd: &mut [T]) {
        layer_norm(x, self.w.of(p), self.b.of(p), self.eps, y, mean, rstd);
    }

    /// dx += dLN/dx . dy; the weight and bias gradients are added into `grads`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<T: Real>(
        &self,
        p: &[T],
        grads: &mut [T],
        x: &[T],
        (mean, rstd): (&[T], &[T]),
        dy: &[T],
        dx: &mut [T],
        scratch: &mut Vec<T>,
    ) {
        let [dw, db] = slots_mut(grads, [self.w, self.b]);
        layer_norm_backward(x, self.w.of(p), mean, rstd, dy, dx, dw, db, scratch);
    }
}

/// A block's slots.
#[derive(Debug, Clone)]
pub struct Block {
    index: usize,
    ln1: Norm,
    /// The query, key and value weights as one [3D, D] matrix.
    qkv: Linear,
    query_bias: Slot,
    value_bias: Slot,
    table: Option<Slot>,
    proj: Linear,
    lambda_1: Option<Slot>,
    ln2: Norm,
    fc1: Linear,
    fc2: Linear,
    lambda_2: Option<Slot>,
    pub drop_path: f64,
}

/// Activations of one block kept for its backward pass.
pub struct BlockActs<T> {
    mean1: Vec<T>,
    rstd1: Vec<T>,
    xn1: Vec<T>,
    qkv: Vec<T>,
    probs: Vec<T>,
    ctx: Vec<T>,
    attn: Vec<T>,
    x_mid: Vec<T>,
    mean2: Vec<T>,
    rstd2: Vec<T>,
    xn2: Vec<T>,
    hidden: Vec<T>,
    gelu: Vec<T>,
    mlp: Vec<T>,
}

impl<T: Real> BlockActs<T> {
    pub fn new(s: &Shapes) -> Self {
        let z = |n: usize| vec![T::ZERO; n];
        let (r, d, f) = (s.rows, s.d, s.f);
        Self {
            mean1: z(r),
            rstd1: z(r),
            xn1: z(r * d),
            qkv: z(r * 3 * d),
            probs: z(s.batch * s.heads * s.tokens * s.tokens),
            ctx: z(r * d),
            attn: z(r * d),
            x_mid: z(r * d),
            mean2: z(r),
            rstd2: z(r),
            xn2: z(r * d),
            hidden: z(r * f),
            gelu: z(r * f),
            mlp: z(r * d),
        }
    }
}

/// Gradients flowing backward, shared by all blocks.
pub struct BlockGrads<T> {
    /// d loss / d (the block's output) on the way in, d loss / d (its input) on the way out.
    pub dx: Vec<T>,
    dbranch: Vec<T>,
    dwide: Vec<T>,
    dnarrow: Vec<T>,
    dqkv: Vec<T>,
    dprobs: Vec<T>,
    /// d loss / d (gathered bias) [heads, T, T], summed over the batch (and, for the shared
    /// table, over the blocks).
    pub dbias: Vec<T>,
}

impl<T: Real> BlockGrads<T> {
    pub fn new(s: &Shapes) -> Self {
        let z = |n: usize| vec![T::ZERO; n];
        let (r, d, tt) = (s.rows, s.d, s.tokens * s.tokens);
        Self {
            dx: z(r * d),
            dbranch: z(r * d),
            dwide: z(r * s.f),
            dnarrow: z(r * d),
            dqkv: z(r * 3 * d),
            dprobs: z(s.batch * s.heads * tt),
            dbias: z(s.heads * tt),
        }
    }
}

/// What a block reads besides its own weights: the batch's shapes, the relative-position
/// index, and whether the backbone shares one bias table among its blocks.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    pub s: Shapes,
    pub index: &'a [usize],
    pub shared_bias: bool,
}

/// Per-step buffers a block writes: the gathered position bias and the q/v bias vector.
pub struct Scratch<'a, T> {
    pub bias: &'a mut [T],
    pub qkv_bias: &'a mut [T],
}

impl Block {
    /// A block whose GEMMs run at `precision`: the linear layers' and the attention's own
    /// products (q k^T and probs v, and their gradients), as PyTorch's autocast runs them.
    pub fn new(p: &BlockParams, layout: &Layout, precision: Precision) -> Result<Self> {
        let d = p.query.n_in;
        let fused = layout.span(&[p.query.weight, p.key.weight, p.value.weight])?;
        let bias = |b: Option<crate::params::ParamId>| layout.slot(b.expect("BEiT's query and value have biases"));
        Ok(Self {
            index: p.index,
            ln1: Norm::new(&p.layernorm_before, layout),
            qkv: Linear { w: fused, b: None, n_in: d, n_out: 3 * d, precision },
            query_bias: bias(p.query.bias),
            value_bias: bias(p.value.bias),
            table: p.relative_position_bias.map(|t| layout.slot(t)),
            proj: Linear::new(&p.attention_output, layout, precision),
            lambda_1: p.lambda_1.map(|t| layout.slot(t)),
            ln2: Norm::new(&p.layernorm_after, layout),
            fc1: Linear::new(&p.intermediate, layout, precision),
            fc2: Linear::new(&p.output, layout, precision),
            lambda_2: p.lambda_2.map(|t| layout.slot(t)),
            drop_path: p.drop_path,
        })
    }

    /// Runs the block's GEMMs at `precision` from the next pass on.
    pub fn set_precision(&mut self, precision: Precision) {
        for linear in [&mut self.qkv, &mut self.proj, &mut self.fc1, &mut self.fc2] {
            linear.precision = precision;
        }
    }

    pub fn index(&self) -> usize {
        self.index
    }

    fn has_bias(&self, cx: &Context) -> bool {
        self.table.is_some() || cx.shared_bias
    }

    /// x_out = block(x_in); `scales` are the stochastic-depth factors [branch][sample] (1 when
    /// off); `sc.bias` holds the shared table's gathered bias when the backbone has one.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<T: Real>(
        &self,
        p: &[T],
        x_in: &[T],
        x_out: &mut [T],
        a: &mut BlockActs<T>,
        sc: Scratch<T>,
        scales: &[T],
        cx: &Context,
    ) {
        let s = cx.s;
        let d = s.d;
        let lambda = |slot: Option<Slot>| slot.map_or(&[][..], |s| s.of(p));
        self.ln1.forward(p, x_in, &mut a.xn1, &mut a.mean1, &mut a.rstd1);
        self.qkv.forward(p, &a.xn1, &mut a.qkv);
        // q and v have biases, k has none (BEiT's q/v-only bias).
        sc.qkv_bias[..d].copy_from_slice(self.query_bias.of(p));
        sc.qkv_bias[2 * d..].copy_from_slice(self.value_bias.of(p));
        add_bias(&mut a.qkv, sc.qkv_bias);
        if let Some(table) = self.table {
            gather_bias(table.of(p), cx.index, s.heads, sc.bias);
        }
        let bias: &[T] = if self.has_bias(cx) { sc.bias } else { &[] };
        attention_forward(self.qkv.precision, &a.qkv, &mut a.probs, &mut a.ctx, bias, s);
        self.proj.forward(p, &a.ctx, &mut a.attn);
        residual(x_in, &a.attn, lambda(self.lambda_1), &scales[..s.batch], d, &mut a.x_mid);
        self.ln2.forward(p, &a.x_mid, &mut a.xn2, &mut a.mean2, &mut a.rstd2);
        self.fc1.forward_without_bias(p, &a.xn2, &mut a.hidden);
        bias_gelu(&mut a.hidden, self.fc1.b.expect("fc1 has a bias").of(p), &mut a.gelu);
        self.fc2.forward(p, &a.gelu, &mut a.mlp);
        residual(&a.x_mid, &a.mlp, lambda(self.lambda_2), &scales[s.batch..], d, x_out);
    }

    /// From g.dx = d loss / d x_out to g.dx = d loss / d x_in, adding the weight gradients
    /// into `grads` (a per-block bias table's too; the shared table's gradient is left summed
    /// in g.dbias for the backbone).
    #[allow(clippy::too_many_arguments)]
    pub fn backward<T: Real>(
        &self,
        p: &[T],
        grads: &mut [T],
        x_in: &[T],
        a: &BlockActs<T>,
        g: &mut BlockGrads<T>,
        scales: &[T],
        scratch: &mut Vec<T>,
        cx: &Context,
    ) {
        self.mlp_backward(p, grads, a, g, &scales[cx.s.batch..], scratch);
        self.attention_branch_backward(p, grads, x_in, a, g, &scales[..cx.s.batch], scratch, cx);
    }

    /// x_out = x_mid + (mlp(LN2 x_mid) * lambda_2) * scale, backward: g.dx becomes d x_mid.
    fn mlp_backward<T: Real>(
        &self,
        p: &[T],
        grads: &mut [T],
        a: &BlockActs<T>,
        g: &mut BlockGrads<T>,
        scales: &[T],
        scratch: &mut Vec<T>,
    ) {
        let d = self.fc2.n_out;
        let (lambda, dlambda) = lambda_and_grad(p, grads, self.lambda_2);
        residual_backward(&g.dx, &a.mlp, lambda, scales, d, &mut g.dbranch, dlambda, scratch);
        self.fc2.backward(p, grads, &a.gelu, &g.dbranch, Some(&mut g.dwide), scratch);
        kernels::gelu_backward(&a.hidden, &a.gelu, &mut g.dwide);
        self.fc1.backward(p, grads, &a.xn2, &g.dwide, Some(&mut g.dnarrow), scratch);
        self.ln2.backward(p, grads, &a.x_mid, (&a.mean2, &a.rstd2), &g.dnarrow, &mut g.dx, scratch);
    }

    /// x_mid = x_in + (attn(LN1 x_in) * lambda_1) * scale, backward: g.dx becomes d x_in.
    #[allow(clippy::too_many_arguments)]
    fn attention_branch_backward<T: Real>(
        &self,
        p: &[T],
        grads: &mut [T],
        x_in: &[T],
        a: &BlockActs<T>,
        g: &mut BlockGrads<T>,
        scales: &[T],
        scratch: &mut Vec<T>,
        cx: &Context,
    ) {
        let s = cx.s;
        let d = s.d;
        let (lambda, dlambda) = lambda_and_grad(p, grads, self.lambda_1);
        residual_backward(&g.dx, &a.attn, lambda, scales, d, &mut g.dbranch, dlambda, scratch);
        self.proj.backward(p, grads, &a.ctx, &g.dbranch, Some(&mut g.dnarrow), scratch);
        attention_backward(self.qkv.precision, &a.qkv, &a.probs, &g.dnarrow, &mut g.dqkv, &mut g.dprobs, s);
        if self.has_bias(cx) {
            // Sum the batch: dbias[h] += sum_b dscores[b, h]; a per-block table takes it now.
            if self.table.is_some() {
                g.dbias.fill(T::ZERO);
            }
            add_sample_sums(&g.dprobs, &mut g.dbias, s);
            if let Some(table) = self.table {
                scatter_bias(&g.dbias, cx.index, s.heads, table.of_mut(grads));
            }
        }
        self.qkv.backward(p, grads, &a.xn1, &g.dqkv, Some(&mut g.dnarrow), scratch);
        add_column_sums(&g.dqkv, 3 * d, 0, self.query_bias.of_mut(grads), scratch);
        add_column_sums(&g.dqkv, 3 * d, 2 * d, self.value_bias.of_mut(grads), scratch);
        self.ln1.backward(p, grads, x_in, (&a.mean1, &a.rstd1), &g.dnarrow, &mut g.dx, scratch);
    }
}

/// LayerScale's values (empty without it) and its gradient slot.
fn lambda_and_grad<'a, T>(p: &'a [T], grads: &'a mut [T], slot: Option<Slot>) -> (&'a [T], &'a mut [T]) {
    match slot {
        Some(s) => (s.of(p), s.of_mut(grads)),
        None => (&[], &mut []),
    }
}

/// out[h] += sum over samples of dscores[sample, h] ([heads, T, T] blocks).
fn add_sample_sums<T: Real>(dscores: &[T], out: &mut [T], s: Shapes) {
    let (tt, h) = (s.tokens * s.tokens, s.heads);
    out.par_chunks_mut(tt).enumerate().for_each(|(head, out)| {
        for sample in 0..s.batch {
            let src = &dscores[(sample * h + head) * tt..(sample * h + head + 1) * tt];
            for (o, &v) in out.iter_mut().zip(src) {
                *o += v;
            }
        }
    });
}

/// bias[h, i, j] = table[index[i, j], h].
pub fn gather_bias<T: Real>(table: &[T], index: &[usize], heads: usize, out: &mut [T]) {
    let tt = index.len();
    out.par_chunks_mut(tt).enumerate().for_each(|(h, o)| {
        for (v, &i) in o.iter_mut().zip(index) {
            *v = table[i * heads + h];
        }
    });
}

/// table_grad[index[i, j], h] += dbias[h, i, j].
pub fn scatter_bias<T: Real>(dbias: &[T], index: &[usize], heads: usize, table_grad: &mut [T]) {
    let tt = index.len();
    for h in 0..heads {
        for (&i, &v) in index.iter().zip(&dbias[h * tt..(h + 1) * tt]) {
            table_grad[i * heads + h] += v;
        }
    }
}

/// Per (sample, head): probs = softmax(scale q k^T + bias), ctx[:, head] = probs v, the
/// products at `precision`.
fn attention_forward<T: Real>(precision: Precision, qkv: &[T], probs: &mut [T], ctx: &mut [T], bias: &[T], s: Shapes) {
    let (t, d, h) = (s.tokens, s.d, s.heads);
    let e = d / h;
    let scale = T::from_f64((e as f64).powf(-0.5));
    let ctx_len = ctx.len();
    let ctx = SharedMut(ctx.as_mut_ptr());
    probs.par_chunks_mut(t * t).enumerate().for_each(|(i, p)| {
        let (b, head) = (i / h, i % h);
        let base = b * t * 3 * d;
        let q = Mat::strided(base + head * e, t, e, 3 * d);
        let k = Mat::strided(base + d + head * e, t, e, 3 * d);
        let v = Mat::strided(base + 2 * d + head * e, t, e, 3 * d);
        matmul_at(precision, p, Mat::dense(t, t), qkv, q, qkv, k.t(), false, T::ONE, Threads::Caller);
        let bias = if bias.is_empty() { bias } else { &bias[head * t * t..(head + 1) * t * t] };
        kernels::softmax_rows(p, bias, t, scale);
        let out = Mat::strided(b * t * d + head * e, t, e, d);
        assert!(out.offset + (t - 1) * d + e <= ctx_len);
        let c = ctx;
        // SAFETY: task (b, head) writes rows b*t..(b+1)*t, columns head*e..(head+1)*e of ctx
        // only (in bounds, checked above): the tasks' regions are disjoint.
        unsafe {
            let probs = p.as_ptr();
            matmul_raw_at(precision, c.0, out, probs, Mat::dense(t, t), qkv.as_ptr(), v, false, T::ONE, Threads::Caller)
        };
    });
}

/// Per (sample, head), from dctx: dv = p^T dctx, dp = dctx v^T, dscores = softmax'(dp) (left
/// in `dprobs`, d loss / d (scale q k^T + bias)), dq = scale dscores k, dk = scale dscores^T
/// q, all written into their columns of `dqkv`; the products at `precision`.
fn attention_backward<T: Real>(
    precision: Precision,
    qkv: &[T],
    probs: &[T],
    dctx: &[T],
    dqkv: &mut [T],
    dprobs: &mut [T],
    s: Shapes,
) {
    let (t, d, h) = (s.tokens, s.d, s.heads);
    let e = d / h;
    let scale = T::from_f64((e as f64).powf(-0.5));
    let dqkv_len = dqkv.len();
    let out = SharedMut(dqkv.as_mut_ptr());
    dprobs.par_chunks_mut(t * t).zip(probs.par_chunks(t * t)).enumerate().for_each(|(i, (dp, p))| {
        let (b, head) = (i / h, i % h);
        let base = b * t * 3 * d;
        let (q, k, v) = (base + head * e, base + d + head * e, base + 2 * d + head * e);
        let view = |offset| Mat::strided(offset, t, e, 3 * d);
        let dout = Mat::strided(b * t * d + head * e, t, e, d);
        matmul_at(precision, dp, Mat::dense(t, t), dctx, dout, qkv, view(v).t(), false, T::ONE, Threads::Caller);
        assert!(base + 3 * d * (t - 1) + 3 * d <= dqkv_len);
        let o = out;
        let caller = Threads::Caller;
        // SAFETY: task (b, head) writes only rows b*t..(b+1)*t and the q, k, v columns of
        // `head` in dqkv (in bounds, checked above): disjoint from every other task's.
        unsafe {
            let (p, dctx) = (p.as_ptr(), dctx.as_ptr());
            matmul_raw_at(precision, o.0, view(v), p, Mat::dense(t, t).t(), dctx, dout, false, T::ONE, caller);
        }
        kernels::softmax_backward_rows(p, dp, t);
        unsafe {
            let (dp, qkv) = (dp.as_ptr(), qkv.as_ptr());
            matmul_raw_at(precision, o.0, view(q), dp, Mat::dense(t, t), qkv, view(k), false, scale, caller);
            matmul_raw_at(precision, o.0, view(k), dp, Mat::dense(t, t).t(), qkv, view(q), false, scale, caller);
        }
    });
}
