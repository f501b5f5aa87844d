//! The BEiT backbone and its masked-image-modeling head, candle-style: one small struct per
//! part with `new(cfg, vb)` and `forward`. VarBuilder paths are the Hugging Face
//! `BeitForMaskedImageModeling` checkpoint keys, so weights map one to one.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

use crate::config::{BeitConfig, ClassifierConfig, Pooling};
use crate::ops;
use crate::rng::SplitMix64;

fn trunc_normal(std: f64) -> Init {
    Init::Randn { mean: 0.0, stdev: std }
}

/// A parameter in the dtype of the activations `x`. Parameters are f32 master weights; under
/// mixed precision the activations are bf16 and each weight is cast where it is used (the
/// cast's backward returns its gradient in f32). A no-op in f32.
pub(crate) fn like(param: &Tensor, x: &Tensor) -> Result<Tensor> {
    param.to_dtype(x.dtype())
}

pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, std: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", trunc_normal(std))?;
        let bias = if bias { Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?) } else { None };
        Ok(Self { weight, bias })
    }
}

impl Module for Linear {
    /// [..., in] -> [..., out], as one 2-D matmul over the flattened leading dimensions.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut out_dims = x.dims().to_vec();
        let in_dim = out_dims.pop().unwrap_or(1);
        let rows = x.elem_count() / in_dim;
        let y = x.reshape((rows, in_dim))?.matmul(&like(&self.weight, x)?.t()?)?;
        let y = match &self.bias {
            Some(b) => ops::add_bias(&y, &like(b, x)?)?,
            None => y,
        };
        out_dims.push(self.weight.dim(0)?);
        y.reshape(out_dims)
    }
}

pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &like(&self.weight, x)?, &like(&self.bias, x)?, self.eps)
    }
}

/// Patchify + linear projection. The weight keeps the conv layout [D, C, P, P] of the
/// checkpoints, but the op is a reshape and one matmul (cheaper than im2col conv).
pub struct PatchEmbeddings {
    weight: Tensor,
    bias: Tensor,
    patch_size: usize,
    num_channels: usize,
    image_size: [usize; 2],
}

impl PatchEmbeddings {
    pub fn new(cfg: &BeitConfig, vb: VarBuilder) -> Result<Self> {
        let (p, c, d) = (cfg.patch_size, cfg.num_channels, cfg.hidden_size);
        let vb = vb.pp("projection");
        let weight = vb.get_with_hints((d, c, p, p), "weight", trunc_normal(cfg.initializer_range))?;
        let bias = vb.get_with_hints(d, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, patch_size: p, num_channels: c, image_size: cfg.image_size })
    }
}

impl Module for PatchEmbeddings {
    /// [B, C, H, W] -> [B, N, D], patches in row-major grid order.
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        if c != self.num_channels || [h, w] != self.image_size {
            candle_core::bail!(
                "pixels of shape [{b}, {c}, {h}, {w}] do not match the model input [B, {}, {}, {}]",
                self.num_channels,
                self.image_size[0],
                self.image_size[1]
            );
        }
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        let patches = pixels
            .reshape((b * c * gh, p, gw, p))?
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * gh * gw, c * p * p))?;
        let d = self.weight.dim(0)?;
        let weight = like(&self.weight, pixels)?.reshape((d, c * p * p))?;
        let y = ops::add_bias(&patches.matmul(&weight.t()?)?, &like(&self.bias, pixels)?)?;
        y.reshape((b, gh * gw, d))
    }
}

pub struct Embeddings {
    cls_token: Tensor,
    /// Only models that mask (MIM) have one, as in Hugging Face's `use_mask_token`.
    mask_token: Option<Tensor>,
    patch_embeddings: PatchEmbeddings,
    position_embeddings: Option<Tensor>,
}

impl Embeddings {
    pub fn new(cfg: &BeitConfig, use_mask_token: bool, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let std = cfg.initializer_range;
        let cls_token = vb.get_with_hints((1, 1, d), "cls_token", trunc_normal(std))?;
        let mask_token =
            if use_mask_token { Some(vb.get_with_hints((1, 1, d), "mask_token", trunc_normal(std))?) } else { None };
        let patch_embeddings = PatchEmbeddings::new(cfg, vb.pp("patch_embeddings"))?;
        let position_embeddings = if cfg.use_absolute_position_embeddings {
            let n = cfg.num_patches() + 1;
            Some(vb.get_with_hints((1, n, d), "position_embeddings", trunc_normal(std))?)
        } else {
            None
        };
        Ok(Self { cls_token, mask_token, patch_embeddings, position_embeddings })
    }

