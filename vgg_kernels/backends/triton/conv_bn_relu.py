"""Fused conv (3x3 pad 1 / 1x1) + folded BatchNorm + ReLU (+ 2x2/2 max-pool) inference kernel.

Implicit GEMM over NHWC: rows are output pixels (M = N*H*W, or 4 * pooled pixels), columns are
output channels (K), the reduction runs over taps x input channels (R*R*C). Two load paths, picked
per config by the autotuner:

- pointers (any GPU, the interpreter, every shape): the A tile is gathered from the input with
  masks (zero padding comes from the mask), the B tile from the weights in (K, R, S, C) memory
  order (channels_last), so both loads are contiguous along the reduction;
- tensor descriptors (TMA; Hopper and newer, fp16/bf16, C and K multiples of 8): the M tile is a
  spatial block of one image (or of a few consecutive images, for small ones) loaded per tap
  through a 4-D descriptor whose out-of-bounds zero fill is the padding, in a persistent grid.

3x3 layers with at most SEGMENT_MAX_CHANNELS input channels that the descriptor path does not
take run the pointer path on row segments (``kernels._flat_gather``): a copy of the input padded
to 4 channels and by the convolution's border, so each kernel row of a pixel is 16 contiguous
elements that load as vectors, without masks.
"""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from vgg_kernels.backends.triton import direct_launcher, interpreting
from vgg_kernels.backends.triton.kernels import conv_bn_relu_fwd_kernel
from vgg_kernels.checks import check_infer_inputs

# Inputs with fewer channels than this use the flattened (R*S*C) reduction: the 3-channel first
# layer becomes one 27-long reduction padded to 32, instead of 9 taps each padded to 16.
FLAT_REDUCTION_MAX_CHANNELS = 16
# Where the descriptor path can run (fp16/bf16, Hopper or newer), 3x3 layers with at most this
# many input channels (the RGB first layer) take it instead: input and weights are zero-padded
# to PADDED_CHANNELS channels (one 32-byte row per pixel, the 16-byte alignment a descriptor
# needs), so the input arrives through TMA copies instead of 2-byte gathers that cp.async cannot
# pipeline, for 16/3 times the (small) tensor-core work. VGG_KERNELS_TRITON_PAD_CHANNELS=0
# keeps such layers on the flattened pointer path.
PADDED_CHANNELS = 16
# 3x3 layers with at most this many input channels that do not take the padded descriptor path
# run on row segments (see the module docstring); VGG_KERNELS_TRITON_SEGMENTS=0 keeps them on
# the flattened gather of 2-byte elements instead.
SEGMENT_MAX_CHANNELS = 4


