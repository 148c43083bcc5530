"""The ``layers`` suite: every fused block of a VGG config, each backend against eager and compile.

A block is exactly what ``FusedVGG`` builds: conv (3x3 pad 1, or 1x1) + BatchNorm (eval, folded
into a scale and shift) + ReLU, with the following 2x2 max-pool fused when one follows in the
config. Each block is timed for every selected fused backend through
``vgg_kernels.ops.conv_bn_relu_infer``, for the eager modules (the baseline) and for
``torch.compile`` of those modules (compiled once per block).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vgg_kernels import ops
from vgg_kernels.bench.results import layers_prefix
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
    time_calls,
    time_first_call,
)
from vgg_kernels.layers import Run, find_runs
from vgg_kernels.models.vgg import FusedVGG, parse_config


@dataclass(frozen=True)
class LayerSpec:
    """One fused block: input (N, in_channels, height, width) -> output (N, out_channels, H', W')
    with H' = height // 2 when ``pool`` else height."""

    name: str
    index: int
    in_channels: int
    out_channels: int
    kernel: int
    height: int
    width: int
    pool: bool
    batch_norm: bool

    def flops(self, batch: int) -> float:
        """2 * N * H * W * K * C * R * S (the conv's multiply-adds, counted twice)."""
        return (2.0 * batch * self.height * self.width * self.out_channels * self.in_channels
                * self.kernel * self.kernel)

    def min_bytes(self, batch: int, element_size: int) -> float:
        """The fewest bytes a fused kernel moves: input, weights and output once each."""
        out_h, out_w = ((self.height // 2, self.width // 2) if self.pool
                        else (self.height, self.width))
        elements = (batch * self.in_channels * self.height * self.width
                    + self.out_channels * self.in_channels * self.kernel * self.kernel
                    + batch * self.out_channels * out_h * out_w)
        return float(elements * element_size)


def layer_specs(config: str, resolution: int) -> list[LayerSpec]:
    """The fused blocks of ``FusedVGG(config)`` for a ``resolution`` x ``resolution`` input,
    named conv<stage>_<i> (a stage ends at each max-pool)."""
    letter, batch_norm = parse_config(config)
    with torch.device("meta"):  # the real model's block list, without allocating its weights
        model = FusedVGG(config, init_weights=False)
    specs: list[LayerSpec] = []
    size, stage, within = resolution, 1, 0
    modules = list(model.features)
    for step in find_runs(modules):
        if isinstance(step, Run):
            within += 1
            conv = step.conv
            specs.append(LayerSpec(f"conv{stage}_{within}", len(specs), conv.in_channels,
                                   conv.out_channels, conv.kernel_size[0], size, size,
                                   step.pool is not None, batch_norm))
            if step.pool is not None:
                size, stage, within = size // 2, stage + 1, 0
        elif isinstance(modules[step], nn.MaxPool2d):
            size, stage, within = size // 2, stage + 1, 0
    if size < 1:
        raise ValueError(f"resolution must be at least {2 ** (stage - 1)} for config {letter!r} "
                         f"(got {resolution})")
    return specs


def build_eager_block(spec: LayerSpec, device: torch.device, dtype: torch.dtype) -> nn.Sequential:
    """Conv2d + BatchNorm2d (eval, random statistics) + ReLU (+ MaxPool2d(2)), channels_last."""
    conv = nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel, padding=spec.kernel // 2)
    modules: list[nn.Module] = [conv]
    if spec.batch_norm:
        bn = nn.BatchNorm2d(spec.out_channels)
        assert bn.running_mean is not None and bn.running_var is not None
        with torch.no_grad():  # non-trivial statistics so the folded scale/shift are exercised
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.1, 0.1)
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
        modules.append(bn)
    modules.append(nn.ReLU(inplace=True))
    if spec.pool:
        modules.append(nn.MaxPool2d(2))
    block = nn.Sequential(*modules).eval()
    block.requires_grad_(False)
    return block.to(device=device, dtype=dtype).to(memory_format=torch.channels_last)


