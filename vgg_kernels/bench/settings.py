"""What a benchmark run measures: device, dtype, shapes, repeats, and which backends.

Backend names on the command line (``--backends``, comma-separated):

- ``triton``, ``native``, ``reference``: the fused backends (``vgg_kernels.ops``), each run when
  ``vgg_kernels.available_backends(device, dtype)`` says it can, else skipped with the reason.
  ``triton`` on CPU tensors only runs in the Triton interpreter, which is far too slow to time:
  it is always skipped on a CPU.
- ``eager`` (aliases ``cudnn_eager``, ``torch_eager``): nn.Conv2d + nn.BatchNorm2d (eval; train
  mode in the training suites) + nn.ReLU (+ nn.MaxPool2d) modules in channels_last, or the eager
  model. Recorded as ``cudnn_eager`` on CUDA and ``torch_eager`` on a CPU. It is the baseline of
  every speedup, so it always runs.
- ``compile`` (alias ``torch_compile``): ``torch.compile`` of the eager modules
  (``mode='max-autotune-no-cudagraphs'`` on CUDA, the default mode on a CPU); ``--no-compile``
  skips it with the reason recorded.
- ``all`` (the default): every fused backend, the baseline and compile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from vgg_kernels.backends import BACKEND_NAMES, available_backends

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16,
                                  "bf16": torch.bfloat16}
FUSED_BACKENDS = tuple(name for name in BACKEND_NAMES if name != "auto")
EAGER_ALIASES = ("eager", "cudnn_eager", "torch_eager")
COMPILE = "torch_compile"
COMPILE_ALIASES = ("compile", COMPILE)
COMPILE_MODES = {"cuda": "max-autotune-no-cudagraphs", "cpu": "default"}
INTERPRETER_REASON = ("runs CPU tensors only in the Triton interpreter, far too slow to "
                      "benchmark (skipped on CPUs)")
NO_COMPILE_REASON = "--no-compile was given"
TIME_LIMIT_REASON = "the --time-limit had passed before this case started"


class RunInterrupted(BaseException):
    """Raised (from a SIGTERM handler) to stop a run and still write what it measured.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` — ours around each
    case, or torch's inside a compile — swallows it.
    """


def baseline_name(device: torch.device) -> str:
    """Name of the eager baseline: cuDNN on CUDA, plain torch eager on a CPU."""
    return "cudnn_eager" if device.type == "cuda" else "torch_eager"


@dataclass
class RunSettings:
    """Everything that fixes what a run measures (recorded under each suite's ``settings``)."""

    device: torch.device
    dtype_name: str
    config: str
    batch: int
    resolution: int
    warmup: int
    repeats: int
    backends: list[str] = field(default_factory=lambda: ["all"])
    compile: bool = True
    compile_mode: str | None = None
    # Soft limit: once time.perf_counter() passes ``deadline``, torch.compile cases (the slow
    # ones: max-autotune takes ~10 s or more per block) are skipped with the reason recorded,
    # so a run under an outer `timeout` still writes its file.
    time_limit_s: float | None = None
    deadline: float | None = None
    # layers suite: time only these blocks (names as in layer_specs, e.g. conv1_1); None: all
    layers: list[str] | None = None
    # perceptual suite: the feature taps (VGGFeatures names); None: the suite's default
    taps: list[str] | None = None

    def past_deadline(self) -> bool:
        """Whether the soft time limit has passed."""
        return self.deadline is not None and time.perf_counter() > self.deadline

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype named by ``dtype_name``."""
        return DTYPES[self.dtype_name]

    def resolved_compile_mode(self) -> str:
        """``compile_mode``, or the device's default."""
        return self.compile_mode or COMPILE_MODES.get(self.device.type, "default")

    def as_dict(self) -> dict[str, object]:
        """The JSON ``settings`` block (without suite-specific entries)."""
        return {
            "config": self.config,
            "batch": self.batch,
            "resolution": self.resolution,
            "dtype": self.dtype_name,
            "device": str(self.device),
            "warmup": self.warmup,
            "repeats": self.repeats,
            "backends": list(self.backends),
            "baseline": baseline_name(self.device),
            "compile_mode": self.resolved_compile_mode() if self.compile else None,
            "time_limit_s": self.time_limit_s,
            **({"layers": list(self.layers)} if self.layers else {}),
        }


@dataclass
class Selection:
    """Which fused backends run, whether compile runs, and what was skipped and why."""

    fused: list[str]
    compile: bool
    skipped: list[tuple[str, str]]  # (backend, reason)


def parse_backends(text: str) -> list[str]:
    """Split and validate a ``--backends`` value; raises ``ValueError`` naming bad entries."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = ("all", *FUSED_BACKENDS, *EAGER_ALIASES, *COMPILE_ALIASES)
    bad = [name for name in names if name not in known]
    if bad or not names:
        raise ValueError(f"--backends must be a comma-separated list of {', '.join(known)} "
                         f"(got {text!r})")
    return names


def select_backends(settings: RunSettings, op: str = "conv_bn_relu_infer") -> Selection:
    """Resolve ``settings.backends`` against what can run ``op`` (``conv_bn_relu_infer`` or
    ``conv_bn_relu_train``) on the device and dtype."""
    requested = set(settings.backends)
    everything = "all" in requested
    reasons = available_backends(settings.device, settings.dtype, op)
    fused: list[str] = []
    skipped: list[tuple[str, str]] = []
    for name in FUSED_BACKENDS:
        if not everything and name not in requested:
            continue
        reason = reasons.get(name, "is not registered")
        if name == "triton" and settings.device.type == "cpu":
            reason = INTERPRETER_REASON
        if reason is None:
            fused.append(name)
        else:
            skipped.append((name, reason))
    wants_compile = everything or bool(requested & set(COMPILE_ALIASES))
    if wants_compile and not settings.compile:
        skipped.append((COMPILE, NO_COMPILE_REASON))
    return Selection(fused, wants_compile and settings.compile, skipped)
