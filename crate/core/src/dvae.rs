//! DALL-E style discrete VAE (the visual tokenizer), NHWC internally. Parameter names follow
//! OpenAI's release (`blocks.group_1.block_1.res_path.conv_1.w`, ...) under `encoder.` and
//! `decoder.`, so its weights map one to one.

use candle_core::{Result, Tensor, D};
use candle_nn::{init::FanInOut, init::NonLinearity, init::NormalOrUniform, Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::conv::{conv2d_same, max_pool2, upsample2};
use crate::error::Error;
use crate::model::like;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DvaeConfig {
    /// The input size [height, width] it is trained for: the default of the TS API. Any size
    /// divisible by the downsampling factor works when given explicitly. One number: square.
    #[serde(deserialize_with = "crate::config::square_or_pair")]
    pub image_size: [usize; 2],
    /// 1 for grayscale, 3 for RGB.
    pub num_channels: usize,
    /// Base width n_hid; group g (0-based) has width 2^g * n_hid in the encoder.
    pub hidden_size: usize,
    /// Groups of residual blocks; the token grid is the image downsampled by 2^(groups-1).
    pub num_groups: usize,
    pub blocks_per_group: usize,
    pub vocab_size: usize,
    /// Width of the decoder's first 1x1 conv (DALL-E: 128).
    pub decoder_input_size: usize,
}

impl DvaeConfig {
    pub fn preset(name: &str) -> crate::Result<Self> {
        let (size, channels, hidden, groups, blocks, vocab, init) = match name {
            // OpenAI's DALL-E dVAE: 112 px -> 14x14 tokens of 8192.
            "dall-e" => (112, 3, 256, 4, 2, 8192, 128),
            // For 28-64 px images on a CPU: downsample 4 (28 px -> 7x7 tokens).
            "small" => (28, 3, 64, 3, 1, 1024, 64),
            // The cheapest useful one, for tests and quick runs: downsample 4.
            "tiny" => (28, 3, 32, 3, 1, 512, 32),
            other => {
                return Err(Error::Config(format!(
                    "unknown tokenizer preset {other:?}: expected one of dall-e, small, tiny"
                )))
            }
        };
        Ok(Self {
            image_size: [size, size],
            num_channels: channels,
            hidden_size: hidden,
            num_groups: groups,
            blocks_per_group: blocks,
            vocab_size: vocab,
            decoder_input_size: init,
        })
    }

    pub fn downsample(&self) -> usize {
        1 << (self.num_groups - 1)
    }

    pub fn validate(&self) -> crate::Result<()> {
        let fields = [
            ("numChannels", self.num_channels),
            ("hiddenSize", self.hidden_size),
            ("numGroups", self.num_groups),
            ("blocksPerGroup", self.blocks_per_group),
            ("vocabSize", self.vocab_size),
            ("decoderInputSize", self.decoder_input_size),
        ];
        for (name, v) in fields {
            if v == 0 {
                return Err(Error::Config(format!("tokenizer {name} must be positive, got 0")));
            }
        }
        if self.num_groups > 8 {
            return Err(Error::Config(format!("tokenizer numGroups must be at most 8, got {}", self.num_groups)));
        }
        let d = self.downsample();
        if self.image_size.iter().any(|&s| s == 0 || s % d != 0) {
            return Err(Error::Config(format!(
                "tokenizer imageSize {:?} must be positive multiples of the downsampling factor {d} (2^(numGroups-1))",
                self.image_size
            )));
        }
        if self.hidden_size % 4 != 0 {
            return Err(Error::Config(format!(
                "tokenizer hiddenSize must be a multiple of 4 (blocks narrow to a quarter), got {}",
                self.hidden_size
            )));
        }
        Ok(())
    }

    pub fn from_json(json: &str) -> crate::Result<Self> {
        let cfg: Self = crate::config::parse_json("tokenizer config", json)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("config serialises")
    }

    fn num_layers(&self) -> usize {
        self.num_groups * self.blocks_per_group
    }
}

/// DALL-E's conv: weight `w` [out, in, k, k] ~ N(0, 1/(in*k*k)), bias `b` zero; "same" padding.
pub struct Conv {
    w: Tensor,
    b: Tensor,
}

impl Conv {
    pub fn new(n_in: usize, n_out: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        let init =
            Init::Kaiming { dist: NormalOrUniform::Normal, fan: FanInOut::FanIn, non_linearity: NonLinearity::Linear };
        Ok(Self {
            w: vb.get_with_hints((n_out, n_in, k, k), "w", init)?,
            b: vb.get_with_hints(n_out, "b", Init::Const(0.0))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d_same(x, &like(&self.w, x)?, &like(&self.b, x)?)
    }
}

/// Residual block: x -> id(x) + post_gain * res(x), res = 4 x (ReLU, conv), narrowing to
/// n_out/4 inside. Encoder res convs are 3,3,3,1; decoder ones 1,3,3,3.
pub struct ResBlock {
    id_path: Option<Conv>,
    res_path: Vec<Conv>,
    post_gain: f64,
}

impl ResBlock {
    pub fn new(n_in: usize, n_out: usize, kernels: [usize; 4], post_gain: f64, vb: VarBuilder) -> Result<Self> {
        let n_hid = n_out / 4;
        let id_path = if n_in != n_out { Some(Conv::new(n_in, n_out, 1, vb.pp("id_path"))?) } else { None };
        let widths = [(n_in, n_hid), (n_hid, n_hid), (n_hid, n_hid), (n_hid, n_out)];
        let res_path = widths
            .iter()
            .zip(kernels)
            .enumerate()
            .map(|(i, (&(a, b), k))| Conv::new(a, b, k, vb.pp("res_path").pp(format!("conv_{}", i + 1))))
            .collect::<Result<_>>()?;
        Ok(Self { id_path, res_path, post_gain })
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
}

/// `group_{g+1}.block_{b+1}` residual blocks: group g has width `widths[g]`, its first block
/// takes the previous group's width (`n_in` for the first group).
fn res_groups(
    cfg: &DvaeConfig,
    n_in: usize,
    widths: &[usize],
    kernels: [usize; 4],
    vb: &VarBuilder,
) -> Result<Vec<Vec<ResBlock>>> {
    let post_gain = 1.0 / (cfg.num_layers() as f64).powi(2);
    let mut width_in = n_in;
    widths
        .iter()
        .enumerate()
        .map(|(g, &n_out)| {
            let gvb = vb.pp(format!("group_{}", g + 1));
            let blocks = (0..cfg.blocks_per_group)
                .map(|b| {
                    let block_in = if b == 0 { width_in } else { n_out };
                    ResBlock::new(block_in, n_out, kernels, post_gain, gvb.pp(format!("block_{}", b + 1)))
                })
                .collect::<Result<Vec<_>>>();
            width_in = n_out;
            blocks
        })
        .collect()
}

pub struct Encoder {
    input: Conv,
    groups: Vec<Vec<ResBlock>>,
    output: Conv,
}

impl Encoder {
    pub fn new(cfg: &DvaeConfig, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("blocks");
        let input = Conv::new(cfg.num_channels, cfg.hidden_size, 7, vb.pp("input"))?;
        let widths: Vec<usize> = (0..cfg.num_groups).map(|g| cfg.hidden_size << g).collect();
        let groups = res_groups(cfg, cfg.hidden_size, &widths, [3, 3, 3, 1], &vb)?;
        let n_in = *widths.last().expect("validated: at least one group");
        let output = Conv::new(n_in, cfg.vocab_size, 1, vb.pp("output").pp("conv"))?;
        Ok(Self { input, groups, output })
    }

    /// [B, H, W, C] mapped pixels -> [B, H/d, W/d, V] logits.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.input.forward(x)?;
        let last = self.groups.len() - 1;
        for (g, blocks) in self.groups.iter().enumerate() {
            for block in blocks {
                h = block.forward(&h)?;
            }
            if g < last {
                h = max_pool2(&h)?;
            }
        }
        self.output.forward(&h.relu()?)
    }
}

pub struct Decoder {
    input: Conv,
    groups: Vec<Vec<ResBlock>>,
    output: Conv,
}

impl Decoder {
    pub fn new(cfg: &DvaeConfig, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("blocks");
        let input = Conv::new(cfg.vocab_size, cfg.decoder_input_size, 1, vb.pp("input"))?;
        let widths: Vec<usize> = (0..cfg.num_groups).map(|g| cfg.hidden_size << (cfg.num_groups - 1 - g)).collect();
        let groups = res_groups(cfg, cfg.decoder_input_size, &widths, [1, 3, 3, 3], &vb)?;
        let output = Conv::new(cfg.hidden_size, 2 * cfg.num_channels, 1, vb.pp("output").pp("conv"))?;
        Ok(Self { input, groups, output })
    }

    /// [B, h, w, V] (relaxed) one-hot codes -> [B, h*d, w*d, 2C] logit-Laplace parameters
    /// (mu for each channel, then log b for each channel).
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.input.forward(z)?;
        let last = self.groups.len() - 1;
        for (g, blocks) in self.groups.iter().enumerate() {
            for block in blocks {
                h = block.forward(&h)?;
            }
            if g < last {
                h = upsample2(&h)?;
            }
        }
        self.output.forward(&h.relu()?)
    }
}

pub struct Dvae {
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub config: DvaeConfig,
}

/// DALL-E's pixel map: [0, 1] -> [eps, 1 - eps], so the logit-Laplace support is never hit.
pub const LOGIT_LAPLACE_EPS: f64 = 0.1;

pub fn map_pixels(x: &Tensor) -> Result<Tensor> {
    x.affine(1.0 - 2.0 * LOGIT_LAPLACE_EPS, LOGIT_LAPLACE_EPS)
}

pub fn unmap_pixels(x: &Tensor) -> Result<Tensor> {
    x.affine(1.0 / (1.0 - 2.0 * LOGIT_LAPLACE_EPS), -LOGIT_LAPLACE_EPS / (1.0 - 2.0 * LOGIT_LAPLACE_EPS))?
        .clamp(0.0, 1.0)
}

impl Dvae {
    pub fn new(cfg: &DvaeConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            config: cfg.clone(),
        })
    }

    /// Reconstruction in [0, 1] (NHWC) from decoder output: unmap(sigmoid(mu)).
    pub fn reconstruction(&self, out: &Tensor) -> Result<Tensor> {
        let c = self.config.num_channels;
        unmap_pixels(&candle_nn::ops::sigmoid(&out.narrow(D::Minus1, 0, c)?)?)
    }
}