def folded_parameters(block: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, scale, shift) of an eager block for ``ops.conv_bn_relu_infer``."""
    conv = block[0]
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"block must start with an nn.Conv2d (got {type(conv).__name__})")
    bn = block[1] if isinstance(block[1], nn.BatchNorm2d) else None
    scale, shift = ops.fold_bn(
        conv.bias, None if bn is None else bn.running_mean, None if bn is None else bn.running_var,
        None if bn is None else bn.weight, None if bn is None else bn.bias,
        1e-5 if bn is None else bn.eps, conv.out_channels, conv.weight.device)
    return conv.weight, scale, shift


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected64 = expected.double()
    scale = expected64.abs().max().clamp_min(1e-30)
    return float((actual.double() - expected64).abs().max() / scale)


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _short_error(error: Exception) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= 300 else text[:297] + "..."


def _triton_kernel_config() -> dict[str, Any] | None:
    """The config the Triton autotuner chose for the last launch, with a short label."""
    try:
        from vgg_kernels.backends.triton import conv_bn_relu
    except Exception:  # no usable triton: nothing to record
        return None
    config = conv_bn_relu.last_tuned_config()
    if config is None:
        return None
    return {"label": conv_bn_relu.describe_config(config), **config}


def _native_kernel() -> str | None:
    """The CUDA kernel the native backend's last inference call ran (its choice under
    VGG_KERNELS_NATIVE_WGMMA=auto)."""
    from vgg_kernels.backends import native
    return native.cuda_last_infer_kernel() or None


def _make_case(prefix: str, spec: LayerSpec, backend: str, samples: list[float], flops: float,
               peak_tflops: float, rotating: int, extra: dict[str, Any]) -> dict[str, Any]:
    stats = summarize(samples)
    tflops = flops / (stats.median * 1e-3) / 1e12
    return {"key": f"{prefix}/{spec.name}/{backend}", "layer": spec.name, "backend": backend,
            "samples_ms": samples, **stats.as_dict(), "tflops": tflops,
            "pct_of_peak": 100.0 * tflops / peak_tflops, "rotating_inputs": rotating, **extra}


def _run_layer(spec: LayerSpec, settings: RunSettings, fused: list[str], compile_block: bool,
               prefix: str, peak_tflops: float) -> tuple[list[dict[str, Any]], list[dict]]:
    """Time one block for the baseline, every fused backend and compile; (cases, skipped)."""
    device, dtype = settings.device, settings.dtype
    flops = spec.flops(settings.batch)
    block = build_eager_block(spec, device, dtype)
    weight, scale, shift = folded_parameters(block)
    element_size = torch.empty((), dtype=dtype).element_size()
    input_bytes = settings.batch * spec.in_channels * spec.height * spec.width * element_size
    count = rotating_input_count(input_bytes, device)
    inputs = [torch.randn(settings.batch, spec.in_channels, spec.height, spec.width,
                          device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
              for _ in range(count)]
    cases: list[dict[str, Any]] = []
    skipped: list[dict] = []
    with torch.no_grad():
        expected = block(inputs[0])
        samples = time_calls(block, inputs, device=device, warmup=settings.warmup,
                             repeats=settings.repeats)
        cases.append(_make_case(prefix, spec, baseline_name(device), samples, flops, peak_tflops,
                                count, {"rel_error_vs_baseline": 0.0}))
        candidates: list[tuple[str, Any]] = [
            (name, functools.partial(ops.conv_bn_relu_infer, weight=weight, scale=scale,
                                     shift=shift, pool=spec.pool, backend=name))
            for name in fused]
        if compile_block and settings.past_deadline():
            skipped.append({"backend": COMPILE, "layer": spec.name, "reason": TIME_LIMIT_REASON})
        elif compile_block:
            torch._dynamo.reset()  # a fresh cache per block: no recompile limit, no reuse
            candidates.append((COMPILE, torch.compile(block,
                                                      mode=settings.resolved_compile_mode())))
        for name, fn in candidates:
            try:
                extra: dict[str, Any] = {}
                if name == COMPILE:
                    extra["compile_s"] = time_first_call(fn, inputs[0], device)
                extra["rel_error_vs_baseline"] = _relative_error(fn(inputs[0]), expected)
                samples = time_calls(fn, inputs, device=device, warmup=settings.warmup,
                                     repeats=settings.repeats)
                if name == "triton" and device.type == "cuda":
                    extra["kernel_config"] = _triton_kernel_config()
                if name == "native" and device.type == "cuda":
                    extra["native_kernel"] = _native_kernel()
            except Exception as error:  # one failing backend must not lose the others
                skipped.append({"backend": name, "layer": spec.name,
                                "reason": _short_error(error)})
                continue
            cases.append(_make_case(prefix, spec, name, samples, flops, peak_tflops, count,
                                    extra))
    set_speedups(cases)
    return cases, skipped


def set_speedups(cases: list[dict[str, Any]], base: dict[str, Any] | None = None) -> None:
    """Each case's speedup (median, and the spread's low and high ends) over ``base``, by
    default the first case."""
    base = cases[0] if base is None else base
    for case in cases:
        case["speedup"] = base["median_ms"] / case["median_ms"]
        case["speedup_low"] = base["p20_ms"] / case["p80_ms"]
        case["speedup_high"] = base["p80_ms"] / case["p20_ms"]


def baseline_speedups(cases: list[dict[str, Any]], baseline: str
                      ) -> dict[str, dict[str, float]]:
    """``set_speedups`` over the case of variant ``baseline``; the summary, variant ->
    {value, low, high} (empty when the baseline did not run)."""
    base = next((case for case in cases if case["variant"] == baseline), None)
    if base is None:
        return {}
    set_speedups(cases, base)
    return {case["variant"]: {"value": case["speedup"], "low": case["speedup_low"],
                              "high": case["speedup_high"]} for case in cases}


def run_layers(settings: RunSettings, peak: dict[str, Any],
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the suite; returns the ``suites.layers`` block (see vgg_kernels/bench/results.py)."""
    began = time.perf_counter()
    selection = select_backends(settings)
    specs = layer_specs(settings.config, settings.resolution)
    if settings.layers:
        specs = [spec for spec in specs if spec.name in settings.layers]
    suite_settings = settings.as_dict()
    return run_layer_suite(settings, peak, log, began=began, selection=selection, specs=specs,
                           suite_settings=suite_settings, prefix=layers_prefix(suite_settings),
                           run_layer=_run_layer)


