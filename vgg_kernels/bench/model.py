"""The ``model`` suite: whole-model inference and one training step, images/s and peak memory.

Variants: ``FusedVGG`` on each selected fused backend; the eager model with torchvision's layout
(``make_eager_vgg``, channels_last; recorded as ``cudnn_eager`` on CUDA, ``torch_eager`` on a
CPU); and ``torch.compile`` of the eager model. All share one set of weights.

Inference runs in the run's dtype (parameters and input). A training step is forward +
cross-entropy + backward + SGD (momentum 0.9) step, with mixed precision as users train: with a
fp16/bf16 run dtype, fp32 parameters and fp32 input under ``torch.autocast(device_type,
dtype=run dtype)``, and for fp16 a ``torch.amp.GradScaler`` (mode ``train_amp``; the suite's
``train_precision`` says e.g. "autocast bf16"); with fp32, plain fp32 (mode ``train``, the same
work as files written before autocast was used, so their keys still compare). A fused backend
that cannot run the training op in the dtype the step computes in is skipped with the reason
(not timed on a fallback).

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

from vgg_kernels.backends import available_backends
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


def train_mode(settings: RunSettings) -> str:
    """``train_amp`` when the training step runs under autocast (a fp16/bf16 run), else
    ``train``."""
    return "train" if settings.dtype == torch.float32 else "train_amp"


def train_precision(settings: RunSettings) -> str:
    """What the training step computes in, as recorded in the suite's settings."""
    if settings.dtype == torch.float32:
        return "fp32"
    scaler = ", GradScaler" if settings.dtype == torch.float16 else ""
    return f"autocast {settings.dtype_name}{scaler} (fp32 parameters and input)"


def _build(variant: str, settings: RunSettings, state: dict[str, torch.Tensor],
           dtype: torch.dtype | None = None) -> nn.Module:
    """The variant's model holding ``state`` (copied), on the run's device, in ``dtype`` (default
    the run's), channels_last. Built on the meta device: the modules' own initialisation (about
    a second for the classifier's 120M parameters on a CPU) would be overwritten anyway."""
    with torch.device("meta"):
        if variant in (baseline_name(settings.device), COMPILE):
            model: nn.Module = make_eager_vgg(settings.config, num_classes=NUM_CLASSES,
                                              init_weights=False)
        else:
            model = FusedVGG(settings.config, num_classes=NUM_CLASSES, init_weights=False,
                             backend=variant)
    model = model.to_empty(device=settings.device)
    model.load_state_dict(state, strict=True)
    model = model.to(dtype=dtype or settings.dtype)
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
                target: torch.Tensor, device: torch.device,
                autocast: torch.dtype | None) -> Callable[[torch.Tensor], None]:
    """One step; with ``autocast`` (fp16/bf16) the forward and loss run under
    ``torch.autocast``, and fp16 scales the loss with a GradScaler."""
    if autocast is None:
        def step(x: torch.Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
        return step
    scaler = (torch.amp.GradScaler(device.type) if autocast == torch.float16 else None)

    def amp_step(x: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast):
            loss = F.cross_entropy(model(x), target)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    return amp_step


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
                      "compile_train": compile_train, "train_mode": train_mode(settings),
                      "train_precision": train_precision(settings)}
    prefix = model_prefix(suite_settings)
    skipped: list[dict[str, Any]] = [{"variant": name, "mode": None, "reason": reason}
                                     for name, reason in selection.skipped]
    state = _weights(settings.config)
    shape = (settings.batch, 3, settings.resolution, settings.resolution)
    inputs = [torch.randn(shape, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last) for _ in range(2)]
    # the training step's input: fp32 images under autocast, as users feed them
    train_inputs = inputs if dtype == torch.float32 else [x.float() for x in inputs]
    target = torch.randint(0, NUM_CLASSES, (settings.batch,), device=device)
    cases: list[dict[str, Any]] = []
    interrupted = None
    for variant in variants:
        try:
            _run_variant(variant, settings, state, (inputs, train_inputs), target, prefix,
                         cases, skipped, compile_train, log)
        except RunInterrupted as stop:
            interrupted = f"{stop}; {variant} and later variants were not (fully) measured"
            skipped.append({"variant": variant, "mode": None, "reason": interrupted})
            break
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"settings": suite_settings, "wall_s": time.perf_counter() - began, "cases": cases,
            "skipped": skipped, "interrupted": interrupted}


