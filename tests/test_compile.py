"""torch.compile(fullgraph=True) traces FusedVGG in eval mode: no graph breaks.

On the CPU this goes through the reference (or native) registration; the Triton registration is
traced on a GPU (marked gpu) since the interpreter cannot run under FakeTensor tracing.
"""

from __future__ import annotations

import pytest
import torch

from vgg_kernels import FusedVGG


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
