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
from vgg_kernels.checks import (
    autocast_dtype,
    check_batch_norm_eps,
    check_channel_vector,
    check_conv_inputs,
    check_infer_inputs,
)

__all__ = [
    "fold_bn",
    "conv_bn_relu_infer",
    "conv_bn_relu_train",
    "conv_bn_relu",
    "linear",
    "check_conv_inputs",
    "check_infer_inputs",
    "TrainRecipe",
]

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
    """Fold eval-mode BatchNorm (and the conv bias) into a per-channel scale and shift.

    ``bn(conv(x) + b) = conv(x) * scale + shift`` with ``scale = gamma / sqrt(var + eps)`` and
    ``shift = beta + (b - mean) * scale``. Absent statistics mean no BatchNorm (scale 1); absent
    ``bn_weight``/``bn_bias`` mean ``affine=False``. fp32, or float64 when any input is float64
    (a float64 model keeps float64 accuracy). Differentiable; K numbers, computed on every call
    (nothing derived from the parameters is cached).
    """
    given = [t for t in (conv_bias, running_mean, running_var, bn_weight, bn_bias)
             if t is not None]
    dtype = torch.float32
    for t in given:
        dtype = torch.promote_types(dtype, t.dtype)
    bias = (torch.zeros(out_channels, device=device, dtype=dtype) if conv_bias is None
            else conv_bias.to(dtype))
    if running_mean is None or running_var is None:
        return torch.ones(out_channels, device=device, dtype=dtype), bias
    scale = torch.rsqrt(running_var.to(dtype) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(dtype)
    shift = (bias - running_mean.to(dtype)) * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(dtype)
    return scale, shift


# -- function transforms -------------------------------------------------------------------------

def forward_mode_ad(*tensors: torch.Tensor | None) -> bool:
    """Whether forward-mode AD sees these tensors: ``torch.func.jvp`` (the innermost functorch
    transform is Jvp) or dual tensors of ``torch.autograd.forward_ad``. The kernels have no
    forward-mode derivative; the ops run PyTorch's there (the reference backend)."""
    from torch._C._functorch import TransformType

    if torch.compiler.is_compiling():  # a compiled graph has no forward-mode AD
        return False
    if _innermost_transform() == TransformType.Jvp:
        return True
    from torch.autograd import forward_ad

    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None
               for t in tensors)


def _vmap_by_loop(function, info, in_dims, args):
    """``vmap`` rule of an autograd Function: ``function.apply`` on each slice of the vmapped
    dimension, outputs stacked along a new dimension 0 (every output is per slice)."""
    outputs = []
    for i in range(info.batch_size):
        sliced = [a.select(d, i) if d is not None else a
                  for a, d in zip(args, in_dims, strict=True)]
        outputs.append(function.apply(*sliced))
    if isinstance(outputs[0], tuple):
        stacked = tuple(torch.stack([o[j] for o in outputs]) for j in range(len(outputs[0])))
        return stacked, (0,) * len(stacked)
    return torch.stack(outputs), 0


def _vmap_per_image(function, info, in_dims, args):
    """``vmap`` rule of a Function that treats each image alone (inference blocks): with only
    the input x (argument 0) vmapped, the vmapped dimension joins the batch dimension and one
    call does all; otherwise ``_vmap_by_loop``."""
    if in_dims[0] is None or any(d is not None for d in in_dims[1:]):
        return _vmap_by_loop(function, info, in_dims, args)
    x = args[0].movedim(in_dims[0], 0)
    batch, n = x.shape[:2]
    outputs = function.apply(x.flatten(0, 1), *args[1:])

    def split(t):
        return t.unflatten(0, (batch, n)) if t.dim() == 4 and t.shape[0] == batch * n else (
            t.expand(batch, *t.shape))

    if isinstance(outputs, tuple):
        return tuple(split(t) for t in outputs), (0,) * len(outputs)
    return split(outputs), 0


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
            if not torch.is_grad_enabled() or _under_functorch():
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


def _innermost_transform():
    """The innermost active torch.func transform (a ``TransformType``), or None; None while
    torch.compile traces (its graphs handle transforms themselves)."""
    if torch.compiler.is_compiling():
        return None
    try:
        from torch._C._functorch import peek_interpreter_stack
    except ImportError:  # pragma: no cover - torch without functorch's C API
        return None
    interpreter = peek_interpreter_stack()
    return None if interpreter is None else interpreter.key()


def _vmapped() -> bool:
    """Whether the innermost torch.func transform is vmap: the ops then go through autograd
    Functions, whose vmap rules run the kernels on the whole batch (or slice by slice)."""
    from torch._C._functorch import TransformType

    return _innermost_transform() == TransformType.Vmap


