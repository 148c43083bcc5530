"""Command line of ``python -m vgg_kernels.bench`` (see vgg_kernels/bench/__init__.py)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vgg_kernels.bench.bars import evaluate_bars, format_bars
from vgg_kernels.bench.clients import format_clients, run_lpips, run_unet
from vgg_kernels.bench.compare import compare_results, format_comparison
from vgg_kernels.bench.environment import REPO_ROOT, collect_environment
from vgg_kernels.bench.layers import format_layers, layer_specs, run_layers
from vgg_kernels.bench.layers_train import NO_BN_MESSAGE, run_layers_train
from vgg_kernels.bench.memory import format_memory, run_memory
from vgg_kernels.bench.model import format_model, run_model
from vgg_kernels.bench.peak import measure_peaks
from vgg_kernels.bench.perceptual import DEFAULT_CONFIG as PERCEPTUAL_CONFIG
from vgg_kernels.bench.perceptual import (
    DEFAULT_TAPS,
    format_perceptual,
    run_perceptual,
    tap_indices,
)
from vgg_kernels.bench.plot import PlotUnavailable, plot_result
from vgg_kernels.bench.readme import update_readme
from vgg_kernels.bench.results import (
    SCHEMA_VERSION,
    TOOL,
    ResultFileError,
    load_result,
    merge_results,
    round_floats,
    validate_result,
    write_result,
)
from vgg_kernels.bench.settings import (
    COMPILE_MODES,
    DTYPES,
    RunInterrupted,
    RunSettings,
    parse_backends,
)
from vgg_kernels.models import layer_names
from vgg_kernels.models.vgg import parse_config

# Exit status of a run stopped by SIGTERM (after writing what it measured), as `timeout` reports.
INTERRUPTED_STATUS = 124
_STARTED = time.perf_counter()
# Per-suite defaults by device type: (warm-up calls, timed calls). The memory suite times
# nothing: its warm-up steps run before the one measured step.
DEFAULT_REPEATS = {
    ("layers", "cuda"): (10, 100), ("layers", "cpu"): (1, 5),
    ("layers_train", "cuda"): (5, 30), ("layers_train", "cpu"): (1, 3),
    ("model", "cuda"): (3, 20), ("model", "cpu"): (1, 3),
    ("perceptual", "cuda"): (3, 20), ("perceptual", "cpu"): (1, 3),
    ("memory", "cuda"): (1, 1), ("memory", "cpu"): (1, 1),
    ("lpips", "cuda"): (3, 20), ("lpips", "cpu"): (1, 7),
    ("unet", "cuda"): (3, 20), ("unet", "cpu"): (1, 7),
}
# Per-suite defaults by device type: (batch, resolution).
DEFAULT_SHAPES = {
    ("layers", "cuda"): (64, 224), ("layers", "cpu"): (2, 224),
    ("layers_train", "cuda"): (64, 224), ("layers_train", "cpu"): (2, 224),
    ("model", "cuda"): (64, 224), ("model", "cpu"): (2, 224),
    ("perceptual", "cuda"): (32, 256), ("perceptual", "cpu"): (2, 128),
    ("memory", "cuda"): (64, 224), ("memory", "cpu"): (4, 64),
    ("lpips", "cuda"): (32, 256), ("lpips", "cpu"): (4, 112),
    ("unet", "cuda"): (16, 256), ("unet", "cpu"): (4, 64),
}
UNET_WIDTH = 64
DEFAULT_CONFIGS = {"perceptual": PERCEPTUAL_CONFIG}


def _defaults_text(suite: str, table: dict[tuple[str, str], tuple[int, int]], item: int,
                   unit: str = "") -> str:
    """A help text's default: the values of ``table`` for the suites a command runs."""
    labels = ({"layers": "layers", "model": "model"} if suite == "all" else
              {"layers": "--mode infer", "layers_train": "--mode train"} if suite == "layers"
              else {suite: suite})
    parts = {}
    for name, label in labels.items():
        cuda, cpu = table[(name, "cuda")][item], table[(name, "cpu")][item]
        parts[label] = f"{cuda}{unit} on CUDA, {cpu}{unit} on a CPU"
    if len(set(parts.values())) == 1:
        return next(iter(parts.values()))
    return "; ".join(f"{label}: {values}" for label, values in parts.items())


