//! beit's CUDA kernels (crate/core/cuda/kernels.cu) run on the host: each CUDA thread is an OS
//! thread, so barriers, warp shuffles and atomics really synchronise, and the kernels' indexing
//! and reductions are exercised without a GPU. Launches use beit-core's own geometry
//! ([`beit_core::launch`]). Slow by design: for tests on small shapes only.

use std::ffi::{c_char, c_void, CString};

use beit_core::launch::Geometry;

extern "C" {
    fn emulated_launch(
        name: *const c_char,
        grid_x: u32,
        grid_y: u32,
        grid_z: u32,
        threads: u32,
        args: *mut *mut c_void,
        sizes: *const usize,
        count: usize,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
}

/// The arguments of one kernel launch, pushed in the kernel's order, as with cudarc's builder.
/// Buffers are borrowed for the launch; scalars are copied.
#[derive(Default)]
pub struct Launch<'a> {
    values: Vec<Vec<u8>>,
    _buffers: std::marker::PhantomData<&'a mut [u8]>,
}

impl<'a> Launch<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    /// A device pointer argument (`const T*` or `T*`).
    pub fn buffer<T>(mut self, data: &'a mut [T]) -> Self {
        self.values.push((data.as_mut_ptr() as usize).to_ne_bytes().to_vec());
        self
    }

    /// A scalar argument, by value: its Rust type's width must match the kernel's parameter.
    pub fn scalar<T: Copy>(mut self, v: T) -> Self {
        // SAFETY: T is Copy (plain data); its bytes are read once, here.
        let bytes = unsafe { std::slice::from_raw_parts(&v as *const T as *const u8, std::mem::size_of::<T>()) };
        self.values.push(bytes.to_vec());
        self
    }

    /// Runs kernel `name` to completion; an unknown kernel, a wrong argument count or width, or an
    /// invalid geometry is an error.
    pub fn run(mut self, name: &str, geometry: Geometry) -> Result<(), String> {
        let name = CString::new(name).map_err(|e| e.to_string())?;
        let sizes: Vec<usize> = self.values.iter().map(Vec::len).collect();
        let mut args: Vec<*mut c_void> = self.values.iter_mut().map(|v| v.as_mut_ptr() as *mut c_void).collect();
        let mut error = vec![0u8; 256];
        let (x, y, z) = geometry.grid;
        // SAFETY: args point at values of the sizes listed (checked against the kernel's
        // signature before it runs); buffers are borrowed mutably for 'a, so nothing else touches
        // them during the launch. Kernels index within the sizes their callers give them, which
        // is what the tests check.
        let status = unsafe {
            emulated_launch(
                name.as_ptr(),
                x,
                y,
                z,
                geometry.threads,
                args.as_mut_ptr(),
                sizes.as_ptr(),
                sizes.len(),
                error.as_mut_ptr() as *mut c_char,
                error.len(),
            )
        };
        if status == 0 {
            return Ok(());
        }
        let end = error.iter().position(|&b| b == 0).unwrap_or(error.len());
        Err(String::from_utf8_lossy(&error[..end]).into_owned())
    }
}
