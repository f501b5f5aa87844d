//! The BEiT backbone on the engine: patch embedding, [CLS], mask token, absolute positions,
//! the shared relative position bias and the blocks, forward and backward over workspaces
//! allocated once per batch size. Heads read the hidden states of the layers they ask for
//! ([`Backbone::hidden`]) and leave their gradients in [`Backbone::hidden_grad`].

use rayon::prelude::*;

use super::block::{gather_bias, scatter_bias, Block, BlockActs, BlockGrads, Context, Scratch, Shapes};
use super::kernels::add_column_sums;
use super::linear::Linear;
use super::simd::Real;
use crate::arch::backbone::{relative_position_index, BackboneParams};
use crate::config::BeitConfig;
use crate::config::Precision;
use crate::error::{Error, Result};
use crate::params::{Layout, Slot};
use crate::rng::Draws;

#[derive(Debug, Clone)]
struct Embeddings {
    cls_token: Slot,
    mask_token: Option<Slot>,
    patch: Linear,
    position_embeddings: Option<Slot>,
}

/// Buffers for one batch size: all blocks' activations and the backward buffers when
/// training, one block's worth when evaluating.
struct Workspace<T> {
    shapes: Shapes,
    patches: Vec<T>,
    embed: Vec<T>,
    /// The residual stream: x_0 .. x_L when training, two alternating buffers otherwise.
    xs: Vec<Vec<T>>,
    acts: Vec<BlockActs<T>>,
    bias: Vec<T>,
    qkv_bias: Vec<T>,
    drop_scales: Vec<T>,
    grads: Option<BlockGrads<T>>,
    /// Training: d loss / d x_l for the layers l < L a head read (the last layer's is
    /// `grads.dx`), allocated when first asked for; `live[l]`: asked for since the forward pass.
    taps: Vec<Vec<T>>,
    live: Vec<bool>,
    scratch: Vec<T>,
}

impl<T: Real> Workspace<T> {
    fn new(s: Shapes, layers: usize, training: bool) -> Self {
        let z = |n: usize| vec![T::ZERO; n];
        let (r, d) = (s.rows, s.d);
        Self {
            shapes: s,
            patches: z(s.batch * s.patches * s.patch_values),
            embed: z(s.batch * s.patches * d),
            xs: (0..if training { layers + 1 } else { 2 }).map(|_| z(r * d)).collect(),
            acts: (0..if training { layers } else { 1 }).map(|_| BlockActs::new(&s)).collect(),
            bias: z(s.heads * s.tokens * s.tokens),
            qkv_bias: z(3 * d),
            drop_scales: z(2 * layers * s.batch),
            grads: training.then(|| BlockGrads::new(&s)),
            taps: (0..layers).map(|_| Vec::new()).collect(),
            live: vec![false; layers],
            scratch: Vec::new(),
        }
    }
}

pub struct Backbone<T> {
    cfg: BeitConfig,
    embeddings: Embeddings,
    shared_table: Option<Slot>,
    blocks: Vec<Block>,
    /// Table row of every (query, key) token pair.
    index: Vec<usize>,
    train: Option<Workspace<T>>,
    eval: Option<Workspace<T>>,
}

impl<T: Real> Backbone<T> {
    pub fn new(cfg: &BeitConfig, p: &BackboneParams, layout: &Layout, precision: Precision) -> Result<Self> {
        let e = &p.embeddings;
        let embeddings = Embeddings {
            cls_token: layout.slot(e.cls_token),
            mask_token: e.mask_token.map(|t| layout.slot(t)),
            patch: Linear::new(&e.patch, layout, precision),
            position_embeddings: e.position_embeddings.map(|t| layout.slot(t)),
        };
        let (gh, gw) = cfg.grid();
        Ok(Self {
            cfg: cfg.clone(),
            embeddings,
            shared_table: p.relative_position_bias.map(|t| layout.slot(t)),
            blocks: p.layers.iter().map(|b| Block::new(b, layout, precision)).collect::<Result<_>>()?,
            index: relative_position_index(gh, gw).into_iter().map(|i| i as usize).collect(),
            train: None,
            eval: None,
        })
    }

    pub fn config(&self) -> &BeitConfig {
        &self.cfg
    }

    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// The shapes of a batch of `pixels` values and its `mask` (checked).
    pub fn shapes(&self, pixels: usize, mask: Option<&[u8]>) -> Result<Shapes> {
        let c = &self.cfg;
        let [h, w] = c.image_size;
        let per_image = c.num_channels * h * w;
        if pixels == 0 || !pixels.is_multiple_of(per_image) {
            return Err(Error::Input(format!(
                "pixels: expected a positive multiple of {per_image} values, got {pixels}"
            )));
        }
        let batch = pixels / per_image;
        let n = c.num_patches();
        if let Some(mask) = mask {
            if mask.len() != batch * n {
                return Err(Error::Input(format!("mask: expected {} values (B*N), got {}", batch * n, mask.len())));
            }
            if self.embeddings.mask_token.is_none() {
                return Err(Error::Input("this model has no mask token: it cannot take a mask".into()));
            }
        }
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
        let layers = self.num_layers();
        let slot = if training { &mut self.train } else { &mut self.eval };
        match slot.take() {
            Some(ws) if ws.shapes == s => ws,
            old => {
                drop(old); // free the old buffers before allocating the new ones
                Workspace::new(s, layers, training)
            }
        }
    }

