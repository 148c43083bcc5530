"""The functional ops against the float64 oracle: every backend that runs here, odd shapes."""

from __future__ import annotations

import pytest
import torch
from conftest import ODD_SHAPE_IDS, ODD_SHAPES, assert_within_rule

from vgg_kernels import ops
from vgg_kernels.backends import available_backends
from vgg_kernels.backends.reference import conv_bn_relu_infer_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

def _backends_here(dtype: torch.dtype) -> list[str]:
    reasons = available_backends(torch.device("cpu"), dtype)
    return [name for name in ("triton", "native") if reasons.get(name) is None]


@pytest.fixture
def poison_outputs(monkeypatch):
    from vgg_kernels.backends.triton import conv_bn_relu

    monkeypatch.setattr(conv_bn_relu, "POISON_OUTPUTS", True)


def _inputs(n, c, k, h, w, r, dtype):
    x = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(k, c, r, r) / (c * r * r) ** 0.5).to(dtype)
    scale = torch.rand(k) + 0.5
    shift = torch.randn(k) * 0.5
    return x, weight, scale, shift


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=ODD_SHAPE_IDS)
def test_infer_matches_oracle(shape, dtype, poison_outputs):
    n, c, k, h, w, r, pool = shape
    backends = _backends_here(dtype)
    if not backends:
        pytest.skip("no compiled backend runs on this machine's CPU (set TRITON_INTERPRET=1)")
    x, weight, scale, shift = _inputs(n, c, k, h, w, r, dtype)
    oracle = conv_bn_relu_infer_reference(x.double(), weight.double(), scale.double(),
                                          shift.double(), pool)
    torch_result = conv_bn_relu_infer_reference(x, weight, scale, shift, pool)
    for backend in backends:
        y = ops.conv_bn_relu_infer(x, weight, scale, shift, pool=pool, backend=backend)
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
        assert_within_rule(y, torch_result, oracle, dtype)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_infer_accepts_nchw_and_non_contiguous_input(memory_format, poison_outputs):
    backends = _backends_here(torch.float32)
    if not backends:
        pytest.skip("no compiled backend runs on this machine's CPU (set TRITON_INTERPRET=1)")
    x, weight, scale, shift = _inputs(2, 5, 6, 7, 9, 3, torch.float32)
    x = x.contiguous(memory_format=memory_format)[:, :, 1:, ::2]  # a strided view
    oracle = conv_bn_relu_infer_reference(x.double(), weight.double(), scale.double(),
                                          shift.double(), True)
    torch_result = conv_bn_relu_infer_reference(x, weight, scale, shift, True)
    for backend in backends:
        y = ops.conv_bn_relu_infer(x, weight, scale, shift, pool=True, backend=backend)
        assert_within_rule(y, torch_result, oracle, torch.float32)


def test_infer_gradients_in_eval_mode_match_reference():
    """Backends' forward kernels carry PyTorch-computed gradients (eval-mode fine-tuning)."""
    backends = _backends_here(torch.float32)
    if not backends:
        pytest.skip("no compiled backend runs on this machine's CPU (set TRITON_INTERPRET=1)")
    x, weight, scale, shift = _inputs(2, 4, 5, 6, 7, 3, torch.float64)
    leaves = [t.float().requires_grad_(True) for t in (x, weight, scale, shift)]
    expected_leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, scale, shift)]
    conv_bn_relu_infer_reference(*expected_leaves, True).square().sum().backward()
    for backend in backends:
        for t in leaves:
            t.grad = None
        ops.conv_bn_relu_infer(*leaves, pool=True, backend=backend).square().sum().backward()
        for got, want in zip(leaves, expected_leaves, strict=True):
            assert_within_rule(got.grad, want.grad.float(), want.grad, torch.float32)


def test_fold_bn_equals_batchnorm_eval():
    k = 6
    conv_bias, mean, var = torch.randn(k), torch.randn(k), torch.rand(k) + 0.1
    gamma, beta = torch.randn(k), torch.randn(k)
    scale, shift = ops.fold_bn(conv_bias, mean, var, gamma, beta, 1e-5, k, torch.device("cpu"))
    z = torch.randn(2, k, 3, 3)
    expected = torch.nn.functional.batch_norm(z + conv_bias.view(1, -1, 1, 1), mean, var, gamma,
                                              beta, training=False, eps=1e-5)
    got = z * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    torch.testing.assert_close(got, expected)


