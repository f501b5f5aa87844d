//! Where the numerics run: "cpu", or "cuda" / "cuda:N" in a build with the `cuda` feature
//! (the precision they run in is `config::Precision`).

use candle_core::Device;

use crate::error::{Error, Result};

/// Whether this build has the CUDA backend (the `cuda` feature).
pub const CUDA_BUILD: bool = cfg!(feature = "cuda");

/// NVIDIA GPUs this process can use: 0 in a CPU build, or when the driver reports none.
pub fn cuda_device_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        CudaContext::device_count().map(|n| n.max(0) as usize).unwrap_or(0)
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

/// Parses "cpu", "cuda" (= "cuda:0") or "cuda:N" into a device, with an error that says why a
/// CUDA device cannot be had.
pub fn parse(spec: &str) -> Result<Device> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => match spec.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => return Err(Error::Config(format!("device must be \"cpu\", \"cuda\" or \"cuda:N\", got {spec:?}"))),
        },
    };
    if !CUDA_BUILD {
        return Err(Error::Config(format!(
            "device {spec:?}: this build of beit has no CUDA support; install beit-linux-x64-gnu-cuda \
             next to beit on a Linux x64 machine with an NVIDIA driver (CUDA 13.0 or newer)"
        )));
    }
    let count = cuda_device_count();
    if ordinal >= count {
        return Err(Error::Config(format!("device {spec:?}: this machine has {count} CUDA device(s) visible to beit")));
    }
    // f32 matmuls on tensor cores (TF32), as PyTorch's allow_tf32; reductions stay f32.
    candle_core::cuda::set_gemm_reduced_precision_f32(true);
    cuda_device(ordinal).map_err(|e| Error::Config(format!("device {spec:?} cannot be opened: {e}")))
}

/// One device per ordinal for the whole process: one CUDA context, one cuBLAS handle and one
/// stream of its own. candle's `new_cuda` would build a context and handle on every call, on
/// the *per-thread* default stream, so that work issued from the JS thread (`toDevice`,
/// uploads) and from whichever libuv worker runs a step would go to different, unordered
/// streams; on one stream everything runs in the order it was issued. Tensors of two models on
/// the same GPU also share a device id, as candle requires of the operands of one op (the
/// tokenizer's ids feed the MIM step).
#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> candle_core::Result<Device> {
    static DEVICES: std::sync::Mutex<Vec<(usize, Device)>> = std::sync::Mutex::new(Vec::new());
    let mut devices = DEVICES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, device)) = devices.iter().find(|(o, _)| *o == ordinal) {
        return Ok(device.clone());
    }
    let device = Device::new_cuda_with_stream(ordinal)?;
    devices.push((ordinal, device.clone()));
    Ok(device)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> candle_core::Result<Device> {
    candle_core::bail!("this build of beit has no CUDA support")
}

/// The spelling `parse` takes for `device`.
pub fn name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}
