//! A matrix product whose GEMM inputs are at a precision of their own: the CPU engine's bf16
//! GEMMs (inputs rounded to bf16, f32 sums) over f32 tensors, for the candle models that run on
//! the CPU with the engine's mixed precision (the segmenter's 1x1 and transposed convolutions).
//! Its backward pass is two more such products, so gradients flow through bf16 GEMMs too, as
//! in PyTorch's autocast.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use crate::config::Precision;
use crate::engine::matmul::{matmul_at, Mat, Threads};

/// a [m, k] x b [k, n] with the GEMM's inputs at `gemm`: candle's matmul for f32 (and on a
/// GPU, where the tensors' dtype decides), the engine's bf16 GEMM for bf16 on the CPU (f32
/// tensors only).
pub fn matmul(a: &Tensor, b: &Tensor, gemm: Precision) -> candle_core::Result<Tensor> {
    if gemm == Precision::F32 || !a.device().is_cpu() {
        return a.matmul(b);
    }
    if a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        bail!("matmul: bf16 GEMMs on the CPU take f32 tensors, got {:?} and {:?}", a.dtype(), b.dtype());
    }
    a.apply_op2(b, Bf16Matmul)
}

struct Bf16Matmul;

/// The view of a 2-D layout (any strides, as a transposed tensor has).
fn view(layout: &Layout) -> candle_core::Result<Mat> {
    match (layout.dims(), layout.stride()) {
        (&[rows, cols], &[row_stride, col_stride]) => {
            Ok(Mat { offset: layout.start_offset(), rows, cols, row_stride, col_stride })
        }
        (d, _) => bail!("bf16-matmul: expected a 2-D tensor, got shape {d:?}"),
    }
}

impl CustomOp2 for Bf16Matmul {
    fn name(&self) -> &'static str {
        "bf16-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (am, bm) = (view(l1)?, view(l2)?);
        if am.cols != bm.rows {
            bail!("bf16-matmul: [{}x{}] x [{}x{}] does not fit", am.rows, am.cols, bm.rows, bm.cols);
        }
        let (CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2) else {
            bail!("bf16-matmul: expected f32 inputs, got {:?} and {:?}", s1.dtype(), s2.dtype());
        };
        let d = Mat::dense(am.rows, bm.cols);
        let mut out = vec![0f32; d.rows * d.cols];
        matmul_at(Precision::Bf16, &mut out, d, a, am, b, bm, false, 1.0, Threads::Pool);
        Ok((CpuStorage::F32(out), Shape::from((d.rows, d.cols))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let da = grad.apply_op2_no_bwd(&b.t()?, self)?;
        let db = a.t()?.apply_op2_no_bwd(grad, self)?;
        Ok((Some(da), Some(db)))
    }
}