# Pointer-gather configs (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), most preferred first.
# Measured on an H200 (bf16, batch 64, VGG16 blocks, 4-warp configs only): 128x128x32 beat
# 128x128x64 on every block with C >= 128 (0.58 vs 0.63 ms at C=K=512, H=28), and K=64 blocks
# want BLOCK_N=64 (128x64x32: 0.93 ms vs 1.62 ms for 128x128x32 at C=K=64). 8-warp tiles (two
# warpgroups issuing wgmma) are listed first for the wide layers, then that 4-warp winner, so
# that it stays a candidate where descriptor configs take half of the 8 places; 256x128 comes
# after it, as the one 8-warp tile that spills (72-104 bytes per thread in sm_90a compiles).
# Every config is checked against cuDNN on the GPU (tests/test_triton_gpu.py), since Inductor's
# conv template once saw wrong results with num_warps >= 8 on 3x3 convolutions.
_CONFIG_SHAPES = [
    (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 32, 8, 4), (128, 128, 32, 4, 4),
    (256, 128, 64, 8, 3), (128, 128, 32, 4, 3), (64, 128, 64, 4, 4), (128, 128, 64, 4, 4),
    (256, 64, 64, 8, 3), (256, 64, 32, 8, 4), (128, 64, 32, 4, 4), (128, 64, 64, 4, 4),
    (64, 64, 32, 4, 4),
]
# Tensor-descriptor (TMA) configs for Hopper and newer: (images, BLOCK_H, BLOCK_W, BLOCK_N,
# BLOCK_K, num_warps, num_stages, PROGRAMS_PER_SM). The M tile is a BLOCK_H x BLOCK_W block of
# each of `images` consecutive images (BLOCK_M = images * BLOCK_H * BLOCK_W), so a tile that
# overhangs the image computes wasted rows: _prune_configs prefers the tiles that cover the
# images best (28x28: 4x32 at 87.5%, 8x16 at 77%; 14x14: 4 images of 2x16 at 87.5%, 8x16 at
# 77%; 56x56: 2 images of 8x8 at 100%, 8x16 at 87.5%). The grid is persistent,
# PROGRAMS_PER_SM programs per SM (2 where two fit in shared memory, so one's epilogue overlaps
# the other's main loop; 4 for the 16-channel steps of padded first layers, whose short loads
# want more in flight), 0 for one program per tile. For 64 output channels, the 4-warp 16x16
# tile is one warpgroup issuing m64n256k16 (channels x pixels), which reads each weight tile from
# shared memory once per step where two warpgroups of m64n128k16 read it twice: counting operand
# reads and the TMA writes, 156 against 172 bytes per tensor-core cycle (the SM has 128).
_TMA_CONFIG_SHAPES = [
    (1, 8, 16, 256, 64, 8, 3, 1), (1, 16, 16, 128, 64, 8, 3, 1), (1, 4, 32, 256, 64, 8, 3, 1),
    (1, 8, 32, 128, 64, 8, 3, 1), (1, 8, 16, 128, 32, 4, 4, 2), (1, 4, 32, 128, 32, 4, 4, 2),
    (1, 16, 16, 64, 64, 8, 4, 1), (1, 16, 16, 64, 64, 4, 4, 1), (1, 8, 16, 64, 64, 4, 3, 2),
    (1, 4, 32, 64, 64, 4, 3, 2),
    (4, 2, 16, 256, 64, 8, 3, 1), (4, 2, 16, 128, 32, 4, 4, 2),
    (2, 8, 8, 256, 64, 8, 3, 1), (2, 8, 8, 128, 32, 4, 4, 2),
    (1, 8, 16, 64, 16, 4, 6, 4), (1, 4, 32, 64, 16, 4, 6, 4), (1, 16, 16, 64, 16, 8, 6, 2),
]
# Persistent pointer configs for the flattened reduction (the 3-channel first layer), same
# fields as _CONFIG_SHAPES plus PROGRAMS_PER_SM: its one-step reduction leaves nothing to
# pipeline inside a tile, so programs loop over tiles and gather the next tile ahead.
# PROGRAMS_PER_SM is what fits in the 64K-register file, so no program waits for another to
# finish (python -m vgg_kernels.backends.triton.codegen, sm_90a, triton 3.8 / 3.6: 237 / 174
# registers at 128x64 with 4 warps, 154 / 126 at 64x64, 237 / 177 at 256x64 with 8 warps).
# The 64-wide steps are for row segments (three kernel rows of 16 in one step, so the next
# tile's loads can be issued ahead: 154 / 126 registers at 64x64, 213 / 211 at 128x64); the
# flattened 27-long reduction prunes them.
_FLAT_CONFIG_SHAPES = [
    (128, 64, 32, 4, 3, 2), (64, 64, 32, 4, 3, 3), (256, 64, 32, 8, 3, 1),
    (64, 64, 64, 4, 3, 3), (128, 64, 64, 4, 3, 2),
]
MAX_CONFIGS_PER_SHAPE = 8
MAX_TMA_CONFIGS_PER_SHAPE = 4
# Widest descriptor row in bytes: one 128-byte swizzled shared-memory row per load.
_TMA_MAX_ROW_BYTES = 128


