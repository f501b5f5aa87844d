//! Rows of a table picked by a fixed index: y[p] = table[index[p]] (the relative position bias).
//!
//! candle's index_select has a backward, an index_add whose CUDA kernel runs one thread per
//! table column over every pick: 12 threads over 38,809 picks for BEiT-B at 224, 16 ms of a
//! 133 ms step on an H200. Here the backward is a gather instead: each table row's picks are
//! listed once, when the lookup is built, and one thread per table value sums its picks, in f32
//! and in a fixed order (deterministic, no atomics).

use candle_core::{backend::BackendStorage, bail, CpuStorage, CustomOp2, CustomOp3, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

use super::*;
use crate::float::Float;

/// A fixed index into the rows of a table, with each row's picks listed for the backward.
pub struct RowLookup {
    index: Tensor,
    picks: Picks,
}

/// The picks of each table row, CSR-style: `positions[offsets[r]..offsets[r + 1]]` are the
/// positions p with index[p] == r, in increasing order.
#[derive(Clone)]
struct Picks {
    offsets: Tensor,
    positions: Tensor,
    rows: usize,
}

impl RowLookup {
    /// A lookup of `index` into a table of `rows` rows; an index past the table is an error.
    pub fn new(index: &[u32], rows: usize, device: &Device) -> candle_core::Result<Self> {
        if let Some(p) = index.iter().position(|&i| i as usize >= rows) {
            bail!("row lookup: index[{p}] = {} but the table has {rows} rows", index[p]);
        }
        let mut offsets = vec![0u32; rows + 1];
        for &i in index {
            offsets[i as usize + 1] += 1;
        }
        for r in 0..rows {
            offsets[r + 1] += offsets[r];
        }
        let mut next = offsets.clone();
        let mut positions = vec![0u32; index.len()];
        for (p, &i) in index.iter().enumerate() {
            positions[next[i as usize] as usize] = p as u32;
            next[i as usize] += 1;
        }
        Ok(Self {
            index: Tensor::from_slice(index, index.len(), device)?,
            picks: Picks {
                offsets: Tensor::from_vec(offsets, rows + 1, device)?,
                positions: Tensor::from_vec(positions, index.len(), device)?,
                rows,
            },
        })
    }

    /// [picks, n] rows of `table` [rows, n], differentiable in the table.
    pub fn forward(&self, table: &Tensor) -> candle_core::Result<Tensor> {
        if table.rank() != 2 || table.dim(0)? != self.picks.rows {
            bail!("row lookup: expected a [{}, n] table, got shape {:?}", self.picks.rows, table.dims());
        }
        table.contiguous()?.apply_op2(&self.index, Lookup { picks: self.picks.clone() })
    }
}

/// (table [rows, n], index [picks]) -> [picks, n].
struct Lookup {
    picks: Picks,
}

fn gather<T: Float>(table: &[T], index: &[u32], n: usize) -> Vec<T> {
    index.iter().flat_map(|&i| table[i as usize * n..][..n].iter().copied()).collect()
}

impl CustomOp2 for Lookup {
    fn name(&self) -> &'static str {
        "row-lookup"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = l1.shape().elem_count() / self.picks.rows;
        let index = u32_slice(self.name(), s2, l2)?;
        let out = dispatch_float!(self.name(), s1, |t| into_storage(gather(contiguous(t, l1, self.name())?, index, n)));
        Ok((out, Shape::from((index.len(), n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        // The forward is candle's (a gather already); only the backward is replaced.
        let n = l1.shape().elem_count() / self.picks.rows;
        let picks = l2.shape().elem_count();
        Ok((s1.index_select(s2, l1, l2, 0)?, Shape::from((picks, n))))
    }

    fn bwd(
        &self,
        table: &Tensor,
        _index: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let picks = &self.picks;
        let rows = grad.contiguous()?.apply_op3_no_bwd(
            &picks.offsets,
            &picks.positions,
            &LookupBackward { rows: picks.rows },
        )?;
        Ok((Some(rows.to_dtype(table.dtype())?.reshape(table.shape())?), None))
    }
}

/// (dy [picks, n], offsets, positions) -> d table [rows, n]: each table value the sum of its
/// picks' gradients (f32 on CUDA, whatever dy's type).
struct LookupBackward {
    rows: usize,
}

fn sum_picks<T: Float>(dy: &[T], offsets: &[u32], positions: &[u32], rows: usize, n: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; rows * n];
    out.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
        for &p in &positions[offsets[r] as usize..offsets[r + 1] as usize] {
            for (o, &g) in row.iter_mut().zip(&dy[p as usize * n..][..n]) {
                *o += g;
            }
        }
    });
    out
}

impl CustomOp3 for LookupBackward {
    fn name(&self) -> &'static str {
        "row-lookup-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = *l1.dims().last().unwrap_or(&1);
        let (offsets, positions) = (u32_slice(self.name(), s2, l2)?, u32_slice(self.name(), s3, l3)?);
        let out = dispatch_float!(self.name(), s1, |dy| into_storage(sum_picks(
            contiguous(dy, l1, self.name())?,
            offsets,
            positions,
            self.rows,
            n
        )));
        Ok((out, Shape::from((self.rows, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        fn typed<T: crate::cuda::Element>(
            op: &LookupBackward,
            (s1, l1): (&CudaStorage, &Layout),
            (s2, l2): (&CudaStorage, &Layout),
            (s3, l3): (&CudaStorage, &Layout),
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            use crate::cuda::*;
            let n = *l1.dims().last().unwrap_or(&1);
            let dev = s1.device();
            let dy = input::<T>(op.name(), s1, l1)?;
            let (offsets, positions) = (u32_in(op.name(), s2, l2)?, u32_in(op.name(), s3, l3)?);
            let total = op.rows * n;
            let out = output::<f32>(dev, total)?;
            let (count, width) = (total as u64, n as i32);
            launch!(
                dev,
                &kernel::<T>("row_lookup_bwd"),
                elementwise(total),
                [&dy, &offsets, &positions, &out, &count, &width]
            )?;
            Ok((storage(out, dev), Shape::from((op.rows, n))))
        }
        crate::cuda::with_element!(self.name(), s1.dtype(), typed(self, (s1, l1), (s2, l2), (s3, l3)))
    }
}
