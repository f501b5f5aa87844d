//! NCCL for the gradients of models on a GPU (CUDA build only), opened at run time like MPI:
//! `libnccl.so.2` (the `nvidia-nccl-cu13` wheel's or the system's), or `BEIT_NCCL_LIB`. The
//! communicator's unique id goes from rank 0 to the others over MPI; the all-reduce runs on the
//! model's own CUDA stream, so it is ordered with the backward pass before it and the optimizer
//! step after it without a host synchronisation.

use std::ffi::{c_char, c_int, c_void, CStr};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DevicePtrMut;
use candle_core::{CpuStorage, CudaStorage, Device, InplaceOp1, Layout, Tensor};
use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};

use super::symbol;
use crate::error::{Error, Result};

/// NCCL's `ncclUniqueId`: 128 opaque bytes, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

/// `ncclFloat32` and `ncclSum` of nccl.h.
const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;

type Comm = *mut c_void;

struct Functions {
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> c_int,
    comm_destroy: unsafe extern "C" fn(Comm) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    get_version: unsafe extern "C" fn(*mut c_int) -> c_int,
}

/// NCCL, loaded: its functions, before any communicator.
pub struct Loaded {
    f: Functions,
    /// "NCCL 2.28.9 (libnccl.so.2)".
    pub library: String,
    _lib: Library,
}

/// Opens NCCL: `explicit` (`BEIT_NCCL_LIB`) or `libnccl.so.2` where the dynamic linker looks.
pub fn load(explicit: Option<&str>) -> Result<Loaded> {
    let path = explicit.unwrap_or("libnccl.so.2");
    // SAFETY: loading NCCL runs its initialisers, which need only the process environment.
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }.map_err(|e| {
        Error::Distributed(format!(
            "NCCL ({path}) could not be loaded ({e}): install the nvidia-nccl-cu13 wheel or the system's libnccl2 \
             and put it on LD_LIBRARY_PATH, or set BEIT_NCCL_LIB; BEIT_NCCL=0 sums GPU gradients through MPI via \
             the host instead"
        ))
    })?;
    const EXPECTED: &str = "an NCCL 2 library";
    // SAFETY: each field's type is nccl.h's prototype of the function.
    let f = unsafe {
        Functions {
            get_unique_id: symbol(&lib, path, "ncclGetUniqueId", EXPECTED)?,
            comm_init_rank: symbol(&lib, path, "ncclCommInitRank", EXPECTED)?,
            all_reduce: symbol(&lib, path, "ncclAllReduce", EXPECTED)?,
            comm_destroy: symbol(&lib, path, "ncclCommDestroy", EXPECTED)?,
            get_error_string: symbol(&lib, path, "ncclGetErrorString", EXPECTED)?,
            get_version: symbol(&lib, path, "ncclGetVersion", EXPECTED)?,
        }
    };
    let mut version = 0;
    // SAFETY: valid out-pointer.
    unsafe { (f.get_version)(&mut version) };
    let library = format!("NCCL {}.{}.{} ({path})", version / 10000, (version % 10000) / 100, version % 100);
    Ok(Loaded { f, library, _lib: lib })
}

fn check(f: &Functions, rc: c_int, what: &str) -> Result<()> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: NCCL returns a static string for any code.
    let text = unsafe { CStr::from_ptr((f.get_error_string)(rc)) }.to_string_lossy();
    Err(Error::Distributed(format!("{what} failed: {text} (NCCL error {rc})")))
}

impl Loaded {
    /// Joins `device` as rank `rank` of `world_size` into one communicator (collective: every
    /// rank calls it); `share_id` sends rank 0's unique id to every rank (MPI's broadcast).
    pub fn join(
        self,
        device: &Device,
        rank: usize,
        world_size: usize,
        share_id: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<Nccl> {
        let Device::Cuda(cuda) = device else {
            return Err(Error::Distributed("NCCL sums gradients of models on a GPU only".into()));
        };
        let mut id = UniqueId { internal: [0; 128] };
        // The id is made on rank 0 even when that fails, so every rank reaches the broadcast.
        // SAFETY: valid out-pointer.
        let made = if rank == 0 { unsafe { (self.f.get_unique_id)(&mut id) } } else { 0 };
        let mut bytes = id.internal.map(|c| c as u8);
        share_id(&mut bytes)?;
        id.internal = bytes.map(|b| b as c_char);
        check(&self.f, made, "ncclGetUniqueId")?;
        // ncclCommInitRank joins the GPU current on this thread: the model's.
        let stream = cuda.cuda_stream();
        stream.context().bind_to_thread().map_err(|e| Error::Distributed(format!("CUDA context: {e}")))?;
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: valid out-pointer; every rank passes the same id and world size.
        let rc = unsafe { (self.f.comm_init_rank)(&mut comm, world_size as c_int, id, rank as c_int) };
        check(&self.f, rc, "ncclCommInitRank")?;
        Ok(Nccl { comm, ordinal: stream.context().ordinal(), loaded: self })
    }
}

/// An NCCL communicator over the ranks of a job, one GPU per rank.
pub struct Nccl {
    comm: Comm,
    /// The GPU it was made for (a rank keeps its model on one GPU).
    pub ordinal: usize,
    pub loaded: Loaded,
}

// SAFETY: the communicator is used by one thread at a time (the trainer's lock).
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl Nccl {
    /// Sums the f32 `values` (contiguous, on this communicator's GPU) across ranks, in place, on
    /// the tensor's device stream.
    pub fn sum_in_place(&self, values: &Tensor) -> Result<()> {
        Ok(values.inplace_op1(&SumInPlace(self))?)
    }
}

/// The in-place all-reduce as a candle op: candle hands it the tensor's storage mutably.
struct SumInPlace<'a>(&'a Nccl);

impl InplaceOp1 for SumInPlace<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL sums tensors on a GPU only")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        if !layout.is_contiguous() || layout.start_offset() != 0 || storage.dtype() != candle_core::DType::F32 {
            candle_core::bail!("NCCL sums contiguous f32 gradient buffers only")
        }
        let nccl = self.0;
        let count = layout.shape().elem_count();
        let stream = storage.device().cuda_stream();
        let slice = storage.as_cuda_slice_mut::<f32>()?;
        let (ptr, _recorded) = slice.device_ptr_mut(&stream);
        // SAFETY: `ptr` holds `count` f32 on this GPU; NCCL reads and writes it on `stream`.
        let rc = unsafe {
            (nccl.loaded.f.all_reduce)(
                ptr as *const c_void,
                ptr as *mut c_void,
                count,
                NCCL_FLOAT32,
                NCCL_SUM,
                nccl.comm,
                stream.cu_stream() as *mut c_void,
            )
        };
        check(&nccl.loaded.f, rc, "ncclAllReduce").map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the communicator was made by ncclCommInitRank and is destroyed once.
        unsafe { (self.loaded.f.comm_destroy)(self.comm) };
    }
}
