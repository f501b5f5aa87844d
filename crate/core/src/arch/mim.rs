//! The masked-image-modeling model's parameter table: the backbone (with the mask token) and
//! Hugging Face's `BeitForMaskedImageModeling` head.

use super::backbone::BackboneParams;
use crate::config::BeitConfig;
use crate::params::{Init, LinearParams, NormParams, ParamTable};

/// Hugging Face's `BeitForMaskedImageModeling` head: final `layernorm`, then `lm_head` over the
/// visual-token vocabulary.
#[derive(Debug, Clone)]
pub struct MimHeadParams {
    pub layernorm: NormParams,
    pub lm_head: LinearParams,
}

impl MimHeadParams {
    pub fn new(cfg: &BeitConfig, table: &mut ParamTable) -> Self {
        let d = cfg.hidden_size;
        let layer = cfg.num_hidden_layers + 1;
        let layernorm = table.scope("layernorm", layer).layer_norm(d, cfg.layer_norm_eps);
        let lm_head =
            table.scope("lm_head", layer).linear(d, cfg.vocab_size, true, Init::TruncatedNormal(cfg.initializer_range));
        Self { layernorm, lm_head }
    }
}

/// The MIM model: backbone (with the mask token) and MIM head.
#[derive(Debug, Clone)]
pub struct MimParams {
    pub backbone: BackboneParams,
    pub head: MimHeadParams,
}

impl MimParams {
    pub fn new(cfg: &BeitConfig) -> (ParamTable, Self) {
        let mut table = ParamTable::new();
        let backbone = BackboneParams::new(cfg, true, &mut table);
        let head = MimHeadParams::new(cfg, &mut table);
        (table, Self { backbone, head })
    }
}
