"""The performance bars the kernels are held to, evaluated on benchmark result files.

Per block (``layers`` suites: VGG D, batch 64, 224px, bf16, against cuDNN eager conv + BN + ReLU
(+ pool) in the same run):

- the Triton backend's geometric-mean speedup is at least 1.5x;
- every Triton block with at least 64 input channels runs at 60% or more of the bf16 matmul
  peak measured in the same run;
- the native backend's geometric-mean speedup is at least 1.2x (one bar per layers suite that
  timed it, named by the kernel switches it ran under).

Per block in training (``layers_train`` suites, forward + backward against the cuDNN eager
modules in train mode): no block of a fused backend (triton, native) slower than eager; the bar's
value is the slowest block's speedup.

Whole model (``model`` suite): eval-mode forward, Triton at least 1.5x the eager model and at
least 1.15x ``torch.compile(mode="max-autotune-no-cudagraphs")``; the training step (the suite's
``train_amp`` cases, autocast with fp32 parameters as users train, or ``train`` cases of an fp32
run; files whose bf16/fp16 ``train`` cases had the parameters in bf16/fp16 are not evaluated) of
each fused backend at least 1.3x the eager model and at least 1.1x ``torch.compile`` of it (same
mode).

Activation memory (``memory`` suite, CPU or GPU files): the bytes a fused backend's training
forward saves for the backward at most 0.6x the eager model's.

Perceptual loss (``perceptual`` suite: frozen VGG16 forward to relu4_3 + input gradient): on CUDA
each fused backend at least 1.5x the eager model and at least 1.15x ``torch.compile`` of it
(max-autotune-no-cudagraphs); on a CPU at least 1.25x the eager model.

``vgg_kernels.fuse`` on users' models (``lpips`` suite: ``lpips.LPIPS(net='vgg')``, distance +
input gradient; ``unet`` suite: the common UNet's training step), each fused backend against the
same model eager: lpips at least 1.35x on a CPU, and on CUDA at least 1.5x eager and 1.15x
``torch.compile`` (max-autotune-no-cudagraphs); the UNet step at least 1.2x on a CPU.

The training-block, model and compile bars are GPU bars (against cuDNN, ``cudnn_eager``); a CPU
file evaluates only the memory and perceptual bars. The reference backend (the correctness
oracle) is held to no bar.

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
FUSED = ("triton", "native")
TRAIN_BLOCK_VS_EAGER = 1.0
TRAIN_STEP_VS_EAGER = 1.3
TRAIN_STEP_VS_COMPILE = 1.1
MEMORY_VS_EAGER = 0.6
PERCEPTUAL_VS_EAGER = {"cuda": 1.5, "cpu": 1.25}
PERCEPTUAL_VS_COMPILE = 1.15
# suite -> device type -> the speedup over eager each fused backend must reach
CLIENT_VS_EAGER = {"lpips": {"cpu": 1.35, "cuda": 1.5}, "unet": {"cpu": 1.2}}
CLIENT_VS_COMPILE = {"lpips": {"cuda": 1.15}}
CLIENT_WORK = {"lpips": "lpips.LPIPS(net='vgg') distance + input gradient",
               "unet": "UNet training step"}


@dataclass
class Bar:
    name: str
    value: float
    target: float
    unit: str  # "x" (a ratio) or "%"
    detail: str = ""
    better: str = "higher"  # "higher": met at value >= target; "lower": at value <= target

    @property
    def met(self) -> bool:
        return self.value >= self.target if self.better == "higher" else self.value <= self.target

    def line(self) -> str:
        value = f"{self.value:.2f}{self.unit}" if self.unit == "x" else f"{self.value:.0f}%"
        target = f"{self.target:.2f}x" if self.unit == "x" else f"{self.target:.0f}%"
        if self.better == "lower":
            target = f"at most {target}"
        if self.met:
            verdict = "met"
        elif self.better == "lower":
            verdict = (f"missed by {self.value / self.target:.2f}x" if self.target > 0
                       else "missed")
        else:
            verdict = (f"missed by {self.target / self.value:.2f}x" if self.value > 0
                       else "missed")
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


def _train_block_bars(suite: dict[str, Any], label: str) -> list[Bar]:
    """layers_train: per fused backend, the slowest block's speedup over the cuDNN eager
    modules (GPU files only)."""
    if suite.get("summary", {}).get("baseline") != BASELINE:
        return []
    base = {case["layer"]: case["median_ms"] for case in suite["cases"]
            if case["backend"] == BASELINE}
    bars = []
    for backend in FUSED:
        cases = [case for case in suite["cases"]
                 if case["backend"] == backend and case["layer"] in base]
        if not cases:
            continue
        speedups = {case["layer"]: base[case["layer"]] / case["median_ms"] for case in cases}
        slowest = min(speedups, key=lambda layer: speedups[layer])
        geomean = math.exp(sum(math.log(v) for v in speedups.values()) / len(speedups))
        slower = [f"{layer} {value:.2f}x" for layer, value in speedups.items()
                  if value < TRAIN_BLOCK_VS_EAGER]
        bars.append(Bar(f"{backend} training block (forward + backward), slowest over cuDNN "
                        f"eager{label}", speedups[slowest], TRAIN_BLOCK_VS_EAGER, "x",
                        f"{len(cases)} blocks, slowest {slowest}, geomean {geomean:.2f}x"
                        + (f"; slower than eager: {', '.join(slower)}" if slower else "")))
    return bars


def _train_step_cases(suite: dict[str, Any]) -> tuple[str, dict[str, float]] | None:
    """(precision, images/s by variant) of the model suite's mixed-precision (or fp32) training
    step; None for files whose half-precision training kept the parameters in half."""
    settings = suite.get("settings", {})
    mode = settings.get("train_mode", "train")
    if mode == "train" and settings.get("dtype") != "fp32":
        return None
    rates = {case["variant"]: case["images_per_s"] for case in suite["cases"]
             if case.get("mode") == mode}
    return settings.get("train_precision", settings.get("dtype", "?")), rates


def _model_train_bars(suite: dict[str, Any], label: str) -> list[Bar]:
    found = _train_step_cases(suite)
    if found is None or suite.get("settings", {}).get("baseline", BASELINE) != BASELINE:
        return []
    precision, rates = found
    short = precision.split(" (")[0]
    mode = suite.get("settings", {}).get("compile_mode")
    bars = []
    for backend in FUSED:
        if backend not in rates:
            continue
        if BASELINE in rates:
            bars.append(Bar(f"{backend} model training step ({short}) over eager{label}",
                            rates[backend] / rates[BASELINE], TRAIN_STEP_VS_EAGER, "x",
                            f"{rates[backend]:.0f} against {rates[BASELINE]:.0f} img/s"))
        if "torch_compile" in rates and mode == MODEL_COMPILE_MODE:
            bars.append(Bar(f"{backend} model training step ({short}) over torch.compile "
                            f"({mode}){label}", rates[backend] / rates["torch_compile"],
                            TRAIN_STEP_VS_COMPILE, "x",
                            f"{rates[backend]:.0f} against {rates['torch_compile']:.0f} img/s"))
    return bars


def _memory_bars(suite: dict[str, Any], label: str) -> list[Bar]:
    """memory: per fused backend, bytes saved for the backward over eager's (CPU or GPU)."""
    baseline = suite.get("summary", {}).get("baseline")
    cases = {case["variant"]: case for case in suite["cases"]}
    base = cases.get(baseline)
    if base is None or not base["saved_bytes"]:
        return []
    s = suite.get("settings", {})
    bars = []
    for backend in FUSED:
        case = cases.get(backend)
        if case is None:
            continue
        growth = case.get("peak_growth_ratio_to_eager")
        bars.append(Bar(f"{backend} activation memory of a training step over {baseline} "
                        f"(VGG {s.get('config')}, batch {s.get('batch')}, "
                        f"{s.get('resolution')}px, {s.get('dtype')}){label}",
                        case["saved_bytes"] / base["saved_bytes"], MEMORY_VS_EAGER, "x",
                        f"{case['saved_bytes'] / 2**20:.1f} against "
                        f"{base['saved_bytes'] / 2**20:.1f} MiB saved"
                        + (f"; CUDA peak growth {growth:.2f}x" if growth is not None else ""),
                        better="lower"))
    return bars


