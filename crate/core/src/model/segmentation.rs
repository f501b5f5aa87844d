//! BEiT with UperNet on candle (Hugging Face's `BeitForSemanticSegmentation`): backbone features
//! at `outIndices`, the feature pyramid, the UperHead and the FCN auxiliary head, and the
//! per-pixel cross-entropy with an ignore label. Feature maps are NHWC, so the backbone's
//! tokens are a feature map without a transpose, a 1x1 convolution is one matmul and the 3x3
//! ones are `conv::conv2d_same`.

use std::sync::Arc;

use candle_core::{Device, Module, Result, Tensor};

use super::backbone::BeitModel;
use super::{at_least_f32, like, Vars};
use crate::arch::segmentation::{
    BatchNormParams, ConvModuleParams, ConvParams, FcnHeadParams, SegmenterParams, UperHeadParams, UpsampleParams,
    AUXILIARY_FEATURE, BATCH_NORM_EPS, BATCH_NORM_MOMENTUM,
};
use crate::config::{Precision, SegmenterConfig};
use crate::conv::{conv2d_same, max_pool2};
use crate::distributed::ReplicaSum;
use crate::ops::{self, resample, sum_over_replicas, Resampling};
use crate::rng::Draws;

/// What one training forward saw at a BatchNorm: the batch mean and unbiased variance per
/// channel (detached).
#[derive(Debug, Clone)]
pub struct BatchStats {
    pub mean: Tensor,
    pub unbiased_var: Tensor,
}

/// The BatchNorms' mode during a forward pass, training (batch statistics) or evaluation
/// (running ones), and in training the batch statistics each norm saw (None for a norm that
/// saw one value per channel, see [`BatchNorm::forward`]). In a data-parallel job the batch
/// is every replica's (SyncBatchNorm, as mmseg trains BEiT).
pub struct Norms {
    training: bool,
    replicas: Option<Arc<dyn ReplicaSum>>,
    pub seen: Vec<Option<BatchStats>>,
}

impl Norms {
    pub fn new(count: usize, training: bool) -> Self {
        Self { training, replicas: None, seen: vec![None; count] }
    }

    /// Training statistics over the batches of every replica `replicas` sums over.
    pub fn synchronised(count: usize, replicas: Arc<dyn ReplicaSum>) -> Self {
        Self { replicas: Some(replicas), ..Self::new(count, true) }
    }
}

/// PyTorch's running-statistics update after a training forward: for each norm that saw a
/// batch, mean and variance move by the momentum towards the batch's (unbiased variance) and
/// `num_batches_tracked` counts it. The buffers are updated in place.
pub fn update_running_stats(norms: &[BatchNormParams], vars: &Vars, seen: &[Option<BatchStats>]) -> Result<()> {
    for (bn, batch) in norms.iter().zip(seen) {
        let Some(batch) = batch else { continue };
        for (id, value) in [(bn.running_mean, &batch.mean), (bn.running_var, &batch.unbiased_var)] {
            let running = vars.get(id);
            let moved = (running.affine(1.0 - BATCH_NORM_MOMENTUM, 0.0)?
                + value.to_dtype(running.dtype())?.affine(BATCH_NORM_MOMENTUM, 0.0)?)?;
            vars.vars()[id.0].set(&moved)?;
        }
        let tracked = vars.get(bn.num_batches_tracked);
        vars.vars()[bn.num_batches_tracked.0].set(&tracked.affine(1.0, 1.0)?)?;
    }
    Ok(())
}

pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    norm: usize,
}

impl BatchNorm {
    pub fn new(p: &BatchNormParams, vars: &Vars) -> Self {
        Self {
            weight: vars.get(p.weight),
            bias: vars.get(p.bias),
            // Buffers: read, never differentiated (their updates are in place).
            running_mean: vars.get(p.running_mean).detach(),
            running_var: vars.get(p.running_var).detach(),
            norm: p.norm,
        }
    }