def _train_reason(variant: str, settings: RunSettings) -> str | None:
    """Why a fused variant cannot run its training step in the dtype it computes in (the run
    dtype: autocast hands the fused ops fp16/bf16 operands); None when it can."""
    if variant in (baseline_name(settings.device), COMPILE):
        return None
    reason = available_backends(settings.device, settings.dtype, "conv_bn_relu_train").get(
        variant, "is not registered")
    return None if reason is None else (f"{variant} {reason} for the training op "
                                        f"(conv_bn_relu_train); not timed on a fallback")


def _run_variant(variant: str, settings: RunSettings, state: dict[str, torch.Tensor],
                 inputs: tuple[list[torch.Tensor], list[torch.Tensor]], target: torch.Tensor,
                 prefix: str, cases: list[dict[str, Any]], skipped: list[dict[str, Any]],
                 compile_train: bool, log: Callable[[str], None]) -> None:
    """Append the inference and training cases of one variant to ``cases`` as each finishes
    (so an interrupted run keeps them); failures go to ``skipped``. ``inputs``: (inference
    inputs in the run dtype, training inputs: fp32 under autocast)."""
    amp = settings.dtype != torch.float32
    for mode in ("inference", train_mode(settings)):
        if mode != "inference" and variant == COMPILE and not compile_train:
            skipped.append({"variant": variant, "mode": mode,
                            "reason": "--no-compile-train was given"})
            continue
        if variant == COMPILE and settings.past_deadline():
            skipped.append({"variant": variant, "mode": mode, "reason": TIME_LIMIT_REASON})
            continue
        reason = None if mode == "inference" else _train_reason(variant, settings)
        if reason is not None:
            skipped.append({"variant": variant, "mode": mode, "reason": reason})
            continue
        try:
            # inference in the run dtype; training with fp32 parameters under autocast
            model = _build(variant, settings, state,
                           torch.float32 if mode != "inference" and amp else None)
            runner: Callable[..., Any] = model
            if variant == COMPILE:
                torch._dynamo.reset()
                runner = torch.compile(model, mode=settings.resolved_compile_mode())
            if mode == "inference":
                model.eval()
                with torch.no_grad():
                    figures = _measure(runner, inputs[0], settings, variant == COMPILE)
            else:
                model.train()
                optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE,
                                            momentum=0.9)
                step = _train_step(runner, optimizer, target, settings.device,
                                   settings.dtype if amp else None)
                figures = _measure(step, inputs[1], settings, variant == COMPILE)
                del optimizer, step
            del model, runner
        except Exception as error:  # one failing variant must not lose the others
            skipped.append({"variant": variant, "mode": mode, "reason": _short_error(error)})
            continue
        finally:
            if settings.device.type == "cuda":
                torch.cuda.empty_cache()
        cases.append({"key": f"{prefix}/{variant}/{mode}", "variant": variant, "mode": mode,
                      **figures})
        log(f"  {variant} {mode}: {figures['images_per_s']:.1f} img/s")


def suite_train_mode(suite: dict[str, Any]) -> str:
    """The training mode a model suite recorded: ``train_amp`` (autocast) or ``train`` (files
    written before autocast was used, and fp32 runs)."""
    return suite.get("settings", {}).get("train_mode", "train")


def format_model(suite: dict[str, Any]) -> str:
    """The terminal table: one row per variant, inference and train images/s and peak memory."""
    baseline = suite["settings"]["baseline"]
    by_key = {(c["variant"], c["mode"]): c for c in suite["cases"]}
    train = suite_train_mode(suite)
    rows = []
    for variant in suite["settings"]["variants"]:
        row: list[object] = [variant]
        for mode in ("inference", train):
            case, base = by_key.get((variant, mode)), by_key.get((baseline, mode))
            if case is None:
                row += ["-", "-"]
                continue
            speedup = f" ({case['images_per_s'] / base['images_per_s']:.2f}x)" if base else ""
            memory = case["peak_memory_bytes"]
            row += [f"{case['images_per_s']:.1f}{speedup}",
                    "n/a" if memory is None else f"{memory / 2**30:.2f}"]
        rows.append(row)
    table = format_table(["variant", "inference img/s", "peak GiB", f"{train} img/s",
                          "peak GiB"], rows)
    precision = suite["settings"].get("train_precision")
    notes = [f"training step: {precision}"] if precision else []
    notes += [f"skipped {s['variant']}" + (f" {s['mode']}" if s["mode"] else "")
              + f": {s['reason']}" for s in suite["skipped"]]
    return "\n".join([table, *notes])
