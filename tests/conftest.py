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


# (N, C, K, H, W, R, pool) for every backend's oracle tests: C, K, H, W off every block size
# (Triton's blocks, the AVX-512 panel of 64 channels, the Winograd tile 2x2, the register tile of
# 6 pixels); batch 1; odd H/W with pooling; C = 3 (Triton's flattened 27-long reduction); 1x1;
# more than one channel panel with a tail (K = 70, 130); H = 1.
ODD_SHAPES = [
    (2, 3, 20, 9, 11, 3, True),
    (1, 3, 16, 8, 8, 3, False),
    (2, 19, 33, 7, 6, 3, False),
    (1, 24, 17, 5, 7, 3, True),
    (2, 40, 24, 6, 5, 1, False),
    (1, 21, 18, 7, 9, 1, True),
    (1, 64, 70, 4, 6, 3, True),
    (1, 130, 130, 5, 3, 3, False),
    (3, 32, 8, 1, 9, 3, False),
]
ODD_SHAPE_IDS = ["N{}C{}K{}H{}W{}R{}pool{}".format(*s) for s in ODD_SHAPES]


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


def assert_network_within_rule(actual: dict[str, torch.Tensor],
                               torch_result: dict[str, torch.Tensor],
                               oracle: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """The error rule over a whole network's tensors (gradients, statistics, by name): the
    largest relative error among ``actual`` is within ERROR_FACTOR x the largest among torch's
    results + the dtype's atol. Rounding compounds through a network in training differently
    for any two correct implementations, tensor by tensor; its worst case is what a network's
    accuracy is judged by."""
    assert actual.keys() == torch_result.keys() == oracle.keys()
    ours = {name: relative_error(actual[name], oracle[name]) for name in oracle}
    theirs = {name: relative_error(torch_result[name], oracle[name]) for name in oracle}
    worst = max(ours, key=ours.get)
    bound = ERROR_FACTOR * max(theirs.values()) + TOLERANCES[dtype]
    assert ours[worst] <= bound, (
        f"{dtype}: {worst}: relative error {ours[worst]:.3e} > {ERROR_FACTOR} x torch's worst "
        f"{max(theirs.values()):.3e} + {TOLERANCES[dtype]:.1e}; "
        f"{error_report(actual[worst], oracle[worst])}")


def is_bias_before_train_bn(model: torch.nn.Module, key: str) -> bool:
    """Whether state_dict ``key`` of a torchvision-layout VGG is a conv bias followed by BN: in
    training d loss / d bias is exactly 0 there, and both sides hold only rounding noise."""
    parts = key.split(".")
    if parts[0] != "features" or parts[-1] != "bias":
        return False
    index = int(parts[1])
    return (isinstance(model.features[index], torch.nn.Conv2d)
            and isinstance(model.features[index + 1], torch.nn.BatchNorm2d))


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Random BN parameters and running statistics (where tracked), so that eval-mode folds are
    not the identity; returns ``model``."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                if m.track_running_stats:
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def native_cpu():
    """The native backend, or a skip saying why it cannot run CPU float32 here."""
    from vgg_kernels.backends import native

    reason = native.BACKEND.unavailable_reason(torch.device("cpu"), torch.float32,
                                               "conv_bn_relu_infer")
    if reason is not None:
        pytest.skip(f"the native backend cannot run here: {reason}")
    return native.BACKEND


@pytest.fixture
def poison_outputs():
    """at::empty fills new tensors with NaN in deterministic mode: an output element a kernel
    forgets to write then fails the comparison."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


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
