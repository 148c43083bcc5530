"""Triton backend: implicit-GEMM conv kernels over NHWC (channels_last) tensors.

CUDA tensors run compiled kernels; CPU tensors run under the Triton interpreter when
``TRITON_INTERPRET=1`` was set before Triton was imported.
"""

from __future__ import annotations

import functools
import os
import threading

import torch

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as error:  # ImportError, or a broken install raising something else
        return f"cannot import triton ({type(error).__name__}: {error})"
    return None


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The interpreter keeps the launch being run (grid size, program ids) in process-wide state: two
# threads launching at once read each other's grid (InterpreterError 'x >= grid_dim[0]'). Its
# launches take this lock; compiled launches do not need it.
_INTERPRETER_LOCK = threading.RLock()


class _SerializedKernel:
    """``kernel[grid](...)`` under the interpreter lock."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            with _INTERPRETER_LOCK:
                return launch(*args, **kwargs)

        return run


def direct_launcher(kernel):
    """How the backend launches ``kernel`` outside ``torch.library.wrap_triton``: as it is when
    compiled, one launch at a time across threads in the interpreter."""
    return _SerializedKernel(kernel) if interpreting() else kernel


@functools.cache
def _cuda_reason(index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(index)
    if major < 7 or (major == 7 and minor < 5):
        return f"needs a GPU of compute capability 7.5 or newer (got {major}.{minor})"
    return None


class TritonBackend:
    """Implicit-GEMM Triton kernels: the inference block (kernels.py, launched by
    conv_bn_relu.py), the training block and the gradients (train_kernels.py, launched by
    train.py)."""

    name = "triton"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype, op: str) -> str | None:
        if op not in ("conv_bn_relu_infer", "conv_bn_relu_train"):
            return f"has no {op} kernel"
        reason = _import_error()
        if reason is not None:
            return reason
        if dtype not in _SUPPORTED_DTYPES:
            return f"supports float32, float16 and bfloat16 (got {dtype})"
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            return _cuda_reason(index)
        if device.type == "cpu":
            if interpreting():
                return None
            return "runs CPU tensors only under the interpreter (set TRITON_INTERPRET=1)"
        return f"does not run on {device.type} tensors"

    def conv_bn_relu_infer(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                           shift: torch.Tensor, pool: bool) -> torch.Tensor:
        from vgg_kernels.backends.triton.conv_bn_relu import conv_bn_relu_infer

        return conv_bn_relu_infer(x, weight, scale, shift, pool)

    # The training block and the gradients: ops of train.py (see its docstring).

    @staticmethod
    def _ops() -> dict:
        from vgg_kernels.backends.triton.train import OPS

        return OPS

    def conv_bn_stats(self, x, weight, bias):
        return self._ops()["conv_bn_stats"](x, weight, bias)

    def bn_relu_pool(self, z, mean, scale, beta, pool):
        return self._ops()["bn_relu_pool"](z, mean, scale, beta, pool)

    def bn_relu_backward(self, grad_y, z, mean, invstd, scale, beta, pool):
        return self._ops()["bn_relu_backward"](grad_y, z, mean, invstd, scale, beta, pool)

    def conv_dgrad(self, grad, weight, x_shape):
        return self._ops()["conv_dgrad"](grad, None, None, None, None, weight, list(x_shape),
                                         False, 0)

    def conv_wgrad(self, grad, x, weight_shape):
        return self._ops()["conv_wgrad"](grad, x, list(weight_shape))

    def conv_bn_relu_infer_outputs(self, x, weight, scale, shift, pool, activation, codes):
        from vgg_kernels.backends.reference import infer_outputs_reference
        from vgg_kernels.backends.triton.train import _pool_extras_supported

        if pool and activation and not _pool_extras_supported(x.shape[2], x.shape[3]):
            return infer_outputs_reference(self.conv_bn_relu_infer, x, weight, scale, shift,
                                           pool, activation, codes)
        return self._ops()["infer_outputs"](x, weight, scale, shift, pool, activation, codes)

    def relu_pool_backward(self, grad_y, mask, grad_a, act, scale, pool, shape):
        return self._ops()["relu_pool_backward"](grad_y, mask, grad_a, act, scale, pool,
                                                 list(shape))

    def conv_dgrad_masked(self, grad_y, mask, grad_a, act, scale, weight, x_shape, pool):
        return self._ops()["conv_dgrad"](grad_y, mask, grad_a, act, scale, weight,
                                         list(x_shape), pool, 1)


BACKEND = TritonBackend()
