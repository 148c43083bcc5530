"""pytest-benchmark suites over the same blocks and code as ``python -m vgg_kernels.bench``.

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

import os

import pytest
import torch

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
    x = torch.randn(BATCH, spec.in_channels, spec.height, spec.width, device=DEVICE,
                    dtype=SETTINGS.dtype).contiguous(memory_format=torch.channels_last)
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
