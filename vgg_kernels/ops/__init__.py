"""Public functional ops: fused conv (3x3 pad 1 or 1x1) + BatchNorm + ReLU (+ 2x2/2 max-pool).

Tensors are (N, C, H, W) in shape; the backends work in channels_last (NHWC) memory and return
channels_last outputs. Accumulation and BN statistics are fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vgg_kernels.backends import check_backend_name, resolve_backend
from vgg_kernels.backends.reference import (
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


class _ConvBNReLUInfer(torch.autograd.Function):
    """A backend's forward kernel, with the backward computed by PyTorch ops (eval-mode grads)."""

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


def conv_bn_relu_infer(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       shift: torch.Tensor, *, pool: bool = False,
                       backend: str = "auto") -> torch.Tensor:
    """Inference block: ``maxpool2x2?(relu(conv(x, weight) * scale + shift))``.

    Args:
        x: (N, C, H, W) input, fp32/fp16/bf16 (fp64 on the reference backend).
        weight: (K, C, 3, 3) (padding 1) or (K, C, 1, 1) (no padding).
        scale, shift: (K,) per-channel affine applied to the fp32 accumulator; see ``fold_bn``.
        pool: apply ``nn.MaxPool2d(2)`` (floor semantics) after the ReLU.
        backend: ``'auto'``, ``'triton'``, ``'native'`` or ``'reference'``.

    Returns:
        (N, K, H', W') channels_last tensor in ``x``'s dtype.
    """
    check_backend_name(backend)
    check_infer_inputs(x, weight, scale, shift, pool)
    x, weight = _autocast_operands(x, weight)
    k = weight.shape[0]
    if x.numel() == 0:  # no images, or images of no pixels: nothing to compute
        n, _, h, w = x.shape
        shape = (n, k, h // 2, w // 2) if pool else (n, k, h, w)
        return x.new_empty(shape).contiguous(memory_format=torch.channels_last)
    impl = resolve_backend(backend, x.device, x.dtype, "conv_bn_relu_infer")
    if impl.name == "reference":
        return conv_bn_relu_infer_reference(x, weight, scale, shift, pool)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, scale, shift)):
        return _ConvBNReLUInfer.apply(x, weight, scale, shift, pool, impl)
    return impl.conv_bn_relu_infer(x, weight, scale, shift, pool)


class _ConvBNReLUTrain(torch.autograd.Function):
    """Training block on a backend's kernels: conv + statistics, normalise + ReLU (+ pool), and
    the fused BN + ReLU backward; dgrad and wgrad run through PyTorch (cuDNN on CUDA)."""

    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,  # type: ignore[override]
                momentum, eps, pool, backend, group):
        z, total, total_sq = backend.conv_bn_stats(x, weight, bias)
        count = z.shape[0] * z.shape[2] * z.shape[3]
        ctx.local_count = count
        if group is not None:  # statistics of the whole batch, as nn.SyncBatchNorm does
            total, total_sq, count = _all_reduce_sums(group, total, total_sq, count)
        stats_dtype = total.dtype
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        k = weight.shape[0]
        gamma = (bn_weight.to(stats_dtype) if bn_weight is not None
                 else torch.ones(k, device=x.device, dtype=stats_dtype))
        beta = (bn_bias.to(stats_dtype) if bn_bias is not None
                else torch.zeros(k, device=x.device, dtype=stats_dtype))
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                unbiased = var * (count / (count - 1))
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype),
                                                    alpha=momentum)
        scale = gamma * invstd
        y = backend.bn_relu_pool(z, scale, beta - mean * scale, pool)
        ctx.save_for_backward(x, weight, z, mean, invstd, gamma, beta)
        ctx.pool, ctx.backend = pool, backend
        ctx.has_bias, ctx.affine = bias is not None, bn_weight is not None
        ctx.group, ctx.count = group, count
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight, z, mean, invstd, gamma, beta = ctx.saved_tensors
        grad_z, grad_gamma, grad_beta = ctx.backend.bn_relu_backward(
            grad_y.contiguous(memory_format=torch.channels_last), z, mean, invstd, gamma, beta,
            ctx.pool)
        needs = ctx.needs_input_grad
        if ctx.group is not None and any(needs[:3]):
            grad_z = _synchronised_grad_z(ctx.group, grad_z, z, mean, invstd, gamma, grad_gamma,
                                          grad_beta, ctx.local_count, ctx.count)
        padding = weight.shape[-1] // 2
        grad_x = (torch.nn.grad.conv2d_input(x.shape, weight.to(z.dtype), grad_z, padding=padding)
                  if needs[0] else None)
        grad_w = (torch.nn.grad.conv2d_weight(x, weight.shape, grad_z, padding=padding)
                  .to(weight.dtype) if needs[1] else None)
        accumulate = torch.promote_types(grad_z.dtype, torch.float32)
        grad_bias = (grad_z.sum((0, 2, 3), dtype=accumulate).to(weight.dtype)
                     if ctx.has_bias and needs[2] else None)
        if not ctx.affine:
            grad_gamma = grad_beta = None
        return grad_x, grad_w, grad_bias, grad_gamma, grad_beta, *([None] * 7)


