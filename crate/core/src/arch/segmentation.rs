//! The segmenter's parameter table: the backbone (no mask token) and Hugging Face's
//! `BeitForSemanticSegmentation` head: the feature pyramid (`fpn1`, `fpn2`; `fpn3` is the
//! identity and `fpn4` a 2x2 max pool, neither has parameters), the UperHead (`decode_head`)
//! and the optional FCN auxiliary head (`auxiliary_head`), with the checkpoint keys
//! `save_pretrained` writes. BatchNorm running statistics are buffers of the table (saved,
//! moved and broadcast with the weights, updated by the training forward, never by AdamW); each
//! norm is listed in [`SegmenterParams::norms`].

use super::backbone::BackboneParams;
use crate::config::SegmenterConfig;
use crate::params::{Init, ParamId, ParamTable, Scope};

/// PyTorch's BatchNorm2d defaults, which transformers keeps.
pub const BATCH_NORM_EPS: f64 = 1e-5;
pub const BATCH_NORM_MOMENTUM: f64 = 0.1;

/// A convolution's kernel [out, in, k, k] (PyTorch layout) and optional bias.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConvParams {
    pub weight: ParamId,
    pub bias: Option<ParamId>,
    pub kernel: usize,
    pub n_in: usize,
    pub n_out: usize,
}

/// A 2x2 stride-2 transposed convolution: kernel [in, out, 2, 2] and bias [out].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpsampleParams {
    pub weight: ParamId,
    pub bias: ParamId,
    pub channels: usize,
}

/// BatchNorm2d: trainable `weight` and `bias`, and its running statistics as buffers (`norm`:
/// the position in [`SegmenterParams::norms`]).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNormParams {
    pub weight: ParamId,
    pub bias: ParamId,
    pub running_mean: ParamId,
    pub running_var: ParamId,
    pub num_batches_tracked: ParamId,
    pub channels: usize,
    pub norm: usize,
}

/// mmseg's ConvModule as transformers keeps it: convolution without bias, BatchNorm, ReLU.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvModuleParams {
    pub conv: ConvParams,
    pub bn: BatchNormParams,
}

/// The parts of the table that add BatchNorms, which register themselves in `norms`.
struct Builder<'a> {
    table: &'a mut ParamTable,
    norms: Vec<BatchNormParams>,
    layer: usize,
    init: Init,
}

impl Builder<'_> {
    fn scope(&mut self, prefix: &str) -> Scope<'_> {
        self.table.scope(prefix, self.layer)
    }

    fn conv(&mut self, prefix: &str, n_in: usize, n_out: usize, kernel: usize, bias: bool) -> ConvParams {
        let init = self.init;
        let mut s = self.scope(prefix);
        let weight = s.weight("weight", &[n_out, n_in, kernel, kernel], init);
        let bias = bias.then(|| s.no_decay("bias", &[n_out], Init::Constant(0.0)));
        ConvParams { weight, bias, kernel, n_in, n_out }
    }

    fn upsample(&mut self, prefix: &str, channels: usize) -> UpsampleParams {
        let init = self.init;
        let mut s = self.scope(prefix);
        let weight = s.weight("weight", &[channels, channels, 2, 2], init);
        let bias = s.no_decay("bias", &[channels], Init::Constant(0.0));
        UpsampleParams { weight, bias, channels }
    }

    fn batch_norm(&mut self, prefix: &str, channels: usize) -> BatchNormParams {
        let mut s = self.scope(prefix);
        let weight = s.no_decay("weight", &[channels], Init::Constant(1.0));
        let bias = s.no_decay("bias", &[channels], Init::Constant(0.0));
        let running_mean = s.buffer("running_mean", &[channels], Init::Constant(0.0));
        let running_var = s.buffer("running_var", &[channels], Init::Constant(1.0));
        let num_batches_tracked = s.buffer("num_batches_tracked", &[], Init::Constant(0.0));
        let norm = self.norms.len();
        let bn = BatchNormParams { weight, bias, running_mean, running_var, num_batches_tracked, channels, norm };
        self.norms.push(bn.clone());
        bn
    }

    fn conv_module(&mut self, prefix: &str, n_in: usize, n_out: usize, kernel: usize) -> ConvModuleParams {
        let conv = self.conv(&format!("{prefix}.conv"), n_in, n_out, kernel, false);
        let bn = self.batch_norm(&format!("{prefix}.bn"), n_out);
        ConvModuleParams { conv, bn }
    }
}