def _perceptual_bars(suite: dict[str, Any], device_type: str, label: str) -> list[Bar]:
    """perceptual: per fused backend over eager (both devices; the target by device) and over
    torch.compile (max-autotune-no-cudagraphs, CUDA)."""
    target = PERCEPTUAL_VS_EAGER.get(device_type)
    baseline = suite.get("summary", {}).get("baseline")
    rates = {case["variant"]: case["images_per_s"] for case in suite["cases"]}
    if target is None or baseline not in rates:
        return []
    mode = suite.get("settings", {}).get("compile_mode")
    bars = []
    for backend in FUSED:
        if backend not in rates:
            continue
        bars.append(Bar(f"{backend} perceptual loss over {baseline}{label}",
                        rates[backend] / rates[baseline], target, "x",
                        f"{rates[backend]:.1f} against {rates[baseline]:.1f} img/s"))
        if device_type == "cuda" and "torch_compile" in rates and mode == MODEL_COMPILE_MODE:
            bars.append(Bar(f"{backend} perceptual loss over torch.compile ({mode}){label}",
                            rates[backend] / rates["torch_compile"], PERCEPTUAL_VS_COMPILE, "x",
                            f"{rates[backend]:.1f} against {rates['torch_compile']:.1f} img/s"))
    return bars