    /// `mask`: [B, N] with 1.0 where the patch embedding is replaced by the mask token.
    pub fn forward(&self, pixels: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let x = self.patch_embeddings.forward(pixels)?;
        let (b, _, d) = x.dims3()?;
        // The parameters' gradients are sums over the batch (and patches): scale_columns,
        // add_bias and an f32 broadcast keep those sums in f32 when the activations are bf16.
        let x = match (mask, &self.mask_token) {
            (Some(m), Some(token)) => {
                let w = m.unsqueeze(2)?.to_dtype(x.dtype())?;
                let keep = w.affine(-1.0, 1.0)?;
                let masked = ops::scale_columns(&w.broadcast_as(x.shape())?, &like(token, &x)?.flatten_all()?)?;
                x.broadcast_mul(&keep)?.add(&masked)?
            }
            (Some(_), None) => candle_core::bail!("this model has no mask token: it cannot take a mask"),
            (None, _) => x,
        };
        let cls = self.cls_token.broadcast_as((b, 1, d))?.to_dtype(x.dtype())?;
        let x = Tensor::cat(&[&cls, &x], 1)?;
        match &self.position_embeddings {
            Some(pos) => {
                let (b, n, d) = x.dims3()?;
                ops::add_bias(&x.reshape((b, n * d))?, &like(pos, &x)?.flatten_all()?)?.reshape((b, n, d))
            }
            None => Ok(x),
        }
    }
}

/// Relative position bias: a learned table indexed by the relative offset of query and key
/// patches, plus three entries for [CLS]-as-query, [CLS]-as-key and [CLS]-[CLS].
pub struct RelativePositionBias {
    table: Tensor,
    index: Tensor,
    num_heads: usize,
    tokens: usize,
}

impl RelativePositionBias {
    pub fn new(cfg: &BeitConfig, vb: VarBuilder) -> Result<Self> {
        let (h, w) = cfg.grid();
        let num_distances = (2 * h - 1) * (2 * w - 1) + 3;
        let heads = cfg.num_attention_heads;
        let table = vb.get_with_hints((num_distances, heads), "relative_position_bias_table", Init::Const(0.0))?;
        let index = relative_position_index(h, w);
        let tokens = h * w + 1;
        let index = Tensor::from_vec(index, tokens * tokens, vb.device())?;
        Ok(Self { table, index, num_heads: heads, tokens })
    }

    /// [heads, N+1, N+1], to be added to the attention scores.
    pub fn forward(&self) -> Result<Tensor> {
        self.table
            .index_select(&self.index, 0)?
            .reshape((self.tokens, self.tokens, self.num_heads))?
            .permute((2, 0, 1))?
            .contiguous()
    }
}

/// The table row for every (query, key) token pair of an h x w grid with a leading [CLS].
pub fn relative_position_index(h: usize, w: usize) -> Vec<u32> {
    let n = h * w;
    let num_distances = (2 * h - 1) * (2 * w - 1) + 3;
    let tokens = n + 1;
    let mut index = vec![0u32; tokens * tokens];
    for i in 0..n {
        for j in 0..n {
            let dy = (i / w) as isize - (j / w) as isize + h as isize - 1;
            let dx = (i % w) as isize - (j % w) as isize + w as isize - 1;
            index[(i + 1) * tokens + j + 1] = (dy * (2 * w as isize - 1) + dx) as u32;
        }
    }
    for k in 1..tokens {
        index[k] = (num_distances - 3) as u32; // [CLS] as query
        index[k * tokens] = (num_distances - 2) as u32; // [CLS] as key
    }
    index[0] = (num_distances - 1) as u32;
    index
}

pub struct SelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    relative_position_bias: Option<RelativePositionBias>,
    num_heads: usize,
    scale: f64,
}

impl SelfAttention {
    pub fn new(cfg: &BeitConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let std = cfg.initializer_range;
        // q and v have biases, k has none (BEiT's q/v-only bias).
        let query = Linear::new(d, d, true, std, vb.pp("query"))?;
        let key = Linear::new(d, d, false, std, vb.pp("key"))?;
        let value = Linear::new(d, d, true, std, vb.pp("value"))?;
        let relative_position_bias = if cfg.use_relative_position_bias {
            Some(RelativePositionBias::new(cfg, vb.pp("relative_position_bias"))?)
        } else {
            None
        };
        Ok(Self {
            query,
            key,
            value,
            relative_position_bias,
            num_heads: cfg.num_attention_heads,
            scale: (cfg.head_dim() as f64).powf(-0.5),
        })
    }

