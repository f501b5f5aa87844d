//! Semantic segmentation on a BEiT backbone (transformers' `BeitForSemanticSegmentation`):
//! fine-tuning with layer-wise learning-rate decay and stochastic depth, BatchNorm running
//! statistics updated by every training forward (buffers of the table, so checkpoints, moves
//! and exports carry them), per-pixel predictions. Steps run on candle's autograd on every
//! device; on the CPU its convolutions and BatchNorm are the engine's kernels, and bf16 there
//! means f32 activations with the linear layers' and the head's GEMMs in bf16 (the engine's
//! mixed precision).
//! Data-parallel, the BatchNorms are synchronised across ranks (SyncBatchNorm).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::arch::segmentation::{BatchNormParams, SegmenterParams};
use crate::checkpoint;
use crate::config::{Precision, SegmenterConfig};
use crate::distributed::ReplicaSum;
use crate::engine::on_pool;
use crate::error::{Error, Result};
use crate::hf::{self, HfCheckpoint};
use crate::model::segmentation::{
    pixel_classes, pixel_hits, summed_segmentation_loss, update_running_stats, BeitForSemanticSegmentation, Norms,
    PixelLabels,
};
use crate::ops::{resample, Resampling};
use crate::optimizer::{check_lr, AdamWConfig};
use crate::params::{ParamTable, Source};
use crate::rng::Draws;
use crate::runner::{CandleRunner, Runner, RunnerSpec};
use crate::trainer::{backbone_of, check_pixels, f32_values, Images, Kind, Trainer, UpdateMetrics};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct SegmenterTrainingOptions {
    /// Layer-wise LR decay (unilm's, as for classification; BEiT-B on ADE20K: 0.65). 1 disables.
    pub layer_decay: f64,
}

impl Default for SegmenterTrainingOptions {
    fn default() -> Self {
        Self { layer_decay: 1.0 }
    }
}

impl SegmenterTrainingOptions {
    pub fn validate(&self) -> Result<()> {
        if !(self.layer_decay > 0.0 && self.layer_decay <= 1.0) {
            return Err(Error::Config(format!("layerDecay must be in (0, 1], got {}", self.layer_decay)));
        }
        Ok(())
    }
}

/// What `loss_and_grads` reports.
#[derive(Debug, Clone, Copy)]
pub struct SegmenterLossMetrics {
    /// transformers' loss: mean cross-entropy over the labelled pixels, main head plus the
    /// auxiliary head's times its weight (0 when no pixel is labelled).
    pub loss: f64,
    /// Share of the labelled pixels the main head classifies right.
    pub pixel_accuracy: f64,
    /// Pixels whose label is not the ignore index: the loss terms this batch adds.
    pub labelled_pixels: u64,
}

/// What a whole step reports.
#[derive(Debug, Clone, Copy)]
pub struct SegmenterStepMetrics {
    pub loss: f64,
    pub pixel_accuracy: f64,
    pub labelled_pixels: u64,
    pub grad_norm: f64,
}

/// The segmenter's kind: BEiT + UperNet, fine-tuned with `SegmenterTrainingOptions`.
pub struct Segmentation;

pub type SegmenterTrainer = Trainer<Segmentation>;

impl Kind for Segmentation {
    type Config = SegmenterConfig;
    type Options = SegmenterTrainingOptions;
    type Runner = dyn SegmenterRunner;
    const FORMAT: &'static str = "beit-seg/1";
    const WHAT: &'static str = "a BEiT segmenter checkpoint";

    fn config_json(config: &SegmenterConfig) -> String {
        config.to_json()
    }

    fn parse_config(json: &str) -> Result<SegmenterConfig> {
        SegmenterConfig::from_json(json)
    }

    fn validate(config: &SegmenterConfig, options: &SegmenterTrainingOptions) -> Result<()> {
        config.validate()?;
        options.validate()
    }

    fn table(config: &SegmenterConfig) -> ParamTable {
        SegmenterParams::new(config).0
    }

    fn lr_scales(config: &SegmenterConfig, options: &SegmenterTrainingOptions, table: &ParamTable) -> Vec<f64> {
        table.layer_decay_scales(config.model.num_hidden_layers, options.layer_decay)
    }

