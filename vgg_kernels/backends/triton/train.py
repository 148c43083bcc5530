"""Launchers of the Triton training block and of the input gradient (kernels in
``train_kernels.py`` and the forward conv of ``kernels.py``), registered as ``torch.library``
ops (``triton_op`` where torch has it, so Inductor sees the kernels; an opaque ``custom_op``
with a fake kernel under the interpreter).

- ``conv_bn_stats``: the conv with z = conv + bias written in the storage dtype and per-tile
  statistics in its epilogue (``kernels._tile_stats``), merged here with Chan's formula in fp64.
- ``bn_relu_pool``, ``bn_relu_backward``: normalise + ReLU (+ pool), and its backward as one
  reduction pass and one elementwise pass (deterministic: per-block partial sums, no atomics).
- ``conv_dgrad``, ``conv_wgrad``: the conv's input and weight gradients.
- ``conv_bn_relu_infer_outputs``, ``relu_pool_backward``: a folded block (eval-mode BN, or no
  BN) whose forward keeps what its backward needs (the output, or the pool's window codes;
  never the input unless the weight needs a gradient) and whose backward is one kernel when
  only the input needs a gradient (the dgrad's operand loads apply the ReLU mask and route the
  pooled gradient).

Every activation is NHWC (channels_last); per-channel vectors fp32.
"""

from __future__ import annotations

import torch
import triton

from vgg_kernels.backends.triton import conv_bn_relu, direct_launcher, interpreting
from vgg_kernels.backends.triton import train_kernels as tk
from vgg_kernels.backends.triton.conv_bn_relu import (
    _input_precision,
    _launch,
    _prepare,
    stats_block_rows,
)

# Elementwise kernels: BLOCK_P pixels x BLOCK_K channels per program (4096 elements on a GPU;
# in the interpreter, whose cost is per program and per loop step, few channels per block so
# that odd channel counts cross block edges, and long pixel blocks).
_ELEMENTWISE = {"BLOCK_P": 64, "BLOCK_K": 64, "num_warps": 4}
_ELEMENTWISE_INTERPRETED = {"BLOCK_P": 64, "BLOCK_K": 16}
# dgrad tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) and wgrad tiles (BLOCK_K,
# BLOCK_C, BLOCK_P, num_warps, num_stages): the forward pointer path's shapes.
_DGRAD_CONFIGS = [(128, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 64, 32, 4, 4),
                  (128, 128, 64, 8, 3), (64, 128, 32, 4, 4)]
_WGRAD_CONFIGS = [(128, 128, 32, 8, 3), (64, 64, 64, 4, 3), (128, 64, 32, 4, 4),
                  (64, 128, 32, 4, 4)]
