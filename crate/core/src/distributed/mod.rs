//! Data-parallel training over MPI (the Horovod design, PyTorch DDP's semantics): one process
//! per device, started by the user's launcher (`mpiexec`, `mpirun`, `srun --mpi=pmix`). Each
//! rank adds its batch's summed-loss gradient and loss-term count to its buffer; before an
//! update the buffers and counts are summed across ranks, so every rank takes the update of
//! one big batch and the ranks' weights stay equal bit for bit.
//!
//! MPI is opened at run time ([`mpi`]), once per process: MPI itself is per process.

pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;

use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, Result};
use mpi::{Datatype, Mpi, Op};

/// Looks up `name` in the library `lib` opened from `path` as a value of type `T` (a function
/// pointer); a missing symbol is an error saying the library is not `expected` ("an MPI
/// library").
///
/// # Safety
/// `T` must be the symbol's real type.
unsafe fn symbol<T: Copy>(lib: &libloading::os::unix::Library, path: &str, name: &str, expected: &str) -> Result<T> {
    let sym = unsafe { lib.get::<T>(name.as_bytes()) }
        .map_err(|e| Error::Distributed(format!("{path} has no {name}: not {expected} ({e})")))?;
    Ok(*sym)
}

/// Elements of f32 per all-reduce call: 25 MiB, PyTorch DDP's default bucket.
pub const BUCKET_ELEMENTS: usize = 25 * 1024 * 1024 / 4;

/// What a launcher told this process through its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The launcher and the variable that gave it away, e.g. "Open MPI (OMPI_COMM_WORLD_SIZE)".
    pub launcher: String,
    pub world_size: usize,
    pub rank: usize,
    /// The rank among this machine's processes (chooses the GPU), when the launcher says.
    pub local_rank: Option<usize>,
}

