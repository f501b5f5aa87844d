//! The BEiT backbone on candle (Hugging Face's `BeitModel` without pooler): patch embedding,
//! [CLS], mask token, relative position bias, LayerScale, pre-LN blocks, stochastic depth.

use candle_core::{Device, Module, Result, Tensor};

use super::{like, LayerNorm, Linear, Vars};
use crate::arch::backbone::{relative_position_index, BackboneParams, BlockParams, EmbeddingParams};
use crate::config::{BeitConfig, Precision};
use crate::ops::{self, RowLookup};
use crate::rng::Draws;

/// Patchify + linear projection: a reshape and one matmul (cheaper than an im2col conv).
pub struct PatchEmbeddings {
    projection: Linear,
    patch_size: usize,
    num_channels: usize,
    image_size: [usize; 2],
}

impl PatchEmbeddings {
    /// [B, C, H, W] -> [B, N, D], patches in row-major grid order.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
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
            .reshape((b, gh * gw, c * p * p))?;
        self.projection.forward(&patches)
    }
}

pub struct Embeddings {
    cls_token: Tensor,
    mask_token: Option<Tensor>,
    patch_embeddings: PatchEmbeddings,
    position_embeddings: Option<Tensor>,
}

impl Embeddings {
    pub fn new(cfg: &BeitConfig, p: &EmbeddingParams, vars: &Vars, gemm: Precision) -> Self {
        let patch_embeddings = PatchEmbeddings {
            projection: Linear::new(&p.patch, vars, gemm),
            patch_size: cfg.patch_size,
            num_channels: cfg.num_channels,
            image_size: cfg.image_size,
        };
        Self {
            cls_token: vars.get(p.cls_token),
            mask_token: p.mask_token.map(|t| vars.get(t)),
            patch_embeddings,
            position_embeddings: p.position_embeddings.map(|t| vars.get(t)),
        }
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
/// patches (`arch::backbone::relative_position_index`).
pub struct RelativePositionBias {
    table: Tensor,
    index: RowLookup,
    num_heads: usize,
    tokens: usize,
}

impl RelativePositionBias {
    pub fn new(cfg: &BeitConfig, table: Tensor, device: &Device) -> Result<Self> {
        let (h, w) = cfg.grid();
        let tokens = h * w + 1;
        let index = RowLookup::new(&relative_position_index(h, w), table.dim(0)?, device)?;
        Ok(Self { table, index, num_heads: cfg.num_attention_heads, tokens })
    }

    /// [heads, N+1, N+1], to be added to the attention scores.
    pub fn forward(&self) -> Result<Tensor> {
        self.index
            .forward(&self.table)?
            .reshape((self.tokens, self.tokens, self.num_heads))?
            .permute((2, 0, 1))?
            .contiguous()
    }
}

pub struct SelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    relative_position_bias: Option<RelativePositionBias>,
    num_heads: usize,
    scale: f64,
    /// The precision of the products' inputs on the CPU (see [`ops::matmul`]).
    gemm: Precision,
}

impl SelfAttention {
    /// x: [B, T, D]; shared_bias: [heads, T, T] from the encoder's shared table (in x's dtype), if any.
    pub fn forward(&self, x: &Tensor, shared_bias: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let heads = self.num_heads;
        let split =
            |y: Tensor| -> Result<Tensor> { y.reshape((b, t, heads, d / heads))?.transpose(1, 2)?.contiguous() };
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let scores = ops::matmul(&q, &k.t()?, self.gemm)?;
        let bias = match (&self.relative_position_bias, shared_bias) {
            (Some(own), Some(shared)) => Some((like(&own.forward()?, x)? + shared)?),
            (Some(own), None) => Some(like(&own.forward()?, x)?),
            (None, shared) => shared.cloned(),
        };
        // The 1/sqrt(head_dim) scale and the bias are applied inside the softmax kernel.
        let probs = ops::scaled_softmax(&scores, bias.as_ref(), self.scale)?;
        ops::matmul(&probs, &v, self.gemm)?.transpose(1, 2)?.reshape((b, t, d))
    }
}

pub struct Layer {
    layernorm_before: LayerNorm,
    attention: SelfAttention,
    attention_output: Linear,
    layernorm_after: LayerNorm,
    intermediate: Linear,
    output: Linear,
    lambda_1: Option<Tensor>,
    lambda_2: Option<Tensor>,
    index: usize,
    num_layers: usize,
    drop_path: f64,
}

impl Layer {
    pub fn new(cfg: &BeitConfig, p: &BlockParams, vars: &Vars, device: &Device, gemm: Precision) -> Result<Self> {
        let relative_position_bias = match p.relative_position_bias {
            Some(t) => Some(RelativePositionBias::new(cfg, vars.get(t), device)?),
            None => None,
        };
        Ok(Self {
            layernorm_before: LayerNorm::new(&p.layernorm_before, vars),
            attention: SelfAttention {
                query: Linear::new(&p.query, vars, gemm),
                key: Linear::new(&p.key, vars, gemm),
                value: Linear::new(&p.value, vars, gemm),
                relative_position_bias,
                num_heads: cfg.num_attention_heads,
                scale: (cfg.head_dim() as f64).powf(-0.5),
                gemm,
            },
            attention_output: Linear::new(&p.attention_output, vars, gemm),
            layernorm_after: LayerNorm::new(&p.layernorm_after, vars),
            intermediate: Linear::new(&p.intermediate, vars, gemm),
            output: Linear::new(&p.output, vars, gemm),
            lambda_1: p.lambda_1.map(|t| vars.get(t)),
            lambda_2: p.lambda_2.map(|t| vars.get(t)),
            index: p.index,
            num_layers: cfg.num_hidden_layers,
            drop_path: p.drop_path,
        })
    }

