//! DALL-E style discrete VAE (the visual tokenizer) on candle, NHWC internally.

use candle_core::{Result, Tensor, D};

use super::{like, Vars};
use crate::arch::dvae::{ConvParams, DvaeParams, NetParams, ResBlockParams, Resample};
use crate::config::{DvaeConfig, Precision, LOGIT_LAPLACE_EPS};
use crate::conv::{conv2d_same, max_pool2, upsample2};

pub struct Conv {
    w: Tensor,
    b: Tensor,
}

impl Conv {
    pub fn new(p: &ConvParams, vars: &Vars) -> Self {
        Self { w: vars.get(p.w), b: vars.get(p.b) }
    }

    /// In the tensors' dtype: the CPU engine's bf16 GEMMs are the tokenizer engine's.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d_same(x, &like(&self.w, x)?, &like(&self.b, x)?, Precision::F32)
    }

    fn detached(&self) -> Self {
        Self { w: self.w.detach(), b: self.b.detach() }
    }
}

/// Residual block: x -> id(x) + post_gain * res(x), res = 4 x (ReLU, conv).
pub struct ResBlock {
    id_path: Option<Conv>,
    res_path: Vec<Conv>,
    post_gain: f64,
}

impl ResBlock {
    pub fn new(p: &ResBlockParams, post_gain: f64, vars: &Vars) -> Self {
        Self {
            id_path: p.id_path.as_ref().map(|c| Conv::new(c, vars)),
            res_path: p.res_path.iter().map(|c| Conv::new(c, vars)).collect(),
            post_gain,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let id = match &self.id_path {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let mut h = x.clone();
        for conv in &self.res_path {
            h = conv.forward(&h.relu()?)?;
        }
        id + (h * self.post_gain)?
    }

    fn detached(&self) -> Self {
        Self {
            id_path: self.id_path.as_ref().map(Conv::detached),
            res_path: self.res_path.iter().map(Conv::detached).collect(),
            post_gain: self.post_gain,
        }
    }
}

/// The encoder or the decoder.
pub struct Net {
    input: Conv,
    groups: Vec<Vec<ResBlock>>,
    output: Conv,
    resample: Resample,
}

impl Net {
    pub fn new(p: &NetParams, vars: &Vars) -> Self {
        Self {
            input: Conv::new(&p.input, vars),
            groups: p.groups.iter().map(|g| g.iter().map(|b| ResBlock::new(b, p.post_gain, vars)).collect()).collect(),
            output: Conv::new(&p.output, vars),
            resample: p.resample,
        }
    }

    /// Encoder: [B, H, W, C] mapped pixels -> [B, H/d, W/d, V] logits. Decoder: [B, h, w, V]
    /// (relaxed) one-hot codes -> [B, h*d, w*d, 2C] logit-Laplace parameters (mu for each
    /// channel, then log b for each channel).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.input.forward(x)?;
        let last = self.groups.len() - 1;
        for (g, blocks) in self.groups.iter().enumerate() {
            for block in blocks {
                h = block.forward(&h)?;
            }
            if g < last {
                h = match self.resample {
                    Resample::MaxPool => max_pool2(&h)?,
                    Resample::Upsample => upsample2(&h)?,
                };
            }
        }
        self.output.forward(&h.relu()?)
    }

    /// This net without gradient tracking (see [`Dvae::detached`]).
    pub fn detached(&self) -> Self {
        Self {
            input: self.input.detached(),
            groups: self.groups.iter().map(|g| g.iter().map(ResBlock::detached).collect()).collect(),
            output: self.output.detached(),
            resample: self.resample,
        }
    }
}

pub struct Dvae {
    pub encoder: Net,
    pub decoder: Net,
    pub config: DvaeConfig,
}

impl Dvae {
    pub fn new(cfg: &DvaeConfig, p: &DvaeParams, vars: &Vars) -> Self {
        Self { encoder: Net::new(&p.encoder, vars), decoder: Net::new(&p.decoder, vars), config: cfg.clone() }
    }

    /// The same model reading the same weights (shared storage, so later updates show) without
    /// gradient tracking: inference through it keeps no graph, so each activation is freed when
    /// the next layer has read it (with tracked weights, every activation of the encoder stayed
    /// alive until its output was dropped).
    pub fn detached(&self) -> Self {
        Self { encoder: self.encoder.detached(), decoder: self.decoder.detached(), config: self.config.clone() }
    }

    /// Reconstruction in [0, 1] (NHWC) from decoder output: unmap(sigmoid(mu)).
    pub fn reconstruction(&self, out: &Tensor) -> Result<Tensor> {
        let c = self.config.num_channels;
        unmap_pixels(&candle_nn::ops::sigmoid(&out.narrow(D::Minus1, 0, c)?)?)
    }
}

/// DALL-E's pixel map: [0, 1] -> [eps, 1 - eps].
pub fn map_pixels(x: &Tensor) -> Result<Tensor> {
    x.affine(1.0 - 2.0 * LOGIT_LAPLACE_EPS, LOGIT_LAPLACE_EPS)
}

pub fn unmap_pixels(x: &Tensor) -> Result<Tensor> {
    x.affine(1.0 / (1.0 - 2.0 * LOGIT_LAPLACE_EPS), -LOGIT_LAPLACE_EPS / (1.0 - 2.0 * LOGIT_LAPLACE_EPS))?
        .clamp(0.0, 1.0)
}
