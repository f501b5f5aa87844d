//! Linear layers over the flat buffers as one-line calls (llm.c's `matmul_forward` and
//! `matmul_backward`): every weight gradient is added into its slot by GEMMs (split over rows
//! when the batch is long, see `matmul::matmul_accumulate_split`).

use super::kernels::{add_bias, add_column_sums};
use super::matmul::{matmul_accumulate_split, matmul_at, Mat, Threads};
use super::simd::Real;
use crate::config::Precision;
use crate::params::{Layout, LinearParams, Slot};

/// y = x W^T + b with W [n_out, n_in] at `w` in the flat weights; its GEMMs (forward and
/// backward) at `precision`.
#[derive(Debug, Clone, Copy)]
pub struct Linear {
    pub w: Slot,
    pub b: Option<Slot>,
    pub n_in: usize,
    pub n_out: usize,
    pub precision: Precision,
}

impl Linear {
    pub fn new(p: &LinearParams, layout: &Layout, precision: Precision) -> Self {
        Self { w: layout.slot(p.weight), b: p.bias.map(|b| layout.slot(b)), n_in: p.n_in, n_out: p.n_out, precision }
    }

    /// W^T as a GEMM operand.
    fn weight_t(&self) -> Mat {
        Mat::strided(self.w.offset, self.n_out, self.n_in, self.n_in).t()
    }

    /// out [rows, n_out] = inp [rows, n_in] W^T (+ b).
    pub fn forward<T: Real>(&self, p: &[T], inp: &[T], out: &mut [T]) {
        self.forward_without_bias(p, inp, out);
        if let Some(b) = self.b {
            add_bias(&mut out[..inp.len() / self.n_in * self.n_out], b.of(p));
        }
    }

    /// out = inp W^T, the bias left to a fused pass that follows (bias + GELU).
    pub fn forward_without_bias<T: Real>(&self, p: &[T], inp: &[T], out: &mut [T]) {
        let rows = inp.len() / self.n_in;
        let (dst, a) = (Mat::dense(rows, self.n_out), Mat::dense(rows, self.n_in));
        matmul_at(self.precision, out, dst, inp, a, p, self.weight_t(), false, T::ONE, Threads::Pool);
    }

    /// dW += dout^T inp and db += the column sums of dout (into `grads`); dinp = dout W when
    /// asked.
    pub fn backward<T: Real>(
        &self,
        p: &[T],
        grads: &mut [T],
        inp: &[T],
        dout: &[T],
        dinp: Option<&mut [T]>,
        scratch: &mut Vec<T>,
    ) {
        let rows = inp.len() / self.n_in;
        let (n_in, n_out) = (self.n_in, self.n_out);
        let dout = &dout[..rows * n_out];
        let dw = self.w.of_mut(grads);
        matmul_accumulate_split(
            self.precision,
            dw,
            Mat::dense(n_out, n_in),
            dout,
            Mat::dense(rows, n_out).t(),
            inp,
            Mat::dense(rows, n_in),
            scratch,
        );
        if let Some(b) = self.b {
            add_column_sums(dout, n_out, 0, b.of_mut(grads), scratch);
        }
        if let Some(dinp) = dinp {
            let w = Mat::strided(self.w.offset, n_out, n_in, n_in);
            let (d, o) = (Mat::dense(rows, n_in), Mat::dense(rows, n_out));
            matmul_at(self.precision, dinp, d, dout, o, p, w, false, T::ONE, Threads::Pool);
        }
    }
}
