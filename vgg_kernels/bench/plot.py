"""PNG charts from result files: speedup per layer, roofline, model throughput.

matplotlib is an optional dependency (``pip install -e ".[bench]"``); everything else in the
benchmark tool works without it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

MISSING_MATPLOTLIB = ("plotting needs matplotlib, which is not installed: "
                      "pip install -e \".[bench]\" (or pip install matplotlib)")


class PlotUnavailable(RuntimeError):
    """matplotlib is missing."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise PlotUnavailable(MISSING_MATPLOTLIB) from error
    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def _title(result: dict[str, Any], suite: str) -> str:
    env, settings = result["environment"], result["suites"][suite]["settings"]
    commit = (env.get("git_commit") or "?")[:7]
    return (f"VGG {settings['config']} {suite}, batch {settings['batch']}, "
            f"{settings['resolution']}px, {settings['dtype']} — {env['device_name']} "
            f"({commit}, {env['date'][:10]})")


def plot_speedup(result: dict[str, Any], path: Path) -> Path:
    """Grouped bars: each backend's speedup over the eager baseline, per layer."""
    plt = _pyplot()
    suite = result["suites"]["layers"]
    baseline = suite["summary"]["baseline"]
    backends = [b for b in suite["summary"]["geomean_speedup"] if b != baseline]
    layers = [layer["name"] for layer in suite["layers"]]
    by_key = {(c["layer"], c["backend"]): c for c in suite["cases"]}
    fig, ax = plt.subplots(figsize=(max(8.0, 0.7 * len(layers) * max(1, len(backends))), 4.5))
    width = 0.8 / max(1, len(backends))
    for i, backend in enumerate(backends):
        xs: list[float] = []
        ys: list[float] = []
        errs: list[list[float]] = [[], []]
        for j, layer in enumerate(layers):
            case = by_key.get((layer, backend))
            if case is None:
                continue
            xs.append(j + (i - (len(backends) - 1) / 2) * width)
            ys.append(case["speedup"])
            errs[0].append(case["speedup"] - case["speedup_low"])
            errs[1].append(case["speedup_high"] - case["speedup"])
        geomean = suite["summary"]["geomean_speedup"][backend]["value"]
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=f"{backend} (geomean {geomean:.2f}x)")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right")
    ax.set_ylabel(f"speedup over {baseline} (median; bars p20..p80)")
    ax.set_title(_title(result, "layers"), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_roofline(result: dict[str, Any], path: Path) -> Path:
    """Log-log roofline: measured matmul peak and copy bandwidth, one point per case."""
    plt = _pyplot()
    suite = result["suites"]["layers"]
    peak_tflops = result["peak"]["matmul"]["tflops"]
    bandwidth_tbs = result["peak"]["bandwidth"]["gbps"] / 1e3
    intensity = {layer["name"]: layer["intensity"] for layer in suite["layers"]}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    lo = min(intensity.values()) / 2
    hi = max(max(intensity.values()) * 2, 2 * peak_tflops / bandwidth_tbs)
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(xs, [min(peak_tflops, bandwidth_tbs * x) for x in xs], color="black",
            label=f"roofline: {peak_tflops:.3g} TFLOP/s matmul, {bandwidth_tbs:.3g} TB/s copy")
    markers = "osD^v<>p*h"
    for i, backend in enumerate(suite["summary"]["geomean_speedup"]):
        cases = [c for c in suite["cases"] if c["backend"] == backend]
        ax.scatter([intensity[c["layer"]] for c in cases], [c["tflops"] for c in cases],
                   marker=markers[i % len(markers)], label=backend, alpha=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / fewest bytes: input + weights + output once)")
    ax.set_ylabel("TFLOP/s (median)")
    ax.set_title(_title(result, "layers"), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", linewidth=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_model(result: dict[str, Any], path: Path) -> Path:
    """Bars: images/s per variant, inference and training step."""
    plt = _pyplot()
    suite = result["suites"]["model"]
    variants = suite["settings"]["variants"]
    by_key = {(c["variant"], c["mode"]): c for c in suite["cases"]}
    train = suite.get("settings", {}).get("train_mode", "train")  # train_amp: autocast step
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, mode in zip(axes, ("inference", train), strict=True):
        names = [v for v in variants if (v, mode) in by_key]
        values = [by_key[(v, mode)]["images_per_s"] for v in names]
        errs = [[by_key[(v, mode)]["images_per_s"] - by_key[(v, mode)]["images_per_s_low"]
                 for v in names],
                [by_key[(v, mode)]["images_per_s_high"] - by_key[(v, mode)]["images_per_s"]
                 for v in names]]
        ax.bar(range(len(names)), values, yerr=errs, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel("images/s (median; bars p20..p80)")
        ax.set_title(mode)
    fig.suptitle(_title(result, "model"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_result(result: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """Every chart the result's suites allow, as ``out_dir/<stem>-<chart>.png``."""
    _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    suites = result.get("suites", {})
    if suites.get("layers", {}).get("cases"):
        written.append(plot_speedup(result, out_dir / f"{stem}-speedup.png"))
        if all(math.isfinite(c["tflops"]) for c in suites["layers"]["cases"]):
            written.append(plot_roofline(result, out_dir / f"{stem}-roofline.png"))
    if suites.get("model", {}).get("cases"):
        written.append(plot_model(result, out_dir / f"{stem}-model.png"))
    return written
