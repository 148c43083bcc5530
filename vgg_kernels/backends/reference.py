"""Reference backend: plain PyTorch ops (cuDNN on CUDA). The oracle every other backend is tested
against, in float64 on the CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_bn_relu_infer_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                                 shift: torch.Tensor, pool: bool) -> torch.Tensor:
    """``maxpool2x2?(relu(conv(x, weight) * scale + shift))`` in ``x``'s dtype.

    x: (N, C, H, W); weight: (K, C, R, R), R in {1, 3}, padding R // 2; scale, shift: (K,).
    The scale and shift are applied in the higher of fp32 and ``x``'s dtype, then rounded.
    Differentiable through autograd.
    """
    padding = weight.shape[-1] // 2
    y = F.conv2d(x, weight.to(x.dtype), padding=padding)
    compute = torch.promote_types(x.dtype, torch.float32)
    y = y.to(compute) * scale.to(compute).view(1, -1, 1, 1) + shift.to(compute).view(1, -1, 1, 1)
    y = torch.relu(y).to(x.dtype)
    if pool:
        y = F.max_pool2d(y, 2)
    return y.contiguous(memory_format=torch.channels_last)


def conv_bn_relu_infer_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                scale: torch.Tensor, shift: torch.Tensor, pool: bool,
                                needs: tuple[bool, bool, bool, bool]):
    """Gradients of ``conv_bn_relu_infer_reference`` w.r.t. (x, weight, scale, shift), each
    ``None`` where ``needs`` is false. Recomputes the conv (plain PyTorch ops, traceable)."""
    padding = weight.shape[-1] // 2
    compute = torch.promote_types(x.dtype, torch.float32)
    conv = F.conv2d(x, weight.to(x.dtype), padding=padding).to(compute)
    z = conv * scale.to(compute).view(1, -1, 1, 1) + shift.to(compute).view(1, -1, 1, 1)
    grad = grad_y.to(compute)
    if pool:
        activation = torch.relu(z).to(x.dtype)
        _, indices = F.max_pool2d(activation, 2, return_indices=True)
        grad = torch.ops.aten.max_pool2d_with_indices_backward(
            grad_y.to(x.dtype), activation, [2, 2], [2, 2], [0, 0], [1, 1], False, indices
        ).to(compute)
    grad_z = grad * (z > 0)
    grad_scale = (grad_z * conv).sum((0, 2, 3)).to(scale.dtype) if needs[2] else None
    grad_shift = grad_z.sum((0, 2, 3)).to(shift.dtype) if needs[3] else None
    grad_conv = (grad_z * scale.to(compute).view(1, -1, 1, 1)).to(x.dtype)
    grad_x = (torch.nn.grad.conv2d_input(x.shape, weight.to(x.dtype), grad_conv, padding=padding)
              if needs[0] else None)
    grad_w = (torch.nn.grad.conv2d_weight(x, weight.shape, grad_conv, padding=padding)
              .to(weight.dtype) if needs[1] else None)
    return grad_x, grad_w, grad_scale, grad_shift


def conv_bn_stats_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training forward, first half: ``z = conv(x, weight) + bias`` and its per-channel batch
    mean and biased variance over (N, H, W) in float64, from the unrounded z (fp32, or float64
    for float64 inputs). z: channels_last, x's dtype."""
    padding = weight.shape[-1] // 2
    compute = torch.promote_types(x.dtype, torch.float32)
    z = F.conv2d(x, weight.to(x.dtype), padding=padding).to(compute)
    if bias is not None:
        z = z + bias.to(compute).view(1, -1, 1, 1)
    var, mean = torch.var_mean(z.double(), dim=(0, 2, 3), unbiased=False)
    return z.to(x.dtype).contiguous(memory_format=torch.channels_last), mean, var


