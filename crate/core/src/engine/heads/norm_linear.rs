//! The part of a head that both BEiT heads share: rows of the hidden states (as they are, or
//! the mean of an image's patch rows), a LayerNorm, and a linear layer to logits.

use rayon::prelude::*;

use crate::config::Precision;
use crate::engine::block::{Norm, Shapes};
use crate::engine::linear::Linear;
use crate::engine::simd::Real;
use crate::engine::sized;
use crate::params::{Layout, LinearParams, NormParams};

/// Where a head's input rows come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// Each listed row as it is (masked patches, or [CLS] rows).
    Rows,
    /// The mean of the patch rows that follow each listed [CLS] row.
    MeanOfPatches,
}

/// LayerNorm then linear on rows of the hidden states, with the buffers of the last batch
/// (they only grow: the row count varies with the masks).
pub struct NormLinear<T> {
    norm: Norm,
    linear: Linear,
    pool: Pool,
    /// The rows of x the head reads, set by the caller before [`Self::forward`].
    pub rows: Vec<usize>,
    input: Vec<T>,
    mean: Vec<T>,
    rstd: Vec<T>,
    normed: Vec<T>,
    logits: Vec<T>,
    dnormed: Vec<T>,
    dinput: Vec<T>,
    scratch: Vec<T>,
}

impl<T: Real> NormLinear<T> {
    pub fn new(norm: &NormParams, linear: &LinearParams, pool: Pool, layout: &Layout, precision: Precision) -> Self {
        Self {
            norm: Norm::new(norm, layout),
            linear: Linear::new(linear, layout, precision),
            pool,
            rows: Vec::new(),
            input: Vec::new(),
            mean: Vec::new(),
            rstd: Vec::new(),
            normed: Vec::new(),
            logits: Vec::new(),
            dnormed: Vec::new(),
            dinput: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Runs the linear layer's GEMMs at `precision` from the next pass on.
    pub fn set_precision(&mut self, precision: Precision) {
        self.linear.precision = precision;
    }

    pub fn outputs(&self) -> usize {
        self.linear.n_out
    }

    /// The logits [rows, outputs] of `self.rows` of x; a loss may overwrite them with its
    /// gradient for [`Self::backward`].
    pub fn forward(&mut self, p: &[T], x: &[T], s: Shapes) -> &mut [T] {
        let (d, m) = (s.d, self.rows.len());
        let input = sized(&mut self.input, m * d);
        let rows = &self.rows;
        if self.pool == Pool::MeanOfPatches {
            let inv = T::from_f64(1.0 / s.patches as f64);
            input.par_chunks_mut(d).zip(rows.par_iter()).for_each(|(o, &r)| {
                o.fill(T::ZERO);
                for j in 1..=s.patches {
                    for (v, &x) in o.iter_mut().zip(&x[(r + j) * d..(r + j + 1) * d]) {
                        *v += x;
                    }
                }
                for v in o.iter_mut() {
                    *v = *v * inv;
                }
            });
        } else {
            input.par_chunks_mut(d).zip(rows.par_iter()).for_each(|(o, &r)| o.copy_from_slice(&x[r * d..(r + 1) * d]));
        }
        let normed = sized(&mut self.normed, m * d);
        self.norm.forward(p, &self.input[..m * d], normed, sized(&mut self.mean, m), sized(&mut self.rstd, m));
        let logits = sized(&mut self.logits, m * self.linear.n_out);
        self.linear.forward(p, &self.normed[..m * d], logits);
        logits
    }

    /// Backward from d logits (left in the logits buffer by the loss): the weight gradients
    /// into `grads`, d x added into `dx`.
    pub fn backward(&mut self, p: &[T], grads: &mut [T], s: Shapes, dx: &mut [T]) {
        let (d, m) = (s.d, self.rows.len());
        let dlogits = &self.logits[..m * self.linear.n_out];
        let dnormed = sized(&mut self.dnormed, m * d);
        self.linear.backward(p, grads, &self.normed[..m * d], dlogits, Some(dnormed), &mut self.scratch);
        let dinput = sized(&mut self.dinput, m * d);
        dinput.fill(T::ZERO);
        let stats = (&self.mean[..m], &self.rstd[..m]);
        self.norm.backward(p, grads, &self.input[..m * d], stats, &self.dnormed[..m * d], dinput, &mut self.scratch);
        let inv = T::from_f64(1.0 / s.patches as f64);
        for (g, &r) in self.dinput.chunks_exact(d).zip(&self.rows) {
            if self.pool == Pool::MeanOfPatches {
                for j in 1..=s.patches {
                    for (o, &v) in dx[(r + j) * d..(r + j + 1) * d].iter_mut().zip(g) {
                        *o += v * inv;
                    }
                }
            } else {
                for (o, &v) in dx[r * d..(r + 1) * d].iter_mut().zip(g) {
                    *o += v;
                }
            }
        }
    }
}
