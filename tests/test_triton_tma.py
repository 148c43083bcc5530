"""The Triton kernel's tensor-descriptor (TMA) path: spatial tiles whose zero padding comes from
the descriptors' out-of-bounds fill. On the CPU it runs in the interpreter (small tiles, so odd
shapes cross every tile edge); on a GPU the same tests run compiled, on Hopper or newer."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_within_rule

pytest.importorskip("triton")
from vgg_kernels.backends.reference import conv_bn_relu_infer_reference  # noqa: E402
from vgg_kernels.backends.triton import conv_bn_relu, interpreting  # noqa: E402

# A 4x8 tile (8x8 on a GPU, where wgmma wants 64 rows) by 16 channels, 16-channel reduction
# steps, in a persistent grid (one program per SM; the interpreter plays INTERPRETER_SMS SMs, so
# each program loops over several tiles).
_CPU_TILE = dict(USE_TMA=True, BLOCK_H=4, BLOCK_W=8, BLOCK_M=32, BLOCK_N=16, BLOCK_K=16,
                 PROGRAMS_PER_SM=1)
TILES = {"cpu": _CPU_TILE,
         "cuda": {**_CPU_TILE, "BLOCK_H": 8, "BLOCK_M": 64, "num_warps": 4, "num_stages": 3}}


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> str:
    """Each test runs in the interpreter on the CPU and, marked ``gpu``, compiled on a GPU."""
    if request.param == "cpu" and not interpreting():
        pytest.skip("the CPU runs Triton kernels only under TRITON_INTERPRET=1")
    return request.param

# (N, C, K, H, W, R, pool): C a multiple of BLOCK_K, K of 8 (16-byte rows); H and W odd or
# smaller than a tile, batch 1, 3 and 5 (odd numbers of images for tiles of two), K not a
# multiple of BLOCK_N.
TMA_SHAPES = [
    (2, 32, 40, 7, 9, 3, True),
    (1, 32, 16, 5, 6, 3, False),
    (1, 48, 24, 9, 11, 1, False),
    (3, 32, 24, 6, 10, 3, True),
    (1, 32, 8, 1, 1, 3, False),
    (1, 48, 8, 3, 3, 3, True),
    (2, 64, 72, 17, 5, 3, True),
    (1, 16 * 3, 8, 2, 19, 1, True),
    (5, 32, 16, 3, 5, 3, True),
]
TMA_SHAPE_IDS = ["N{}C{}K{}H{}W{}R{}pool{}".format(*s) for s in TMA_SHAPES]


def _skip_without_descriptors(device):
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need Hopper or newer")


def _inputs(n, c, k, h, w, r, dtype, device):
    x = torch.randn(n, c, h, w, device=device).to(dtype).contiguous(
        memory_format=torch.channels_last)
    weight = (torch.randn(k, c, r, r, device=device) / (c * r * r) ** 0.5).to(dtype)
    scale = torch.rand(k, device=device) + 0.5
    shift = torch.randn(k, device=device) * 0.5
    return x, weight, scale, shift


@pytest.fixture
def poison_outputs(monkeypatch):
    monkeypatch.setattr(conv_bn_relu, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("images, dtype, programs_per_sm", [
    (1, torch.float16, 1), (1, torch.bfloat16, 1), (1, torch.float16, 0),
    (1, torch.bfloat16, 0), (2, torch.float16, 1), (2, torch.bfloat16, 0),
], ids=["fp16-persistent", "bf16-persistent", "fp16-tile-per-program",
        "bf16-tile-per-program", "fp16-persistent-2-images", "bf16-tile-per-program-2-images"])
@pytest.mark.parametrize("shape", TMA_SHAPES, ids=TMA_SHAPE_IDS)
def test_descriptor_path_matches_oracle(shape, images, dtype, programs_per_sm, poison_outputs,
                                        device):
    """Tiles of one image, and of two (batch 1 leaves the second out of bounds, batches 3 and 5
    half of the last tile)."""
    _skip_without_descriptors(device)
    n, c, k, h, w, r, pool = shape
    x, weight, scale, shift = _inputs(n, c, k, h, w, r, dtype, device)
    tile = {**TILES[device], "PROGRAMS_PER_SM": programs_per_sm}
    tile["BLOCK_M"] *= images
    y = conv_bn_relu.conv_bn_relu_infer_with_config(x, weight, scale, shift, pool, **tile)
    oracle = conv_bn_relu_infer_reference(x.double(), weight.double(), scale.double(),
                                          shift.double(), pool)
    torch_result = conv_bn_relu_infer_reference(x, weight, scale, shift, pool)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert_within_rule(y, torch_result, oracle, dtype)


def test_descriptor_and_pointer_paths_agree(poison_outputs, device):
    """Same tile products in the same order: the two load paths give the same bits."""
    _skip_without_descriptors(device)
    x, weight, scale, shift = _inputs(2, 32, 24, 7, 9, 3, torch.float16, device)
    tile = TILES[device]
    pointer = {**tile, "USE_TMA": False, "BLOCK_H": 1, "BLOCK_W": 1, "PROGRAMS_PER_SM": 0}
    for pool in (False, True):
        a = conv_bn_relu.conv_bn_relu_infer_with_config(x, weight, scale, shift, pool, **tile)
        b = conv_bn_relu.conv_bn_relu_infer_with_config(x, weight, scale, shift, pool, **pointer)
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("c, k, dtype, match", [
    (32, 16, torch.float32, "fp16/bf16"),
    (40, 16, torch.float16, "BLOCK_K to divide C"),
    (32, 12, torch.float16, "multiples of 8"),
    (8, 16, torch.float16, "padded channels"),
], ids=["fp32", "C-not-multiple-of-BLOCK_K", "K-not-multiple-of-8", "flat-reduction"])
def test_descriptor_config_rejects_ineligible_input(c, k, dtype, match, device, monkeypatch):
    _skip_without_descriptors(device)
    monkeypatch.setenv("VGG_KERNELS_TRITON_PAD_CHANNELS", "0")  # C=8: the flattened reduction
    x, weight, scale, shift = _inputs(1, c, k, 5, 5, 3, dtype, device)
    with pytest.raises(ValueError, match=match):
        conv_bn_relu.conv_bn_relu_infer_with_config(x, weight, scale, shift, False, **TILES[device])


@pytest.mark.parametrize("shape", [(2, 3, 20, 9, 11, 3, True), (1, 3, 16, 8, 8, 3, False),
                                   (3, 3, 24, 5, 7, 3, False), (2, 24, 17, 5, 7, 3, True),
                                   (3, 8, 8, 1, 9, 3, False)],
                         ids=lambda s: "N{}C{}K{}H{}W{}R{}pool{}".format(*s))
@pytest.mark.parametrize("block_k", [16, 32])
def test_persistent_pointer_path_matches_oracle(shape, block_k, poison_outputs, device,
                                                monkeypatch):
    """Programs looping over pointer tiles: with C=3 and BLOCK_K=32 the one-step flattened
    reduction that gathers the next tile ahead, else the plain loop. Every tile written once,
    each right. (Channels left unpadded and off row segments: the flattened reduction is what
    these tiles are for; tests/test_triton_segments.py has the row segments.)"""
    monkeypatch.setenv("VGG_KERNELS_TRITON_PAD_CHANNELS", "0")
    monkeypatch.setenv("VGG_KERNELS_TRITON_SEGMENTS", "0")
    n, c, k, h, w, r, pool = shape
    x, weight, scale, shift = _inputs(n, c, k, h, w, r, torch.float16, device)
    tile = {"USE_TMA": False, "BLOCK_H": 1, "BLOCK_W": 1, "PROGRAMS_PER_SM": 1,
            "BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": block_k}
    y = conv_bn_relu.conv_bn_relu_infer_with_config(x, weight, scale, shift, pool, **tile)
    oracle = conv_bn_relu_infer_reference(x.double(), weight.double(), scale.double(),
                                          shift.double(), pool)
    assert_within_rule(y, conv_bn_relu_infer_reference(x, weight, scale, shift, pool), oracle,
                       torch.float16)


def test_descriptor_config_rejects_odd_tile_with_pool(device):
    _skip_without_descriptors(device)
    x, weight, scale, shift = _inputs(1, 32, 16, 6, 6, 3, torch.float16, device)
    tile = {**TILES[device], "BLOCK_H": 1, "BLOCK_M": TILES[device]["BLOCK_W"]}
    with pytest.raises(ValueError, match="even with pool"):
        conv_bn_relu.conv_bn_relu_infer_with_config(x, weight, scale, shift, True, **tile)


def _eligible(x, weight, pool=False):
    k = weight.shape[0]
    x, weight, _, _, y, _ = conv_bn_relu._prepare(x, weight, torch.ones(k, device=x.device),
                                                  torch.zeros(k, device=x.device), pool)
    return conv_bn_relu._tma_ok(x, weight, y, bool(conv_bn_relu._flat_channels(x, weight)))


def test_eligibility_follows_layout_and_alignment(device):
    _skip_without_descriptors(device)
    x, weight, _, _ = _inputs(2, 64, 64, 6, 6, 3, torch.bfloat16, device)
    assert _eligible(x, weight)
    assert _eligible(x.contiguous(), weight)  # NCHW input is made channels_last first
    assert not _eligible(x.float(), weight.float())
    # a view starting 4 bytes into the storage cannot be a descriptor's base address
    shifted = torch.empty(2 * 64 * 36 + 2, device=device, dtype=torch.bfloat16)[2:]
    shifted = shifted.as_strided(x.shape, (64 * 36, 1, 64 * 6, 64))
    assert not _eligible(shifted, weight)
    # 1x1 weights keep arbitrary strides on their size-1 dimensions; still eligible
    assert _eligible(x, torch.randn(32, 64, 1, 1, device=device, dtype=torch.bfloat16))


def test_pruning_offers_persistent_pointer_tiles_only_to_the_flat_reduction():
    configs = conv_bn_relu._autotune_configs()
    bf16 = torch.empty(1, dtype=torch.bfloat16)
    flat = conv_bn_relu._prune_configs(configs, {"x_ptr": bf16, "C": 3, "K": 64, "H": 224,
                                                 "W": 224}, R=3, FLAT_K=3, TMA_OK=False)
    assert any(c.kwargs["PROGRAMS_PER_SM"] for c in flat)
    assert all(c.kwargs["BLOCK_K"] == 32 for c in flat)
    wide = conv_bn_relu._prune_configs(configs, {"x_ptr": bf16, "C": 64, "K": 64, "H": 224,
                                                 "W": 224}, R=3, FLAT_K=0, TMA_OK=False)
    assert not any(c.kwargs["PROGRAMS_PER_SM"] for c in wide)


def test_pruning_mixes_descriptor_and_pointer_configs():
    configs = conv_bn_relu._autotune_configs()
    bf16 = torch.empty(1, dtype=torch.bfloat16)
    args = {"x_ptr": bf16, "N": 64, "C": 256, "K": 256, "H": 56, "W": 56}
    kept = conv_bn_relu._prune_configs(configs, args, R=3, FLAT_K=0, TMA_OK=True)
    tma = [c for c in kept if c.kwargs["USE_TMA"]]
    assert len(kept) <= conv_bn_relu.MAX_CONFIGS_PER_SHAPE
    assert 1 <= len(tma) <= conv_bn_relu.MAX_TMA_CONFIGS_PER_SHAPE < len(kept)
    for config in tma:
        assert 256 % config.kwargs["BLOCK_K"] == 0
        assert config.kwargs["BLOCK_M"] % (config.kwargs["BLOCK_H"] * config.kwargs["BLOCK_W"]) == 0
    assert not any(c.kwargs["USE_TMA"] for c in conv_bn_relu._prune_configs(
        configs, args, R=3, FLAT_K=0, TMA_OK=False))
    # 14x14 images: no tile wider or taller than 16
    small = conv_bn_relu._prune_configs(configs, {**args, "H": 14, "W": 14}, R=3, FLAT_K=0,
                                        TMA_OK=True)
    assert all(c.kwargs["BLOCK_H"] <= 16 and c.kwargs["BLOCK_W"] <= 16 for c in small)


@pytest.mark.parametrize("n, h, tile", [(64, 14, (4, 2, 16)), (64, 56, (2, 8, 8)),
                                        (64, 28, (1, 4, 32)), (1, 14, (1, 8, 16))])
def test_pruning_ranks_descriptor_tiles_by_image_coverage(n, h, tile):
    """Small images get tiles of several images, as many as the batch has."""
    configs = conv_bn_relu._autotune_configs()
    args = {"x_ptr": torch.empty(1, dtype=torch.bfloat16), "N": n, "C": 512, "K": 512, "H": h,
            "W": h}
    kept = conv_bn_relu._prune_configs(configs, args, R=3, FLAT_K=0, TMA_OK=True)
    tma = [c.kwargs for c in kept if c.kwargs["USE_TMA"]]
    best = tma[0]
    assert (conv_bn_relu.tile_images(best), best["BLOCK_H"], best["BLOCK_W"]) == tile
    coverage = [conv_bn_relu._tile_coverage(n, h, h, config) for config in tma]
    assert coverage == sorted(coverage, reverse=True)
    assert all(conv_bn_relu.tile_images(config) <= n for config in tma)


def test_candidate_configs_offer_descriptors_where_eligible(device):
    _skip_without_descriptors(device)
    x, weight, _, _ = _inputs(2, 64, 64, 28, 28, 3, torch.bfloat16, device)
    candidates = conv_bn_relu.candidate_configs(x, weight, pool=True)
    assert 1 <= len(candidates) <= conv_bn_relu.MAX_CONFIGS_PER_SHAPE
    assert any(c.kwargs["USE_TMA"] for c in candidates)
    fp32 = conv_bn_relu.candidate_configs(x.float(), weight.float(), pool=True)
    assert fp32 and not any(c.kwargs["USE_TMA"] for c in fp32)


def test_triton_without_descriptors_keeps_to_pointers(device, monkeypatch):
    """A Triton without device-side descriptors (or tl.range(flatten=...)) never gets them."""
    _skip_without_descriptors(device)
    monkeypatch.setattr(conv_bn_relu, "_HAS_DESCRIPTORS", False)
    x, weight, _, _ = _inputs(2, 64, 64, 28, 28, 3, torch.bfloat16, device)
    assert not _eligible(x, weight)
    assert not any(c.kwargs["USE_TMA"] for c in conv_bn_relu.candidate_configs(x, weight, True))


def test_switch_keeps_to_pointers(device, monkeypatch):
    """VGG_KERNELS_TRITON_TMA=0 turns the descriptor path off (read at each call)."""
    _skip_without_descriptors(device)
    x, weight, _, _ = _inputs(2, 64, 64, 28, 28, 3, torch.bfloat16, device)
    assert _eligible(x, weight)
    monkeypatch.setenv("VGG_KERNELS_TRITON_TMA", "0")
    assert not _eligible(x, weight)


@pytest.mark.parametrize("c, k, h, w, pool", [(3, 64, 9, 11, True), (1, 16, 6, 5, False),
                                              (8, 24, 7, 7, True), (16, 8, 5, 9, False)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tile", ["descriptor", "default"])
def test_padded_channels_match_oracle(c, k, h, w, pool, dtype, tile, poison_outputs, device):
    """3x3 layers with at most 16 input channels run on channels zero-padded to 16: through a
    16-channel descriptor tile, and through what a plain launch picks (from an NCHW input)."""
    _skip_without_descriptors(device)
    x, weight, scale, shift = _inputs(2, c, k, h, w, 3, dtype, device)
    if tile == "default":
        x = x.contiguous()
    x_prepared, weight_prepared, _, _, _, segments = conv_bn_relu._prepare(x, weight, scale,
                                                                           shift, pool)
    assert not segments
    assert x_prepared.shape[1] == weight_prepared.shape[1] == conv_bn_relu.PADDED_CHANNELS
    assert conv_bn_relu._flat_channels(x_prepared, weight_prepared) == 0
    if tile == "descriptor":
        y = conv_bn_relu.conv_bn_relu_infer_with_config(x, weight, scale, shift, pool,
                                                        **TILES[device])
    else:
        y = conv_bn_relu.conv_bn_relu_infer(x, weight, scale, shift, pool)
    oracle = conv_bn_relu_infer_reference(x.double(), weight.double(), scale.double(),
                                          shift.double(), pool)
    assert_within_rule(y, conv_bn_relu_infer_reference(x, weight, scale, shift, pool), oracle,
                       dtype)


def test_channel_padding_only_where_descriptors_run(device, monkeypatch):
    """fp32, 1x1 kernels, K not a multiple of 8, more than 16 channels and the switches keep
    the unpadded (flattened) path."""
    _skip_without_descriptors(device)
    x, weight, _, _ = _inputs(1, 3, 16, 4, 4, 3, torch.float16, device)
    assert conv_bn_relu._pads_channels(x, weight)
    assert not conv_bn_relu._pads_channels(x.float(), weight.float())
    assert not conv_bn_relu._pads_channels(x, weight[:, :, :1, :1])
    assert not conv_bn_relu._pads_channels(x, weight[:12])
    wide = _inputs(1, 17, 16, 4, 4, 3, torch.float16, device)
    assert not conv_bn_relu._pads_channels(wide[0], wide[1])
    for switch in ("VGG_KERNELS_TRITON_PAD_CHANNELS", "VGG_KERNELS_TRITON_TMA"):
        monkeypatch.setenv(switch, "0")
        assert not conv_bn_relu._pads_channels(x, weight)
        assert conv_bn_relu._flat_channels(x, weight) == 3
        monkeypatch.delenv(switch)


def test_pruning_offers_16_channel_descriptor_steps_only_to_16_channels():
    configs = conv_bn_relu._autotune_configs(hopper=True)
    args = {"x_ptr": torch.empty(1, dtype=torch.bfloat16), "N": 64, "K": 64, "H": 224, "W": 224}
    padded = conv_bn_relu._prune_configs(configs, {**args, "C": 16}, R=3, FLAT_K=0, TMA_OK=True)
    tma = [c.kwargs for c in padded if c.kwargs["USE_TMA"]]
    assert tma and all(c["BLOCK_K"] == 16 for c in tma)
    wide = conv_bn_relu._prune_configs(configs, {**args, "C": 64}, R=3, FLAT_K=0, TMA_OK=True)
    assert all(c.kwargs["BLOCK_K"] >= 32 for c in wide if c.kwargs["USE_TMA"])


@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("index", range(len(conv_bn_relu._autotune_configs(hopper=True))))
def test_every_hopper_config_in_the_interpreter(index, pool, poison_outputs):
    """Every config the autotuner may pick on an H100/H200, at its real tile sizes, against the
    float64 oracle: descriptor tiles on 64 channels (or 3, padded, for 16-channel steps),
    flattened persistent tiles on 3 unpadded channels, pointer tiles on 40; K one block and a
    partial one, batch 3 and odd H and W so that tiles of several images and the image edges
    are cut. On the CPU in the interpreter; the GPU runs the same configs compiled
    (tests/test_triton_gpu.py)."""
    if not interpreting():
        pytest.skip("the CPU runs Triton kernels only under TRITON_INTERPRET=1")
    config = conv_bn_relu._autotune_configs(hopper=True)[index].all_kwargs()
    flat = config["PROGRAMS_PER_SM"] and not config["USE_TMA"]
    if config["USE_TMA"]:
        c = 3 if config["BLOCK_K"] == 16 else 64
    else:
        c = 3 if flat else 40
    k = config["BLOCK_N"] + 8
    x, weight, scale, shift = _inputs(3, c, k, 10, 13, 3, torch.float16, "cpu")
    with pytest.MonkeyPatch.context() as patch:
        if flat:
            patch.setenv("VGG_KERNELS_TRITON_PAD_CHANNELS", "0")
        y = conv_bn_relu.conv_bn_relu_infer_with_config(x, weight, scale, shift, pool, **config)
    oracle = conv_bn_relu_infer_reference(x.double(), weight.double(), scale.double(),
                                          shift.double(), pool)
    assert_within_rule(y, conv_bn_relu_infer_reference(x, weight, scale, shift, pool), oracle,
                       torch.float16)