def test_batch_of_zero_returns_empty():
    x, weight, scale, shift = _inputs(1, 3, 4, 6, 6, 3, torch.float32)
    y = ops.conv_bn_relu_infer(x[:0], weight, scale, shift, pool=True)
    assert y.shape == (0, 4, 3, 3)


@pytest.mark.parametrize("make, error, match", [
    (lambda x, w: (x[0], w), ValueError, "x must be a 4-D tensor"),
    (lambda x, w: (x[:, :2], w), ValueError, "x must have 3 channels"),
    (lambda x, w: (x, w[..., :2, :2]), ValueError, "kernel size 3x3 or 1x1"),
    (lambda x, w: (x, w[..., :1, :]), ValueError, "kernel size 3x3 or 1x1"),
    (lambda x, w: (x, w[0]), ValueError, "weight must be a 4-D tensor"),
    (lambda x, w: (x.to(torch.int32), w), TypeError, "floating-point"),
    (lambda x, w: (x.numpy(), w), TypeError, "x must be a torch.Tensor"),
    (lambda x, w: (x, w.to(torch.int32)), TypeError, "weight must be a floating-point tensor"),
    (lambda x, w: (x[:, :0], w[:, :0]), ValueError, "x must have at least 1 channel"),
])
@pytest.mark.parametrize("backend", ["auto", "reference", "native", "triton"])
def test_infer_rejects_bad_input(make, error, match, backend):
    """Every backend, and the Triton op called directly (the interpreter crashed on C = 0)."""
    x, weight, scale, shift = _inputs(1, 3, 4, 6, 6, 3, torch.float32)
    bad_x, bad_w = make(x, weight)
    with pytest.raises(error, match=match):
        ops.conv_bn_relu_infer(bad_x, bad_w, scale, shift, backend=backend)
    if backend == "triton":
        from vgg_kernels.backends.triton.conv_bn_relu import conv_bn_relu_infer_eager

        with pytest.raises(error, match=match):
            conv_bn_relu_infer_eager(bad_x, bad_w, scale, shift, False)


@pytest.mark.parametrize("backend", ["auto", "reference", "native", "triton"])
def test_infer_rejects_bad_channel_vectors_and_no_output_channels(backend):
    x, weight, scale, shift = _inputs(1, 3, 4, 6, 6, 3, torch.float32)
    with pytest.raises(TypeError, match="scale must be a floating-point tensor"):
        ops.conv_bn_relu_infer(x, weight, scale.to(torch.int32), shift, backend=backend)
    with pytest.raises(TypeError, match="shift must be a torch.Tensor"):
        ops.conv_bn_relu_infer(x, weight, scale, None, backend=backend)
    with pytest.raises(ValueError, match="weight must have at least 1 output channel"):
        ops.conv_bn_relu_infer(x, weight[:0], scale[:0], shift[:0], backend=backend)


@pytest.mark.parametrize("backend", _backends_here(torch.float32) + ["reference"])
@pytest.mark.parametrize("shape", [(0, 3, 6, 6), (2, 3, 0, 5), (2, 3, 4, 0)],
                         ids=["N0", "H0", "W0"])
def test_infer_on_empty_input_returns_empty(shape, backend):
    """No images, or images of no pixels: an empty output of the right shape on every backend
    (torch's conv2d rejects the latter with a message about the kernel size)."""
    _, weight, scale, shift = _inputs(1, 3, 4, 6, 6, 3, torch.float32)
    y = ops.conv_bn_relu_infer(torch.randn(shape), weight, scale, shift, backend=backend)
    assert y.shape == (shape[0], 4, shape[2], shape[3])
    assert y.is_contiguous(memory_format=torch.channels_last)
    if backend == "triton":
        from vgg_kernels.backends.triton.conv_bn_relu import conv_bn_relu_infer_eager

        assert conv_bn_relu_infer_eager(torch.randn(shape), weight, scale, shift,
                                        False).shape == y.shape


def test_infer_rejects_bad_scale_and_backend():
    x, weight, scale, shift = _inputs(1, 3, 4, 6, 6, 3, torch.float32)
    with pytest.raises(ValueError, match=r"scale must have shape \(4,\)"):
        ops.conv_bn_relu_infer(x, weight, scale[:3], shift)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.conv_bn_relu_infer(x, weight, scale, shift, backend="cudnn")
    with pytest.raises(ValueError, match="at least 2x2"):
        ops.conv_bn_relu_infer(x[:, :, :1], weight, scale, shift, pool=True)