    fn runner(
        config: &SegmenterConfig,
        _: &SegmenterTrainingOptions,
        spec: &RunnerSpec,
        values: Vec<Tensor>,
        ema: Option<Vec<Tensor>>,
    ) -> Result<Box<dyn SegmenterRunner>> {
        let (_, params) = SegmenterParams::new(config);
        // bf16 on the CPU engine: f32 activations, the linear layers' and the head's GEMMs in
        // bf16 (the engine's mixed precision); elsewhere the activations are in the placement's precision.
        let placement = spec.placement;
        let (gemm, activations) = match placement.precision {
            Precision::Bf16 if placement.uses_engine() => (Precision::Bf16, Precision::F32),
            precision => (Precision::F32, precision),
        };
        let new = |vars: &_, device: &_| {
            Ok(Segmenter {
                model: BeitForSemanticSegmentation::new(config, &params, vars, device, gemm)?,
                activations,
                norms: params.norms.clone(),
                config: config.clone(),
            })
        };
        Ok(Box::new(CandleRunner::new(spec, values, ema, new)?))
    }
}

/// The candle model with what its steps need besides: the BatchNorms whose buffers a training
/// forward moves, and the loss settings.
pub struct Segmenter {
    model: BeitForSemanticSegmentation,
    /// The dtype the pixels enter in.
    activations: Precision,
    norms: Vec<BatchNormParams>,
    config: SegmenterConfig,
}

/// The segmenter's operations on a runner.
pub trait SegmenterRunner: Runner {
    /// Adds the gradient of the summed per-pixel loss and moves the BatchNorm statistics: the
    /// batch's, or with `replicas` every replica's batch's (SyncBatchNorm).
    fn loss_and_grads(
        &mut self,
        images: Images,
        labels: &[u32],
        draws: Draws,
        replicas: Option<Arc<dyn ReplicaSum>>,
    ) -> Result<SegmenterLossMetrics>;
    /// Class ids [B, H, W] at the input's size (evaluation mode).
    fn predict(&mut self, images: Images) -> Result<Vec<u32>>;
    /// Main-head logits [B, K, h, w] (NCHW, transformers' layout) at the head's resolution.
    fn logits(&mut self, images: Images) -> Result<(Vec<f32>, [usize; 4])>;
}

impl SegmenterRunner for CandleRunner<Segmenter> {
    fn loss_and_grads(
        &mut self,
        images: Images,
        labels: &[u32],
        draws: Draws,
        replicas: Option<Arc<dyn ReplicaSum>>,
    ) -> Result<SegmenterLossMetrics> {
        // On a pool thread, as the engine's steps (see `on_pool`); not while synchronised
        // BatchNorms wait for other replicas inside the step.
        if replicas.is_none() && self.device.is_cpu() {
            return on_pool(|| self.run_loss_and_grads(images, labels, draws, None));
        }
        self.run_loss_and_grads(images, labels, draws, replicas)
    }

    fn predict(&mut self, images: Images) -> Result<Vec<u32>> {
        let [_, _, h, w] = images.shape;
        let out = self.forward_eval(images)?;
        Ok(pixel_classes(&out, (h, w))?.flatten_all()?.to_vec1::<u32>()?)
    }

    fn logits(&mut self, images: Images) -> Result<(Vec<f32>, [usize; 4])> {
        let out = self.forward_eval(images)?;
        let (b, h, w, k) = out.dims4()?;
        Ok((f32_values(&out.permute((0, 3, 1, 2))?)?, [b, k, h, w]))
    }
}