_DGRAD_INTERPRETED = {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16}
_WGRAD_INTERPRETED = {"BLOCK_K": 16, "BLOCK_C": 16, "BLOCK_P": 128}
# wgrad splits its pixels so that at least this many programs per SM run.
_WGRAD_PROGRAMS_PER_SM = 4


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _empty_nhwc(n, c, h, w, like: torch.Tensor, dtype: torch.dtype | None = None):
    out = torch.empty((n, c, h, w), device=like.device, dtype=dtype or like.dtype,
                      memory_format=torch.channels_last)
    if conv_bn_relu.POISON_OUTPUTS and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def _vector(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _split_mean(mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from vgg_kernels.backends.reference import split_mean

    hi, lo = split_mean(mean)
    return hi.contiguous(), lo.contiguous()


def _elementwise_grid(pixels: int, k: int, blocks: dict) -> tuple[int, int]:
    return triton.cdiv(pixels, blocks["BLOCK_P"]), triton.cdiv(k, blocks["BLOCK_K"])


def _elementwise_blocks() -> dict:
    return _ELEMENTWISE_INTERPRETED if interpreting() else _ELEMENTWISE


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


# -- training forward ----------------------------------------------------------------------------

def _merge_tile_stats(stats: torch.Tensor, rows: int, tile: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Chan's parallel formula over the tiles of ``kernels._tile_stats`` (z0, sum d, sum d^2 per
    tile and channel, d = z - z0), in fp64: the batch mean and biased variance per channel."""
    tiles = stats.shape[1]
    wide = stats.double()
    counts = torch.full((tiles, 1), float(tile), dtype=torch.float64, device=stats.device)
    counts[-1] = rows - tile * (tiles - 1)
    z0, s1, s2 = wide[0], wide[1], wide[2]
    tile_mean = z0 + s1 / counts
    tile_m2 = (s2 - s1 * (s1 / counts)).clamp_min(0)
    mean = (counts * tile_mean).sum(0) / rows
    m2 = tile_m2.sum(0) + (counts * (tile_mean - mean).square()).sum(0)
    return mean, m2 / rows


def _conv_bn_stats(launcher, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    k = weight.shape[0]
    zeros = torch.zeros(k, device=x.device, dtype=torch.float32)
    shift = zeros if bias is None else bias
    x, weight, scale, shift, z, segments = _prepare(x, weight, zeros + 1, shift, False)
    rows = z.shape[0] * z.shape[2] * z.shape[3]
    tile = stats_block_rows()
    stats = torch.empty((3, triton.cdiv(rows, tile), k), device=x.device, dtype=torch.float32)
    _launch(x, weight, scale, shift, False, z, launcher, segments=segments, stats=stats)
    mean, var = _merge_tile_stats(stats, rows, tile)
    return z, mean, var


def _bn_relu_pool(launcher, z, mean, scale, beta, pool):
    z = _channels_last(z)
    n, k, h, w = z.shape
    ho, wo = (h // 2, w // 2) if pool else (h, w)
    y = _empty_nhwc(n, k, ho, wo, z)
    hi, lo = _split_mean(mean)
    blocks = _elementwise_blocks()
    launcher(tk.bn_relu_pool_kernel)[_elementwise_grid(n * ho * wo, k, blocks)](
        z, hi, lo, _vector(scale), _vector(beta), y, n, h, w, k, ho, wo, POOL=pool, **blocks)
    return y


def _bn_relu_backward(launcher, grad_y, z, mean, invstd, scale, beta, pool):
    """(grad_z, grad_gamma, grad_beta, grad_bias): grad_bias is sum over pixels of grad_z,
    scale * (sum g - count * mean g - mean(g xhat) * sum xhat), from the same sums."""
    z = _channels_last(z)
    grad_y = _channels_last(grad_y.to(z.dtype))
    n, k, h, w = z.shape
    ho, wo = (h // 2, w // 2) if pool else (h, w)
    hi, lo = _split_mean(mean)
    invstd, scale, beta = _vector(invstd), _vector(scale), _vector(beta)
    blocks = _elementwise_blocks()
    grid = _elementwise_grid(n * h * w, k, blocks)
    partial = torch.empty((3, grid[0], k), device=z.device, dtype=torch.float32)
    launcher(tk.bn_relu_backward_reduce_kernel)[grid](
        grad_y, z, hi, lo, invstd, scale, beta, partial, n, h, w, k, ho, wo, POOL=pool,
        **blocks)
    sums = partial.double().sum(1)  # fixed order: bit-identical runs
    count = n * h * w
    mean_g, mean_gx = sums[0] / count, sums[1] / count
    grad_z = _empty_nhwc(n, k, h, w, z)
    launcher(tk.bn_relu_backward_apply_kernel)[grid](
        grad_y, z, hi, lo, invstd, scale, beta, mean_g.float(), mean_gx.float(), grad_z,
        n, h, w, k, ho, wo, POOL=pool, **blocks)
    grad_bias = scale.double() * (sums[0] - count * mean_g - mean_gx * sums[2])
    return grad_z, sums[1].float(), sums[0].float(), grad_bias.float()


# -- gradients of the conv -----------------------------------------------------------------------

def _flipped(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(C, K, R, R) weights flipped in space, channels_last (contiguous along K): dgrad's B."""
    return weight.to(dtype).flip((2, 3)).transpose(0, 1).contiguous(
        memory_format=torch.channels_last)


def _dgrad_kernel():
    if interpreting():
        return tk.conv_dgrad_kernel
    return conv_bn_relu.autotuned(
        "dgrad", tk.conv_dgrad_kernel,
        lambda: [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w,
                               num_stages=s) for m, n, k, w, s in _DGRAD_CONFIGS],
        ["N", "H", "W", "K", "C", "R", "PROLOGUE", "POOL", "TAPPED"], _prune_dgrad)


def _prune_dgrad(configs, named_args, **kwargs):
    """Tiles no wider than C (rounded up) and reduction steps no longer than K."""
    c = triton.next_power_of_2(named_args["C"])
    k = triton.next_power_of_2(named_args["K"])
    kept = [cfg for cfg in configs
            if cfg.kwargs["BLOCK_N"] <= max(64, c) and cfg.kwargs["BLOCK_K"] <= max(32, k)]
    return kept or configs[-1:]


def _conv_dgrad(launcher, g, mask, grad_a, act, scale, weight, x_shape, pool, prologue):
    """The input gradient (N, C, H, W) channels_last in g's (or mask's) dtype. prologue 0: g is
    the conv output's gradient (N, K, H, W); 1: g is the block's grad_y, mask its output or
    pool codes, grad_a/act a tapped activation's gradient and value, scale the fold's scale
    (``train_kernels._masked_gradient``)."""
    n, c, h, w = x_shape
    k, r = weight.shape[0], weight.shape[-1]
    dtype = g.dtype
    w_t = _flipped(weight, dtype)
    g = _channels_last(g)
    out = _empty_nhwc(n, c, h, w, g)
    ho, wo = (h // 2, w // 2) if pool else (h, w)
    dummy = torch.empty(1, device=g.device, dtype=dtype)
    interp = interpreting()
    meta = dict(R=r, PROLOGUE=prologue, POOL=pool, TAPPED=grad_a is not None,
                EVEN_K=False, INPUT_PRECISION=_input_precision(dtype),
                UPCAST=interp and dtype == torch.bfloat16)
    if interp:
        meta.update(_DGRAD_INTERPRETED)
        meta["EVEN_K"] = k % meta["BLOCK_K"] == 0
    else:
        meta["EVEN_K"] = k % 64 == 0

    def grid(meta_):
        return (triton.cdiv(n * h * w, meta_["BLOCK_M"]) * triton.cdiv(c, meta_["BLOCK_N"]),)

    launcher(_dgrad_kernel())[grid](
        g, dummy if mask is None else _channels_last(mask),
        dummy if grad_a is None else _channels_last(grad_a.to(dtype)),
        dummy if act is None else _channels_last(act),
        torch.ones(k, device=g.device) if scale is None else _vector(scale),
        w_t, out, n, h, w, k, c, ho, wo,
        w_t.stride(0), w_t.stride(1), w_t.stride(2), w_t.stride(3), **meta)
    return out


def _wgrad_kernel():
    if interpreting():
        return tk.conv_wgrad_kernel
    return conv_bn_relu.autotuned(
        "wgrad", tk.conv_wgrad_kernel,
        lambda: [triton.Config({"BLOCK_K": k, "BLOCK_C": c, "BLOCK_P": p}, num_warps=w,
                               num_stages=s) for k, c, p, w, s in _WGRAD_CONFIGS],
        ["N", "H", "W", "K", "C", "R", "PIXELS_PER_SPLIT"], _prune_wgrad)


def _prune_wgrad(configs, named_args, **kwargs):
    c = triton.next_power_of_2(named_args["C"])
    k = triton.next_power_of_2(named_args["K"])
    kept = [cfg for cfg in configs
            if cfg.kwargs["BLOCK_C"] <= max(64, c) and cfg.kwargs["BLOCK_K"] <= max(64, k)]
    return kept or configs[-1:]


def wgrad_splits(pixels: int, k: int, c: int, r: int, device: torch.device) -> int:
    """Splits of the pixels for the weight gradient: enough programs to fill the GPU (the
    14x14 layers have few output tiles but 12k pixels per image batch), each split at least
    1024 pixels long (256 in the interpreter, where small tests still cross splits).
    Independent of the tile config, so the partial buffer's shape is too."""
    tiles = r * r * triton.cdiv(k, 128) * triton.cdiv(c, 128)
    wanted = triton.cdiv(_WGRAD_PROGRAMS_PER_SM * _sm_count(device), tiles)
    shortest = 256 if interpreting() else 1024
    return max(1, min(wanted, triton.cdiv(pixels, shortest)))


def _conv_wgrad(launcher, g, x, weight_shape):
    """sum over pixels of g (N, K, H, W) x x (N, C, H, W) shifted by each tap: (K, C, R, R) in
    fp32, split over pixels into partial sums added in a fixed order."""
    k, c, r, _ = weight_shape
    g = _channels_last(g)
    x = _channels_last(x.to(g.dtype))
    n, _, h, w = x.shape
    pixels = n * h * w
    splits = wgrad_splits(pixels, k, c, r, g.device)
    per_split = triton.cdiv(pixels, splits)
    partial = torch.empty((splits, r * r, k, c), device=g.device, dtype=torch.float32)
    interp = interpreting()
    meta = dict(R=r, INPUT_PRECISION=_input_precision(g.dtype),
                UPCAST=interp and g.dtype == torch.bfloat16)
    if interp:
        meta.update(_WGRAD_INTERPRETED)

    def grid(meta_):
        return (r * r * triton.cdiv(k, meta_["BLOCK_K"]) * triton.cdiv(c, meta_["BLOCK_C"]),
                splits)

    launcher(_wgrad_kernel())[grid](g, x, partial, n, h, w, k, c, per_split, **meta)
    # (tap, K, C) -> (K, C, R, R)
    return partial.sum(0).view(r, r, k, c).permute(2, 3, 0, 1).contiguous()


# -- folded blocks (eval-mode BN or no BN) -------------------------------------------------------

def _pool_extras_supported(h: int, w: int) -> bool:
    """The kernel writes the full-resolution activation next to the pooled output for even H
    and W (the pool then reads every conv output; the window codes need no such thing)."""
    return h % 2 == 0 and w % 2 == 0


def _infer_outputs(launcher, x, weight, scale, shift, pool, activation, codes):
    """(y, activation or an empty tensor, codes or an empty tensor): the inference block with
    the extra outputs of ``kernels._store_rows`` (pool, even H and W)."""
    k = weight.shape[0]
    n, _, h, w = x.shape
    x_, weight_, scale_, shift_, y, segments = _prepare(x, weight, scale, shift, pool)
    empty = x.new_empty(0)
    act = _empty_nhwc(n, k, h, w, y) if activation else None
    code = (_empty_nhwc(n, k, h // 2, w // 2, y, torch.uint8) if codes else None)
    _launch(x_, weight_, scale_, shift_, pool, y, launcher, segments=segments, activation=act,
            codes=code)
    return y, empty if act is None else act, (empty.to(torch.uint8) if code is None else code)


def _relu_pool_backward(launcher, grad_y, mask, grad_a, act, scale, pool, shape):
    """(grad_pre, grad_shift): the gradient of a folded block's conv output, scale * g, and
    sum g per channel (``train_kernels._masked_gradient``)."""
    n, k, h, w = shape
    ho, wo = (h // 2, w // 2) if pool else (h, w)
    dtype = mask.dtype if mask.is_floating_point() else grad_y.dtype
    grad_y = _channels_last(grad_y.to(dtype))
    blocks = _elementwise_blocks()
    grid = _elementwise_grid(n * h * w, k, blocks)
    grad_pre = _empty_nhwc(n, k, h, w, grad_y)
    partial = torch.empty((grid[0], k), device=grad_y.device, dtype=torch.float32)
    dummy = torch.empty(1, device=grad_y.device, dtype=dtype)
    launcher(tk.relu_pool_backward_kernel)[grid](
        grad_y, _channels_last(mask), dummy if grad_a is None else _channels_last(grad_a.to(dtype)),
        dummy if act is None else _channels_last(act), _vector(scale), grad_pre, partial,
        n, h, w, k, ho, wo, POOL=pool, TAPPED=grad_a is not None, **blocks)
    return grad_pre, partial.double().sum(0).float()


# -- torch.library registration ------------------------------------------------------------------

def _register():
    """Each launcher as a ``vgg_kernels::triton_*`` op: ``triton_op`` + ``wrap_triton`` where
    torch has them (2.6+) and the kernels are compiled; an opaque ``custom_op`` with a fake
    kernel otherwise (the interpreter's kernels are Python functions that tracing cannot run)."""
    library = torch.library
    traced = (hasattr(library, "triton_op") and hasattr(library, "wrap_triton")
              and not interpreting())
    launcher = library.wrap_triton if traced else direct_launcher

    def define(name, fn, fake):
        if traced:
            return library.triton_op(f"vgg_kernels::{name}", fn, mutates_args=())
        op = library.custom_op(f"vgg_kernels::{name}", fn, mutates_args=())
        op.register_fake(fake)
        return op

    def conv_bn_stats(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _conv_bn_stats(launcher, x, weight, bias)

    def conv_bn_stats_fake(x, weight, bias):
        n, _, h, w = x.shape
        k = weight.shape[0]
        z = torch.empty((n, k, h, w), dtype=x.dtype, device=x.device,
                        memory_format=torch.channels_last)
        return z, x.new_empty(k, dtype=torch.float64), x.new_empty(k, dtype=torch.float64)

    def bn_relu_pool(z: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor,
                     beta: torch.Tensor, pool: bool) -> torch.Tensor:
        return _bn_relu_pool(launcher, z, mean, scale, beta, pool)

    def bn_relu_pool_fake(z, mean, scale, beta, pool):
        n, k, h, w = z.shape
        shape = (n, k, h // 2, w // 2) if pool else (n, k, h, w)
        return torch.empty(shape, dtype=z.dtype, device=z.device,
                           memory_format=torch.channels_last)

    def bn_relu_backward(grad_y: torch.Tensor, z: torch.Tensor, mean: torch.Tensor,
                         invstd: torch.Tensor, scale: torch.Tensor, beta: torch.Tensor,
                         pool: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                              torch.Tensor]:
        return _bn_relu_backward(launcher, grad_y, z, mean, invstd, scale, beta, pool)

    def bn_relu_backward_fake(grad_y, z, mean, invstd, scale, beta, pool):
        k = z.shape[1]
        vectors = [z.new_empty(k, dtype=torch.float32) for _ in range(3)]
        return (torch.empty(z.shape, dtype=z.dtype, device=z.device,
                            memory_format=torch.channels_last), *vectors)

    def conv_dgrad(g: torch.Tensor, mask: torch.Tensor | None, grad_a: torch.Tensor | None,
                   act: torch.Tensor | None, scale: torch.Tensor | None, weight: torch.Tensor,
                   x_shape: list[int], pool: bool, prologue: int) -> torch.Tensor:
        return _conv_dgrad(launcher, g, mask, grad_a, act, scale, weight, x_shape, pool,
                           prologue)

    def conv_dgrad_fake(g, mask, grad_a, act, scale, weight, x_shape, pool, prologue):
        return torch.empty(x_shape, dtype=g.dtype, device=g.device,
                           memory_format=torch.channels_last)

    def conv_wgrad(g: torch.Tensor, x: torch.Tensor, weight_shape: list[int]) -> torch.Tensor:
        return _conv_wgrad(launcher, g, x, weight_shape)

    def conv_wgrad_fake(g, x, weight_shape):
        return g.new_empty(weight_shape, dtype=torch.float32)

    def infer_outputs(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      shift: torch.Tensor, pool: bool, activation: bool, codes: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _infer_outputs(launcher, x, weight, scale, shift, pool, activation, codes)

    def infer_outputs_fake(x, weight, scale, shift, pool, activation, codes):
        n, _, h, w = x.shape
        k = weight.shape[0]
        ho, wo = (h // 2, w // 2) if pool else (h, w)

        def nhwc(shape, dtype):
            return torch.empty(shape, dtype=dtype, device=x.device,
                               memory_format=torch.channels_last)

        return (nhwc((n, k, ho, wo), x.dtype),
                nhwc((n, k, h, w), x.dtype) if activation else x.new_empty(0),
                nhwc((n, k, ho, wo), torch.uint8) if codes else x.new_empty(0, dtype=torch.uint8))

    def relu_pool_backward(grad_y: torch.Tensor, mask: torch.Tensor,
                           grad_a: torch.Tensor | None, act: torch.Tensor | None,
                           scale: torch.Tensor, pool: bool, shape: list[int]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        return _relu_pool_backward(launcher, grad_y, mask, grad_a, act, scale, pool, shape)

    def relu_pool_backward_fake(grad_y, mask, grad_a, act, scale, pool, shape):
        dtype = mask.dtype if mask.is_floating_point() else grad_y.dtype
        return (torch.empty(shape, dtype=dtype, device=grad_y.device,
                            memory_format=torch.channels_last),
                grad_y.new_empty(shape[1], dtype=torch.float32))

    return {
        "conv_bn_stats": define("triton_conv_bn_stats", conv_bn_stats, conv_bn_stats_fake),
        "bn_relu_pool": define("triton_bn_relu_pool", bn_relu_pool, bn_relu_pool_fake),
        "bn_relu_backward": define("triton_bn_relu_backward", bn_relu_backward,
                                   bn_relu_backward_fake),
        "conv_dgrad": define("triton_conv_dgrad", conv_dgrad, conv_dgrad_fake),
        "conv_wgrad": define("triton_conv_wgrad", conv_wgrad, conv_wgrad_fake),
        "infer_outputs": define("triton_conv_bn_relu_infer_outputs", infer_outputs,
                                infer_outputs_fake),
        "relu_pool_backward": define("triton_relu_pool_backward", relu_pool_backward,
                                     relu_pool_backward_fake),
    }


OPS = _register()
