//! MPI, opened at run time (dlopen), so that the addon needs no MPI to load and works with the
//! library of whichever launcher started it. Three ABIs are in use and each spells its handles
//! differently:
//! - the MPI 5 standard ABI (`libmpi_abi.so.1`: MPICH 5+, Open MPI 6+): pointer-sized handles
//!   with values fixed by the standard (`mpi_abi.h`);
//! - MPICH's (`libmpi.so.12`: MPICH, Intel MPI, Cray MPICH, MVAPICH): `int` handles;
//! - Open MPI 4/5's (`libmpi.so.40`): pointers to the library's own predefined objects
//!   (`&ompi_mpi_comm_world`), found with dlsym.
//!
//! Only what data-parallel training needs is bound: init, rank and size, in-place all-reduce
//! (sum, max), broadcast, barrier, abort, finalize and the library's version string.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};

use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};

use super::symbol;
use crate::error::{Error, Result};

/// The MPI ABI a library implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abi {
    Standard,
    Mpich,
    OpenMpi,
}

impl Abi {
    pub fn name(self) -> &'static str {
        match self {
            Abi::Standard => "MPI 5 standard ABI",
            Abi::Mpich => "MPICH ABI",
            Abi::OpenMpi => "Open MPI ABI",
        }
    }

    /// The library file names of the ABI, most specific first.
    fn sonames(self) -> &'static [&'static str] {
        match self {
            Abi::Standard => &["libmpi_abi.so.1", "libmpi_abi.so"],
            Abi::Mpich => &["libmpi.so.12"],
            Abi::OpenMpi => &["libmpi.so.40"],
        }
    }
}

/// Element types the collectives move.
#[derive(Clone, Copy, Debug)]
pub enum Datatype {
    F32,
    F64,
    Byte,
}

/// Reductions.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    Sum,
    Max,
}

/// A library's handles, as the ABI spells them.
struct Handles<H> {
    world: H,
    f32: H,
    f64: H,
    byte: H,
    sum: H,
    max: H,
    in_place: *const c_void,
    thread_serialized: c_int,
}

impl<H: Copy> Handles<H> {
    fn datatype(&self, t: Datatype) -> H {
        match t {
            Datatype::F32 => self.f32,
            Datatype::F64 => self.f64,
            Datatype::Byte => self.byte,
        }
    }

    fn op(&self, op: Op) -> H {
        match op {
            Op::Sum => self.sum,
            Op::Max => self.max,
        }
    }
}

/// The MPI functions bound, over a handle type `H` (`c_int` for MPICH's ABI, a pointer
/// otherwise).
struct Functions<H> {
    init_thread: unsafe extern "C" fn(*mut c_int, *mut *mut *mut c_char, c_int, *mut c_int) -> c_int,
    initialized: unsafe extern "C" fn(*mut c_int) -> c_int,
    finalized: unsafe extern "C" fn(*mut c_int) -> c_int,
    finalize: unsafe extern "C" fn() -> c_int,
    comm_rank: unsafe extern "C" fn(H, *mut c_int) -> c_int,
    comm_size: unsafe extern "C" fn(H, *mut c_int) -> c_int,
    allreduce: unsafe extern "C" fn(*const c_void, *mut c_void, c_int, H, H, H) -> c_int,
    bcast: unsafe extern "C" fn(*mut c_void, c_int, H, c_int, H) -> c_int,
    barrier: unsafe extern "C" fn(H) -> c_int,
    abort: unsafe extern "C" fn(H, c_int) -> c_int,
    get_library_version: unsafe extern "C" fn(*mut c_char, *mut c_int) -> c_int,
}

/// What the rest of the crate calls, whatever the ABI.
trait Calls: Send + Sync {
    fn init_serialized(&self) -> Result<()>;
    fn rank_and_size(&self) -> Result<(usize, usize)>;
    /// In-place all-reduce of `count` elements at `buf`.
    fn all_reduce(&self, buf: *mut c_void, count: usize, t: Datatype, op: Op) -> Result<()>;
    fn broadcast(&self, buf: *mut c_void, count: usize, t: Datatype, root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    fn abort(&self, code: i32);
    fn finalize(&self) -> Result<()>;
    fn library_version(&self) -> String;
}

struct Bound<H> {
    f: Functions<H>,
    h: Handles<H>,
}

// SAFETY: the handles are constants or addresses of the library's immutable predefined
// objects; calls are serialised by `Mpi`'s users (MPI_THREAD_SERIALIZED is requested).
unsafe impl<H> Send for Bound<H> {}
unsafe impl<H> Sync for Bound<H> {}

fn check(rc: c_int, what: &str) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::Distributed(format!("{what} failed with MPI error code {rc}")))
    }
}

