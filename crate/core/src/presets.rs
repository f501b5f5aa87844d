//! The presets, as data: the one table behind [`beit`], [`dvae`] and, through the addon
//! (`presetsJson`), the TypeScript API's `PRESETS` and `DVAE_PRESETS`.

use serde_json::Value;

use crate::config::{BeitConfig, DvaeConfig};
use crate::error::{Error, Result};

/// BEiT sizes (timm's beit_*_patch16_224, plus `mini`) with BEiT's pretraining choices: 224 px,
/// patch 16, RGB, 8192 visual tokens, shared relative position bias, no absolute positions.
/// (name, hidden size, layers, heads, LayerScale init)
const BEIT: [(&str, usize, usize, usize, f64); 5] = [
    // Not a timm size: 6 x 128, trains at CPU speed on small images (Fashion-MNIST).
    ("mini", 128, 6, 4, 0.1),
    ("tiny", 192, 12, 3, 0.1),
    ("small", 384, 12, 6, 0.1),
    ("base", 768, 12, 12, 0.1),
    ("large", 1024, 24, 16, 1e-5),
];

/// A dVAE tokenizer: (name, image size, channels, n_hid, groups, blocks per group, vocabulary,
/// decoder input width).
type DvaeRow = (&'static str, usize, usize, usize, usize, usize, usize, usize);

const DVAE: [DvaeRow; 3] = [
    // OpenAI's DALL-E dVAE: 112 px -> 14x14 tokens of 8192.
    ("dall-e", 112, 3, 256, 4, 2, 8192, 128),
    // For 28-64 px images on a CPU: downsampling 4 (28 px -> 7x7 tokens).
    ("small", 28, 3, 64, 3, 1, 1024, 64),
    // The cheapest useful one, for tests and quick runs.
    ("tiny", 28, 3, 32, 3, 1, 512, 32),
];

fn names<T>(table: &[T], name: fn(&T) -> &str) -> String {
    table.iter().map(name).collect::<Vec<_>>().join(", ")
}

/// A BEiT preset: mini, tiny, small, base, large.
pub fn beit(name: &str) -> Result<BeitConfig> {
    let Some(&(_, hidden, layers, heads, layer_scale)) = BEIT.iter().find(|p| p.0 == name) else {
        return Err(Error::Config(format!("unknown preset {name:?}: expected one of {}", names(&BEIT, |p| p.0))));
    };
    Ok(BeitConfig {
        image_size: [224, 224],
        patch_size: 16,
        num_channels: 3,
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        intermediate_size: 4 * hidden,
        vocab_size: 8192,
        layer_scale_init_value: layer_scale,
        use_absolute_position_embeddings: false,
        use_shared_relative_position_bias: true,
        use_relative_position_bias: false,
        drop_path_rate: 0.1,
        layer_norm_eps: 1e-6,
        initializer_range: 0.02,
    })
}

/// A tokenizer preset: dall-e, small, tiny.
pub fn dvae(name: &str) -> Result<DvaeConfig> {
    let Some(&(_, size, channels, hidden, groups, blocks, vocab, decoder_input)) = DVAE.iter().find(|p| p.0 == name)
    else {
        let expected = names(&DVAE, |p| p.0);
        return Err(Error::Config(format!("unknown tokenizer preset {name:?}: expected one of {expected}")));
    };
    Ok(DvaeConfig {
        image_size: [size, size],
        num_channels: channels,
        hidden_size: hidden,
        num_groups: groups,
        blocks_per_group: blocks,
        vocab_size: vocab,
        decoder_input_size: decoder_input,
    })
}

/// `{"beit": {name: config}, "tokenizer": {name: config}}`, configs as camelCase JSON, names in
/// table order.
pub fn presets_json() -> String {
    fn object<C: serde::Serialize>(names: impl Iterator<Item = &'static str>, config: fn(&str) -> Result<C>) -> String {
        let entries: Vec<String> = names
            .map(|n| {
                let c = config(n).expect("every table entry builds");
                format!("{}:{}", Value::from(n), serde_json::to_string(&c).expect("serialisable"))
            })
            .collect();
        format!("{{{}}}", entries.join(","))
    }
    let beit = object(BEIT.iter().map(|p| p.0), beit);
    let tokenizer = object(DVAE.iter().map(|p| p.0), dvae);
    format!("{{\"beit\":{beit},\"tokenizer\":{tokenizer}}}")
}
