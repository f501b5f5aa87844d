"""The GPU's measured dense GEMM rates, the roof that MFU is also reported against besides the
datasheet's: an 8192^3 product on random data in bf16, in f32 with TF32 (what beit's f32 path
asks cuBLAS for) and in strict f32; the mean of 10 timed products after 3 warm-ups. One JSON line.

    python3 scripts/cuda/gemm_roof.py
"""
import json

import torch


def tflops(dtype: torch.dtype, tf32: bool, n: int = 8192, reps: int = 10) -> float:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


print(
    json.dumps(
        {
            "gpu": torch.cuda.get_device_name(),
            "bf16_tflops": round(tflops(torch.bfloat16, False), 1),
            "tf32_tflops": round(tflops(torch.float32, True), 1),
            "f32_tflops": round(tflops(torch.float32, False), 1),
        }
    )
)