def _under_functorch() -> bool:
    """Whether a torch.func transform is active (its gradients run with grad mode on, for
    nesting, and carry their own wrapped tensors)."""
    return _innermost_transform() is not None


class _ConvBNReLUInfer(torch.autograd.Function):
    """A backend's forward kernel, with the backward computed by PyTorch ops: the case of a
    scale that needs a gradient (eval-mode BN whose parameters are trained)."""

    @staticmethod
    def forward(x, weight, scale, shift, pool, backend):  # type: ignore[override]
        return backend.conv_bn_relu_infer(x, weight, scale, shift, pool)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, scale, shift, pool, _ = inputs
        ctx.save_for_backward(x, weight, scale, shift)
        ctx.pool = pool

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight, scale, shift = ctx.saved_tensors
        grads = conv_bn_relu_infer_backward(grad_y, x, weight, scale, shift, ctx.pool,
                                            tuple(ctx.needs_input_grad[:4]))
        return (*grads, None, None)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _vmap_per_image(_ConvBNReLUInfer, info, in_dims, args)



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
    the conv bias's, gradient), then ``conv_dgrad`` and ``conv_wgrad``.

    Outputs: (y, activation, codes); the activation is an empty placeholder unless tapped
    (``activation`` and ``pool``), the codes are empty without ``pool``."""

    @staticmethod
    def forward(x, weight, scale, shift, pool, activation, backend):  # type: ignore[override]
        tapped = activation and pool
        y, act, codes = backend.conv_bn_relu_infer_outputs(x, weight, scale, shift, pool,
                                                           tapped, pool)
        return y, act, codes

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, scale, shift, pool, activation, backend = inputs
        y, act, codes = output
        tapped = activation and pool
        ctx.save_for_backward(weight, scale, codes if pool else y, act if tapped else None,
                              x if weight.requires_grad else None)
        ctx.mark_non_differentiable(codes)
        ctx.set_materialize_grads(False)
        ctx.pool, ctx.tapped, ctx.backend = pool, tapped, backend
        ctx.x_shape = list(x.shape)
        ctx.conv_shape = [x.shape[0], weight.shape[0], x.shape[2], x.shape[3]]

    @staticmethod
    @_first_order_only("the fused folded block (conv_bn_relu_infer)")
    def backward(ctx, grad_y, grad_act=None, grad_codes=None):  # type: ignore[override]
        weight, scale, mask, act, x = ctx.saved_tensors
        needs = ctx.needs_input_grad
        backend = ctx.backend
        if not ctx.tapped:
            grad_act = None
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

    @staticmethod
    def vmap(info, in_dims, *args):
        return _vmap_per_image(_ConvBNReLUFolded, info, in_dims, args)



def _empty_output(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                  shift: torch.Tensor, pool: bool, tapped: bool):
    """The block's output for an input of no elements (no images, or images of no pixels):
    empty, and in the autograd graph of every input that needs a gradient, which then gets
    zeros as from ``nn.Conv2d`` and BatchNorm."""
    n, _, h, w = x.shape
    k = weight.shape[0]
    dtype = x.dtype

    def empty(shape):
        y = x.new_zeros(shape, dtype=dtype)
        if torch.is_grad_enabled():
            linked = [t for t in (x, weight, scale, shift) if t.requires_grad]
            if linked:
                y = y + sum(t.sum() for t in linked).to(dtype) * 0
        return y.contiguous(memory_format=torch.channels_last)

    y = empty((n, k, h // 2, w // 2) if pool else (n, k, h, w))
    return (y, empty((n, k, h, w))) if tapped else y


def conv_bn_relu_infer(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       shift: torch.Tensor, *, pool: bool = False, backend: str = "auto",
                       activation: bool = False, packed=None):
    """Inference block: ``maxpool2x2?(relu(conv(x, weight) * scale + shift))``.

    Args:
        x: (N, C, H, W) input, fp32/fp16/bf16 (fp64 on the reference backend).
        weight: (K, C, 3, 3) (padding 1) or (K, C, 1, 1) (no padding).
        scale, shift: (K,) per-channel affine applied to the fp32 accumulator; see ``fold_bn``.
        pool: apply ``nn.MaxPool2d(2)`` (floor semantics) after the ReLU.
        backend: ``'auto'``, ``'triton'``, ``'native'`` or ``'reference'``.
        activation: with ``pool``, also return the full-resolution ReLU output (a feature tap
            before the pool).
        packed: a ``backends.native.PackedWeights`` for ``weight`` (``vgg_kernels.freeze``):
            the native CPU kernels then reuse its packed forms where no gradient is needed.

    Returns:
        (N, K, H', W') channels_last tensor in ``x``'s dtype; with ``activation`` and ``pool``
        the tuple ``(pooled, activation)``.
    """
    check_backend_name(backend)
    check_infer_inputs(x, weight, scale, shift, pool)
    x, weight = _autocast_operands(x, weight)
    tapped = pool and activation
    if x.numel() == 0:  # no images, or images of no pixels: nothing to compute
        return _empty_output(x, weight, scale, shift, pool, tapped)
    if forward_mode_ad(x, weight, scale, shift):
        backend = _forward_mode_fallback(backend, x, "conv_bn_relu_infer")
    impl = resolve_backend(backend, x.device, x.dtype, "conv_bn_relu_infer")
    if impl.name == "reference" and not _vmapped():
        if tapped:
            full = conv_bn_relu_infer_reference(x, weight, scale, shift, False)
            return F.max_pool2d(full, 2).contiguous(memory_format=torch.channels_last), full
        return conv_bn_relu_infer_reference(x, weight, scale, shift, pool)
    if impl.name == "reference" or (torch.is_grad_enabled() and any(
            t.requires_grad for t in (x, weight, scale, shift))):
        if not scale.requires_grad and impl.name != "reference":
            y, full, _ = _ConvBNReLUFolded.apply(x, weight, scale, shift, pool, activation, impl)
            return (y, full) if tapped else y
        if tapped:
            full = _ConvBNReLUInfer.apply(x, weight, scale, shift, False, impl)
            return F.max_pool2d(full, 2).contiguous(memory_format=torch.channels_last), full
        return _ConvBNReLUInfer.apply(x, weight, scale, shift, pool, impl)
    if tapped:
        y, full, _ = impl.conv_bn_relu_infer_outputs(x, weight, scale, shift, True, True, False)
        return y, full
    if packed is not None and impl.name == "native" and not _under_functorch() and (
            not torch.compiler.is_compiling()):
        return impl.conv_bn_relu_infer_packed(x, weight, scale, shift, pool, packed)
    return impl.conv_bn_relu_infer(x, weight, scale, shift, pool)


def _forward_mode_fallback(asked: str, x: torch.Tensor, op: str) -> str:
    """``'reference'`` for an op under forward-mode AD (the kernels have no forward-mode
    derivative), with the backends' one fallback warning when another backend was asked."""
    from vgg_kernels.backends import warn_fallback

    chosen = resolve_backend(asked, x.device, x.dtype, op).name
    if chosen != "reference":
        warn_fallback(asked, "reference", op, x.device, x.dtype, chosen,
                      "has no forward-mode derivative (torch.func.jvp, forward_ad)")
    return "reference"


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
    recomputed from that block's z when the weight gradient needs it. The recipe's tensors are
    extra, non-differentiable outputs."""

    @staticmethod
    def forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,  # type: ignore[override]
                momentum, eps, pool, backend, group, source_z, source_mean, source_scale,
                source_beta, source_pool, source_backend):
        """Returns (y, z, mean, invstd, scale, beta, count): the block's output, then what the
        backward and a following block's recipe use (non-differentiable)."""
        z, mean, var = backend.conv_bn_stats(x, weight, bias)
        count = z.shape[0] * z.shape[2] * z.shape[3]
        if group is not None:  # statistics of the whole batch, as nn.SyncBatchNorm does
            mean, var, count = _batch_moments(group, mean, var, count)
        # fp64 mean and variance (the kernels' merged moments); fp32 scale and beta (fp64 for
        # fp64 inputs); the kernels take the mean in fp32 as hi + lo (reference.split_mean)
        stats_dtype = torch.promote_types(x.dtype, torch.float32)
        invstd = torch.rsqrt(var + eps).to(stats_dtype)
        scale = invstd.clone() if bn_weight is None else bn_weight.to(stats_dtype) * invstd
        beta = (torch.zeros_like(invstd) if bn_bias is None
                else bn_bias.to(stats_dtype, copy=True))
        y = backend.bn_relu_pool(z, mean, scale, beta, pool)
        # the running statistics change only once everything that can fail has run
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                unbiased = var * (count / (count - 1))
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype),
                                                    alpha=momentum)
        count = torch.as_tensor(count, dtype=torch.float64, device=mean.device)
        return y, z, mean, invstd, scale, beta, count

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x, weight, bias, bn_weight, bn_bias, _, _, _, _, pool, backend, group, source_z,
         source_mean, source_scale, source_beta, source_pool, source_backend) = inputs
        y, z, mean, invstd, scale, beta, count = output
        ctx.recomputed = source_z is not None
        if ctx.recomputed:  # recompute x from the previous block's z in the backward
            ctx.save_for_backward(weight, z, mean, invstd, scale, beta, source_z, source_mean,
                                  source_scale, source_beta)
            ctx.source_pool, ctx.source_backend = source_pool, source_backend
        else:
            ctx.save_for_backward(weight, z, mean, invstd, scale, beta, x)
        ctx.mark_non_differentiable(z, mean, invstd, scale, beta, count)
        ctx.x_shape = list(x.shape)
        ctx.pool, ctx.backend = pool, backend
        ctx.has_bias = bias is not None
        ctx.has_gamma, ctx.has_beta = bn_weight is not None, bn_bias is not None
        ctx.group, ctx.count = group, count
        ctx.local_count = z.shape[0] * z.shape[2] * z.shape[3]

    @staticmethod
    def vmap(info, in_dims, *args):
        if args[5] is not None or args[6] is not None:
            raise RuntimeError(
                "vgg_kernels: vmap over a training-mode block that updates running statistics "
                "is not supported, as for nn.BatchNorm2d (each vmapped slice would update them "
                "in place); use torch.func.replace_all_batch_norm_modules_ or eval mode")
        return _vmap_by_loop(_ConvBNReLUTrain, info, in_dims, args)


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
        return grad_x, grad_w, grad_bias, grad_gamma, grad_beta, *([None] * 13)


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
    y, z, mean, _, scale, beta, _ = _ConvBNReLUTrain.apply(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, momentum, eps, pool,
        impl, group, *parts)
    if not want_recipe:
        return y
    # a traced graph is functional, and inference tensors have no version counter: no in-place
    # change to check for
    version = None if torch.compiler.is_compiling() or y.is_inference() else y._version
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
        check_channel_vector(name, t, k, x.device)
    check_batch_norm_eps(eps)
    source = input_recipe if input_recipe is not None and input_recipe.recomputes(x) else None
    x, weight = _autocast_operands(x, weight)
    if forward_mode_ad(x, weight, bias, bn_weight, bn_bias):
        backend = _forward_mode_fallback(backend, x, "conv_bn_relu_train")
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