    pub fn release_buffers(&mut self) {
        (self.train, self.eval) = (None, None);
    }

    /// Runs the linear layers' GEMMs at `precision` from the next pass on.
    pub fn set_precision(&mut self, precision: Precision) {
        self.embeddings.patch.precision = precision;
        for block in &mut self.blocks {
            block.set_precision(precision);
        }
    }

    /// The training forward pass through every block, keeping what the backward pass needs;
    /// `draws` drives stochastic depth.
    pub fn forward_train(&mut self, p: &[T], pixels: &[T], mask: Option<&[u8]>, draws: Draws) -> Result<Shapes> {
        let s = self.shapes(pixels.len(), mask)?;
        let mut ws = self.workspace(s, true);
        ws.live.fill(false);
        ws.grads.as_mut().expect("a training workspace").dx.fill(T::ZERO);
        self.forward(&mut ws, p, pixels, mask, Some(draws), self.num_layers());
        self.train = Some(ws);
        Ok(s)
    }

    /// x_l [B*T, D] of the last training forward pass (l = 0: the embeddings).
    pub fn hidden(&self, l: usize) -> &[T] {
        &self.train.as_ref().expect("a training forward pass first").xs[l]
    }

    /// d loss / d x_l, zeroed after each training forward pass: heads add their gradients
    /// here before [`Self::backward`].
    pub fn hidden_grad(&mut self, l: usize) -> &mut [T] {
        let layers = self.num_layers();
        let ws = self.train.as_mut().expect("a training forward pass first");
        let len = ws.shapes.rows * ws.shapes.d;
        if l == layers {
            return &mut ws.grads.as_mut().expect("a training workspace").dx;
        }
        let tap = &mut ws.taps[l];
        if !ws.live[l] {
            ws.live[l] = true;
            tap.clear();
            tap.resize(len, T::ZERO);
        }
        tap
    }

    /// Backward through the blocks and the embeddings from the gradients the heads left in
    /// [`Self::hidden_grad`]; the weight gradients are added into `grads`.
    pub fn backward(&mut self, p: &[T], grads: &mut [T], mask: Option<&[u8]>) {
        let mut ws = self.train.take().expect("a training forward pass first");
        let s = ws.shapes;
        let mut g = ws.grads.take().expect("a training workspace");
        g.dbias.fill(T::ZERO);
        let cx = Context { s, index: &self.index, shared_bias: self.shared_table.is_some() };
        for block in self.blocks.iter().rev() {
            let l = block.index();
            if ws.live.get(l + 1) == Some(&true) {
                add_into(&mut g.dx, &ws.taps[l + 1]);
            }
            let scales = &ws.drop_scales[2 * l * s.batch..(2 * l + 2) * s.batch];
            block.backward(p, grads, &ws.xs[l], &ws.acts[l], &mut g, scales, &mut ws.scratch, &cx);
        }
        if ws.live.first() == Some(&true) {
            add_into(&mut g.dx, &ws.taps[0]);
        }
        if let Some(table) = self.shared_table {
            scatter_bias(&g.dbias, &self.index, s.heads, table.of_mut(grads));
        }
        self.embed_backward(&mut ws, p, &g.dx, mask, grads);
        ws.grads = Some(g);
        self.train = Some(ws);
    }

    /// The evaluation forward pass (no stochastic depth) of the first `layers` blocks:
    /// x_layers [B*T, D].
    pub fn forward_eval(
        &mut self,
        p: &[T],
        pixels: &[T],
        mask: Option<&[u8]>,
        layers: usize,
    ) -> Result<(Shapes, &[T])> {
        let s = self.shapes(pixels.len(), mask)?;
        if layers > self.num_layers() {
            return Err(Error::Input(format!(
                "layer {layers} does not exist: the model has {} layers (0 = embeddings)",
                self.num_layers()
            )));
        }
        let mut ws = self.workspace(s, false);
        let out = self.forward(&mut ws, p, pixels, mask, None, layers);
        let ws = self.eval.insert(ws);
        Ok((s, &ws.xs[out]))
    }

    /// Linear-probe features of layer `layer` (0 = embeddings): [CLS] and the mean of the
    /// patch tokens, [B, 2D].
    pub fn probe_features(&mut self, p: &[T], pixels: &[T], layer: usize) -> Result<Vec<T>> {
        let (s, x) = self.forward_eval(p, pixels, None, layer)?;
        let (d, t) = (s.d, s.tokens);
        let inv = T::from_f64(1.0 / s.patches as f64);
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
        Ok(out)
    }

