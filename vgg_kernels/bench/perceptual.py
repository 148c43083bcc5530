"""The ``perceptual`` suite: a perceptual loss's forward to the deepest tap and backward to the
input, through a frozen VGG (default VGG16 without BN, taps relu1_2, relu2_2, relu3_3, relu4_3).

The loss is ``sum over taps of mean((features(x)[tap] - target[tap]) ** 2)`` with the target
features computed once, without gradients, from a fixed random image by the eager model; the
input requires a gradient, the weights do not. One timed call is the forward, the loss and
``torch.autograd.grad(loss, x)``. Variants, all on one set of weights in the run's dtype:

- each selected fused backend: ``vgg_kernels.VGGFeatures`` (its frozen fused path computes only
  the input gradient);
- the eager model's features (``make_eager_vgg(config).features`` cut after the deepest tap,
  channels_last, parameters frozen; the baseline, ``cudnn_eager`` on CUDA, ``torch_eager`` on a
  CPU);
- ``torch.compile`` of the eager loss function (forward and backward).

Figures per variant: ms (median, p20, p80), images/s, speedup over the eager model (spread-aware
low/high as in the other suites), TFLOP/s with FLOPs = 2x the forward convs' (forward and input
gradient; no weight gradient), and the relative error of the input gradient against the eager
one (max |difference| / max |eager|, and the mean |difference| / max |eager|: in fp32 the max
is set by the few elements whose ReLU mask or pool choice rounding flipped).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vgg_kernels.bench.layers import _relative_error, _short_error, baseline_speedups
from vgg_kernels.bench.results import perceptual_prefix
from vgg_kernels.bench.settings import (
    COMPILE,
    TIME_LIMIT_REASON,
    RunInterrupted,
    RunSettings,
    baseline_name,
    select_backends,
)
from vgg_kernels.bench.table import format_table
from vgg_kernels.bench.timing import (
    rotating_input_count,
    summarize,
    synchronize,
    time_calls,
    time_first_call,
)
from vgg_kernels.models import VGGFeatures, layer_names, make_eager_vgg
from vgg_kernels.models.vgg import parse_config

DEFAULT_CONFIG = "vgg16"
DEFAULT_TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")
LOSS = "sum over taps of mean((features[tap] - target[tap]) ** 2), target features fixed"
FLOPS_NOTE = "2x the forward convs' FLOPs up to the deepest tap (forward and input gradient)"


def tap_indices(config: str, taps: Sequence[str]) -> list[int]:
    """torchvision ``features`` index of each tap; ``ValueError`` naming a tap that is not a
    layer of ``config`` (the names of ``vgg_kernels.models.layer_names``)."""
    letter, batch_norm = parse_config(config)
    names = layer_names(letter, batch_norm)
    unknown = [tap for tap in taps if tap not in names]
    if unknown or not taps:
        raise ValueError(f"--taps must name layers of {config} ({', '.join(names)}); got "
                         f"{', '.join(taps) or 'none'}")
    if len(set(taps)) != len(taps):
        raise ValueError(f"--taps must be distinct (got {', '.join(taps)})")
    return [names.index(tap) for tap in taps]


def eager_features(config: str, depth: int, device: torch.device,
                   dtype: torch.dtype) -> nn.Sequential:
    """``make_eager_vgg(config).features[:depth]`` (torchvision's indices), with torchvision's
    conv initialisation (Kaiming normal, fan_out), biases in [-0.1, 0.1] and, with BN, random
    statistics; frozen, eval mode, channels_last, in ``dtype``. The classifier is never
    allocated (the model is built on the meta device)."""
    with torch.device("meta"):
        model = make_eager_vgg(config, init_weights=False)
    features = model.features[:depth].to_empty(device=device)
    with torch.no_grad():
        for module in features.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                assert module.bias is not None
                module.bias.uniform_(-0.1, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.zero_()
    features.requires_grad_(False)
    features.eval()
    return features.to(dtype=dtype).to(memory_format=torch.channels_last)


def _eager_taps(features: nn.Sequential, positions: dict[int, str]
                ) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    modules = list(features)

    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        tapped: dict[str, torch.Tensor] = {}
        for i, module in enumerate(modules):
            x = module(x)
            if i in positions:  # a map the next module would change in place is copied
                following = modules[i + 1] if i + 1 < len(modules) else None
                tapped[positions[i]] = x.clone() if getattr(following, "inplace", False) else x
        return tapped
    return run


def _loss(features: Callable[[torch.Tensor], dict[str, torch.Tensor]],
          targets: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def loss(x: torch.Tensor) -> torch.Tensor:
        mapped = features(x)
        return sum(F.mse_loss(mapped[tap], target) for tap, target in targets.items())
    return loss


def _input_gradient(loss: Callable[[torch.Tensor], torch.Tensor]
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    def call(x: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(loss(x), x)[0]
    return call


def _mean_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """mean |difference| / max |expected|: next to the max, it tells a few elements off (a ReLU
    mask or pool choice flipped by rounding, which moves a whole gradient element) from a
    gradient off everywhere."""
    expected64 = expected.double()
    scale = expected64.abs().max().clamp_min(1e-30)
    return float((actual.double() - expected64).abs().mean() / scale)


def forward_flops(features: nn.Sequential, batch: int, resolution: int) -> float:
    """2 * N * H * W * K * C * R * S summed over the convs of ``features``."""
    size, total = resolution, 0.0
    for module in features:
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0]
            total += 2.0 * batch * size * size * module.out_channels * module.in_channels * k * k
        elif isinstance(module, nn.MaxPool2d):
            size //= 2
    return total


def run_perceptual(settings: RunSettings, peak: dict[str, Any],
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the suite; returns the ``suites.perceptual`` block (see vgg_kernels/bench/results.py)."""
    began = time.perf_counter()
    device, dtype = settings.device, settings.dtype
    taps = list(settings.taps or DEFAULT_TAPS)
    indices = tap_indices(settings.config, taps)
    positions = dict(zip(indices, taps, strict=True))
    selection = select_backends(settings)
    baseline = baseline_name(device)
    variants = [baseline, *selection.fused] + ([COMPILE] if selection.compile else [])
    features = eager_features(settings.config, max(indices) + 1, device, dtype)
    state = {f"features.{key}": value for key, value in features.state_dict().items()}
    flops = 2.0 * forward_flops(features, settings.batch, settings.resolution)
    suite_settings = {**settings.as_dict(), "taps": taps, "variants": variants, "loss": LOSS,
                      "flops": FLOPS_NOTE, "flops_per_call": flops}
    prefix = perceptual_prefix(suite_settings)
    skipped: list[dict[str, Any]] = [{"variant": name, "reason": reason}
                                     for name, reason in selection.skipped]
    shape = (settings.batch, 3, settings.resolution, settings.resolution)
    element_size = torch.empty((), dtype=dtype).element_size()
    count = rotating_input_count(settings.batch * 3 * settings.resolution ** 2 * element_size,
                                 device)
    inputs = [torch.randn(shape, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_() for _ in range(count)]
    eager_taps = _eager_taps(features, positions)
    with torch.no_grad():
        target_image = torch.randn(shape, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        targets = {tap: value.detach().clone() for tap, value in eager_taps(target_image).items()}
    cases: list[dict[str, Any]] = []
    expected: torch.Tensor | None = None
    interrupted = None
    for variant in variants:
        if variant == COMPILE and settings.past_deadline():
            skipped.append({"variant": variant, "reason": TIME_LIMIT_REASON})
            continue
        try:
            extra: dict[str, Any] = {}
            if variant == baseline:
                fn = _input_gradient(_loss(eager_taps, targets))
            elif variant == COMPILE:
                torch._dynamo.reset()
                compiled = torch.compile(_loss(eager_taps, targets),
                                         mode=settings.resolved_compile_mode())
                fn = _input_gradient(compiled)
                extra["compile_s"] = time_first_call(fn, inputs[0], device)
            else:
                model = VGGFeatures(settings.config, taps=taps, backend=variant)
                model = model.to(device=device, dtype=dtype)
                model.load_state_dict(state, strict=True)
                fn = _input_gradient(_loss(model, targets))
            grad = fn(inputs[0])
            if expected is None:
                expected = grad.detach().clone()
            extra["rel_error_vs_baseline"] = _relative_error(grad, expected)
            extra["mean_rel_error_vs_baseline"] = _mean_relative_error(grad, expected)
            samples = time_calls(fn, inputs, device=device, warmup=settings.warmup,
                                 repeats=settings.repeats)
        except RunInterrupted as stop:
            interrupted = f"{stop}; {variant} and later variants were not measured"
            skipped.append({"variant": variant, "reason": interrupted})
            break
        except Exception as error:  # one failing variant must not lose the others
            if variant == baseline:
                raise
            skipped.append({"variant": variant, "reason": _short_error(error)})
            continue
        stats = summarize(samples)
        images = settings.batch * 1e3
        cases.append({"key": f"{prefix}/{variant}", "variant": variant, "samples_ms": samples,
                      **stats.as_dict(), "images_per_s": images / stats.median,
                      "images_per_s_low": images / stats.p80,
                      "images_per_s_high": images / stats.p20,
                      "tflops": flops / (stats.median * 1e-3) / 1e12,
                      "rotating_inputs": count, **extra})
        log(f"  {variant}: {stats.median:.3f} ms, {images / stats.median:.1f} img/s")
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    speedups = baseline_speedups(cases, baseline)
    return {"settings": suite_settings, "wall_s": time.perf_counter() - began, "cases": cases,
            "skipped": skipped, "summary": {"baseline": baseline, "speedup": speedups},
            "interrupted": interrupted}


def format_perceptual(suite: dict[str, Any]) -> str:
    """The terminal table: one row per variant."""
    s = suite["settings"]
    rows = []
    for case in suite["cases"]:
        speedup = ("-" if "speedup" not in case else
                   f"{case['speedup']:.2f}x [{case['speedup_low']:.2f}, "
                   f"{case['speedup_high']:.2f}]")
        rows.append([case["variant"], f"{case['median_ms']:.3f}",
                     f"{case['images_per_s']:.1f}", speedup, f"{case['tflops']:.3f}",
                     f"{case['rel_error_vs_baseline']:.1e} / "
                     f"{case.get('mean_rel_error_vs_baseline', float('nan')):.1e}"])
    title = (f"perceptual loss: VGG {s['config']} to {s['taps'][-1]} (taps "
             f"{', '.join(s['taps'])}), forward + input gradient, batch {s['batch']}, "
             f"{s['resolution']}px, {s['dtype']}")
    table = format_table(["variant", "ms", "img/s", "speedup [p20..p80]", "TFLOP/s",
                          "grad x rel err max / mean"], rows)
    notes = [f"skipped {s['variant']}: {s['reason']}" for s in suite["skipped"]]
    return "\n".join([title, table, *notes])
