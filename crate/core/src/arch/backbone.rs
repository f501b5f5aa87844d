//! The BEiT backbone's parameter table (Hugging Face's `BeitModel` under `beit.`) and the
//! geometry both paths share: the relative-position index and the stochastic-depth rates.

use crate::config::BeitConfig;
use crate::params::{Init, LinearParams, NormParams, ParamId, ParamTable};

/// Patch embedding, [CLS], the mask token and absolute positions.
#[derive(Debug, Clone)]
pub struct EmbeddingParams {
    pub cls_token: ParamId,
    /// Only a model that masks (MIM) has one, as Hugging Face's `use_mask_token`.
    pub mask_token: Option<ParamId>,
    /// The patch projection as a linear layer over flattened patches: its weight keeps the
    /// checkpoints' conv layout [D, C, P, P], which is [D, C*P*P] row-major.
    pub patch: LinearParams,
    pub position_embeddings: Option<ParamId>,
}

/// One pre-LN block.
#[derive(Debug, Clone)]
pub struct BlockParams {
    pub index: usize,
    pub layernorm_before: NormParams,
    /// q and v have biases, k has none. The three weights are adjacent in the table, so the
    /// engine reads them as one [3D, D] matrix (one QKV GEMM).
    pub query: LinearParams,
    pub key: LinearParams,
    pub value: LinearParams,
    /// The block's own relative position bias table (fine-tuning), [table rows, heads].
    pub relative_position_bias: Option<ParamId>,
    pub attention_output: LinearParams,
    pub lambda_1: Option<ParamId>,
    pub layernorm_after: NormParams,
    pub intermediate: LinearParams,
    pub output: LinearParams,
    pub lambda_2: Option<ParamId>,
    /// Stochastic-depth rate.
    pub drop_path: f64,
}

#[derive(Debug, Clone)]
pub struct BackboneParams {
    pub embeddings: EmbeddingParams,
    /// The table shared by all blocks (pretraining).
    pub relative_position_bias: Option<ParamId>,
    pub layers: Vec<BlockParams>,
}

impl BackboneParams {
    /// Adds the backbone to `table`, in the order the reference initialisation draws it.
    pub fn new(cfg: &BeitConfig, use_mask_token: bool, table: &mut ParamTable) -> Self {
        let (d, std) = (cfg.hidden_size, cfg.initializer_range);
        let num_layers = cfg.num_hidden_layers;
        let mut beit = table.scope("beit", 0);
        let mut e = beit.pp("embeddings");
        let cls_token = e.no_decay("cls_token", &[1, 1, d], Init::TruncatedNormal(std));
        let mask_token = use_mask_token.then(|| e.no_decay("mask_token", &[1, 1, d], Init::TruncatedNormal(std)));
        let patch_values = cfg.num_channels * cfg.patch_size * cfg.patch_size;
        let mut patch_embeddings = e.pp("patch_embeddings");
        let mut projection = patch_embeddings.pp("projection");
        let patch_weight = projection.weight(
            "weight",
            &[d, cfg.num_channels, cfg.patch_size, cfg.patch_size],
            Init::TruncatedNormal(std),
        );
        let patch_bias = projection.no_decay("bias", &[d], Init::Constant(0.0));
        let patch = LinearParams { weight: patch_weight, bias: Some(patch_bias), n_in: patch_values, n_out: d };
        let position_embeddings = cfg
            .use_absolute_position_embeddings
            .then(|| e.no_decay("position_embeddings", &[1, cfg.num_patches() + 1, d], Init::TruncatedNormal(std)));
        let embeddings = EmbeddingParams { cls_token, mask_token, patch, position_embeddings };
        let table_shape = [relative_position_table_rows(cfg), cfg.num_attention_heads];
        let mut encoder = beit.pp("encoder");
        let relative_position_bias = cfg.use_shared_relative_position_bias.then(|| {
            encoder.at_layer(num_layers + 1).pp("relative_position_bias").no_decay(
                "relative_position_bias_table",
                &table_shape,
                Init::Constant(0.0),
            )
        });
        let layers = (0..num_layers)
            .map(|i| {
                let mut layers = encoder.pp("layer");
                let mut layer = layers.pp(i);
                let mut layer = layer.at_layer(i + 1);
                // Residual-branch projections are scaled by 1/sqrt(2l) at init (l 1-based).
                let residual_std = std / (2.0 * (i + 1) as f64).sqrt();
                let (lambda_1, lambda_2) = if cfg.layer_scale_init_value > 0.0 {
                    let init = Init::Constant(cfg.layer_scale_init_value);
                    (Some(layer.no_decay("lambda_1", &[d], init)), Some(layer.no_decay("lambda_2", &[d], init)))
                } else {
                    (None, None)
                };
                let layernorm_before = layer.pp("layernorm_before").layer_norm(d, cfg.layer_norm_eps);
                let mut attention = layer.pp("attention");
                let mut a = attention.pp("attention");
                let init = Init::TruncatedNormal(std);
                let query = a.pp("query").linear(d, d, false, init);
                let key = a.pp("key").linear(d, d, false, init);
                let value = a.pp("value").linear(d, d, false, init);
                // The q and v biases follow the three weights (zeros: no draws, init unchanged).
                let query =
                    LinearParams { bias: Some(a.pp("query").no_decay("bias", &[d], Init::Constant(0.0))), ..query };
                let value =
                    LinearParams { bias: Some(a.pp("value").no_decay("bias", &[d], Init::Constant(0.0))), ..value };
                let relative_position_bias = cfg.use_relative_position_bias.then(|| {
                    a.pp("relative_position_bias").no_decay(
                        "relative_position_bias_table",
                        &table_shape,
                        Init::Constant(0.0),
                    )
                });
                let attention_output =
                    attention.pp("output").pp("dense").linear(d, d, true, Init::TruncatedNormal(residual_std));
                let layernorm_after = layer.pp("layernorm_after").layer_norm(d, cfg.layer_norm_eps);
                let f = cfg.intermediate_size;
                let intermediate = layer.pp("intermediate").pp("dense").linear(d, f, true, init);
                let output = layer.pp("output").pp("dense").linear(f, d, true, Init::TruncatedNormal(residual_std));
                BlockParams {
                    index: i,
                    layernorm_before,
                    query,
                    key,
                    value,
                    relative_position_bias,
                    attention_output,
                    lambda_1,
                    layernorm_after,
                    intermediate,
                    output,
                    lambda_2,
                    drop_path: drop_path_rate(cfg, i),
                }
            })
            .collect();
        Self { embeddings, relative_position_bias, layers }
    }
}

/// Stochastic depth grows linearly with depth: linspace(0, rate, L).
pub fn drop_path_rate(cfg: &BeitConfig, layer: usize) -> f64 {
    let n = cfg.num_hidden_layers;
    if n > 1 {
        cfg.drop_path_rate * layer as f64 / (n - 1) as f64
    } else {
        0.0
    }
}

/// Rows of a relative position bias table: every (dy, dx) offset of two patches, plus three
/// for [CLS]-as-query, [CLS]-as-key and [CLS]-[CLS].
pub fn relative_position_table_rows(cfg: &BeitConfig) -> usize {
    let (h, w) = cfg.grid();
    (2 * h - 1) * (2 * w - 1) + 3
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