def _add_run_options(parser: argparse.ArgumentParser, suite: str) -> None:
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu",
                        help="cuda, cuda:N or cpu (default: cuda when available)")
    if suite == "unet":
        parser.add_argument("--width", type=int, default=UNET_WIDTH,
                            help=f"channels of the UNet's first stage (default {UNET_WIDTH}, "
                                 f"doubling per stage down to 8x)")
    elif suite == "lpips":
        pass  # the lpips package's VGG16: nothing to choose
    elif suite == "perceptual":
        parser.add_argument("--config", default=PERCEPTUAL_CONFIG,
                            help="VGG config of the frozen network (default vgg16: VGG16 "
                                 "without BN; plain letters have BatchNorm)")
        parser.add_argument("--taps", default=",".join(DEFAULT_TAPS), metavar="NAMES",
                            help="comma-separated feature taps of the loss (default "
                                 f"{','.join(DEFAULT_TAPS)}); the forward runs to the deepest")
    else:
        parser.add_argument("--config", default="D",
                            help="VGG config: A, A-LRN, B, C, D, E or a torchvision name "
                                 "(default D; plain letters have BatchNorm)")
    if suite == "layers":
        parser.add_argument("--mode", choices=("infer", "train"), default="infer",
                            help="infer (default): eval-mode blocks, forward only; train: each "
                                 "block's training forward + backward against eager modules "
                                 "in train mode (suite layers_train in the result file)")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"batch size (default {_defaults_text(suite, DEFAULT_SHAPES, 0)})")
    parser.add_argument("--resolution", type=int, default=None,
                        help="input H = W (default "
                             f"{_defaults_text(suite, DEFAULT_SHAPES, 1, 'px')})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="storage dtype (default bf16 on CUDA, fp32 on a CPU)")
    parser.add_argument("--backends", default="all",
                        help="comma-separated: triton, native, reference, eager, compile, or all "
                             "(default all; unavailable ones are skipped with the reason)")
    if suite == "memory":  # nothing is timed: no --repeats
        parser.add_argument("--warmup", type=int, default=None,
                            help="training steps before the measured one (default 1)")
    else:
        parser.add_argument("--warmup", type=int, default=None,
                            help="untimed calls before timing (default "
                                 f"{_defaults_text(suite, DEFAULT_REPEATS, 0)})")
    if suite != "memory":
        parser.add_argument("--repeats", type=int, default=None,
                            help="timed calls per case (default "
                                 f"{_defaults_text(suite, DEFAULT_REPEATS, 1)})"
                            if suite != "all" else
                            "timed calls per layer case (default 100 on CUDA, 5 on a CPU)")
    if suite == "all":
        parser.add_argument("--model-repeats", type=int, default=None,
                            help="timed calls per model case (default 20 on CUDA, 3 on a CPU)")
    if suite == "layers":
        parser.add_argument("--layers", default=None, metavar="NAMES",
                            help="comma-separated blocks to time, e.g. conv1_1,conv5_3 "
                                 "(default: every block of --config)")
    if suite != "memory":
        parser.add_argument("--no-compile", action="store_true",
                            help="skip torch.compile (recorded as skipped, with the reason)")
        parser.add_argument("--compile-mode", default=None,
                            help=f"torch.compile mode (default {COMPILE_MODES['cuda']!r} on "
                                 f"CUDA, {COMPILE_MODES['cpu']!r} on a CPU)")
    if suite in ("model", "all"):
        parser.add_argument("--no-compile-train", action="store_true",
                            help="skip the compiled model's training step (its compile is the "
                                 "longest step of the suite)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="soft limit for the whole run: torch.compile cases that would start "
                             "after it are skipped (reason recorded), so the file is still "
                             "written under an outer timeout (default: none)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for CPU work (default: torch's choice); 1 "
                             "keeps timings on a shared CPU from stalling on thread barriers")
    parser.add_argument("--peak-size", type=int, default=None,
                        help="matmul size for the measured peak (default 8192 CUDA, 1024 CPU)")
    parser.add_argument("--out", default=None,
                        help="write the JSON result here (a directory, or a path ending in '/', "
                             "gets the history name <device>-<date>-<sha>-<suites>.json); "
                             "default: print the table only")
    parser.add_argument("--quiet", action="store_true", help="no per-layer progress lines")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vgg_kernels.bench",
        description="Benchmarks of the fused VGG blocks and models; result files, comparison, "
                    "charts and README figures.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("layers", "time every fused block of a config per backend (--mode "
                                  "train: forward + backward)"),
                       ("model", "whole-model inference and training-step throughput, memory"),
                       ("all", "layers then model, in one result file"),
                       ("perceptual", "perceptual loss: frozen VGG16 forward to relu4_3 + "
                                      "input gradient, per backend"),
                       ("memory", "activation memory saved for the backward by one training "
                                  "step, fused models against eager"),
                       ("lpips", "vgg_kernels.fuse on lpips.LPIPS(net='vgg'): distance + "
                                 "input gradient, against eager lpips"),
                       ("unet", "vgg_kernels.fuse on the common UNet: one training step, "
                                "against eager")):
        _add_run_options(sub.add_parser(name, help=text, description=text), name)

    compare = sub.add_parser("compare", help="compare two result files; exit 1 on regression",
                             description="Compare OLD and NEW result files (or each NEW "
                                         "against the baseline for its device in "
                                         "--baseline-dir). "
                                         "Exit 0: no regression; 1: regression; 2: unreadable "
                                         "files or schema mismatch.")
    compare.add_argument("files", nargs="+", metavar="FILE",
                         help="OLD.json NEW.json, or NEW.json... with --baseline-dir")
    compare.add_argument("--baseline-dir", type=Path, default=None,
                         help="take OLD from DIR/<device-slug of NEW>.json")
    compare.add_argument("--require-baseline", action="store_true",
                         help="with --baseline-dir: a missing baseline is an error (exit 2)")
    compare.add_argument("--threshold", type=float, default=None,
                         help="relative change that counts (default 0.05 for GPU results, 0.25 "
                              "for CPU results)")
    compare.add_argument("--fail-on-missing", action="store_true",
                         help="exit 1 when a figure of OLD is missing from NEW")
    compare.add_argument("--only-changes", action="store_true",
                         help="leave figures judged 'same' out of the table")

    plot = sub.add_parser("plot", help="PNG charts from result files (needs matplotlib)")
    plot.add_argument("files", nargs="+", metavar="RESULT.json")
    plot.add_argument("--out-dir", type=Path, default=None,
                      help="where the PNGs go (default: beside each result file)")

    readme = sub.add_parser("readme", help="regenerate the benchmark sections of README.md and "
                                           "docs/benchmarks.md")
    readme.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md")
    readme.add_argument("--results-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    readme.add_argument("--plots-dir", type=Path, default=REPO_ROOT / "benchmarks" / "plots")
    readme.add_argument("--details", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md",
                        help="the page that gets the per-block table too (default "
                             "docs/benchmarks.md)")
    readme.add_argument("--no-plots", action="store_true", help="tables only, no charts")

    merge = sub.add_parser("merge", help="combine the suites of result files of one device",
                           description="Write one result file holding the suites of several "
                                       "(e.g. layers.json + model.json -> a baseline).")
    merge.add_argument("out", metavar="OUT.json")
    merge.add_argument("files", nargs="+", metavar="RESULT.json")

    validate = sub.add_parser("validate", help="check result files against the schema")
    validate.add_argument("files", nargs="+", metavar="RESULT.json")

    bars = sub.add_parser("bars", help="the performance bars the result files meet or miss",
                          description="Evaluate the project's performance bars (see "
                                      "vgg_kernels/bench/bars.py) on result files. Exit 0: "
                                      "every bar they evaluate is met; 1: one is missed; 2: "
                                      "unreadable files or nothing to evaluate.")
    bars.add_argument("files", nargs="+", metavar="RESULT.json")

    gate = sub.add_parser("gate", help="CPU regression gate: native kernels over eager PyTorch, "
                                       "the same run's ratios against a baseline's",
                          description="Measure how much faster the native CPU kernels run than "
                                      "eager PyTorch on a fixed set of blocks (ratios of "
                                      "paired calls in one process) and compare the ratios "
                                      "with a baseline's (vgg_kernels/bench/gate.py). Exit 0: "
                                      "no regression; 1: a regression; 2: errors.")
    gate.add_argument("--baseline", type=Path,
                      default=REPO_ROOT / "benchmarks" / "baselines" / "cpu-gate.json")
    gate.add_argument("--write-baseline", action="store_true",
                      help="write the measurement to --baseline instead of comparing")
    gate.add_argument("--out", type=Path, default=None, help="also write the measurement here")
    gate.add_argument("--repeats", type=int, default=21, help="paired rounds per case (21)")
    gate.add_argument("--baseline-runs", type=int, default=3,
                      help="with --write-baseline: runs whose per-case medians make the "
                           "baseline (default 3)")
    gate.add_argument("--cases", default=None, metavar="NAMES",
                      help="comma-separated case names (default: every case)")
    gate.add_argument("--threshold", type=float, default=None,
                      help="largest fall of the geometric mean of the ratios (default 0.10)")
    gate.add_argument("--case-threshold", type=float, default=None,
                      help="largest fall of one case's ratio (default 0.15)")
    gate.add_argument("--threads", type=int, default=None,
                      help="torch.set_num_threads (default: torch's choice)")

    show = sub.add_parser("show", help="print the tables of result files")
    show.add_argument("files", nargs="+", metavar="RESULT.json")
    return parser


def _settings(args: argparse.Namespace, suite: str, repeats: int | None,
              started: float) -> RunSettings:
    device = torch.device(args.device)
    kind = device.type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cuda[:N] or cpu (got {args.device!r})")
    warmup, default_repeats = DEFAULT_REPEATS[(suite, kind)]
    batch, resolution = DEFAULT_SHAPES[(suite, kind)]
    no_compile = getattr(args, "no_compile", False) or suite == "memory"
    settings = RunSettings(
        device=device,
        dtype_name=args.dtype or ("bf16" if kind == "cuda" else "fp32"),
        config=getattr(args, "config", suite),
        batch=args.batch if args.batch is not None else batch,
        resolution=args.resolution if args.resolution is not None else resolution,
        warmup=args.warmup if args.warmup is not None else warmup,
        repeats=repeats if repeats is not None else default_repeats,
        backends=parse_backends(args.backends),
        compile=not no_compile,
        compile_mode=getattr(args, "compile_mode", None),
        time_limit_s=args.time_limit,
        deadline=None if args.time_limit is None else started + args.time_limit,
    )
    if settings.batch <= 0 or settings.repeats <= 0 or settings.warmup < 0:
        raise ValueError("--batch and --repeats must be positive, --warmup non-negative")
    if settings.resolution <= 0:
        raise ValueError(f"--resolution must be positive (got {settings.resolution})")
    if suite == "unet":
        if args.width <= 0:
            raise ValueError(f"--width must be positive (got {args.width})")
        if settings.resolution < 16:
            raise ValueError(f"--resolution must be at least 16 for the UNet's four 2x2 "
                             f"max-pools (got {settings.resolution})")
        return settings
    if suite == "lpips":
        if settings.resolution < 16:
            raise ValueError(f"--resolution must be at least 16 for VGG16's four 2x2 "
                             f"max-pools before relu5_3 (got {settings.resolution})")
        return settings
    if suite == "perceptual":
        settings.taps = [name.strip() for name in args.taps.split(",") if name.strip()]
        indices = tap_indices(settings.config, settings.taps)
        letter, batch_norm = parse_config(settings.config)
        pools = sum(1 for name in layer_names(letter, batch_norm)[:max(indices)]
                    if name.startswith("pool"))
        if settings.resolution < 2 ** pools:
            raise ValueError(f"--resolution must be at least {2 ** pools} for taps down to "
                             f"{settings.taps[indices.index(max(indices))]} (got "
                             f"{settings.resolution})")
        return settings
    specs = layer_specs(settings.config, settings.resolution)
    if suite == "layers_train" and not specs[0].batch_norm:
        raise ValueError(NO_BN_MESSAGE.format(settings.config))
    names = [spec.name for spec in specs]
    wanted = getattr(args, "layers", None)
    if wanted:
        settings.layers = [name.strip() for name in wanted.split(",") if name.strip()]
        unknown = [name for name in settings.layers if name not in names]
        if unknown or not settings.layers:
            raise ValueError(f"--layers must name blocks of config {settings.config} "
                             f"({', '.join(names)}); got {wanted!r}")
    return settings


def _suites(args: argparse.Namespace) -> list[str]:
    """The result-file suites a run command measures."""
    if args.command == "all":
        return ["layers", "model"]
    if args.command == "layers" and args.mode == "train":
        return ["layers_train"]
    return [args.command]


def format_layers_train(suite: dict[str, Any]) -> str:
    """``format_layers`` under a line saying what one call is."""
    s = suite["settings"]
    return (f"training forward + backward per block ({s.get('precision', s['dtype'])}; "
            f"FLOPs: {s.get('flops', '3x the forward')}):\n" + format_layers(suite))


FORMATTERS = {"layers": format_layers, "layers_train": format_layers_train,
              "model": format_model, "perceptual": format_perceptual, "memory": format_memory,
              "lpips": format_clients, "unet": format_clients}


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    began = time.perf_counter()
    suites = _suites(args)
    try:
        plans = {suite: _settings(args, suite, getattr(args, "model_repeats", None)
                                  if suite == "model" and args.command == "all"
                                  else getattr(args, "repeats", None), began)
                 for suite in suites}
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    first = plans[suites[0]]
    if args.threads is not None:
        if args.threads <= 0:
            print(f"error: --threads must be positive (got {args.threads})", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    log = (lambda _: None) if args.quiet else print
    peak = measure_peaks(first.device, first.dtype, matmul_size=args.peak_size)
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": TOOL,
        "environment": collect_environment(first.device, argv),
        "peak": peak,
        "suites": {},
    }
    env = result["environment"]
    print(f"{env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
          f"{first.dtype_name} | peak {peak['matmul']['tflops']:.2f} TFLOP/s, "
          f"{peak['bandwidth']['gbps']:.1f} GB/s"
          + (f", L2 read {peak['l2_read']['gbps']:.0f} GB/s" if "l2_read" in peak else ""))
    interrupted = None
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for suite in suites:
            if interrupted:
                break
            plan = plans[suite]
            print(f"[{suite}] config {plan.config}, batch {plan.batch}, {plan.resolution}px, "
                  + ("no timing" if suite == "memory" else f"{plan.repeats} repeats"))
            try:
                if suite == "layers":
                    block = run_layers(plan, peak, log)
                elif suite == "layers_train":
                    block = run_layers_train(plan, peak, log)
                elif suite == "perceptual":
                    block = run_perceptual(plan, peak, log)
                elif suite == "memory":
                    block = run_memory(plan, log)
                elif suite == "lpips":
                    block = run_lpips(plan, log)
                elif suite == "unet":
                    block = run_unet(plan, args.width, log)
                else:
                    block = run_model(plan, log, compile_train=not args.no_compile_train)
                print(FORMATTERS[suite](block))
            except RunInterrupted as stop:  # before the suite's first case: nothing to keep
                interrupted = f"{stop}; the {suite} suite was not measured"
                break
            result["suites"][suite] = block
            interrupted = block["interrupted"]
    finally:
        signal.signal(signal.SIGTERM, previous)
    result["interrupted"] = interrupted
    result["wall_s"] = time.perf_counter() - began
    if not result["suites"]:
        print(f"INTERRUPTED: {interrupted}; nothing measured, no file written", file=sys.stderr)
        return INTERRUPTED_STATUS
    problems = validate_result(result)
    if problems:  # a bug in this tool, not in the measured code: say so loudly
        print("error: the result does not match its schema:\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return 3
    if args.out:
        path = write_result(result, args.out)
        print(f"wrote {path} ({result['wall_s']:.0f} s)")
    if interrupted:
        print(f"INTERRUPTED: {interrupted}", file=sys.stderr)
        return INTERRUPTED_STATUS
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise RunInterrupted(f"interrupted by signal {signal.Signals(signum).name} after "
                         f"{time.perf_counter() - _STARTED:.0f} s")


def _compare_pair(old_name: str, new: dict[str, Any], new_name: str,
                  args: argparse.Namespace) -> int:
    try:
        old = load_result(old_name)
    except ResultFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"old: {old_name}\nnew: {new_name}")
    comparison = compare_results(old, new, args.threshold)
    print(format_comparison(comparison, only_changes=args.only_changes))
    if comparison.regressions:
        print(f"FAILED: {len(comparison.regressions)} regression(s) beyond "
              f"{comparison.threshold:.0%}", file=sys.stderr)
        return 1
    if args.fail_on_missing and comparison.missing:
        print(f"FAILED: {len(comparison.missing)} figure(s) missing", file=sys.stderr)
        return 1
    return 0


def _compare(args: argparse.Namespace) -> int:
    if args.baseline_dir is None and len(args.files) != 2:
        print("error: compare needs OLD.json NEW.json (or NEW.json... with --baseline-dir)",
              file=sys.stderr)
        return 2
    news = args.files if args.baseline_dir is not None else args.files[1:]
    status = 0
    for new_name in news:
        try:
            new = load_result(new_name)
        except ResultFileError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        old_name = args.files[0]
        if args.baseline_dir is not None:
            slug = new["environment"].get("device_slug", "unknown")
            old_name = str(args.baseline_dir / f"{slug}.json")
            if not Path(old_name).exists():
                message = (f"no baseline {old_name} for device {slug!r}: nothing to compare "
                           f"{new_name} against. Make one with `python -m vgg_kernels.bench "
                           f"merge {old_name} <result files of this device>`.")
                print(("error: " if args.require_baseline else "note: ") + message)
                if args.require_baseline:
                    return 2
                continue
        outcome = _compare_pair(old_name, new, new_name, args)
        if outcome == 2:
            return 2
        status = max(status, outcome)
    return status


def _plot(args: argparse.Namespace) -> int:
    for name in args.files:
        try:
            result = load_result(name)
            out_dir = args.out_dir or Path(name).parent
            for path in plot_result(result, out_dir, Path(name).stem):
                print(f"wrote {path}")
        except ResultFileError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except PlotUnavailable as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0


def _readme(args: argparse.Namespace) -> int:
    try:
        changed = update_readme(args.readme, args.results_dir,
                                None if args.no_plots else args.plots_dir,
                                details=args.details)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.readme}: {'updated' if changed else 'unchanged'}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    try:
        merged = merge_results([load_result(name) for name in args.files])
    except ResultFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {write_result(merged, args.out)}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    status = 0
    for name in args.files:
        try:
            problems = validate_result(load_result(name))
        except ResultFileError as error:
            problems = [str(error)]
        print(f"{name}: " + ("valid" if not problems else "INVALID\n  " + "\n  ".join(problems)))
        status = status or (1 if problems else 0)
    return status


