//! The candle models: the reference the CPU engine is tested against, and the path GPUs and
//! bf16 take (candle's autograd). One small struct per part with `new` and `forward`, reading
//! its tensors by id from [`Vars`], the model's parameter table made candle variables.

pub mod backbone;
pub mod classification;
pub mod dvae;
pub mod mim;
pub mod segmentation;

use candle_core::{DType, Device, Module, Result, Tensor, Var};

use crate::config::Precision;
use crate::ops;
use crate::params::{LinearParams, NormParams, ParamId, ParamTable, Source};

/// A model's parameters as candle variables, in table order.
pub struct Vars {
    vars: Vec<Var>,
}

impl Vars {
    /// Variables of `values` (table order) in `dtype` on `device`.
    pub fn new(values: Vec<Tensor>, dtype: DType, device: &Device) -> Result<Self> {
        let vars = values
            .into_iter()
            .map(|t| Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?))
            .collect::<Result<_>>()?;
        Ok(Self { vars })
    }

    /// The variables of `table` with the values `source` gives them.
    pub fn from_source(table: &ParamTable, source: Source, dtype: DType, device: &Device) -> crate::Result<Self> {
        Ok(Self::new(source.values(table)?, dtype, device)?)
    }

    pub fn get(&self, id: ParamId) -> Tensor {
        self.vars[id.0].as_tensor().clone()
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The current values, in table order.
    pub fn tensors(&self) -> Vec<Tensor> {
        self.vars.iter().map(|v| v.as_tensor().clone()).collect()
    }
}

/// A parameter in the dtype of the activations `x`. Parameters are f32 master weights; under
/// mixed precision the activations are bf16 and each weight is cast where it is used (the
/// cast's backward returns its gradient in f32). A no-op in f32.
pub(crate) fn like(param: &Tensor, x: &Tensor) -> Result<Tensor> {
    param.to_dtype(x.dtype())
}

pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    gemm: Precision,
}

impl Linear {
    /// `gemm`: the precision of the matmul's inputs on the CPU ([`ops::matmul`]).
    pub fn new(p: &LinearParams, vars: &Vars, gemm: Precision) -> Self {
        Self { weight: vars.get(p.weight), bias: p.bias.map(|b| vars.get(b)), gemm }
    }
}

impl Module for Linear {
    /// [..., in] -> [..., out], as one 2-D matmul over the flattened leading dimensions.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut out_dims = x.dims().to_vec();
        let in_dim = out_dims.pop().unwrap_or(1);
        let rows = x.elem_count() / in_dim;
        let weight = like(&self.weight, x)?;
        let y = ops::matmul(&x.reshape((rows, in_dim))?, &weight.reshape((weight.dim(0)?, in_dim))?.t()?, self.gemm)?;
        let y = match &self.bias {
            Some(b) => ops::add_bias(&y, &like(b, x)?)?,
            None => y,
        };
        out_dims.push(self.weight.dim(0)?);
        y.reshape(out_dims)
    }
}

pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(p: &NormParams, vars: &Vars) -> Self {
        Self { weight: vars.get(p.weight), bias: vars.get(p.bias), eps: p.eps }
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &like(&self.weight, x)?, &like(&self.bias, x)?, self.eps)
    }
}

/// Logits for a loss: bf16 ones (mixed precision) are cast to f32, so the loss and its
/// log-sum-exp are f32; f32 and f64 (gradient checks) stay as they are.
pub(crate) fn at_least_f32(logits: &Tensor) -> Result<Tensor> {
    match logits.dtype() {
        DType::F32 | DType::F64 => Ok(logits.clone()),
        _ => logits.to_dtype(DType::F32),
    }
}
