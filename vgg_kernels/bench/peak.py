"""Peaks measured in the same process: a square matmul (compute) and a device copy (bandwidth);
on CUDA also the L2 read bandwidth that feeds a kernel's operand tiles.

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


# L2 read: a 16 MiB fp32 buffer (a third of an H100's 50 MB L2) read 64 times per call.
L2_BUFFER_BYTES = 16 * 2**20
L2_PASSES = 64
L2_BLOCK = 1024


def measure_l2_bandwidth(device: torch.device, *, nbytes: int = L2_BUFFER_BYTES,
                         passes: int = L2_PASSES, warmup: int,
                         repeats: int) -> dict[str, Any] | None:
    """GB/s of reading an L2-resident buffer ``passes`` times through L1-bypassing loads, by
    four programs per SM (``bench.l2_read``); None off CUDA or without Triton."""
    if device.type != "cuda":
        return None
    try:
        import triton

        from vgg_kernels.bench.l2_read import l2_read_kernel
    except ImportError:
        return None
    count = max(L2_BLOCK, nbytes // 4)
    x = torch.rand(count, device=device)
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    out = torch.empty(programs * L2_BLOCK, device=device)

    def read(buffer: torch.Tensor) -> torch.Tensor:
        l2_read_kernel[(programs,)](buffer, out, count, passes, BLOCK=L2_BLOCK, num_warps=8)
        return out

    samples = time_calls(read, [x], device=device, warmup=warmup, repeats=repeats)
    if not torch.allclose(out.sum(), x.sum() * passes, rtol=1e-3):
        raise RuntimeError("the L2 read kernel's sums are wrong")
    stats = summarize(samples)
    moved = float(passes * count * 4)
    return {
        "buffer_bytes": count * 4,
        "passes": passes,
        "bytes_read": moved,
        "triton": triton.__version__,
        "samples_ms": samples,
        **stats.as_dict(),
        "gbps": moved / (stats.median * 1e-3) / 1e9,
    }


def measure_peaks(device: torch.device, dtype: torch.dtype, *, matmul_size: int | None = None,
                  repeats: int | None = None) -> dict[str, Any]:
    """The ``peak`` block: ``{"matmul": {...}, "bandwidth": {...}}``, plus ``"l2_read"`` on
    CUDA where Triton runs."""
    size = matmul_size or DEFAULT_MATMUL_SIZE[device.type]
    reps = repeats or (20 if device.type == "cuda" else 5)
    peaks = {
        "matmul": measure_matmul_peak(device, dtype, size, warmup=3, repeats=reps),
        "bandwidth": measure_copy_bandwidth(device, DEFAULT_COPY_BYTES[device.type], warmup=3,
                                            repeats=reps),
    }
    l2 = measure_l2_bandwidth(device, warmup=3, repeats=reps)
    if l2 is not None:
        peaks["l2_read"] = l2
    return peaks