/// `fpn1` (transposed conv, BatchNorm, GELU, transposed conv: 4x up) and `fpn2` (2x up).
#[derive(Debug, Clone, PartialEq)]
pub struct PyramidParams {
    pub fpn1_up: UpsampleParams,
    pub fpn1_bn: BatchNormParams,
    pub fpn1_up2: UpsampleParams,
    pub fpn2_up: UpsampleParams,
}

/// UperNet's decode head: PSP branches (one per pool scale), bottleneck, lateral and FPN
/// convolutions on the three finer levels, the fused bottleneck and the 1x1 classifier.
#[derive(Debug, Clone, PartialEq)]
pub struct UperHeadParams {
    pub pool_scales: Vec<usize>,
    pub classifier: ConvParams,
    pub psp_modules: Vec<ConvModuleParams>,
    pub bottleneck: ConvModuleParams,
    pub lateral_convs: Vec<ConvModuleParams>,
    pub fpn_convs: Vec<ConvModuleParams>,
    pub fpn_bottleneck: ConvModuleParams,
}

/// The FCN auxiliary head on the third feature: 3x3 ConvModules, optionally the input
/// concatenated back (`conv_cat`), and a 1x1 classifier.
#[derive(Debug, Clone, PartialEq)]
pub struct FcnHeadParams {
    pub convs: Vec<ConvModuleParams>,
    pub conv_cat: Option<ConvModuleParams>,
    pub classifier: ConvParams,
}

/// transformers' `BeitFCNHead` reads the third feature map.
pub const AUXILIARY_FEATURE: usize = 2;

#[derive(Debug, Clone, PartialEq)]
pub struct SegmentationHeadParams {
    pub pyramid: PyramidParams,
    pub decode_head: UperHeadParams,
    pub auxiliary_head: Option<FcnHeadParams>,
}

/// The segmenter: backbone (no mask token) and segmentation head, and its BatchNorms in table
/// order.
#[derive(Debug, Clone)]
pub struct SegmenterParams {
    pub backbone: BackboneParams,
    pub head: SegmentationHeadParams,
    pub norms: Vec<BatchNormParams>,
}

impl SegmenterParams {
    pub fn new(cfg: &SegmenterConfig) -> (ParamTable, Self) {
        let mut table = ParamTable::new();
        let backbone = BackboneParams::new(&cfg.model, false, &mut table);
        let d = cfg.model.hidden_size;
        // transformers initialises convolutions N(0, initializerRange) and BatchNorms to (1, 0).
        let init = Init::Normal(cfg.model.initializer_range);
        let mut b = Builder { table: &mut table, norms: Vec::new(), layer: cfg.model.num_hidden_layers + 1, init };
        let pyramid = PyramidParams {
            fpn1_up: b.upsample("fpn1.0", d),
            fpn1_bn: b.batch_norm("fpn1.1", d),
            fpn1_up2: b.upsample("fpn1.3", d),
            fpn2_up: b.upsample("fpn2.0", d),
        };
        let scales = &cfg.pool_scales;
        let decode_head = UperHeadParams {
            pool_scales: scales.clone(),
            classifier: b.conv("decode_head.classifier", d, cfg.num_labels, 1, true),
            psp_modules: (0..scales.len())
                .map(|i| b.conv_module(&format!("decode_head.psp_modules.{i}.1"), d, d, 1))
                .collect(),
            bottleneck: b.conv_module("decode_head.bottleneck", d + scales.len() * d, d, 3),
            lateral_convs: (0..3).map(|i| b.conv_module(&format!("decode_head.lateral_convs.{i}"), d, d, 1)).collect(),
            fpn_convs: (0..3).map(|i| b.conv_module(&format!("decode_head.fpn_convs.{i}"), d, d, 3)).collect(),
            fpn_bottleneck: b.conv_module("decode_head.fpn_bottleneck", 4 * d, d, 3),
        };
        let auxiliary_head = cfg.use_auxiliary_head.then(|| {
            let c = cfg.auxiliary_channels;
            let convs = (0..cfg.auxiliary_num_convs)
                .map(|i| b.conv_module(&format!("auxiliary_head.convs.{i}"), if i == 0 { d } else { c }, c, 3))
                .collect();
            let conv_cat = cfg.auxiliary_concat_input.then(|| b.conv_module("auxiliary_head.conv_cat", d + c, c, 3));
            FcnHeadParams {
                convs,
                conv_cat,
                classifier: b.conv("auxiliary_head.classifier", c, cfg.num_labels, 1, true),
            }
        });
        let norms = b.norms;
        (table, Self { backbone, head: SegmentationHeadParams { pyramid, decode_head, auxiliary_head }, norms })
    }
}
