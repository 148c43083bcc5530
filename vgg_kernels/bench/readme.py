"""``readme``: rewrite the generated benchmark sections from the newest committed GPU result.

README.md's section lies between ``<!-- bench:start -->`` and ``<!-- bench:end -->``: the run's
environment and the whole-model table. docs/benchmarks.md holds the same markers, with the
per-block table and the charts as well (without that page, README.md gets them all). Both come
from the newest (by recorded date) result file in benchmarks/results/ that git tracks and that
ran on CUDA; while there is none, each section says so in one sentence.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from vgg_kernels.bench.environment import REPO_ROOT
from vgg_kernels.bench.plot import PlotUnavailable, plot_result
from vgg_kernels.bench.results import ResultFileError, load_result, merge_results
from vgg_kernels.bench.table import format_markdown_table

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"
NO_RESULT = ("No GPU result of `python -m vgg_kernels.bench` has been committed to "
             "`benchmarks/results/` yet, so there are no figures here; they are generated from "
             "the first one.")


def committed_results(results_dir: Path) -> list[Path]:
    """JSON files under ``results_dir`` that git tracks (a file only on disk does not count)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", "*.json"], cwd=results_dir,
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted(results_dir / name for name in out.split("\0") if name)


def newest_gpu_result(paths: list[Path]) -> tuple[Path, dict[str, Any]] | None:
    """The CUDA result with the latest ``environment.date``; unreadable files are passed over."""
    best: tuple[str, Path, dict[str, Any]] | None = None
    for path in paths:
        try:
            data = load_result(path)
        except ResultFileError:
            continue
        env = data.get("environment", {})
        if env.get("device_type") != "cuda":
            continue
        if best is None or env.get("date", "") > best[0]:
            best = (env.get("date", ""), path, data)
    return None if best is None else (best[1], best[2])


def newest_gpu_run(paths: list[Path]) -> tuple[Path, dict[str, Any]] | None:
    """The newest CUDA result merged with the other suites of the same run (same device and
    commit; one device check writes its layers and model suites to separate files)."""
    found = newest_gpu_result(paths)
    if found is None:
        return None
    env = found[1]["environment"]
    parts = [found[1]]
    for path in paths:
        if path == found[0]:
            continue
        try:
            data = load_result(path)
        except ResultFileError:
            continue
        other = data.get("environment", {})
        if (other.get("device_slug"), other.get("git_commit")) == (
                env.get("device_slug"), env.get("git_commit")) and not any(
                name in part["suites"] for part in parts for name in data["suites"]):
            parts.append(data)
    return found[0], merge_results(parts)


def _layers_table(suite: dict[str, Any]) -> str:
    baseline = suite["summary"]["baseline"]
    backends = [b for b in suite["summary"]["geomean_speedup"] if b != baseline]
    by_key = {(c["layer"], c["backend"]): c for c in suite["cases"]}
    rows: list[list[object]] = []
    for layer in suite["layers"]:
        shape = (f"{layer['in_channels']}→{layer['out_channels']} @{layer['height']}"
                 + (" +pool" if layer["pool"] else ""))
        base = by_key.get((layer["name"], baseline))
        row: list[object] = [layer["name"], shape,
                             "-" if base is None else f"{base['median_ms']:.3f}"]
        for backend in backends:
            case = by_key.get((layer["name"], backend))
            row.append("-" if case is None else
                       f"{case['median_ms']:.3f} ({case['speedup']:.2f}x, "
                       f"{case['pct_of_peak']:.0f}%)")
        rows.append(row)
    geomean = suite["summary"]["geomean_speedup"]
    rows.append(["**geomean**", "", "1.00x", *(f"**{geomean[b]['value']:.2f}x**"
                                               for b in backends)])
    headers = ["layer", "C→K @H", f"{baseline} ms", *(f"{b} ms (speedup, % peak)"
                                                      for b in backends)]
    return format_markdown_table(headers, rows)


