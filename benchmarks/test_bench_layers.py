"""pytest-benchmark suites over the same blocks and code as ``python -m vgg_kernels.bench``:
each block's inference, training step (forward with batch statistics and backward) and input
gradient through a frozen block, and the whole model's inference and SGD step.

Tiny CPU shapes by default (VGG A, batch 1, 32x32, fp32: a few seconds); environment variables
choose others, e.g. the GPU quick suite's shapes::

    python -m pytest benchmarks
    BENCH_DEVICE=cuda BENCH_CONFIG=D BENCH_BATCH=64 BENCH_RESOLUTION=224 BENCH_DTYPE=bf16 \\
        python -m pytest benchmarks --benchmark-json=out.json

Backends are those ``vgg_kernels.bench`` would run (``triton`` is never timed on a CPU: it only
runs there in the interpreter); torch.compile cases run when ``BENCH_COMPILE=1``; each case runs
``BENCH_ROUNDS`` timed rounds (default 5 on a CPU, 50 on CUDA). The timings
here are pytest-benchmark's wall clock around a synchronized call; the CLI's CUDA-event timings
with rotated inputs are the ones recorded in benchmarks/results/.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import vgg_kernels
from vgg_kernels import FusedVGG, make_eager_vgg, ops
from vgg_kernels.bench.layers import build_eager_block, folded_parameters, layer_specs
from vgg_kernels.bench.settings import COMPILE, RunSettings, baseline_name, select_backends
from vgg_kernels.bench.timing import synchronize

DEVICE = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))
CONFIG = os.environ.get("BENCH_CONFIG", "A")
BATCH = int(os.environ.get("BENCH_BATCH", "1"))
RESOLUTION = int(os.environ.get("BENCH_RESOLUTION", "32"))
DTYPE_NAME = os.environ.get("BENCH_DTYPE", "fp32")
COMPILE_CASES = os.environ.get("BENCH_COMPILE", "0") == "1"
# Fixed rounds (not pytest-benchmark's 1 s per test) keep the tiny CPU default to seconds.
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "50" if DEVICE.type == "cuda" else "5"))

SETTINGS = RunSettings(device=DEVICE, dtype_name=DTYPE_NAME, config=CONFIG, batch=BATCH,
                       resolution=RESOLUTION, warmup=1, repeats=1, compile=COMPILE_CASES)
SELECTION = select_backends(SETTINGS)
BACKENDS = [*SELECTION.fused, baseline_name(DEVICE)] + ([COMPILE] if SELECTION.compile else [])
SPECS = layer_specs(CONFIG, RESOLUTION)


@pytest.fixture(autouse=True)
def seed() -> None:
    """Fixed seed; inputs are still fresh random draws."""
    torch.manual_seed(0)


def _block_input(spec) -> torch.Tensor:
    """A random channels_last input of the block ``spec``."""
    return torch.randn(BATCH, spec.in_channels, spec.height, spec.width, device=DEVICE,
                       dtype=SETTINGS.dtype).contiguous(memory_format=torch.channels_last)


def _synchronized(fn):
    def call(x):
        out = fn(x)
        synchronize(DEVICE)
        return out
    return call


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_layer(benchmark, spec, backend):
    """One fused block (conv + folded BN + ReLU (+ pool)) on one backend."""
    block = build_eager_block(spec, DEVICE, SETTINGS.dtype)
    weight, scale, shift = folded_parameters(block)
    x = _block_input(spec)
    if backend == baseline_name(DEVICE):
        fn = block
    elif backend == COMPILE:
        torch._dynamo.reset()
        fn = torch.compile(block, mode=SETTINGS.resolved_compile_mode())
    else:
        def fn(inp):
            return ops.conv_bn_relu_infer(inp, weight, scale, shift, pool=spec.pool,
                                          backend=backend)
    benchmark.group = f"layer {spec.name}"
    benchmark.extra_info.update(flops=spec.flops(BATCH), backend=backend)
    with torch.no_grad():
        expected = block(x)
        call = _synchronized(fn)
        call(x)  # warm-up: autotune / compile outside the timing
        out = benchmark.pedantic(call, args=(x,), rounds=ROUNDS, warmup_rounds=1)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("variant", [*SELECTION.fused, baseline_name(DEVICE)])
def test_model_inference(benchmark, variant):
    """Whole-model eval forward: FusedVGG on a fused backend, or the eager model."""
    if variant == baseline_name(DEVICE):
        model = make_eager_vgg(CONFIG, num_classes=10)
    else:
        model = FusedVGG(CONFIG, num_classes=10, backend=variant)
    model = model.eval().to(device=DEVICE, dtype=SETTINGS.dtype,
                            memory_format=torch.channels_last)
    x = torch.randn(BATCH, 3, RESOLUTION, RESOLUTION, device=DEVICE, dtype=SETTINGS.dtype)
    benchmark.group = "model inference"
    with torch.no_grad():
        call = _synchronized(model)
        call(x)
        benchmark.pedantic(call, args=(x,), rounds=ROUNDS, warmup_rounds=1)


def _block_pair(spec, backend: str):
    """(eager block, the same modules fused on ``backend``: None for the eager baseline)."""
    eager = build_eager_block(spec, DEVICE, SETTINGS.dtype)
    if backend == baseline_name(DEVICE):
        return eager, None
    return eager, vgg_kernels.fuse(copy.deepcopy(eager), backend=backend)


BLOCK_VARIANTS = [*SELECTION.fused, baseline_name(DEVICE)]


@pytest.mark.parametrize("backend", BLOCK_VARIANTS)
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_layer_train(benchmark, spec, backend):
    """One block's training step: forward with batch statistics (running ones updated) and
    the backward to the input and every parameter."""
    eager, fused = _block_pair(spec, backend)
    blocks = [b for b in (eager, fused) if b is not None]
    for block in blocks:
        block.train().requires_grad_(True)
    x = _block_input(spec).requires_grad_(True)
    block = blocks[-1]
    params = [x, *block.parameters()]

    def step(inp):
        out = block(inp)
        grads = torch.autograd.grad(out, params, torch.ones_like(out))
        synchronize(DEVICE)
        return grads

    benchmark.group = f"train {spec.name}"
    benchmark.extra_info.update(flops=3 * spec.flops(BATCH), backend=backend)
    step(x)
    got = benchmark.pedantic(step, args=(x,), rounds=ROUNDS, warmup_rounds=1)
    out = eager(x)
    want = torch.autograd.grad(out, [x, *eager.parameters()], torch.ones_like(out))
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("backend", BLOCK_VARIANTS)
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_layer_input_gradient(benchmark, spec, backend):
    """A frozen block (eval BN, weights without gradients), forward and the gradient of the
    input: a perceptual loss's path."""
    eager, fused = _block_pair(spec, backend)
    block = fused if fused is not None else eager
    x = _block_input(spec).requires_grad_(True)

    def step(inp):
        out = block(inp)
        (grad,) = torch.autograd.grad(out, inp, torch.ones_like(out))
        synchronize(DEVICE)
        return grad

    benchmark.group = f"input gradient {spec.name}"
    benchmark.extra_info.update(flops=2 * spec.flops(BATCH), backend=backend)
    step(x)
    got = benchmark.pedantic(step, args=(x,), rounds=ROUNDS, warmup_rounds=1)
    out = eager(x)
    (want,) = torch.autograd.grad(out, x, torch.ones_like(out))
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("variant", [*SELECTION.fused, baseline_name(DEVICE)])
def test_model_train_step(benchmark, variant):
    """Whole-model SGD step (cross-entropy, momentum 0.9) in train mode."""
    torch.manual_seed(0)
    if variant == baseline_name(DEVICE):
        model = make_eager_vgg(CONFIG, num_classes=10)
    else:
        model = FusedVGG(CONFIG, num_classes=10, backend=variant)
    model = model.train().to(device=DEVICE, dtype=SETTINGS.dtype,
                             memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(max(BATCH, 2), 3, RESOLUTION, RESOLUTION, device=DEVICE,
                    dtype=SETTINGS.dtype)
    target = torch.randint(0, 10, (x.shape[0],), device=DEVICE)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        synchronize(DEVICE)
        return loss

    benchmark.group = "model train step"
    step()
    loss = benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)
    assert torch.isfinite(loss)
