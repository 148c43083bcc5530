"""The performance bars the GPU kernels are held to, evaluated on benchmark result files.

Per block (``layers`` suites: VGG D, batch 64, 224px, bf16, against cuDNN eager conv + BN + ReLU
(+ pool) in the same run):

- the Triton backend's geometric-mean speedup is at least 1.5x;
- every Triton block with at least 64 input channels runs at 60% or more of the bf16 matmul
  peak measured in the same run;
- the native backend's geometric-mean speedup is at least 1.2x (one bar per layers suite that
  timed it, named by the kernel switches it ran under).

Whole model (``model`` suite, eval-mode forward): Triton at least 1.5x the eager model and at
least 1.15x ``torch.compile(mode="max-autotune-no-cudagraphs")``.

``python -m vgg_kernels.bench bars FILE...`` prints one line per bar that the files can
evaluate, with the measured value, the target and, where it is missed, by how much (for the
blocks below the peak bar, also their roofline floor and whether FLOPs or bytes set it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

TRITON_GEOMEAN = 1.5
TRITON_PEAK_PERCENT = 60.0
TRITON_PEAK_MIN_CHANNELS = 64
NATIVE_GEOMEAN = 1.2
MODEL_VS_EAGER = 1.5
MODEL_VS_COMPILE = 1.15
MODEL_COMPILE_MODE = "max-autotune-no-cudagraphs"
BASELINE = "cudnn_eager"


@dataclass
class Bar:
    name: str
    value: float
    target: float
    unit: str  # "x" (a ratio) or "%"
    detail: str = ""

    @property
    def met(self) -> bool:
        return self.value >= self.target

    def line(self) -> str:
        value = f"{self.value:.2f}{self.unit}" if self.unit == "x" else f"{self.value:.0f}%"
        target = f"{self.target:.2f}x" if self.unit == "x" else f"{self.target:.0f}%"
        verdict = "met" if self.met else (
            f"missed by {self.target / self.value:.2f}x" if self.value > 0 else "missed")
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.name}: {value} against {target}: {verdict}{detail}"


def _switches(result: dict[str, Any]) -> str:
    switches = result.get("environment", {}).get("switches") or {}
    return ", ".join(f"{name}={value}" for name, value in sorted(switches.items()))


def _floor(layer: dict[str, Any], peak: dict[str, Any]) -> str:
    """The block's roofline floor with the peaks measured in the same run: its FLOPs at the
    matmul peak or its fewest bytes (input, weights and output once) at the copy bandwidth,
    whichever takes longer."""
    try:
        compute = layer["flops"] / (peak["matmul"]["tflops"] * 1e12) * 1e3
        memory = layer["bytes"] / (peak["bandwidth"]["gbps"] * 1e9) * 1e3
    except (KeyError, TypeError, ZeroDivisionError):
        return ""
    bound = "FLOP" if compute >= memory else "byte"
    return f"; floor {max(compute, memory):.3f} ms, {bound}-bound"


def _layer_bars(suite: dict[str, Any], peak: dict[str, Any], label: str) -> list[Bar]:
    base = {case["layer"]: case["median_ms"] for case in suite["cases"]
            if case["backend"] == BASELINE}
    layers = {layer["name"]: layer for layer in suite.get("layers", [])}
    channels = {name: layer["in_channels"] for name, layer in layers.items()}
    bars = []
    for backend, target in (("triton", TRITON_GEOMEAN), ("native", NATIVE_GEOMEAN)):
        cases = [case for case in suite["cases"]
                 if case["backend"] == backend and case["layer"] in base]
        if not cases:
            continue
        speedups = [base[case["layer"]] / case["median_ms"] for case in cases]
        geomean = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        slowest = min(cases, key=lambda case: base[case["layer"]] / case["median_ms"])
        bars.append(Bar(f"{backend} per-block geomean over cuDNN eager{label}", geomean, target,
                        "x", f"{len(cases)} blocks; lowest {slowest['layer']} "
                             f"{base[slowest['layer']] / slowest['median_ms']:.2f}x"))
        if backend != "triton":
            continue
        wide = [case for case in cases
                if channels.get(case["layer"], 0) >= TRITON_PEAK_MIN_CHANNELS]
        if wide:
            below = [f"{case['layer']} {case['pct_of_peak']:.0f}% ({case['median_ms']:.3f} ms"
                     f"{_floor(layers.get(case['layer'], {}), peak)})" for case in wide
                     if case["pct_of_peak"] < TRITON_PEAK_PERCENT]
            lowest = min(case["pct_of_peak"] for case in wide)
            bars.append(Bar(f"triton blocks with C >= {TRITON_PEAK_MIN_CHANNELS}, lowest % of "
                            f"the bf16 peak{label}", lowest, TRITON_PEAK_PERCENT, "%",
                            "below: " + ", ".join(below) if below else
                            f"all {len(wide)} blocks"))
    return bars


def _model_bars(suite: dict[str, Any], label: str) -> list[Bar]:
    inference = {case["variant"]: case["images_per_s"] for case in suite["cases"]
                 if case.get("mode") == "inference"}
    if "triton" not in inference:
        return []
    bars = []
    if BASELINE in inference:
        bars.append(Bar(f"triton model inference over eager{label}",
                        inference["triton"] / inference[BASELINE], MODEL_VS_EAGER, "x",
                        f"{inference['triton']:.0f} against {inference[BASELINE]:.0f} img/s"))
    mode = suite.get("settings", {}).get("compile_mode")
    if "torch_compile" in inference and mode == MODEL_COMPILE_MODE:
        bars.append(Bar(f"triton model inference over torch.compile ({mode}){label}",
                        inference["triton"] / inference["torch_compile"], MODEL_VS_COMPILE, "x",
                        f"{inference['triton']:.0f} against {inference['torch_compile']:.0f} "
                        f"img/s"))
    return bars


def evaluate_bars(named_results: list[tuple[str, dict[str, Any]]]) -> list[Bar]:
    """Every bar the (file name, result) pairs can evaluate, in file order."""
    bars: list[Bar] = []
    for _, result in named_results:  # (the names are for the caller's messages)
        switches = _switches(result)
        label = f" [{switches}]" if switches else ""
        suites = result.get("suites", {})
        if "layers" in suites:
            bars += _layer_bars(suites["layers"], result.get("peak", {}), label)
        if "model" in suites:
            bars += _model_bars(suites["model"], label)
    return bars


def format_bars(bars: list[Bar]) -> str:
    if not bars:
        return "no bar can be evaluated from these files (no layers or model suite on cuDNN)"
    return "\n".join(bar.line() for bar in bars)
