"""The training-op contract (conv_bn_stats, bn_relu_pool, bn_relu_backward) and its autograd
glue, checked in float64 against F.conv2d + F.batch_norm + ReLU (+ max-pool)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import error_report, relative_error

from vgg_kernels import ops
from vgg_kernels.backends import get_backend

FLOAT64_RTOL = 1e-10


def _expected(x, weight, bias, gamma, beta, mean, var, momentum, eps, pool):
    y = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2)
    y = torch.relu(F.batch_norm(y, mean, var, gamma, beta, True, momentum, eps))
    return F.max_pool2d(y, 2) if pool else y


@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("affine, with_bias, with_stats", [
    (True, True, True), (False, True, True), (True, False, False)])
@pytest.mark.parametrize("r, shape", [(3, (2, 5, 7, 9)), (1, (3, 4, 5, 6))])
def test_decomposed_training_matches_batch_norm(pool, affine, with_bias, with_stats, r, shape):
    n, c, h, w = shape
    k = 6
    f64 = torch.float64
    x = torch.randn(n, c, h, w, dtype=f64).contiguous(memory_format=torch.channels_last)
    leaves = {
        "x": x, "weight": torch.randn(k, c, r, r, dtype=f64),
        "bias": torch.randn(k, dtype=f64) if with_bias else None,
        "gamma": torch.rand(k, dtype=f64) + 0.5 if affine else None,
        "beta": torch.randn(k, dtype=f64) if affine else None,
    }
    ours = {key: v.clone().requires_grad_(True) if v is not None else None
            for key, v in leaves.items()}
    theirs = {key: v.clone().requires_grad_(True) if v is not None else None
              for key, v in leaves.items()}
    drawn = (torch.randn(k, dtype=f64), torch.rand(k, dtype=f64) + 0.5)
    stats = [tuple(t.clone() for t in drawn) if with_stats else (None, None) for _ in range(2)]
    y = ops._train_on_backend(get_backend("reference"), ours["x"], ours["weight"], ours["bias"],
                              ours["gamma"], ours["beta"], *stats[0], 0.2, 1e-5, pool)
    expected = _expected(theirs["x"], theirs["weight"], theirs["bias"], theirs["gamma"],
                         theirs["beta"], *stats[1], 0.2, 1e-5, pool)
    assert relative_error(y, expected) < FLOAT64_RTOL, error_report(y, expected)
    if with_stats:
        for got, want in zip(stats[0], stats[1], strict=True):
            assert relative_error(got, want) < FLOAT64_RTOL
    grad = torch.randn_like(expected)
    y.backward(grad)
    expected.backward(grad)
    for key in ("x", "weight", "gamma", "beta"):
        if ours[key] is not None:
            assert relative_error(ours[key].grad, theirs[key].grad) < 1e-8, key
    if with_bias:  # exactly 0 in exact arithmetic: both are rounding noise
        assert ours["bias"].grad.abs().max() < 1e-9


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 3, 0, 5)], ids=["one-value", "no-pixels"])
def test_training_needs_more_than_one_value_per_channel(shape, backend):
    """One value per channel, as F.batch_norm says; images of no pixels, which F.conv2d would
    reject with a message about the kernel size."""
    ones, zeros = torch.ones(4), torch.zeros(4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.conv_bn_relu_train(torch.randn(shape), torch.randn(4, 3, 3, 3), None, ones, zeros,
                               zeros.clone(), ones.clone(), backend=backend)
