"""Backend registry: every backend implements the same op contract; this module picks one.

A backend is an object with a ``name``, an ``unavailable_reason(device, dtype, op)`` that returns
``None`` when it can run ``op`` on that device and dtype (else a sentence saying why not), and one
method per op it implements. Ops (see vgg_kernels/ops):

``conv_bn_relu_infer(x, weight, scale, shift, pool) -> y``
    ``x``: (N, C, H, W), any memory format; ``weight``: (K, C, R, R) with R in {1, 3};
    ``scale``, ``shift``: fp32 (K,); ``y = maxpool2x2?(relu(conv(x, weight) * scale + shift))``,
    (N, K, H', W') in ``x``'s dtype, channels_last.

``conv_bn_relu_train`` is three methods (BN with batch statistics; see ops._ConvBNReLUTrain):
    ``conv_bn_stats(x, weight, bias) -> (z, mean, var)``: z = conv(x, weight) + bias
    (channels_last, x's dtype) and its per-channel batch mean and biased variance over
    (N, H, W) in fp64, taken from the fp32 accumulator in the conv epilogue and combined
    robustly: per-tile moments merged with Chan's formula (or sums shifted by a value of the
    same distribution), never E[z^2] - E[z]^2 over the batch, so a channel whose mean is 1e4
    times its spread keeps its variance;
    ``bn_relu_pool(z, mean, scale, beta, pool) -> y``: ``maxpool2x2?(relu(pre))`` with
    ``pre = (z - mean) * scale + beta`` (scale = gamma * invstd) rounded as a subtraction, a
    multiply and an add (no FMA; the mean comes off first, so a large mean does not cancel);
    ``bn_relu_backward(grad_y, z, mean, invstd, scale, beta, pool) -> (grad_z, grad_gamma,
    grad_beta)``: pool + ReLU + BN backward, one reduction pass and one elementwise pass, with
    the ReLU mask and the pool's maxima from the same ``pre`` as the forward, so the two agree
    on every mask.

Every epilogue keeps NaN and infinities as PyTorch's ops do: ``relu(NaN)`` is NaN and a 2x2
window holding a NaN pools to NaN.

Choice (``backend='auto'``): CUDA tensors -> triton, else native, else reference; CPU tensors ->
native, else reference. ``VGG_KERNELS_BACKEND`` replaces ``'auto'``; an explicit name passed as
``backend=`` wins over it. When the chosen backend cannot run, the next one in the chain runs and
one warning per (asked, used, reason) says so.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Protocol

import torch

BACKEND_ENV = "VGG_KERNELS_BACKEND"
BACKEND_NAMES = ("auto", "triton", "native", "reference")
OPS = ("conv_bn_relu_infer", "conv_bn_relu_train")


class BackendFallbackWarning(UserWarning):
    """A requested backend could not run an op; another backend ran it instead."""


class Backend(Protocol):
    name: str

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype, op: str) -> str | None:
        ...


_REGISTRY: dict[str, Backend] = {}
_WARNED: set[tuple[str, str, str]] = set()
_WARN_LOCK = threading.Lock()


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend under ``backend.name``."""
    _REGISTRY[backend.name] = backend


def get_backend(name: str) -> Backend:
    """The registered backend called ``name`` (not ``'auto'``)."""
    _load_builtin_backends()
    if name not in _REGISTRY:
        raise ValueError(f"backend must be one of {BACKEND_NAMES} (got {name!r})")
    return _REGISTRY[name]


def check_backend_name(name: object, argument: str = "backend") -> str:
    """Validate a user-given backend name; returns it."""
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"{argument} must be one of {BACKEND_NAMES} (got {name!r})")
    return name


def _candidates(asked: str, device_type: str) -> list[str]:
    if asked == "auto":
        env = os.environ.get(BACKEND_ENV, "").strip()
        if env and env != "auto":
            check_backend_name(env, argument=f"environment variable {BACKEND_ENV}")
            asked = env
    if asked == "auto":
        if device_type == "cuda":
            return ["triton", "native", "reference"]
        return ["native", "reference"]
    return [asked] if asked == "reference" else [asked, "reference"]


