"""Fused conv (3x3 pad 1 / 1x1) + folded BatchNorm + ReLU (+ 2x2/2 max-pool) inference kernel.

Implicit GEMM over NHWC: rows are output pixels (M = N*H*W, or 4 * pooled pixels), columns are
output channels (K), the reduction runs over taps x input channels (R*R*C). Two load paths, picked
per config by the autotuner:

- pointers (any GPU, the interpreter, every shape): the A tile is gathered from the input with
  masks (zero padding comes from the mask), the B tile from the weights in (K, R, S, C) memory
  order (channels_last), so both loads are contiguous along the reduction;
- tensor descriptors (TMA; Hopper and newer, fp16/bf16, C and K multiples of 8): the M tile is a
  spatial block of one image loaded per tap through a 4-D descriptor whose out-of-bounds zero
  fill is the padding, in a persistent grid.
"""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from vgg_kernels.backends.triton import interpreting

# Inputs with fewer channels than this use the flattened (R*S*C) reduction: the 3-channel first
# layer becomes one 27-long reduction padded to 32, instead of 9 taps each padded to 16.
FLAT_REDUCTION_MAX_CHANNELS = 16


# Pointer-gather configs (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), most preferred first.
# Measured on an H200 (bf16, batch 64, VGG16 blocks, 4-warp configs only): 128x128x32 beat
# 128x128x64 on every block with C >= 128 (0.58 vs 0.63 ms at C=K=512, H=28), and K=64 blocks
# want BLOCK_N=64 (128x64x32: 0.93 ms vs 1.62 ms for 128x128x32 at C=K=64). 8-warp tiles (two
# warpgroups issuing wgmma) are listed first for the wide layers; every config is checked against
# cuDNN on the GPU (tests/test_triton_gpu.py), since Inductor's conv template once saw wrong
# results with num_warps >= 8 on 3x3 convolutions.
_CONFIG_SHAPES = [
    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 32, 8, 4),
    (128, 128, 32, 4, 4), (128, 128, 32, 4, 3), (64, 128, 64, 4, 4), (128, 128, 64, 4, 4),
    (256, 64, 64, 8, 3), (256, 64, 32, 8, 4), (128, 64, 32, 4, 4), (128, 64, 64, 4, 4),
    (64, 64, 32, 4, 4),
]
# Tensor-descriptor (TMA) configs for Hopper and newer: (BLOCK_H, BLOCK_W, BLOCK_N, BLOCK_K,
# num_warps, num_stages, PROGRAMS_PER_SM). The M tile is a BLOCK_H x BLOCK_W block of one image,
# so a tile that overhangs the image computes wasted rows: _prune_configs prefers the tiles that
# cover the image best (4x32 covers 28x28 images at 87.5%, 8x16 and 16x16 at 77%). The grid is
# persistent, PROGRAMS_PER_SM programs per SM (2 where two fit in shared memory, so one's
# epilogue overlaps the other's main loop), 0 for one program per tile.
_TMA_CONFIG_SHAPES = [
    (8, 16, 256, 64, 8, 3, 1), (16, 16, 128, 64, 8, 3, 1), (4, 32, 256, 64, 8, 3, 1),
    (8, 32, 128, 64, 8, 3, 1), (8, 16, 128, 32, 4, 4, 2), (4, 32, 128, 32, 4, 4, 2),
    (16, 16, 64, 64, 8, 4, 1), (8, 16, 64, 64, 4, 3, 2), (4, 32, 64, 64, 4, 3, 2),
]
# Persistent pointer configs for the flattened reduction (the 3-channel first layer), same
# fields as _CONFIG_SHAPES plus PROGRAMS_PER_SM: its one-step reduction leaves nothing to
# pipeline inside a tile, so programs loop over tiles and gather the next tile ahead.
# PROGRAMS_PER_SM is what fits by registers (sm_90a compiles with triton 3.6: 125-167 registers
# at 4 warps, up to 194 at 8), so no program waits for another to finish.
_FLAT_CONFIG_SHAPES = [
    (128, 64, 32, 4, 3, 3), (64, 64, 32, 4, 3, 3), (256, 64, 32, 8, 3, 1),
]
MAX_CONFIGS_PER_SHAPE = 8
MAX_TMA_CONFIGS_PER_SHAPE = 4
# Widest descriptor row in bytes: one 128-byte swizzled shared-memory row per load.
_TMA_MAX_ROW_BYTES = 128


