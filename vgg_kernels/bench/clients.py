"""Suites of ``vgg_kernels.fuse`` on models users already have, against the same model eager:

- ``lpips``: the ``lpips`` package's ``LPIPS(net='vgg')`` unchanged (its own nn.Sequential
  slices of VGG16, frozen), one call = the distance of a batch of image pairs and its gradient
  with respect to the first images (a perceptual loss's forward and input gradient);
- ``unet``: the common UNet (``vgg_kernels.bench.unet``: double-conv nn.Sequential stages, BN,
  bilinear upsampling) in training, one call = a forward, a pixel-wise cross-entropy, the
  backward and an SGD step (momentum 0.9); on CUDA under ``torch.autocast`` in the run dtype
  with fp32 parameters, as users train; fp32 on a CPU.

Variants, all from one set of weights: the eager model as users run it (``torch_eager`` on a
CPU, ``cudnn_eager`` on CUDA; NCHW input), the same in channels_last memory
(``eager_channels_last``), ``fuse(copy, backend=...)`` for each selected fused backend, and
``torch.compile`` of the eager model. On a CPU the variants are timed in interleaved rounds (one
call of each per round, so load from other processes hits all alike); on CUDA one after the
other with CUDA events.

Figures per variant: ms (median, p20, p80), images/s, speedup over the eager model
(spread-aware low/high), and the error of its first call against eager's on the same inputs:
the input gradient (lpips) or the loss and the first conv's weight gradient (unet), as max
|difference| / max |eager|.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vgg_kernels.bench.layers import _relative_error, _short_error, baseline_speedups
from vgg_kernels.bench.results import clients_prefix
from vgg_kernels.bench.settings import (
    COMPILE,
    TIME_LIMIT_REASON,
    RunInterrupted,
    RunSettings,
    baseline_name,
    select_backends,
)
from vgg_kernels.bench.table import format_table
from vgg_kernels.bench.timing import rotating_input_count, summarize, time_interleaved
from vgg_kernels.bench.unet import UNet
from vgg_kernels.fusion import fuse

CHANNELS_LAST = "eager_channels_last"
UNET_CLASSES = 2
LPIPS_CALL = "distance of each image pair + its gradient with respect to the first images"
UNET_CALL = ("forward, pixel-wise cross-entropy over 2 classes, backward, SGD step (momentum "
             "0.9)")


def _lpips_model(device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``lpips.LPIPS(net='vgg')`` with a randomly initialised VGG16 (``pnet_rand``: nothing to
    download; the timing does not depend on the weights) and its packaged linear heads."""
    try:
        import lpips
    except ImportError as error:
        raise RuntimeError("the lpips suite needs the lpips package (pip install lpips)") \
            from error
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lpips passes torchvision a deprecated argument
        model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    return model.to(device=device, dtype=dtype).eval()