    /// x: [B, T, D]; shared_bias: [heads, T, T] from the encoder's shared table (in x's dtype), if any.
    pub fn forward(&self, x: &Tensor, shared_bias: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let heads = self.num_heads;
        let split =
            |y: Tensor| -> Result<Tensor> { y.reshape((b, t, heads, d / heads))?.transpose(1, 2)?.contiguous() };
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let scores = q.matmul(&k.t()?)?;
        let bias = match (&self.relative_position_bias, shared_bias) {
            (Some(own), Some(shared)) => Some((like(&own.forward()?, x)? + shared)?),
            (Some(own), None) => Some(like(&own.forward()?, x)?),
            (None, shared) => shared.cloned(),
        };
        // The 1/sqrt(head_dim) scale and the bias are applied inside the softmax kernel.
        let probs = ops::scaled_softmax(&scores, bias.as_ref(), self.scale)?;
        probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))
    }
}

pub struct Attention {
    attention: SelfAttention,
    output: Linear,
}

impl Attention {
    pub fn new(cfg: &BeitConfig, layer: usize, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        // Residual-branch projections are scaled by 1/sqrt(2l) at init (l 1-based).
        let std = cfg.initializer_range / (2.0 * (layer + 1) as f64).sqrt();
        Ok(Self {
            attention: SelfAttention::new(cfg, vb.pp("attention"))?,
            output: Linear::new(d, d, true, std, vb.pp("output").pp("dense"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, shared_bias: Option<&Tensor>) -> Result<Tensor> {
        self.output.forward(&self.attention.forward(x, shared_bias)?)
    }
}

/// Per-sample stochastic depth: [B, 1, 1] of 0 (dropped) or 1/keep (kept), or None when the
/// branch is always kept.
fn drop_path_scale(
    rate: f64,
    batch: usize,
    rng: &mut SplitMix64,
    dtype: DType,
    dev: &Device,
) -> Result<Option<Tensor>> {
    if rate <= 0.0 {
        return Ok(None);
    }
    let keep = 1.0 - rate;
    let scale: Vec<f64> = (0..batch).map(|_| if rng.uniform() < keep { 1.0 / keep } else { 0.0 }).collect();
    Ok(Some(Tensor::from_vec(scale, (batch, 1, 1), dev)?.to_dtype(dtype)?))
}

pub struct Layer {
    layernorm_before: LayerNorm,
    attention: Attention,
    layernorm_after: LayerNorm,
    intermediate: Linear,
    output: Linear,
    lambda_1: Option<Tensor>,
    lambda_2: Option<Tensor>,
    drop_path: f64,
}

impl Layer {
    pub fn new(cfg: &BeitConfig, layer: usize, drop_path: f64, vb: VarBuilder) -> Result<Self> {
        let (d, ff, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let std = cfg.initializer_range;
        let (lambda_1, lambda_2) = if cfg.layer_scale_init_value > 0.0 {
            let init = Init::Const(cfg.layer_scale_init_value);
            (Some(vb.get_with_hints(d, "lambda_1", init)?), Some(vb.get_with_hints(d, "lambda_2", init)?))
        } else {
            (None, None)
        };
        Ok(Self {
            layernorm_before: LayerNorm::new(d, eps, vb.pp("layernorm_before"))?,
            attention: Attention::new(cfg, layer, vb.pp("attention"))?,
            layernorm_after: LayerNorm::new(d, eps, vb.pp("layernorm_after"))?,
            intermediate: Linear::new(d, ff, true, std, vb.pp("intermediate").pp("dense"))?,
            output: Linear::new(ff, d, true, std / (2.0 * (layer + 1) as f64).sqrt(), vb.pp("output").pp("dense"))?,
            lambda_1,
            lambda_2,
            drop_path,
        })
    }

    /// `rng` is Some in training (stochastic depth on), None in evaluation.
    pub fn forward(
        &self,
        x: &Tensor,
        shared_bias: Option<&Tensor>,
        mut rng: Option<&mut SplitMix64>,
    ) -> Result<Tensor> {
        let attn = self.attention.forward(&self.layernorm_before.forward(x)?, shared_bias)?;
        let x = self.residual(x, attn, self.lambda_1.as_ref(), rng.as_deref_mut())?;
        let h = self.layernorm_after.forward(&x)?;
        let mlp = self.output.forward(&ops::gelu_erf(&self.intermediate.forward(&h)?)?)?;
        self.residual(&x, mlp, self.lambda_2.as_ref(), rng)
    }

    fn residual(
        &self,
        x: &Tensor,
        branch: Tensor,
        gamma: Option<&Tensor>,
        rng: Option<&mut SplitMix64>,
    ) -> Result<Tensor> {
        let branch = match gamma {
            Some(g) => ops::scale_columns(&branch, &like(g, x)?)?,
            None => branch,
        };
        let scale = match rng {
            Some(rng) => drop_path_scale(self.drop_path, x.dim(0)?, rng, x.dtype(), x.device())?,
            None => None,
        };
        match scale {
            Some(s) => x + branch.broadcast_mul(&s)?,
            None => x + branch,
        }
    }
}

pub struct Encoder {
    layers: Vec<Layer>,
    relative_position_bias: Option<RelativePositionBias>,
}

impl Encoder {
    pub fn new(cfg: &BeitConfig, vb: VarBuilder) -> Result<Self> {
        let relative_position_bias = if cfg.use_shared_relative_position_bias {
            Some(RelativePositionBias::new(cfg, vb.pp("relative_position_bias"))?)
        } else {
            None
        };
        let n = cfg.num_hidden_layers;
        let layers = (0..n)
            .map(|i| {
                // Stochastic depth grows linearly with depth: linspace(0, rate, n).
                let rate = if n > 1 { cfg.drop_path_rate * i as f64 / (n - 1) as f64 } else { 0.0 };
                Layer::new(cfg, i, rate, vb.pp("layer").pp(i))
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers, relative_position_bias })
    }

    pub fn forward(&self, x: &Tensor, rng: Option<&mut SplitMix64>) -> Result<Tensor> {
        self.forward_layers(x, self.layers.len(), rng)
    }

    /// The output of the first `count` layers.
    pub fn forward_layers(&self, x: &Tensor, count: usize, mut rng: Option<&mut SplitMix64>) -> Result<Tensor> {
        let shared = match &self.relative_position_bias {
            Some(rpb) => Some(like(&rpb.forward()?, x)?),
            None => None,
        };
        let mut x = x.clone();
        for layer in &self.layers[..count.min(self.layers.len())] {
            x = layer.forward(&x, shared.as_ref(), rng.as_deref_mut())?;
        }
        Ok(x)
    }
}

/// The backbone: embeddings and encoder (HF's `BeitModel` without pooler).
pub struct BeitModel {
    embeddings: Embeddings,
    encoder: Encoder,
}

impl BeitModel {
    pub fn new(cfg: &BeitConfig, use_mask_token: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            embeddings: Embeddings::new(cfg, use_mask_token, vb.pp("embeddings"))?,
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
        })
    }

    pub fn forward(&self, pixels: &Tensor, mask: Option<&Tensor>, rng: Option<&mut SplitMix64>) -> Result<Tensor> {
        self.encoder.forward(&self.embeddings.forward(pixels, mask)?, rng)
    }

    /// Linear-probe features of layer `layer` (1-based; 0 = the embeddings): [CLS] and the mean
    /// of the patch tokens, concatenated, [B, 2D]. No stochastic depth.
    pub fn probe_features(&self, pixels: &Tensor, layer: usize) -> Result<Tensor> {
        let h = self.encoder.forward_layers(&self.embeddings.forward(pixels, None)?, layer, None)?;
        let t = h.dim(1)?;
        let cls = h.narrow(1, 0, 1)?.squeeze(1)?;
        let mean = h.narrow(1, 1, t - 1)?.mean(1)?;
        Tensor::cat(&[&cls, &mean], 1)
    }
}

/// BEiT with the masked-image-modeling head (HF's `BeitForMaskedImageModeling`).
pub struct BeitForMaskedImageModeling {
    beit: BeitModel,
    layernorm: LayerNorm,
    lm_head: Linear,
}

impl BeitForMaskedImageModeling {
    pub fn new(cfg: &BeitConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            beit: BeitModel::new(cfg, true, vb.pp("beit"))?,
            layernorm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("layernorm"))?,
            lm_head: Linear::new(d, cfg.vocab_size, true, cfg.initializer_range, vb.pp("lm_head"))?,
        })
    }

