"""Native backend: the compiled extension vgg_kernels._C (C++ CPU kernels, CUDA kernels)."""

from __future__ import annotations

import torch

_IMPORT_ERROR: str | None = None
try:
    from vgg_kernels import _C  # noqa: F401  (registers torch.ops.vgg_kernels.*)
except ImportError as error:  # the extension is optional
    _IMPORT_ERROR = f"cannot load the compiled extension vgg_kernels._C ({error})"


class NativeBackend:
    """Ops registered by csrc/ under ``torch.ops.vgg_kernels``."""

    name = "native"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype, op: str) -> str | None:
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        if not hasattr(torch.ops.vgg_kernels, op):
            return f"has no {op} op"
        return None

    def conv_bn_relu_infer(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                           shift: torch.Tensor, pool: bool) -> torch.Tensor:
        return torch.ops.vgg_kernels.conv_bn_relu_infer(x, weight, scale, shift, pool)


BACKEND = NativeBackend()
