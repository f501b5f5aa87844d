//! The classifier's parameter table: the backbone (no mask token) and Hugging Face's
//! `BeitForImageClassification` head.

use super::backbone::BackboneParams;
use crate::config::{ClassifierConfig, Pooling};
use crate::params::{Init, LinearParams, NormParams, ParamId, ParamTable};

/// `BeitForImageClassification`'s head: mean-pooled patch tokens through
/// `beit.pooler.layernorm`, or [CLS] through `beit.layernorm`, then `classifier`.
#[derive(Debug, Clone)]
pub struct ClassificationHeadParams {
    pub pooling: Pooling,
    pub norm: NormParams,
    pub classifier: LinearParams,
}

impl ClassificationHeadParams {
    pub fn new(cfg: &ClassifierConfig, table: &mut ParamTable) -> Self {
        let m = &cfg.model;
        let layer = m.num_hidden_layers + 1;
        let norm_path = match cfg.pooling {
            Pooling::Mean => "beit.pooler.layernorm",
            Pooling::Cls => "beit.layernorm",
        };
        let norm = table.scope(norm_path, layer).layer_norm(m.hidden_size, m.layer_norm_eps);
        let init = Init::TruncatedNormal(m.initializer_range);
        let classifier = table.scope("classifier", layer).linear(m.hidden_size, cfg.num_labels, true, init);
        Self { pooling: cfg.pooling, norm, classifier }
    }

    pub fn ids(&self) -> Vec<ParamId> {
        [self.norm.weight, self.norm.bias, self.classifier.weight].into_iter().chain(self.classifier.bias).collect()
    }
}

/// The classifier: backbone (no mask token) and classification head.
#[derive(Debug, Clone)]
pub struct ClassifierParams {
    pub backbone: BackboneParams,
    pub head: ClassificationHeadParams,
}

impl ClassifierParams {
    pub fn new(cfg: &ClassifierConfig) -> (ParamTable, Self) {
        let mut table = ParamTable::new();
        let backbone = BackboneParams::new(&cfg.model, false, &mut table);
        let head = ClassificationHeadParams::new(cfg, &mut table);
        (table, Self { backbone, head })
    }
}