def _autotune_configs() -> list[triton.Config]:
    """Every candidate config; ``_prune_configs`` picks at most 8 of them per shape."""
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
                       "BLOCK_M": bh * bw, "BLOCK_N": n, "BLOCK_K": k},
                      num_warps=w, num_stages=s)
        for bh, bw, n, k, w, s, p in _TMA_CONFIG_SHAPES
    ]
    return configs


def _shared_memory_limit() -> int:
    if not torch.cuda.is_available():
        return 1 << 30
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(props, "shared_memory_per_block_optin", 99 * 1024)


def _tile_coverage(h: int, w: int, block_h: int, block_w: int) -> float:
    """Fraction of a spatial tile grid's rows that are image pixels."""
    return h * w / (triton.cdiv(h, block_h) * block_h * triton.cdiv(w, block_w) * block_w)


def _prune_configs(configs, named_args, **kwargs):
    """Keep configs whose tiles fit the shape and the shared memory: at most 8, of which at
    most 4 use tensor descriptors (only where TMA_OK).

    BLOCK_K at most the (padded) reduction; BLOCK_N at most K rounded up (no half-empty tiles)
    and, for K >= 256, at least 128 (narrow tiles re-read the input tile once per column block).
    Descriptor tiles: BLOCK_K divides C (a weight tile stays inside one tap), BLOCK_H and BLOCK_W
    at most the (padded) image, one swizzled row per load.
    """
    args = {**named_args, **kwargs}
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
        # the persistent descriptor path keeps its output tile in shared memory as well
        epilogue = bm * bn * element if config.kwargs["USE_TMA"] else 0
        if config.num_stages * (bm * bk + bk * bn) * element + epilogue > limit:
            continue
        if not config.kwargs["USE_TMA"]:
            if config.kwargs["PROGRAMS_PER_SM"] and not args["FLAT_K"]:
                continue  # persistent pointer tiles are for the flattened reduction
            pointer.append(config)
            continue
        if not args.get("TMA_OK", False) or bk * element > _TMA_MAX_ROW_BYTES or args["C"] % bk:
            continue
        if (config.kwargs["BLOCK_H"] > max(8, triton.next_power_of_2(args["H"]))
                or config.kwargs["BLOCK_W"] > max(8, triton.next_power_of_2(args["W"]))):
            continue
        tma.append(config)
    # best image coverage first; the list order breaks ties
    tma.sort(key=lambda config: -_tile_coverage(args["H"], args["W"], config.kwargs["BLOCK_H"],
                                                config.kwargs["BLOCK_W"]))
    tma = tma[:MAX_TMA_CONFIGS_PER_SHAPE]
    kept = pointer[:MAX_CONFIGS_PER_SHAPE - len(tma)] + tma
    return kept or [c for c in configs if not c.kwargs["USE_TMA"]][-1:]


@triton.jit
def _bn_relu(acc, scale_ptr, shift_ptr, cols, col_ok):
    """Folded BN (per output channel scale and shift) and ReLU on an fp32 tile."""
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
    return tl.maximum(acc * scale[None, :] + shift[None, :], 0.0)