fn count_arg(count: usize, what: &str) -> Result<c_int> {
    c_int::try_from(count)
        .map_err(|_| Error::Distributed(format!("{what}: {count} elements exceed MPI's int count; split the buffer")))
}

impl<H: Copy> Calls for Bound<H> {
    fn init_serialized(&self) -> Result<()> {
        let mut flag = 0;
        // SAFETY: valid out-pointers; MPI_Initialized may be called before MPI_Init.
        check(unsafe { (self.f.initialized)(&mut flag) }, "MPI_Initialized")?;
        if flag != 0 {
            return Ok(());
        }
        let mut provided = 0;
        // SAFETY: MPI_Init_thread accepts null argc/argv.
        check(
            unsafe {
                (self.f.init_thread)(
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    self.h.thread_serialized,
                    &mut provided,
                )
            },
            "MPI_Init_thread",
        )?;
        // The steps run on libuv's worker threads, one at a time: MPI_THREAD_SERIALIZED.
        if provided < self.h.thread_serialized {
            return Err(Error::Distributed(format!(
                "the MPI library provides thread level {provided}, below MPI_THREAD_SERIALIZED ({}): beit calls MPI from \
                 Node's worker threads, one at a time",
                self.h.thread_serialized
            )));
        }
        Ok(())
    }

    fn rank_and_size(&self) -> Result<(usize, usize)> {
        let (mut rank, mut size) = (0, 0);
        // SAFETY: MPI is initialised; valid out-pointers.
        check(unsafe { (self.f.comm_rank)(self.h.world, &mut rank) }, "MPI_Comm_rank")?;
        check(unsafe { (self.f.comm_size)(self.h.world, &mut size) }, "MPI_Comm_size")?;
        Ok((rank as usize, size as usize))
    }

    fn all_reduce(&self, buf: *mut c_void, count: usize, t: Datatype, op: Op) -> Result<()> {
        let n = count_arg(count, "MPI_Allreduce")?;
        // SAFETY: `buf` holds `count` elements of `t` (the callers' slices).
        check(
            unsafe { (self.f.allreduce)(self.h.in_place, buf, n, self.h.datatype(t), self.h.op(op), self.h.world) },
            "MPI_Allreduce",
        )
    }

    fn broadcast(&self, buf: *mut c_void, count: usize, t: Datatype, root: usize) -> Result<()> {
        let n = count_arg(count, "MPI_Bcast")?;
        // SAFETY: `buf` holds `count` elements of `t`.
        check(unsafe { (self.f.bcast)(buf, n, self.h.datatype(t), root as c_int, self.h.world) }, "MPI_Bcast")
    }

    fn barrier(&self) -> Result<()> {
        // SAFETY: MPI is initialised.
        check(unsafe { (self.f.barrier)(self.h.world) }, "MPI_Barrier")
    }

    fn abort(&self, code: i32) {
        // SAFETY: MPI is initialised; MPI_Abort does not return on success.
        unsafe { (self.f.abort)(self.h.world, code) };
    }

    fn finalize(&self) -> Result<()> {
        let mut done = 0;
        // SAFETY: valid out-pointer.
        check(unsafe { (self.f.finalized)(&mut done) }, "MPI_Finalized")?;
        if done != 0 {
            return Ok(());
        }
        // SAFETY: MPI was initialised by this process and is not yet finalised.
        check(unsafe { (self.f.finalize)() }, "MPI_Finalize")
    }