# -- small-batch linear layers --------------------------------------------------------------------

# The most rows of x the native linear kernel takes: it reads each weight element once for all
# rows, where MKL/oneDNN's GEMM packs the weight first; past 8 rows that GEMM catches up
# (python benchmarks/bench_linear.py on a 2-core Zen 4, VGG's 25088 -> 4096 layer, ms torch /
# native over two runs: 1 row 15.7-15.9 / 7.2-13.0, 4 rows 42-48 / 16-17, 8 rows 32-34 /
# 20-22, 16 rows 41-47 / 42-56).
LINEAR_MAX_ROWS = 8


def _native_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                   ) -> torch.Tensor:
    return torch.ops.vgg_kernels.linear(x, weight, bias)


class _Linear(torch.autograd.Function):
    """The native forward with ``F.linear``'s backward by PyTorch ops."""

    @staticmethod
    def forward(x, weight, bias):  # type: ignore[override]
        return _native_linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = inputs[2] is not None

    @staticmethod
    @_first_order_only("linear")
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = grad.t() @ x if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def _plain(t: torch.Tensor | None) -> bool:
    return t is None or type(t) in (torch.Tensor, torch.nn.Parameter)


def linear_runs_native(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       backend: str = "auto") -> bool:
    """Whether ``linear`` runs the native kernel on these inputs: a CPU float32 2-D ``x`` of
    1 to ``LINEAR_MAX_ROWS`` rows, a contiguous float32 weight of matching width, ``backend``
    'auto' (without VGG_KERNELS_BACKEND naming another) or 'native', the extension loaded, and
    no tracer, compiler, torch.func transform or forward-mode AD looking on."""
    from vgg_kernels.backends import _candidates, native

    if not (_plain(x) and _plain(weight) and _plain(bias)):
        return False
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return False
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"
                             or bias.shape != weight.shape[:1]):
        return False
    if x.dim() != 2 or not 1 <= x.shape[0] <= LINEAR_MAX_ROWS or weight.dim() != 2:
        return False
    if x.shape[1] != weight.shape[1] or not weight.is_contiguous():
        return False
    if _candidates(backend, "cpu")[0] != "native" or native._load() is not None:
        return False
    if torch.compiler.is_compiling() or _under_functorch():
        return False
    return not forward_mode_ad(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           backend: str = "auto") -> torch.Tensor:
    """``F.linear(x, weight, bias)``: on the native CPU kernel where ``linear_runs_native``
    (a classifier at small batch: each weight element read once for all rows), else
    ``F.linear`` itself. Differentiable (the backward is PyTorch's)."""
    check_backend_name(backend)
    if not linear_runs_native(x, weight, bias, backend):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias)):
        return _Linear.apply(x, weight, bias)
    return _native_linear(x, weight, bias)
