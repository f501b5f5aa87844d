//! Data parallelism over MPI: the process's place in the job, small collectives for the
//! training loops (metrics, agreement, barriers) and the way out of a failed job. The models'
//! `distribute` (in `trainer_methods!`) makes their updates sum gradients across ranks.

use std::sync::Arc;

use beit_core::distributed::{self, Communicator};
use napi::bindgen_prelude::*;
use napi_derive::napi;

use crate::{guarded, job, Job};

/// What a launcher (mpiexec, mpirun, srun) told this process through its environment.
#[napi(object)]
pub struct Launch {
    /// The launcher and the variable that gave it away, e.g. "PMI (PMI_SIZE)".
    pub launcher: String,
    pub world_size: u32,
    pub rank: u32,
    pub local_rank: Option<u32>,
}

/// This process's place in a data-parallel job.
#[napi(object)]
pub struct DistributedInfo {
    pub rank: u32,
    pub world_size: u32,
    /// The rank among this machine's processes: it chooses the GPU.
    pub local_rank: u32,
    /// "PMI (PMI_SIZE)", "Open MPI (OMPI_COMM_WORLD_SIZE)", "Slurm (SLURM_STEP_NUM_TASKS)", or
    /// "none" for a process started alone.
    pub launcher: String,
    /// MPI_Get_library_version's first line, the file and its ABI.
    pub mpi_library: String,
}

/// The launch this process's environment describes, or null when no launcher started it.
#[napi]
pub fn detect_launch() -> Option<Launch> {
    distributed::detect_launch(|k| std::env::var(k).ok()).map(|l| Launch {
        launcher: l.launcher,
        world_size: l.world_size as u32,
        rank: l.rank as u32,
        local_rank: l.local_rank.map(|r| r as u32),
    })
}

pub(crate) fn communicator() -> beit_core::Result<Arc<Communicator>> {
    distributed::current()
        .ok_or_else(|| beit_core::Error::Distributed("MPI is not initialised: call initDistributed() first".into()))
}

/// Opens MPI (`mpiLibrary`, else `BEIT_MPI_LIB`, else the launcher's ABI's libraries) and
/// initialises it, once per process. An error when the library sees another world than the
/// launcher started.
#[napi]
pub fn init_distributed(mpi_library: Option<String>) -> Result<DistributedInfo> {
    guarded(|| {
        let explicit = mpi_library.or_else(|| std::env::var("BEIT_MPI_LIB").ok().filter(|s| !s.is_empty()));
        let c = distributed::init(explicit.as_deref())?;
        Ok(DistributedInfo {
            rank: c.rank as u32,
            world_size: c.world_size as u32,
            local_rank: c.local_rank as u32,
            launcher: c.launcher.clone(),
            mpi_library: c.library(),
        })
    })
}

/// `values` reduced element-wise over every rank by `reduce` (a sum or a max).
fn across_ranks(
    values: Float64Array,
    reduce: fn(&Communicator, &mut [f64]) -> beit_core::Result<()>,
) -> Result<Float64Array> {
    guarded(|| {
        let mut v = values.to_vec();
        reduce(&*communicator()?, &mut v)?;
        Ok(v)
    })
    .map(Float64Array::new)
}

/// Element-wise sums of `values` over every rank (metrics, counts).
#[napi]
pub fn sum_across_ranks(values: Float64Array) -> Result<Float64Array> {
    across_ranks(values, Communicator::sum_f64)
}

/// Element-wise maxima of `values` over every rank (agreement on stopping).
#[napi]
pub fn max_across_ranks(values: Float64Array) -> Result<Float64Array> {
    across_ranks(values, Communicator::max_f64)
}

/// Errors on every rank unless `json` is the same on every rank as on rank 0; the rank that
/// differs names the first field that does.
#[napi]
pub fn check_same_across_ranks(what: String, json: String) -> Result<()> {
    guarded(|| communicator()?.check_same(&what, &json))
}

/// Resolves when every rank has called it.
#[napi(ts_return_type = "Promise<void>")]
pub fn barrier() -> AsyncTask<Job<(), ()>> {
    job(|| communicator()?.barrier(), |()| Ok(()))
}

/// Ends every rank of the job with `code` (MPI_Abort): for a rank that failed, so that no
/// other rank waits for it.
#[napi]
pub fn abort_distributed(code: i32) {
    if let Some(c) = distributed::current() {
        c.abort(code);
    }
}

/// MPI_Finalize, for a clean exit (nothing when MPI was never initialised).
#[napi]
pub fn finalize_distributed() -> Result<()> {
    guarded(|| distributed::current().map_or(Ok(()), |c| c.finalize()))
}