@triton.jit
def _tile_rows(pid_m, M_TOTAL, HO, WO, POOL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Conv output positions (image n as int64, oh, ow) and validity of pointer tile ``pid_m``'s
    BLOCK_M rows: output pixels in N, H, W order; with POOL, BLOCK_M // 4 pooled pixels, row
    group ``p = row // (BLOCK_M // 4)`` holding window position (p // 2, p % 2)."""
    ROWS_OUT: tl.constexpr = BLOCK_M // 4 if POOL else BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    if POOL:
        out_pixel = pid_m.to(tl.int64) * ROWS_OUT + rows % ROWS_OUT
    else:
        out_pixel = pid_m.to(tl.int64) * ROWS_OUT + rows
    row_ok = out_pixel < M_TOTAL
    n = out_pixel // (HO * WO)
    rem = (out_pixel % (HO * WO)).to(tl.int32)
    oh = rem // WO
    ow = rem % WO
    if POOL:
        window = rows // ROWS_OUT
        oh = oh * 2 + window // 2
        ow = ow * 2 + window % 2
    return n, oh, ow, row_ok


@triton.jit
def _flat_gather(x_ptr, n, oh, ow, row_ok, H, W, stride_xn, stride_xc, stride_xh, stride_xw,
                 q0, R: tl.constexpr, FLAT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns q0 .. q0 + BLOCK_K of the flattened reduction, q = (r * R + s) * C + c with
    C = FLAT_K a compile-time constant, so the split of q is constant per column."""
    PAD: tl.constexpr = R // 2
    q = q0 + tl.arange(0, BLOCK_K)
    q_ok = q < R * R * FLAT_K
    tap = q // FLAT_K
    c = q % FLAT_K
    ih = oh[:, None] + (tap // R)[None, :] - PAD
    iw = ow[:, None] + (tap % R)[None, :] - PAD
    mask = row_ok[:, None] & q_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    # int64 image offset; in-image offsets fit in int32
    ptrs = (x_ptr + n[:, None] * stride_xn) + ih * stride_xh + iw * stride_xw \
        + c[None, :] * stride_xc
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _flat_weights(w_ptr, cols, col_ok, stride_wk, stride_wc, stride_wr, stride_ws, q0,
                  R: tl.constexpr, FLAT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows q0 .. q0 + BLOCK_K of the flattened reduction of the weights, by output channel."""
    q = q0 + tl.arange(0, BLOCK_K)
    q_ok = q < R * R * FLAT_K
    tap = q // FLAT_K
    offsets = (q % FLAT_K) * stride_wc + (tap // R) * stride_wr + (tap % R) * stride_ws
    w_col = w_ptr + cols.to(tl.int64) * stride_wk
    return tl.load(w_col[None, :] + offsets[:, None], mask=q_ok[:, None] & col_ok[None, :],
                   other=0.0)


@triton.jit
def _store_rows(acc, y_ptr, pid_m, n, oh, ow, row_ok, cols, col_ok, M_TOTAL, HO, WO,
                stride_yn, stride_yc, stride_yh, stride_yw,
                POOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store pointer tile ``pid_m`` (rows as in ``_tile_rows``), max-pooled first with POOL."""
    ROWS_OUT: tl.constexpr = BLOCK_M // 4 if POOL else BLOCK_M
    if POOL:
        # rows p * ROWS_OUT + j are the four window positions of pooled pixel j
        acc = tl.max(tl.reshape(acc, (4, ROWS_OUT, BLOCK_N)), axis=0)
        pixel = pid_m.to(tl.int64) * ROWS_OUT + tl.arange(0, ROWS_OUT)
        pixel_ok = pixel < M_TOTAL
        yn = pixel // (HO * WO)
        yrem = (pixel % (HO * WO)).to(tl.int32)
        yh = yrem // WO
        yw = yrem % WO
    else:
        pixel_ok = row_ok
        yn = n
        yh = oh
        yw = ow
    y_ptrs = (y_ptr + yn[:, None] * stride_yn + (yh * stride_yh + yw * stride_yw)[:, None]
              + cols[None, :] * stride_yc)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=pixel_ok[:, None] & col_ok[None, :])


@triton.jit
def _pointer_tile(
    x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr,
    C, H, W, K, HO, WO, M_TOTAL,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wk, stride_wc, stride_wr, stride_ws,
    stride_yn, stride_yc, stride_yh, stride_yw,
    pid_m, pid_n,
    R: tl.constexpr, POOL: tl.constexpr, FLAT_K: tl.constexpr, EVEN_C: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Tile ``pid_m`` of BLOCK_M rows (see ``_tile_rows``) by BLOCK_N output channels, loaded
    through masked pointer gathers. FLAT_K is 0 (one reduction step per tap and channel block)
    or C, then a compile-time constant: the R*R*C reduction is flattened into BLOCK_K-wide
    steps."""
    PAD: tl.constexpr = R // 2
    n, oh, ow, row_ok = _tile_rows(pid_m, M_TOTAL, HO, WO, POOL, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        for q0 in tl.static_range(0, R * R * FLAT_K, BLOCK_K):  # one step for C=3
            a = _flat_gather(x_ptr, n, oh, ow, row_ok, H, W, stride_xn, stride_xc, stride_xh,
                             stride_xw, q0, R, FLAT_K, BLOCK_K)
            b = _flat_weights(w_ptr, cols, col_ok, stride_wk, stride_wc, stride_wr, stride_ws,
                              q0, R, FLAT_K, BLOCK_K)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        x_row = x_ptr + n * stride_xn  # int64 image offset; in-image offsets fit in int32
        w_col = w_ptr + cols.to(tl.int64) * stride_wk
        offs_k = tl.arange(0, BLOCK_K)
        # one loop over (tap, channel block) so the pipeliner overlaps loads across taps
        num_c = tl.cdiv(C, BLOCK_K)
        for t in range(0, R * R * num_c):
            tap = t // num_c
            c = (t % num_c) * BLOCK_K + offs_k
            r = tap // R
            s = tap % R
            ih = oh + r - PAD
            iw = ow + s - PAD
            pix_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_ptrs = x_row[:, None] + (ih * stride_xh + iw * stride_xw)[:, None] \
                + c[None, :] * stride_xc
            b_ptrs = w_col[None, :] + (c * stride_wc)[:, None] + (r * stride_wr + s * stride_ws)
            if EVEN_C:
                a = tl.load(a_ptrs, mask=pix_ok[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                c_ok = c < C
                a = tl.load(a_ptrs, mask=pix_ok[:, None] & c_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=c_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    acc = _bn_relu(acc, scale_ptr, shift_ptr, cols, col_ok)
    _store_rows(acc, y_ptr, pid_m, n, oh, ow, row_ok, cols, col_ok, M_TOTAL, HO, WO,
                stride_yn, stride_yc, stride_yh, stride_yw, POOL, BLOCK_M, BLOCK_N)


@triton.jit
def _flat_persistent_tiles(
    x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr,
    H, W, K, HO, WO, M_TOTAL,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wk, stride_wc, stride_wr, stride_ws,
    stride_yn, stride_yc, stride_yh, stride_yw,
    R: tl.constexpr, POOL: tl.constexpr, FLAT_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Pointer tiles p, p + P, ... of a one-step flattened reduction (R*R*C <= BLOCK_K: the
    3-channel first layer), with the next tile's input gather issued before this tile's
    product and store, so its latency hides behind them (the gathers are 2-byte loads, which
    cp.async cannot pipeline)."""
    ROWS_OUT: tl.constexpr = BLOCK_M // 4 if POOL else BLOCK_M
    num_n = tl.cdiv(K, BLOCK_N)
    num_tiles = tl.cdiv(M_TOTAL, ROWS_OUT) * num_n
    step = tl.num_programs(0)
    first = tl.program_id(0)
    n, oh, ow, row_ok = _tile_rows(first // num_n, M_TOTAL, HO, WO, POOL, BLOCK_M)
    a = _flat_gather(x_ptr, n, oh, ow, row_ok, H, W, stride_xn, stride_xc, stride_xh, stride_xw,
                     0, R, FLAT_K, BLOCK_K)
    for tile_id in range(first, num_tiles, step):
        # the next tile's rows (all masked past the last tile) and gather, issued first
        n2, oh2, ow2, ok2 = _tile_rows((tile_id + step) // num_n, M_TOTAL, HO, WO, POOL,
                                       BLOCK_M)
        a_next = _flat_gather(x_ptr, n2, oh2, ow2, ok2, H, W, stride_xn, stride_xc, stride_xh,
                              stride_xw, 0, R, FLAT_K, BLOCK_K)
        cols = (tile_id % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < K
        b = _flat_weights(w_ptr, cols, col_ok, stride_wk, stride_wc, stride_wr, stride_ws, 0,
                          R, FLAT_K, BLOCK_K)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(a, b, input_precision=INPUT_PRECISION)
        acc = _bn_relu(acc, scale_ptr, shift_ptr, cols, col_ok)
        _store_rows(acc, y_ptr, tile_id // num_n, n, oh, ow, row_ok, cols, col_ok, M_TOTAL,
                    HO, WO, stride_yn, stride_yc, stride_yh, stride_yw, POOL, BLOCK_M, BLOCK_N)
        a = a_next
        n = n2
        oh = oh2
        ow = ow2
        row_ok = ok2


@triton.jit
def _tma_tiles(
    x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr,
    N, C, H, W, K, HO, WO,
    stride_xn, stride_xh, stride_xw, stride_yn, stride_yh, stride_yw,
    R: tl.constexpr, POOL: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    """Tiles (image, BLOCK_H x BLOCK_W block of conv output positions, BLOCK_N output channels)
    loaded through tensor descriptors (TMA on Hopper and newer). Program p computes tiles p,
    p + P, p + 2P, ... for a grid of P programs: one tile each when the grid covers every tile,
    several in a persistent grid, which builds its descriptors once. FLATTEN fuses the tile loop
    with the reduction loop into one software-pipelined loop, so the next tile's first loads are
    in flight during this tile's last steps and its epilogue (for one program per SM, where no
    other program fills that gap).

    Each (tap, channel block) step loads the input window shifted by the tap: the descriptor's
    out-of-bounds zero fill is the convolution's zero padding (negative coordinates included), so
    the loop has no index arithmetic and no masks. BLOCK_K divides C, so a weight tile never
    crosses into the next tap; weight rows past K load as zeros. The store clips the tile at the
    output's edges, which also gives MaxPool2d's floor for odd H and W.
    """
    PAD: tl.constexpr = R // 2
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    # x: (N, H, W, C), w: (K, R*R*C), y: (N, HO, WO, K), all with unit channel stride
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[N, H, W, C],
                                       strides=[stride_xn, stride_xh, stride_xw, 1],
                                       block_shape=[1, BLOCK_H, BLOCK_W, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K, R * R * C], strides=[R * R * C, 1],
                                       block_shape=[BLOCK_N, BLOCK_K])
    if POOL:
        y_desc = tl.make_tensor_descriptor(y_ptr, shape=[N, HO, WO, K],
                                           strides=[stride_yn, stride_yh, stride_yw, 1],
                                           block_shape=[1, BLOCK_H // 2, BLOCK_W // 2, BLOCK_N])
    else:
        y_desc = tl.make_tensor_descriptor(y_ptr, shape=[N, HO, WO, K],
                                           strides=[stride_yn, stride_yh, stride_yw, 1],
                                           block_shape=[1, BLOCK_H, BLOCK_W, BLOCK_N])
    rows_conv = 2 * HO if POOL else H  # conv output rows (columns) the output needs
    tiles_w = tl.cdiv(2 * WO if POOL else W, BLOCK_W)
    tiles_per_image = tl.cdiv(rows_conv, BLOCK_H) * tiles_w
    num_n = tl.cdiv(K, BLOCK_N)
    num_c = tl.cdiv(C, BLOCK_K)
    for tile_id in tl.range(tl.program_id(0), N * tiles_per_image * num_n, tl.num_programs(0),
                            flatten=FLATTEN):
        # Tiles that share an input block run next to each other: it is read from L2.
        pid_m = tile_id // num_n
        image = pid_m // tiles_per_image
        tile = pid_m % tiles_per_image
        h0 = (tile // tiles_w) * BLOCK_H
        w0 = (tile % tiles_w) * BLOCK_W
        n0 = (tile_id % num_n) * BLOCK_N

        # The product is computed transposed, (channels x pixels) = w @ x^T, so that both
        # operands feed the tensor cores straight from the descriptors' shared-memory tiles.
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for t in range(0, R * R * num_c):
            tap = t // num_c
            c0 = (t % num_c) * BLOCK_K
            a = x_desc.load([image, h0 + tap // R - PAD, w0 + tap % R - PAD, c0])
            a = tl.reshape(a, (BLOCK_M, BLOCK_K))
            b = w_desc.load([n0, tap * C + c0])
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(b, tl.trans(a), acc, input_precision=INPUT_PRECISION)

        acc = tl.trans(acc)
        cols = n0 + tl.arange(0, BLOCK_N)
        acc = _bn_relu(acc, scale_ptr, shift_ptr, cols, cols < K)
        if POOL:
            # rows are (h, w) in the tile, row-major: max over the 2x2 windows
            acc = tl.reshape(acc, (BLOCK_H // 2, 2, BLOCK_W // 2, 2, BLOCK_N))
            acc = tl.max(tl.max(acc, axis=3), axis=1)
            out = tl.reshape(acc.to(y_ptr.dtype.element_ty),
                             (1, BLOCK_H // 2, BLOCK_W // 2, BLOCK_N))
            y_desc.store([image, h0 // 2, w0 // 2, n0], out)
        else:
            out = tl.reshape(acc.to(y_ptr.dtype.element_ty), (1, BLOCK_H, BLOCK_W, BLOCK_N))
            y_desc.store([image, h0, w0, n0], out)


@triton.jit
def conv_bn_relu_fwd_kernel(
    # pointers
    x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr,
    # sizes
    N, C, H, W, K, HO, WO, M_TOTAL,
    # strides (elements)
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wk, stride_wc, stride_wr, stride_ws,
    stride_yn, stride_yc, stride_yh, stride_yw,
    # meta-parameters
    R: tl.constexpr, POOL: tl.constexpr, FLAT_K: tl.constexpr, EVEN_C: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA_OK: tl.constexpr,
    USE_TMA: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M rows x BLOCK_N output channels) tile of
    ``y = maxpool2x2?(relu(conv(x, w) * scale + shift))``.

    x: (N, C, H, W) by strides (channels_last: stride_xc == 1); w: (K, C, R, R) by strides
    (channels_last: stride_wc == 1); scale, shift: fp32 (K,); y: (N, K, HO, WO) by strides.
    M_TOTAL counts output (pooled) pixels. Padding is R // 2 on every side.
    USE_TMA (only with TMA_OK: channels_last x, w and y with 16-byte aligned strides) loads
    BLOCK_H x BLOCK_W spatial tiles through tensor descriptors; otherwise rows are gathered
    through masked pointers. PROGRAMS_PER_SM > 0 makes the grid persistent (that many programs
    per SM, sized in ``_launch``, each looping over tiles); 0 runs one program per tile.
    """
    if USE_TMA:
        tl.static_assert(TMA_OK, "USE_TMA needs TMA_OK")
        tl.static_assert(BLOCK_M == BLOCK_H * BLOCK_W, "BLOCK_M must be BLOCK_H * BLOCK_W")
        _tma_tiles(x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, N, C, H, W, K, HO, WO,
                   stride_xn, stride_xh, stride_xw, stride_yn, stride_yh, stride_yw,
                   R, POOL, INPUT_PRECISION, UPCAST, BLOCK_H, BLOCK_W, BLOCK_N, BLOCK_K,
                   PROGRAMS_PER_SM == 1)
    else:
        num_n = tl.cdiv(K, BLOCK_N)
        # Programs that share an M tile run next to each other: the input tile is read from L2.
        # A persistent grid (PROGRAMS_PER_SM > 0) walks tiles p, p + P, ...; with a one-step
        # flattened reduction each program gathers the next tile's input ahead of time.
        if PROGRAMS_PER_SM > 0 and FLAT_K and R * R * FLAT_K <= BLOCK_K:
            _flat_persistent_tiles(x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, H, W, K, HO, WO,
                                   M_TOTAL, stride_xn, stride_xc, stride_xh, stride_xw,
                                   stride_wk, stride_wc, stride_wr, stride_ws,
                                   stride_yn, stride_yc, stride_yh, stride_yw,
                                   R, POOL, FLAT_K, INPUT_PRECISION, UPCAST,
                                   BLOCK_M, BLOCK_N, BLOCK_K)
        elif PROGRAMS_PER_SM > 0:
            rows_out: tl.constexpr = BLOCK_M // 4 if POOL else BLOCK_M
            num_tiles = tl.cdiv(M_TOTAL, rows_out) * num_n
            for tile_id in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
                _pointer_tile(x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, C, H, W, K, HO, WO,
                              M_TOTAL, stride_xn, stride_xc, stride_xh, stride_xw,
                              stride_wk, stride_wc, stride_wr, stride_ws,
                              stride_yn, stride_yc, stride_yh, stride_yw,
                              tile_id // num_n, tile_id % num_n, R, POOL, FLAT_K, EVEN_C,
                              INPUT_PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            pid = tl.program_id(0)
            _pointer_tile(x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, C, H, W, K, HO, WO, M_TOTAL,
                          stride_xn, stride_xc, stride_xh, stride_xw,
                          stride_wk, stride_wc, stride_wr, stride_ws,
                          stride_yn, stride_yc, stride_yh, stride_yw,
                          pid // num_n, pid % num_n, R, POOL, FLAT_K, EVEN_C, INPUT_PRECISION,
                          UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)


_autotuned_kernel = None


def _kernel_for_launch():
    """The autotuned kernel on GPUs; the plain one (fixed small blocks) in the interpreter."""
    global _autotuned_kernel
    if interpreting():
        return conv_bn_relu_fwd_kernel
    if _autotuned_kernel is None:
        options = {}
        if "cache_results" in triton.autotune.__code__.co_varnames:
            options["cache_results"] = True  # keep the tuned choice across processes
        _autotuned_kernel = triton.autotune(
            configs=_autotune_configs(),
            key=["C", "H", "W", "K", "M_TOTAL", "R", "POOL", "TMA_OK"],
            prune_configs_by={"early_config_prune": _prune_configs},
            **options,
        )(conv_bn_relu_fwd_kernel)
    return _autotuned_kernel


def last_tuned_config() -> dict | None:
    """The config the autotuner chose for the most recent launch (None before any)."""
    config = getattr(_autotuned_kernel, "best_config", None)
    return None if config is None else config.all_kwargs()


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


def _tma_ok(x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, flat: bool) -> bool:
    """Whether the tensor-descriptor path can run: fp16/bf16 on Hopper or newer (or the
    interpreter), a Triton with device-side descriptors, unit channel strides and 16-byte
    aligned strides and offsets (channels_last with C and K multiples of 8). Decided from sizes and
    strides only, so it is the same while torch.compile traces the op."""
    if flat or x.element_size() != 2 or not _HAS_DESCRIPTORS:
        return False
    if x.device.type == "cuda":
        if torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    elif not interpreting():
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
                         "tensors, C and K multiples of 8, and C > 16 for 3x3 kernels")
    if c % config["BLOCK_K"]:
        raise ValueError(f"config USE_TMA=True needs BLOCK_K to divide C (got BLOCK_K="
                         f"{config['BLOCK_K']}, C={c})")
    bh, bw = config["BLOCK_H"], config["BLOCK_W"]
    if config["BLOCK_M"] != bh * bw:
        raise ValueError(f"config BLOCK_M must be BLOCK_H * BLOCK_W (got {config['BLOCK_M']}, "
                         f"{bh} x {bw})")
    if pool and (bh % 2 or bw % 2):
        raise ValueError(f"config BLOCK_H and BLOCK_W must be even with pool (got {bh}, {bw})")


def _launch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
            pool: bool, y: torch.Tensor, launcher, config: dict | None = None) -> None:
    """Launch over all of y; ``config`` (USE_TMA, BLOCK_*, num_warps, num_stages) bypasses
    autotuning."""
    n, c, h, w = x.shape
    k, r = weight.shape[0], weight.shape[-1]
    ho, wo = y.shape[2], y.shape[3]
    m_total = n * ho * wo
    if max(c * h * w, k * h * w) >= 2**31:
        raise ValueError(f"x must have fewer than 2**31 elements per image (got C*H*W = "
                         f"{c * h * w}, K*H*W = {k * h * w})")
    flat = c <= FLAT_REDUCTION_MAX_CHANNELS and r > 1
    interp = interpreting()
    tma_ok = _tma_ok(x, weight, y, flat)
    meta = dict(
        R=r, POOL=pool, FLAT_K=c if flat else 0, EVEN_C=False,
        INPUT_PRECISION=_input_precision(x.dtype),
        UPCAST=interp and x.dtype == torch.bfloat16, TMA_OK=tma_ok,
    )
    kernel = _kernel_for_launch()
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
            m_tiles = n * triton.cdiv(rows, meta_["BLOCK_H"]) * triton.cdiv(cols, meta_["BLOCK_W"])
        else:
            m_tiles = triton.cdiv(m_total, meta_["BLOCK_M"] // 4 if pool else meta_["BLOCK_M"])
        tiles = m_tiles * triton.cdiv(k, meta_["BLOCK_N"])
        if meta_["PROGRAMS_PER_SM"]:
            return (max(1, min(tiles, sms * meta_["PROGRAMS_PER_SM"])),)
        return (tiles,)

    launcher(kernel)[grid](
        x, weight, scale, shift, y,
        n, c, h, w, k, ho, wo, m_total,
        *_strides(x), *_strides(weight), *_strides(y),
        **meta,
    )


# Tests set this: outputs start as NaN, so an element the kernel never writes fails the test.
POISON_OUTPUTS = False


def _prepare(x, weight, scale, shift, pool):
    x = x.contiguous(memory_format=torch.channels_last)
    weight = weight.to(x.dtype).contiguous(memory_format=torch.channels_last)
    scale = scale.to(torch.float32).contiguous()
    shift = shift.to(torch.float32).contiguous()
    n, _, h, w = x.shape
    ho, wo = (h // 2, w // 2) if pool else (h, w)
    y = torch.empty((n, weight.shape[0], ho, wo), device=x.device, dtype=x.dtype,
                    memory_format=torch.channels_last)
    if POISON_OUTPUTS:
        y.fill_(float("nan"))
    return x, weight, scale, shift, y


def candidate_configs(x: torch.Tensor, weight: torch.Tensor, pool: bool) -> list[triton.Config]:
    """The configs (at most 8) the autotuner times for these inputs on this GPU."""
    k = weight.shape[0]
    x, weight, _, _, y = _prepare(x, weight, x.new_ones(k, dtype=torch.float32),
                                  x.new_zeros(k, dtype=torch.float32), pool)
    _, c, h, w = x.shape
    flat = c <= FLAT_REDUCTION_MAX_CHANNELS and weight.shape[-1] > 1
    args = {"x_ptr": x, "C": c, "K": k, "H": h, "W": w}
    return _prune_configs(_autotune_configs(), args, R=weight.shape[-1], FLAT_K=c if flat else 0,
                          TMA_OK=_tma_ok(x, weight, y, flat))


def _direct(kernel):
    return kernel


def conv_bn_relu_infer_eager(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                             shift: torch.Tensor, pool: bool) -> torch.Tensor:
    """Launch the kernel directly (no torch.library op). Shapes as ``conv_bn_relu_infer``."""
    x, weight, scale, shift, y = _prepare(x, weight, scale, shift, pool)
    _launch(x, weight, scale, shift, pool, y, _direct)
    return y


def conv_bn_relu_infer_with_config(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                                   shift: torch.Tensor, pool: bool, **config) -> torch.Tensor:
    """As ``conv_bn_relu_infer`` with one explicit config (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
    num_stages): for testing every autotune config and for tuning sweeps."""
    x, weight, scale, shift, y = _prepare(x, weight, scale, shift, pool)
    _launch(x, weight, scale, shift, pool, y, _direct, config)
    return y


def _register_op():
    """Register ``vgg_kernels::triton_conv_bn_relu_infer`` so torch.compile traces the launch.

    ``triton_op`` + ``wrap_triton`` where torch has them (2.6+): Inductor sees the kernel itself.
    Older torch: an opaque ``custom_op`` with a fake kernel.
    """
    name = "vgg_kernels::triton_conv_bn_relu_infer"
    if hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton"):
        @torch.library.triton_op(name, mutates_args=())
        def op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
               pool: bool) -> torch.Tensor:
            x, weight, scale, shift, y = _prepare(x, weight, scale, shift, pool)
            _launch(x, weight, scale, shift, pool, y, torch.library.wrap_triton)
            return y

        return op

    @torch.library.custom_op(name, mutates_args=())
    def op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
           pool: bool) -> torch.Tensor:
        return conv_bn_relu_infer_eager(x, weight, scale, shift, pool)

    @op.register_fake
    def _(x, weight, scale, shift, pool):
        n, _, h, w = x.shape
        ho, wo = (h // 2, w // 2) if pool else (h, w)
        return x.new_empty((n, weight.shape[0], ho, wo)).contiguous(
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