    /// x [..., C]. In training each channel is normalised by its batch statistics; a batch
    /// with one value per channel (one image through the 1x1 pyramid-pooling branch, where
    /// PyTorch raises and mmseg fails) has no variance to normalise by: it is normalised with
    /// the running statistics instead and does not update them. Synchronised, the batch is
    /// every replica's (one image per replica is then a batch of several). Then a ReLU when
    /// `relu` (a ConvModule's, fused with the norm on the CPU).
    pub fn forward(&self, x: &Tensor, relu: bool, norms: &mut Norms) -> Result<Tensor> {
        let channels = *x.dims().last().unwrap_or(&1);
        let statistics = if norms.training {
            let mut rows = [(x.elem_count() / channels) as f64];
            ops::sum_values_over_replicas(norms.replicas.as_ref(), &mut rows)?;
            (rows[0] > 1.0).then_some(Statistics::Batch { replicas: norms.replicas.as_ref(), rows: rows[0] as usize })
        } else {
            None
        };
        let by_batch = statistics.is_some();
        let statistics = statistics.unwrap_or(Statistics::Running { mean: &self.running_mean, var: &self.running_var });
        let (y, seen) = batch_norm(x, &self.weight, &self.bias, statistics, relu)?;
        if by_batch {
            norms.seen[self.norm] = seen;
        }
        Ok(y)
    }
}

/// What a BatchNorm normalises by.
pub enum Statistics<'a> {
    /// Running statistics (evaluation).
    Running { mean: &'a Tensor, var: &'a Tensor },
    /// The batch's, over `rows` values per channel: this tensor's alone, or summed over
    /// `replicas` (whose tensors hold `rows` together).
    Batch { replicas: Option<&'a Arc<dyn ReplicaSum>>, rows: usize },
}

impl<'a> Statistics<'a> {
    /// The batch statistics of x [..., C] alone.
    pub fn of(x: &Tensor) -> Self {
        let channels = *x.dims().last().unwrap_or(&1);
        Statistics::Batch { replicas: None, rows: x.elem_count() / channels }
    }
}

/// BatchNorm over the last dimension of x [..., C], computed in at least f32, then a ReLU when
/// `relu`: with running statistics (evaluation), else with the batch's (mean and biased
/// variance over all other dimensions and every replica, as PyTorch trains), which are returned
/// with the unbiased variance for the running update. In training on the CPU one fused op
/// ([`ops::batch_norm_train`]); elsewhere candle's ops.
pub fn batch_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    statistics: Statistics,
    relu: bool,
) -> Result<(Tensor, Option<BatchStats>)> {
    let dims = x.dims().to_vec();
    let c = *dims.last().unwrap_or(&1);
    let x2 = at_least_f32(&x.reshape((x.elem_count() / c, c))?)?;
    let (weight, bias) = (like(weight, &x2)?, like(bias, &x2)?);
    let (y, seen) = match statistics {
        Statistics::Batch { replicas, rows } if x2.device().is_cpu() => {
            let (y, s) = ops::batch_norm_train(&x2, &weight, &bias, relu, replicas, rows, BATCH_NORM_EPS)?;
            let unbiased = rows as f64 / (rows.max(2) - 1) as f64;
            let var: Vec<f64> = s.var.iter().map(|v| v * unbiased).collect();
            let values = |v: Vec<f64>| Tensor::new(v, x2.device())?.to_dtype(x2.dtype());
            let seen = BatchStats { mean: values(s.mean)?, unbiased_var: values(var)? };
            (y, Some(seen))
        }
        statistics => {
            let (y, seen) = composed_batch_norm(&x2, &weight.reshape((1, c))?, &bias.reshape((1, c))?, statistics)?;
            (if relu { y.relu()? } else { y }, seen)
        }
    };
    Ok((y.to_dtype(x.dtype())?.reshape(dims)?, seen))
}