def run_layer_suite(settings: RunSettings, peak: dict[str, Any], log: Callable[[str], None], *,
                    began: float, selection, specs: list[LayerSpec],
                    suite_settings: dict[str, Any], prefix: str, run_layer: Callable,
                    work_factor: int = 1) -> dict[str, Any]:
    """The per-block loop of the ``layers`` suites: ``run_layer`` times each block (inference,
    or training with ``work_factor`` 3: forward + backward's FLOPs and bytes), stopping at an
    interruption; returns the suite block with the per-backend geometric means."""
    element_size = torch.empty((), dtype=settings.dtype).element_size()
    cases: list[dict[str, Any]] = []
    skipped: list[dict] = [{"backend": name, "layer": None, "reason": reason}
                           for name, reason in selection.skipped]
    layers = []
    interrupted = None
    for spec in specs:
        try:
            mine, failed = run_layer(spec, settings, selection.fused, selection.compile, prefix,
                                     peak["matmul"]["tflops"])
        except RunInterrupted as stop:
            interrupted = f"{stop}; {spec.name} and later layers were not measured"
            skipped.append({"backend": "*", "layer": spec.name, "reason": interrupted})
            break
        flops = work_factor * spec.flops(settings.batch)
        nbytes = work_factor * spec.min_bytes(settings.batch, element_size)
        layers.append({"name": spec.name, "index": spec.index, "in_channels": spec.in_channels,
                       "out_channels": spec.out_channels, "kernel": spec.kernel,
                       "height": spec.height, "width": spec.width, "pool": spec.pool,
                       "flops": flops, "bytes": nbytes, "intensity": flops / nbytes})
        cases += mine
        skipped += failed
        log(f"  {spec.name}: " + ", ".join(f"{c['backend']} {c['median_ms']:.3f} ms"
                                           for c in mine))
    geomean: dict[str, dict[str, float]] = {}
    for backend in dict.fromkeys(c["backend"] for c in cases):
        same = [c for c in cases if c["backend"] == backend]
        geomean[backend] = {
            "value": _geomean([c["speedup"] for c in same]),
            "low": _geomean([c["speedup_low"] for c in same]),
            "high": _geomean([c["speedup_high"] for c in same]),
            "layers": len(same),
        }
    return {
        "settings": suite_settings,
        "wall_s": time.perf_counter() - began,
        "layers": layers,
        "cases": cases,
        "skipped": skipped,
        "summary": {"baseline": baseline_name(settings.device), "geomean_speedup": geomean},
        "interrupted": interrupted,
    }


def format_layers(suite: dict[str, Any]) -> str:
    """The terminal table: one row per layer, ``ms (speedup x)`` per backend."""
    backends = list(suite["summary"]["geomean_speedup"])
    by_key = {(c["layer"], c["backend"]): c for c in suite["cases"]}
    rows: list[list[object]] = []
    for layer in suite["layers"]:
        shape = (f"{layer['in_channels']}->{layer['out_channels']} {layer['kernel']}x"
                 f"{layer['kernel']} @{layer['height']}{' +pool' if layer['pool'] else ''}")
        row: list[object] = [layer["name"], shape]
        for backend in backends:
            case = by_key.get((layer["name"], backend))
            row.append("-" if case is None else
                       f"{case['median_ms']:.3f} ({case['speedup']:.2f}x, "
                       f"{case['pct_of_peak']:.0f}%)")
        rows.append(row)
    rows.append(["geomean", "speedup", *(f"{g['value']:.2f}x [{g['low']:.2f}, {g['high']:.2f}]"
                                         for g in suite["summary"]["geomean_speedup"].values())])
    table = format_table(["layer", "shape", *(f"{b} ms (x, %peak)" for b in backends)], rows)
    notes = [f"skipped {s['backend']}" + (f" on {s['layer']}" if s["layer"] else "")
             + f": {s['reason']}" for s in suite["skipped"]]
    chosen = [f"{c['layer']} {c['kernel_config']['label']}" for c in suite["cases"]
              if c.get("kernel_config")]
    if chosen:
        notes.append("triton configs: " + ", ".join(chosen))
    return "\n".join([table, *notes])