def _all_reduce_sums(group, total: torch.Tensor, total_sq: torch.Tensor, count: int):
    """Per-channel sums and the element count summed over the processes of ``group``, in one
    all-reduce (the processes' batches may differ in size)."""
    import torch.distributed as dist

    packed = torch.cat([total, total_sq, total.new_full((1,), float(count))])
    dist.all_reduce(packed, group=group)
    k = total.shape[0]
    return packed[:k], packed[k:2 * k], packed[2 * k]


def _synchronised_grad_z(group, grad_z, z, mean, invstd, gamma, grad_gamma, grad_beta,
                         local_count: int, count: torch.Tensor) -> torch.Tensor:
    """``bn_relu_backward``'s grad_z uses this process's sums over its own ``local_count``
    elements: ``gamma * invstd * (g - (sum g + xhat * sum g xhat) / n)``. With statistics over
    the whole batch the sums and the count are the global ones; the difference is affine in z
    per channel, ``a + b * z``, added here. grad_gamma and grad_beta stay this process's own, as
    nn.SyncBatchNorm returns them (data parallelism then reduces them like any gradient)."""
    import torch.distributed as dist

    compute = mean.dtype
    sums = torch.cat([grad_beta, grad_gamma]).to(compute)
    local = sums / max(local_count, 1)  # a process with an empty batch contributes nothing
    dist.all_reduce(sums, group=group)
    k = mean.shape[0]
    delta = local - sums / count  # (mean g, mean g xhat): local minus global
    scale = gamma.to(compute) * invstd
    b = scale * invstd * delta[k:]
    a = scale * delta[:k] - b * mean
    view = (1, -1, 1, 1)
    corrected = grad_z.to(compute) + a.view(view) + b.view(view) * z.to(compute)
    return corrected.to(grad_z.dtype).contiguous(memory_format=torch.channels_last)


def _train_on_backend(impl, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                      momentum, eps, pool, group=None):
    return _ConvBNReLUTrain.apply(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                  momentum, eps, pool, impl, group)


def conv_bn_relu_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       bn_weight: torch.Tensor | None, bn_bias: torch.Tensor | None,
                       running_mean: torch.Tensor | None, running_var: torch.Tensor | None, *,
                       momentum: float = 0.1, eps: float = 1e-5, pool: bool = False,
                       backend: str = "auto", process_group=None) -> torch.Tensor:
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
    """
    check_backend_name(backend)
    check_conv_inputs(x, weight, pool)
    k = weight.shape[0]
    for name, t in (("bias", bias), ("bn_weight", bn_weight), ("bn_bias", bn_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        _check_channel_vector(name, t, k, x.device)
    x, weight = _autocast_operands(x, weight)
    if process_group is not None:
        # every process takes part in the reductions, whatever its batch
        impl = resolve_backend(backend, x.device, x.dtype, "conv_bn_relu_train")
        return _train_on_backend(impl, x, weight, bias, bn_weight, bn_bias, running_mean,
                                 running_var, momentum, eps, pool, process_group)
    if x.shape[0] > 0:
        # as F.batch_norm in training, but also for images of no pixels, which F.conv2d rejects
        # with a message about the kernel size
        if x.shape[0] * x.shape[2] * x.shape[3] <= 1:
            raise ValueError(f"x must hold more than 1 value per channel in training (got "
                             f"shape {tuple(x.shape)})")
        impl = resolve_backend(backend, x.device, x.dtype, "conv_bn_relu_train")
        if impl.name != "reference":
            return _train_on_backend(impl, x, weight, bias, bn_weight, bn_bias, running_mean,
                                     running_var, momentum, eps, pool)
    y = F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                 padding=weight.shape[-1] // 2)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training=True,
                     momentum=momentum, eps=eps)
    y = torch.relu(y)
    if pool:
        y = F.max_pool2d(y, 2)
    return y


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