    /// `draws` is Some in training (stochastic depth on), None in evaluation.
    pub fn forward(&self, x: &Tensor, shared_bias: Option<&Tensor>, draws: Option<Draws>) -> Result<Tensor> {
        let attn =
            self.attention_output.forward(&self.attention.forward(&self.layernorm_before.forward(x)?, shared_bias)?)?;
        let x = self.residual(x, attn, self.lambda_1.as_ref(), draws, 0)?;
        let h = self.layernorm_after.forward(&x)?;
        let mlp = self.output.forward(&ops::gelu_erf(&self.intermediate.forward(&h)?)?)?;
        self.residual(&x, mlp, self.lambda_2.as_ref(), draws, 1)
    }

    fn residual(
        &self,
        x: &Tensor,
        branch: Tensor,
        gamma: Option<&Tensor>,
        draws: Option<Draws>,
        which: usize,
    ) -> Result<Tensor> {
        let branch = match gamma {
            Some(g) => ops::scale_columns(&branch, &like(g, x)?)?,
            None => branch,
        };
        match draws.filter(|_| self.drop_path > 0.0) {
            Some(draws) => {
                let b = x.dim(0)?;
                let slot = 2 * self.index + which;
                let scale: Vec<f64> =
                    (0..b).map(|i| draws.drop_path(i, slot, 2 * self.num_layers, self.drop_path)).collect();
                let scale = Tensor::from_vec(scale, (b, 1, 1), x.device())?.to_dtype(x.dtype())?;
                x + branch.broadcast_mul(&scale)?
            }
            None => x + branch,
        }
    }
}

/// The backbone: embeddings and encoder.
pub struct BeitModel {
    embeddings: Embeddings,
    relative_position_bias: Option<RelativePositionBias>,
    layers: Vec<Layer>,
}

impl BeitModel {
    /// `gemm`: the precision of the matmul inputs on the CPU, the linear layers' and the
    /// attention's products'.
    pub fn new(cfg: &BeitConfig, p: &BackboneParams, vars: &Vars, device: &Device, gemm: Precision) -> Result<Self> {
        let relative_position_bias = match p.relative_position_bias {
            Some(t) => Some(RelativePositionBias::new(cfg, vars.get(t), device)?),
            None => None,
        };
        Ok(Self {
            embeddings: Embeddings::new(cfg, &p.embeddings, vars, gemm),
            relative_position_bias,
            layers: p.layers.iter().map(|l| Layer::new(cfg, l, vars, device, gemm)).collect::<Result<_>>()?,
        })
    }

    /// The hidden states [B, N+1, D] after the first `layers` blocks (0: the embeddings).
    pub fn forward(
        &self,
        pixels: &Tensor,
        mask: Option<&Tensor>,
        draws: Option<Draws>,
        layers: usize,
    ) -> Result<Tensor> {
        let mut x = self.embeddings.forward(pixels, mask)?;
        let shared = match &self.relative_position_bias {
            Some(rpb) => Some(like(&rpb.forward()?, &x)?),
            None => None,
        };
        for layer in &self.layers[..layers.min(self.layers.len())] {
            x = layer.forward(&x, shared.as_ref(), draws)?;
        }
        Ok(x)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The hidden states [B, N+1, D] after each of `depths` blocks (0: the embeddings), in the
    /// order asked; blocks past the deepest are not run.
    pub fn hidden_states(&self, pixels: &Tensor, draws: Option<Draws>, depths: &[usize]) -> Result<Vec<Tensor>> {
        let mut x = self.embeddings.forward(pixels, None)?;
        let shared = match &self.relative_position_bias {
            Some(rpb) => Some(like(&rpb.forward()?, &x)?),
            None => None,
        };
        let deepest = depths.iter().copied().max().unwrap_or(0).min(self.layers.len());
        let mut states = vec![x.clone()];
        for layer in &self.layers[..deepest] {
            x = layer.forward(&x, shared.as_ref(), draws)?;
            states.push(x.clone());
        }
        depths.iter().map(|&d| Ok(states[d.min(deepest)].clone())).collect()
    }

    /// Linear-probe features of layer `layer` (0 = the embeddings): [CLS] and the mean of the
    /// patch tokens, concatenated, [B, 2D]. No stochastic depth.
    pub fn probe_features(&self, pixels: &Tensor, layer: usize) -> Result<Tensor> {
        let h = self.forward(pixels, None, None, layer)?;
        let t = h.dim(1)?;
        let cls = h.narrow(1, 0, 1)?.squeeze(1)?;
        let mean = h.narrow(1, 1, t - 1)?.mean(1)?;
        Tensor::cat(&[&cls, &mean], 1)
    }
}
