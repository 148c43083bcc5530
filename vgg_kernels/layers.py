"""FusedConvBNReLU: the block that replaces Conv2d + BatchNorm2d + ReLU (+ MaxPool2d(2))."""

from __future__ import annotations

import torch
from torch import nn

from vgg_kernels import ops
from vgg_kernels.backends import check_backend_name


class FusedConvBNReLU(nn.Module):
    """Conv (3x3 pad 1, or 1x1) + optional BatchNorm2d + ReLU + optional 2x2/2 max-pool.

    Parameters live in ``self.conv`` (an ``nn.Conv2d``) and ``self.bn`` (an ``nn.BatchNorm2d`` or
    ``None``), so initialisation, state_dict entries and BN options are exactly torch's. In eval
    mode (or without BN) the block runs one fused inference kernel with BN folded into a scale and
    shift; in train mode it uses batch statistics and updates the running ones as
    ``nn.BatchNorm2d`` does (momentum, ``momentum=None`` for a cumulative average,
    ``num_batches_tracked``, ``track_running_stats=False``, ``affine=False``).

    Input (N, in_channels, H, W); output (N, out_channels, H', W') in channels_last memory, with
    H' = H // 2 when ``pool`` else H.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *,
                 batch_norm: bool = True, pool: bool = False, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, backend: str = "auto",
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if kernel_size not in (1, 3):
            raise ValueError(f"kernel_size must be 3 or 1 (got {kernel_size!r})")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int (got {value!r})")
        self.backend = check_backend_name(backend)
        self.pool = bool(pool)
        factory = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                              **factory)
        self.bn = (nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, affine=affine,
                                  track_running_stats=track_running_stats, **factory)
                   if batch_norm else None)

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    @property
    def kernel_size(self) -> int:
        return self.conv.kernel_size[0]

    def extra_repr(self) -> str:
        return f"pool={self.pool}, backend={self.backend!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv, self.bn
        if bn is None:
            return ops.conv_bn_relu(x, conv.weight, conv.bias, batch_norm=False, pool=self.pool,
                                    backend=self.backend)
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if self.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(bn.num_batches_tracked)
        use_batch_stats = self.training or (bn.running_mean is None and bn.running_var is None)
        keep_stats = not self.training or bn.track_running_stats
        return ops.conv_bn_relu(
            x, conv.weight, conv.bias, bn.weight, bn.bias,
            bn.running_mean if keep_stats else None, bn.running_var if keep_stats else None,
            training=use_batch_stats, momentum=momentum, eps=bn.eps, pool=self.pool,
            backend=self.backend)