    fn library_version(&self) -> String {
        // 8192 is MPICH's and the standard ABI's MPI_MAX_LIBRARY_VERSION_STRING (Open MPI: 256).
        let mut buf = vec![0 as c_char; 8192];
        let mut len = 0;
        // SAFETY: the buffer has MPI_MAX_LIBRARY_VERSION_STRING bytes; callable before init.
        if unsafe { (self.f.get_library_version)(buf.as_mut_ptr(), &mut len) } != 0 {
            return "unknown version".into();
        }
        // SAFETY: MPI writes a NUL-terminated string into the buffer.
        let text = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
        // MPICH pads its "Version:" field with spaces.
        text.lines().next().unwrap_or("").split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

/// An opened MPI library.
pub struct Mpi {
    calls: Box<dyn Calls>,
    pub abi: Abi,
    /// Where it was found (as given to dlopen).
    pub path: String,
    /// The first line of `MPI_Get_library_version`.
    pub version: String,
    // Last: the function pointers above point into it.
    _library: Library,
}

/// The address of the data symbol `name` (Open MPI's predefined handles).
fn address(lib: &Library, path: &str, name: &str) -> Result<usize> {
    // SAFETY: only the symbol's address is taken, never read through here.
    let sym = unsafe { lib.get::<*mut c_void>(name.as_bytes()) }
        .map_err(|e| Error::Distributed(format!("{path} has no {name}: not an Open MPI library ({e})")))?;
    Ok(sym.into_raw() as usize)
}

fn functions<H: Copy>(lib: &Library, path: &str) -> Result<Functions<H>> {
    // SAFETY: the types are the MPI standard's C prototypes with the ABI's handle type.
    unsafe {
        Ok(Functions {
            init_thread: symbol(lib, path, "MPI_Init_thread", "an MPI library")?,
            initialized: symbol(lib, path, "MPI_Initialized", "an MPI library")?,
            finalized: symbol(lib, path, "MPI_Finalized", "an MPI library")?,
            finalize: symbol(lib, path, "MPI_Finalize", "an MPI library")?,
            comm_rank: symbol(lib, path, "MPI_Comm_rank", "an MPI library")?,
            comm_size: symbol(lib, path, "MPI_Comm_size", "an MPI library")?,
            allreduce: symbol(lib, path, "MPI_Allreduce", "an MPI library")?,
            bcast: symbol(lib, path, "MPI_Bcast", "an MPI library")?,
            barrier: symbol(lib, path, "MPI_Barrier", "an MPI library")?,
            abort: symbol(lib, path, "MPI_Abort", "an MPI library")?,
            get_library_version: symbol(lib, path, "MPI_Get_library_version", "an MPI library")?,
        })
    }
}

/// The ABI of an opened library: Open MPI's exports its predefined objects; the standard ABI
/// is named so by its file (MPICH's `libmpi.so.12` exports the `MPI_Abi_*` queries too).
fn detect_abi(lib: &Library, path: &str) -> Abi {
    // SAFETY: only presence is checked.
    if unsafe { lib.get::<*mut c_void>(b"ompi_mpi_comm_world") }.is_ok() {
        return Abi::OpenMpi;
    }
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| PathBuf::from(path));
    let named_abi = |p: &Path| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libmpi_abi"));
    if named_abi(Path::new(path)) || named_abi(&real) {
        Abi::Standard
    } else {
        Abi::Mpich
    }
}

fn bind(lib: &Library, path: &str, abi: Abi) -> Result<Box<dyn Calls>> {
    Ok(match abi {
        // Values from mpi_abi.h (MPI 5.0, chapter 20).
        Abi::Standard => Box::new(Bound::<usize> {
            f: functions(lib, path)?,
            h: Handles {
                world: 0x101,
                f32: 0x210,
                f64: 0x214,
                byte: 0x247,
                sum: 0x21,
                max: 0x23,
                in_place: std::ptr::without_provenance(1),
                thread_serialized: 2048,
            },
        }),
        // Values from MPICH's mpi.h.
        Abi::Mpich => Box::new(Bound::<c_int> {
            f: functions(lib, path)?,
            h: Handles {
                world: 0x4400_0000,
                f32: 0x4c00_040a,
                f64: 0x4c00_080b,
                byte: 0x4c00_010d,
                sum: 0x5800_0003,
                max: 0x5800_0001,
                in_place: std::ptr::without_provenance(usize::MAX),
                thread_serialized: 2,
            },
        }),
        Abi::OpenMpi => Box::new(Bound::<usize> {
            f: functions(lib, path)?,
            h: Handles {
                world: address(lib, path, "ompi_mpi_comm_world")?,
                f32: address(lib, path, "ompi_mpi_float")?,
                f64: address(lib, path, "ompi_mpi_double")?,
                byte: address(lib, path, "ompi_mpi_byte")?,
                sum: address(lib, path, "ompi_mpi_op_sum")?,
                max: address(lib, path, "ompi_mpi_op_max")?,
                in_place: std::ptr::without_provenance(1),
                thread_serialized: 2,
            },
        }),
    })
}

/// Where to look for an MPI library: `explicit` (`BEIT_MPI_LIB`) alone when set; else each
/// ABI's names (Open MPI's first under Open MPI's launcher) in `launcher_dirs` (the launcher's
/// own `lib` folders, see [`launcher_lib_dirs`]), then where the dynamic linker looks.
pub fn candidates(explicit: Option<&str>, prefer_open_mpi: bool, launcher_dirs: &[PathBuf]) -> Vec<String> {
    if let Some(lib) = explicit {
        return vec![lib.to_string()];
    }
    let abis: &[Abi] = if prefer_open_mpi {
        &[Abi::OpenMpi, Abi::Standard, Abi::Mpich]
    } else {
        &[Abi::Standard, Abi::Mpich, Abi::OpenMpi]
    };
    let names = || abis.iter().flat_map(|a| a.sonames());
    let mut out: Vec<String> = launcher_dirs
        .iter()
        .flat_map(|dir| names().map(move |name| dir.join(name)))
        .filter(|p| p.exists())
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    out.extend(names().map(|s| s.to_string()));
    out
}

/// The `lib` folders of the launcher that started this process: beside the parent process's
/// program (Hydra's `hydra_pmi_proxy`, Open MPI's `orted`, as the `mpich` wheel installs
/// them), then beside the `mpiexec` on the PATH.
pub fn launcher_lib_dirs() -> Vec<PathBuf> {
    let lib_of = |exe: PathBuf| Some(std::fs::canonicalize(&exe).unwrap_or(exe).parent()?.parent()?.join("lib"));
    let parent = std::fs::read_to_string("/proc/self/stat").ok().and_then(|stat| {
        // The fourth field, after the parenthesised command name (which may hold spaces).
        let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.to_string();
        lib_of(std::fs::read_link(format!("/proc/{ppid}/exe")).ok()?)
    });
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path).map(|d| d.join("mpiexec")).find(|e| e.is_file()).and_then(lib_of)
    });
    let mut dirs: Vec<PathBuf> = parent.into_iter().chain(on_path).filter(|d| d.is_dir()).collect();
    dirs.dedup();
    dirs
}

