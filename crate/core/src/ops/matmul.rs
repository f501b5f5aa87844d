//! A matrix product whose GEMM inputs are at a precision of their own: the CPU engine's bf16
//! GEMMs (inputs rounded to bf16, f32 sums) over f32 tensors, for the candle models that run on
//! the CPU with the engine's mixed precision (the segmenter's 1x1 and transposed convolutions).
//! Its backward pass is two more such products, so gradients flow through bf16 GEMMs too, as
//! in PyTorch's autocast.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::config::Precision;
use crate::engine::matmul::{matmul_at, Mat, Threads};

/// a [.., m, k] x b [.., k, n] (the same leading dimensions, as candle's matmul) with the
/// GEMM's inputs at `gemm`: candle's matmul for f32 (and on a GPU, where the tensors' dtype
/// decides), the engine's bf16 GEMM for bf16 on the CPU (f32 tensors only), one per matrix of
/// the batch.
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

/// The leading (batch) dimensions of a layout and their strides, and the view of its first
/// matrix (any strides, as a transposed tensor has).
fn view(layout: &Layout) -> candle_core::Result<(&[usize], &[usize], Mat)> {
    let (dims, stride) = (layout.dims(), layout.stride());
    let n = dims.len();
    if n < 2 {
        bail!("bf16-matmul: expected a matrix or a batch of them, got shape {dims:?}");
    }
    let m = Mat {
        offset: layout.start_offset(),
        rows: dims[n - 2],
        cols: dims[n - 1],
        row_stride: stride[n - 2],
        col_stride: stride[n - 1],
    };
    Ok((&dims[..n - 2], &stride[..n - 2], m))
}

/// The offset of the batch's matrix `i` (row-major over `dims`) from its first one.
fn batch_offset(mut i: usize, dims: &[usize], stride: &[usize]) -> usize {
    let mut offset = 0;
    for (&d, &s) in dims.iter().zip(stride).rev() {
        offset += (i % d) * s;
        i /= d;
    }
    offset
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
        let ((batch, a_stride, am), (b_batch, b_stride, bm)) = (view(l1)?, view(l2)?);
        if am.cols != bm.rows || batch != b_batch {
            bail!("bf16-matmul: {:?} x {:?} does not fit", l1.dims(), l2.dims());
        }
        let (CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2) else {
            bail!("bf16-matmul: expected f32 inputs, got {:?} and {:?}", s1.dtype(), s2.dtype());
        };
        let (matrices, size) = (batch.iter().product::<usize>(), am.rows * bm.cols);
        let mut out = vec![0f32; matrices * size];
        let product = |i: usize, out: &mut [f32], threads: Threads| {
            let am = Mat { offset: am.offset + batch_offset(i, batch, a_stride), ..am };
            let bm = Mat { offset: bm.offset + batch_offset(i, batch, b_stride), ..bm };
            matmul_at(Precision::Bf16, out, Mat::dense(am.rows, bm.cols), a, am, b, bm, false, 1.0, threads);
        };
        // A single matrix over the pool; a batch's (the attention's, one per image and head,
        // small) each on one thread, in parallel. Empty outputs have nothing to compute.
        match matrices {
            _ if size == 0 => {}
            1 => product(0, &mut out, Threads::Pool),
            _ => out.par_chunks_mut(size).enumerate().for_each(|(i, out)| product(i, out, Threads::Caller)),
        }
        let dims: Vec<usize> = batch.iter().copied().chain([am.rows, bm.cols]).collect();
        Ok((CpuStorage::F32(out), Shape::from(dims)))
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
