//! Hugging Face transformers interop: BEiT checkpoint folders (`config.json` +
//! `model.safetensors`) in and out, with a resolution change on the way in.
//!
//! Our parameter names are the transformers keys of `BeitForMaskedImageModeling` and
//! `BeitForImageClassification`, so reading is: parse the config, tell the layout from the
//! keys, prefix a bare `BeitModel`'s keys with `beit.`, drop derived buffers, and resize the
//! position tables when a new image size is asked for.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::checkpoint;
use crate::config::{BeitConfig, Pooling, SegmenterConfig};
use crate::error::{Error, Result};
use crate::ops::interpolation_taps;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Which transformers class a checkpoint was saved from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfLayout {
    /// `BeitForMaskedImageModeling`: `beit.*`, `layernorm.*`, `lm_head.*`.
    MaskedImageModeling,
    /// `BeitModel`: the backbone alone, keys without the `beit.` prefix.
    Model,
    /// `BeitForImageClassification`: `beit.*` (with the pooler) and `classifier.*`.
    ImageClassification,
    /// `BeitForSemanticSegmentation`: `beit.*`, `fpn1.*`, `fpn2.*`, `decode_head.*` and
    /// `auxiliary_head.*`, BatchNorm running statistics among them.
    SemanticSegmentation,
}

impl HfLayout {
    pub fn architecture(self) -> &'static str {
        match self {
            HfLayout::MaskedImageModeling => "BeitForMaskedImageModeling",
            HfLayout::Model => "BeitModel",
            HfLayout::ImageClassification => "BeitForImageClassification",
            HfLayout::SemanticSegmentation => "BeitForSemanticSegmentation",
        }
    }
}

/// A transformers BEiT checkpoint read into our names.
pub struct HfCheckpoint {
    pub layout: HfLayout,
    pub config: BeitConfig,
    /// transformers' `use_mean_pooling`: mean pooling through `beit.pooler.layernorm`, else
    /// [CLS] through `beit.layernorm`.
    pub pooling: Pooling,
    /// Class names in label order (`id2label`), for classification checkpoints.
    pub labels: Vec<String>,
    /// The segmentation head's settings, for segmentation checkpoints.
    pub segmenter: Option<SegmenterConfig>,
    /// Tensors under our (= transformers' task-model) names, all with the `beit.` prefix.
    pub tensors: HashMap<String, Tensor>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Size {
    Square(usize),
    Pair(Vec<usize>),
}

impl Size {
    fn pair(&self, field: &str) -> Result<[usize; 2]> {
        match self {
            Size::Square(s) => Ok([*s, *s]),
            Size::Pair(v) if v.len() == 2 => Ok([v[0], v[1]]),
            Size::Pair(v) => {
                Err(Error::Config(format!("config.json: {field} must be a number or [height, width], got {v:?}")))
            }
        }
    }
}

/// The fields of transformers' `BeitConfig` we read, with its defaults. Other fields
/// (backbone outputs, dropout) do not affect these models and are ignored.
#[derive(Deserialize)]
#[serde(default)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    hidden_act: String,
    initializer_range: f64,
    layer_norm_eps: f64,
    image_size: Size,
    patch_size: Size,
    num_channels: usize,
    use_absolute_position_embeddings: bool,
    use_relative_position_bias: bool,
    use_shared_relative_position_bias: bool,
    layer_scale_init_value: f64,
    drop_path_rate: f64,
    use_mean_pooling: bool,
    id2label: Option<HashMap<String, String>>,
    // Segmentation fields: absent ones take SegmenterConfig::new's defaults (transformers').
    out_indices: Option<Vec<usize>>,
    pool_scales: Option<Vec<usize>>,
    use_auxiliary_head: Option<bool>,
    auxiliary_channels: Option<usize>,
    auxiliary_num_convs: Option<usize>,
    auxiliary_concat_input: Option<bool>,
    auxiliary_loss_weight: Option<f64>,
    semantic_loss_ignore_index: Option<i64>,
}