def _lpips_call(model: nn.Module, channels_last: bool = False
                ) -> Callable[[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    def call(pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        a, b = pair
        if channels_last:
            a = a.contiguous(memory_format=torch.channels_last)
            b = b.contiguous(memory_format=torch.channels_last)
        a = a.detach().requires_grad_(True)
        distance = model(a, b).sum()
        return torch.autograd.grad(distance, a)[0]
    return call


def _unet_step(model: nn.Module, device: torch.device, amp: torch.dtype | None,
               channels_last: bool = False
               ) -> Callable[[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, ...]]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    first = model.inc.double_conv[0]

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        x, target = batch
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        grad = first.weight.grad.detach().clone()
        optimizer.step()
        return loss.detach(), grad
    return step


def _variants(settings: RunSettings, op: str) -> tuple[list[str], list[dict[str, Any]]]:
    selection = select_backends(settings, op)
    baseline = baseline_name(settings.device)
    variants = [baseline, CHANNELS_LAST, *selection.fused] + (
        [COMPILE] if selection.compile else [])
    skipped = [{"variant": name, "reason": reason} for name, reason in selection.skipped]
    return variants, skipped


def _finish(settings: RunSettings, suite_settings: dict[str, Any], prefix: str,
            calls: dict[str, Callable[[Any], Any]], inputs: list[Any],
            errors: Callable[[Any, Any], dict[str, float]], images: int,
            skipped: list[dict[str, Any]], began: float, log: Callable[[str], None]
            ) -> dict[str, Any]:
    """The first call of every variant on the same inputs (errors against the baseline's),
    compile times, then the interleaved timing; the suite block."""
    baseline = baseline_name(settings.device)
    first: dict[str, Any] = {}
    extra: dict[str, dict[str, Any]] = {}
    for variant in list(calls):
        if variant == COMPILE and settings.past_deadline():
            skipped.append({"variant": variant, "reason": TIME_LIMIT_REASON})
            del calls[variant]
            continue
        try:
            started = time.perf_counter()
            first[variant] = calls[variant](inputs[0])
            if settings.device.type == "cuda":
                torch.cuda.synchronize(settings.device)
            extra[variant] = ({"compile_s": time.perf_counter() - started}
                              if variant == COMPILE else {})
        except RunInterrupted:
            raise
        except Exception as error:  # one failing variant must not lose the others
            if variant == baseline:
                raise
            skipped.append({"variant": variant, "reason": _short_error(error)})
            del calls[variant]
    for variant in calls:
        extra[variant].update(errors(first[variant], first[baseline]))
    interrupted = None
    try:
        samples = time_interleaved(calls, inputs, device=settings.device,
                                   warmup=settings.warmup, repeats=settings.repeats)
    except RunInterrupted as stop:
        interrupted = f"{stop}; the suite's timing was not finished"
        samples = {}
    cases = []
    for variant, times in samples.items():
        stats = summarize(times)
        count = images * 1e3
        cases.append({"key": f"{prefix}/{variant}", "variant": variant, "samples_ms": times,
                      **stats.as_dict(), "images_per_s": count / stats.median,
                      "images_per_s_low": count / stats.p80,
                      "images_per_s_high": count / stats.p20, **extra[variant]})
        log(f"  {variant}: {stats.median:.1f} ms, {count / stats.median:.1f} img/s")
    speedups = baseline_speedups(cases, baseline)
    return {"settings": suite_settings, "wall_s": time.perf_counter() - began, "cases": cases,
            "skipped": skipped, "summary": {"baseline": baseline, "speedup": speedups},
            "interrupted": interrupted}


def run_lpips(settings: RunSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the ``lpips`` suite; returns its result block (see vgg_kernels/bench/results.py)."""
    began = time.perf_counter()
    device, dtype = settings.device, settings.dtype
    variants, skipped = _variants(settings, "conv_bn_relu_infer")
    eager = _lpips_model(device, dtype)
    suite_settings = {**settings.as_dict(), "config": "vgg", "variants": variants,
                      "call": LPIPS_CALL, "model": "lpips.LPIPS(net='vgg')"}
    prefix = clients_prefix("lpips", suite_settings)
    shape = (settings.batch, 3, settings.resolution, settings.resolution)
    element = torch.empty((), dtype=dtype).element_size()
    count = rotating_input_count(2 * settings.batch * 3 * settings.resolution ** 2 * element,
                                 device)
    inputs = [tuple(torch.rand(shape, device=device, dtype=dtype) * 2 - 1 for _ in range(2))
              for _ in range(count)]
    calls: dict[str, Callable[[Any], Any]] = {}
    for variant in variants:
        if variant == variants[0]:
            calls[variant] = _lpips_call(eager)
        elif variant == CHANNELS_LAST:
            calls[variant] = _lpips_call(copy.deepcopy(eager).to(
                memory_format=torch.channels_last), channels_last=True)
        elif variant == COMPILE:
            torch._dynamo.reset()
            calls[variant] = _lpips_call(torch.compile(
                copy.deepcopy(eager), mode=settings.resolved_compile_mode()))
        else:
            calls[variant] = _lpips_call(fuse(copy.deepcopy(eager), backend=variant))

    def errors(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
        return {"rel_error_vs_baseline": _relative_error(got, want)}

    return _finish(settings, suite_settings, prefix, calls, inputs, errors, settings.batch,
                   skipped, began, log)


def run_unet(settings: RunSettings, width: int, log: Callable[[str], None] = print
             ) -> dict[str, Any]:
    """Run the ``unet`` suite; returns its result block."""
    began = time.perf_counter()
    device, dtype = settings.device, settings.dtype
    amp = None if dtype == torch.float32 else dtype
    variants, skipped = _variants(settings, "conv_bn_relu_train")
    torch.manual_seed(0)
    eager = UNet(3, UNET_CLASSES, width=width).to(device).train()
    suite_settings = {**settings.as_dict(), "config": f"unet-w{width}", "width": width,
                      "variants": variants, "call": UNET_CALL,
                      "precision": "fp32" if amp is None else
                      f"autocast {settings.dtype_name}, fp32 parameters"}
    prefix = clients_prefix("unet", suite_settings)
    shape = (settings.batch, 3, settings.resolution, settings.resolution)
    count = rotating_input_count(settings.batch * 3 * settings.resolution ** 2 * 4, device)
    inputs = [(torch.randn(shape, device=device),
               torch.randint(0, UNET_CLASSES, (settings.batch, *shape[2:]), device=device))
              for _ in range(count)]
    calls: dict[str, Callable[[Any], Any]] = {}
    for variant in variants:
        model = copy.deepcopy(eager)
        if variant == variants[0]:
            calls[variant] = _unet_step(model, device, amp)
        elif variant == CHANNELS_LAST:
            calls[variant] = _unet_step(model.to(memory_format=torch.channels_last), device,
                                        amp, channels_last=True)
        elif variant == COMPILE:
            torch._dynamo.reset()
            calls[variant] = _unet_step(
                torch.compile(model, mode=settings.resolved_compile_mode()), device, amp)
        else:
            calls[variant] = _unet_step(fuse(model, backend=variant), device, amp)

    def errors(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]
               ) -> dict[str, float]:
        return {"rel_error_vs_baseline": _relative_error(got[1], want[1]),
                "loss_rel_error_vs_baseline": _relative_error(got[0], want[0])}

    return _finish(settings, suite_settings, prefix, calls, inputs, errors, settings.batch,
                   skipped, began, log)


def format_clients(suite: dict[str, Any]) -> str:
    """The terminal table of an ``lpips`` or ``unet`` block: one row per variant."""
    s = suite["settings"]
    rows = []
    for case in suite["cases"]:
        speedup = ("-" if "speedup" not in case else
                   f"{case['speedup']:.2f}x [{case['speedup_low']:.2f}, "
                   f"{case['speedup_high']:.2f}]")
        rows.append([case["variant"], f"{case['median_ms']:.1f}",
                     f"{case['images_per_s']:.1f}", speedup,
                     f"{case.get('rel_error_vs_baseline', float('nan')):.1e}"])
    title = (f"{s.get('model', s['config'])}: {s['call']}; batch {s['batch']}, "
             f"{s['resolution']}px, {s.get('precision', s['dtype'])}")
    table = format_table(["variant", "ms", "img/s", "speedup [p20..p80]",
                          "grad rel err vs eager"], rows)
    notes = [f"skipped {item['variant']}: {item['reason']}" for item in suite["skipped"]]
    return "\n".join([title, table, *notes])