def _client_bars(name: str, suite: dict[str, Any], device_type: str, label: str) -> list[Bar]:
    """lpips, unet: per fused backend over eager (the target by device type) and, where the
    suite has one, over torch.compile (max-autotune-no-cudagraphs)."""
    target = CLIENT_VS_EAGER[name].get(device_type)
    baseline = suite.get("summary", {}).get("baseline")
    rates = {case["variant"]: case["images_per_s"] for case in suite["cases"]}
    if target is None or baseline not in rates:
        return []
    s = suite.get("settings", {})
    work = (f"{CLIENT_WORK[name]} (batch {s.get('batch')}, {s.get('resolution')}px, "
            f"{s.get('dtype')})")
    compile_target = CLIENT_VS_COMPILE.get(name, {}).get(device_type)
    bars = []
    for backend in FUSED:
        if backend not in rates:
            continue
        bars.append(Bar(f"{backend} fuse(): {work} over {baseline}{label}",
                        rates[backend] / rates[baseline], target, "x",
                        f"{rates[backend]:.1f} against {rates[baseline]:.1f} img/s"))
        if (compile_target is not None and "torch_compile" in rates
                and s.get("compile_mode") == MODEL_COMPILE_MODE):
            bars.append(Bar(f"{backend} fuse(): {work} over torch.compile "
                            f"({MODEL_COMPILE_MODE}){label}",
                            rates[backend] / rates["torch_compile"], compile_target, "x",
                            f"{rates[backend]:.1f} against {rates['torch_compile']:.1f} img/s"))
    return bars


def evaluate_bars(named_results: list[tuple[str, dict[str, Any]]]) -> list[Bar]:
    """Every bar the (file name, result) pairs can evaluate, in file order."""
    bars: list[Bar] = []
    for _, result in named_results:  # (the names are for the caller's messages)
        switches = _switches(result)
        label = f" [{switches}]" if switches else ""
        suites = result.get("suites", {})
        device_type = result.get("environment", {}).get("device_type", "cuda")
        if "layers" in suites:
            bars += _layer_bars(suites["layers"], result.get("peak", {}), label)
        if "layers_train" in suites:
            bars += _train_block_bars(suites["layers_train"], label)
        if "model" in suites:
            bars += _model_bars(suites["model"], label)
            bars += _model_train_bars(suites["model"], label)
        if "perceptual" in suites:
            bars += _perceptual_bars(suites["perceptual"], device_type, label)
        if "memory" in suites:
            bars += _memory_bars(suites["memory"], label)
        for name in ("lpips", "unet"):
            if name in suites:
                bars += _client_bars(name, suites[name], device_type, label)
    return bars


def format_bars(bars: list[Bar]) -> str:
    if not bars:
        return ("no bar can be evaluated from these files (no layers, layers_train or model "
                "suite on cuDNN, and no memory, perceptual, lpips or unet suite with a fused "
                "backend)")
    return "\n".join(bar.line() for bar in bars)
