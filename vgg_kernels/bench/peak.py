"""Peaks measured in the same process: a square matmul (compute) and a device copy (bandwidth).

Percentages of peak and the roofline are taken against these measured numbers, not datasheet
ones, so that clocks, power limits and library versions of the run are in the denominator too.
"""

from __future__ import annotations

from typing import Any

import torch

from vgg_kernels.bench.timing import summarize, time_calls

DEFAULT_MATMUL_SIZE = {"cuda": 8192, "cpu": 1024}
# Copy buffers: 512 MiB on a GPU is ten times an H100's 50 MB L2; 64 MiB exceeds a CPU's L3.
DEFAULT_COPY_BYTES = {"cuda": 512 * 2**20, "cpu": 64 * 2**20}


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int, *, warmup: int,
                        repeats: int) -> dict[str, Any]:
    """TFLOP/s of ``torch.matmul`` on (size, size) x (size, size) in ``dtype``.

    fp32 on CUDA follows ``torch.backends.cudnn.allow_tf32`` (as the convolutions do), so the
    peak and the convolutions are measured in the same arithmetic.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    tf32 = device.type == "cuda" and dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32 if device.type == "cuda" else previous
    try:
        samples = time_calls(lambda x: torch.matmul(x, b), [a], device=device, warmup=warmup,
                             repeats=repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    stats = summarize(samples)
    flops = 2.0 * size**3
    return {
        "size": size,
        "dtype": str(dtype).replace("torch.", ""),
        "tf32": tf32,
        "flops": flops,
        "samples_ms": samples,
        **stats.as_dict(),
        "tflops": flops / (stats.median * 1e-3) / 1e12,
    }


def measure_copy_bandwidth(device: torch.device, nbytes: int, *, warmup: int,
                           repeats: int) -> dict[str, Any]:
    """GB/s of ``dst.copy_(src)`` over ``nbytes`` (read + write counted: 2 * nbytes moved)."""
    count = max(1, nbytes // 4)
    src = torch.rand(count, device=device)
    dst = torch.empty_like(src)
    samples = time_calls(lambda x: dst.copy_(x), [src], device=device, warmup=warmup,
                         repeats=repeats)
    stats = summarize(samples)
    moved = 2.0 * count * 4
    return {
        "bytes_moved": moved,
        "samples_ms": samples,
        **stats.as_dict(),
        "gbps": moved / (stats.median * 1e-3) / 1e9,
    }


def measure_peaks(device: torch.device, dtype: torch.dtype, *, matmul_size: int | None = None,
                  repeats: int | None = None) -> dict[str, Any]:
    """The ``peak`` block: ``{"matmul": {...}, "bandwidth": {...}}``."""
    size = matmul_size or DEFAULT_MATMUL_SIZE[device.type]
    reps = repeats or (20 if device.type == "cuda" else 5)
    return {
        "matmul": measure_matmul_peak(device, dtype, size, warmup=3, repeats=reps),
        "bandwidth": measure_copy_bandwidth(device, DEFAULT_COPY_BYTES[device.type], warmup=3,
                                            repeats=reps),
    }