impl CandleRunner<Segmenter> {
    /// [`SegmenterRunner::loss_and_grads`] on the calling thread.
    fn run_loss_and_grads(
        &mut self,
        images: Images,
        labels: &[u32],
        draws: Draws,
        replicas: Option<Arc<dyn ReplicaSum>>,
    ) -> Result<SegmenterLossMetrics> {
        let cfg = &self.model.config;
        let [b, _, h, w] = images.shape;
        let labels = PixelLabels::new(labels, (b, h, w), cfg.num_labels, cfg.semantic_loss_ignore_index, &self.device)?;
        let pixels = images.tensor(&self.device, self.model.activations)?;
        let count = self.model.norms.len();
        // Synchronised BatchNorms sum gradients across replicas in the backward pass too, so
        // every replica runs one, even with nothing labelled (its loss is then 0).
        let backward_always = replicas.is_some();
        let mut norms = match replicas {
            Some(replicas) => Norms::synchronised(count, replicas),
            None => Norms::new(count, true),
        };
        let out = self.model.model.forward(&pixels, Some(draws), &mut norms)?;
        let rows = labels.count;
        let (loss, hits) = if rows == 0 && !backward_always {
            // Nothing labelled: no gradient, no loss term (the statistics still move, as in
            // PyTorch); the update it belongs to applies what its other batches add, or nothing.
            self.add_no_terms()?;
            (0.0, 0)
        } else {
            let summed = summed_segmentation_loss(&out, &labels, cfg.auxiliary_loss_weight)?;
            let hits = pixel_hits(&out.logits, &labels)?;
            (self.backward(&summed.affine(1.0 / rows.max(1) as f64, 0.0)?, rows)?, hits)
        };
        update_running_stats(&self.model.norms, &self.vars, &norms.seen)?;
        let pixel_accuracy = if rows == 0 { 0.0 } else { hits as f64 / rows as f64 };
        Ok(SegmenterLossMetrics { loss, pixel_accuracy, labelled_pixels: rows as u64 })
    }

    /// Main-head logits [B, h, w, K] in evaluation mode (running statistics, no stochastic depth).
    fn forward_eval(&self, images: Images) -> Result<Tensor> {
        let pixels = images.tensor(&self.device, self.model.activations)?;
        let mut norms = Norms::new(self.model.norms.len(), false);
        Ok(self.model.model.forward(&pixels, None, &mut norms)?.logits)
    }
}

impl Trainer<Segmentation> {
    pub fn new(
        config: SegmenterConfig,
        optim: AdamWConfig,
        training: SegmenterTrainingOptions,
        seed: u64,
    ) -> Result<Self> {
        Self::build(config, training, optim, Source::Init(seed), None)
    }

    /// Starts from the backbone of a beit MIM or classifier checkpoint: its `beit.*` tensors
    /// (not the mask token, pooler or final norm), the relative position tables (and absolute
    /// positions) resized when `config.model.image_size` differs from the file's; the head and
    /// its BatchNorm statistics are initialised from `seed`. The rest of `config.model` must
    /// match the checkpoint's shapes (drop path may differ).
    pub fn from_pretrained(
        path: &Path,
        config: SegmenterConfig,
        optim: AdamWConfig,
        training: SegmenterTrainingOptions,
        seed: u64,
    ) -> Result<Self> {
        let mut file = checkpoint::load(path)?;
        let (_, saved) = backbone_of(&file.metadata, path)?;
        let in_file = |e: Error| Error::Checkpoint(format!("{}: {e}", path.display()));
        file.tensors.retain(|name, _| {
            name.starts_with("beit.")
                && name != "beit.embeddings.mask_token"
                && !name.starts_with("beit.pooler.")
                && !name.starts_with("beit.layernorm.")
        });
        hf::fit_backbone(&mut file.tensors, &saved, &config.model, "the segmenter's model").map_err(in_file)?;
        let table = Segmentation::table(&config);
        let head: HashSet<_> = table.ids().filter(|id| !table.get(*id).name.starts_with("beit.")).collect();
        let source = Source::Tensors { tensors: file.tensors, init: Some((seed, head)) };
        Self::build(config, training, optim, source, None).map_err(in_file)
    }

    /// A transformers `BeitForSemanticSegmentation` checkpoint, head and statistics included.
    pub fn from_hf(ckpt: HfCheckpoint, optim: AdamWConfig, training: SegmenterTrainingOptions) -> Result<Self> {
        let Some(config) = ckpt.segmenter else {
            return Err(Error::Checkpoint(format!(
                "a {} checkpoint has no segmentation head: start from it with fromPretrained on a beit \
                 checkpoint, or read a BeitForSemanticSegmentation folder",
                ckpt.layout.architecture()
            )));
        };
        Self::build(config, training, optim, Source::tensors(ckpt.tensors), None)
    }

    /// Writes a transformers `BeitForSemanticSegmentation` folder (`id2label` from the config's
    /// class names, else LABEL_i).
    pub fn export_hf(&self, dir: &Path) -> Result<()> {
        let labels = self.config.label_names();
        hf::write_segmenter(dir, &self.config, &labels, &self.weights()?)
    }

