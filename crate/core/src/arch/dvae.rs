//! The dVAE tokenizer's parameter table: DALL-E's encoder and decoder, names as OpenAI's
//! release (`encoder.blocks.group_1.block_1.res_path.conv_1.w`, ...).

use crate::config::DvaeConfig;
use crate::params::{Init, ParamId, ParamTable, Scope};

/// DALL-E's conv: weight `w` [out, in, k, k] ~ N(0, 1/(in*k*k)), bias `b` zero; "same" padding.
#[derive(Debug, Clone, Copy)]
pub struct ConvParams {
    pub w: ParamId,
    pub b: ParamId,
    pub c_in: usize,
    pub c_out: usize,
    pub k: usize,
}

fn conv(s: &mut Scope, c_in: usize, c_out: usize, k: usize) -> ConvParams {
    let std = 1.0 / ((c_in * k * k) as f64).sqrt();
    let w = s.weight("w", &[c_out, c_in, k, k], Init::Normal(std));
    let b = s.no_decay("b", &[c_out], Init::Constant(0.0));
    ConvParams { w, b, c_in, c_out, k }
}

/// Residual block: x -> id(x) + post_gain * res(x), res = 4 x (ReLU, conv) narrowing to n_out/4
/// inside; the id path is a 1x1 conv when the width changes.
#[derive(Debug, Clone)]
pub struct ResBlockParams {
    pub id_path: Option<ConvParams>,
    pub res_path: [ConvParams; 4],
}

/// What sits between two groups of blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// 2x2 max pooling (encoder).
    MaxPool,
    /// Nearest-neighbour 2x upsampling (decoder).
    Upsample,
}

/// An encoder or decoder: input conv, groups of residual blocks with resampling between them,
/// output conv after a ReLU.
#[derive(Debug, Clone)]
pub struct NetParams {
    pub input: ConvParams,
    pub groups: Vec<Vec<ResBlockParams>>,
    pub output: ConvParams,
    pub resample: Resample,
    /// 1 / (blocks in all)^2, the residual branches' scale.
    pub post_gain: f64,
}

impl NetParams {
    /// Every convolution, in table order.
    pub fn convs(&self) -> Vec<ConvParams> {
        let mut out = vec![self.input];
        for block in self.groups.iter().flatten() {
            out.extend(block.id_path);
            out.extend(block.res_path);
        }
        out.push(self.output);
        out
    }
}

#[derive(Debug, Clone)]
pub struct DvaeParams {
    pub encoder: NetParams,
    pub decoder: NetParams,
}

impl DvaeParams {
    pub fn new(cfg: &DvaeConfig) -> (ParamTable, Self) {
        let mut table = ParamTable::new();
        let groups = cfg.num_groups;
        let encoder = net(
            cfg,
            &mut table.scope("encoder.blocks", 0),
            (cfg.num_channels, 7),
            (0..groups).map(|g| cfg.hidden_size << g).collect(),
            [3, 3, 3, 1],
            (cfg.vocab_size, Resample::MaxPool),
        );
        let decoder = net(
            cfg,
            &mut table.scope("decoder.blocks", 0),
            (cfg.vocab_size, 1),
            (0..groups).map(|g| cfg.hidden_size << (groups - 1 - g)).collect(),
            [1, 3, 3, 3],
            (2 * cfg.num_channels, Resample::Upsample),
        );
        (table, Self { encoder, decoder })
    }
}

/// `input` (channels in, kernel), `group_{g+1}.block_{b+1}` blocks of `widths[g]` (the first
/// block of a group takes the previous group's width, the first group the input conv's),
/// `output.conv` to `output.0` channels.
fn net(
    cfg: &DvaeConfig,
    s: &mut Scope,
    (c_in, k_in): (usize, usize),
    widths: Vec<usize>,
    kernels: [usize; 4],
    (c_out, resample): (usize, Resample),
) -> NetParams {
    let first_width = if resample == Resample::MaxPool { cfg.hidden_size } else { cfg.decoder_input_size };
    let input = conv(&mut s.pp("input"), c_in, first_width, k_in);
    let mut width_in = first_width;
    let mut groups = Vec::new();
    for (g, &n_out) in widths.iter().enumerate() {
        let mut blocks = Vec::new();
        for b in 0..cfg.blocks_per_group {
            let block_in = if b == 0 { width_in } else { n_out };
            let mut block = s.pp(format!("group_{}", g + 1));
            let mut block = block.pp(format!("block_{}", b + 1));
            let id_path = (block_in != n_out).then(|| conv(&mut block.pp("id_path"), block_in, n_out, 1));
            let hid = n_out / 4;
            let shapes = [(block_in, hid), (hid, hid), (hid, hid), (hid, n_out)];
            let mut res = block.pp("res_path");
            let res_path: [ConvParams; 4] = std::array::from_fn(|i| {
                conv(&mut res.pp(format!("conv_{}", i + 1)), shapes[i].0, shapes[i].1, kernels[i])
            });
            blocks.push(ResBlockParams { id_path, res_path });
        }
        width_in = n_out;
        groups.push(blocks);
    }
    let output = conv(&mut s.pp("output").pp("conv"), width_in, c_out, 1);
    let layers = cfg.num_layers() as f64;
    NetParams { input, groups, output, resample, post_gain: 1.0 / (layers * layers) }
}