impl Default for HfConfig {
    fn default() -> Self {
        Self {
            model_type: None,
            vocab_size: 8192,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            image_size: Size::Square(224),
            patch_size: Size::Square(16),
            num_channels: 3,
            use_absolute_position_embeddings: false,
            use_relative_position_bias: false,
            use_shared_relative_position_bias: false,
            layer_scale_init_value: 0.1,
            drop_path_rate: 0.1,
            use_mean_pooling: true,
            id2label: None,
            out_indices: None,
            pool_scales: None,
            use_auxiliary_head: None,
            auxiliary_channels: None,
            auxiliary_num_convs: None,
            auxiliary_concat_input: None,
            auxiliary_loss_weight: None,
            semantic_loss_ignore_index: None,
        }
    }
}

/// What a config.json says: the backbone, the pooling, the class names and, for segmentation,
/// the head.
struct Parsed {
    config: BeitConfig,
    pooling: Pooling,
    labels: Vec<String>,
    hf: HfConfig,
}

fn parse_config(text: &str, path: &Path) -> Result<Parsed> {
    let mut hf: HfConfig = serde_json::from_str(text)
        .map_err(|e| Error::Config(format!("{}: not a transformers BeitConfig: {e}", path.display())))?;
    if let Some(t) = hf.model_type.as_deref() {
        if t != "beit" {
            return Err(Error::Config(format!("{}: model_type is {t:?}, expected \"beit\"", path.display())));
        }
    }
    if hf.hidden_act != "gelu" {
        return Err(Error::Config(format!(
            "{}: hidden_act is {:?}, expected \"gelu\" (the only activation of BEiT)",
            path.display(),
            hf.hidden_act
        )));
    }
    let [ph, pw] = hf.patch_size.pair("patch_size")?;
    if ph != pw {
        return Err(Error::Config(format!("{}: patch_size must be square, got [{ph}, {pw}]", path.display())));
    }
    let config = BeitConfig {
        image_size: hf.image_size.pair("image_size")?,
        patch_size: ph,
        num_channels: hf.num_channels,
        hidden_size: hf.hidden_size,
        num_hidden_layers: hf.num_hidden_layers,
        num_attention_heads: hf.num_attention_heads,
        intermediate_size: hf.intermediate_size,
        vocab_size: hf.vocab_size,
        layer_scale_init_value: hf.layer_scale_init_value,
        use_absolute_position_embeddings: hf.use_absolute_position_embeddings,
        use_shared_relative_position_bias: hf.use_shared_relative_position_bias,
        use_relative_position_bias: hf.use_relative_position_bias,
        drop_path_rate: hf.drop_path_rate,
        layer_norm_eps: hf.layer_norm_eps,
        initializer_range: hf.initializer_range,
    };
    config.validate().map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    let pooling = if hf.use_mean_pooling { Pooling::Mean } else { Pooling::Cls };
    let mut labels = Vec::new();
    if let Some(map) = hf.id2label.take() {
        let mut pairs = Vec::with_capacity(map.len());
        for (id, name) in map {
            let id: usize = id
                .parse()
                .map_err(|_| Error::Config(format!("{}: id2label key {id:?} is not a class index", path.display())))?;
            pairs.push((id, name));
        }
        pairs.sort();
        if pairs.iter().enumerate().any(|(i, (id, _))| *id != i) {
            return Err(Error::Config(format!(
                "{}: id2label must number the classes 0..{}",
                path.display(),
                pairs.len()
            )));
        }
        labels = pairs.into_iter().map(|(_, name)| name).collect();
    }
    Ok(Parsed { config, pooling, labels, hf })
}

/// The segmentation head of a `BeitForSemanticSegmentation` config.
fn segmenter_config(hf: &HfConfig, model: BeitConfig, labels: &[String], path: &Path) -> Result<SegmenterConfig> {
    let context = |e: Error| Error::Config(format!("{}: {e}", path.display()));
    let out_indices = match hf.out_indices.as_deref() {
        Some(&[a, b, c, d]) => [a, b, c, d],
        other => {
            return Err(context(Error::Config(format!(
                "out_indices must list 4 backbone stages for BeitForSemanticSegmentation, got {other:?}"
            ))))
        }
    };
    let d = SegmenterConfig::new(model, labels.len());
    let ignore = match hf.semantic_loss_ignore_index {
        None => d.semantic_loss_ignore_index,
        Some(i) => u32::try_from(i).map_err(|_| {
            context(Error::Config(format!(
                "semantic_loss_ignore_index {i} is not supported: expected a label id >= num_labels"
            )))
        })?,
    };
    let cfg = SegmenterConfig {
        out_indices,
        pool_scales: hf.pool_scales.clone().unwrap_or(d.pool_scales),
        use_auxiliary_head: hf.use_auxiliary_head.unwrap_or(d.use_auxiliary_head),
        auxiliary_channels: hf.auxiliary_channels.unwrap_or(d.auxiliary_channels),
        auxiliary_num_convs: hf.auxiliary_num_convs.unwrap_or(d.auxiliary_num_convs),
        auxiliary_concat_input: hf.auxiliary_concat_input.unwrap_or(d.auxiliary_concat_input),
        auxiliary_loss_weight: hf.auxiliary_loss_weight.unwrap_or(d.auxiliary_loss_weight),
        semantic_loss_ignore_index: ignore,
        class_names: crate::config::given_class_names(labels.to_vec()),
        ..d
    };
    cfg.validate().map_err(context)?;
    Ok(cfg)
}

