"""Result files: the schema, a validator, reading/writing, and the figures ``compare`` tracks.

A result file (``schema_version`` 1) is one JSON object::

    schema_version  1
    tool            "vgg_kernels.bench"
    environment     device_type, device_name, device_slug, compute_capability, driver, cuda,
                    cudnn, torch, triton, python, platform, cpu_threads, vgg_kernels, git_commit,
                    git_dirty, date (UTC, ISO 8601), command_line
    peak            matmul: {size, dtype, tf32, flops, samples_ms, median_ms, p20_ms, p80_ms,
                    tflops}; bandwidth: {bytes_moved, samples_ms, median_ms, p20_ms, p80_ms, gbps}
    suites          any of:
      layers        settings {config, batch, resolution, dtype, device, warmup, repeats,
                    backends, baseline, compile_mode, time_limit_s}, wall_s,
                    layers [{name, index, in_channels, out_channels, kernel, height, width, pool,
                    flops, bytes, intensity}],
                    cases [{key, layer, backend, samples_ms, median_ms, p20_ms, p80_ms, tflops,
                    pct_of_peak, speedup, speedup_low, speedup_high, rotating_inputs,
                    compile_s (torch_compile only), rel_error_vs_baseline}],
                    skipped [{backend, layer (or null: every layer), reason}],
                    summary {baseline, geomean_speedup: {backend: {value, low, high, layers}}},
                    interrupted (null or the reason)
      layers_train  (``layers --mode train``) the ``layers`` block's fields, for each block's
                    training forward + backward: settings add mode "train", flops and bytes (how
                    they are counted: 3x the forward's), precision; cases add rel_errors
                    {output, x, weight, bn_weight, bn_bias}; keys ``layers-train/...``
      model         settings {config, batch, resolution, dtype, device, warmup, repeats,
                    variants, compile_mode, time_limit_s, optimizer, compile_train, train_mode,
                    train_precision}, wall_s,
                    cases [{key, variant, mode ("inference" | "train" | "train_amp"),
                    samples_ms, median_ms, p20_ms, p80_ms, images_per_s, images_per_s_low,
                    images_per_s_high, peak_memory_bytes (null on a CPU), peak_memory_note,
                    memory_before_bytes (CUDA), compile_s (torch_compile only)}],
                    skipped [{variant, mode (or null: both), reason}], interrupted.
                    "train_amp": the step under torch.autocast with fp32 parameters (fp16/bf16
                    runs); "train": plain fp32, or (files without train_mode) the parameters in
                    the run dtype
      perceptual    settings {config, batch, resolution, dtype, device, warmup, repeats,
                    backends, baseline, compile_mode, time_limit_s, taps, variants, loss, flops,
                    flops_per_call}, wall_s,
                    cases [{key, variant, samples_ms, median_ms, p20_ms, p80_ms, images_per_s,
                    images_per_s_low, images_per_s_high, tflops, rotating_inputs,
                    rel_error_vs_baseline (input gradient: max |diff| / max |eager|),
                    mean_rel_error_vs_baseline (mean |diff| / max |eager|), speedup, speedup_low,
                    speedup_high, compile_s (torch_compile only)}],
                    skipped [{variant, reason}], summary {baseline, speedup: {variant: {value,
                    low, high}}}, interrupted
      lpips, unet   (``vgg_kernels.fuse`` on lpips' LPIPS(net='vgg'), distance + input
                    gradient; on the common UNet, a training step) settings {config ("vgg",
                    "unet-w<width>"), batch, resolution, dtype, device, warmup, repeats,
                    backends, baseline, compile_mode, time_limit_s, variants, call, precision
                    (unet), width (unet)}, wall_s,
                    cases [{key, variant, samples_ms, median_ms, p20_ms, p80_ms, images_per_s,
                    images_per_s_low, images_per_s_high, rel_error_vs_baseline (lpips: the
                    input gradient; unet: the first conv's weight gradient),
                    loss_rel_error_vs_baseline (unet), speedup, speedup_low, speedup_high,
                    compile_s (torch_compile only)}],
                    skipped [{variant, reason}], summary {baseline, speedup}, interrupted
      memory        settings {config, batch, resolution, dtype, device, warmup, backends,
                    baseline, variants, saved, peak_growth, loss}, wall_s,
                    cases [{key, variant, saved_bytes, saved_storages, saved_tensors,
                    saved_input_bytes, saved_ratio_to_eager, peak_growth_bytes (null on a CPU),
                    peak_growth_note, peak_growth_ratio_to_eager (or null)}],
                    skipped [{variant, reason}], summary {baseline}, interrupted
    wall_s          seconds the whole run took
    interrupted     null, or why the run stopped early (SIGTERM, e.g. an outer `timeout`): the
                    suites then hold what was measured before, and say where it stopped
    sources         (merged files only) [{suites, date, git_commit, command_line, interrupted}]
                    per input

Keys of cases name the measured work completely, e.g. ``layers/D/b64/r224/bf16/conv3_2/triton``,
``layers-train/D/b64/r224/bf16/conv3_2/triton``, ``model/D/b64/r224/bf16/cudnn_eager/train_amp``,
``perceptual/vgg16/relu1_2+relu2_2+relu3_3+relu4_3/b32/r256/bf16/triton``,
``lpips/vgg/b4/r112/fp32/native``, ``unet/unet-w64/b4/r64/fp32/native`` and
``memory/D/b64/r224/bf16/triton``: two files compare case by case on these keys.
Times are milliseconds per call; ``*_low``/``*_high`` are the figure computed from the
pessimistic/optimistic ends of the 20th-80th percentile spread.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
TOOL = "vgg_kernels.bench"


class ResultFileError(ValueError):
    """A file is not a readable result file of the expected schema version."""


@dataclass(frozen=True)
class Figure:
    """One tracked number with its spread: ``low <= value <= high`` in the figure's own unit;
    ``better`` says which direction is an improvement."""

    value: float
    low: float
    high: float
    better: str  # "lower" or "higher"
    unit: str
    basis: int | None = None  # for an aggregate: how many cases it covers


def round_floats(data: Any, digits: int = 6) -> Any:
    """``data`` with every float rounded to ``digits`` significant digits (keeps files short;
    timings carry no more precision than that)."""
    if isinstance(data, float):
        if not math.isfinite(data) or data == 0.0:
            return data
        return float(f"{data:.{digits}g}")
    if isinstance(data, dict):
        return {k: round_floats(v, digits) for k, v in data.items()}
    if isinstance(data, list):
        return [round_floats(v, digits) for v in data]
    return data


def default_file_name(result: dict[str, Any]) -> str:
    """``<device-slug>-<yyyymmdd>-<short sha>-<suites>.json``, the results-history name."""
    env = result.get("environment", {})
    date = re.sub(r"[^0-9]", "", str(env.get("date", "")))[:8] or "undated"
    sha = (env.get("git_commit") or "nogit")[:7]
    suites = "-".join(sorted(result.get("suites", {}))) or "empty"
    return f"{env.get('device_slug', 'unknown')}-{date}-{sha}-{suites}.json"


def write_result(result: dict[str, Any], out: str | Path) -> Path:
    """Write ``result`` to ``out``; when ``out`` is a directory (exists, or ends with '/'), to
    ``out/default_file_name(result)``. Returns the path written."""
    path = Path(out)
    if path.is_dir() or str(out).endswith("/"):
        path = path / default_file_name(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(round_floats(result), indent=1) + "\n")
    return path


def load_result(path: str | Path) -> dict[str, Any]:
    """Read a result file; raises ``ResultFileError`` (naming the file) when it cannot be read,
    is not a result file, or has another schema version."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ResultFileError(f"{path}: cannot read a JSON result file ({error})") from error
    if not isinstance(data, dict) or "schema_version" not in data:
        raise ResultFileError(f"{path}: not a vgg_kernels.bench result file (no schema_version)")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ResultFileError(
            f"{path}: schema_version {data['schema_version']!r}, but this tool reads version "
            f"{SCHEMA_VERSION}; re-run the benchmark with this version of vgg_kernels.bench to "
            f"get a comparable file")
    return data


