//! Model configuration. Field names follow Hugging Face's `BeitConfig` (in camelCase) so that
//! configs map one to one onto transformers checkpoints. Also the precision a model runs in (a
//! leaf, so that the CPU engine can read it).

use candle_core::DType;
use serde::{de::DeserializeOwned, Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};

/// Parses JSON into a config type; an error names the field and what it takes (never a JSON
/// line and column): `invalid model config: imageSize: ...`.
pub fn parse_json<T: DeserializeOwned>(what: &str, json: &str) -> Result<T> {
    serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(json)).map_err(|e| {
        let message = e.inner().to_string();
        let message = message.rsplit_once(" at line ").map_or(message.as_str(), |(m, _)| m);
        let message = message.replace("expected usize", "expected a whole number >= 0");
        match e.path().to_string().as_str() {
            "." => Error::Config(format!("invalid {what}: {message}")),
            path => Error::Config(format!("invalid {what}: {path}: {message}")),
        }
    })
}

/// An image size: a number of pixels for a square image, or [height, width].
pub(crate) fn square_or_pair<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<[usize; 2], D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Square(usize),
        Pair([usize; 2]),
    }
    match Size::deserialize(d) {
        Ok(Size::Square(n)) => Ok([n, n]),
        Ok(Size::Pair(pair)) => Ok(pair),
        Err(_) => Err(serde::de::Error::custom("expected a whole number of pixels or [height, width]")),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BeitConfig {
    /// Input size as [height, width] in pixels (one number: square); each a multiple of `patch_size`.
    #[serde(deserialize_with = "square_or_pair")]
    pub image_size: [usize; 2],
    pub patch_size: usize,
    /// 1 for grayscale, 3 for RGB.
    pub num_channels: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    /// Size of the visual-token vocabulary predicted by the MIM head.
    pub vocab_size: usize,
    /// LayerScale init value; 0 disables LayerScale (no lambda_1/lambda_2 parameters).
    pub layer_scale_init_value: f64,
    pub use_absolute_position_embeddings: bool,
    /// One relative position bias table shared by all layers (pretraining).
    pub use_shared_relative_position_bias: bool,
    /// One table per layer (fine-tuning). At most one of the two may be on.
    pub use_relative_position_bias: bool,
    /// Maximum stochastic-depth rate; layer i drops with rate i/(L-1) * drop_path_rate.
    pub drop_path_rate: f64,
    pub layer_norm_eps: f64,
    pub initializer_range: f64,
}

impl BeitConfig {
    pub fn grid(&self) -> (usize, usize) {
        (self.image_size[0] / self.patch_size, self.image_size[1] / self.patch_size)
    }

    pub fn num_patches(&self) -> usize {
        let (h, w) = self.grid();
        h * w
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(Error::Config(msg));
        let positive = [
            ("patchSize", self.patch_size),
            ("numChannels", self.num_channels),
            ("hiddenSize", self.hidden_size),
            ("numHiddenLayers", self.num_hidden_layers),
            ("numAttentionHeads", self.num_attention_heads),
            ("intermediateSize", self.intermediate_size),
            ("vocabSize", self.vocab_size),
        ];
        for (name, value) in positive {
            if value == 0 {
                return fail(format!("{name} must be positive, got 0"));
            }
        }
        for (axis, size) in ["height", "width"].iter().zip(self.image_size) {
            if size == 0 || size % self.patch_size != 0 {
                return fail(format!(
                    "imageSize {axis} {size} must be a positive multiple of patchSize {}",
                    self.patch_size
                ));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return fail(format!(
                "hiddenSize {} must be divisible by numAttentionHeads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.use_shared_relative_position_bias && self.use_relative_position_bias {
            return fail(
                "useSharedRelativePositionBias and useRelativePositionBias are exclusive: \
                 expected at most one of them to be true"
                    .into(),
            );
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            return fail(format!("dropPathRate must be in [0, 1), got {}", self.drop_path_rate));
        }
        if !(self.layer_norm_eps > 0.0) {
            return fail(format!("layerNormEps must be positive, got {}", self.layer_norm_eps));
        }
        if !(self.initializer_range > 0.0) {
            return fail(format!("initializerRange must be positive, got {}", self.initializer_range));
        }
        if !(self.layer_scale_init_value >= 0.0) {
            return fail(format!("layerScaleInitValue must be >= 0, got {}", self.layer_scale_init_value));
        }
        Ok(())
    }

    pub fn from_json(json: &str) -> Result<Self> {
        let cfg: Self = parse_json("model config", json)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("config serialises")
    }
}

/// Class names (transformers' `id2label`), when given: one per label, each distinct (its
/// `label2id` maps a name back to its id) and non-empty.
fn check_class_names(names: Option<&[String]>, num_labels: usize) -> Result<()> {
    let Some(names) = names else { return Ok(()) };
    if names.len() != num_labels {
        return Err(Error::Config(format!(
            "classNames: expected one name per label ({num_labels}), got {}",
            names.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(name) = names.iter().find(|n| n.is_empty() || !seen.insert(n.as_str())) {
        return Err(Error::Config(format!("classNames: {name:?} is empty or named twice")));
    }
    Ok(())
}

/// Class names for `id2label`: the given ones, else transformers' default LABEL_i.
fn label_names(names: Option<&[String]>, num_labels: usize) -> Vec<String> {
    names.map_or_else(|| (0..num_labels).map(|i| format!("LABEL_{i}")).collect(), <[String]>::to_vec)
}

/// `names` as a config's class names: None where they are transformers' defaults (LABEL_i) or
/// could not name the classes (a repeated or empty name).
pub fn given_class_names(names: Vec<String>) -> Option<Vec<String>> {
    let defaults = names.iter().enumerate().all(|(i, name)| *name == format!("LABEL_{i}"));
    (!defaults && check_class_names(Some(&names), names.len()).is_ok()).then_some(names)
}

/// How the classifier pools the backbone's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean of the patch tokens, then LayerNorm (BEiT's fine-tuning default).
    Mean,
    /// The [CLS] token after the final LayerNorm.
    Cls,
}

/// A BEiT backbone with a classification head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClassifierConfig {
    pub model: BeitConfig,
    pub num_labels: usize,
    pub pooling: Pooling,
    /// The classes' names by label id (transformers' `id2label`); absent, they are LABEL_i.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_names: Option<Vec<String>>,
}

impl ClassifierConfig {
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        if self.num_labels < 2 {
            return Err(Error::Config(format!("numLabels must be at least 2, got {}", self.num_labels)));
        }
        check_class_names(self.class_names.as_deref(), self.num_labels)
    }

    /// The classes' names: the config's, else transformers' default LABEL_i.
    pub fn label_names(&self) -> Vec<String> {
        label_names(self.class_names.as_deref(), self.num_labels)
    }

    pub fn from_json(json: &str) -> Result<Self> {
        let cfg: Self = parse_json("classifier config", json)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("config serialises")
    }
}

/// The DALL-E style dVAE tokenizer.
/// `outIndices` of the published segmentation models, by backbone depth.
const PUBLISHED_OUT_INDICES: [(usize, [usize; 4]); 2] = [(12, [3, 5, 7, 11]), (24, [7, 11, 15, 23])];

/// BEiT with UperNet for semantic segmentation (Hugging Face's `BeitForSemanticSegmentation`),
/// field for field as transformers' `BeitConfig` spells the segmentation options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SegmenterConfig {
    pub model: BeitConfig,
    pub num_labels: usize,
    /// transformers' rule: feature k is hidden state `outIndices[k] - 1` (0 = the embeddings,
    /// i = after i blocks), so the deepest block a feature can come from is the second last.
    /// unilm counts one block later; checkpoints in and out are transformers', so beit follows
    /// transformers (blocks past the deepest feature are kept but not run).
    pub out_indices: [usize; 4],
    /// Pyramid pooling output sizes of the UperHead's PSP module.
    pub pool_scales: Vec<usize>,
    pub use_auxiliary_head: bool,
    pub auxiliary_channels: usize,
    pub auxiliary_num_convs: usize,
    pub auxiliary_concat_input: bool,
    pub auxiliary_loss_weight: f64,
    /// Label of pixels the loss and the metrics skip.
    pub semantic_loss_ignore_index: u32,
    /// The classes' names by label id (transformers' `id2label`); absent, they are LABEL_i.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_names: Option<Vec<String>>,
}

impl SegmenterConfig {
    /// transformers' defaults for the head around `model`. The features come from the
    /// published stages for BEiT-B and BEiT-L depths (transformers' ADE20K configs), else from
    /// four stages spread evenly up to the last (L = 4: [1, 2, 3, 4]).
    pub fn new(model: BeitConfig, num_labels: usize) -> Self {
        let l = model.num_hidden_layers;
        let out_indices = match PUBLISHED_OUT_INDICES.iter().find(|(depth, _)| *depth == l) {
            Some((_, stages)) => *stages,
            None => [1, 2, 3, 4].map(|k| (k * l + 2) / 4),
        };
        Self {
            model,
            num_labels,
            out_indices,
            pool_scales: vec![1, 2, 3, 6],
            use_auxiliary_head: true,
            auxiliary_channels: 256,
            auxiliary_num_convs: 1,
            auxiliary_concat_input: false,
            auxiliary_loss_weight: 0.4,
            semantic_loss_ignore_index: 255,
            class_names: None,
        }
    }

    /// The classes' names: the config's, else transformers' default LABEL_i.
    pub fn label_names(&self) -> Vec<String> {
        label_names(self.class_names.as_deref(), self.num_labels)
    }

    /// The hidden-state depths (blocks run) the four features are read at.
    pub fn feature_depths(&self) -> [usize; 4] {
        self.out_indices.map(|i| i - 1)
    }

    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let fail = |msg: String| Err(Error::Config(msg));
        if self.num_labels < 2 {
            return fail(format!("numLabels must be at least 2, got {}", self.num_labels));
        }
        let l = self.model.num_hidden_layers;
        if let Some(i) = self.out_indices.iter().find(|&&i| i == 0 || i > l) {
            return fail(format!(
                "outIndices {:?}: {i} is out of range, expected values in 1..={l} (numHiddenLayers)",
                self.out_indices
            ));
        }
        if self.out_indices.windows(2).any(|w| w[0] >= w[1]) {
            return fail(format!(
                "outIndices {:?} must be strictly increasing (as transformers requires)",
                self.out_indices
            ));
        }
        let (gh, gw) = self.model.grid();
        if gh % 2 != 0 || gw % 2 != 0 {
            return fail(format!(
                "the patch grid {gh}x{gw} (imageSize / patchSize) must be even in both directions: the feature \
                 pyramid's 2x2 max pool halves it"
            ));
        }
        if self.pool_scales.is_empty() || self.pool_scales.contains(&0) {
            return fail(format!("poolScales must be positive sizes, got {:?}", self.pool_scales));
        }
        if self.use_auxiliary_head && self.auxiliary_channels == 0 {
            return fail("auxiliaryChannels must be positive when useAuxiliaryHead is true, got 0".into());
        }
        if self.use_auxiliary_head && self.auxiliary_num_convs == 0 {
            // transformers' classifier would then read hiddenSize channels as auxiliaryChannels.
            return fail("auxiliaryNumConvs must be at least 1 when useAuxiliaryHead is true, got 0".into());
        }
        if !(self.auxiliary_loss_weight >= 0.0) {
            return fail(format!("auxiliaryLossWeight must be >= 0, got {}", self.auxiliary_loss_weight));
        }
        check_class_names(self.class_names.as_deref(), self.num_labels)?;
        if (self.semantic_loss_ignore_index as usize) < self.num_labels {
            return fail(format!(
                "semanticLossIgnoreIndex {} is a class id (numLabels {}): expected an id >= numLabels",
                self.semantic_loss_ignore_index, self.num_labels
            ));
        }
        Ok(())
    }

    pub fn from_json(json: &str) -> Result<Self> {
        let cfg: Self = parse_json("segmenter config", json)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("config serialises")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DvaeConfig {
    /// The input size [height, width] it is trained for: the default of the TS API. Any size
    /// divisible by the downsampling factor works when given explicitly. One number: square.
    #[serde(deserialize_with = "square_or_pair")]
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
    pub fn downsample(&self) -> usize {
        1 << (self.num_groups - 1)
    }

    pub fn validate(&self) -> Result<()> {
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
        if !self.hidden_size.is_multiple_of(4) {
            return Err(Error::Config(format!(
                "tokenizer hiddenSize must be a multiple of 4 (blocks narrow to a quarter), got {}",
                self.hidden_size
            )));
        }
        Ok(())
    }

    pub fn from_json(json: &str) -> Result<Self> {
        let cfg: Self = parse_json("tokenizer config", json)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("config serialises")
    }

    pub fn num_layers(&self) -> usize {
        self.num_groups * self.blocks_per_group
    }
}

/// The dVAE's reconstruction loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ReconLoss {
    /// DALL-E's logit-Laplace likelihood on mapped pixels.
    LogitLaplace,
    /// Squared error of sigmoid(mu) against the mapped pixels.
    Mse,
}

/// DALL-E's pixel map: [0, 1] -> [eps, 1 - eps], so the logit-Laplace support is never hit.
pub const LOGIT_LAPLACE_EPS: f64 = 0.1;

/// The activation precision of the forward and backward passes. Parameters, optimizer moments,
/// norms' and softmax' reductions and the losses stay f32 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 activations (TF32 matmuls on CUDA).
    #[default]
    F32,
    /// Mixed precision: bf16 activations and matmuls (tensor cores), f32 master weights.
    Bf16,
}

impl Precision {
    /// Parses "f32" or "bf16".
    pub fn parse(spec: &str) -> Result<Self> {
        match spec {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            _ => Err(Error::Config(format!("precision must be \"f32\" or \"bf16\", got {spec:?}"))),
        }
    }

    /// The spelling `parse` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }

    /// The dtype of the activations.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }
}