/// [`batch_norm`] of x [rows, C] by candle's ops, without the ReLU: the path of other devices,
/// and the reference the fused CPU op is tested against. `weight` and `bias` are [1, C].
pub fn composed_batch_norm(
    x2: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    statistics: Statistics,
) -> Result<(Tensor, Option<BatchStats>)> {
    let c = x2.dim(1)?;
    let (centred, var, seen) = match statistics {
        Statistics::Running { mean, var } => {
            let mean = mean.to_dtype(x2.dtype())?.reshape((1, c))?;
            (x2.broadcast_sub(&mean)?, var.to_dtype(x2.dtype())?.reshape((1, c))?, None)
        }
        Statistics::Batch { replicas, rows } => {
            // Sums over the whole batch, then divided: candle's mean, so one replica alone
            // computes exactly what it computes unsynchronised.
            let across = |sums: Tensor| match replicas {
                Some(r) => sum_over_replicas(&sums, r),
                None => Ok(sums),
            };
            let mean = across(x2.sum_keepdim(0)?)?.affine(1.0 / rows as f64, 0.0)?;
            let centred = x2.broadcast_sub(&mean)?;
            let var = across(centred.sqr()?.sum_keepdim(0)?)?.affine(1.0 / rows as f64, 0.0)?;
            let unbiased = rows as f64 / (rows.max(2) - 1) as f64;
            let seen = BatchStats {
                mean: mean.detach().flatten_all()?,
                unbiased_var: var.detach().flatten_all()?.affine(unbiased, 0.0)?,
            };
            (centred, var, Some(seen))
        }
    };
    let scale = var.affine(1.0, BATCH_NORM_EPS)?.sqrt()?.recip()?.broadcast_mul(weight)?;
    Ok((centred.broadcast_mul(&scale)?.broadcast_add(bias)?, seen))
}

/// A k x k convolution (stride 1, "same" padding) on NHWC maps, its GEMMs' inputs at `gemm`
/// on the CPU (see `conv::conv2d_same`).
pub struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    kernel: usize,
    gemm: Precision,
}

impl Conv {
    pub fn new(p: &ConvParams, vars: &Vars, gemm: Precision) -> Self {
        Self { weight: vars.get(p.weight), bias: p.bias.map(|b| vars.get(b)), kernel: p.kernel, gemm }
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let weight = like(&self.weight, x)?;
        let n_out = weight.dim(0)?;
        if self.kernel == 1 {
            let y = ops::matmul(&x.reshape((b * h * w, c))?, &weight.reshape((n_out, c))?.t()?, self.gemm)?;
            let y = match &self.bias {
                Some(bias) => ops::add_bias(&y, &like(bias, x)?)?,
                None => y,
            };
            return y.reshape((b, h, w, n_out));
        }
        let bias = match &self.bias {
            Some(bias) => like(bias, x)?,
            None => Tensor::zeros(n_out, x.dtype(), x.device())?,
        };
        conv2d_same(x, &weight, &bias, self.gemm)
    }
}

/// A 2x2 stride-2 transposed convolution ([`conv_transpose_2x2`]).
pub struct Upsample {
    weight: Tensor,
    bias: Tensor,
    gemm: Precision,
}

impl Upsample {
    pub fn new(p: &UpsampleParams, vars: &Vars, gemm: Precision) -> Self {
        Self { weight: vars.get(p.weight), bias: vars.get(p.bias), gemm }
    }
}

impl Module for Upsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv_transpose_2x2(x, &self.weight, &self.bias, self.gemm)
    }
}

/// PyTorch's ConvTranspose2d(kernel 2, stride 2) on x [B, H, W, C_in] with weight
/// [C_in, C_out, 2, 2]: each input pixel becomes a 2x2 block, one matmul with the kernel as
/// [C_in, 2*2*C_out] and a reshuffle, its inputs at `gemm` on the CPU.
pub fn conv_transpose_2x2(x: &Tensor, weight: &Tensor, bias: &Tensor, gemm: Precision) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let weight = like(weight, x)?;
    let c_out = weight.dim(1)?;
    let kernel = weight.permute((0, 2, 3, 1))?.contiguous()?.reshape((c, 4 * c_out))?;
    let y = ops::matmul(&x.reshape((b * h * w, c))?, &kernel, gemm)?.reshape((b, h, w, 2, 2, c_out))?;
    let y = y.permute((0, 1, 3, 2, 4, 5))?.contiguous()?.reshape((b * 4 * h * w, c_out))?;
    ops::add_bias(&y, &like(bias, x)?)?.reshape((b, 2 * h, 2 * w, c_out))
}

