"""Input validation shared by every entry point (ops, backends, blocks, runs, models): each check
raises ``TypeError``/``ValueError`` naming the argument and what was expected, as the PyTorch
module or op being replaced would refuse the input. Imports nothing of vgg_kernels, so the ops
and the backends can both use it."""

from __future__ import annotations

import torch
from torch import nn

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` gives convolutions on ``device``'s type right now; None when
    autocast is off there."""
    if not hasattr(torch, "get_autocast_dtype"):  # torch < 2.4
        return None
    try:
        if not torch.is_autocast_enabled(device.type):
            return None
        return torch.get_autocast_dtype(device.type)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return None


def check_conv_inputs(x: torch.Tensor, weight: torch.Tensor, pool: bool = False) -> None:
    """x: (N, C, H, W) floating point; weight: (K, C, R, R) with R in {1, 3}, on ``x``'s device.
    With ``pool``, non-empty images of at least 2x2 pixels."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor (got {type(x).__name__})")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor (got {type(weight).__name__})")
    if x.dtype not in FLOAT_DTYPES:
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


def check_channel_vector(name: str, t: torch.Tensor | None, k: int,
                         device: torch.device) -> None:
    """``t`` is None or a floating-point (k,) tensor on ``device``."""
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
    """``check_conv_inputs`` plus floating-point (K,) ``scale`` and ``shift`` on ``x``'s
    device."""
    check_conv_inputs(x, weight, pool)
    for name, t in (("scale", scale), ("shift", shift)):
        if t is None:
            raise TypeError(f"{name} must be a torch.Tensor (got None)")
        check_channel_vector(name, t, weight.shape[0], x.device)


def check_batch_norm_eps(eps: float) -> None:
    """BatchNorm's rule in training: ``eps`` must be positive (a zero-variance channel would
    otherwise divide by zero)."""
    if not eps > 0:
        raise ValueError(f"eps must be positive during training, as batch_norm requires "
                         f"(got {eps})")


def check_module_input(x: object, conv: nn.Conv2d, weight: torch.Tensor,
                       where: str = "x") -> None:
    """What ``conv(x)`` requires of ``x``, checked before a fused block runs (``weight`` is
    ``conv.weight``, read once by the caller so that a parametrization is evaluated once):

    a tensor, (N, C, H, W) with C = ``conv.in_channels``, on the weight's device, and of the
    weight's dtype unless ``torch.autocast`` casts both (``nn.Conv2d`` refuses mixed dtypes
    outside autocast)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where} must be a torch.Tensor (got {type(x).__name__})")
    if not x.is_floating_point():
        raise TypeError(f"{where} must be a floating-point tensor (got {x.dtype})")
    if x.dim() != 4:
        raise ValueError(f"{where} must be a 4-D tensor (N, {conv.in_channels}, H, W); got "
                         f"{x.dim()}-D shape {tuple(x.shape)}")
    if x.shape[1] != conv.in_channels:
        raise ValueError(f"{where} must have {conv.in_channels} channels for "
                         f"{_describe(conv)} (got {x.shape[1]})")
    if x.device != weight.device:
        raise ValueError(f"{where} must be on the device of {_describe(conv)}'s weight, "
                         f"{weight.device} (got {x.device})")
    if x.dtype != weight.dtype and autocast_dtype(x.device) is None:
        raise TypeError(f"{where} must be {dtype_name(weight.dtype)} like the weight of "
                        f"{_describe(conv)} (got {dtype_name(x.dtype)}); cast one of them, or "
                        f"run under torch.autocast")


def _describe(conv: nn.Conv2d) -> str:
    return (f"Conv2d({conv.in_channels}, {conv.out_channels}, "
            f"kernel_size={tuple(conv.kernel_size)})")
