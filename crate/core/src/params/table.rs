//! A model's parameters as data: one table per model, in initialisation order, giving each
//! tensor its checkpoint name, shape, initialisation, weight-decay group and layer id (for
//! layer-wise learning-rate decay). The candle model takes its tensors from it by id, the CPU
//! engine its slots, the optimizer its groups, checkpoints their names: nothing else spells a
//! parameter's name.

use std::fmt::Display;

/// How a parameter is initialised. Values are drawn from one seeded stream in table order, so
/// only the order of the random entries matters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Normal(0, std) truncated at +-std (unilm's `trunc_normal_`).
    TruncatedNormal(f64),
    /// Normal(0, std), untruncated (DALL-E's convolutions: std = 1 / sqrt(fan in)).
    Normal(f64),
    Constant(f64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// The checkpoint key (Hugging Face's, or OpenAI's for the dVAE).
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    /// Whether AdamW's weight decay applies (BEiT: matrices yes; biases, norms, LayerScale,
    /// tokens and position tables no).
    pub decay: bool,
    /// unilm's layer id: 0 for the embeddings, i + 1 for block i, L + 1 for what follows.
    pub layer: usize,
    /// false for a buffer: state the model updates itself (BatchNorm running statistics),
    /// saved and moved with the weights, never by the optimizer.
    pub trainable: bool,
}

impl Param {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A parameter's position in its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(pub usize);

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParamTable {
    params: Vec<Param>,
}

impl ParamTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    pub fn get(&self, id: ParamId) -> &Param {
        &self.params[id.0]
    }

    pub fn ids(&self) -> impl Iterator<Item = ParamId> {
        (0..self.params.len()).map(ParamId)
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Values of all parameters together.
    pub fn num_values(&self) -> usize {
        self.params.iter().map(Param::len).sum()
    }

    /// [`Self::num_values`], or None where a shape's product or the sum overflows (a config
    /// given sizes far beyond any model).
    pub fn checked_num_values(&self) -> Option<usize> {
        self.params
            .iter()
            .try_fold(0usize, |sum, p| sum.checked_add(p.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))?))
    }

    /// unilm's layer-wise learning-rate decay for a backbone of `num_layers` blocks: the rate of
    /// layer id i is scaled by decay^(L + 1 - i) (embeddings 0, block j j + 1, heads L + 1).
    pub fn layer_decay_scales(&self, num_layers: usize, decay: f64) -> Vec<f64> {
        self.params.iter().map(|p| decay.powi((num_layers + 1 - p.layer) as i32)).collect()
    }

    pub fn find(&self, name: &str) -> Option<ParamId> {
        self.params.iter().position(|p| p.name == name).map(ParamId)
    }

    /// A scope that adds parameters named `prefix.<name>` (or `<name>` for an empty prefix)
    /// at layer id `layer`.
    pub fn scope(&mut self, prefix: &str, layer: usize) -> Scope<'_> {
        Scope { table: self, prefix: prefix.to_string(), layer }
    }

    fn push(&mut self, param: Param) -> ParamId {
        assert!(self.find(&param.name).is_none(), "parameter {} declared twice", param.name);
        self.params.push(param);
        ParamId(self.params.len() - 1)
    }
}

/// Adds parameters under a name prefix and layer id (VarBuilder's `pp`, for tables).
pub struct Scope<'t> {
    table: &'t mut ParamTable,
    prefix: String,
    layer: usize,
}

impl Scope<'_> {
    /// The scope `prefix.name`, same layer.
    pub fn pp(&mut self, name: impl Display) -> Scope<'_> {
        let prefix = self.name(&name.to_string());
        Scope { table: self.table, prefix, layer: self.layer }
    }

    /// The same prefix at another layer id.
    pub fn at_layer(&mut self, layer: usize) -> Scope<'_> {
        Scope { table: self.table, prefix: self.prefix.clone(), layer }
    }

    fn name(&self, leaf: &str) -> String {
        if self.prefix.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.prefix)
        }
    }

    fn add(&mut self, leaf: &str, shape: &[usize], init: Init, decay: bool) -> ParamId {
        let param =
            Param { name: self.name(leaf), shape: shape.to_vec(), init, decay, layer: self.layer, trainable: true };
        self.table.push(param)
    }

    /// A buffer: a tensor of the model's state that training updates outside the optimizer.
    pub fn buffer(&mut self, leaf: &str, shape: &[usize], init: Init) -> ParamId {
        let param = Param {
            name: self.name(leaf),
            shape: shape.to_vec(),
            init,
            decay: false,
            layer: self.layer,
            trainable: false,
        };
        self.table.push(param)
    }

    /// A weight matrix (or convolution kernel): weight decay applies.
    pub fn weight(&mut self, leaf: &str, shape: &[usize], init: Init) -> ParamId {
        self.add(leaf, shape, init, true)
    }

    /// A parameter exempt from weight decay: biases, norms, LayerScale, tokens, position tables.
    pub fn no_decay(&mut self, leaf: &str, shape: &[usize], init: Init) -> ParamId {
        self.add(leaf, shape, init, false)
    }

    /// `weight` [n_out, n_in] and, with `bias`, a zero `bias` [n_out].
    pub fn linear(&mut self, n_in: usize, n_out: usize, bias: bool, init: Init) -> LinearParams {
        let weight = self.weight("weight", &[n_out, n_in], init);
        let bias = bias.then(|| self.no_decay("bias", &[n_out], Init::Constant(0.0)));
        LinearParams { weight, bias, n_in, n_out }
    }

    /// A LayerNorm's `weight` (ones) and `bias` (zeros) over `d` values.
    pub fn layer_norm(&mut self, d: usize, eps: f64) -> NormParams {
        let weight = self.no_decay("weight", &[d], Init::Constant(1.0));
        let bias = self.no_decay("bias", &[d], Init::Constant(0.0));
        NormParams { weight, bias, eps }
    }
}

/// y = x W^T + b with W [n_out, n_in].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearParams {
    pub weight: ParamId,
    pub bias: Option<ParamId>,
    pub n_in: usize,
    pub n_out: usize,
}

/// LayerNorm over the last dimension.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormParams {
    pub weight: ParamId,
    pub bias: ParamId,
    pub eps: f64,
}
