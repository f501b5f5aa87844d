//! CUDA side of the fused ops: the kernels of `cuda/kernels.cu` (PTX built by build.rs with
//! nvcc) and what the ops' `cuda_fwd` need to launch them. Activation kernels take f32 or bf16
//! ([`Element`]); the f64 of the gradient checks runs on the CPU.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result};

pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));

pub(crate) use candle_core::cuda_backend::cudarc::driver::PushKernelArg;

/// `launch!(device, "kernel", geometry, [&arg, ...])`: loads the kernel from beit's PTX module
/// (once per device) and launches it. Scalars must be bound to locals first.
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        use $crate::cuda::PushKernelArg as _;
        let func = $dev.get_or_load_custom_func($name, "beit", $crate::cuda::PTX)?;
        let mut builder = func.builder();
        $( builder.arg($arg); )*
        $crate::cuda::run(&mut builder, $cfg)
    }};
}
pub(crate) use launch;

fn offsets(op: &str, s: &CudaStorage, l: &Layout, dtype: DType) -> Result<(usize, usize)> {
    if s.dtype() != dtype {
        bail!("{op}: the CUDA kernel takes {dtype:?}, got {:?}", s.dtype());
    }
    match l.contiguous_offsets() {
        Some(o) => Ok(o),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// Element types of the kernels that come as `<name>_f32` and `<name>_bf16`.
pub(crate) trait Element: CudaDType + DeviceRepr + Copy + 'static {
    const DTYPE: DType;
    const SUFFIX: &'static str;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    const SUFFIX: &'static str = "f32";
}

impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
    const SUFFIX: &'static str = "bf16";
}

/// The entry point of kernel `base` for element type T.
pub(crate) fn kernel<T: Element>(base: &str) -> String {
    format!("{base}_{}", T::SUFFIX)
}

/// `with_element!(op, dtype, f(args...))` calls the generic `f::<T>` for an f32 or bf16 dtype.
macro_rules! with_element {
    ($op:expr, $dtype:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::BF16 => $f::<half::bf16>($($arg),*),
            other => candle_core::bail!("{}: no CUDA kernel for {other:?}, expected f32 or bf16", $op),
        }
    };
}
pub(crate) use with_element;

pub(crate) fn input<'a, T: Element>(op: &str, s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let (a, b) = offsets(op, s, l, T::DTYPE)?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

pub(crate) fn u32_in<'a>(op: &str, s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, u32>> {
    let (a, b) = offsets(op, s, l, DType::U32)?;
    Ok(s.as_cuda_slice::<u32>()?.slice(a..b))
}

pub(crate) fn f32_in_out<'a>(op: &str, s: &'a mut CudaStorage, l: &Layout) -> Result<CudaViewMut<'a, f32>> {
    let (a, b) = offsets(op, s, l, DType::F32)?;
    Ok(s.as_cuda_slice_mut::<f32>()?.slice_mut(a..b))
}

/// An output buffer every element of which the kernel writes.
pub(crate) fn output<T: Element>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the launching op's kernel writes all n elements before anything reads them.
    unsafe { dev.alloc::<T>(n) }
}

pub(crate) fn zeros(dev: &CudaDevice, n: usize) -> Result<CudaSlice<f32>> {
    dev.alloc_zeros::<f32>(n)
}

pub(crate) fn storage<T: Element>(slice: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(slice, dev.clone())
}

pub(crate) use crate::launch::{elementwise, per_column, per_row, ROWS_PER_CHUNK};

impl From<crate::launch::Geometry> for LaunchConfig {
    fn from(g: crate::launch::Geometry) -> Self {
        LaunchConfig { grid_dim: g.grid, block_dim: (g.threads, 1, 1), shared_mem_bytes: 0 }
    }
}

/// Launches `builder` (its arguments pushed) with `geometry`.
pub(crate) fn run(
    builder: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'_>,
    geometry: crate::launch::Geometry,
) -> Result<()> {
    // SAFETY: each caller pushes the arguments its kernel declares, in order, with buffers
    // of the sizes the kernel indexes.
    unsafe { builder.launch(LaunchConfig::from(geometry)) }.w()?;
    Ok(())
}

/// How a same-shape kernel walks its data: one block per row of the given width (the width
/// follows the output, i32), or a grid-stride loop (the count follows the output, u64).
pub(crate) enum Walk {
    Rows(usize),
    Elements,
}

/// A scalar kernel argument, after the inputs and the output.
#[derive(Clone, Copy)]
pub(crate) enum Scalar {
    I32(i32),
    U64(u64),
    F32(f32),
}

/// Runs kernel `base` for the inputs' element type: `(inputs..., out, width | count,
/// scalars...)`, whose output has the first input's shape and dtype.
pub(crate) fn same_shape(
    op: &str,
    base: &str,
    inputs: &[(&CudaStorage, &Layout)],
    walk: Walk,
    scalars: &[Scalar],
) -> Result<(CudaStorage, candle_core::Shape)> {
    let shape = inputs[0].1.shape();
    let n = shape.elem_count();
    let (lead, geometry) = match walk {
        Walk::Rows(w) => (Scalar::I32(w as i32), per_row(n / w.max(1), w)),
        Walk::Elements => (Scalar::U64(n as u64), elementwise(n)),
    };
    let scalars: Vec<Scalar> = std::iter::once(lead).chain(scalars.iter().copied()).collect();
    Ok((new_output(op, base, inputs, n, &scalars, geometry)?, shape.clone()))
}

/// Runs kernel `base` for the inputs' element type: `(inputs..., out, scalars...)`, with an
/// output of `len` elements of that type, every one of which the kernel writes.
pub(crate) fn new_output(
    op: &str,
    base: &str,
    inputs: &[(&CudaStorage, &Layout)],
    len: usize,
    scalars: &[Scalar],
    geometry: crate::launch::Geometry,
) -> Result<CudaStorage> {
    with_element!(op, inputs[0].0.dtype(), new_output_typed(op, base, inputs, len, scalars, geometry))
}

fn new_output_typed<T: Element>(
    op: &str,
    base: &str,
    inputs: &[(&CudaStorage, &Layout)],
    len: usize,
    scalars: &[Scalar],
    geometry: crate::launch::Geometry,
) -> Result<CudaStorage> {
    let dev = inputs[0].0.device();
    let views = inputs.iter().map(|(s, l)| input::<T>(op, s, l)).collect::<Result<Vec<_>>>()?;
    let out = output::<T>(dev, len)?;
    let func = dev.get_or_load_custom_func(&kernel::<T>(base), "beit", PTX)?;
    let mut builder = func.builder();
    for view in &views {
        builder.arg(view);
    }
    builder.arg(&out);
    for scalar in scalars {
        match scalar {
            Scalar::I32(v) => builder.arg(v),
            Scalar::U64(v) => builder.arg(v),
            Scalar::F32(v) => builder.arg(v),
        };
    }
    run(&mut builder, geometry)?;
    Ok(storage(out, dev))
}
