"""Timers: CUDA events on GPUs, ``time.perf_counter`` on CPUs; sample statistics.

Both timers call ``fn(inputs[i % len(inputs)])`` so that a few input buffers are cycled: with a
working set above the last-level cache, a kernel cannot be flattered by an input left in cache
by its previous call.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Cycles of torch.cuda._sleep queued before each timed call (about 200 us at 2 GHz): the GPU
# spins on it while the CPU queues the start event and the call, so the start event is not
# stamped while the GPU waits for Python launch overhead (the small VGG16 layers run in ~30 us
# at batch 64 on an H100, less than a Python launch of an eager block).
SLEEP_CYCLES = 400_000
# Input copies cycled per case are capped: enough for the rule "working set >= 2x cache".
MAX_ROTATING_INPUTS = 16
DEFAULT_CPU_CACHE_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Stats:
    """Summary of timing samples (milliseconds)."""

    median: float
    p20: float
    p80: float

    def as_dict(self) -> dict[str, float]:
        """``{"median_ms", "p20_ms", "p80_ms"}``."""
        return {"median_ms": self.median, "p20_ms": self.p20, "p80_ms": self.p80}


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation (numpy's default rule)."""
    if not samples:
        raise ValueError("samples must not be empty")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100] (got {q})")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(samples: Sequence[float]) -> Stats:
    """Median, 20th and 80th percentile of ``samples``."""
    return Stats(percentile(samples, 50.0), percentile(samples, 20.0), percentile(samples, 80.0))


def cache_bytes(device: torch.device) -> int:
    """Size of the cache that could hold a kernel's input between calls: L2 on a GPU, the
    last-level cache of CPU 0 (from sysfs) on a CPU, else 32 MiB."""
    if device.type == "cuda":
        # L2_cache_size is absent from some older torch builds; 50 MB is an H100's L2
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    largest = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            with open(os.path.join(base, entry, "size")) as handle:
                text = handle.read().strip()
            multiplier = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            largest = max(largest, int(text.rstrip("KMG")) * multiplier)
    except (OSError, ValueError):
        largest = 0
    return largest or DEFAULT_CPU_CACHE_BYTES


def rotating_input_count(bytes_per_input: int, device: torch.device) -> int:
    """How many input copies to cycle so that together they are at least twice the cache."""
    if bytes_per_input <= 0:
        return 1
    wanted = math.ceil(2 * cache_bytes(device) / bytes_per_input)
    return max(1, min(MAX_ROTATING_INPUTS, wanted))


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[Any], object], inputs: Sequence[Any], *, device: torch.device,
               warmup: int, repeats: int) -> list[float]:
    """Run ``fn`` ``warmup`` times (at least once: Triton autotunes and torch.compile compiles
    on the first call), then ``repeats`` timed times; returns each timed call's milliseconds.

    On CUDA each call is bracketed by CUDA events (preceded by a short GPU sleep so that launch
    overhead stays out of the event pair); on a CPU by ``time.perf_counter``.
    """
    if repeats <= 0:
        raise ValueError(f"repeats must be positive (got {repeats})")
    if not inputs:
        raise ValueError("inputs must hold at least one input")
    count = len(inputs)
    for i in range(max(1, warmup)):
        fn(inputs[i % count])
    synchronize(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
            for i in range(repeats):
                torch.cuda._sleep(SLEEP_CYCLES)
                starts[i].record()
                fn(inputs[i % count])
                ends[i].record()
            torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)]
    samples = []
    for i in range(repeats):
        began = time.perf_counter()
        fn(inputs[i % count])
        samples.append((time.perf_counter() - began) * 1e3)
    return samples


def time_interleaved(fns: dict[str, Callable[[Any], object]], inputs: Sequence[Any], *,
                     device: torch.device, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Milliseconds of ``repeats`` timed calls of each of ``fns`` after ``warmup`` untimed ones.

    On a CPU in interleaved rounds, one call of each function per round: load from other
    processes on shared cores then slows every function alike, and their ratios hold. On CUDA
    each function's ``time_calls`` in turn (CUDA events time the GPU alone)."""
    if device.type == "cuda":
        return {name: time_calls(fn, inputs, device=device, warmup=warmup, repeats=repeats)
                for name, fn in fns.items()}
    if repeats <= 0:
        raise ValueError(f"repeats must be positive (got {repeats})")
    if not inputs:
        raise ValueError("inputs must hold at least one input")
    count = len(inputs)
    for i in range(warmup):
        for fn in fns.values():
            fn(inputs[i % count])
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        for name, fn in fns.items():
            began = time.perf_counter()
            fn(inputs[i % count])
            samples[name].append((time.perf_counter() - began) * 1e3)
    return samples


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int,
                        warmup: int = 1) -> dict[str, float]:
    """The median milliseconds of each argument-free function on the CPU, timed in
    interleaved rounds (``time_interleaved``); the upper median for an even count."""
    samples = time_interleaved({name: (lambda _, fn=fn: fn()) for name, fn in fns.items()},
                               [None], device=torch.device("cpu"), warmup=warmup,
                               repeats=repeats)
    return {name: sorted(s)[len(s) // 2] for name, s in samples.items()}


def time_first_call(fn: Callable[[Any], object], example: Any, device: torch.device) -> float:
    """Seconds for one call including compilation/autotuning (wall clock, synchronized)."""
    synchronize(device)
    began = time.perf_counter()
    fn(example)
    synchronize(device)
    return time.perf_counter() - began
