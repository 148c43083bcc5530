"""Autotune config pruning: at most 8 configs per shape, each fitting the shape and memory."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from vgg_kernels.backends.triton import conv_bn_relu  # noqa: E402

LAYERS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512),
          (512, 512), (17, 33), (512, 10)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c, k", LAYERS)
@pytest.mark.parametrize("r", [1, 3])
def test_pruned_configs_fit_the_shape(c, k, r, dtype):
    configs = conv_bn_relu._autotune_configs()
    x = torch.empty(1, dtype=dtype)
    flat = c <= conv_bn_relu.FLAT_REDUCTION_MAX_CHANNELS and r > 1
    kept = conv_bn_relu._prune_configs(configs, {"x_ptr": x, "C": c, "K": k},
                                       R=r, FLAT_K=c if flat else 0)
    assert 1 <= len(kept) <= conv_bn_relu.MAX_CONFIGS_PER_SHAPE
    reduction = c * (r * r if flat else 1)
    for config in kept:
        assert config.kwargs["BLOCK_K"] <= max(32, 2 * reduction)
        assert config.kwargs["BLOCK_N"] <= max(64, 2 * k)


def test_every_config_has_its_own_label():
    labels = [conv_bn_relu.describe_config(c.all_kwargs())
              for c in conv_bn_relu._autotune_configs()]
    assert len(set(labels)) == len(labels)
    assert "tma 4x2x16/256/64 w8 s3 p1" in labels
    assert "ptr 128/256/64 w8 s3 p0" in labels