_ENV_KEYS = ("device_type", "device_name", "device_slug", "torch", "python", "git_commit",
             "date", "command_line")
_STAT_KEYS = ("samples_ms", "median_ms", "p20_ms", "p80_ms")
_LAYER_CASE_KEYS = ("key", "layer", "backend", *_STAT_KEYS, "tflops", "pct_of_peak", "speedup",
                    "speedup_low", "speedup_high")
_MODEL_CASE_KEYS = ("key", "variant", "mode", *_STAT_KEYS, "images_per_s", "images_per_s_low",
                    "images_per_s_high", "peak_memory_bytes", "peak_memory_note")
_PERCEPTUAL_CASE_KEYS = ("key", "variant", *_STAT_KEYS, "images_per_s", "images_per_s_low",
                         "images_per_s_high", "tflops", "rel_error_vs_baseline")
_CLIENT_CASE_KEYS = ("key", "variant", *_STAT_KEYS, "images_per_s", "images_per_s_low",
                     "images_per_s_high", "rel_error_vs_baseline")
_MEMORY_CASE_KEYS = ("key", "variant", "saved_bytes", "saved_storages", "saved_input_bytes",
                     "peak_growth_bytes", "peak_growth_note")
_CASE_KEYS = {"layers": _LAYER_CASE_KEYS, "layers_train": _LAYER_CASE_KEYS,
              "model": _MODEL_CASE_KEYS, "perceptual": _PERCEPTUAL_CASE_KEYS,
              "memory": _MEMORY_CASE_KEYS, "lpips": _CLIENT_CASE_KEYS,
              "unet": _CLIENT_CASE_KEYS}