    /// Runs the first `layers` blocks; returns the index in `ws.xs` of their output.
    fn forward(
        &self,
        ws: &mut Workspace<T>,
        p: &[T],
        pixels: &[T],
        mask: Option<&[u8]>,
        draws: Option<Draws>,
        layers: usize,
    ) -> usize {
        let training = ws.grads.is_some();
        self.embed(ws, p, pixels, mask);
        self.draw_drop_path(ws, draws);
        if let Some(table) = self.shared_table {
            gather_bias(table.of(p), &self.index, self.cfg.num_attention_heads, &mut ws.bias);
        }
        let s = ws.shapes;
        let cx = Context { s, index: &self.index, shared_bias: self.shared_table.is_some() };
        for (l, block) in self.blocks[..layers].iter().enumerate() {
            let (src, dst) = if training { (l, l + 1) } else { (l % 2, (l + 1) % 2) };
            let (lo, hi) = ws.xs.split_at_mut(src.max(dst));
            let (x_in, x_out) = if src < dst { (&lo[src], &mut hi[0]) } else { (&hi[0], &mut lo[dst]) };
            let acts = &mut ws.acts[if training { l } else { 0 }];
            let scales = &ws.drop_scales[2 * l * s.batch..(2 * l + 2) * s.batch];
            let sc = Scratch { bias: &mut ws.bias, qkv_bias: &mut ws.qkv_bias };
            block.forward(p, x_in, x_out, acts, sc, scales, &cx);
        }
        if training {
            layers
        } else {
            layers % 2
        }
    }

    /// Stochastic-depth factors [block][branch][sample] (`Draws::drop_path`); without draws
    /// (evaluation) all 1.
    fn draw_drop_path(&self, ws: &mut Workspace<T>, draws: Option<Draws>) {
        let b = ws.shapes.batch;
        let branches = 2 * self.num_layers();
        for (l, block) in self.blocks.iter().enumerate() {
            for branch in 0..2 {
                let slot = 2 * l + branch;
                let out = &mut ws.drop_scales[slot * b..(slot + 1) * b];
                for (i, v) in out.iter_mut().enumerate() {
                    *v = T::from_f64(draws.map_or(1.0, |d| d.drop_path(i, slot, branches, block.drop_path)));
                }
            }
        }
    }

    /// Patch embeddings, mask tokens, [CLS] and absolute positions into `xs[0]`.
    fn embed(&self, ws: &mut Workspace<T>, p: &[T], pixels: &[T], mask: Option<&[u8]>) {
        let s = ws.shapes;
        patchify(&self.cfg, pixels, &mut ws.patches, s);
        let e = &self.embeddings;
        e.patch.forward(p, &ws.patches, &mut ws.embed);
        let cls = e.cls_token.of(p);
        let token = e.mask_token.map(|m| m.of(p));
        let pos = e.position_embeddings.map(|t| t.of(p));
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

    fn embed_backward(&self, ws: &mut Workspace<T>, p: &[T], dx: &[T], mask: Option<&[u8]>, grads: &mut [T]) {
        let s = ws.shapes;
        let e = &self.embeddings;
        let (d, n, t) = (s.d, s.patches, s.tokens);
        add_column_sums(dx, t * d, 0, e.cls_token.of_mut(grads), &mut ws.scratch);
        if let Some(pos) = e.position_embeddings {
            add_column_sums(dx, t * d, 0, pos.of_mut(grads), &mut ws.scratch);
        }
        if let (Some(token), Some(mask)) = (e.mask_token, mask) {
            let g = token.of_mut(grads);
            for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m != 0) {
                let row = (i / n) * t + 1 + i % n;
                for (o, &v) in g.iter_mut().zip(&dx[row * d..(row + 1) * d]) {
                    *o += v;
                }
            }
        }
        // d patch embeddings: the token rows, zero where the mask token replaced them.
        ws.embed.par_chunks_mut(n * d).enumerate().for_each(|(b, row_block)| {
            for j in 0..n {
                let masked = mask.is_some_and(|m| m[b * n + j] != 0);
                let row = &mut row_block[j * d..(j + 1) * d];
                if masked {
                    row.fill(T::ZERO);
                } else {
                    row.copy_from_slice(&dx[(b * t + 1 + j) * d..(b * t + 2 + j) * d]);
                }
            }
        });
        e.patch.backward(p, grads, &ws.patches, &ws.embed, None, &mut ws.scratch);
    }
}

/// Patchify: row (b, gy, gx), column (c, py, px), the order of the [D, C, P, P] weight.
fn patchify<T: Real>(cfg: &BeitConfig, pixels: &[T], patches: &mut [T], s: Shapes) {
    let (p, ch) = (cfg.patch_size, cfg.num_channels);
    let [ih, iw] = cfg.image_size;
    let (gh, gw) = cfg.grid();
    let pv = s.patch_values;
    patches.par_chunks_mut(s.patches * pv).zip(pixels.par_chunks(ch * ih * iw)).for_each(|(out, img)| {
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
}

/// y += x.
fn add_into<T: Real>(y: &mut [T], x: &[T]) {
    y.par_chunks_mut(16384).zip(x.par_chunks(16384)).for_each(|(y, x)| {
        for (o, &v) in y.iter_mut().zip(x) {
            *o += v;
        }
    });
}
