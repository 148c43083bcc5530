"""Public functional ops: fused conv (3x3 pad 1 or 1x1) + BatchNorm + ReLU (+ 2x2/2 max-pool).

Tensors are (N, C, H, W) in shape; the backends work in channels_last (NHWC) memory and return
channels_last outputs. Accumulation and BN statistics are fp32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from vgg_kernels.backends import check_backend_name, resolve_backend
from vgg_kernels.backends.reference import (
    centered_reference,
    conv_bn_relu_infer_backward,
    conv_bn_relu_infer_reference,
)

__all__ = [
    "fold_bn",
    "conv_bn_relu_infer",
    "conv_bn_relu_train",
    "conv_bn_relu",
    "check_conv_inputs",
    "check_infer_inputs",
    "TrainRecipe",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_conv_inputs(x: torch.Tensor, weight: torch.Tensor, pool: bool = False) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument when ``x``/``weight`` do not fit.

    x: (N, C, H, W) floating point; weight: (K, C, R, R) with R in {1, 3}, on ``x``'s device.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor (got {type(x).__name__})")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor (got {type(weight).__name__})")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"x must be a floating-point tensor (float32, float16, bfloat16 or float64); "
            f"got {x.dtype}"
        )
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor (N, C, H, W); got {x.dim()}-D shape "
                         f"{tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be a 4-D tensor (K, C, R, R); got {weight.dim()}-D")
    k_h, k_w = weight.shape[-2:]
    if k_h != k_w or k_h not in (1, 3):
        raise ValueError(f"weight must have kernel size 3x3 or 1x1; got {k_h}x{k_w}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must have {weight.shape[1]} channels to match weight "
                         f"(got {x.shape[1]})")
    if x.shape[1] == 0:
        raise ValueError("x must have at least 1 channel (got 0)")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least 1 output channel (got 0)")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor (got {weight.dtype})")
    if x.device != weight.device:
        raise ValueError(f"weight must be on x's device {x.device} (got {weight.device})")
    if pool and x.shape[0] > 0 and (x.shape[2] < 2 or x.shape[3] < 2):
        raise ValueError(f"x must be at least 2x2 for the fused 2x2 max-pool; got "
                         f"{x.shape[2]}x{x.shape[3]}")


def _check_channel_vector(name: str, t: torch.Tensor | None, k: int, device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (got {type(t).__name__})")
    if t.dim() != 1 or t.shape[0] != k:
        raise ValueError(f"{name} must have shape ({k},) (got {tuple(t.shape)})")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (got {t.dtype})")
    if t.device != device:
        raise ValueError(f"{name} must be on x's device {device} (got {t.device})")


def check_infer_inputs(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       shift: torch.Tensor, pool: bool = False) -> None:
    """``check_conv_inputs`` plus fp (K,) ``scale`` and ``shift`` on ``x``'s device."""
    check_conv_inputs(x, weight, pool)
    for name, t in (("scale", scale), ("shift", shift)):
        if t is None:
            raise TypeError(f"{name} must be a torch.Tensor (got None)")
        _check_channel_vector(name, t, weight.shape[0], x.device)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` gives convolutions on ``device``'s type right now; None when
    autocast is off there."""
    kind = device.type
    if not hasattr(torch, "get_autocast_dtype"):  # torch < 2.4
        return None
    try:
        if not torch.is_autocast_enabled(kind):
            return None
        return torch.get_autocast_dtype(kind)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return None


def _autocast_operands(x: torch.Tensor, weight: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x and weight as ``F.conv2d`` sees them under ``torch.autocast``: float16/32 operands cast
    to the autocast dtype (float64 ones are left alone, as autocast does). Scale, shift, the conv
    bias and BN's parameters and statistics stay as they are: the kernels apply them in fp32."""
    dtype = autocast_dtype(x.device)
    if dtype is None:
        return x, weight
    cast = [t.to(dtype) if t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t
            for t in (x, weight)]
    return cast[0], cast[1]


def fold_bn(conv_bias: torch.Tensor | None, running_mean: torch.Tensor | None,
            running_var: torch.Tensor | None, bn_weight: torch.Tensor | None,
            bn_bias: torch.Tensor | None, eps: float, out_channels: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold eval-mode BatchNorm (and the conv bias) into a per-channel fp32 scale and shift.

    ``bn(conv(x) + b) = conv(x) * scale + shift`` with ``scale = gamma / sqrt(var + eps)`` and
    ``shift = beta + (b - mean) * scale``. Absent statistics mean no BatchNorm (scale 1); absent
    ``bn_weight``/``bn_bias`` mean ``affine=False``. Differentiable.
    """
    f32 = torch.float32
    bias = (torch.zeros(out_channels, device=device, dtype=f32) if conv_bias is None
            else conv_bias.to(f32))
    if running_mean is None or running_var is None:
        return torch.ones(out_channels, device=device, dtype=f32), bias
    scale = torch.rsqrt(running_var.to(f32) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(f32)
    shift = (bias - running_mean.to(f32)) * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(f32)
    return scale, shift


def _first_order_only(function_name: str):
    """Backward wrapper for ops whose backward is not itself differentiable. Under
    ``create_graph=True`` (grad mode on during the backward) the gradients it returns carry an
    error node, so a second backward through them raises a message that names the op and the
    way out, instead of autograd's "element 0 of tensors does not require grad" (the approach
    of ``torch.autograd.function.once_differentiable``)."""
    def wrap(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return outputs
            message = (f"vgg_kernels: {function_name} does not support double backward "
                       f"(a backward through gradients taken with create_graph=True); "
                       f"backend='reference' runs PyTorch ops, which do")
            error = torch._C._functions.DelayedError(message.encode(), len(outputs))

            def requiring_grad(t):
                return None if t is None else t.detach().requires_grad_(True)

            return error(*[requiring_grad(t) for t in outputs])
        return wrapper
    return wrap


class _ConvBNReLUInfer(torch.autograd.Function):
    """A backend's forward kernel, with the backward computed by PyTorch ops: the case of a
    scale that needs a gradient (eval-mode BN whose parameters are trained)."""

    @staticmethod
    def forward(ctx, x, weight, scale, shift, pool, backend):  # type: ignore[override]
        ctx.save_for_backward(x, weight, scale, shift)
        ctx.pool = pool
        return backend.conv_bn_relu_infer(x, weight, scale, shift, pool)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight, scale, shift = ctx.saved_tensors
        grads = conv_bn_relu_infer_backward(grad_y, x, weight, scale, shift, ctx.pool,
                                            tuple(ctx.needs_input_grad[:4]))
        return (*grads, None, None)


class _ConvBNReLUFolded(torch.autograd.Function):
    """A folded block (eval-mode BN, or no BN: ``maxpool2x2?(relu(conv(x) * scale + shift))``)
    whose scale needs no gradient: a frozen network's block (perceptual losses), or a conv + bias
    + ReLU block in training.

    The forward keeps what the backward needs and no more: the output (no pool) or the pool's
    uint8 window codes (which element each 2x2 maximum came from, and whether it passed the
    ReLU), the tapped activation when one is returned, and the input only when the weight
    needs a gradient. The backward is the backend's: with only the input needing a gradient,
    ``conv_dgrad_masked`` (in Triton one kernel: the dgrad's operand loads apply the mask and
    route the pooled gradient); else ``relu_pool_backward`` (whose sums are the shift's, i.e.
    the conv bias's, gradient), then ``conv_dgrad`` and ``conv_wgrad``."""

    @staticmethod
    def forward(ctx, x, weight, scale, shift, pool, activation, backend):  # type: ignore[override]
        tapped = activation and pool
        y, act, codes = backend.conv_bn_relu_infer_outputs(x, weight, scale, shift, pool,
                                                           tapped, pool)
        needs_weight = weight.requires_grad
        ctx.save_for_backward(weight, scale, codes if pool else y, act if tapped else None,
                              x if needs_weight else None)
        ctx.set_materialize_grads(False)
        ctx.pool, ctx.tapped, ctx.backend = pool, tapped, backend
        ctx.x_shape = list(x.shape)
        ctx.conv_shape = [x.shape[0], weight.shape[0], x.shape[2], x.shape[3]]
        if tapped:
            return y, act
        return y

    @staticmethod
    @_first_order_only("the fused folded block (conv_bn_relu_infer)")
    def backward(ctx, grad_y, grad_act=None):  # type: ignore[override]
        weight, scale, mask, act, x = ctx.saved_tensors
        needs = ctx.needs_input_grad
        backend = ctx.backend
        if grad_y is None:  # only the tapped activation reached the loss
            n, k, h, w = ctx.conv_shape
            grad_y = act.new_zeros((n, k, h // 2, w // 2)).contiguous(
                memory_format=torch.channels_last)
        grad_x = grad_w = grad_shift = None
        if needs[1] or needs[3]:
            grad_pre, sums = backend.relu_pool_backward(grad_y, mask, grad_act, act, scale,
                                                        ctx.pool, ctx.conv_shape)
            if needs[0]:
                grad_x = backend.conv_dgrad(grad_pre, weight, ctx.x_shape)
            if needs[1]:
                grad_w = backend.conv_wgrad(grad_pre, x, list(weight.shape)).to(weight.dtype)
            if needs[3]:
                grad_shift = sums
        elif needs[0]:
            grad_x = backend.conv_dgrad_masked(grad_y, mask, grad_act, act, scale, weight,
                                               ctx.x_shape, ctx.pool)
        return grad_x, grad_w, None, grad_shift, None, None, None


def conv_bn_relu_infer(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       shift: torch.Tensor, *, pool: bool = False, backend: str = "auto",
                       activation: bool = False):
    """Inference block: ``maxpool2x2?(relu(conv(x, weight) * scale + shift))``.

    Args:
        x: (N, C, H, W) input, fp32/fp16/bf16 (fp64 on the reference backend).
        weight: (K, C, 3, 3) (padding 1) or (K, C, 1, 1) (no padding).
        scale, shift: (K,) per-channel affine applied to the fp32 accumulator; see ``fold_bn``.
        pool: apply ``nn.MaxPool2d(2)`` (floor semantics) after the ReLU.
        backend: ``'auto'``, ``'triton'``, ``'native'`` or ``'reference'``.
        activation: with ``pool``, also return the full-resolution ReLU output (a feature tap
            before the pool).

    Returns:
        (N, K, H', W') channels_last tensor in ``x``'s dtype; with ``activation`` and ``pool``
        the tuple ``(pooled, activation)``.
    """
    check_backend_name(backend)
    check_infer_inputs(x, weight, scale, shift, pool)
    x, weight = _autocast_operands(x, weight)
    tapped = pool and activation
    k = weight.shape[0]
    if x.numel() == 0:  # no images, or images of no pixels: nothing to compute
        n, _, h, w = x.shape
        y = x.new_empty((n, k, h // 2, w // 2) if pool else (n, k, h, w))
        y = y.contiguous(memory_format=torch.channels_last)
        if tapped:
            return y, x.new_empty((n, k, h, w)).contiguous(memory_format=torch.channels_last)
        return y
    impl = resolve_backend(backend, x.device, x.dtype, "conv_bn_relu_infer")
    if impl.name == "reference":
        if tapped:
            full = conv_bn_relu_infer_reference(x, weight, scale, shift, False)
            return F.max_pool2d(full, 2).contiguous(memory_format=torch.channels_last), full
        return conv_bn_relu_infer_reference(x, weight, scale, shift, pool)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, scale, shift)):
        if not scale.requires_grad:
            return _ConvBNReLUFolded.apply(x, weight, scale, shift, pool, activation, impl)
        if tapped:
            full = _ConvBNReLUInfer.apply(x, weight, scale, shift, False, impl)
            return F.max_pool2d(full, 2).contiguous(memory_format=torch.channels_last), full
        return _ConvBNReLUInfer.apply(x, weight, scale, shift, pool, impl)
    if tapped:
        y, full, _ = impl.conv_bn_relu_infer_outputs(x, weight, scale, shift, True, True, False)
        return y, full
    return impl.conv_bn_relu_infer(x, weight, scale, shift, pool)


def _batch_moments(group, mean: torch.Tensor, var: torch.Tensor, count: int):
    """Mean, biased variance (fp32) and element count of the batches of every process of
    ``group`` from each process's own: one all-gather of (count, mean, var), merged with Chan's
    parallel formula in fp64 (the processes' batches may differ in size; one with an empty batch
    contributes a count of 0)."""
    import torch.distributed as dist

    k = mean.shape[0]
    local = torch.cat([mean.new_full((1,), float(count)), mean, var]).to(torch.float64)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    gathered = torch.stack(parts)
    counts, means, variances = gathered[:, :1], gathered[:, 1:k + 1], gathered[:, k + 1:]
    total = counts.sum()
    weights = counts / total
    merged_mean = (weights * means).sum(0)
    deviations = torch.where(counts > 0, means - merged_mean, 0.0)
    merged_var = (weights * (variances + deviations.square())).sum(0)
    return merged_mean.to(mean.dtype), merged_var.to(var.dtype), total


class TrainRecipe(NamedTuple):
    """How a training block's output ``y`` came from its saved conv output ``z``:
    ``y = bn_relu_pool(z, mean, scale, beta, pool)`` on ``backend``. A following block whose
    input is ``y`` (unchanged: same object, same version) saves this instead of ``y`` and
    recomputes it for its weight gradient, so that a chain of blocks keeps one tensor per
    block (z) for the backward."""

    y: torch.Tensor
    version: int | None  # y._version in eager mode; None while torch.compile traces
    z: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor
    beta: torch.Tensor
    pool: bool
    backend: object

    def recomputes(self, x: torch.Tensor) -> bool:
        """Whether this recipe gives ``x`` exactly: the same tensor, unchanged since (a traced
        graph is functional: no in-place change to check for)."""
        return x is self.y and (self.version is None or x._version == self.version)


class _ConvBNReLUTrain(torch.autograd.Function):
    """Training block on a backend's kernels: conv + statistics, normalise + ReLU (+ pool), and
    the fused BN + ReLU backward, then the backend's dgrad and wgrad.

    The forward's per-channel batch mean, ``scale = gamma * invstd`` and beta are saved and
    handed to the backward kernel, which takes its ReLU mask and pool maxima from the same
    ``(z - mean) * scale + beta`` as the forward: both agree on every mask. Saved for the
    backward: z (storage dtype) and per-channel vectors, and the input x, unless the input is
    the previous block's output and its recipe (``TrainRecipe``) is given: then the input is
    recomputed from that block's z when the weight gradient needs it. ``want_recipe`` returns
    this block's recipe tensors as extra, non-differentiable outputs."""

    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,  # type: ignore[override]
                momentum, eps, pool, backend, group, source_z, source_mean, source_scale,
                source_beta, source_pool, source_backend, want_recipe):
        z, mean, var = backend.conv_bn_stats(x, weight, bias)
        count = z.shape[0] * z.shape[2] * z.shape[3]
        ctx.local_count = count
        if group is not None:  # statistics of the whole batch, as nn.SyncBatchNorm does
            mean, var, count = _batch_moments(group, mean, var, count)
        # fp64 mean and variance (the kernels' merged moments); fp32 scale and beta (fp64 for
        # fp64 inputs); the kernels take the mean in fp32 as hi + lo (reference.split_mean)
        stats_dtype = torch.promote_types(x.dtype, torch.float32)
        invstd = torch.rsqrt(var + eps).to(stats_dtype)
        scale = invstd if bn_weight is None else bn_weight.to(stats_dtype) * invstd
        beta = (torch.zeros_like(invstd) if bn_bias is None else bn_bias.to(stats_dtype))
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                unbiased = var * (count / (count - 1))
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype),
                                                    alpha=momentum)
        y = backend.bn_relu_pool(z, mean, scale, beta, pool)
        ctx.recomputed = source_z is not None
        if ctx.recomputed:  # recompute x from the previous block's z in the backward
            ctx.save_for_backward(weight, z, mean, invstd, scale, beta, source_z, source_mean,
                                  source_scale, source_beta)
            ctx.source_pool, ctx.source_backend = source_pool, source_backend
        else:
            ctx.save_for_backward(weight, z, mean, invstd, scale, beta, x)
        ctx.x_shape = list(x.shape)
        ctx.pool, ctx.backend = pool, backend
        ctx.has_bias = bias is not None
        ctx.has_gamma, ctx.has_beta = bn_weight is not None, bn_bias is not None
        ctx.group, ctx.count = group, count
        if not want_recipe:
            return y
        extras = (z, mean, scale, beta)
        ctx.mark_non_differentiable(*extras)
        return (y, *extras)

    @staticmethod
    @_first_order_only("the fused training block (conv_bn_relu_train)")
    def backward(ctx, grad_y, *unused):  # type: ignore[override]
        weight, z, mean, invstd, scale, beta, *rest = ctx.saved_tensors
        backend = ctx.backend
        needs = ctx.needs_input_grad
        grad_z, grad_gamma, grad_beta, grad_bias = backend.bn_relu_backward(
            grad_y.contiguous(memory_format=torch.channels_last), z, mean, invstd, scale, beta,
            ctx.pool)
        if ctx.group is not None and any(needs[:3]):
            grad_z = _synchronised_grad_z(ctx.group, grad_z, z, mean, invstd, scale, grad_gamma,
                                          grad_beta, ctx.local_count, ctx.count)
            grad_bias = grad_z.sum((0, 2, 3), dtype=torch.promote_types(grad_z.dtype,
                                                                          torch.float32))
        grad_x = backend.conv_dgrad(grad_z, weight, ctx.x_shape) if needs[0] else None
        grad_w = None
        if needs[1]:
            x = (ctx.source_backend.bn_relu_pool(*rest, ctx.source_pool) if ctx.recomputed
                 else rest[0])
            grad_w = backend.conv_wgrad(grad_z, x, list(weight.shape)).to(weight.dtype)
        grad_bias = grad_bias.to(weight.dtype) if ctx.has_bias and needs[2] else None
        grad_gamma = grad_gamma if ctx.has_gamma and needs[3] else None
        grad_beta = grad_beta if ctx.has_beta and needs[4] else None
        return grad_x, grad_w, grad_bias, grad_gamma, grad_beta, *([None] * 14)


def _synchronised_grad_z(group, grad_z, z, mean, invstd, scale, grad_gamma, grad_beta,
                         local_count: int, count: torch.Tensor) -> torch.Tensor:
    """``bn_relu_backward``'s grad_z uses this process's sums over its own ``local_count``
    elements: ``scale * (g - (sum g + xhat * sum g xhat) / n)``. With statistics over the whole
    batch the sums and the count are the global ones; the difference is affine in xhat per
    channel, ``a + b * (z - mean)``, added here. grad_gamma and grad_beta stay this process's
    own, as nn.SyncBatchNorm returns them (data parallelism then reduces them like any
    gradient)."""
    import torch.distributed as dist

    compute = torch.promote_types(z.dtype, torch.float32)
    sums = torch.cat([grad_beta, grad_gamma]).to(compute)
    local = sums / max(local_count, 1)  # a process with an empty batch contributes nothing
    dist.all_reduce(sums, group=group)
    k = mean.shape[0]
    delta = local - sums / count  # (mean g, mean g xhat): local minus global
    scale = scale.to(compute)
    a = scale * delta[:k]
    b = scale * invstd * delta[k:]
    view = (1, -1, 1, 1)
    corrected = (grad_z.to(compute) + a.view(view)
                 + b.view(view) * centered_reference(z, mean).to(compute))
    return corrected.to(grad_z.dtype).contiguous(memory_format=torch.channels_last)


def _train_on_backend(impl, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                      momentum, eps, pool, group=None, source: TrainRecipe | None = None,
                      want_recipe: bool = False):
    """``_ConvBNReLUTrain`` on backend ``impl``; with ``want_recipe`` returns ``(y, recipe)``
    (``TrainRecipe``), and with ``source`` (the recipe of x) recomputes x instead of saving it."""
    parts = ((None,) * 4 + (False, None) if source is None else
             (source.z, source.mean, source.scale, source.beta, source.pool, source.backend))
    out = _ConvBNReLUTrain.apply(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                 momentum, eps, pool, impl, group, *parts, want_recipe)
    if not want_recipe:
        return out
    y, z, mean, scale, beta = out
    version = None if torch.compiler.is_compiling() else y._version
    return y, TrainRecipe(y, version, z, mean, scale, beta, pool, impl)


def conv_bn_relu_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       bn_weight: torch.Tensor | None, bn_bias: torch.Tensor | None,
                       running_mean: torch.Tensor | None, running_var: torch.Tensor | None, *,
                       momentum: float = 0.1, eps: float = 1e-5, pool: bool = False,
                       backend: str = "auto", process_group=None,
                       input_recipe: TrainRecipe | None = None, return_recipe: bool = False):
    """Training block: conv, BatchNorm with batch statistics, ReLU, optional 2x2 max-pool.

    Semantics are ``nn.BatchNorm2d``'s in train mode: normalise with the biased batch variance;
    when ``running_mean``/``running_var`` are given, update them in place with ``momentum``
    (the unbiased variance goes into ``running_var``). Differentiable.

    ``process_group`` (a ``torch.distributed`` group, every process of it calling this block):
    the statistics are those of the batches of all its processes, and the backward reduces
    across them too, as ``nn.SyncBatchNorm`` does.

    A backend with training kernels (op ``conv_bn_relu_train``: ``conv_bn_stats``,
    ``bn_relu_pool``, ``bn_relu_backward``) computes the statistics in the conv epilogue; the
    reference backend runs ``F.conv2d`` + ``F.batch_norm`` + ReLU (+ ``F.max_pool2d``).

    Chains of blocks (``return_recipe``, ``input_recipe``): ``return_recipe=True`` returns
    ``(y, recipe)``, a ``TrainRecipe`` (None on the reference backend); a next block called with
    ``input_recipe=recipe`` on that very y keeps the previous block's z for its backward instead
    of its input, and recomputes the input for the weight gradient. A chain then keeps one
    tensor per block (z, in the storage dtype) where PyTorch's modules keep the conv input, the
    BN input and the ReLU output (and the pool's indices).
    """
    check_backend_name(backend)
    check_conv_inputs(x, weight, pool)
    k = weight.shape[0]
    for name, t in (("bias", bias), ("bn_weight", bn_weight), ("bn_bias", bn_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        _check_channel_vector(name, t, k, x.device)
    source = input_recipe if input_recipe is not None and input_recipe.recomputes(x) else None
    x, weight = _autocast_operands(x, weight)
    if process_group is not None:
        # every process takes part in the reductions, whatever its batch
        impl = resolve_backend(backend, x.device, x.dtype, "conv_bn_relu_train")
        return _train_on_backend(impl, x, weight, bias, bn_weight, bn_bias, running_mean,
                                 running_var, momentum, eps, pool, process_group, source,
                                 return_recipe)
    if x.shape[0] > 0:
        # as F.batch_norm in training, but also for images of no pixels, which F.conv2d rejects
        # with a message about the kernel size
        if x.shape[0] * x.shape[2] * x.shape[3] <= 1:
            raise ValueError(f"x must hold more than 1 value per channel in training (got "
                             f"shape {tuple(x.shape)})")
        impl = resolve_backend(backend, x.device, x.dtype, "conv_bn_relu_train")
        if impl.name != "reference":
            return _train_on_backend(impl, x, weight, bias, bn_weight, bn_bias, running_mean,
                                     running_var, momentum, eps, pool, None, source,
                                     return_recipe)
    y = F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                 padding=weight.shape[-1] // 2)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training=True,
                     momentum=momentum, eps=eps)
    y = torch.relu(y)
    if pool:
        y = F.max_pool2d(y, 2)
    return (y, None) if return_recipe else y


def conv_bn_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 bn_weight: torch.Tensor | None = None, bn_bias: torch.Tensor | None = None,
                 running_mean: torch.Tensor | None = None,
                 running_var: torch.Tensor | None = None, *, batch_norm: bool = True,
                 training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                 pool: bool = False, backend: str = "auto") -> torch.Tensor:
    """Conv + BatchNorm + ReLU (+ pool) with ``F.batch_norm``'s choice of statistics.

    Batch statistics are used when ``training`` or when no running statistics are given (as
    ``nn.BatchNorm2d`` does with ``track_running_stats=False``); otherwise BN is folded into a
    scale and shift and the inference kernel runs. ``batch_norm=False`` gives conv + ReLU.
    """
    if batch_norm and (training or running_mean is None or running_var is None):
        return conv_bn_relu_train(x, weight, bias, bn_weight, bn_bias, running_mean,
                                  running_var, momentum=momentum, eps=eps, pool=pool,
                                  backend=backend)
    if not batch_norm:
        running_mean = running_var = bn_weight = bn_bias = None
    check_conv_inputs(x, weight, pool)
    scale, shift = fold_bn(bias, running_mean, running_var, bn_weight, bn_bias, eps,
                           weight.shape[0], x.device)
    return conv_bn_relu_infer(x, weight, scale, shift, pool=pool, backend=backend)