def _model_table(suite: dict[str, Any]) -> str:
    by_key = {(c["variant"], c["mode"]): c for c in suite["cases"]}
    train = suite["settings"].get("train_mode", "train")  # train_amp: the autocast step
    rows = []
    for variant in suite["settings"]["variants"]:
        row: list[object] = [variant]
        for mode in ("inference", train):
            case = by_key.get((variant, mode))
            memory = None if case is None else case["peak_memory_bytes"]
            row += ["-" if case is None else f"{case['images_per_s']:.0f}",
                    "-" if memory is None else f"{memory / 2**30:.2f}"]
        rows.append(row)
    precision = suite["settings"].get("train_precision")
    step = f"train step ({precision.split(' (')[0]}) img/s" if precision else "train step img/s"
    return format_markdown_table(["variant", "inference img/s", "peak GiB", step, "peak GiB"],
                                 rows)


def render_section(result: dict[str, Any] | None, source: str | None,
                   plots: list[str], per_block: bool = True) -> str:
    """The Markdown between the markers (without them); ``per_block``: with the per-block
    table (docs/benchmarks.md; README.md points there instead)."""
    if result is None:
        return NO_RESULT
    env, peak = result["environment"], result["peak"]
    lines = [
        f"Generated by `python -m vgg_kernels.bench readme` from `{source}`: "
        f"{env['device_name']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
        f"commit {(env.get('git_commit') or '?')[:7]}, {env['date'][:10]}. Measured peak: "
        f"{peak['matmul']['tflops']:.0f} TFLOP/s ({peak['matmul']['dtype']} matmul "
        f"{peak['matmul']['size']}³), {peak['bandwidth']['gbps']:.0f} GB/s (copy)"
        + (f", {peak['l2_read']['gbps']:.0f} GB/s (L2 read)." if "l2_read" in peak else "."),
    ]
    suites = result["suites"]
    if not per_block:
        lines += ["", "Per-block figures and charts of this run: "
                      "[docs/benchmarks.md](docs/benchmarks.md)."]
    if "layers" in suites and per_block:
        s = suites["layers"]["settings"]
        lines += ["", f"Per block (VGG {s['config']}, batch {s['batch']}, {s['resolution']}px, "
                      f"{s['dtype']}; median of {s['repeats']} CUDA-event timings):", "",
                  _layers_table(suites["layers"])]
    if "model" in suites:
        s = suites["model"]["settings"]
        lines += ["", f"Whole model (VGG {s['config']}, batch {s['batch']}, {s['resolution']}px, "
                      f"{s['dtype']}):", "", _model_table(suites["model"])]
    if plots:
        lines += [""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines)


def replace_section(text: str, section: str) -> str:
    """``text`` with the part between the markers replaced by ``section``; raises
    ``ValueError`` when the markers are missing or out of order."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README must contain {START} followed by {END}")
    return text[:start + len(START)] + "\n" + section.strip() + "\n" + text[end:]


def update_readme(readme: Path, results_dir: Path, plots_dir: Path | None,
                  log: Any = print, details: Path | None = None) -> bool:
    """Rewrite README.md's generated section and, when ``details`` (docs/benchmarks.md) is
    given and holds the markers, its section with the per-block table; returns whether a file
    changed."""
    found = newest_gpu_run(committed_results(results_dir))
    plots: list[str] = []
    if found is not None and plots_dir is not None:
        try:
            written = plot_result(found[1], plots_dir, found[0].stem)
            plots = [str(p.resolve().relative_to(readme.parent.resolve())) for p in written]
        except PlotUnavailable as error:
            log(f"note: no charts: {error}")
    source = None
    if found is not None:
        try:
            source = str(found[0].resolve().relative_to(REPO_ROOT))
        except ValueError:
            source = str(found[0])
    changed = False
    has_details = details is not None and details.is_file() and START in details.read_text()
    # the charts go with the per-block table where there is a page for it
    targets = [(readme, not has_details, [] if has_details else plots)]
    if has_details:
        relative = [os.path.relpath(readme.parent / p, details.parent) for p in plots]
        targets.append((details, True, relative))
    for path, per_block, links in targets:
        text = path.read_text()
        new_text = replace_section(text, render_section(found and found[1], source, links,
                                                        per_block))
        if new_text != text:
            path.write_text(new_text)
            changed = True
    return changed
