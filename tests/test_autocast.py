"""torch.autocast: the fused blocks compute their convolution in the autocast dtype, as
nn.Conv2d does, with BN, its statistics and the scale and shift in fp32. FusedVGG under autocast
against the eager model under autocast, both judged against a float64 oracle."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import ERROR_FACTOR, TOLERANCES, is_bias_before_train_bn, relative_error

from vgg_kernels import FusedVGG, make_eager_vgg, ops
from vgg_kernels.backends import available_backends

BF16 = torch.bfloat16


def _backends(device: torch.device, op: str = "conv_bn_relu_infer") -> list[str]:
    """The backends that run ``op`` in bf16 on ``device`` here (the reference backend always
    does)."""
    reasons = available_backends(device, BF16, op)
    return [name for name in ("triton", "native", "reference") if reasons.get(name) is None]


def _devices() -> list:
    cuda = pytest.param("cuda", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(),
                           reason="needs a CUDA device (runs in benchmarks/device_check.sh)")])
    return ["cpu", cuda]


def _block(device, n=2, c=5, k=6, h=7, w=9):
    x = torch.randn(n, c, h, w, device=device)
    weight = torch.randn(k, c, 3, 3, device=device) / (9 * c) ** 0.5
    bias, gamma, beta = (torch.randn(k, device=device) * 0.3 for _ in range(3))
    return x, weight, bias, gamma + 1.0, beta


@pytest.mark.parametrize("device", _devices())
def test_infer_block_under_autocast_is_the_explicit_bf16_block(device):
    """Under autocast the op gets x and weight in bf16; scale and shift stay fp32."""
    x, weight, bias, gamma, beta = _block(device)
    scale, shift = gamma, beta - bias
    for backend in _backends(torch.device(device)):
        with torch.autocast(device, dtype=BF16):
            got = ops.conv_bn_relu_infer(x, weight, scale, shift, pool=True, backend=backend)
        want = ops.conv_bn_relu_infer(x.to(BF16), weight.to(BF16), scale, shift, pool=True,
                                      backend=backend)
        assert got.dtype == BF16, backend
        assert torch.equal(got, want), backend


@pytest.mark.parametrize("device", _devices())
def test_train_block_under_autocast_is_the_explicit_bf16_block(device):
    """Outputs and running statistics as with explicit bf16 operands; the gradients of the fp32
    leaves are fp32."""
    x, weight, bias, gamma, beta = _block(device)
    for backend in _backends(torch.device(device), "conv_bn_relu_train"):
        results = []
        for use_autocast in (True, False):
            leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias, gamma, beta)]
            mean, var = torch.zeros(6, device=device), torch.ones(6, device=device)
            operands = leaves[:2] if use_autocast else [t.to(BF16) for t in leaves[:2]]
            with torch.autocast(device, dtype=BF16, enabled=use_autocast):
                y = ops.conv_bn_relu_train(*operands, *leaves[2:], mean, var, pool=True,
                                           backend=backend)
            y.float().square().sum().backward()
            results.append((y, mean, var, [t.grad for t in leaves]))
        (y, mean, var, grads), (y_want, mean_want, var_want, grads_want) = results
        assert y.dtype == BF16 and torch.equal(y, y_want), backend
        assert torch.equal(mean, mean_want) and torch.equal(var, var_want), backend
        for got, want in zip(grads, grads_want, strict=True):
            assert got.dtype == torch.float32, backend
            torch.testing.assert_close(got, want, msg=backend)


def test_float64_operands_are_not_cast():
    """As torch.autocast leaves float64 tensors alone."""
    x, weight, bias, gamma, beta = (t.double() for t in _block("cpu"))
    with torch.autocast("cpu", dtype=BF16):
        y = ops.conv_bn_relu_infer(x, weight, gamma, beta, backend="reference")
    assert y.dtype == torch.float64


def _within_rule(ours: torch.Tensor, theirs: torch.Tensor, oracle: torch.Tensor, what: str):
    """The eager model's own error in bf16 sets the bound, as for the blocks."""
    error, bound = relative_error(ours, oracle), relative_error(theirs, oracle)
    assert error <= ERROR_FACTOR * bound + TOLERANCES[BF16], (
        f"{what}: error {error:.3e} > {ERROR_FACTOR} x eager's {bound:.3e} + "
        f"{TOLERANCES[BF16]:.1e}")


def _models(device, backend, image):
    eager = make_eager_vgg("A", batch_norm=True, num_classes=10, dropout=0.0)
    for module in eager.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    fused = FusedVGG("A", batch_norm=True, num_classes=10, dropout=0.0, backend=backend)
    fused.load_state_dict(eager.state_dict(), strict=True)
    oracle = copy.deepcopy(eager).to(device, torch.float64)
    eager, fused = eager.to(device), fused.to(device)
    eager = eager.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, image, image, device=device)
    return eager, fused, oracle, x


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("device, backend", [
    ("cpu", "auto"),
    pytest.param("cuda", "triton", marks=pytest.mark.gpu),
    pytest.param("cuda", "native", marks=pytest.mark.gpu),
])
def test_fused_vgg_under_autocast_matches_eager_under_autocast(device, backend, training):
    """Outputs (bf16 from both), fp32 parameter gradients and running statistics."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (runs in benchmarks/device_check.sh)")
    if backend == "triton" and training:
        backend = "auto"  # the Triton backend has inference kernels only
    torch.manual_seed(0)
    eager, fused, oracle, x = _models(device, backend, 64 if device == "cuda" else 32)
    for model in (eager, fused, oracle):
        model.train(training)
    feature_dtypes = []  # the blocks compute in bf16, as the eager convolutions do
    for model in (eager, fused):
        model.features.register_forward_hook(
            lambda module, args, out: feature_dtypes.append(out.dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CPU backend falls back to bf16 in torch, once
        with torch.autocast(device, dtype=BF16):
            y_eager, y_fused = eager(x), fused(x)
    y_oracle = oracle(x.double())
    assert feature_dtypes == [BF16, BF16]
    assert y_fused.dtype == y_eager.dtype == BF16
    _within_rule(y_fused, y_eager, y_oracle, "output")

    for y in (y_eager, y_fused, y_oracle):
        y.double().square().sum().backward()
    tensors = [m.state_dict(keep_vars=True) for m in (eager, fused, oracle)]
    for key, want in tensors[2].items():
        eager_value, fused_value = tensors[0][key], tensors[1][key]
        if want.requires_grad:
            assert fused_value.grad.dtype == torch.float32, key
            if not (training and is_bias_before_train_bn(eager, key)):
                _within_rule(fused_value.grad, eager_value.grad, want.grad, f"grad {key}")
        elif "running" in key:
            if training:
                _within_rule(fused_value, eager_value, want, key)
            else:
                assert torch.equal(fused_value, eager_value), key
