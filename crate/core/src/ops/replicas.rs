//! The sum of a tensor over the replicas of a data-parallel job, differentiable: every
//! replica's loss reads the sum, so the gradient of the summed losses with respect to one
//! replica's input is the sum of every replica's incoming gradient (PyTorch SyncBatchNorm's
//! backward). The BatchNorms' per-channel statistics go through it.

use std::sync::Arc;

use candle_core::{backend::BackendStorage, bail, CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};

use super::contiguous;
use crate::distributed::ReplicaSum;

const SUM_OVER_REPLICAS: &str = "sum-over-replicas";

struct SumOverReplicas(Arc<dyn ReplicaSum>);

impl CustomOp1 for SumOverReplicas {
    fn name(&self) -> &'static str {
        SUM_OVER_REPLICAS
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let summed = match s {
            CpuStorage::F32(v) => {
                let mut v = contiguous(v, l, SUM_OVER_REPLICAS)?.to_vec();
                self.0.sum_f32(&mut v).map_err(failed)?;
                CpuStorage::F32(v)
            }
            CpuStorage::F64(v) => {
                let mut v = contiguous(v, l, SUM_OVER_REPLICAS)?.to_vec();
                self.0.sum_f64(&mut v).map_err(failed)?;
                CpuStorage::F64(v)
            }
            other => bail!("{SUM_OVER_REPLICAS}: unsupported dtype {:?}, expected f32 or f64", other.dtype()),
        };
        Ok((summed, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

/// A collective's failure as an op's error.
fn failed(e: crate::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("synchronised BatchNorm: {e}"))
}

/// `values` summed in place over `replicas`; as they are without.
pub fn sum_values_over_replicas(replicas: Option<&Arc<dyn ReplicaSum>>, values: &mut [f64]) -> candle_core::Result<()> {
    match replicas {
        Some(r) => r.sum_f64(values).map_err(failed),
        None => Ok(()),
    }
}

/// `x` summed element-wise over `replicas` (every replica calls it in the same order with the
/// same shape). The values travel through host memory: statistics are a few hundred numbers.
pub fn sum_over_replicas(x: &Tensor, replicas: &Arc<dyn ReplicaSum>) -> candle_core::Result<Tensor> {
    let host = x.to_device(&Device::Cpu)?.contiguous()?;
    host.apply_op1(SumOverReplicas(replicas.clone()))?.to_device(x.device())
}