/// Reads a transformers BEiT folder. With `image_size`, the relative position tables and the
/// absolute position embeddings are resized to the new patch grid (bilinear and bicubic, as
/// transformers' `interpolate_pos_encoding`), and the returned config has that size.
pub fn read(dir: &Path, image_size: Option<[usize; 2]>) -> Result<HfCheckpoint> {
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| Error::Io(std::io::Error::new(e.kind(), format!("cannot read {}: {e}", config_path.display()))))?;
    let Parsed { mut config, pooling, labels, hf } = parse_config(&text, &config_path)?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let file = checkpoint::load(&weights_path)?;
    let layout = if file.tensors.contains_key("lm_head.weight") {
        HfLayout::MaskedImageModeling
    } else if file.tensors.contains_key("decode_head.classifier.weight") {
        HfLayout::SemanticSegmentation
    } else if file.tensors.contains_key("classifier.weight") {
        HfLayout::ImageClassification
    } else if file.tensors.keys().any(|k| k.starts_with("embeddings.")) {
        HfLayout::Model
    } else {
        return Err(Error::Checkpoint(format!(
            "{}: cannot tell the model: expected lm_head.weight (BeitForMaskedImageModeling), \
             classifier.weight (BeitForImageClassification), decode_head.classifier.weight \
             (BeitForSemanticSegmentation) or embeddings.* keys (BeitModel)",
            weights_path.display()
        )));
    };
    if layout == HfLayout::MaskedImageModeling && pooling == Pooling::Cls {
        return Err(Error::Config(format!(
            "{}: a BeitForMaskedImageModeling with use_mean_pooling=false (a second final LayerNorm, \
             beit.layernorm, before the head) is not supported: expected use_mean_pooling=true",
            config_path.display()
        )));
    }
    let labelled = matches!(layout, HfLayout::ImageClassification | HfLayout::SemanticSegmentation);
    let head = match layout {
        HfLayout::ImageClassification => Some("classifier.weight"),
        HfLayout::SemanticSegmentation => Some("decode_head.classifier.weight"),
        _ => None,
    };
    // transformers leaves id2label out of config.json when the labels are its defaults
    // (LABEL_0, LABEL_1): the head's rows say how many there are.
    let labels = match head.and_then(|key| file.tensors.get(key)) {
        Some(t) if labels.is_empty() => (0..t.dims()[0]).map(|i| format!("LABEL_{i}")).collect(),
        _ => labels,
    };
    if labelled && labels.len() < 2 {
        return Err(Error::Config(format!(
            "{}: a {} checkpoint needs id2label with at least 2 classes",
            config_path.display(),
            layout.architecture()
        )));
    }
    let mut tensors = HashMap::with_capacity(file.tensors.len());
    for (name, t) in file.tensors {
        // Index buffers are derived from the grid, never learned: rebuilt, not read.
        if name.ends_with("relative_position_index") {
            continue;
        }
        // Segmentation reads the blocks' outputs: a final LayerNorm (use_mean_pooling=false)
        // is in the checkpoint but on no path.
        if layout == HfLayout::SemanticSegmentation && name.starts_with("beit.layernorm.") {
            continue;
        }
        let name = if layout == HfLayout::Model { format!("beit.{name}") } else { name };
        tensors.insert(name, t.to_dtype(DType::F32)?);
    }
    if let Some(size) = image_size {
        if size != config.image_size {
            let old = config.grid();
            config.image_size = size;
            config.validate()?;
            resize_position_tables(&mut tensors, old, config.grid())?;
        }
    }
    let segmenter = match layout {
        HfLayout::SemanticSegmentation => Some(segmenter_config(&hf, config.clone(), &labels, &config_path)?),
        _ => None,
    };
    Ok(HfCheckpoint { layout, config, pooling, labels, segmenter, tensors })
}

