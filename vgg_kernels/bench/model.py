"""The ``model`` suite: whole-model inference and one training step, images/s and peak memory.

Variants: ``FusedVGG`` on each selected fused backend; the eager model with torchvision's layout
(``make_eager_vgg``, channels_last; recorded as ``cudnn_eager`` on CUDA, ``torch_eager`` on a
CPU); and ``torch.compile`` of the eager model. All share one set of weights. A training step is
forward + cross-entropy + backward + SGD (momentum 0.9) step, parameters in the run's dtype.
Peak memory is ``torch.cuda.max_memory_allocated`` over the warm-up and timed calls (weights
included); on a CPU it is not measured (null, with the reason).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vgg_kernels.bench.results import model_prefix
from vgg_kernels.bench.settings import (
    COMPILE,
    TIME_LIMIT_REASON,
    RunInterrupted,
    RunSettings,
    baseline_name,
    select_backends,
)
from vgg_kernels.bench.table import format_table
from vgg_kernels.bench.timing import summarize, synchronize, time_calls, time_first_call
from vgg_kernels.models.vgg import FusedVGG, make_eager_vgg

CPU_MEMORY_NOTE = ("not measured on a CPU: the process's peak resident set is monotonic over the "
                   "whole run and shared by every case, so it cannot be attributed to one")
NUM_CLASSES = 1000
LEARNING_RATE = 1e-3


def _short_error(error: Exception) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= 300 else text[:297] + "..."


def _weights(config: str) -> dict[str, torch.Tensor]:
    """One state_dict (torchvision keys) shared by every variant, with non-trivial BN stats."""
    model = FusedVGG(config, num_classes=NUM_CLASSES)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.state_dict()


def _build(variant: str, settings: RunSettings, state: dict[str, torch.Tensor]) -> nn.Module:
    if variant in (baseline_name(settings.device), COMPILE):
        model: nn.Module = make_eager_vgg(settings.config, num_classes=NUM_CLASSES,
                                          init_weights=False)
    else:
        model = FusedVGG(settings.config, num_classes=NUM_CLASSES, init_weights=False,
                         backend=variant)
    model.load_state_dict(state, strict=True)
    model = model.to(device=settings.device, dtype=settings.dtype)
    return model.to(memory_format=torch.channels_last)


def _measure(fn: Callable[[Any], object], inputs: list[Any], settings: RunSettings,
             compiled: bool) -> dict[str, Any]:
    """Samples, images/s and peak memory of ``fn`` over warm-up + timed calls."""
    device = settings.device
    extra: dict[str, Any] = {}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        extra["memory_before_bytes"] = torch.cuda.memory_allocated(device)
    if compiled:
        extra["compile_s"] = time_first_call(fn, inputs[0], device)
    samples = time_calls(fn, inputs, device=device, warmup=settings.warmup,
                         repeats=settings.repeats)
    stats = summarize(samples)
    images = settings.batch * 1e3
    figures: dict[str, Any] = {
        "samples_ms": samples, **stats.as_dict(),
        "images_per_s": images / stats.median,
        "images_per_s_low": images / stats.p80,
        "images_per_s_high": images / stats.p20,
    }
    if device.type == "cuda":
        figures["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        figures["peak_memory_note"] = "torch.cuda.max_memory_allocated, weights included"
    else:
        figures["peak_memory_bytes"] = None
        figures["peak_memory_note"] = CPU_MEMORY_NOTE
    return {**figures, **extra}


def _train_step(model: Callable[..., Any], optimizer: torch.optim.Optimizer,
                target: torch.Tensor) -> Callable[[torch.Tensor], None]:
    def step(x: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
    return step


def run_model(settings: RunSettings, log: Callable[[str], None] = print, *,
              compile_train: bool = True) -> dict[str, Any]:
    """Run the suite; returns the ``suites.model`` block (see vgg_kernels/bench/results.py)."""
    began = time.perf_counter()
    device, dtype = settings.device, settings.dtype
    selection = select_backends(settings)
    variants = [*selection.fused, baseline_name(device)]
    if selection.compile:
        variants.append(COMPILE)
    suite_settings = {**settings.as_dict(), "variants": variants,
                      "optimizer": f"SGD(lr={LEARNING_RATE}, momentum=0.9)",
                      "compile_train": compile_train}
    prefix = model_prefix(suite_settings)
    skipped: list[dict[str, Any]] = [{"variant": name, "mode": None, "reason": reason}
                                     for name, reason in selection.skipped]
    state = _weights(settings.config)
    shape = (settings.batch, 3, settings.resolution, settings.resolution)
    inputs = [torch.randn(shape, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last) for _ in range(2)]
    target = torch.randint(0, NUM_CLASSES, (settings.batch,), device=device)
    cases: list[dict[str, Any]] = []
    interrupted = None
    for variant in variants:
        try:
            _run_variant(variant, settings, state, inputs, target, prefix, cases, skipped,
                         compile_train, log)
        except RunInterrupted as stop:
            interrupted = f"{stop}; {variant} and later variants were not (fully) measured"
            skipped.append({"variant": variant, "mode": None, "reason": interrupted})
            break
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"settings": suite_settings, "wall_s": time.perf_counter() - began, "cases": cases,
            "skipped": skipped, "interrupted": interrupted}


def _run_variant(variant: str, settings: RunSettings, state: dict[str, torch.Tensor],
                 inputs: list[torch.Tensor], target: torch.Tensor, prefix: str,
                 cases: list[dict[str, Any]], skipped: list[dict[str, Any]],
                 compile_train: bool, log: Callable[[str], None]) -> None:
    """Append the inference and training cases of one variant to ``cases`` as each finishes
    (so an interrupted run keeps them); failures go to ``skipped``."""
    model = _build(variant, settings, state)
    runner: Callable[..., Any] = model
    if variant == COMPILE:
        torch._dynamo.reset()
        runner = torch.compile(model, mode=settings.resolved_compile_mode())
    for mode in ("inference", "train"):
        if mode == "train" and variant == COMPILE and not compile_train:
            skipped.append({"variant": variant, "mode": mode,
                            "reason": "--no-compile-train was given"})
            continue
        if variant == COMPILE and settings.past_deadline():
            skipped.append({"variant": variant, "mode": mode, "reason": TIME_LIMIT_REASON})
            continue
        try:
            if mode == "inference":
                model.eval()
                with torch.no_grad():
                    figures = _measure(runner, inputs, settings, variant == COMPILE)
            else:
                model.train()
                optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE,
                                            momentum=0.9)
                figures = _measure(_train_step(runner, optimizer, target), inputs, settings,
                                   variant == COMPILE)
                del optimizer
        except Exception as error:  # one failing variant must not lose the others
            skipped.append({"variant": variant, "mode": mode, "reason": _short_error(error)})
            continue
        cases.append({"key": f"{prefix}/{variant}/{mode}", "variant": variant, "mode": mode,
                      **figures})
        log(f"  {variant} {mode}: {figures['images_per_s']:.1f} img/s")


def format_model(suite: dict[str, Any]) -> str:
    """The terminal table: one row per variant, inference and train images/s and peak memory."""
    baseline = suite["settings"]["baseline"]
    by_key = {(c["variant"], c["mode"]): c for c in suite["cases"]}
    rows = []
    for variant in suite["settings"]["variants"]:
        row: list[object] = [variant]
        for mode in ("inference", "train"):
            case, base = by_key.get((variant, mode)), by_key.get((baseline, mode))
            if case is None:
                row += ["-", "-"]
                continue
            speedup = f" ({case['images_per_s'] / base['images_per_s']:.2f}x)" if base else ""
            memory = case["peak_memory_bytes"]
            row += [f"{case['images_per_s']:.1f}{speedup}",
                    "n/a" if memory is None else f"{memory / 2**30:.2f}"]
        rows.append(row)
    table = format_table(["variant", "inference img/s", "peak GiB", "train img/s", "peak GiB"],
                         rows)
    notes = [f"skipped {s['variant']}" + (f" {s['mode']}" if s["mode"] else "")
             + f": {s['reason']}" for s in suite["skipped"]]
    return "\n".join([table, *notes])
