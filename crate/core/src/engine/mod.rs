//! The CPU training engine of the BEiT backbone and its heads (masked image modeling,
//! classification): explicit forward and backward passes per layer, llm.c-style, over
//! buffers allocated once per batch size and reused every step.
//!
//! Why not candle's autograd on the CPU: it allocates (and the kernel zeroes) every
//! activation and gradient anew each step, adds each gradient contribution into a fresh
//! zero tensor, computes gradients nobody needs (drop-path factors, masks), and its
//! elementwise ops are single-threaded baseline-x86 loops. Here every weight gradient is one
//! GEMM into its slot of a flat gradient buffer, the elementwise work is fused into a few
//! multi-threaded passes compiled for AVX-512 / AVX2 / baseline and chosen at run time, and
//! the attention reads q, k, v in place from the fused QKV output.
//!
//! The numbers are those of the candle model in `model.rs` (the reference, and the GPU
//! path): same initialisation, same stochastic-depth draws, same AdamW arithmetic; the tests
//! compare the two step for step, and check every gradient by finite differences in f64.

pub mod adamw;
pub mod conv;
pub mod dvae;
pub mod kernels;
pub mod layout;
pub mod matmul;
pub mod simd;

use rayon::prelude::*;

use crate::config::{BeitConfig, Pooling};
use crate::error::{Error, Result};
use crate::model::relative_position_index;
use crate::rng::SplitMix64;

use kernels::{add_bias, add_column_sums, bias_gelu, layer_norm, layer_norm_backward, residual, residual_backward};
use layout::{slots_mut, Layout, Slot};
use matmul::{matmul, matmul_raw, Mat, Threads};
pub use simd::Real;

/// What the trainers need of an engine: its weights and gradients in flat buffers.
pub trait FlatEngine {
    fn layout(&self) -> &Layout;
    fn params(&self) -> &[f32];
    /// The weights to update and the gradient of the last backward pass.
    fn params_and_grads(&mut self) -> (&mut [f32], &[f32]);
    /// Frees the activation buffers (rebuilt on the next call).
    fn release_buffers(&mut self);
}

impl FlatEngine for BeitEngine<f32> {
    fn layout(&self) -> &Layout {
        &self.layout
    }
    fn params(&self) -> &[f32] {
        &self.params
    }
    fn params_and_grads(&mut self) -> (&mut [f32], &[f32]) {
        (&mut self.params, &self.grads)
    }
    fn release_buffers(&mut self) {
        (self.train, self.eval) = (None, None);
    }
}

impl FlatEngine for dvae::DvaeEngine<f32> {
    fn layout(&self) -> &Layout {
        self.layout()
    }
    fn params(&self) -> &[f32] {
        &self.params
    }
    fn params_and_grads(&mut self) -> (&mut [f32], &[f32]) {
        (&mut self.params, &self.grads)
    }
    fn release_buffers(&mut self) {
        self.release_buffers()
    }
}

/// What sits on the backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// Hugging Face's `BeitForMaskedImageModeling`: mask token, final LayerNorm, `lm_head`.
    MaskedImageModeling,
    /// `BeitForImageClassification`: pooled tokens, LayerNorm, `classifier`.
    Classification { num_labels: usize, pooling: Pooling },
}

/// Loss of one batch and what the metrics need.
#[derive(Debug, Clone, Copy)]
pub struct Loss {
    /// Mean over the rows the loss is taken on (masked patches, or images).
    pub loss: f64,
    /// Rows whose argmax is the target.
    pub hits: usize,
    pub rows: usize,
}

struct LayerSlots {
    ln1: Slot, // weight then bias
    qkv_weight: Slot,
    query_bias: Slot,
    value_bias: Slot,
    table: Option<Slot>,
    proj_weight: Slot,
    proj_bias: Slot,
    lambda_1: Option<Slot>,
    ln2: Slot,
    fc1_weight: Slot,
    fc1_bias: Slot,
    fc2_weight: Slot,
    fc2_bias: Slot,
    lambda_2: Option<Slot>,
    drop_path: f64,
}

struct Slots {
    cls_token: Slot,
    mask_token: Option<Slot>,
    patch_weight: Slot,
    patch_bias: Slot,
    position_embeddings: Option<Slot>,
    shared_table: Option<Slot>,
    layers: Vec<LayerSlots>,
    /// MIM: the final `layernorm`; classification: the pooling norm. Weight then bias.
    head_norm: Slot,
    head_weight: Slot,
    head_bias: Slot,
}

/// A LayerNorm's weight and bias, which the models create one after the other.
fn norm_slot(layout: &Layout, prefix: &str, d: usize) -> Result<Slot> {
    let w = layout.slot(&format!("{prefix}.weight"), &[d])?;
    let b = layout.slot(&format!("{prefix}.bias"), &[d])?;
    if b.offset != w.offset + d {
        return Err(Error::Config(format!("engine: {prefix} weight and bias are not adjacent")));
    }
    Ok(Slot { offset: w.offset, len: 2 * d })
}