/// Fits the backbone tensors of a beit checkpoint saved with `saved` (HF key names) to `model`,
/// which `what` names in errors: the patch size and channel count must be the checkpoint's
/// (the position tables are resized between patch grids, so another patch size is refused
/// here by name rather than resized wrongly), and another image size resizes the tables.
pub(crate) fn fit_backbone(
    tensors: &mut HashMap<String, Tensor>,
    saved: &BeitConfig,
    model: &BeitConfig,
    what: &str,
) -> Result<()> {
    for (field, saved, asked) in
        [("patchSize", saved.patch_size, model.patch_size), ("numChannels", saved.num_channels, model.num_channels)]
    {
        if saved != asked {
            return Err(Error::Config(format!(
                "the checkpoint's backbone has {field} {saved}, {what} asks for {asked}: start from the \
                 checkpoint's model config (only imageSize and dropPathRate may differ)"
            )));
        }
    }
    if saved.image_size != model.image_size {
        resize_position_tables(tensors, saved.grid(), model.grid())?;
    }
    Ok(())
}

pub(crate) fn resize_position_tables(
    tensors: &mut HashMap<String, Tensor>,
    old: (usize, usize),
    new: (usize, usize),
) -> Result<()> {
    for (name, t) in tensors.iter_mut() {
        if name.ends_with("relative_position_bias_table") {
            *t = resize_relative_position_table(t, old, new)
                .map_err(|e| Error::Checkpoint(format!("cannot resize {name}: {e}")))?;
        } else if name == "beit.embeddings.position_embeddings" {
            *t = resize_position_embeddings(t, old, new)
                .map_err(|e| Error::Checkpoint(format!("cannot resize {name}: {e}")))?;
        }
    }
    Ok(())
}

/// Writes a transformers folder: `config.json` (a `BeitConfig` transformers loads) and
/// `model.safetensors`, for the task model `layout` (names are already transformers keys).
pub fn write(
    dir: &Path,
    layout: HfLayout,
    config: &BeitConfig,
    pooling: Pooling,
    labels: &[String],
    tensors: &[(String, Tensor)],
) -> Result<()> {
    write_folder(dir, &config_json(layout, config, pooling, labels), tensors)
}

/// Writes a transformers `BeitForSemanticSegmentation` folder.
pub fn write_segmenter(
    dir: &Path,
    cfg: &SegmenterConfig,
    labels: &[String],
    tensors: &[(String, Tensor)],
) -> Result<()> {
    let mut v = config_json(HfLayout::SemanticSegmentation, &cfg.model, Pooling::Mean, labels);
    let fields = json!({
        "out_indices": cfg.out_indices,
        "pool_scales": cfg.pool_scales,
        "use_auxiliary_head": cfg.use_auxiliary_head,
        "auxiliary_channels": cfg.auxiliary_channels,
        "auxiliary_num_convs": cfg.auxiliary_num_convs,
        "auxiliary_concat_input": cfg.auxiliary_concat_input,
        "auxiliary_loss_weight": cfg.auxiliary_loss_weight,
        "semantic_loss_ignore_index": cfg.semantic_loss_ignore_index,
    });
    if let (Value::Object(v), Value::Object(fields)) = (&mut v, fields) {
        v.extend(fields);
    }
    write_folder(dir, &v, tensors)
}