impl Mpi {
    /// Opens the first of `candidates` that loads, and binds it.
    pub fn open(candidates: &[String]) -> Result<Self> {
        let mut tried = Vec::new();
        for path in candidates {
            // RTLD_GLOBAL: Open MPI's own plugins resolve libmpi's symbols from the global scope.
            // SAFETY: loading a shared library runs its initialisers; MPI libraries have none
            // that need more than the process environment.
            match unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) } {
                Ok(lib) => {
                    let abi = detect_abi(&lib, path);
                    let calls = bind(&lib, path, abi)?;
                    let version = calls.library_version();
                    return Ok(Self { calls, abi, path: path.clone(), version, _library: lib });
                }
                Err(e) => tried.push(format!("{path} ({e})")),
            }
        }
        Err(Error::Distributed(format!(
            "no MPI library could be loaded; tried {}. Set BEIT_MPI_LIB to the libmpi of the mpiexec that \
             launched this job",
            tried.join(", ")
        )))
    }

    pub fn init(&self) -> Result<()> {
        self.calls.init_serialized()
    }

    pub fn rank_and_size(&self) -> Result<(usize, usize)> {
        self.calls.rank_and_size()
    }

    pub fn all_reduce(&self, buf: *mut c_void, count: usize, t: Datatype, op: Op) -> Result<()> {
        self.calls.all_reduce(buf, count, t, op)
    }

    pub fn broadcast(&self, buf: *mut c_void, count: usize, t: Datatype, root: usize) -> Result<()> {
        self.calls.broadcast(buf, count, t, root)
    }

    pub fn barrier(&self) -> Result<()> {
        self.calls.barrier()
    }

    pub fn abort(&self, code: i32) {
        self.calls.abort(code)
    }

    pub fn finalize(&self) -> Result<()> {
        self.calls.finalize()
    }
}