/// The launch this process's environment describes, if any (`env` reads a variable).
pub fn detect_launch(env: impl Fn(&str) -> Option<String>) -> Option<Launch> {
    let num = |k: &str| env(k).and_then(|v| v.trim().parse::<usize>().ok());
    // (launcher, size variable, rank variable, local rank variable)
    const LAUNCHERS: [(&str, &str, &str, &str); 4] = [
        ("Open MPI", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),
        ("MVAPICH", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_LOCAL_RANK"),
        // MPICH's Hydra, Intel MPI and other PMI launchers.
        ("PMI", "PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID"),
        // srun sets these in every step's tasks.
        ("Slurm", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID"),
    ];
    LAUNCHERS.iter().find_map(|&(name, size, rank, local)| {
        Some(Launch {
            launcher: format!("{name} ({size})"),
            world_size: num(size)?,
            rank: num(rank)?,
            local_rank: num(local),
        })
    })
}

/// Element-wise sums over the replicas of a data-parallel job, in place: what synchronised
/// BatchNorm needs from a communicator. Every replica calls it in the same order with the same
/// lengths. [`Communicator`] is the one across processes; tests also run replicas as threads.
pub trait ReplicaSum: Send + Sync {
    fn sum_f32(&self, values: &mut [f32]) -> Result<()>;
    fn sum_f64(&self, values: &mut [f64]) -> Result<()>;
}

impl ReplicaSum for Communicator {
    fn sum_f32(&self, values: &mut [f32]) -> Result<()> {
        Communicator::sum_f32(self, values)
    }

    fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        Communicator::sum_f64(self, values)
    }
}

/// This process's place in a data-parallel job.
pub struct Communicator {
    mpi: Mpi,
    /// MPI_THREAD_SERIALIZED: one call at a time, whichever thread makes it.
    serial: Mutex<()>,
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    /// Who launched the job, e.g. "PMI (PMI_SIZE)"; "none" for a process started alone.
    pub launcher: String,
    /// NCCL for gradients on this rank's GPU, opened at the first update that needs it.
    #[cfg(feature = "cuda")]
    nccl: Mutex<Option<Arc<nccl::Nccl>>>,
}

static COMMUNICATOR: OnceLock<Arc<Communicator>> = OnceLock::new();

/// Initialises MPI (once per process; later calls return the same communicator). The library
/// is `mpi_library` (`BEIT_MPI_LIB`), or found by the launcher's ABI. A launch whose library
/// sees another world size than the launcher started is an error naming both.
pub fn init(mpi_library: Option<&str>) -> Result<Arc<Communicator>> {
    if let Some(c) = COMMUNICATOR.get() {
        return Ok(c.clone());
    }
    let env = |k: &str| std::env::var(k).ok();
    let launch = detect_launch(env);
    let prefer_open_mpi = launch.as_ref().is_some_and(|l| l.launcher.starts_with("Open MPI"));
    disable_ucx_memory_hooks();
    let mpi = Mpi::open(&mpi::candidates(mpi_library, prefer_open_mpi, &mpi::launcher_lib_dirs()))?;
    mpi.init()?;
    let (rank, world_size) = mpi.rank_and_size()?;
    if let Some(l) = &launch {
        if l.world_size != world_size || l.rank != rank {
            return Err(Error::Distributed(format!(
                "launched by {} as rank {} of {}, but the MPI library {} ({}, {}) sees rank {rank} of {world_size}: \
                 the library does not belong to the launcher. Set BEIT_MPI_LIB to the libmpi of the mpiexec used",
                l.launcher,
                l.rank,
                l.world_size,
                mpi.path,
                mpi.version,
                mpi.abi.name()
            )));
        }
    }
    let communicator = Communicator {
        serial: Mutex::new(()),
        rank,
        world_size,
        local_rank: launch.as_ref().and_then(|l| l.local_rank).unwrap_or(rank),
        launcher: launch.map_or_else(|| "none".to_string(), |l| l.launcher),
        mpi,
        #[cfg(feature = "cuda")]
        nccl: Mutex::new(None),
    };
    Ok(COMMUNICATOR.get_or_init(|| Arc::new(communicator)).clone())
}

/// UCX (the transport under MPICH's and Open MPI's) patches libc's mmap, munmap and brk code in
/// place when it loads ("bistro" memory hooks, for its registration cache). A thread inside that
/// code while it is rewritten crashes later (a known UCX race); Node has several such threads
/// (V8's, libuv's, rayon's). Measured: 5 of 150 two-rank MPICH runs under load segfaulted, 0 of 150
/// with the hooks off. So they are off, unless the user chose a UCX memory-hook setting; set
/// before the library loads, as UCX reads its options then.
fn disable_ucx_memory_hooks() {
    const CHOSEN: [&str; 2] = ["UCX_MEM_EVENTS", "UCX_MEM_MMAP_HOOK_MODE"];
    if CHOSEN.iter().all(|k| std::env::var_os(k).is_none()) {
        std::env::set_var("UCX_MEM_EVENTS", "no");
    }
}

/// The communicator [`init`] made, if it ran.
pub fn current() -> Option<Arc<Communicator>> {
    COMMUNICATOR.get().cloned()
}

impl Communicator {
    /// "MPICH Version: 5.0.2 (/path/libmpi.so.12, MPICH ABI)".
    pub fn library(&self) -> String {
        format!("{} ({}, {})", self.mpi.version, self.mpi.path, self.mpi.abi.name())
    }

    fn serial(&self) -> std::sync::MutexGuard<'_, ()> {
        // A panic while holding the lock poisons nothing MPI keeps.
        self.serial.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sums `values` across ranks in place, in buckets of [`BUCKET_ELEMENTS`].
    pub fn sum_f32(&self, values: &mut [f32]) -> Result<()> {
        let _one = self.serial();
        for chunk in values.chunks_mut(BUCKET_ELEMENTS) {
            self.mpi.all_reduce(chunk.as_mut_ptr().cast::<c_void>(), chunk.len(), Datatype::F32, Op::Sum)?;
        }
        Ok(())
    }

    /// Sums small f64 vectors (counts, metrics) across ranks in place.
    pub fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        let _one = self.serial();
        self.mpi.all_reduce(values.as_mut_ptr().cast::<c_void>(), values.len(), Datatype::F64, Op::Sum)
    }

    /// The element-wise maximum across ranks, in place.
    pub fn max_f64(&self, values: &mut [f64]) -> Result<()> {
        let _one = self.serial();
        self.mpi.all_reduce(values.as_mut_ptr().cast::<c_void>(), values.len(), Datatype::F64, Op::Max)
    }

    /// Rank 0's `values` on every rank (the lengths must agree).
    pub fn broadcast_f32(&self, values: &mut [f32]) -> Result<()> {
        let _one = self.serial();
        for chunk in values.chunks_mut(BUCKET_ELEMENTS) {
            self.mpi.broadcast(chunk.as_mut_ptr().cast::<c_void>(), chunk.len(), Datatype::F32, 0)?;
        }
        Ok(())
    }

    /// Rank 0's small f64 values (a step number, a length) on every rank.
    pub fn broadcast_f64(&self, values: &mut [f64]) -> Result<()> {
        self.broadcast_f64_from(0, values)
    }

    fn broadcast_f64_from(&self, root: usize, values: &mut [f64]) -> Result<()> {
        let _one = self.serial();
        self.mpi.broadcast(values.as_mut_ptr().cast::<c_void>(), values.len(), Datatype::F64, root)
    }

    /// Rank 0's bytes on every rank (the lengths must agree).
    pub fn broadcast_bytes(&self, bytes: &mut [u8]) -> Result<()> {
        self.broadcast_bytes_from(0, bytes)
    }

    fn broadcast_bytes_from(&self, root: usize, bytes: &mut [u8]) -> Result<()> {
        let _one = self.serial();
        for chunk in bytes.chunks_mut(1 << 30) {
            self.mpi.broadcast(chunk.as_mut_ptr().cast::<c_void>(), chunk.len(), Datatype::Byte, root)?;
        }
        Ok(())
    }

    /// Rank `root`'s text on every rank.
    pub fn broadcast_text(&self, root: usize, text: &str) -> Result<String> {
        let mut len = [text.len() as f64];
        self.broadcast_f64_from(root, &mut len)?;
        let mut bytes = if self.rank == root { text.as_bytes().to_vec() } else { vec![0u8; len[0] as usize] };
        self.broadcast_bytes_from(root, &mut bytes)?;
        String::from_utf8(bytes).map_err(|e| Error::Distributed(format!("rank 0 sent text that is not UTF-8: {e}")))
    }

    /// Every rank's outcome of a local check, agreed: Ok on every rank when it passed on
    /// every rank; else an error on every rank, the lowest failing rank's (every rank reports
    /// it, so it is seen whichever rank's output survives the job's end). Keeps one rank's
    /// failure from leaving the others waiting in the next collective.
    pub fn agree<T>(&self, local: Result<T>) -> Result<T> {
        let mut failed = [if local.is_err() { (self.world_size - self.rank) as f64 } else { 0.0 }];
        self.max_f64(&mut failed)?;
        if failed[0] == 0.0 {
            return local;
        }
        let root = self.world_size - failed[0] as usize;
        let message = self.broadcast_text(root, &local.as_ref().err().map(ToString::to_string).unwrap_or_default())?;
        match local {
            Err(e) if self.rank == root => Err(e),
            _ => Err(Error::Distributed(format!("rank {root} failed: {message}"))),
        }
    }

    /// Checks that `json` (a config, a dataset's description) is the same on every rank as on
    /// rank 0; a difference is an error on every rank, naming the rank and the first field
    /// that differs.
    pub fn check_same(&self, what: &str, json: &str) -> Result<()> {
        let root = self.broadcast_text(0, json)?;
        let local = if root == json {
            Ok(())
        } else {
            Err(Error::Input(format!(
                "rank {}'s {what} differs from rank 0's: {}",
                self.rank,
                first_difference(&root, json)
            )))
        };
        self.agree(local)
    }

    /// NCCL over every rank's GPU for gradients on `device` (collective: every rank's first
    /// update on a GPU opens it); None when `BEIT_NCCL=0` asks for MPI via the host. A model
    /// stays on one GPU per rank.
    #[cfg(feature = "cuda")]
    pub fn nccl(&self, device: &candle_core::Device) -> Result<Option<Arc<nccl::Nccl>>> {
        if std::env::var("BEIT_NCCL").is_ok_and(|v| v == "0") {
            return Ok(None);
        }
        let mut slot = self.nccl.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = slot.as_ref() {
            if device.location() != (candle_core::DeviceLocation::Cuda { gpu_id: n.ordinal }) {
                return Err(Error::Distributed(format!(
                    "this rank's NCCL communicator is for cuda:{}; a distributed model stays on one GPU",
                    n.ordinal
                )));
            }
            return Ok(Some(n.clone()));
        }
        let explicit = std::env::var("BEIT_NCCL_LIB").ok().filter(|s| !s.is_empty());
        // Every rank must have NCCL before any of them waits for rank 0's id.
        let loaded = self.agree(nccl::load(explicit.as_deref()))?;
        let opened = Arc::new(loaded.join(device, self.rank, self.world_size, |id| self.broadcast_bytes(id))?);
        *slot = Some(opened.clone());
        Ok(Some(opened))
    }

    pub fn barrier(&self) -> Result<()> {
        let _one = self.serial();
        self.mpi.barrier()
    }

    /// Ends every rank of the job with `code` (MPI_Abort); for a rank that failed.
    pub fn abort(&self, code: i32) {
        self.mpi.abort(code)
    }

    /// MPI_Finalize (once; for a clean exit).
    pub fn finalize(&self) -> Result<()> {
        let _one = self.serial();
        self.mpi.finalize()
    }
}