fn write_folder(dir: &Path, config: &Value, tensors: &[(String, Tensor)]) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Io(std::io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display()))))?;
    let tensors = tensors
        .iter()
        .map(|(name, t)| {
            // PyTorch keeps BatchNorm's batch counter as int64.
            let dtype = if name.ends_with("num_batches_tracked") { DType::I64 } else { DType::F32 };
            Ok((name.clone(), t.to_device(&Device::Cpu)?.to_dtype(dtype)?.contiguous()?))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    checkpoint::save(&dir.join(WEIGHTS_FILE), &tensors, metadata)?;
    let text = serde_json::to_string_pretty(config).expect("json");
    checkpoint::write_atomic(&dir.join(CONFIG_FILE), format!("{text}\n").as_bytes())
}

fn config_json(layout: HfLayout, c: &BeitConfig, pooling: Pooling, labels: &[String]) -> Value {
    let [h, w] = c.image_size;
    let mut v = json!({
        "architectures": [layout.architecture()],
        "model_type": "beit",
        "image_size": if h == w { json!(h) } else { json!([h, w]) },
        "patch_size": c.patch_size,
        "num_channels": c.num_channels,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "intermediate_size": c.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": c.initializer_range,
        "layer_norm_eps": c.layer_norm_eps,
        "vocab_size": c.vocab_size,
        "use_mask_token": layout == HfLayout::MaskedImageModeling,
        "use_absolute_position_embeddings": c.use_absolute_position_embeddings,
        "use_relative_position_bias": c.use_relative_position_bias,
        "use_shared_relative_position_bias": c.use_shared_relative_position_bias,
        "layer_scale_init_value": c.layer_scale_init_value,
        "drop_path_rate": c.drop_path_rate,
        "use_mean_pooling": pooling == Pooling::Mean,
        "dtype": "float32",
    });
    if !labels.is_empty() {
        let id2label: serde_json::Map<String, Value> =
            labels.iter().enumerate().map(|(i, l)| (i.to_string(), json!(l))).collect();
        let label2id: serde_json::Map<String, Value> =
            labels.iter().enumerate().map(|(i, l)| (l.clone(), json!(i))).collect();
        v["id2label"] = Value::Object(id2label);
        v["label2id"] = Value::Object(label2id);
    }
    v
}

/// Resizes a row-major [h, w, c] grid to [h2, w2, c], separably.
fn resize_grid(values: &[f32], (h, w): (usize, usize), c: usize, (h2, w2): (usize, usize), cubic: bool) -> Vec<f32> {
    let rows = interpolation_taps(h, h2, cubic);
    let cols = interpolation_taps(w, w2, cubic);
    let mut wide = vec![0f64; h * w2 * c];
    for y in 0..h {
        for (x2, taps) in cols.iter().enumerate() {
            for &(x, wt) in taps {
                for k in 0..c {
                    wide[(y * w2 + x2) * c + k] += wt * values[(y * w + x) * c + k] as f64;
                }
            }
        }
    }
    let mut out = vec![0f64; h2 * w2 * c];
    for (y2, taps) in rows.iter().enumerate() {
        for &(y, wt) in taps {
            for i in 0..w2 * c {
                out[y2 * w2 * c + i] += wt * wide[y * w2 * c + i];
            }
        }
    }
    out.into_iter().map(|v| v as f32).collect()
}

/// A relative position bias table [(2h-1)(2w-1)+3, heads] for an h x w grid, resized to an
/// h2 x w2 grid: the offset grid is resampled bilinearly, the three [CLS] entries are kept.
pub fn resize_relative_position_table(
    table: &Tensor,
    (h, w): (usize, usize),
    (h2, w2): (usize, usize),
) -> Result<Tensor> {
    let (rows, heads) = table.dims2()?;
    let (oh, ow) = (2 * h - 1, 2 * w - 1);
    if rows != oh * ow + 3 {
        return Err(Error::Checkpoint(format!("table has {rows} rows, expected {} for a {h}x{w} grid", oh * ow + 3)));
    }
    let values = table.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (nh, nw) = (2 * h2 - 1, 2 * w2 - 1);
    let mut out = resize_grid(&values[..oh * ow * heads], (oh, ow), heads, (nh, nw), false);
    out.extend_from_slice(&values[oh * ow * heads..]);
    Ok(Tensor::from_vec(out, (nh * nw + 3, heads), table.device())?)
}

/// Absolute position embeddings [1, h*w+1, D] resized to an h2 x w2 grid (bicubic); the [CLS]
/// position is kept.
pub fn resize_position_embeddings(pos: &Tensor, (h, w): (usize, usize), (h2, w2): (usize, usize)) -> Result<Tensor> {
    let (_, n, d) = pos.dims3()?;
    if n != h * w + 1 {
        return Err(Error::Checkpoint(format!("has {n} positions, expected {} for a {h}x{w} grid", h * w + 1)));
    }
    let values = pos.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = values[..d].to_vec();
    out.extend(resize_grid(&values[d..], (h, w), d, (h2, w2), true));
    Ok(Tensor::from_vec(out, (1, h2 * w2 + 1, d), pos.device())?)
}
