"""torch.compile(fullgraph=True) traces FusedVGG in eval mode: no graph breaks; and the Triton
op passes torch.library.opcheck.

On a GPU the Triton op is a ``triton_op`` that Inductor traces into (marked gpu). Under the
interpreter it is an opaque custom op with a fake kernel, traced on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from vgg_kernels import FusedConvBNReLU, FusedVGG
from vgg_kernels.backends.triton import interpreting


def _compiled_matches_eager(model, x):
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True)
        got = compiled(x)
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)


def test_compile_fullgraph_eval_cpu():
    torch._dynamo.reset()
    model = FusedVGG("A", num_classes=10, backend="reference").eval()
    _compiled_matches_eager(model, torch.randn(2, 3, 32, 32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compile_fullgraph_eval_triton_gpu(dtype):
    torch._dynamo.reset()
    model = FusedVGG("D", num_classes=10, backend="triton").eval().to("cuda", dtype)
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=dtype)
    with torch.no_grad():
        expected = model(x).float()
        got = torch.compile(model, fullgraph=True)(x).float()
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    assert err < 2e-2, err


def test_compile_fullgraph_eval_triton_interpreter():
    """FusedVGG's tail in small: blocks down to 1x1 pixels, then the adaptive average pool and
    the flatten, whose view is only valid if the traced output has the real strides (size-1
    dimensions included)."""
    if not interpreting():
        pytest.skip("the CPU runs Triton kernels only under TRITON_INTERPRET=1")
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        FusedConvBNReLU(3, 8, pool=True, backend="triton"),
        FusedConvBNReLU(8, 16, pool=True, backend="triton"),
        torch.nn.AdaptiveAvgPool2d((3, 3)), torch.nn.Flatten(1), torch.nn.Linear(144, 10),
    ).eval()
    x = torch.randn(2, 3, 4, 5)
    with torch.no_grad():
        expected = model(x)
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c, pool", [(5, True), (3, False)], ids=["C5-pool", "C3"])
def test_triton_op_passes_opcheck(device, dtype, c, pool):
    """Schema (no aliasing), fake kernel against the real output (shape, dtype, strides),
    autograd registration, and AOT dispatch with dynamic shapes."""
    if device == "cpu" and not interpreting():
        pytest.skip("the CPU runs Triton kernels only under TRITON_INTERPRET=1")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (runs in benchmarks/device_check.sh)")
    x = torch.randn(2, c, 6, 7, device=device).to(dtype).contiguous(
        memory_format=torch.channels_last)
    weight = torch.randn(8, c, 3, 3, device=device).to(dtype)
    scale, shift = torch.rand(8, device=device) + 0.5, torch.randn(8, device=device)
    torch.library.opcheck(torch.ops.vgg_kernels.triton_conv_bn_relu_infer.default,
                          (x, weight, scale, shift, pool))