/// The first field where two JSON texts differ, "path: rank 0 has A, this rank B".
pub fn first_difference(root: &str, local: &str) -> String {
    use serde_json::Value;
    fn walk(path: &str, a: &Value, b: &Value) -> Option<String> {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                keys.into_iter().find_map(|k| {
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    walk(&p, x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null))
                })
            }
            (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
                x.iter().zip(y).enumerate().find_map(|(i, (a, b))| walk(&format!("{path}[{i}]"), a, b))
            }
            _ if a == b => None,
            _ => Some(format!("{}: rank 0 has {a}, this rank {b}", if path.is_empty() { "value" } else { path })),
        }
    }
    match (serde_json::from_str::<serde_json::Value>(root), serde_json::from_str::<serde_json::Value>(local)) {
        (Ok(a), Ok(b)) => walk("", &a, &b).unwrap_or_else(|| "the same values, written differently".into()),
        _ => format!("rank 0 has {root}, this rank {local}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn launchers_are_recognised_by_their_variables() {
        assert_eq!(detect_launch(env_of(&[])), None);
        let hydra = detect_launch(env_of(&[("PMI_SIZE", "2"), ("PMI_RANK", "1"), ("MPI_LOCALRANKID", "1")])).unwrap();
        assert_eq!(hydra, Launch { launcher: "PMI (PMI_SIZE)".into(), world_size: 2, rank: 1, local_rank: Some(1) });
        let ompi = detect_launch(env_of(&[
            ("OMPI_COMM_WORLD_SIZE", "16"),
            ("OMPI_COMM_WORLD_RANK", "9"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("PMI_SIZE", "3"),
        ]))
        .unwrap();
        assert_eq!(
            (ompi.launcher.as_str(), ompi.world_size, ompi.rank, ompi.local_rank),
            ("Open MPI (OMPI_COMM_WORLD_SIZE)", 16, 9, Some(1))
        );
        let slurm =
            detect_launch(env_of(&[("SLURM_STEP_NUM_TASKS", "8"), ("SLURM_PROCID", "3"), ("SLURM_LOCALID", "3")]))
                .unwrap();
        assert_eq!((slurm.world_size, slurm.rank), (8, 3));
        // An allocation's variables without a step's rank are no launch.
        assert_eq!(detect_launch(env_of(&[("SLURM_STEP_NUM_TASKS", "8")])), None);
    }

    #[test]
    fn an_explicit_library_is_the_only_candidate() {
        assert_eq!(mpi::candidates(Some("/opt/mpi/lib/libmpi.so"), false, &[]), vec!["/opt/mpi/lib/libmpi.so"]);
        let found = mpi::candidates(None, true, &[]);
        assert_eq!(found.first().map(String::as_str), Some("libmpi.so.40"));
        let found = mpi::candidates(None, false, &[]);
        assert_eq!(found, ["libmpi_abi.so.1", "libmpi_abi.so", "libmpi.so.12", "libmpi.so.40"]);
        // A launcher's folder comes first, with the names it has.
        let dir = std::env::temp_dir().join(format!("beit-mpi-candidates-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("libmpi.so.12"), b"").unwrap();
        let found = mpi::candidates(None, false, std::slice::from_ref(&dir));
        assert_eq!(found[0], dir.join("libmpi.so.12").to_string_lossy());
        assert_eq!(found.len(), 5);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_library_is_named_in_the_error() {
        let err = match mpi::Mpi::open(&["/nonexistent/libmpi.so.12".to_string()]) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("opened a library that does not exist"),
        };
        assert!(err.contains("/nonexistent/libmpi.so.12") && err.contains("BEIT_MPI_LIB"), "{err}");
    }

    #[test]
    fn differences_name_the_first_field() {
        let d = first_difference(r#"{"a":1,"b":{"c":[1,2]}}"#, r#"{"a":1,"b":{"c":[1,3]}}"#);
        assert_eq!(d, "b.c[1]: rank 0 has 2, this rank 3");
        assert_eq!(first_difference(r#"{"size":10}"#, r#"{"size":9}"#), "size: rank 0 has 10, this rank 9");
    }
}
