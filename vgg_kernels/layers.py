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
    ``num_batches_tracked``, ``track_running_stats=False``, ``affine=False``). After
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` the statistics in training are those of the
    whole distributed batch, as with nn.SyncBatchNorm.

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
        # channels_last weights ((K, R, S, C) in memory) are what the kernels read: no per-call
        # copy. load_state_dict and .to() keep the memory format.
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                              **factory).to(memory_format=torch.channels_last)
        self.bn = (nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, affine=affine,
                                  track_running_stats=track_running_stats, **factory)
                   if batch_norm else None)
        self._folded: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

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

    def _fold_inputs(self) -> list[torch.Tensor | None]:
        """conv bias, running mean, running var, gamma, beta (None where absent)."""
        bn = self.bn
        if bn is None:
            return [self.conv.bias, None, None, None, None]
        return [self.conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias]

    def folded_scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel fp32 (scale, shift) of the eval-mode block.

        Cached while the parameters and statistics are unchanged (tensor versions and storage),
        so eval-mode inference launches only the fused kernel per block; recomputed, and
        differentiable, when autograd needs it. Every change made through torch (in-place ops,
        optimizer steps, ``load_state_dict``, ``.to()``) is seen. A write through ``.data``
        (``bn.running_mean.data.copy_(...)``) bypasses torch's version counters: ``train()`` and
        ``eval()`` drop the cache, so switching modes after such writes refreshes it.
        """
        inputs = self._fold_inputs()
        eps = self.bn.eps if self.bn is not None else 0.0
        device = self.conv.weight.device
        if torch.compiler.is_compiling() or (
                torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in inputs)):
            return ops.fold_bn(*inputs, eps, self.out_channels, device)
        key = (eps, device, *((None if t is None else (t.data_ptr(), t._version))
                              for t in inputs))
        if self._folded is None or self._folded[0] != key:
            with torch.no_grad():
                self._folded = (key, *ops.fold_bn(*inputs, eps, self.out_channels, device))
        return self._folded[1], self._folded[2]

    def train(self, mode: bool = True) -> FusedConvBNReLU:
        self._folded = None  # see folded_scale_shift
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv, self.bn
        use_batch_stats = bn is not None and (
            self.training or (bn.running_mean is None and bn.running_var is None))
        if not use_batch_stats:
            scale, shift = self.folded_scale_shift()
            return ops.conv_bn_relu_infer(x, conv.weight, scale, shift, pool=self.pool,
                                          backend=self.backend)
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if self.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(bn.num_batches_tracked)
        keep_stats = not self.training or bn.track_running_stats
        return ops.conv_bn_relu_train(
            x, conv.weight, conv.bias, bn.weight, bn.bias,
            bn.running_mean if keep_stats else None, bn.running_var if keep_stats else None,
            momentum=momentum, eps=bn.eps, pool=self.pool, backend=self.backend,
            process_group=self._sync_group())

    def _sync_group(self):
        """The torch.distributed group whose batch statistics this block uses in training: its
        ``bn`` made an ``nn.SyncBatchNorm`` (``nn.SyncBatchNorm.convert_sync_batchnorm``) and
        more than one process in the group, as nn.SyncBatchNorm decides; else None."""
        if not (self.training and isinstance(self.bn, nn.SyncBatchNorm)):
            return None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.bn.process_group if self.bn.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None