SUITES = tuple(_CASE_KEYS)
MODEL_MODES = ("inference", "train", "train_amp")
# Suites whose keys must carry their own prefix (older suites' keys are checked by their
# comparisons alone): no case of one suite can be taken for another's.
_KEY_PREFIXES = {"layers_train": "layers-train/", "perceptual": "perceptual/",
                 "memory": "memory/", "lpips": "lpips/", "unet": "unet/"}


def _check_stats(where: str, case: dict[str, Any], problems: list[str]) -> None:
    samples = case.get("samples_ms")
    if not isinstance(samples, list) or not samples or not all(
            isinstance(s, (int, float)) and s > 0 for s in samples):
        problems.append(f"{where}: samples_ms must be a non-empty list of positive numbers")
        return
    stats = [case.get("p20_ms"), case.get("median_ms"), case.get("p80_ms")]
    if not all(isinstance(v, (int, float)) for v in stats):
        problems.append(f"{where}: p20_ms, median_ms, p80_ms must be numbers")
    elif not min(samples) <= stats[0] <= stats[1] <= stats[2] <= max(samples):  # type: ignore[operator]
        problems.append(f"{where}: expected min <= p20 <= median <= p80 <= max of samples_ms")


def validate_result(data: Any) -> list[str]:
    """Every way ``data`` departs from the schema above (empty list: valid)."""
    if not isinstance(data, dict):
        return ["result must be a JSON object"]
    problems: list[str] = []
    if data.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version must be {SCHEMA_VERSION}")
    env = data.get("environment")
    if not isinstance(env, dict):
        problems.append("environment must be an object")
    else:
        problems += [f"environment.{k} is missing" for k in _ENV_KEYS if k not in env]
    peak = data.get("peak")
    if not isinstance(peak, dict) or not {"matmul", "bandwidth"} <= set(peak):
        problems.append("peak must hold matmul and bandwidth")
    else:
        _check_stats("peak.matmul", peak["matmul"], problems)
        _check_stats("peak.bandwidth", peak["bandwidth"], problems)
        if "l2_read" in peak:
            _check_stats("peak.l2_read", peak["l2_read"], problems)
    suites = data.get("suites")
    if not isinstance(suites, dict) or not suites:
        return problems + ["suites must be a non-empty object"]
    for name, suite in suites.items():
        if name not in SUITES:
            problems.append(f"suites.{name}: unknown suite (expected one of {', '.join(SUITES)})")
            continue
        if not isinstance(suite, dict):
            problems.append(f"suites.{name} must be an object")
            continue
        for key in ("settings", "cases", "skipped"):
            if key not in suite:
                problems.append(f"suites.{name}.{key} is missing")
        _check_cases(name, suite, problems)
        if name in ("layers", "layers_train"):
            if "layers" not in suite:
                problems.append(f"suites.{name}.layers is missing")
            summary = suite.get("summary")
            if not isinstance(summary, dict) or "geomean_speedup" not in summary:
                problems.append(f"suites.{name}.summary.geomean_speedup is missing")
        if name in ("perceptual", "lpips", "unet"):
            summary = suite.get("summary")
            if not isinstance(summary, dict) or "speedup" not in summary:
                problems.append(f"suites.{name}.summary.speedup is missing")
        if name == "perceptual":
            if not suite.get("settings", {}).get("taps"):
                problems.append("suites.perceptual.settings.taps is missing")
    return problems


