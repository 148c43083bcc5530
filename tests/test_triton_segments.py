"""The Triton kernel on row segments: 3x3 layers with at most 4 input channels, read from a copy
padded to 4 channels and by the convolution's border, so that each kernel row of a pixel is 16
contiguous elements. In the interpreter on the CPU; compiled on a GPU (marked gpu)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_within_rule

pytest.importorskip("triton")
from vgg_kernels.backends.reference import conv_bn_relu_infer_reference  # noqa: E402
from vgg_kernels.backends.triton import conv_bn_relu, interpreting  # noqa: E402


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request, monkeypatch) -> str:
    """Each test runs in the interpreter on the CPU and, marked ``gpu``, compiled on a GPU; the
    padded descriptor path (which takes fp16/bf16 first layers on Hopper) is switched off."""
    if request.param == "cpu" and not interpreting():
        pytest.skip("the CPU runs Triton kernels only under TRITON_INTERPRET=1")
    monkeypatch.setenv("VGG_KERNELS_TRITON_PAD_CHANNELS", "0")
    return request.param


@pytest.fixture
def poison_outputs(monkeypatch):
    """Outputs start as NaN: an element the kernel never writes fails the comparison."""
    monkeypatch.setattr(conv_bn_relu, "POISON_OUTPUTS", True)


def _inputs(n, c, k, h, w, dtype, device):
    x = torch.randn(n, c, h, w, device=device).to(dtype).contiguous(
        memory_format=torch.channels_last)
    weight = (torch.randn(k, c, 3, 3, device=device) / (9 * c) ** 0.5).to(dtype)
    scale = torch.rand(k, device=device) + 0.5
    shift = torch.randn(k, device=device) * 0.5
    return x, weight, scale, shift


def _check(y, x, weight, scale, shift, pool, dtype):
    oracle = conv_bn_relu_infer_reference(x.double(), weight.double(), scale.double(),
                                          shift.double(), pool)
    assert_within_rule(y, conv_bn_relu_infer_reference(x, weight, scale, shift, pool), oracle,
                       dtype)


# (N, C, K, H, W, pool): C = 1 to 4; K not a multiple of the channel block; H and W odd, 1, or
# smaller than a tile; batch 1 and 3.
SHAPES = [(2, 3, 20, 9, 11, True), (1, 3, 16, 8, 8, False), (3, 1, 24, 5, 7, False),
          (1, 2, 8, 1, 9, False), (2, 4, 17, 7, 6, True), (1, 3, 8, 3, 3, True)]
SHAPE_IDS = ["N{}C{}K{}H{}W{}pool{}".format(*s) for s in SHAPES]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_default_launch_matches_oracle(shape, dtype, poison_outputs, device):
    n, c, k, h, w, pool = shape
    x, weight, scale, shift = _inputs(n, c, k, h, w, dtype, device)
    assert conv_bn_relu._segments(x, weight.to(dtype))
    y = conv_bn_relu.conv_bn_relu_infer(x.contiguous(), weight, scale, shift, pool)  # NCHW in
    _check(y, x, weight, scale, shift, pool, dtype)


# pointer tiles: 16-, 32- and 64-wide steps (three, two and one per tile); persistent programs
# with one 64-wide step (the next tile's loads issued ahead) and with two 32-wide ones
TILES = [dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, PROGRAMS_PER_SM=0),
         dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, PROGRAMS_PER_SM=0),
         dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=64, PROGRAMS_PER_SM=0),
         dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64, PROGRAMS_PER_SM=1),
         dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, PROGRAMS_PER_SM=2)]


@pytest.mark.parametrize("tile", TILES, ids=lambda t: "M{BLOCK_M}K{BLOCK_K}P{PROGRAMS_PER_SM}"
                         .format(**t))
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[4]], ids=[SHAPE_IDS[0],
                                                                          SHAPE_IDS[2],
                                                                          SHAPE_IDS[4]])
def test_every_tile_matches_oracle(shape, tile, poison_outputs, device):
    n, c, k, h, w, pool = shape
    x, weight, scale, shift = _inputs(n, c, k, h, w, torch.float16, device)
    config = {"USE_TMA": False, "BLOCK_H": 1, "BLOCK_W": 1, **tile}
    if device == "cuda":
        config.update(num_warps=4, num_stages=3)
    y = conv_bn_relu.conv_bn_relu_infer_with_config(x, weight, scale, shift, pool, **config)
    _check(y, x, weight, scale, shift, pool, torch.float16)


def test_segment_copy_layout():
    x = torch.randn(2, 3, 4, 5)
    padded = conv_bn_relu._segment_copy(x)
    assert padded.shape == (2, 4, 6, 8)
    assert padded.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(padded[:, :3, 1:5, 1:6], x)
    inner = torch.zeros_like(padded, dtype=torch.bool)
    inner[:, :3, 1:5, 1:6] = True
    assert not padded[~inner].any()


def test_which_layers_run_on_segments(monkeypatch):
    monkeypatch.setenv("VGG_KERNELS_TRITON_PAD_CHANNELS", "0")
    x = torch.randn(1, 4, 6, 6)
    assert conv_bn_relu._segments(x, torch.randn(8, 4, 3, 3))
    assert not conv_bn_relu._segments(torch.randn(1, 5, 6, 6), torch.randn(8, 5, 3, 3))
    assert not conv_bn_relu._segments(x, torch.randn(8, 4, 1, 1))
    monkeypatch.setenv("VGG_KERNELS_TRITON_SEGMENTS", "0")
    assert not conv_bn_relu._segments(x, torch.randn(8, 4, 3, 3))
    monkeypatch.delenv("VGG_KERNELS_TRITON_SEGMENTS")
    monkeypatch.delenv("VGG_KERNELS_TRITON_PAD_CHANNELS")
    half = torch.randn(1, 3, 6, 6, dtype=torch.float16)
    # where the padded descriptor path takes the layer (here: the interpreter), it keeps it
    assert conv_bn_relu._segments(half, torch.randn(16, 3, 3, 3, dtype=torch.float16)) == (
        not conv_bn_relu._pads_channels(half, torch.randn(16, 3, 3, 3, dtype=torch.float16)))


def test_pruning_gives_row_segments_their_64_wide_steps():
    configs = conv_bn_relu._autotune_configs(hopper=True)
    args = {"x_ptr": torch.empty(1, dtype=torch.bfloat16), "N": 64, "C": 4, "K": 64,
            "H": 226, "W": 227}
    segments = conv_bn_relu._prune_configs(configs, args, R=3, FLAT_K=3, SEGMENTS=True,
                                           TMA_OK=False)
    assert any(c.kwargs["BLOCK_K"] == 64 and c.kwargs["PROGRAMS_PER_SM"] for c in segments)
    flat = conv_bn_relu._prune_configs(configs, {**args, "C": 3, "H": 224, "W": 224}, R=3,
                                       FLAT_K=3, SEGMENTS=False, TMA_OK=False)
    assert all(c.kwargs["BLOCK_K"] <= 32 for c in flat)