def _gate(args: argparse.Namespace) -> int:
    from vgg_kernels.bench import gate

    cases = gate.CASES
    if args.cases:
        wanted = [name.strip() for name in args.cases.split(",") if name.strip()]
        known = {case.name: case for case in gate.CASES}
        unknown = [name for name in wanted if name not in known]
        if unknown or not wanted:
            print(f"error: --cases must name gate cases ({', '.join(known)}); got "
                  f"{args.cases!r}", file=sys.stderr)
            return 2
        cases = tuple(known[name] for name in wanted)
    if (args.repeats <= 0 or args.baseline_runs <= 0
            or (args.threads is not None and args.threads <= 0)):
        print("error: --repeats, --baseline-runs and --threads must be positive",
              file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    baseline = None
    if not args.write_baseline:
        try:
            baseline = gate.load_gate(args.baseline)
        except (OSError, ValueError) as error:
            print(f"error: cannot read the baseline: {error}", file=sys.stderr)
            return 2
    try:
        runs = [gate.run_gate(cases, args.repeats)
                for _ in range(args.baseline_runs if args.write_baseline else 1)]
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = gate.merge_runs(runs) if len(runs) > 1 else runs[0]
    text = json.dumps(round_floats(result), indent=1) + "\n"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.write_baseline:
        args.baseline.parent.mkdir(parents=True, exist_ok=True)
        args.baseline.write_text(text)
        print(f"wrote {args.baseline} (geomean eager / native {result['geomean']:.2f})")
        return 0
    options = {key: value for key, value in (("threshold", args.threshold),
                                             ("case_threshold", args.case_threshold))
               if value is not None}
    passed, lines = gate.judge_gate(baseline, result, **options)
    print("\n".join(lines))
    if not passed:
        print("FAILED: the native kernels lost ground against eager PyTorch beyond the gate's "
              "thresholds", file=sys.stderr)
        return 1
    return 0


def _show(args: argparse.Namespace) -> int:
    for name in args.files:
        try:
            result = load_result(name)
        except ResultFileError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        env = result["environment"]
        print(f"{name}: {env.get('device_name')} | torch {env.get('torch')} | "
              f"triton {env.get('triton')} | commit {env.get('git_commit')}")
        for suite, block in result["suites"].items():
            formatter = FORMATTERS.get(suite)
            print(f"[{suite}]\n" + (formatter(block) if formatter else
                                    "(a suite this version of the tool does not know)"))
    return 0


def _bars(args: argparse.Namespace) -> int:
    named = []
    for name in args.files:
        try:
            named.append((name, load_result(name)))
        except ResultFileError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    bars = evaluate_bars(named)
    print(format_bars(bars))
    if not bars:
        return 2
    return 0 if all(bar.met for bar in bars) else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _build_parser().parse_args(argv)
    if args.command in ("layers", "model", "all", "perceptual", "memory", "lpips", "unet"):
        return _run(args, argv)
    return {"compare": _compare, "merge": _merge, "plot": _plot, "readme": _readme,
            "validate": _validate, "show": _show, "bars": _bars,
            "gate": _gate}[args.command](args)