def _autotune_configs(hopper: bool | None = None) -> list[triton.Config]:
    """Every candidate config; ``_prune_configs`` picks at most 8 of them per shape. ``hopper``
    (default: whether the current GPU is Hopper or newer) keeps 4-stage pointer pipelines, which
    older GPUs cut to 3, and adds nothing else: descriptor configs are pruned per launch."""
    if hopper is None:
        hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
    configs = [
        triton.Config({"USE_TMA": False, "BLOCK_H": 1, "BLOCK_W": 1, "PROGRAMS_PER_SM": 0,
                       "BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k},
                      num_warps=w, num_stages=s if hopper else min(s, 3))
        for m, n, k, w, s in _CONFIG_SHAPES
    ]
    configs += [
        triton.Config({"USE_TMA": False, "BLOCK_H": 1, "BLOCK_W": 1, "PROGRAMS_PER_SM": p,
                       "BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k},
                      num_warps=w, num_stages=s if hopper else min(s, 3))
        for m, n, k, w, s, p in _FLAT_CONFIG_SHAPES
    ]
    configs += [
        triton.Config({"USE_TMA": True, "BLOCK_H": bh, "BLOCK_W": bw, "PROGRAMS_PER_SM": p,
                       "BLOCK_M": i * bh * bw, "BLOCK_N": n, "BLOCK_K": k},
                      num_warps=w, num_stages=s)
        for i, bh, bw, n, k, w, s, p in _TMA_CONFIG_SHAPES
    ]
    # off Hopper the stage cap can make two configs the same: keep the first of each
    seen: set[str] = set()
    unique = []
    for config in configs:
        label = describe_config(config.all_kwargs())
        if label not in seen:
            seen.add(label)
            unique.append(config)
    return unique


def _shared_memory_limit() -> int:
    if not torch.cuda.is_available():
        return 1 << 30
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(props, "shared_memory_per_block_optin", 99 * 1024)


def tile_images(config: dict) -> int:
    """Images per descriptor tile: BLOCK_M // (BLOCK_H * BLOCK_W)."""
    return config["BLOCK_M"] // (config["BLOCK_H"] * config["BLOCK_W"])


def _tile_coverage(n: int, h: int, w: int, config: dict) -> float:
    """Fraction of a descriptor tile grid's rows that are image pixels."""
    i, bh, bw = tile_images(config), config["BLOCK_H"], config["BLOCK_W"]
    padded = triton.cdiv(n, i) * i * triton.cdiv(h, bh) * bh * triton.cdiv(w, bw) * bw
    return n * h * w / padded


def _prune_configs(configs, named_args, **kwargs):
    """Keep configs whose tiles fit the shape and the shared memory: at most 8, of which at
    most 4 use tensor descriptors (only where TMA_OK).

    BLOCK_K at most the (padded) reduction; BLOCK_N at most K rounded up (no half-empty tiles)
    and, for K >= 256, at least 128 (narrow tiles re-read the input tile once per column block).
    Persistent pointer tiles only where one step covers a flattened reduction (the first layer,
    gathered or on row segments).
    Descriptor tiles: BLOCK_K divides C (a weight tile stays inside one tap), BLOCK_H and BLOCK_W
    at most the (padded) image, images per tile at most N, one swizzled row per load.
    """
    args = {**named_args, **kwargs}
    if args.get("SEGMENTS"):
        reduction = args["R"] * 16
    else:
        reduction = args["C"] * (args["R"] ** 2 if args["FLAT_K"] else 1)
    k = triton.next_power_of_2(args["K"])
    element = args["x_ptr"].element_size()
    limit = _shared_memory_limit()
    pointer, tma = [], []
    for config in configs:
        bm, bn, bk = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        if bk > max(32, triton.next_power_of_2(reduction)) or bn > max(64, k):
            continue
        if k >= 256 and bn < 128:
            continue
        extras = bool(args.get("STORE_ACTIVATION") or args.get("STORE_CODES"))
        if shared_memory_estimate(config, element, extras) > limit:
            continue
        if extras and not extras_fit(config):
            continue
        if not config.kwargs["USE_TMA"]:
            if config.kwargs["PROGRAMS_PER_SM"] and (not args["FLAT_K"] or bk < reduction):
                continue  # persistent pointer tiles are for one-step flattened reductions
            pointer.append(config)
            continue
        if not args.get("TMA_OK", False) or bk * element > _TMA_MAX_ROW_BYTES or args["C"] % bk:
            continue
        if bk < min(args["C"], 32):  # 16-channel steps only for (padded) 16-channel inputs
            continue
        if (config.kwargs["BLOCK_H"] > max(8, triton.next_power_of_2(args["H"]))
                or config.kwargs["BLOCK_W"] > max(8, triton.next_power_of_2(args["W"]))
                or tile_images(config.kwargs) > args["N"]):
            continue
        tma.append(config)
    # best image coverage first; the list order breaks ties
    tma.sort(key=lambda config: -_tile_coverage(args["N"], args["H"], args["W"], config.kwargs))
    tma = tma[:MAX_TMA_CONFIGS_PER_SHAPE]
    kept = pointer[:MAX_CONFIGS_PER_SHAPE - len(tma)] + tma
    return kept or [c for c in configs if not c.kwargs["USE_TMA"]][-1:]


def shared_memory_estimate(config: triton.Config, element: int, extras: bool = False) -> int:
    """Bytes of shared memory a config needs: its pipeline stages, and for descriptor tiles the
    output tile the persistent path stages too (twice with ``extras``: the tapped activation's
    tile as well)."""
    bm, bn, bk = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    epilogue = bm * bn * element * (1 + extras) if config.kwargs["USE_TMA"] else 0
    return config.num_stages * (bm * bk + bk * bn) * element + epilogue


def extras_fit(config: triton.Config) -> bool:
    """Whether a config may also store the tapped activation and the window codes (the input
    gradient's forward): the descriptor tiles that do not spill with them in sm_90a compiles
    (python -m vgg_kernels.backends.triton.codegen --kernels train): at most 128 channels (the
    256-channel tiles spill 24-32 bytes per thread) and not two images of 8x8 (8 bytes). The
    pointer tiles, the fallback off Hopper, all take them (and spill with them: the full tile
    is stored through 2-D pointers)."""
    kwargs = config.kwargs
    if not kwargs["USE_TMA"]:
        return True
    two_small_images = tile_images(kwargs) > 1 and kwargs["BLOCK_H"] * kwargs["BLOCK_W"] == 64
    return kwargs["BLOCK_N"] <= 128 and not two_small_images


_tuned_kernels: dict[str, object] = {}
_tuned_lock = threading.Lock()


def autotuned(name: str, kernel, configs: Callable[[], list], key: list[str], prune,
              cache_results: bool = False):
    """``kernel`` autotuned over ``configs()`` (keyed by ``key``, pruned early by ``prune``),
    built once per ``name`` however many threads make their first call at once;
    ``cache_results`` keeps the tuned choice across processes where this Triton can."""
    with _tuned_lock:
        tuned = _tuned_kernels.get(name)
        if tuned is None:
            options = {}
            if cache_results and "cache_results" in triton.autotune.__code__.co_varnames:
                options["cache_results"] = True
            tuned = triton.autotune(configs=configs(), key=key,
                                    prune_configs_by={"early_config_prune": prune},
                                    **options)(kernel)
            _tuned_kernels[name] = tuned
    return tuned


def _kernel_for_launch():
    """The autotuned kernel on GPUs; the plain one (fixed small blocks) in the interpreter."""
    if interpreting():
        return conv_bn_relu_fwd_kernel
    return autotuned("infer", conv_bn_relu_fwd_kernel, _autotune_configs,
                     ["C", "H", "W", "K", "M_TOTAL", "R", "POOL", "TMA_OK", "SEGMENTS",
                      "STORE_ACTIVATION", "STORE_CODES"], _prune_configs, cache_results=True)


# The training forward's conv (EPILOGUE 1) runs pointer tiles of STATS_BLOCK_M rows only: its
# per-tile statistics buffer then has the same shape whichever config the autotuner picks.
STATS_BLOCK_M = 128


def stats_config(config: triton.Config) -> bool:
    """Whether the training forward's conv runs ``config``: pointer tiles of STATS_BLOCK_M
    rows, but not the 64-wide persistent tile, which spills with the statistics epilogue (192
    bytes per thread in sm_90a compiles; python -m vgg_kernels.backends.triton.codegen
    --kernels train)."""
    kwargs = config.kwargs
    return (not kwargs["USE_TMA"] and kwargs["BLOCK_M"] == STATS_BLOCK_M
            and not (kwargs["PROGRAMS_PER_SM"] and kwargs["BLOCK_K"] == 64))


def stats_block_rows() -> int:
    """Rows per tile of the training forward's conv: the statistics' tile size."""
    return INTERPRETER_BLOCKS["BLOCK_M"] if interpreting() else STATS_BLOCK_M


def _stats_kernel_for_launch():
    """The autotuned training-forward conv: the pointer configs of STATS_BLOCK_M rows."""
    return autotuned("stats", conv_bn_relu_fwd_kernel,
                     lambda: [c for c in _autotune_configs() if stats_config(c)],
                     ["C", "H", "W", "K", "M_TOTAL", "R", "SEGMENTS", "EPILOGUE"],
                     _prune_configs, cache_results=True)


def last_tuned_config() -> dict | None:
    """The config the autotuner chose for the most recent launch (None before any)."""
    config = getattr(_tuned_kernels.get("infer"), "best_config", None)
    return None if config is None else config.all_kwargs()


def describe_config(config: dict) -> str:
    """A config (``triton.Config.all_kwargs()``) in a few characters: ``tma 4x2x16/256/64 w8 s3
    p1`` is a descriptor tile of 4 images' 2x16 pixels by 256 channels, 64-channel steps, 8
    warps, 3 stages, one program per SM; ``ptr 128/...`` a pointer tile of 128 rows."""
    if config["USE_TMA"]:
        images = tile_images(config)
        tile = f"tma {f'{images}x' if images > 1 else ''}{config['BLOCK_H']}x{config['BLOCK_W']}"
    else:
        tile = f"ptr {config['BLOCK_M']}"
    return (f"{tile}/{config['BLOCK_N']}/{config['BLOCK_K']} w{config['num_warps']} "
            f"s{config['num_stages']} p{config['PROGRAMS_PER_SM']}")


# Interpreter blocks: small, so that odd test shapes cross every block boundary.
INTERPRETER_BLOCKS = {"USE_TMA": False, "BLOCK_H": 1, "BLOCK_W": 1, "PROGRAMS_PER_SM": 0,
                      "BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}
# The interpreter's stand-in for the SM count: persistent grids loop over several tiles.
INTERPRETER_SMS = 2
_TMA_ALIGNMENT = 16  # bytes: descriptor base address and strides


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 with ``allow_tf32`` runs 3xTF32: one TF32 pass truncates operands and measured
    7.7e-4 relative error against cuDNN's 2.7e-4 (TF32 with rounding) on an H200; 3xTF32 stays
    below cuDNN's error. Without ``allow_tf32``, full fp32 (IEEE) products."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32x3"
    return "ieee"


def _triton_has_descriptors() -> bool:
    """``tl.make_tensor_descriptor`` and ``tl.range(flatten=...)``, which the path uses."""
    try:
        return (hasattr(tl, "make_tensor_descriptor")
                and "flatten" in inspect.signature(tl.range.__init__).parameters)
    except (TypeError, ValueError):
        return False


_HAS_DESCRIPTORS = _triton_has_descriptors()


def _strides(tensor: torch.Tensor) -> tuple[int, int, int, int]:
    """(N, C, H, W) strides, with those of size-1 dimensions (never stepped, and left arbitrary
    by ``contiguous``) replaced by the dense channels_last ones."""
    _, c, h, w = tensor.shape
    dense = (h * w * c, 1, w * c, c)
    return tuple(s if size > 1 else d for s, size, d in
                 zip(tensor.stride(), tensor.shape, dense, strict=True))


def _descriptors_usable(x: torch.Tensor) -> bool:
    """fp16/bf16 on Hopper or newer (or the interpreter), a Triton with device-side descriptors,
    and the path not switched off (VGG_KERNELS_TRITON_TMA=0)."""
    if x.element_size() != 2 or not _HAS_DESCRIPTORS:
        return False
    if os.environ.get("VGG_KERNELS_TRITON_TMA", "1") == "0":  # the switch to pointers only
        return False
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device)[0] >= 9
    return interpreting()


def _pads_channels(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this 3x3 layer runs on PADDED_CHANNELS zero-padded channels through the
    descriptor path (few input channels, K a multiple of 8, descriptors usable, not switched
    off by VGG_KERNELS_TRITON_PAD_CHANNELS=0)."""
    k, c, r, _ = weight.shape
    if r == 1 or c > PADDED_CHANNELS or k % 8:
        return False
    if os.environ.get("VGG_KERNELS_TRITON_PAD_CHANNELS", "1") == "0":
        return False
    return _descriptors_usable(x)


def _segments(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this layer runs on row segments: 3x3, at most SEGMENT_MAX_CHANNELS input
    channels, not on padded channels through descriptors, not switched off
    (VGG_KERNELS_TRITON_SEGMENTS=0)."""
    _, c, r, _ = weight.shape
    if r != 3 or c > SEGMENT_MAX_CHANNELS or _pads_channels(x, weight):
        return False
    return os.environ.get("VGG_KERNELS_TRITON_SEGMENTS", "1") != "0"


def _tma_ok(x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, flat: bool) -> bool:
    """Whether the tensor-descriptor path can run: not switched off (VGG_KERNELS_TRITON_TMA=0),
    fp16/bf16 on Hopper or newer (or the interpreter), a Triton with device-side descriptors,
    unit channel strides and 16-byte
    aligned strides and offsets (channels_last with C and K multiples of 8). Decided from sizes and
    strides only, so it is the same while torch.compile traces the op."""
    if flat or not _descriptors_usable(x):
        return False
    _, c, r, _ = weight.shape
    if _strides(weight) != (r * r * c, 1, r * c, c):
        return False
    element = x.element_size()
    for tensor in (x, weight, y):
        strides = _strides(tensor)
        if strides[1] != 1 or any(strides[d] * element % _TMA_ALIGNMENT for d in (0, 2, 3)):
            return False
        if tensor.storage_offset() * element % _TMA_ALIGNMENT:
            return False
    return True


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _torch_allocator(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-side tensor descriptors live in a global-memory scratch that Triton allocates
    through ``triton.set_allocator``; install a torch allocator unless one is set."""
    try:
        from triton.runtime import _allocation
    except ImportError:
        return
    current = getattr(_allocation, "_allocator", None)
    if current is not None and isinstance(current.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_allocator)


def _check_config(config: dict, tma_ok: bool, pool: bool, c: int) -> None:
    if not config.get("USE_TMA", False):
        return
    if not tma_ok:
        raise ValueError("config USE_TMA=True needs fp16/bf16 on Hopper or newer, channels_last "
                         "tensors, C and K multiples of 8, and for 3x3 kernels C > 16 or "
                         "padded channels (C <= 16 unless VGG_KERNELS_TRITON_PAD_CHANNELS=0)")
    if c % config["BLOCK_K"]:
        raise ValueError(f"config USE_TMA=True needs BLOCK_K to divide C (got BLOCK_K="
                         f"{config['BLOCK_K']}, C={c})")
    bh, bw = config["BLOCK_H"], config["BLOCK_W"]
    if config["BLOCK_M"] % (bh * bw):
        raise ValueError(f"config BLOCK_M must be a multiple of BLOCK_H * BLOCK_W (got "
                         f"{config['BLOCK_M']}, {bh} x {bw})")
    if pool and (bh % 2 or bw % 2):
        raise ValueError(f"config BLOCK_H and BLOCK_W must be even with pool (got {bh}, {bw})")


def _flat_channels(x: torch.Tensor, weight: torch.Tensor) -> int:
    """FLAT_K for a layer: C when its reduction is flattened (few channels, 3x3, and not on
    padded channels), else 0."""
    c, r = weight.shape[1], weight.shape[-1]
    if c > FLAT_REDUCTION_MAX_CHANNELS or r == 1 or _pads_channels(x, weight):
        return 0
    return c


_DUMMIES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element stand-in for an output pointer the kernel does not write."""
    key = (device, dtype)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.empty(1, device=device, dtype=dtype)
    return _DUMMIES[key]


def _launch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
            pool: bool, y: torch.Tensor, launcher, config: dict | None = None,
            segments: bool = False, activation: torch.Tensor | None = None,
            codes: torch.Tensor | None = None, stats: torch.Tensor | None = None) -> None:
    """Launch over all of y; ``config`` (USE_TMA, BLOCK_*, num_warps, num_stages) bypasses
    autotuning. ``segments``: x is ``_segment_copy`` of the input (from ``_prepare``).
    ``activation`` and ``codes`` (with pool, even H and W): the extra outputs of the input
    gradient's forward (``kernels._store_rows``). ``stats``: the training forward's epilogue,
    (3, tiles, K) fp32 per-tile statistics with shift the conv bias (pointer tiles of
    ``stats_block_rows`` rows; no pool)."""
    n, c, h, w = x.shape
    k, r = weight.shape[0], weight.shape[-1]
    ho, wo = y.shape[2], y.shape[3]
    m_total = n * ho * wo
    if m_total == 0:  # no images, or images of no (pooled) pixels: no tile to run
        return
    if max(c * h * w, k * h * w, h * w + 256) >= 2**31:
        raise ValueError(f"x must have fewer than 2**31 elements per image (got C*H*W = "
                         f"{c * h * w}, K*H*W = {k * h * w})")
    flat = weight.shape[1] if segments else _flat_channels(x, weight)
    interp = interpreting()
    tma_ok = stats is None and _tma_ok(x, weight, y, bool(flat))
    meta = dict(
        R=r, POOL=pool, FLAT_K=flat, SEGMENTS=segments, EVEN_C=False,
        INPUT_PRECISION=_input_precision(x.dtype),
        UPCAST=interp and x.dtype == torch.bfloat16, TMA_OK=tma_ok,
        EPILOGUE=0 if stats is None else 1, STORE_ACTIVATION=activation is not None,
        STORE_CODES=codes is not None,
    )
    kernel = _kernel_for_launch() if stats is None else _stats_kernel_for_launch()
    if interp or config is not None:
        kernel = conv_bn_relu_fwd_kernel
        blocks = {"USE_TMA": False, "BLOCK_H": 1, "BLOCK_W": 1, "PROGRAMS_PER_SM": 0,
                  **(INTERPRETER_BLOCKS if config is None else config)}
        _check_config(blocks, tma_ok, pool, c)
        meta["EVEN_C"] = c % blocks["BLOCK_K"] == 0
        meta.update(blocks)
    else:
        # every tuned BLOCK_K divides 64: a multiple of 64 channels needs no channel mask
        meta["EVEN_C"] = c % 64 == 0
    if tma_ok and x.is_cuda:
        _ensure_allocator()

    sms = _sm_count(x.device)

    def grid(meta_):
        if meta_["USE_TMA"]:
            rows, cols = (2 * ho, 2 * wo) if pool else (h, w)
            m_tiles = (triton.cdiv(n, tile_images(meta_)) * triton.cdiv(rows, meta_["BLOCK_H"])
                       * triton.cdiv(cols, meta_["BLOCK_W"]))
        else:
            m_tiles = triton.cdiv(m_total, meta_["BLOCK_M"] // 4 if pool else meta_["BLOCK_M"])
        num_n = triton.cdiv(k, meta_["BLOCK_N"])
        tiles = m_tiles * num_n
        if meta_["PROGRAMS_PER_SM"]:
            # a multiple of the column blocks: each program keeps one (and its weights)
            programs = min(tiles, sms * meta_["PROGRAMS_PER_SM"])
            return (max(num_n, programs - programs % num_n),)
        return (tiles,)

    launcher(kernel)[grid](
        x, weight, scale, shift, y,
        y if activation is None else activation,
        _dummy(x.device, torch.uint8) if codes is None else codes,
        _dummy(x.device, torch.float32) if stats is None else stats,
        n, c, h, w, k, ho, wo, m_total,
        *_strides(x), *_strides(weight), *_strides(y),
        **meta,
    )


# Tests set this: outputs start as NaN, so an element the kernel never writes fails the test.
POISON_OUTPUTS = False


def _pad_channels(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (any layout) channels_last with its channels zero-padded to PADDED_CHANNELS:
    one copy (padding the last dimension of the NHWC view), no in-place writes to trace."""
    extra = (0, PADDED_CHANNELS - tensor.shape[1])
    nhwc = torch.nn.functional.pad(tensor.permute(0, 2, 3, 1), extra).contiguous()
    return nhwc.permute(0, 3, 1, 2)


def _segment_copy(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the row segments read it: channels_last, channels zero-padded to 4, one zero row
    above and below, one zero column left and two right (``kernels._flat_gather``)."""
    _, c, _, _ = x.shape
    nhwc = torch.nn.functional.pad(x.permute(0, 2, 3, 1), (0, 4 - c, 1, 2, 1, 1)).contiguous()
    return nhwc.permute(0, 3, 1, 2)


def _prepare(x, weight, scale, shift, pool):
    """Inputs (checked: the op can be called directly) in the kernel's layouts, the output to
    fill, and whether x is a row-segment copy."""
    check_infer_inputs(x, weight, scale, shift, pool)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16 for the Triton kernel (got "
                        f"{x.dtype})")
    weight = weight.to(x.dtype)
    segments = _segments(x, weight)
    h, w = x.shape[2:]  # before any copy: the segment copy is padded spatially
    ho, wo = (h // 2, w // 2) if pool else (h, w)
    if weight.shape[1] < PADDED_CHANNELS and _pads_channels(x, weight):
        x, weight = _pad_channels(x), _pad_channels(weight)
    elif segments:
        x = _segment_copy(x)
        weight = weight.contiguous(memory_format=torch.channels_last)
    else:
        x = x.contiguous(memory_format=torch.channels_last)
        weight = weight.contiguous(memory_format=torch.channels_last)
    scale = scale.to(torch.float32).contiguous()
    shift = shift.to(torch.float32).contiguous()
    y = torch.empty((x.shape[0], weight.shape[0], ho, wo), device=x.device, dtype=x.dtype,
                    memory_format=torch.channels_last)
    if POISON_OUTPUTS:
        y.fill_(float("nan"))
    return x, weight, scale, shift, y, segments


def candidate_configs(x: torch.Tensor, weight: torch.Tensor, pool: bool) -> list[triton.Config]:
    """The configs (at most 8) the autotuner times for these inputs on this GPU."""
    k = weight.shape[0]
    x, weight, _, _, y, segments = _prepare(x, weight, x.new_ones(k, dtype=torch.float32),
                                            x.new_zeros(k, dtype=torch.float32), pool)
    _, c, h, w = x.shape
    flat = weight.shape[1] if segments else _flat_channels(x, weight)
    args = {"x_ptr": x, "N": x.shape[0], "C": c, "K": k, "H": h, "W": w}
    return _prune_configs(_autotune_configs(), args, R=weight.shape[-1], FLAT_K=flat,
                          SEGMENTS=segments, TMA_OK=_tma_ok(x, weight, y, bool(flat)))


def conv_bn_relu_infer_eager(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                             shift: torch.Tensor, pool: bool) -> torch.Tensor:
    """Launch the kernel directly (no torch.library op). Shapes as ``conv_bn_relu_infer``."""
    x, weight, scale, shift, y, segments = _prepare(x, weight, scale, shift, pool)
    _launch(x, weight, scale, shift, pool, y, direct_launcher, segments=segments)
    return y


def conv_bn_relu_infer_with_config(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                                   shift: torch.Tensor, pool: bool, **config) -> torch.Tensor:
    """As ``conv_bn_relu_infer`` with one explicit config (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
    num_stages): for testing every autotune config and for tuning sweeps."""
    x, weight, scale, shift, y, segments = _prepare(x, weight, scale, shift, pool)
    _launch(x, weight, scale, shift, pool, y, direct_launcher, config, segments)
    return y


def _register_op():
    """Register ``vgg_kernels::triton_conv_bn_relu_infer`` so torch.compile traces the launch.

    ``triton_op`` + ``wrap_triton`` where torch has them (2.6+): Inductor sees the kernel itself.
    Older torch, and the interpreter (whose kernels are Python functions that neither
    ``wrap_triton`` nor tracing with fake tensors can run): an opaque ``custom_op`` with a fake
    kernel.
    """
    name = "vgg_kernels::triton_conv_bn_relu_infer"
    if (hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
            and not interpreting()):
        @torch.library.triton_op(name, mutates_args=())
        def op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
               pool: bool) -> torch.Tensor:
            x, weight, scale, shift, y, segments = _prepare(x, weight, scale, shift, pool)
            _launch(x, weight, scale, shift, pool, y, torch.library.wrap_triton,
                    segments=segments)
            return y

        return op

    @torch.library.custom_op(name, mutates_args=())
    def op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
           pool: bool) -> torch.Tensor:
        return conv_bn_relu_infer_eager(x, weight, scale, shift, pool)

    @op.register_fake
    def _(x, weight, scale, shift, pool):
        # a call mixing devices (meta and CPU, say) reaches this kernel: fail as the real one
        check_infer_inputs(x, weight, scale, shift, pool)
        n, _, h, w = x.shape
        ho, wo = (h // 2, w // 2) if pool else (h, w)
        # as _prepare allocates it: the strides of size-1 dimensions decide later views
        return torch.empty((n, weight.shape[0], ho, wo), dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last)

    return op


conv_bn_relu_infer_op = _register_op()


def conv_bn_relu_infer(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       shift: torch.Tensor, pool: bool) -> torch.Tensor:
    """``maxpool2x2?(relu(conv(x, weight) * scale + shift))`` with the Triton kernel.

    x: (N, C, H, W) fp32/fp16/bf16 (made channels_last if it is not); weight: (K, C, R, R),
    R in {1, 3}; scale, shift: (K,) fp32. Returns (N, K, H', W') channels_last in x's dtype.
    fp32 uses tf32 when ``torch.backends.cudnn.allow_tf32`` is set, as cuDNN does.
    """
    return conv_bn_relu_infer_op(x, weight, scale, shift, pool)