def _check_cases(name: str, suite: dict[str, Any], problems: list[str]) -> None:
    """The per-case checks of suite ``name``: required fields, unique keys, stats."""
    keys_seen: set[str] = set()
    for i, case in enumerate(suite.get("cases", [])):
        where = f"suites.{name}.cases[{i}]"
        missing = [k for k in _CASE_KEYS[name] if k not in case]
        if missing:
            problems.append(f"{where}: missing {', '.join(missing)}")
            continue
        if case["key"] in keys_seen:
            problems.append(f"{where}: duplicate key {case['key']!r}")
        keys_seen.add(case["key"])
        prefix = _KEY_PREFIXES.get(name)
        if prefix and not str(case["key"]).startswith(prefix):
            problems.append(f"{where}: key must start with {prefix!r} (got {case['key']!r})")
        if name == "model" and case["mode"] not in MODEL_MODES:
            problems.append(f"{where}: mode must be one of {', '.join(MODEL_MODES)} (got "
                            f"{case['mode']!r})")
        if name == "memory":
            _check_memory_case(where, case, problems)
        else:
            _check_stats(where, case, problems)


def _check_memory_case(where: str, case: dict[str, Any], problems: list[str]) -> None:
    for key in ("saved_bytes", "saved_storages", "saved_input_bytes"):
        if not isinstance(case[key], int) or case[key] < 0:
            problems.append(f"{where}: {key} must be a non-negative integer")
    growth = case["peak_growth_bytes"]
    if growth is not None and (not isinstance(growth, int) or growth < 0):
        problems.append(f"{where}: peak_growth_bytes must be null or a non-negative integer")


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result holding the suites of several runs on the same device (for instance the
    ``layers``, ``layers_train``, ``model``, ``perceptual`` and ``memory`` files of one device
    check, to make one baseline). ``environment`` and ``peak`` come from the first; ``sources``
    records each run's suites, date, commit, command and interruption; ``interrupted`` names
    every interrupted run. Raises ``ResultFileError`` for different devices, an unknown suite or
    a suite present twice."""
    if not results:
        raise ResultFileError("merge needs at least one result")
    merged = {key: value for key, value in results[0].items() if key != "sources"}
    merged["suites"] = {}
    merged["sources"] = []
    slug = results[0]["environment"].get("device_slug")
    for result in results:
        env = result["environment"]
        if env.get("device_slug") != slug:
            raise ResultFileError(f"cannot merge results of different devices ({slug!r} and "
                                  f"{env.get('device_slug')!r})")
        for name, suite in result["suites"].items():
            if name not in SUITES:
                raise ResultFileError(f"cannot merge: unknown suite {name!r} (expected one of "
                                      f"{', '.join(SUITES)})")
            if name in merged["suites"]:
                raise ResultFileError(f"cannot merge: suite {name!r} appears twice")
            merged["suites"][name] = suite
        merged["sources"].append({"suites": sorted(result["suites"]), "date": env.get("date"),
                                  "git_commit": env.get("git_commit"),
                                  "command_line": env.get("command_line"),
                                  "interrupted": result.get("interrupted")})
    stops = [f"{', '.join(source['suites'])}: {source['interrupted']}"
             for source in merged["sources"] if source["interrupted"]]
    merged["interrupted"] = "; ".join(stops) if stops else None
    return merged


def tracked_figures(result: dict[str, Any]) -> dict[str, Figure]:
    """The figures ``compare`` judges, by a key that names the measured work completely.

    - layer cases: median ms per (layer, backend) — lower is better;
    - per-backend geometric-mean speedup over the baseline (the baseline's own 1.0 left out) —
      higher is better;
    - model cases: images/s — higher is better; peak memory (GPU) — lower is better;
    - layers_train: as layers, under its own ``layers-train/`` keys;
    - perceptual, lpips and unet cases: images/s and (other variants) the speedup over eager —
      higher is better;
    - memory cases: MiB saved for the backward, its ratio to eager (fused backends) and the
      GPU peak growth — lower is better (exact counts: no spread).
    """
    figures: dict[str, Figure] = {}
    suites = result.get("suites", {})
    for name, prefix_of in (("layers", layers_prefix), ("layers_train", layers_train_prefix)):
        layers = suites.get(name)
        if not layers:
            continue
        for case in layers["cases"]:
            figures[f"{case['key']}/ms"] = Figure(case["median_ms"], case["p20_ms"],
                                                   case["p80_ms"], "lower", "ms")
        prefix = prefix_of(layers["settings"])
        baseline = layers["summary"].get("baseline")
        for backend, g in layers["summary"]["geomean_speedup"].items():
            if backend == baseline:  # 1.0 by definition: nothing to track
                continue
            figures[f"{prefix}/geomean/{backend}/speedup"] = Figure(
                g["value"], g["low"], g["high"], "higher", "x", g.get("layers"))
    model = suites.get("model")
    if model:
        for case in model["cases"]:
            figures[f"{case['key']}/images_per_s"] = Figure(
                case["images_per_s"], case["images_per_s_low"], case["images_per_s_high"],
                "higher", "img/s")
            memory = case.get("peak_memory_bytes")
            if memory is not None:
                figures[f"{case['key']}/peak_memory"] = Figure(memory / 2**20, memory / 2**20,
                                                               memory / 2**20, "lower", "MiB")
    for name in ("perceptual", "lpips", "unet"):
        suite = suites.get(name)
        if not suite:
            continue
        baseline = suite.get("summary", {}).get("baseline")
        for case in suite["cases"]:
            figures[f"{case['key']}/images_per_s"] = Figure(
                case["images_per_s"], case["images_per_s_low"], case["images_per_s_high"],
                "higher", "img/s")
            if case["variant"] != baseline and "speedup" in case:
                figures[f"{case['key']}/speedup"] = Figure(
                    case["speedup"], case["speedup_low"], case["speedup_high"], "higher", "x")
    memory_suite = suites.get("memory")
    if memory_suite:
        baseline = memory_suite.get("summary", {}).get("baseline")
        for case in memory_suite["cases"]:
            saved = case["saved_bytes"] / 2**20
            figures[f"{case['key']}/saved_memory"] = Figure(saved, saved, saved, "lower", "MiB")
            ratio = case.get("saved_ratio_to_eager")
            if case["variant"] != baseline and ratio is not None:
                figures[f"{case['key']}/saved_ratio"] = Figure(ratio, ratio, ratio, "lower", "x")
            growth = case.get("peak_growth_bytes")
            if growth is not None:
                figures[f"{case['key']}/peak_growth"] = Figure(growth / 2**20, growth / 2**20,
                                                               growth / 2**20, "lower", "MiB")
    return figures


def _work_prefix(suite: str, settings: dict[str, Any], *middle: str) -> str:
    """``<suite>/<config>[/<middle>...]/b<batch>/r<resolution>/<dtype>``: the part of a key
    fixing the work."""
    parts = [suite, settings["config"], *middle, f"b{settings['batch']}",
             f"r{settings['resolution']}", settings["dtype"]]
    return "/".join(str(part) for part in parts)


def layers_prefix(settings: dict[str, Any]) -> str:
    """``layers/<config>/b<batch>/r<resolution>/<dtype>``."""
    return _work_prefix("layers", settings)


def model_prefix(settings: dict[str, Any]) -> str:
    """``model/<config>/b<batch>/r<resolution>/<dtype>``."""
    return _work_prefix("model", settings)


def layers_train_prefix(settings: dict[str, Any]) -> str:
    """``layers-train/<config>/b<batch>/r<resolution>/<dtype>`` (``layers --mode train``)."""
    return _work_prefix("layers-train", settings)


def perceptual_prefix(settings: dict[str, Any]) -> str:
    """``perceptual/<config>/<tap>+<tap>.../b<batch>/r<resolution>/<dtype>``."""
    return _work_prefix("perceptual", settings, "+".join(settings["taps"]))


def clients_prefix(suite: str, settings: dict[str, Any]) -> str:
    """``lpips/vgg/b<batch>/r<resolution>/<dtype>`` or ``unet/unet-w<width>/...``."""
    return _work_prefix(suite, settings)


def memory_prefix(settings: dict[str, Any]) -> str:
    """``memory/<config>/b<batch>/r<resolution>/<dtype>``."""
    return _work_prefix("memory", settings)