    /// Final hidden states [B, N+1, D] (after the final LayerNorm).
    pub fn hidden_states(
        &self,
        pixels: &Tensor,
        mask: Option<&Tensor>,
        rng: Option<&mut SplitMix64>,
    ) -> Result<Tensor> {
        self.layernorm.forward(&self.beit.forward(pixels, mask, rng)?)
    }

    pub fn backbone(&self) -> &BeitModel {
        &self.beit
    }

    /// Vocabulary logits [M, V] of the patches at `positions` (flat indices b * N + n), so the
    /// head runs on masked patches only.
    pub fn logits_at(&self, hidden: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let (b, t, d) = hidden.dims3()?;
        let patches = hidden.narrow(1, 1, t - 1)?.contiguous()?.reshape((b * (t - 1), d))?;
        self.lm_head.forward(&patches.index_select(positions, 0)?)
    }
}

/// BEiT with a classification head (HF's `BeitForImageClassification`): mean-pooled patch
/// tokens through `beit.pooler.layernorm`, or [CLS] through `beit.layernorm`, then `classifier`.
pub struct BeitForImageClassification {
    beit: BeitModel,
    norm: LayerNorm,
    pooling: Pooling,
    classifier: Linear,
}

impl BeitForImageClassification {
    pub fn new(cfg: &ClassifierConfig, vb: VarBuilder) -> Result<Self> {
        let m = &cfg.model;
        let d = m.hidden_size;
        let norm_path = match cfg.pooling {
            Pooling::Mean => vb.pp("beit").pp("pooler").pp("layernorm"),
            Pooling::Cls => vb.pp("beit").pp("layernorm"),
        };
        Ok(Self {
            beit: BeitModel::new(m, false, vb.pp("beit"))?,
            norm: LayerNorm::new(d, m.layer_norm_eps, norm_path)?,
            pooling: cfg.pooling,
            classifier: Linear::new(d, cfg.num_labels, true, m.initializer_range, vb.pp("classifier"))?,
        })
    }

