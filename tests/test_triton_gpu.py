"""Triton inference kernel on a GPU against cuDNN (conv2d + batch_norm + relu + max_pool2d):
every VGG16 layer shape at batch 8, fp32/fp16/bf16, judged against a float64 oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_within_rule

from vgg_kernels import ops
from vgg_kernels.bench.layers import layer_specs

triton = pytest.importorskip("triton")
from vgg_kernels.backends.triton import conv_bn_relu  # noqa: E402

pytestmark = pytest.mark.gpu

# (C, K, H, pool) of VGG16's 13 conv blocks at 224x224 (pool = a 2x2 max-pool follows).
VGG16_LAYERS = [(spec.in_channels, spec.out_channels, spec.height, spec.pool)
                for spec in layer_specs("D", 224)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _block_inputs(n, c, k, h, w, r, dtype):
    device = "cuda"
    x = torch.randn(n, c, h, w, device=device).to(dtype).contiguous(
        memory_format=torch.channels_last)
    weight = (torch.randn(k, c, r, r, device=device) * (2.0 / (c * r * r)) ** 0.5).to(dtype)
    bias = torch.randn(k, device=device) * 0.1
    gamma = torch.rand(k, device=device) + 0.5
    beta = torch.randn(k, device=device) * 0.1
    mean = torch.randn(k, device=device) * 0.1
    var = torch.rand(k, device=device) + 0.5
    return x, weight, bias, gamma, beta, mean, var


def _cudnn_block(x, weight, bias, gamma, beta, mean, var, pool):
    """What eager PyTorch computes: conv (with bias) -> BN (eval) -> ReLU (-> max-pool)."""
    y = F.conv2d(x, weight, bias.to(x.dtype), padding=weight.shape[-1] // 2)
    y = F.batch_norm(y, mean, var, gamma, beta, training=False, eps=1e-5)
    y = torch.relu(y)
    return F.max_pool2d(y, 2) if pool else y


def _check(n, c, k, h, w, r, pool, dtype, **launch):
    x, weight, bias, gamma, beta, mean, var = _block_inputs(n, c, k, h, w, r, dtype)
    oracle = _cudnn_block(x.double(), weight.double(), bias.double(), gamma.double(),
                          beta.double(), mean.double(), var.double(), pool)
    cudnn = _cudnn_block(x, weight, bias, gamma, beta, mean, var, pool)
    scale, shift = ops.fold_bn(bias, mean, var, gamma, beta, 1e-5, k, x.device)
    if launch:
        from vgg_kernels.backends.triton.conv_bn_relu import conv_bn_relu_infer_with_config

        y = conv_bn_relu_infer_with_config(x, weight, scale, shift, pool, **launch)
    else:
        y = ops.conv_bn_relu_infer(x, weight, scale, shift, pool=pool, backend="triton")
    torch.cuda.synchronize()
    assert_within_rule(y, cudnn, oracle, dtype)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(conv_bn_relu, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", VGG16_LAYERS, ids=lambda s: "C{}K{}H{}pool{}".format(*s))
def test_vgg16_layer_matches_cudnn(layer, dtype):
    c, k, h, pool = layer
    _check(8, c, k, h, h, 3, pool, dtype)


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_fp32_follows_cudnn_allow_tf32(allow_tf32, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    _check(4, 128, 256, 28, 28, 3, True, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [
    (3, 17, 7, 9, 10, 3, False), (1, 67, 45, 15, 13, 3, True),
    (2, 96, 80, 9, 11, 1, False), (5, 3, 64, 33, 31, 3, True),
], ids=lambda s: "N{}C{}K{}H{}W{}R{}pool{}".format(*s))
def test_odd_shapes_match_cudnn(shape, dtype):
    n, c, k, h, w, r, pool = shape
    _check(n, c, k, h, w, r, pool, dtype)


def _configs():
    from vgg_kernels.backends.triton.conv_bn_relu import _autotune_configs

    return _autotune_configs()


@pytest.mark.parametrize("config_index", range(len(conv_bn_relu._autotune_configs())))
@pytest.mark.parametrize("case", [(64, 96, 30, 3, True), (3, 64, 40, 3, False),
                                  (128, 64, 20, 1, False)],
                         ids=lambda s: "C{}K{}H{}R{}pool{}".format(*s))
def test_every_autotune_config_is_correct(case, config_index, monkeypatch):
    """The autotuner may pick any config, so each one must be right (bf16, odd sizes).
    Descriptor (TMA) configs run where the shape and the GPU allow them (C=3 on channels padded
    to 16); pointer configs on the 3-channel case run the flattened reduction, unpadded."""
    configs = _configs()
    config = configs[config_index]
    c, k, h, r, pool = case
    if config.kwargs["USE_TMA"]:
        if torch.cuda.get_device_capability()[0] < 9:
            pytest.skip("tensor descriptors need Hopper or newer")
        channels = conv_bn_relu.PADDED_CHANNELS if c <= conv_bn_relu.PADDED_CHANNELS else c
        block_k = config.kwargs["BLOCK_K"]
        if channels % block_k:
            pytest.skip(f"BLOCK_K={block_k} does not divide {channels} channels")
    else:
        monkeypatch.setenv("VGG_KERNELS_TRITON_PAD_CHANNELS", "0")
    _check(2, c, k, h, h + 3, r, pool, torch.bfloat16, **config.all_kwargs())


def test_offsets_past_2_31_elements():
    """N*H*W*C > 2**31: int64 image offsets; the last image is checked against cuDNN."""
    n, c, k, h = 670, 64, 64, 224
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of GPU memory")
    x, weight, bias, gamma, beta, mean, var = _block_inputs(1, c, k, h, h, 3, torch.bfloat16)
    big = x.expand(n, c, h, h).contiguous(memory_format=torch.channels_last)
    big[-1].copy_(torch.randn_like(big[-1]))
    assert big.numel() > 2**31
    scale, shift = ops.fold_bn(bias, mean, var, gamma, beta, 1e-5, k, x.device)
    y = ops.conv_bn_relu_infer(big, weight, scale, shift, pool=True, backend="triton")
    last = big[-1:].contiguous(memory_format=torch.channels_last)
    oracle = _cudnn_block(last.double(), weight.double(), bias.double(), gamma.double(),
                          beta.double(), mean.double(), var.double(), True)
    cudnn = _cudnn_block(last, weight, bias, gamma, beta, mean, var, True)
    assert_within_rule(y[-1:], cudnn, oracle, torch.bfloat16)
    first = ops.conv_bn_relu_infer(big[:1], weight, scale, shift, pool=True, backend="triton")
    assert torch.equal(y[:1], first)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_vgg16_eval_matches_eager_cudnn(dtype):
    """The whole eval-mode model on the Triton backend against the eager model on cuDNN."""
    from vgg_kernels import FusedVGG, make_eager_vgg

    fused = FusedVGG("D", backend="triton")
    for module in fused.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    eager = make_eager_vgg("D", init_weights=False)
    eager.load_state_dict(fused.state_dict(), strict=True)
    fused = fused.eval().to("cuda", dtype)
    oracle_model = eager.eval().to("cuda", torch.float64)
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        oracle = oracle_model(x.to(dtype).double())
        cudnn = eager.to(dtype, memory_format=torch.channels_last)(x.to(dtype))
        got = fused(x.to(dtype))
    assert_within_rule(got, cudnn, oracle, dtype)