/// Convolution without bias, BatchNorm, ReLU.
pub struct ConvModule {
    conv: Conv,
    bn: BatchNorm,
}

impl ConvModule {
    pub fn new(p: &ConvModuleParams, vars: &Vars, gemm: Precision) -> Self {
        Self { conv: Conv::new(&p.conv, vars, gemm), bn: BatchNorm::new(&p.bn, vars) }
    }

    pub fn forward(&self, x: &Tensor, norms: &mut Norms) -> Result<Tensor> {
        self.bn.forward(&self.conv.forward(x)?, true, norms)
    }
}

/// The feature pyramid from four [B, h, w, D] maps: 4x (`fpn1`), 2x (`fpn2`), as is, 1/2 (max
/// pool).
pub struct Pyramid {
    fpn1_up: Upsample,
    fpn1_bn: BatchNorm,
    fpn1_up2: Upsample,
    fpn2_up: Upsample,
}

impl Pyramid {
    pub fn forward(&self, features: [Tensor; 4], norms: &mut Norms) -> Result<[Tensor; 4]> {
        let [f1, f2, f3, f4] = features;
        let f1 = self.fpn1_up.forward(&f1)?;
        let f1 = self.fpn1_up2.forward(&ops::gelu_erf(&self.fpn1_bn.forward(&f1, false, norms)?)?)?;
        Ok([f1, self.fpn2_up.forward(&f2)?, f3, max_pool2(&f4)?])
    }
}

pub struct UperHead {
    pool_scales: Vec<usize>,
    classifier: Conv,
    psp_modules: Vec<ConvModule>,
    bottleneck: ConvModule,
    lateral_convs: Vec<ConvModule>,
    fpn_convs: Vec<ConvModule>,
    fpn_bottleneck: ConvModule,
}

impl UperHead {
    pub fn new(p: &UperHeadParams, vars: &Vars, gemm: Precision) -> Self {
        let modules = |ps: &[ConvModuleParams]| ps.iter().map(|p| ConvModule::new(p, vars, gemm)).collect();
        Self {
            pool_scales: p.pool_scales.clone(),
            classifier: Conv::new(&p.classifier, vars, gemm),
            psp_modules: modules(&p.psp_modules),
            bottleneck: ConvModule::new(&p.bottleneck, vars, gemm),
            lateral_convs: modules(&p.lateral_convs),
            fpn_convs: modules(&p.fpn_convs),
            fpn_bottleneck: ConvModule::new(&p.fpn_bottleneck, vars, gemm),
        }
    }

    /// Pyramid pooling on the coarsest map: each scale pooled, convolved and resized back,
    /// concatenated with the map, then the bottleneck.
    fn psp(&self, x: &Tensor, norms: &mut Norms) -> Result<Tensor> {
        let mut branches = Vec::with_capacity(self.pool_scales.len());
        for (&scale, module) in self.pool_scales.iter().zip(&self.psp_modules) {
            let pooled = resample(x, Resampling::AdaptiveAverage, (scale, scale))?;
            branches.push(module.forward(&pooled, norms)?);
        }
        self.bottleneck.forward(&ops::concat_resized(x, &branches)?, norms)
    }

    /// Logits [B, h, w, K] at the finest level's size.
    pub fn forward(&self, features: &[Tensor; 4], norms: &mut Norms) -> Result<Tensor> {
        let mut laterals = Vec::with_capacity(4);
        for (conv, feature) in self.lateral_convs.iter().zip(features) {
            laterals.push(conv.forward(feature, norms)?);
        }
        laterals.push(self.psp(&features[3], norms)?);
        for i in (1..4).rev() {
            laterals[i - 1] = ops::add_resized(&laterals[i - 1], &laterals[i])?;
        }
        let mut outs = Vec::with_capacity(4);
        for (conv, lateral) in self.fpn_convs.iter().zip(&laterals) {
            outs.push(conv.forward(lateral, norms)?);
        }
        outs.push(laterals[3].clone());
        let finest = outs.remove(0);
        self.classifier.forward(&self.fpn_bottleneck.forward(&ops::concat_resized(&finest, &outs)?, norms)?)
    }
}