def split_mean(mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-channel mean as an unevaluated sum ``hi + lo`` of two fp32 vectors (hi = fp32(mean),
    lo = fp32(mean - hi)), the form every backend's kernels take it in: ``(z - hi) - lo`` is z's
    deviation to fp32 precision even where the mean is 1e4 or more times the spread (z - hi is
    exact there), where one fp32 mean alone is off by half its ulp."""
    wide = mean.double()
    hi = wide.float()
    return hi, (wide - hi.double()).float()


def centered_reference(z: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``z - mean`` in the higher of fp32 and z's dtype: ``(z - hi) - lo`` (``split_mean``) in
    fp32, one subtraction in float64."""
    view = (1, -1, 1, 1)
    if z.dtype == torch.float64:
        return z - mean.double().view(view)
    hi, lo = split_mean(mean)
    return (z.float() - hi.view(view)) - lo.view(view)


def bn_pre_reference(z: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor,
                     beta: torch.Tensor) -> torch.Tensor:
    """The training block's pre-activation ``(z - mean) * scale + beta`` (scale = gamma *
    invstd): ``centered_reference``, a multiply and an add, each rounded, as every backend
    computes it in the forward and in the backward's ReLU mask. The mean comes off first:
    folded into ``z * scale + shift`` the two large terms of a channel whose mean is large
    against its spread cancel."""
    compute = torch.promote_types(z.dtype, torch.float32)
    view = (1, -1, 1, 1)
    return (centered_reference(z, mean) * scale.to(compute).view(view)
            + beta.to(compute).view(view))


def bn_relu_pool_reference(z: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor,
                           beta: torch.Tensor, pool: bool) -> torch.Tensor:
    """Training forward, second half: ``maxpool2x2?(relu((z - mean) * scale + beta))``, z's
    dtype, with the batch mean and scale = gamma * invstd per channel (fp32)."""
    y = torch.relu(bn_pre_reference(z, mean, scale, beta)).to(z.dtype)
    if pool:
        y = F.max_pool2d(y, 2)
    return y.contiguous(memory_format=torch.channels_last)


def bn_relu_backward_reference(grad_y: torch.Tensor, z: torch.Tensor, mean: torch.Tensor,
                               invstd: torch.Tensor, scale: torch.Tensor, beta: torch.Tensor,
                               pool: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``maxpool2x2?(relu(gamma * (z - mean) * invstd + beta))`` with batch
    statistics (mean and invstd depend on z), given ``scale = gamma * invstd`` as the forward
    used it: returns (grad_z, grad_gamma, grad_beta), the last two fp32 (float64 for float64 z).

    The ReLU mask and the pool's maxima come from ``bn_pre_reference``, the forward's own
    pre-activation, so forward and backward agree on every mask. One reduction (sum g,
    sum g * xhat over N, H, W, with g the gradient reaching the BN output through the pool and
    the mask, xhat = (z - mean) * invstd), then one elementwise pass:
    ``grad_z = scale * (g - (sum g + xhat * sum g xhat) / count)``.
    """
    compute = torch.promote_types(z.dtype, torch.float32)
    view = (1, -1, 1, 1)
    xhat = centered_reference(z, mean) * invstd.to(compute).view(view)
    pre = bn_pre_reference(z, mean, scale, beta)
    if pool:
        activation = torch.relu(pre).to(z.dtype)
        _, indices = F.max_pool2d(activation, 2, return_indices=True)
        grad = torch.ops.aten.max_pool2d_with_indices_backward(
            grad_y.to(z.dtype), activation, [2, 2], [2, 2], [0, 0], [1, 1], False, indices
        ).to(compute)
    else:
        grad = grad_y.to(compute)
    g = grad * (pre > 0)
    count = z.shape[0] * z.shape[2] * z.shape[3]
    grad_beta = g.sum((0, 2, 3))
    grad_gamma = (g * xhat).sum((0, 2, 3))
    grad_z = scale.to(compute).view(view) * (
        g - (grad_beta.view(view) + xhat * grad_gamma.view(view)) / count)
    return (grad_z.to(z.dtype).contiguous(memory_format=torch.channels_last), grad_gamma,
            grad_beta, grad_z.sum((0, 2, 3)))


# -- the conv's gradients and the folded block's backward ----------------------------------------

def conv_dgrad_reference(grad: torch.Tensor, weight: torch.Tensor, x_shape) -> torch.Tensor:
    """The conv's input gradient: ``grad`` (N, K, H, W) back through ``weight`` (K, C, R, R),
    stride 1, padding R // 2; channels_last, grad's dtype."""
    out = torch.nn.grad.conv2d_input(list(x_shape), weight.to(grad.dtype), grad,
                                     padding=weight.shape[-1] // 2)
    return out.contiguous(memory_format=torch.channels_last)


def conv_wgrad_reference(grad: torch.Tensor, x: torch.Tensor, weight_shape) -> torch.Tensor:
    """The conv's weight gradient, (K, C, R, R) in grad's dtype."""
    return torch.nn.grad.conv2d_weight(x.to(grad.dtype), list(weight_shape), grad,
                                       padding=weight_shape[-1] // 2)


def window_codes_reference(activation: torch.Tensor) -> torch.Tensor:
    """For each 2x2 window of ``activation`` (N, K, H, W), the uint8 position (row-major) of its
    first maximum, where PyTorch's max-pool routes the gradient, or 255 where that maximum is
    not positive (the ReLU before the pool passes no gradient there)."""
    n, k, h, w = activation.shape
    windows = activation[:, :, :h // 2 * 2, :w // 2 * 2].reshape(n, k, h // 2, 2, w // 2, 2)
    windows = windows.permute(0, 1, 2, 4, 3, 5).reshape(n, k, h // 2, w // 2, 4)
    best, index = windows.max(dim=-1)
    codes = torch.where(best > 0, index, 255).to(torch.uint8)
    return codes.contiguous(memory_format=torch.channels_last)


def infer_outputs_reference(infer, x, weight, scale, shift, pool, activation, codes):
    """(y, activation or empty, codes or empty) from the backend's inference kernel ``infer``:
    with pool, the block runs unpooled and is pooled here (the kernels do it in one pass)."""
    empty = x.new_empty(0)
    if not pool:
        return infer(x, weight, scale, shift, False), empty, empty.to(torch.uint8)
    full = infer(x, weight, scale, shift, False)
    y = F.max_pool2d(full, 2).contiguous(memory_format=torch.channels_last)
    return (y, full if activation else empty,
            window_codes_reference(full) if codes else empty.to(torch.uint8))


def relu_pool_backward_reference(grad_y, mask, grad_a, act, scale, pool, shape):
    """(grad_pre, grad_shift) of a folded block (``maxpool2x2?(relu(pre))``, pre = conv * scale
    + shift): g, the gradient at pre, is grad_y where the output ``mask`` > 0 (no pool), or
    grad_y routed to each window's code position (``window_codes_reference``; pool) plus
    ``grad_a`` where the tapped activation ``act`` > 0; grad_pre = g * scale (the conv output's
    gradient) and grad_shift = sum of g per channel."""
    n, k, h, w = shape
    compute = torch.promote_types(grad_y.dtype, torch.float32)
    if not pool:
        g = torch.where(mask > 0, grad_y.to(compute), 0.0)
    else:
        ho, wo = h // 2, w // 2
        onehot = mask.long().unsqueeze(-1) == torch.arange(4, device=mask.device)
        routed = onehot * grad_y.to(compute).unsqueeze(-1)  # (N, K, HO, WO, 4)
        routed = routed.reshape(n, k, ho, wo, 2, 2).permute(0, 1, 2, 4, 3, 5)
        g = F.pad(routed.reshape(n, k, 2 * ho, 2 * wo), (0, w - 2 * wo, 0, h - 2 * ho))
        if grad_a is not None:
            g = g + torch.where(act > 0, grad_a.to(compute), 0.0)
    dtype = grad_y.dtype if mask.dtype == torch.uint8 else mask.dtype
    grad_pre = (g * scale.to(compute).view(1, -1, 1, 1)).to(dtype)
    return grad_pre.contiguous(memory_format=torch.channels_last), g.sum((0, 2, 3)).float()


class TorchGradients:
    """The conv's gradients and the folded block's extra outputs and backward in PyTorch ops
    (cuDNN / oneDNN for the convolutions), around a backend's own ``conv_bn_relu_infer``: the
    methods a backend without kernels of its own for them inherits."""

    def conv_dgrad(self, grad, weight, x_shape):
        return conv_dgrad_reference(grad, weight, x_shape)

    def conv_wgrad(self, grad, x, weight_shape):
        return conv_wgrad_reference(grad, x, weight_shape)

    def conv_bn_relu_infer_outputs(self, x, weight, scale, shift, pool, activation, codes):
        return infer_outputs_reference(self.conv_bn_relu_infer, x, weight, scale, shift, pool,
                                       activation, codes)

    def relu_pool_backward(self, grad_y, mask, grad_a, act, scale, pool, shape):
        return relu_pool_backward_reference(grad_y, mask, grad_a, act, scale, pool, shape)

    def conv_dgrad_masked(self, grad_y, mask, grad_a, act, scale, weight, x_shape, pool):
        grad_pre, _ = self.relu_pool_backward(grad_y, mask, grad_a, act, scale, pool,
                                              [x_shape[0], weight.shape[0], *x_shape[2:]])
        return self.conv_dgrad(grad_pre, weight, x_shape)


class ReferenceBackend(TorchGradients):
    """Plain PyTorch; runs everywhere, every dtype torch's conv2d supports."""

    name = "reference"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype, op: str) -> str | None:
        return None

    def conv_bn_relu_infer(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                           shift: torch.Tensor, pool: bool) -> torch.Tensor:
        return conv_bn_relu_infer_reference(x, weight, scale, shift, pool)

    def conv_bn_stats(self, x, weight, bias):
        return conv_bn_stats_reference(x, weight, bias)

    def bn_relu_pool(self, z, mean, scale, beta, pool):
        return bn_relu_pool_reference(z, mean, scale, beta, pool)

    def bn_relu_backward(self, grad_y, z, mean, invstd, scale, beta, pool):
        return bn_relu_backward_reference(grad_y, z, mean, invstd, scale, beta, pool)


BACKEND = ReferenceBackend()
