"""Shared fixtures: seeding, the one tolerance table, the error rule, and the interpreter switch.

On a machine without CUDA the Triton kernels run in the interpreter: TRITON_INTERPRET must be set
before Triton compiles (decorates) any kernel, so it is set here, before the tests import them.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Error rule (flash-attention's): a kernel's max error against the float64 oracle, relative to the
# oracle's max magnitude, is at most ERROR_FACTOR x PyTorch's own error in the same dtype + atol.
ERROR_FACTOR = 2.0
TOLERANCES: dict[torch.dtype, float] = {  # the small atol, relative to max |oracle|
    torch.float32: 2e-6,
    torch.float16: 5e-4,
    torch.bfloat16: 4e-3,
}
# tf32 on a GPU: PyTorch's own fp32 conv then runs in tf32 too, so the same rule covers it.
MODEL_RTOL = 1e-5  # FusedVGG vs torchvision in fp32 on the CPU (max error / max magnitude)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64; NaN anywhere gives inf."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = expected.abs().max().clamp_min(1e-30)
    return float((actual - expected).abs().max() / scale)


def error_report(actual: torch.Tensor, expected: torch.Tensor) -> str:
    actual, expected = actual.detach(), expected.detach()
    diff = (actual.double() - expected.double()).abs()
    return (f"max abs err {diff.max().item():.3e}, mean abs err {diff.mean().item():.3e}, "
            f"max |expected| {expected.double().abs().max().item():.3e}")


def assert_within_rule(actual: torch.Tensor, torch_result: torch.Tensor,
                       oracle: torch.Tensor, dtype: torch.dtype) -> None:
    """The kernel's error is within ERROR_FACTOR x torch's error + the dtype's atol."""
    assert actual.shape == oracle.shape, f"shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    ours = relative_error(actual, oracle)
    theirs = relative_error(torch_result, oracle)
    bound = ERROR_FACTOR * theirs + TOLERANCES[dtype]
    assert ours <= bound, (
        f"{dtype}: relative error {ours:.3e} > {ERROR_FACTOR} x torch's {theirs:.3e} + "
        f"{TOLERANCES[dtype]:.1e}; {error_report(actual, oracle)}")


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


@pytest.fixture(autouse=True)
def seed() -> int:
    """Every test starts from a fixed seed; inputs are still fresh random draws."""
    random.seed(1234)
    torch.manual_seed(1234)
    return 1234


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (runs in benchmarks/device_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