pub struct FcnHead {
    convs: Vec<ConvModule>,
    conv_cat: Option<ConvModule>,
    classifier: Conv,
}

impl FcnHead {
    pub fn new(p: &FcnHeadParams, vars: &Vars, gemm: Precision) -> Self {
        Self {
            convs: p.convs.iter().map(|p| ConvModule::new(p, vars, gemm)).collect(),
            conv_cat: p.conv_cat.as_ref().map(|p| ConvModule::new(p, vars, gemm)),
            classifier: Conv::new(&p.classifier, vars, gemm),
        }
    }

    pub fn forward(&self, features: &[Tensor; 4], norms: &mut Norms) -> Result<Tensor> {
        let input = &features[AUXILIARY_FEATURE];
        let mut x = input.clone();
        for conv in &self.convs {
            x = conv.forward(&x, norms)?;
        }
        if let Some(cat) = &self.conv_cat {
            x = cat.forward(&Tensor::cat(&[input, &x], 3)?, norms)?;
        }
        self.classifier.forward(&x)
    }
}

/// Main and auxiliary logits, NHWC at a quarter of the input's patch grid times 4.
pub struct SegmentationLogits {
    pub logits: Tensor,
    pub auxiliary: Option<Tensor>,
}

pub struct BeitForSemanticSegmentation {
    beit: BeitModel,
    depths: [usize; 4],
    grid: (usize, usize),
    pyramid: Pyramid,
    decode_head: UperHead,
    auxiliary_head: Option<FcnHead>,
}

impl BeitForSemanticSegmentation {
    /// The model over `vars`; `gemm`: the precision of the head's GEMM inputs on the CPU (bf16:
    /// the engine's mixed precision over f32 tensors).
    pub fn new(
        cfg: &SegmenterConfig,
        p: &SegmenterParams,
        vars: &Vars,
        device: &Device,
        gemm: Precision,
    ) -> Result<Self> {
        let q = &p.head.pyramid;
        Ok(Self {
            beit: BeitModel::new(&cfg.model, &p.backbone, vars, device, gemm)?,
            depths: cfg.feature_depths(),
            grid: cfg.model.grid(),
            pyramid: Pyramid {
                fpn1_up: Upsample::new(&q.fpn1_up, vars, gemm),
                fpn1_bn: BatchNorm::new(&q.fpn1_bn, vars),
                fpn1_up2: Upsample::new(&q.fpn1_up2, vars, gemm),
                fpn2_up: Upsample::new(&q.fpn2_up, vars, gemm),
            },
            decode_head: UperHead::new(&p.head.decode_head, vars, gemm),
            auxiliary_head: p.head.auxiliary_head.as_ref().map(|a| FcnHead::new(a, vars, gemm)),
        })
    }

    pub fn backbone(&self) -> &BeitModel {
        &self.beit
    }

    /// The four feature maps [B, h, w, D] the head reads ([CLS] dropped).
    pub fn features(&self, pixels: &Tensor, draws: Option<Draws>) -> Result<[Tensor; 4]> {
        let b = pixels.dim(0)?;
        let (h, w) = self.grid;
        let states = self.beit.hidden_states(pixels, draws, &self.depths)?;
        let map = |s: &Tensor| -> Result<Tensor> {
            let d = s.dim(2)?;
            s.narrow(1, 1, h * w)?.reshape((b, h, w, d))
        };
        Ok([map(&states[0])?, map(&states[1])?, map(&states[2])?, map(&states[3])?])
    }

    /// Logits in training (`norms` in training mode, `draws` for stochastic depth) or
    /// evaluation.
    pub fn forward(&self, pixels: &Tensor, draws: Option<Draws>, norms: &mut Norms) -> Result<SegmentationLogits> {
        let features = self.pyramid.forward(self.features(pixels, draws)?, norms)?;
        let logits = self.decode_head.forward(&features, norms)?;
        let auxiliary = match &self.auxiliary_head {
            Some(head) => Some(head.forward(&features, norms)?),
            None => None,
        };
        Ok(SegmentationLogits { logits, auxiliary })
    }
}

