"""Native backend: the compiled extension vgg_kernels._C (C++ CPU kernels, CUDA kernels).

The ops are registered by csrc/vgg_kernels.cpp under ``torch.ops.vgg_kernels`` (schemas in one
TORCH_LIBRARY block, CPU and CUDA kernels); the fake kernels below let torch.compile trace them.

Loading, on first use: ``import vgg_kernels._C`` (built by ``pip install --no-build-isolation``);
failing that, and when the csrc/ sources are next to the package (a source checkout), a JIT build
with ``torch.utils.cpp_extension.load`` (ninja; cached under TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions), announced on stderr. ``VGG_KERNELS_JIT=0`` turns the JIT build off.
If both fail the backend reports itself unavailable, and the registry falls back to reference
with one warning that carries the reason.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import warnings
from pathlib import Path

import torch

from vgg_kernels.backends.reference import TorchGradients

_ROOT = Path(__file__).resolve().parents[2]
_OPS = ("conv_bn_relu_infer", "conv_bn_relu_train")
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# CPU weight gradients of 3x3 convs with at least WGRAD_WINOGRAD_MIN_CHANNELS input channels run
# on the extension's Winograd F(3x3, 2x2) kernel (2.25x fewer multiplies than the direct sums).
# Measured on a 2-core Zen 4 (python benchmarks/profile_cpu_convs.py wgrad, ms, Winograd /
# oneDNN): C = K = 64 at batch 4, 64x64 3.82 / 5.38; 512 at 8x8 2.40 / 7.01; 512 at batch 32,
# 4x4 4.24 / 10.22; 64 at batch 4, 112x112 10.65 / 16.30; 8 -> 64 at 64x64 0.67 / 0.91; but
# the RGB first layer 3 -> 64 at 112x112 1.70 / 0.73 (its transforms outweigh 3-row GEMMs).
WGRAD_WINOGRAD_MIN_CHANNELS = 8
# 1x1 convs: one MKL GEMM over the input where the layer is wide and has few pixels (at least
# WGRAD_GEMM_MIN_CHANNELS input channels, N * H * W at most WGRAD_GEMM_MAX_PIXELS), oneDNN's
# weight gradient elsewhere: MKL's sgemm with a short M loses wherever there are pixels to
# amortise oneDNN's setup (C 64, N 4, 64x64: 22-26 ms against 3.4-4.2 ms as 3x3 shifted
# copies).
WGRAD_GEMM_MIN_CHANNELS = 256
WGRAD_GEMM_MAX_PIXELS = 256

_lock = threading.Lock()
_state: dict[str, object] = {}  # "reason": str | None once loading was tried; "info": dict
_fakes_registered = False  # torch.library allows one fake kernel per op and process


def _jit_build(prebuilt_error: str) -> str | None:
    """Build and load the extension from csrc/; returns None, or why it could not."""
    build_py = _ROOT / "csrc" / "build.py"
    if not build_py.is_file():
        return f"cannot load the compiled extension vgg_kernels._C ({prebuilt_error})"
    if os.environ.get("VGG_KERNELS_JIT", "1").strip() == "0":
        return (f"cannot load the compiled extension vgg_kernels._C ({prebuilt_error}) and "
                f"VGG_KERNELS_JIT=0 turns off building it on first use")
    spec = importlib.util.spec_from_file_location("vgg_kernels_build", build_py)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    cuda_home = build.prepare_environment()
    try:
        from torch.utils.cpp_extension import load

        with_cuda = build.want_cuda(cuda_home)
        print(f"vgg_kernels: vgg_kernels._C is not built ({prebuilt_error}); building it now "
              f"with {'CPU and CUDA' if with_cuda else 'CPU'} kernels (first use only, cached; "
              f"takes minutes) ...", file=sys.stderr, flush=True)
        args = build.compile_args(with_cuda)
        load(name="vgg_kernels_C", sources=build.sources(with_cuda),
             extra_cflags=args["cxx"], extra_cuda_cflags=args.get("nvcc"),
             extra_ldflags=build.link_args(),
             extra_include_paths=build.include_dirs(), with_cuda=with_cuda,
             is_python_module=False, verbose=False)
    except Exception as error:  # a failed compile must not break the package
        reason = (f"cannot load the compiled extension vgg_kernels._C ({prebuilt_error}) and "
                  f"building it failed ({type(error).__name__}: {str(error).strip()[:500]})")
        warnings.warn(f"vgg_kernels: {reason}", RuntimeWarning, stacklevel=3)
        return reason
    print("vgg_kernels: vgg_kernels._C built and loaded", file=sys.stderr, flush=True)
    return None


def _parse_build_info(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split() if "=" in part)


def _load() -> str | None:
    """Load the extension once; None when its ops are registered, else the reason why not."""
    if "reason" in _state:
        return _state["reason"]  # type: ignore[return-value]
    with _lock:
        if "reason" in _state:
            return _state["reason"]  # type: ignore[return-value]
        reason: str | None = None
        try:
            from vgg_kernels import _C  # noqa: F401  (registers torch.ops.vgg_kernels.*)
        except ImportError as error:
            reason = _jit_build(str(error))
        if reason is None:
            _register_fakes()
            # outside any torch.jit.trace in progress: the tracer cannot record an op that
            # returns a str
            tracing_state = torch._C._get_tracing_state()
            torch._C._set_tracing_state(None)
            try:
                _state["info"] = _parse_build_info(torch.ops.vgg_kernels.build_info())
            finally:
                torch._C._set_tracing_state(tracing_state)
        _state["reason"] = reason
        return reason


def build_info() -> dict[str, str]:
    """What the loaded extension runs: {'cpu': 'avx512'|'avx2'|'generic', 'cuda': archs|'none'};
    empty when the extension cannot be loaded."""
    _load()
    return dict(_state.get("info", {}))  # type: ignore[call-overload]


def cuda_wgmma_available() -> bool:
    """Whether ``VGG_KERNELS_NATIVE_WGMMA=1`` runs fp16/bf16 inference on the Hopper (wgmma)
    kernel on the current CUDA device: compute capability 9.0 and a build for 9.0a."""
    if _load() is not None or not torch.cuda.is_available():
        return False
    return bool(torch.ops.vgg_kernels.cuda_wgmma_available())


def cuda_last_infer_kernel() -> str:
    """The CUDA kernel the last native inference call ran: ``wmma``, ``narrow``, ``wgmma``,
    ``halo`` or ``halo-t`` (with ``VGG_KERNELS_NATIVE_WGMMA=auto``, the one kept for its shape);
    empty before the first call or without the extension."""
    if _load() is not None:
        return ""
    return str(torch.ops.vgg_kernels.cuda_last_infer_kernel())


# -- fake (meta) kernels: shapes, dtypes and memory formats of the C++ ops ----------------------

def _empty_nhwc(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device,
                       memory_format=torch.channels_last)


def _check_devices(first: str, tensors: dict[str, torch.Tensor | None]) -> None:
    """The C++ ops' device check, in the fake kernels too: a call that mixes devices (one
    argument on the meta device, say) reaches the fake kernel, which must fail as the real
    one would rather than return uninitialised memory."""
    device = tensors[first].device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} must be on {first}'s device {device} (got {t.device})")


def _fake_conv_bn_relu_infer(x, weight, scale, shift, pool):
    _check_devices("x", {"x": x, "weight": weight, "scale": scale, "shift": shift})
    n, _, h, w = x.shape
    k = weight.shape[0]
    return _empty_nhwc((n, k, h // 2, w // 2) if pool else (n, k, h, w), x)


def _fake_conv_bn_stats(x, weight, bias):
    _check_devices("x", {"x": x, "weight": weight, "bias": bias})
    n, _, h, w = x.shape
    k = weight.shape[0]
    stats = x.new_empty((k,), dtype=torch.float64)
    return _empty_nhwc((n, k, h, w), x), stats, torch.empty_like(stats)


def _fake_bn_relu_pool(z, mean, scale, beta, pool):
    _check_devices("z", {"z": z, "mean": mean, "scale": scale, "beta": beta})
    n, k, h, w = z.shape
    return _empty_nhwc((n, k, h // 2, w // 2) if pool else (n, k, h, w), z)


def _fake_bn_relu_backward(grad_y, z, mean, invstd, scale, beta, pool):
    _check_devices("z", {"z": z, "grad_y": grad_y, "mean": mean, "invstd": invstd,
                         "scale": scale, "beta": beta})
    stats = mean.new_empty(mean.shape, dtype=torch.float32)
    return _empty_nhwc(z.shape, z), stats, torch.empty_like(stats), torch.empty_like(stats)


def _fake_conv_bn_relu_infer_outputs(x, weight, scale, shift, pool, activation, codes):
    _check_devices("x", {"x": x, "weight": weight, "scale": scale, "shift": shift})
    n, _, h, w = x.shape
    k = weight.shape[0]
    return (_fake_conv_bn_relu_infer(x, weight, scale, shift, pool),
            _empty_nhwc((n, k, h, w), x) if activation else x.new_empty(0),
            (torch.empty((n, k, h // 2, w // 2), dtype=torch.uint8, device=x.device,
                         memory_format=torch.channels_last) if codes
             else x.new_empty(0, dtype=torch.uint8)))


def _fake_conv_dgrad(grad, weight):
    _check_devices("grad", {"grad": grad, "weight": weight})
    n, _, h, w = grad.shape
    return _empty_nhwc((n, weight.shape[1], h, w), grad)


def _fake_relu_pool_backward(grad_y, mask, grad_a, act, scale, pool, shape):
    _check_devices("grad_y", {"grad_y": grad_y, "mask": mask, "grad_a": grad_a, "act": act,
                              "scale": scale})
    return _empty_nhwc(tuple(shape), grad_y), scale.new_empty(shape[1], dtype=torch.float32)


def _fake_conv_wgrad(grad, x):
    return grad.new_empty((grad.shape[1], x.shape[1], 3, 3), dtype=torch.float32)


def _fake_linear(x, weight, bias):
    _check_devices("x", {"x": x, "weight": weight, "bias": bias})
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)


def _fake_conv_bn_relu_infer_packed(x, weight, packed, layout, scale, shift, pool):
    _check_devices("x", {"x": x, "weight": weight, "packed": packed, "scale": scale,
                         "shift": shift})
    return _fake_conv_bn_relu_infer(x, weight, scale, shift, pool)


def _fake_pack_conv_weight(weight, layout):
    return weight.new_empty((torch.library.get_ctx().new_dynamic_size(),),
                            dtype=torch.float32)


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True
    for name, fn in (("conv_bn_relu_infer", _fake_conv_bn_relu_infer),
                     ("conv_bn_stats", _fake_conv_bn_stats),
                     ("bn_relu_pool", _fake_bn_relu_pool),
                     ("bn_relu_backward", _fake_bn_relu_backward),
                     ("conv_bn_relu_infer_outputs", _fake_conv_bn_relu_infer_outputs),
                     ("conv_dgrad", _fake_conv_dgrad),
                     ("conv_wgrad", _fake_conv_wgrad),
                     ("linear", _fake_linear),
                     ("conv_bn_relu_infer_packed", _fake_conv_bn_relu_infer_packed),
                     ("pack_conv_weight", _fake_pack_conv_weight),
                     ("relu_pool_backward", _fake_relu_pool_backward)):
        torch.library.register_fake(f"vgg_kernels::{name}")(fn)


class PackedWeights:
    """One conv weight's packed forms (Winograd-transformed or direct panels), by layout, kept
    across calls for ``vgg_kernels.freeze``: packed at the first inference call that needs a
    layout, under a lock (threads' first calls pack once). A change torch tracks (the weight's
    version counter, as after an optimizer step, ``copy_`` or ``load_state_dict``, or a new
    storage) drops them; one it does not (``.data``, numpy views, another process) is not
    seen: that is what ``freeze`` trades for the packing time. Copies and pickles start empty
    (the layouts are this CPU's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._packed: dict[int, torch.Tensor] = {}
        self._stamp: tuple | None = None

    def __reduce__(self):
        return (PackedWeights, ())

    def __len__(self) -> int:
        return len(self._packed)

    def nbytes(self) -> int:
        """Bytes held by the packed forms."""
        return sum(t.numel() * t.element_size() for t in self._packed.values())

    def get(self, x: torch.Tensor, weight: torch.Tensor, pool: bool
            ) -> tuple[torch.Tensor, int] | None:
        """(packed, layout) for this call, or None where the packed weight is not finite."""
        layout = torch.ops.vgg_kernels.conv_weight_layout(x, weight, pool)
        # inference tensors (a model built under torch.inference_mode) have no version counter
        version = None if weight.is_inference() else weight._version
        stamp = (weight.data_ptr(), version, tuple(weight.shape), tuple(weight.stride()))
        with self._lock:
            if stamp != self._stamp:
                self._packed.clear()
                self._stamp = stamp
            packed = self._packed.get(layout)
            if packed is None:
                packed = torch.ops.vgg_kernels.pack_conv_weight(weight, layout)
                self._packed[layout] = packed
        return (packed, layout) if packed.numel() else None


# -- the backend ---------------------------------------------------------------------------------

class NativeBackend(TorchGradients):
    """Ops registered by csrc/ under ``torch.ops.vgg_kernels``: fp32 on the CPU; fp32 (tf32 when
    ``torch.backends.cudnn.allow_tf32``), fp16 and bf16 on CUDA GPUs of the built archs.

    The conv's input gradient and the folded block's forward outputs and ReLU/pool backward run
    the CPU kernels on CPU tensors (the input gradient is a conv with flipped, transposed
    weights, Winograd where it pays); the weight gradient, and everything on CUDA tensors, are
    PyTorch's (``TorchGradients``)."""

    name = "native"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype, op: str) -> str | None:
        if op not in _OPS:
            return f"has no {op} op"
        reason = _load()
        if reason is not None:
            return reason
        if device.type == "cpu":
            if dtype != torch.float32:
                return f"supports float32 on CPU (got {dtype})"
            return None
        if device.type != "cuda":
            return f"does not run on {device.type} tensors"
        archs = _state["info"].get("cuda", "none")  # type: ignore[union-attr]
        if archs == "none":
            return "has no CUDA kernels in this build (built for the CPU only)"
        if dtype not in _CUDA_DTYPES:
            return f"supports float32, float16 and bfloat16 on CUDA (got {dtype})"
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        built = archs.split(",")
        if f"{major}{minor}0" not in built:
            return (f"was built for compute capabilities {archs} but the GPU is "
                    f"{major}.{minor} (rebuild with VGG_KERNELS_CUDA_ARCHS={major}.{minor})")
        return None

    def conv_bn_relu_infer(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                           shift: torch.Tensor, pool: bool) -> torch.Tensor:
        return torch.ops.vgg_kernels.conv_bn_relu_infer(x, weight, scale, shift, pool)

    def conv_bn_relu_infer_packed(self, x: torch.Tensor, weight: torch.Tensor,
                                  scale: torch.Tensor, shift: torch.Tensor, pool: bool,
                                  packed: PackedWeights) -> torch.Tensor:
        """``conv_bn_relu_infer`` on CPU fp32 tensors with the weight's packed form from
        ``packed`` (see ``PackedWeights``)."""
        if not self._on_cpu(x, weight) or x.dtype != torch.float32 or (
                weight.dtype != torch.float32):
            return self.conv_bn_relu_infer(x, weight, scale, shift, pool)
        found = packed.get(x, weight, pool)
        if found is None:
            return self.conv_bn_relu_infer(x, weight, scale, shift, pool)
        return torch.ops.vgg_kernels.conv_bn_relu_infer_packed(x, weight, found[0], found[1],
                                                               scale, shift, pool)

    def conv_bn_stats(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.ops.vgg_kernels.conv_bn_stats(x, weight, bias)

    def bn_relu_pool(self, z: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor,
                     beta: torch.Tensor, pool: bool) -> torch.Tensor:
        return torch.ops.vgg_kernels.bn_relu_pool(z, mean, scale, beta, pool)

    def bn_relu_backward(self, grad_y: torch.Tensor, z: torch.Tensor, mean: torch.Tensor,
                         invstd: torch.Tensor, scale: torch.Tensor, beta: torch.Tensor,
                         pool: bool) -> tuple[torch.Tensor, ...]:
        return torch.ops.vgg_kernels.bn_relu_backward(grad_y, z, mean, invstd, scale, beta, pool)

    @staticmethod
    def _on_cpu(*tensors: torch.Tensor | None) -> bool:
        return all(t is None or (t.device.type == "cpu" and t.dtype in (torch.float32,
                                                                        torch.uint8))
                   for t in tensors)

    def conv_dgrad(self, grad, weight, x_shape):
        if not self._on_cpu(grad, weight):
            return super().conv_dgrad(grad, weight, x_shape)
        return torch.ops.vgg_kernels.conv_dgrad(grad, weight)

    def conv_wgrad(self, grad, x, weight_shape):
        """On CPU tensors: 3x3 convs with WGRAD_WINOGRAD_MIN_CHANNELS or more input channels on
        the Winograd kernel; 1x1 convs of a wide layer with few pixels as one GEMM
        (WGRAD_GEMM_MIN_CHANNELS, WGRAD_GEMM_MAX_PIXELS); oneDNN's weight gradient elsewhere."""
        k, c, r, _ = weight_shape
        n, _, h, w = x.shape
        if not self._on_cpu(grad, x):
            return super().conv_wgrad(grad, x, weight_shape)
        if r == 3 and c >= WGRAD_WINOGRAD_MIN_CHANNELS:
            return torch.ops.vgg_kernels.conv_wgrad(grad, x)
        if r != 1 or c < WGRAD_GEMM_MIN_CHANNELS or n * h * w > WGRAD_GEMM_MAX_PIXELS:
            return super().conv_wgrad(grad, x, weight_shape)
        rows = grad.permute(0, 2, 3, 1).reshape(-1, k)
        product = rows.t() @ x.permute(0, 2, 3, 1).reshape(-1, c)  # (K, C)
        return product.view(k, c, 1, 1)

    def conv_bn_relu_infer_outputs(self, x, weight, scale, shift, pool, activation, codes):
        odd = x.shape[2] % 2 or x.shape[3] % 2
        if not self._on_cpu(x, weight) or not pool or (activation and odd):
            return super().conv_bn_relu_infer_outputs(x, weight, scale, shift, pool,
                                                      activation, codes)
        return torch.ops.vgg_kernels.conv_bn_relu_infer_outputs(x, weight, scale, shift, pool,
                                                                activation, codes)

    def relu_pool_backward(self, grad_y, mask, grad_a, act, scale, pool, shape):
        if not self._on_cpu(grad_y, mask, grad_a, act):
            return super().relu_pool_backward(grad_y, mask, grad_a, act, scale, pool, shape)
        return torch.ops.vgg_kernels.relu_pool_backward(grad_y, mask, grad_a, act, scale, pool,
                                                        list(shape))


BACKEND = NativeBackend()