    /// Adds the gradient of the batch's summed per-pixel loss to the gradient buffer and moves
    /// the BatchNorm running statistics. `labels` [B, H, W]: class ids or the ignore index.
    /// After [`Trainer::distribute`] the BatchNorms are synchronised: their statistics are
    /// every rank's batch's (every rank must call this for each of its batches).
    pub fn loss_and_grads(&mut self, pixels: &[f32], labels: &[u32], draws: Draws) -> Result<SegmenterLossMetrics> {
        let replicas = self.communicator().map(|c| c as Arc<dyn ReplicaSum>);
        self.replica_loss_and_grads(pixels, labels, draws, replicas)
    }

    /// [`Self::loss_and_grads`] as one of the replicas `replicas` sums over (the communicator
    /// after `distribute`; replicas in threads of one process in tests), or alone with None.
    pub fn replica_loss_and_grads(
        &mut self,
        pixels: &[f32],
        labels: &[u32],
        draws: Draws,
        replicas: Option<Arc<dyn ReplicaSum>>,
    ) -> Result<SegmenterLossMetrics> {
        let images = check_pixels(&self.config.model, pixels)?;
        self.runner.loss_and_grads(images, labels, draws, replicas)
    }

    /// One optimisation step: [`Self::loss_and_grads`] then [`Trainer::apply_update`].
    pub fn train_step(&mut self, pixels: &[f32], labels: &[u32], lr: f64, seed: u64) -> Result<SegmenterStepMetrics> {
        check_lr(lr)?;
        let l = self.loss_and_grads(pixels, labels, Draws { seed, first_sample: 0 })?;
        let UpdateMetrics { grad_norm, .. } = self.apply_update(lr)?;
        Ok(SegmenterStepMetrics {
            loss: l.loss,
            pixel_accuracy: l.pixel_accuracy,
            labelled_pixels: l.labelled_pixels,
            grad_norm,
        })
    }

    /// Class ids [B, H, W] at the input's size.
    pub fn predict(&mut self, pixels: &[f32]) -> Result<Vec<u32>> {
        let images = check_pixels(&self.config.model, pixels)?;
        self.runner.predict(images)
    }

    /// Main-head logits [B, K, h, w] and their shape.
    pub fn logits(&mut self, pixels: &[f32]) -> Result<(Vec<f32>, [usize; 4])> {
        let images = check_pixels(&self.config.model, pixels)?;
        self.runner.logits(images)
    }