def _resolve(asked: str, device_type: str, device_index: int, dtype_name: str, op: str) -> str:
    """Name of the backend that runs ``op``; warns once per fallback. Pure in its arguments."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS} (got {op!r})")
    _load_builtin_backends()
    device = torch.device(device_type, device_index) if device_index >= 0 else torch.device(
        device_type
    )
    dtype = getattr(torch, dtype_name)
    first_reason: tuple[str, str] | None = None
    for name in _candidates(asked, device_type):
        backend = _REGISTRY[name]
        reason = backend.unavailable_reason(device, dtype, op)
        if reason is None:
            if first_reason is not None:
                warn_fallback(asked, name, op, device, dtype, *first_reason, stacklevel=5)
            return name
        if first_reason is None:
            first_reason = (name, reason)
    raise RuntimeError(f"vgg_kernels: no backend can run {op} on {device_type} {dtype_name}")


def warn_fallback(asked: str, used: str, op: str, device: torch.device, dtype: torch.dtype,
                  failed: str, reason: str, stacklevel: int = 4) -> None:
    """The one warning of a fallback: backend ``failed`` (which ``asked`` chose) cannot run
    ``op`` for ``reason``, so ``used`` runs it. Once per (asked, used, reason), also when
    threads fall back at once."""
    key = (asked, used, reason)
    with _WARN_LOCK:
        first = key not in _WARNED
        _WARNED.add(key)
    if first:
        dtype_name = str(dtype).replace("torch.", "")
        warnings.warn(
            f"vgg_kernels: backend {asked!r} asked for {op} on {device.type} {dtype_name}; "
            f"running {used!r} instead because backend {failed!r} {reason}",
            BackendFallbackWarning,
            stacklevel=stacklevel,
        )


def _resolve_constant(asked: str, device_type: str, device_index: int, dtype_name: str,
                      op: str) -> str:
    return _resolve(asked, device_type, device_index, dtype_name, op)


try:  # torch.compile evaluates the choice once while tracing and keeps the name as a constant
    _resolve_constant = torch._dynamo.assume_constant_result(_resolve_constant)
except AttributeError:  # pragma: no cover - very old torch
    pass


def resolve_backend(asked: str, device: torch.device, dtype: torch.dtype, op: str) -> Backend:
    """The backend object that runs ``op`` for tensors on ``device`` with ``dtype``."""
    index = -1 if device.index is None else device.index
    name = _resolve_constant(asked, device.type, index, str(dtype).replace("torch.", ""), op)
    return _REGISTRY[name]


def planned_backend(asked: str, device: torch.device, dtype: torch.dtype, op: str
                    ) -> tuple[str, str | None]:
    """The backend that would run ``op`` and, when it is not the first choice, the sentence
    saying why that one cannot; warns nothing (for reports)."""
    _load_builtin_backends()
    first_reason: str | None = None
    for name in _candidates(asked, device.type):
        reason = _REGISTRY[name].unavailable_reason(device, dtype, op)
        if reason is None:
            return name, first_reason
        if first_reason is None:
            first_reason = f"backend {name!r} {reason}"
    return "none", first_reason


def available_backends(device: torch.device, dtype: torch.dtype,
                       op: str = "conv_bn_relu_infer") -> dict[str, str | None]:
    """Every registered backend mapped to ``None`` (can run) or the reason it cannot."""
    _load_builtin_backends()
    return {name: b.unavailable_reason(device, dtype, op) for name, b in _REGISTRY.items()}


_LOADED = False
_LOAD_LOCK = threading.Lock()


def _load_builtin_backends() -> None:
    """Register the built-in backends once. Thread-safe: the flag is set only after every
    backend is registered, under a lock, so threads making their first call at the same time
    all see the whole registry."""
    global _LOADED
    if _LOADED:
        return
    with _LOAD_LOCK:
        if _LOADED:
            return
        from vgg_kernels.backends import native, reference
        from vgg_kernels.backends import triton as triton_backend

        for module in (reference, triton_backend, native):
            register_backend(module.BACKEND)
        _LOADED = True