impl Slots {
    fn new(cfg: &BeitConfig, head: Head, layout: &Layout) -> Result<Self> {
        let (d, f, heads) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads);
        let (gh, gw) = cfg.grid();
        let table_shape = [(2 * gh - 1) * (2 * gw - 1) + 3, heads];
        let t = cfg.num_patches() + 1;
        let e = "beit.embeddings";
        let n = cfg.num_hidden_layers;
        let layers = (0..n)
            .map(|i| {
                let p = format!("beit.encoder.layer.{i}");
                let a = format!("{p}.attention.attention");
                let q = layout.slot(&format!("{a}.query.weight"), &[d, d])?;
                let k = layout.slot(&format!("{a}.key.weight"), &[d, d])?;
                let v = layout.slot(&format!("{a}.value.weight"), &[d, d])?;
                if k.offset != q.offset + d * d || v.offset != k.offset + d * d {
                    return Err(Error::Config(format!("engine: {a} query, key and value weights are not contiguous")));
                }
                let scale = cfg.layer_scale_init_value > 0.0;
                let lambda =
                    |name: &str| if scale { layout.slot(&format!("{p}.{name}"), &[d]).map(Some) } else { Ok(None) };
                Ok(LayerSlots {
                    ln1: norm_slot(layout, &format!("{p}.layernorm_before"), d)?,
                    qkv_weight: Slot { offset: q.offset, len: 3 * d * d },
                    query_bias: layout.slot(&format!("{a}.query.bias"), &[d])?,
                    value_bias: layout.slot(&format!("{a}.value.bias"), &[d])?,
                    table: layout
                        .optional(&format!("{a}.relative_position_bias.relative_position_bias_table"), &table_shape)?,
                    proj_weight: layout.slot(&format!("{p}.attention.output.dense.weight"), &[d, d])?,
                    proj_bias: layout.slot(&format!("{p}.attention.output.dense.bias"), &[d])?,
                    lambda_1: lambda("lambda_1")?,
                    ln2: norm_slot(layout, &format!("{p}.layernorm_after"), d)?,
                    fc1_weight: layout.slot(&format!("{p}.intermediate.dense.weight"), &[f, d])?,
                    fc1_bias: layout.slot(&format!("{p}.intermediate.dense.bias"), &[f])?,
                    fc2_weight: layout.slot(&format!("{p}.output.dense.weight"), &[d, f])?,
                    fc2_bias: layout.slot(&format!("{p}.output.dense.bias"), &[d])?,
                    lambda_2: lambda("lambda_2")?,
                    // Stochastic depth grows linearly with depth: linspace(0, rate, n), as model.rs.
                    drop_path: if n > 1 { cfg.drop_path_rate * i as f64 / (n - 1) as f64 } else { 0.0 },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (head_norm, head_name) = match head {
            Head::MaskedImageModeling => (norm_slot(layout, "layernorm", d)?, "lm_head"),
            Head::Classification { pooling: Pooling::Mean, .. } => {
                (norm_slot(layout, "beit.pooler.layernorm", d)?, "classifier")
            }
            Head::Classification { pooling: Pooling::Cls, .. } => {
                (norm_slot(layout, "beit.layernorm", d)?, "classifier")
            }
        };
        let outputs = match head {
            Head::MaskedImageModeling => cfg.vocab_size,
            Head::Classification { num_labels, .. } => num_labels,
        };
        let (c, p) = (cfg.num_channels, cfg.patch_size);
        Ok(Self {
            cls_token: layout.slot(&format!("{e}.cls_token"), &[1, 1, d])?,
            mask_token: match head {
                Head::MaskedImageModeling => Some(layout.slot(&format!("{e}.mask_token"), &[1, 1, d])?),
                Head::Classification { .. } => None,
            },
            patch_weight: layout.slot(&format!("{e}.patch_embeddings.projection.weight"), &[d, c, p, p])?,
            patch_bias: layout.slot(&format!("{e}.patch_embeddings.projection.bias"), &[d])?,
            position_embeddings: layout.optional(&format!("{e}.position_embeddings"), &[1, t, d])?,
            shared_table: layout
                .optional("beit.encoder.relative_position_bias.relative_position_bias_table", &table_shape)?,
            layers,
            head_norm,
            head_weight: layout.slot(&format!("{head_name}.weight"), &[outputs, d])?,
            head_bias: layout.slot(&format!("{head_name}.bias"), &[outputs])?,
        })
    }
}

/// Activations of one layer kept for its backward pass.
#[derive(Default)]
struct LayerActs<T> {
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

impl<T: Real> LayerActs<T> {
    fn new(s: &Shapes) -> Self {
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

/// Gradients flowing backward, shared by all layers.
struct Backward<T> {
    dx: Vec<T>,
    dbranch: Vec<T>,
    dwide: Vec<T>,
    dnarrow: Vec<T>,
    dqkv: Vec<T>,
    dprobs: Vec<T>,
    /// d loss / d (gathered bias) [heads, T, T], summed over the batch (and, for the shared
    /// table, over the layers).
    dbias: Vec<T>,
}

/// The sizes of one batch.
#[derive(Clone, Copy)]
struct Shapes {
    batch: usize,
    patches: usize,
    tokens: usize,
    rows: usize,
    d: usize,
    f: usize,
    heads: usize,
    patch_values: usize,
}

/// Buffers for one batch size: all layers' activations and the backward buffers when
/// training, one layer's worth when evaluating.
struct Workspace<T> {
    shapes: Shapes,
    patches: Vec<T>,
    embed: Vec<T>,
    /// The residual stream: x_0 .. x_L when training, two alternating buffers otherwise.
    xs: Vec<Vec<T>>,
    acts: Vec<LayerActs<T>>,
    bias: Vec<T>,
    qkv_bias: Vec<T>,
    drop_scales: Vec<T>,
    backward: Option<Backward<T>>,
    head: HeadBuffers<T>,
    scratch: Vec<T>,
}

/// Head buffers; their row count varies (masked patches per batch), so they only grow.
#[derive(Default)]
struct HeadBuffers<T> {
    rows: Vec<usize>,
    input: Vec<T>,
    mean: Vec<T>,
    rstd: Vec<T>,
    normed: Vec<T>,
    logits: Vec<T>,
    dnormed: Vec<T>,
    dinput: Vec<T>,
}

/// `v` resized to `n` (growing keeps its allocation for later batches).
fn sized<T: Real>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    v.resize(n, T::ZERO);
    &mut v[..n]
}

impl<T: Real> Workspace<T> {
    fn new(s: Shapes, layers: usize, training: bool) -> Self {
        let z = |n: usize| vec![T::ZERO; n];
        let (r, d) = (s.rows, s.d);
        let tt = s.tokens * s.tokens;
        Self {
            shapes: s,
            patches: z(s.batch * s.patches * s.patch_values),
            embed: z(s.batch * s.patches * d),
            xs: (0..if training { layers + 1 } else { 2 }).map(|_| z(r * d)).collect(),
            acts: (0..if training { layers } else { 1 }).map(|_| LayerActs::new(&s)).collect(),
            bias: z(s.heads * tt),
            qkv_bias: z(3 * d),
            drop_scales: z(2 * layers * s.batch),
            backward: training.then(|| Backward {
                dx: z(r * d),
                dbranch: z(r * d),
                dwide: z(r * s.f),
                dnarrow: z(r * d),
                dqkv: z(r * 3 * d),
                dprobs: z(s.batch * s.heads * tt),
                dbias: z(s.heads * tt),
            }),
            head: HeadBuffers::default(),
            scratch: Vec::new(),
        }
    }
}

/// A raw pointer that parallel tasks share to write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: used only where each task writes a disjoint region (see the call sites).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

/// The BEiT backbone and head of one model: weights and gradients in flat buffers.
pub struct BeitEngine<T> {
    cfg: BeitConfig,
    head: Head,
    layout: Layout,
    slots: Slots,
    pub params: Vec<T>,
    pub grads: Vec<T>,
    /// Table row of every (query, key) token pair.
    index: Vec<usize>,
    train: Option<Workspace<T>>,
    eval: Option<Workspace<T>>,
}

impl<T: Real> BeitEngine<T> {
    /// An engine over `tensors` (name, shape, values), given in the model's creation order:
    /// the parameters of `model.rs`'s `BeitForMaskedImageModeling` or
    /// `BeitForImageClassification` for `cfg`.
    pub fn new(cfg: &BeitConfig, head: Head, tensors: &[(String, Vec<usize>, Vec<T>)]) -> Result<Self> {
        let layout = Layout::new(&tensors.iter().map(|(n, s, _)| (n.clone(), s.clone())).collect::<Vec<_>>());
        let params = layout.flatten(tensors)?;
        Self::from_layout(cfg, head, layout, params)
    }

    /// An engine over weights already in `layout` (`Layout::new` of the model's tensors).
    pub fn from_layout(cfg: &BeitConfig, head: Head, layout: Layout, params: Vec<T>) -> Result<Self> {
        if params.len() != layout.len {
            return Err(Error::Config(format!("engine: {} weights for a layout of {}", params.len(), layout.len)));
        }
        let slots = Slots::new(cfg, head, &layout)?;
        let (gh, gw) = cfg.grid();
        let index = relative_position_index(gh, gw).into_iter().map(|i| i as usize).collect();
        // The gradient buffer is allocated by the first backward pass (evaluation needs none).
        Ok(Self { cfg: cfg.clone(), head, layout, slots, params, grads: Vec::new(), index, train: None, eval: None })
    }

    pub fn config(&self) -> &BeitConfig {
        &self.cfg
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn shapes(&self, pixels: usize) -> Result<Shapes> {
        let c = &self.cfg;
        let [h, w] = c.image_size;
        let per_image = c.num_channels * h * w;
        if pixels == 0 || pixels % per_image != 0 {
            return Err(Error::Input(format!(
                "pixels: expected a positive multiple of {per_image} values, got {pixels}"
            )));
        }
        let batch = pixels / per_image;
        let n = c.num_patches();
        Ok(Shapes {
            batch,
            patches: n,
            tokens: n + 1,
            rows: batch * (n + 1),
            d: c.hidden_size,
            f: c.intermediate_size,
            heads: c.num_attention_heads,
            patch_values: c.num_channels * c.patch_size * c.patch_size,
        })
    }

    /// The workspace for this batch, (re)built when the batch size changes.
    fn workspace(&mut self, s: Shapes, training: bool) -> Workspace<T> {
        let slot = if training { &mut self.train } else { &mut self.eval };
        match slot.take() {
            Some(ws) if ws.shapes.batch == s.batch => ws,
            old => {
                drop(old); // free the old buffers before allocating the new ones
                Workspace::new(s, self.cfg.num_hidden_layers, training)
            }
        }
    }

    fn put_back(&mut self, ws: Workspace<T>, training: bool) {
        *(if training { &mut self.train } else { &mut self.eval }) = Some(ws);
    }

    // -----------------------------------------------------------------------------------------
    // Forward

    /// Patch embeddings, mask tokens, [CLS] and absolute positions into `xs[0]`.
    fn embed(&self, ws: &mut Workspace<T>, pixels: &[T], mask: Option<&[u8]>) {
        let s = ws.shapes;
        let c = &self.cfg;
        let (p, ch) = (c.patch_size, c.num_channels);
        let [ih, iw] = c.image_size;
        let (gh, gw) = c.grid();
        let pv = s.patch_values;
        // Patchify: row (b, gy, gx), column (c, py, px), the order of the [D, C, P, P] weight.
        ws.patches.par_chunks_mut(s.patches * pv).zip(pixels.par_chunks(ch * ih * iw)).for_each(|(out, img)| {
            for gy in 0..gh {
                for gx in 0..gw {
                    let row = &mut out[(gy * gw + gx) * pv..(gy * gw + gx + 1) * pv];
                    for cc in 0..ch {
                        for py in 0..p {
                            let src = cc * ih * iw + (gy * p + py) * iw + gx * p;
                            row[(cc * p + py) * p..(cc * p + py + 1) * p].copy_from_slice(&img[src..src + p]);
                        }
                    }
                }
            }
        });
        let sl = &self.slots;
        let bn = s.batch * s.patches;
        let weight = Mat::strided(sl.patch_weight.offset, s.d, pv, pv).t();
        matmul(
            &mut ws.embed,
            Mat::dense(bn, s.d),
            &ws.patches,
            Mat::dense(bn, pv),
            &self.params,
            weight,
            false,
            T::ONE,
            Threads::Pool,
        );
        add_bias(&mut ws.embed, sl.patch_bias.of(&self.params));
        let cls = sl.cls_token.of(&self.params);
        let token = sl.mask_token.map(|m| m.of(&self.params));
        let pos = sl.position_embeddings.map(|p| p.of(&self.params));
        let d = s.d;
        let embed = &ws.embed;
        ws.xs[0].par_chunks_mut(s.tokens * d).enumerate().for_each(|(b, x)| {
            x[..d].copy_from_slice(cls);
            for n in 0..s.patches {
                let masked = mask.is_some_and(|m| m[b * s.patches + n] != 0);
                let src = match (masked, token) {
                    (true, Some(t)) => t,
                    _ => &embed[(b * s.patches + n) * d..(b * s.patches + n + 1) * d],
                };
                x[(n + 1) * d..(n + 2) * d].copy_from_slice(src);
            }
            if let Some(pos) = pos {
                for (v, &q) in x.iter_mut().zip(pos) {
                    *v += q;
                }
            }
        });
    }

    /// bias[h, i, j] = table[index[i, j], h].
    fn gather_bias(&self, table: Slot, out: &mut [T]) {
        let heads = self.cfg.num_attention_heads;
        let tt = self.index.len();
        let table = table.of(&self.params);
        out.par_chunks_mut(tt).enumerate().for_each(|(h, o)| {
            for (v, &i) in o.iter_mut().zip(&self.index) {
                *v = table[i * heads + h];
            }
        });
    }

    /// Stochastic-depth factors [layer][branch][sample], drawn in the order of model.rs
    /// (layer by layer, attention then MLP, a layer with rate 0 draws nothing); `None`: all 1.
    fn draw_drop_path(&self, ws: &mut Workspace<T>, seed: Option<u64>) {
        let b = ws.shapes.batch;
        let mut rng = seed.map(SplitMix64::new);
        for (l, layer) in self.slots.layers.iter().enumerate() {
            for branch in 0..2 {
                let out = &mut ws.drop_scales[(2 * l + branch) * b..(2 * l + branch + 1) * b];
                match rng.as_mut() {
                    Some(rng) if layer.drop_path > 0.0 => {
                        let keep = 1.0 - layer.drop_path;
                        for v in out.iter_mut() {
                            *v = T::from_f64(if rng.uniform() < keep { 1.0 / keep } else { 0.0 });
                        }
                    }
                    _ => out.fill(T::ONE),
                }
            }
        }
    }

    /// Runs the first `layers` blocks; returns the index in `ws.xs` of their output.
    fn forward(
        &self,
        ws: &mut Workspace<T>,
        pixels: &[T],
        mask: Option<&[u8]>,
        seed: Option<u64>,
        layers: usize,
    ) -> usize {
        let training = ws.backward.is_some();
        self.embed(ws, pixels, mask);
        self.draw_drop_path(ws, seed);
        if let Some(table) = self.slots.shared_table {
            let mut bias = std::mem::take(&mut ws.bias);
            self.gather_bias(table, &mut bias);
            ws.bias = bias;
        }
        let b = ws.shapes.batch;
        for l in 0..layers {
            let (src, dst) = if training { (l, l + 1) } else { (l % 2, (l + 1) % 2) };
            let (lo, hi) = ws.xs.split_at_mut(src.max(dst));
            let (x_in, x_out) = if src < dst { (&lo[src], &mut hi[0]) } else { (&hi[0], &mut lo[dst]) };
            let acts = &mut ws.acts[if training { l } else { 0 }];
            let scales = &ws.drop_scales[2 * l * b..(2 * l + 2) * b];
            self.layer_forward(l, x_in, x_out, acts, &mut ws.bias, &mut ws.qkv_bias, scales, ws.shapes);
        }
        if training {
            layers
        } else {
            layers % 2
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        l: usize,
        x_in: &[T],
        x_out: &mut [T],
        a: &mut LayerActs<T>,
        bias: &mut [T],
        qkv_bias: &mut [T],
        scales: &[T],
        s: Shapes,
    ) {
        let ls = &self.slots.layers[l];
        let p = &self.params;
        let (r, d, f) = (s.rows, s.d, s.f);
        let eps = self.cfg.layer_norm_eps;
        let (w1, b1) = ls.ln1.of(p).split_at(d);
        layer_norm(x_in, w1, b1, eps, &mut a.xn1, &mut a.mean1, &mut a.rstd1);
        matmul(
            &mut a.qkv,
            Mat::dense(r, 3 * d),
            &a.xn1,
            Mat::dense(r, d),
            p,
            weight_t(ls.qkv_weight, 3 * d, d),
            false,
            T::ONE,
            Threads::Pool,
        );
        // q and v have biases, k has none (BEiT's q/v-only bias).
        qkv_bias[..d].copy_from_slice(ls.query_bias.of(p));
        qkv_bias[2 * d..].copy_from_slice(ls.value_bias.of(p));
        add_bias(&mut a.qkv, qkv_bias);
        if let Some(table) = ls.table {
            self.gather_bias(table, bias);
        }
        let has_bias = ls.table.is_some() || self.slots.shared_table.is_some();
        self.attention_forward(&a.qkv, &mut a.probs, &mut a.ctx, if has_bias { bias } else { &[] }, s);
        matmul(
            &mut a.attn,
            Mat::dense(r, d),
            &a.ctx,
            Mat::dense(r, d),
            p,
            weight_t(ls.proj_weight, d, d),
            false,
            T::ONE,
            Threads::Pool,
        );
        add_bias(&mut a.attn, ls.proj_bias.of(p));
        let lambda = |slot: Option<Slot>| slot.map_or(&[][..], |s| s.of(p));
        residual(x_in, &a.attn, lambda(ls.lambda_1), &scales[..s.batch], d, &mut a.x_mid);
        let (w2, b2) = ls.ln2.of(p).split_at(d);
        layer_norm(&a.x_mid, w2, b2, eps, &mut a.xn2, &mut a.mean2, &mut a.rstd2);
        matmul(
            &mut a.hidden,
            Mat::dense(r, f),
            &a.xn2,
            Mat::dense(r, d),
            p,
            weight_t(ls.fc1_weight, f, d),
            false,
            T::ONE,
            Threads::Pool,
        );
        bias_gelu(&mut a.hidden, ls.fc1_bias.of(p), &mut a.gelu);
        matmul(
            &mut a.mlp,
            Mat::dense(r, d),
            &a.gelu,
            Mat::dense(r, f),
            p,
            weight_t(ls.fc2_weight, d, f),
            false,
            T::ONE,
            Threads::Pool,
        );
        add_bias(&mut a.mlp, ls.fc2_bias.of(p));
        residual(&a.x_mid, &a.mlp, lambda(ls.lambda_2), &scales[s.batch..], d, x_out);
    }

    /// Per (sample, head): probs = softmax(scale q k^T + bias), ctx[:, head] = probs v.
    fn attention_forward(&self, qkv: &[T], probs: &mut [T], ctx: &mut [T], bias: &[T], s: Shapes) {
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
            matmul(p, Mat::dense(t, t), qkv, q, qkv, k.t(), false, T::ONE, Threads::Caller);
            let bias = if bias.is_empty() { bias } else { &bias[head * t * t..(head + 1) * t * t] };
            kernels::softmax_rows(p, bias, t, scale);
            let out = Mat::strided(b * t * d + head * e, t, e, d);
            assert!(out.offset + (t - 1) * d + e <= ctx_len);
            let c = ctx;
            // SAFETY: task (b, head) writes rows b*t..(b+1)*t, columns head*e..(head+1)*e of ctx
            // only (in bounds, checked above): the tasks' regions are disjoint.
            unsafe {
                matmul_raw(c.0, out, p.as_ptr(), Mat::dense(t, t), qkv.as_ptr(), v, false, T::ONE, Threads::Caller)
            };
        });
    }

    // -----------------------------------------------------------------------------------------
    // Backward

    /// Backward through the blocks and the embeddings; `bw.dx` holds d loss / d x_L and is
    /// consumed. Gradients are added into `self.grads` (zeroed by the caller).
    fn backward(&mut self, ws: &mut Workspace<T>, mask: Option<&[u8]>) {
        let s = ws.shapes;
        let mut bw = ws.backward.take().expect("a training workspace");
        bw.dbias.fill(T::ZERO);
        let mut grads = std::mem::take(&mut self.grads);
        for l in (0..self.cfg.num_hidden_layers).rev() {
            let scales = &ws.drop_scales[2 * l * s.batch..(2 * l + 2) * s.batch];
            self.layer_backward(l, &ws.xs[l], &mut ws.acts[l], &mut bw, scales, &mut grads, &mut ws.scratch, s);
        }
        if let Some(table) = self.slots.shared_table {
            self.scatter_bias(&bw.dbias, table, &mut grads);
        }
        self.embed_backward(ws, &bw.dx, mask, &mut grads);
        self.grads = grads;
        ws.backward = Some(bw);
    }

    /// table_grad[index[i, j], h] += dbias[h, i, j].
    fn scatter_bias(&self, dbias: &[T], table: Slot, grads: &mut [T]) {
        let heads = self.cfg.num_attention_heads;
        let tt = self.index.len();
        let g = table.of_mut(grads);
        for h in 0..heads {
            for (&i, &v) in self.index.iter().zip(&dbias[h * tt..(h + 1) * tt]) {
                g[i * heads + h] += v;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        l: usize,
        x_in: &[T],
        a: &mut LayerActs<T>,
        bw: &mut Backward<T>,
        scales: &[T],
        grads: &mut [T],
        scratch: &mut Vec<T>,
        s: Shapes,
    ) {
        let ls = &self.slots.layers[l];
        let p = &self.params;
        let (r, d, f, b) = (s.rows, s.d, s.f, s.batch);
        let none = Slot { offset: 0, len: 0 };
        let lambda = |slot: Option<Slot>| slot.map_or(&[][..], |s| s.of(p));
        // MLP branch: x_out = x_mid + (mlp * lambda_2) * scale.
        let [dl2] = slots_mut(grads, [ls.lambda_2.unwrap_or(none)]);
        residual_backward(&bw.dx, &a.mlp, lambda(ls.lambda_2), &scales[b..], d, &mut bw.dbranch, dl2, scratch);
        let [dw2, db2] = slots_mut(grads, [ls.fc2_weight, ls.fc2_bias]);
        matmul(
            dw2,
            Mat::dense(d, f),
            &bw.dbranch,
            Mat::dense(r, d).t(),
            &a.gelu,
            Mat::dense(r, f),
            true,
            T::ONE,
            Threads::Pool,
        );
        add_column_sums(&bw.dbranch, d, 0, db2, scratch);
        matmul(
            &mut bw.dwide,
            Mat::dense(r, f),
            &bw.dbranch,
            Mat::dense(r, d),
            p,
            Mat::strided(ls.fc2_weight.offset, d, f, f),
            false,
            T::ONE,
            Threads::Pool,
        );
        kernels::gelu_backward(&a.hidden, &mut bw.dwide);
        let [dw1, db1] = slots_mut(grads, [ls.fc1_weight, ls.fc1_bias]);
        matmul(
            dw1,
            Mat::dense(f, d),
            &bw.dwide,
            Mat::dense(r, f).t(),
            &a.xn2,
            Mat::dense(r, d),
            true,
            T::ONE,
            Threads::Pool,
        );
        add_column_sums(&bw.dwide, f, 0, db1, scratch);
        matmul(
            &mut bw.dnarrow,
            Mat::dense(r, d),
            &bw.dwide,
            Mat::dense(r, f),
            p,
            Mat::strided(ls.fc1_weight.offset, f, d, d),
            false,
            T::ONE,
            Threads::Pool,
        );
        let [dln2] = slots_mut(grads, [ls.ln2]);
        let (dg2, dbeta2) = dln2.split_at_mut(d);
        layer_norm_backward(
            &a.x_mid,
            &ls.ln2.of(p)[..d],
            &a.mean2,
            &a.rstd2,
            &bw.dnarrow,
            &mut bw.dx,
            dg2,
            dbeta2,
            scratch,
        );
        // Attention branch: x_mid = x_in + (attn * lambda_1) * scale.
        let [dl1] = slots_mut(grads, [ls.lambda_1.unwrap_or(none)]);
        residual_backward(&bw.dx, &a.attn, lambda(ls.lambda_1), &scales[..b], d, &mut bw.dbranch, dl1, scratch);
        let [dwo, dbo] = slots_mut(grads, [ls.proj_weight, ls.proj_bias]);
        matmul(
            dwo,
            Mat::dense(d, d),
            &bw.dbranch,
            Mat::dense(r, d).t(),
            &a.ctx,
            Mat::dense(r, d),
            true,
            T::ONE,
            Threads::Pool,
        );
        add_column_sums(&bw.dbranch, d, 0, dbo, scratch);
        matmul(
            &mut bw.dnarrow,
            Mat::dense(r, d),
            &bw.dbranch,
            Mat::dense(r, d),
            p,
            Mat::strided(ls.proj_weight.offset, d, d, d),
            false,
            T::ONE,
            Threads::Pool,
        );
        self.attention_backward(&a.qkv, &a.probs, &bw.dnarrow, &mut bw.dqkv, &mut bw.dprobs, s);
        if ls.table.is_some() || self.slots.shared_table.is_some() {
            // Sum the batch: dbias[h] += sum_b dscores[b, h]; a per-layer table takes it now.
            if ls.table.is_some() {
                bw.dbias.fill(T::ZERO);
            }
            let (tt, h) = (s.tokens * s.tokens, s.heads);
            let dprobs = &bw.dprobs;
            bw.dbias.par_chunks_mut(tt).enumerate().for_each(|(head, out)| {
                for sample in 0..b {
                    let src = &dprobs[(sample * h + head) * tt..(sample * h + head + 1) * tt];
                    for (o, &v) in out.iter_mut().zip(src) {
                        *o += v;
                    }
                }
            });
            if let Some(table) = ls.table {
                self.scatter_bias(&bw.dbias, table, grads);
            }
        }
        let [dqkv_w, dbq, dbv] = slots_mut(grads, [ls.qkv_weight, ls.query_bias, ls.value_bias]);
        matmul(
            dqkv_w,
            Mat::dense(3 * d, d),
            &bw.dqkv,
            Mat::dense(r, 3 * d).t(),
            &a.xn1,
            Mat::dense(r, d),
            true,
            T::ONE,
            Threads::Pool,
        );
        add_column_sums(&bw.dqkv, 3 * d, 0, dbq, scratch);
        add_column_sums(&bw.dqkv, 3 * d, 2 * d, dbv, scratch);
        matmul(
            &mut bw.dnarrow,
            Mat::dense(r, d),
            &bw.dqkv,
            Mat::dense(r, 3 * d),
            p,
            Mat::strided(ls.qkv_weight.offset, 3 * d, d, d),
            false,
            T::ONE,
            Threads::Pool,
        );
        let [dln1] = slots_mut(grads, [ls.ln1]);
        let (dg1, dbeta1) = dln1.split_at_mut(d);
        layer_norm_backward(
            x_in,
            &ls.ln1.of(p)[..d],
            &a.mean1,
            &a.rstd1,
            &bw.dnarrow,
            &mut bw.dx,
            dg1,
            dbeta1,
            scratch,
        );
    }

    /// Per (sample, head), from dctx: dv = p^T dctx, dp = dctx v^T, dscores = softmax'(dp)
    /// (left in `dprobs`, d loss / d (scale q k^T + bias)), dq = scale dscores k, dk = scale
    /// dscores^T q, all written into their columns of `dqkv`.
    fn attention_backward(&self, qkv: &[T], probs: &[T], dctx: &[T], dqkv: &mut [T], dprobs: &mut [T], s: Shapes) {
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
            matmul(dp, Mat::dense(t, t), dctx, dout, qkv, view(v).t(), false, T::ONE, Threads::Caller);
            assert!(base + 3 * d * (t - 1) + 3 * d <= dqkv_len);
            let o = out;
            // SAFETY: task (b, head) writes only rows b*t..(b+1)*t and the q, k, v columns of
            // `head` in dqkv (in bounds, checked above): disjoint from every other task's.
            unsafe {
                matmul_raw(
                    o.0,
                    view(v),
                    p.as_ptr(),
                    Mat::dense(t, t).t(),
                    dctx.as_ptr(),
                    dout,
                    false,
                    T::ONE,
                    Threads::Caller,
                );
            }
            kernels::softmax_backward_rows(p, dp, t);
            unsafe {
                matmul_raw(
                    o.0,
                    view(q),
                    dp.as_ptr(),
                    Mat::dense(t, t),
                    qkv.as_ptr(),
                    view(k),
                    false,
                    scale,
                    Threads::Caller,
                );
                matmul_raw(
                    o.0,
                    view(k),
                    dp.as_ptr(),
                    Mat::dense(t, t).t(),
                    qkv.as_ptr(),
                    view(q),
                    false,
                    scale,
                    Threads::Caller,
                );
            }
        });
    }

    fn embed_backward(&self, ws: &mut Workspace<T>, dx: &[T], mask: Option<&[u8]>, grads: &mut [T]) {
        let s = ws.shapes;
        let sl = &self.slots;
        let (d, n, t) = (s.d, s.patches, s.tokens);
        add_column_sums(dx, t * d, 0, sl.cls_token.of_mut(grads), &mut ws.scratch);
        if let Some(pos) = sl.position_embeddings {
            add_column_sums(dx, t * d, 0, pos.of_mut(grads), &mut ws.scratch);
        }
        if let (Some(token), Some(mask)) = (sl.mask_token, mask) {
            let g = token.of_mut(grads);
            for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m != 0) {
                let row = (i / n) * t + 1 + i % n;
                for (o, &v) in g.iter_mut().zip(&dx[row * d..(row + 1) * d]) {
                    *o += v;
                }
            }
        }
        // d patch embeddings: the token rows, zero where the mask token replaced them.
        ws.embed.par_chunks_mut(n * d).enumerate().for_each(|(b, e)| {
            for j in 0..n {
                let masked = mask.is_some_and(|m| m[b * n + j] != 0);
                let row = &mut e[j * d..(j + 1) * d];
                if masked {
                    row.fill(T::ZERO);
                } else {
                    row.copy_from_slice(&dx[(b * t + 1 + j) * d..(b * t + 2 + j) * d]);
                }
            }
        });
        let (bn, pv) = (s.batch * n, s.patch_values);
        let [dw, db] = slots_mut(grads, [sl.patch_weight, sl.patch_bias]);
        matmul(
            dw,
            Mat::dense(d, pv),
            &ws.embed,
            Mat::dense(bn, d).t(),
            &ws.patches,
            Mat::dense(bn, pv),
            true,
            T::ONE,
            Threads::Pool,
        );
        add_column_sums(&ws.embed, d, 0, db, &mut ws.scratch);
    }

    // -----------------------------------------------------------------------------------------
    // Heads

    /// LayerNorm of `rows` of x_L gathered into the head buffers, then the head's logits.
    fn head_forward(&self, ws: &mut Workspace<T>, x: usize, rows: &[usize], pool_mean: bool) {
        let s = ws.shapes;
        let d = s.d;
        let m = rows.len();
        let hb = &mut ws.head;
        let input = sized(&mut hb.input, m * d);
        let src = &ws.xs[x];
        if pool_mean {
            // rows are the [CLS] rows; the pooled feature is the mean of the patch rows after it.
            let inv = T::from_f64(1.0 / s.patches as f64);
            input.par_chunks_mut(d).zip(rows.par_iter()).for_each(|(o, &r)| {
                o.fill(T::ZERO);
                for j in 1..=s.patches {
                    for (v, &x) in o.iter_mut().zip(&src[(r + j) * d..(r + j + 1) * d]) {
                        *v += x;
                    }
                }
                for v in o.iter_mut() {
                    *v = *v * inv;
                }
            });
        } else {
            input
                .par_chunks_mut(d)
                .zip(rows.par_iter())
                .for_each(|(o, &r)| o.copy_from_slice(&src[r * d..(r + 1) * d]));
        }
        let p = &self.params;
        let (w, b) = self.slots.head_norm.of(p).split_at(d);
        layer_norm(
            &hb.input[..m * d],
            w,
            b,
            self.cfg.layer_norm_eps,
            sized(&mut hb.normed, m * d),
            sized(&mut hb.mean, m),
            sized(&mut hb.rstd, m),
        );
        let k = self.slots.head_bias.len;
        let logits = sized(&mut hb.logits, m * k);
        matmul(
            logits,
            Mat::dense(m, k),
            &hb.normed,
            Mat::dense(m, d),
            p,
            weight_t(self.slots.head_weight, k, d),
            false,
            T::ONE,
            Threads::Pool,
        );
        add_bias(logits, self.slots.head_bias.of(p));
    }

    /// Backward of [`Self::head_forward`] from d logits (in `ws.head.logits`) to `bw.dx`.
    fn head_backward(&mut self, ws: &mut Workspace<T>, rows: &[usize], pool_mean: bool) {
        let s = ws.shapes;
        let (d, m) = (s.d, rows.len());
        let k = self.slots.head_bias.len;
        let mut grads = std::mem::take(&mut self.grads);
        let p = &self.params;
        let hb = &mut ws.head;
        let [dw, db] = slots_mut(&mut grads, [self.slots.head_weight, self.slots.head_bias]);
        let dlogits = &hb.logits[..m * k];
        matmul(
            dw,
            Mat::dense(k, d),
            dlogits,
            Mat::dense(m, k).t(),
            &hb.normed,
            Mat::dense(m, d),
            true,
            T::ONE,
            Threads::Pool,
        );
        add_column_sums(dlogits, k, 0, db, &mut ws.scratch);
        let dnormed = sized(&mut hb.dnormed, m * d);
        matmul(
            dnormed,
            Mat::dense(m, d),
            dlogits,
            Mat::dense(m, k),
            p,
            Mat::strided(self.slots.head_weight.offset, k, d, d),
            false,
            T::ONE,
            Threads::Pool,
        );
        let dinput = sized(&mut hb.dinput, m * d);
        dinput.fill(T::ZERO);
        let [dnorm] = slots_mut(&mut grads, [self.slots.head_norm]);
        let (dg, dbeta) = dnorm.split_at_mut(d);
        let gamma = &self.slots.head_norm.of(p)[..d];
        layer_norm_backward(
            &hb.input[..m * d],
            gamma,
            &hb.mean[..m],
            &hb.rstd[..m],
            &hb.dnormed[..m * d],
            dinput,
            dg,
            dbeta,
            &mut ws.scratch,
        );
        let bw = ws.backward.as_mut().expect("a training workspace");
        bw.dx.fill(T::ZERO);
        let inv = T::from_f64(1.0 / s.patches as f64);
        for (i, &r) in rows.iter().enumerate() {
            let g = &hb.dinput[i * d..(i + 1) * d];
            if pool_mean {
                for j in 1..=s.patches {
                    for (o, &v) in bw.dx[(r + j) * d..(r + j + 1) * d].iter_mut().zip(g) {
                        *o += v * inv;
                    }
                }
            } else {
                for (o, &v) in bw.dx[r * d..(r + 1) * d].iter_mut().zip(g) {
                    *o += v;
                }
            }
        }
        self.grads = grads;
    }

    /// Rows of x the head reads: masked patch rows (MIM) or each sample's [CLS] row.
    fn head_rows(&self, ws: &mut Workspace<T>, mask: Option<&[u8]>) -> Vec<usize> {
        let s = ws.shapes;
        let mut rows = std::mem::take(&mut ws.head.rows);
        rows.clear();
        match (self.head, mask) {
            (Head::MaskedImageModeling, Some(mask)) => rows.extend(
                mask.iter()
                    .enumerate()
                    .filter(|(_, &m)| m != 0)
                    .map(|(i, _)| (i / s.patches) * s.tokens + 1 + i % s.patches),
            ),
            _ => rows.extend((0..s.batch).map(|b| b * s.tokens)),
        }
        rows
    }

    fn pool_mean(&self) -> bool {
        matches!(self.head, Head::Classification { pooling: Pooling::Mean, .. })
    }

    fn check_mask(&self, mask: &[u8], s: Shapes) -> Result<()> {
        if mask.len() != s.batch * s.patches {
            return Err(Error::Input(format!(
                "mask: expected {} values (B*N), got {}",
                s.batch * s.patches,
                mask.len()
            )));
        }
        Ok(())
    }

    /// Forward and backward of the loss: the MIM cross-entropy at the masked patches (`mask`
    /// given; `targets` the ids of the masked patches in order) or the classification loss
    /// (`targets` one label per image, label smoothing `smoothing`). Leaves the gradient in
    /// `self.grads`. `seed` drives stochastic depth.
    pub fn loss_and_grads(
        &mut self,
        pixels: &[T],
        mask: Option<&[u8]>,
        targets: &[u32],
        smoothing: f64,
        seed: u64,
    ) -> Result<Loss> {
        let s = self.shapes(pixels.len())?;
        let mim = self.head == Head::MaskedImageModeling;
        if mim != mask.is_some() {
            return Err(Error::Input("engine: a mask is given exactly when the head is masked image modeling".into()));
        }
        if let Some(mask) = mask {
            self.check_mask(mask, s)?;
        }
        let mut ws = self.workspace(s, true);
        let rows = self.head_rows(&mut ws, mask);
        if rows.is_empty() || targets.len() != rows.len() {
            self.put_back(ws, true);
            return Err(Error::Input(format!("targets: expected {} values, got {}", rows.len(), targets.len())));
        }
        let last = self.forward(&mut ws, pixels, mask, Some(seed), self.cfg.num_hidden_layers);
        let pool_mean = self.pool_mean();
        self.head_forward(&mut ws, last, &rows, pool_mean);
        let m = rows.len();
        let k = self.slots.head_bias.len;
        let (loss_sum, hits) = kernels::cross_entropy(&mut ws.head.logits[..m * k], targets, smoothing, 1.0 / m as f64);
        zeroed(&mut self.grads, self.layout.len);
        self.head_backward(&mut ws, &rows, pool_mean);
        self.backward(&mut ws, mask);
        ws.head.rows = rows;
        self.put_back(ws, true);
        Ok(Loss { loss: loss_sum / m as f64, hits, rows: m })
    }

    /// Evaluation logits (no stochastic depth): [masked patches, vocab] for MIM (`mask`
    /// given), [images, labels] for classification.
    pub fn logits(&mut self, pixels: &[T], mask: Option<&[u8]>) -> Result<Vec<T>> {
        let s = self.shapes(pixels.len())?;
        if let Some(mask) = mask {
            self.check_mask(mask, s)?;
        }
        let mut ws = self.workspace(s, false);
        let rows = self.head_rows(&mut ws, mask);
        let last = self.forward(&mut ws, pixels, mask, None, self.cfg.num_hidden_layers);
        self.head_forward(&mut ws, last, &rows, self.pool_mean());
        let out = ws.head.logits[..rows.len() * self.slots.head_bias.len].to_vec();
        ws.head.rows = rows;
        self.put_back(ws, false);
        Ok(out)
    }

    /// Linear-probe features of layer `layer` (0 = embeddings): [CLS] and the mean of the
    /// patch tokens, [B, 2D].
    pub fn probe_features(&mut self, pixels: &[T], layer: usize) -> Result<Vec<T>> {
        let s = self.shapes(pixels.len())?;
        if layer > self.cfg.num_hidden_layers {
            return Err(Error::Input(format!(
                "layer {layer} does not exist: the model has {} layers",
                self.cfg.num_hidden_layers
            )));
        }
        let mut ws = self.workspace(s, false);
        let last = self.forward(&mut ws, pixels, None, None, layer);
        let (d, t) = (s.d, s.tokens);
        let inv = T::from_f64(1.0 / s.patches as f64);
        let x = &ws.xs[last];
        let mut out = vec![T::ZERO; s.batch * 2 * d];
        out.par_chunks_mut(2 * d).enumerate().for_each(|(b, o)| {
            let (cls, mean) = o.split_at_mut(d);
            cls.copy_from_slice(&x[b * t * d..(b * t + 1) * d]);
            for j in 1..t {
                for (v, &xv) in mean.iter_mut().zip(&x[(b * t + j) * d..(b * t + j + 1) * d]) {
                    *v += xv;
                }
            }
            for v in mean.iter_mut() {
                *v = *v * inv;
            }
        });
        self.put_back(ws, false);
        Ok(out)
    }
}

/// `buf` as `len` zeros, allocated on first use and reused after.
pub(crate) fn zeroed<T: Real>(buf: &mut Vec<T>, len: usize) {
    if buf.len() != len {
        *buf = vec![T::ZERO; len];
    } else {
        buf.par_chunks_mut(65536).for_each(|g| g.fill(T::ZERO));
    }
}

/// The transpose of a [rows, cols] row-major weight in the flat buffer: x W^T as a GEMM.
fn weight_t(slot: Slot, rows: usize, cols: usize) -> Mat {
    Mat::strided(slot.offset, rows, cols, cols).t()
}
