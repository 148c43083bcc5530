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
    """Training forward, first half: ``z = conv(x, weight) + bias`` and its per-channel fp32 sum
    and sum of squares over (N, H, W) (float64 for float64 inputs). z: channels_last, x's dtype.
    """
    padding = weight.shape[-1] // 2
    compute = torch.promote_types(x.dtype, torch.float32)
    z = F.conv2d(x, weight.to(x.dtype), padding=padding).to(compute)
    if bias is not None:
        z = z + bias.to(compute).view(1, -1, 1, 1)
    stats = (z.sum((0, 2, 3)), z.square().sum((0, 2, 3)))
    return z.to(x.dtype).contiguous(memory_format=torch.channels_last), *stats


def bn_relu_pool_reference(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                           pool: bool) -> torch.Tensor:
    """Training forward, second half: ``maxpool2x2?(relu(z * scale + shift))``, x's dtype.

    scale = gamma * invstd and shift = beta - mean * scale, per channel (fp32)."""
    compute = torch.promote_types(z.dtype, torch.float32)
    y = torch.relu(z.to(compute) * scale.to(compute).view(1, -1, 1, 1)
                   + shift.to(compute).view(1, -1, 1, 1)).to(z.dtype)
    if pool:
        y = F.max_pool2d(y, 2)
    return y.contiguous(memory_format=torch.channels_last)


def bn_relu_backward_reference(grad_y: torch.Tensor, z: torch.Tensor, mean: torch.Tensor,
                               invstd: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                               pool: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``maxpool2x2?(relu(gamma * (z - mean) * invstd + beta))`` with batch
    statistics (mean and invstd depend on z): returns (grad_z, grad_gamma, grad_beta).

    One reduction (sum g, sum g * xhat over N, H, W, with g the gradient reaching the BN output
    through the pool and the ReLU mask), then one elementwise pass:
    ``grad_z = gamma * invstd * (g - (sum g + xhat * sum g xhat) / count)``.
    """
    compute = torch.promote_types(z.dtype, torch.float32)
    view = (1, -1, 1, 1)
    zc = z.to(compute)
    xhat = (zc - mean.to(compute).view(view)) * invstd.to(compute).view(view)
    pre = xhat * gamma.to(compute).view(view) + beta.to(compute).view(view)
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
    grad_z = (gamma.to(compute) * invstd.to(compute)).view(view) * (
        g - (grad_beta.view(view) + xhat * grad_gamma.view(view)) / count)
    return (grad_z.to(z.dtype).contiguous(memory_format=torch.channels_last),
            grad_gamma.to(gamma.dtype), grad_beta.to(beta.dtype))


class ReferenceBackend:
    """Plain PyTorch; runs everywhere, every dtype torch's conv2d supports."""

    name = "reference"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype, op: str) -> str | None:
        return None

    def conv_bn_relu_infer(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                           shift: torch.Tensor, pool: bool) -> torch.Tensor:
        return conv_bn_relu_infer_reference(x, weight, scale, shift, pool)

    def conv_bn_stats(self, x, weight, bias):
        return conv_bn_stats_reference(x, weight, bias)

    def bn_relu_pool(self, z, scale, shift, pool):
        return bn_relu_pool_reference(z, scale, shift, pool)

    def bn_relu_backward(self, grad_y, z, mean, invstd, gamma, beta, pool):
        return bn_relu_backward_reference(grad_y, z, mean, invstd, gamma, beta, pool)


BACKEND = ReferenceBackend()