    /// One image [C, H, W] of any size, by mmseg's sliding window ("slide" mode): windows of
    /// the input size every `stride` pixels (the last flush with the far edge; an image smaller
    /// than the window is padded with zeros), each window's logits resized bilinearly to the
    /// window, overlaps averaged, the average resized bilinearly to `out` ([height, width], e.g.
    /// the original size of an image that was rescaled), then class ids [out] and, when asked,
    /// softmax probabilities [K, out].
    pub fn segment(
        &mut self,
        image: &[f32],
        size: [usize; 2],
        stride: [usize; 2],
        out: [usize; 2],
        probabilities: bool,
    ) -> Result<SegmentedImage> {
        let model = &self.config.model;
        let (c, [ch, cw], k) = (model.num_channels, model.image_size, self.config.num_labels);
        let [h, w] = size;
        let values = c.checked_mul(h).and_then(|v| v.checked_mul(w));
        if h == 0 || w == 0 || out.contains(&0) || values != Some(image.len()) {
            return Err(Error::Input(format!(
                "segment: expected a {c}-channel image of a positive size ({c}*{h}*{w} = {} values) and a positive \
                 output size, got {} values and output {out:?}",
                values.map_or("too many".to_string(), |v| v.to_string()),
                image.len()
            )));
        }
        // The output's logits (and probabilities) are k values a pixel: refused before allocating.
        const MAX_OUTPUT_VALUES: usize = 1 << 31;
        if out[0].checked_mul(out[1]).and_then(|p| p.checked_mul(k)).is_none_or(|v| v > MAX_OUTPUT_VALUES) {
            return Err(Error::Input(format!(
                "segment: outputSize {out:?} x {k} classes exceeds {MAX_OUTPUT_VALUES} values"
            )));
        }
        if let Some(i) = image.iter().position(|v| !v.is_finite()) {
            return Err(Error::Input(format!("segment: pixel value {} at index {i} is not finite", image[i])));
        }
        if stride[0] == 0 || stride[1] == 0 || stride[0] > ch || stride[1] > cw {
            return Err(Error::Input(format!(
                "segment: stride {stride:?} must be positive and at most the window {:?} (the input size)",
                [ch, cw]
            )));
        }
        let starts = |n: usize, crop: usize, step: usize| -> Vec<(usize, usize)> {
            let grids = if n > crop { (n - crop).div_ceil(step) + 1 } else { 1 };
            (0..grids)
                .map(|i| {
                    let end = (i * step + crop).min(n);
                    (end.saturating_sub(crop), end)
                })
                .collect()
        };
        let windows: Vec<((usize, usize), (usize, usize))> = starts(h, ch, stride[0])
            .into_iter()
            .flat_map(|rows| starts(w, cw, stride[1]).into_iter().map(move |cols| (rows, cols)))
            .collect();
        let mut sum = vec![0f32; h * w * k];
        let mut count = vec![0u32; h * w];
        for chunk in windows.chunks(SLIDE_BATCH) {
            let mut batch = vec![0f32; chunk.len() * c * ch * cw];
            for (j, &((y0, y1), (x0, x1))) in chunk.iter().enumerate() {
                for plane in 0..c {
                    for y in y0..y1 {
                        let src = &image[(plane * h + y) * w + x0..(plane * h + y) * w + x1];
                        let at = ((j * c + plane) * ch + y - y0) * cw;
                        batch[at..at + x1 - x0].copy_from_slice(src);
                    }
                }
            }
            let (logits, [n, _, lh, lw]) =
                self.runner.logits(Images { values: &batch, shape: [chunk.len(), c, ch, cw] })?;
            // NCHW at the head's resolution -> NHWC at the window's.
            let logits = Tensor::from_vec(logits, (n, k, lh, lw), &candle_core::Device::Cpu)?.permute((0, 2, 3, 1))?;
            let up = resample(&logits.contiguous()?, Resampling::Bilinear, (ch, cw))?;
            let up = up.flatten_all()?.to_vec1::<f32>()?;
            for (j, &((y0, y1), (x0, x1))) in chunk.iter().enumerate() {
                for y in y0..y1 {
                    for x in x0..x1 {
                        let src = ((j * ch + y - y0) * cw + x - x0) * k;
                        let dst = (y * w + x) * k;
                        for (s, v) in sum[dst..dst + k].iter_mut().zip(&up[src..src + k]) {
                            *s += v;
                        }
                        count[y * w + x] += 1;
                    }
                }
            }
        }
        for (pixel, n) in count.iter().enumerate() {
            sum[pixel * k..(pixel + 1) * k].iter_mut().for_each(|v| *v /= *n as f32);
        }
        let average = Tensor::from_vec(sum, (1, h, w, k), &candle_core::Device::Cpu)?;
        let resized = resample(&average, Resampling::Bilinear, (out[0], out[1]))?.flatten_all()?.to_vec1::<f32>()?;
        let pixels = out[0] * out[1];
        let mut classes = Vec::with_capacity(pixels);
        let mut probs = if probabilities { vec![0f32; k * pixels] } else { vec![] };
        for (pixel, row) in resized.chunks_exact(k).enumerate() {
            let (best, max) =
                row.iter().enumerate().fold((0, f32::NEG_INFINITY), |a, (i, &v)| if v > a.1 { (i, v) } else { a });
            classes.push(best as u32);
            if probabilities {
                let total: f32 = row.iter().map(|v| (v - max).exp()).sum();
                for (class, v) in row.iter().enumerate() {
                    probs[class * pixels + pixel] = (v - max).exp() / total;
                }
            }
        }
        Ok(SegmentedImage { classes, probabilities: probabilities.then_some(probs) })
    }
}

/// Windows per forward in [`SegmenterTrainer::segment`].
const SLIDE_BATCH: usize = 8;

/// What [`SegmenterTrainer::segment`] returns.
pub struct SegmentedImage {
    /// Class ids [H, W].
    pub classes: Vec<u32>,
    /// Softmax probabilities [K, H, W], when asked for.
    pub probabilities: Option<Vec<f32>>,
}