/// Per-pixel labels [B, H, W] and the pixels the loss reads (label != ignore index).
pub struct PixelLabels {
    pub dims: (usize, usize, usize),
    /// All labels [B, H, W], the ignore index included.
    pub labels: Tensor,
    pub ignore: u32,
    /// Flat pixel indices (b, y, x) of the labelled pixels.
    pub index: Tensor,
    /// Their labels.
    pub targets: Tensor,
    pub count: usize,
}

impl PixelLabels {
    /// Labels must be < `num_labels` or the ignore index; the error names the first that is not.
    pub fn new(
        labels: &[u32],
        dims: (usize, usize, usize),
        num_labels: usize,
        ignore: u32,
        device: &Device,
    ) -> crate::Result<Self> {
        let (b, h, w) = dims;
        if labels.len() != b * h * w {
            return Err(crate::Error::Input(format!(
                "labels have {} values, expected {b} x {h} x {w} = {}",
                labels.len(),
                b * h * w
            )));
        }
        let mut index = Vec::new();
        let mut targets = Vec::new();
        for (i, &label) in labels.iter().enumerate() {
            if label == ignore {
                continue;
            }
            if label as usize >= num_labels {
                let (image, y, x) = (i / (h * w), i % (h * w) / w, i % w);
                return Err(crate::Error::Input(format!(
                    "image {image}, pixel (y {y}, x {x}): label {label} is not a class id (numLabels {num_labels}) \
                     nor the ignore index {ignore}"
                )));
            }
            index.push(i as u32);
            targets.push(label);
        }
        let count = index.len();
        Ok(Self {
            dims,
            labels: Tensor::from_slice(labels, dims, device)?,
            ignore,
            index: Tensor::from_vec(index, count, device)?,
            targets: Tensor::from_vec(targets, count, device)?,
            count,
        })
    }
}

/// The summed cross-entropy of `logits` [B, h, w, K], resized bilinearly to the labels' size,
/// over the labelled pixels (0 when there are none, with the graph kept: a synchronised
/// replica's backward pass must reach its BatchNorms' collectives).
pub fn summed_pixel_loss(logits: &Tensor, labels: &PixelLabels) -> Result<Tensor> {
    ops::resized_cross_entropy(&at_least_f32(logits)?, &labels.labels, labels.ignore)?.sum_all()
}

/// transformers' loss summed over the labelled pixels: main + weight x auxiliary. Divided by
/// `labels.count` it is transformers' (mean over labelled pixels).
pub fn summed_segmentation_loss(
    out: &SegmentationLogits,
    labels: &PixelLabels,
    auxiliary_weight: f64,
) -> Result<Tensor> {
    let main = summed_pixel_loss(&out.logits, labels)?;
    match &out.auxiliary {
        Some(aux) => main + summed_pixel_loss(aux, labels)?.affine(auxiliary_weight, 0.0)?,
        None => Ok(main),
    }
}

/// Per-pixel class ids [B, H, W] (u32): the argmax of `logits` [B, h, w, K] resized bilinearly
/// to (H, W), as transformers' post-processing does.
pub fn pixel_classes(logits: &Tensor, size: (usize, usize)) -> Result<Tensor> {
    ops::resized_argmax(&at_least_f32(logits)?, size)
}

/// How many labelled pixels the main logits classify right.
pub fn pixel_hits(logits: &Tensor, labels: &PixelLabels) -> Result<usize> {
    if labels.count == 0 {
        return Ok(0);
    }
    let (_, h, w) = labels.dims;
    let classes = pixel_classes(logits, (h, w))?.flatten_all()?.index_select(&labels.index, 0)?;
    let hits = classes.eq(&labels.targets)?.to_dtype(candle_core::DType::F32)?.sum_all()?;
    Ok(hits.to_scalar::<f32>()? as usize)
}
