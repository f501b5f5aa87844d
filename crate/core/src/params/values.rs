//! A table's initial values: the reference initialisation from a seed, or checkpoint tensors
//! by name (with every missing tensor, shape mismatch and unused tensor listed in one error).

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Device, Tensor};

use super::table::{Init, Param, ParamId, ParamTable};
use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// Where a model's values come from.
pub enum Source {
    /// The table's initialisations, drawn from one stream seeded with this, in table order.
    Init(u64),
    /// Tensors by checkpoint name. An absent one is an error unless it is in `init`'s set,
    /// which get the reference initialisation from `init`'s seed (a new head on a pretrained
    /// backbone).
    Tensors { tensors: HashMap<String, Tensor>, init: Option<(u64, HashSet<ParamId>)> },
}

impl Source {
    pub fn tensors(tensors: HashMap<String, Tensor>) -> Self {
        Self::Tensors { tensors, init: None }
    }

    /// The value of every parameter of `table`, as f32 CPU tensors in table order.
    pub fn values(self, table: &ParamTable) -> Result<Vec<Tensor>> {
        match self {
            Source::Init(seed) => {
                let mut rng = SplitMix64::new(seed);
                table.params().iter().map(|p| initial_value(&mut rng, p)).collect()
            }
            Source::Tensors { mut tensors, init } => {
                let (mut rng, may_init) = match init {
                    Some((seed, ids)) => (Some(SplitMix64::new(seed)), ids),
                    None => (None, HashSet::new()),
                };
                let (mut missing, mut mismatched) = (Vec::new(), Vec::new());
                let mut values = Vec::with_capacity(table.len());
                for (id, p) in table.ids().zip(table.params()) {
                    let value = match tensors.remove(&p.name) {
                        Some(t) if t.dims() == p.shape.as_slice() => t.to_dtype(DType::F32)?,
                        Some(t) => {
                            mismatched.push(format!("{} is {:?}, expected {:?}", p.name, t.dims(), p.shape));
                            continue;
                        }
                        None => match rng.as_mut() {
                            Some(rng) if may_init.contains(&id) => initial_value(rng, p)?,
                            _ => {
                                missing.push(format!("{} {:?}", p.name, p.shape));
                                continue;
                            }
                        },
                    };
                    values.push(value);
                }
                let mut problems = Vec::new();
                if !missing.is_empty() {
                    problems.push(format!("missing tensors: {}", missing.join(", ")));
                }
                if !mismatched.is_empty() {
                    problems.push(format!("shape mismatches: {}", mismatched.join(", ")));
                }
                if !tensors.is_empty() {
                    let mut names: Vec<_> = tensors.into_keys().collect();
                    names.sort();
                    problems.push(format!("tensors this model does not use: {}", names.join(", ")));
                }
                if !problems.is_empty() {
                    return Err(Error::Checkpoint(format!(
                        "checkpoint does not fit this model: {}",
                        problems.join("; ")
                    )));
                }
                Ok(values)
            }
        }
    }
}

fn initial_value(rng: &mut SplitMix64, p: &Param) -> Result<Tensor> {
    let n = p.len();
    let values: Vec<f32> = match p.init {
        Init::Constant(c) => vec![c as f32; n],
        Init::TruncatedNormal(std) => (0..n).map(|_| (std * rng.truncated_normal(1.0)) as f32).collect(),
        Init::Normal(std) => (0..n).map(|_| (std * rng.normal()) as f32).collect(),
    };
    Ok(Tensor::from_vec(values, p.shape.as_slice(), &Device::Cpu)?)
}

/// The named tensors of `values` (table order).
pub fn named(table: &ParamTable, values: Vec<Tensor>) -> Vec<(String, Tensor)> {
    table.params().iter().map(|p| p.name.clone()).zip(values).collect()
}