    pub fn backbone(&self) -> &BeitModel {
        &self.beit
    }

    /// The normalised pooled features [B, D] the head reads (transformers' `pooler_output` for
    /// mean pooling).
    pub fn pooled(&self, pixels: &Tensor, rng: Option<&mut SplitMix64>) -> Result<Tensor> {
        let h = self.beit.forward(pixels, None, rng)?;
        let t = h.dim(1)?;
        let pooled = match self.pooling {
            Pooling::Mean => h.narrow(1, 1, t - 1)?.mean(1)?,
            Pooling::Cls => h.narrow(1, 0, 1)?.squeeze(1)?,
        };
        self.norm.forward(&pooled)
    }

    /// Class logits [B, K]. `rng` drives stochastic depth (training only).
    pub fn forward(&self, pixels: &Tensor, rng: Option<&mut SplitMix64>) -> Result<Tensor> {
        self.classifier.forward(&self.pooled(pixels, rng)?)
    }
}

/// Logits for a loss: bf16 ones (mixed precision) are cast to f32, so the loss and its
/// log-sum-exp are f32; f32 and f64 (gradient checks) stay as they are.
fn at_least_f32(logits: &Tensor) -> Result<Tensor> {
    match logits.dtype() {
        DType::F32 | DType::F64 => Ok(logits.clone()),
        _ => logits.to_dtype(DType::F32),
    }
}

/// Mean label-smoothed cross-entropy of `logits` [M, K] against `labels` [M] (u32) and the
/// accuracy: (1 - s) * CE(label) + s * CE(uniform) = CE(label) + s * (x_label - mean_k x_k).
pub fn classification_loss(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Result<(Tensor, f64)> {
    let logits = &at_least_f32(logits)?;
    let mut rows = ops::cross_entropy_rows(logits, labels)?;
    if smoothing > 0.0 {
        let picked = logits.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?;
        let spread = picked.sub(&logits.mean(1)?)?.affine(smoothing, 0.0)?;
        rows = rows.add(&spread)?;
    }
    let hits = logits.argmax(D::Minus1)?.eq(labels)?.to_dtype(DType::F64)?.mean_all()?;
    Ok((rows.mean_all()?, hits.to_scalar::<f64>()?))
}

/// Mask [B, N] as 0/1 floats for the embeddings, and the flat masked positions.
pub fn mask_tensors(mask: &[u8], batch: usize, n: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let weights: Vec<f32> = mask.iter().map(|&m| m as f32).collect();
    let positions: Vec<u32> = mask.iter().enumerate().filter(|(_, &m)| m != 0).map(|(i, _)| i as u32).collect();
    let count = positions.len();
    Ok((Tensor::from_vec(weights, (batch, n), dev)?, Tensor::from_vec(positions, count, dev)?))
}

/// Mean cross-entropy and accuracy of `logits` [M, V] against `targets` [M] (u32).
pub fn masked_loss(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, f64)> {
    let logits = &at_least_f32(logits)?;
    let losses = ops::cross_entropy_rows(logits, targets)?;
    let loss = losses.mean_all()?;
    let hits = logits.argmax(D::Minus1)?.eq(targets)?.to_dtype(DType::F64)?.mean_all()?;
    Ok((loss, hits.to_scalar::<f64>()?))
}
