"""FusedConvBNReLU against nn.Sequential(Conv2d, BatchNorm2d, ReLU[, MaxPool2d]): BN semantics."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_RTOL, error_report, relative_error
from torch import nn

from vgg_kernels import FusedConvBNReLU


def _pair(in_ch, out_ch, k, pool, bn_kwargs, batch_norm=True):
    fused = FusedConvBNReLU(in_ch, out_ch, k, pool=pool, batch_norm=batch_norm,
                            backend="reference", **bn_kwargs)
    layers = [nn.Conv2d(in_ch, out_ch, k, padding=k // 2)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch, **bn_kwargs))
    layers.append(nn.ReLU())
    if pool:
        layers.append(nn.MaxPool2d(2))
    eager = nn.Sequential(*layers)
    eager[0].load_state_dict(fused.conv.state_dict())
    if batch_norm:
        if fused.bn.affine:
            fused.bn.weight.data.uniform_(0.5, 1.5)
            fused.bn.bias.data.uniform_(-0.5, 0.5)
        eager[1].load_state_dict(fused.bn.state_dict())
    return fused, eager


def _close(actual, expected, what):
    err = relative_error(actual, expected)
    assert err <= MODEL_RTOL, f"{what}: {err:.2e}; {error_report(actual, expected)}"


BN_OPTIONS = [
    {},
    {"momentum": 0.3},
    {"momentum": None},
    {"eps": 1e-3},
    {"affine": False},
    {"track_running_stats": False},
    {"momentum": None, "affine": False},
]


@pytest.mark.parametrize("bn_kwargs", BN_OPTIONS, ids=lambda d: ",".join(map(str, d.items())) or
                         "default")
@pytest.mark.parametrize("k, pool", [(3, False), (3, True), (1, False)])
def test_batchnorm_semantics_match_torch(bn_kwargs, k, pool):
    fused, eager = _pair(5, 7, k, pool, bn_kwargs)
    for step in range(3):  # train steps update the running statistics (and the cumulative mean)
        x = torch.randn(2 + step, 5, 9, 7)
        _close(fused(x), eager(x), f"train step {step}")
        if fused.bn.track_running_stats:
            _close(fused.bn.running_mean, eager[1].running_mean, "running_mean")
            _close(fused.bn.running_var, eager[1].running_var, "running_var")
            assert fused.bn.num_batches_tracked.item() == eager[1].num_batches_tracked.item()
        else:
            assert fused.bn.running_mean is None
    fused.eval()
    eager.eval()
    x = torch.randn(3, 5, 9, 7)
    with torch.no_grad():
        _close(fused(x), eager(x), "eval")


def test_training_gradients_match_torch():
    fused, eager = _pair(4, 6, 3, True, {})
    x = torch.randn(3, 4, 10, 11, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    fused(x).square().sum().backward()
    eager(x2).square().sum().backward()
    _close(x.grad, x2.grad, "input grad")
    _close(fused.conv.weight.grad, eager[0].weight.grad, "conv weight grad")
    _close(fused.bn.weight.grad, eager[1].weight.grad, "bn weight grad")
    _close(fused.bn.bias.grad, eager[1].bias.grad, "bn bias grad")


@pytest.mark.parametrize("pool", [False, True])
def test_without_batchnorm_is_conv_relu(pool):
    fused, eager = _pair(3, 8, 3, pool, {}, batch_norm=False)
    fused.conv.bias.data.uniform_(-1, 1)
    eager[0].bias.data.copy_(fused.conv.bias.data)
    x = torch.randn(2, 3, 7, 9)
    _close(fused(x), eager(x), "conv+relu")


def test_output_is_channels_last():
    block = FusedConvBNReLU(3, 8, backend="reference").eval()
    y = block(torch.randn(1, 3, 6, 6))
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kwargs, match", [
    ({"kernel_size": 5}, "kernel_size must be 3 or 1"),
    ({"in_channels": 0}, "in_channels must be a positive int"),
    ({"backend": "magic"}, "backend must be one of"),
])
def test_block_rejects_bad_arguments(kwargs, match):
    args = {"in_channels": 3, "out_channels": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        FusedConvBNReLU(**args)


def test_block_rejects_wrong_channel_count():
    block = FusedConvBNReLU(3, 8, backend="reference")
    with pytest.raises(ValueError, match="x must have 3 channels"):
        block(torch.randn(1, 4, 8, 8))


@pytest.mark.parametrize("mode", ["eval", "train", "no_bn"])
def test_functional_conv_bn_relu_matches_modules(mode):
    from vgg_kernels import ops

    fused, eager = _pair(4, 6, 3, True, {}, batch_norm=mode != "no_bn")
    if mode == "eval":
        fused.bn.running_var.uniform_(0.5, 1.5)
        eager[1].running_var.copy_(fused.bn.running_var)
        eager.eval()
    x = torch.randn(2, 4, 9, 7)
    bn = fused.bn
    got = ops.conv_bn_relu(
        x, fused.conv.weight, fused.conv.bias, *(
            (bn.weight, bn.bias, bn.running_mean, bn.running_var) if bn is not None
            else (None, None, None, None)),
        batch_norm=bn is not None, training=mode == "train", pool=True, backend="reference")
    _close(got, eager(x), mode)
    if mode == "train":
        _close(bn.running_mean, eager[1].running_mean, "running_mean")
