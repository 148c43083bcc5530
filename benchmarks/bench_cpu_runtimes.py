"""CPU inference of VGG16-BN across runtimes, side by side in one process with the same weights:
FusedVGG on the native kernels (as it comes, and after vgg_kernels.freeze) against torchvision's
eager model, torch.compile with freezing, onnxruntime and OpenVINO (f32), both on torchvision's
ONNX export.

    pip install -e ".[cpu-compare]"          # onnxruntime, openvino, onnx, onnxscript
    python benchmarks/bench_cpu_runtimes.py [--shapes 4x112,1x224] [--repeats 15]

Each shape is timed in interleaved rounds (one call of every runtime per round, so load from
other processes hits all alike); each runtime's output is checked against a float64 eager run
first. Bars (docs/native.md): FusedVGG at least 1.25x onnxruntime, 1.35x OpenVINO and 1.3x
torch.compile with freezing. Writes ``<cpu-slug>-<yyyymmdd>-<sha>-cpu_runtimes.json`` (the
environment with every runtime's version, every raw sample, medians, ratios, errors) into --out.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vgg_kernels  # noqa: E402
from vgg_kernels import FusedVGG  # noqa: E402
from vgg_kernels.backends import native  # noqa: E402
from vgg_kernels.bench.environment import cpu_name, git_commit, slugify  # noqa: E402

BARS = {"onnxruntime": 1.25, "openvino": 1.35, "compile_freezing": 1.3}
# FusedVGG as it comes, and after vgg_kernels.freeze (packed conv weights kept across calls)
FUSED_VARIANTS = ("fused", "fused_frozen")


def _randomised_model() -> nn.Module:
    """torchvision's vgg16_bn with random BN statistics (its init leaves BN an identity)."""
    import torchvision

    model = torchvision.models.vgg16_bn(weights=None).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _runtimes(model: nn.Module, x: torch.Tensor, folder: Path) -> tuple[dict, dict, dict]:
    """(callables by name, versions, skip reasons) for one input shape."""
    calls = {"eager": lambda: model(x)}
    versions = {"torch": torch.__version__}
    skipped = {}
    fused = FusedVGG.from_torchvision(model).eval()
    calls["fused"] = lambda: fused(x)
    frozen = vgg_kernels.freeze(FusedVGG.from_torchvision(model).eval())
    calls["fused_frozen"] = lambda: frozen(x)
    try:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(model))
        compiled(x)  # compiles (and freezes the weights) outside the timing
        calls["compile_freezing"] = lambda: compiled(x)
    except Exception as error:  # noqa: BLE001 - recorded
        skipped["compile_freezing"] = f"{type(error).__name__}: {error}"[:300]
    path = folder / f"vgg16_bn-{x.shape[0]}x{x.shape[2]}.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
    except Exception as error:  # noqa: BLE001 - recorded
        reason = f"the ONNX export failed: {type(error).__name__}: {error}"[:300]
        return calls, versions, {**skipped, "onnxruntime": reason, "openvino": reason}
    array = x.numpy()
    try:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        calls["onnxruntime"] = lambda: session.run(None, {name: array})[0]
        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError as error:
        skipped["onnxruntime"] = f"not installed ({error}); pip install onnxruntime"
    try:
        import openvino

        compiled_ov = openvino.Core().compile_model(str(path), "CPU",
                                                    {"INFERENCE_PRECISION_HINT": "f32"})
        request = compiled_ov.create_infer_request()
        calls["openvino"] = lambda: request.infer({0: array})[0]
        versions["openvino"] = openvino.__version__
    except ImportError as error:
        skipped["openvino"] = f"not installed ({error}); pip install openvino"
    return calls, versions, skipped


def _measure(batch: int, resolution: int, repeats: int, warmup: int, folder: Path) -> dict:
    torch.manual_seed(0)
    model = _randomised_model()
    x = torch.randn(batch, 3, resolution, resolution)
    with torch.no_grad():
        oracle = copy.deepcopy(model).double()(x.double())
        calls, versions, skipped = _runtimes(model, x, folder)
        errors = {}
        for name, fn in calls.items():
            out = torch.as_tensor(fn()).double()
            errors[name] = float((out - oracle).abs().max() / oracle.abs().max())
        for _ in range(warmup):
            for fn in calls.values():
                fn()
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(repeats):
            for name, fn in calls.items():
                began = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - began)
    medians = {name: statistics.median(s) for name, s in samples.items()}
    ratios = {f"{name}_over_fused": medians[name] / medians["fused"]
              for name in medians if name != "fused"}
    bars = {}
    for variant in FUSED_VARIANTS:
        for name, target in BARS.items():
            value = (medians[name] / medians[variant] if name in medians and variant in medians
                     else None)
            bars[f"{variant}_vs_{name}"] = {"variant": variant, "runtime": name,
                                            "target": target, "value": value,
                                            "met": (value or 0.0) >= target}
    return {"batch": batch, "resolution": resolution, "versions": versions,
            "skipped": skipped, "max_relative_error_vs_float64": errors,
            "samples_s": samples, "median_s": medians, "ratios": ratios, "bars": bars}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4x112,1x224",
                        help="comma-separated BATCHxRESOLUTION (default 4x112,1x224)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                        help="directory (or .json path) for the result file")
    args = parser.parse_args(argv)
    shapes = []
    for text in args.shapes.split(","):
        batch, _, resolution = text.strip().partition("x")
        if not (batch.isdigit() and resolution.isdigit()) or int(resolution) < 32:
            parser.error(f"--shapes must be BATCHxRESOLUTION with a resolution of 32 or more "
                         f"(got {text!r})")
        shapes.append((int(batch), int(resolution)))
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for batch, resolution in shapes:
            run = _measure(batch, resolution, args.repeats, args.warmup, Path(folder))
            runs.append(run)
            print(f"VGG16-BN, batch {batch}, {resolution}x{resolution}, fp32, "
                  f"{torch.get_num_threads()} threads")
            print(f"{'runtime':<18}{'median ms':>10}{'x / fused':>11}{'max err':>10}")
            for name, median in run["median_s"].items():
                print(f"{name:<18}{median * 1e3:>10.1f}"
                      f"{median / run['median_s']['fused']:>11.2f}"
                      f"{run['max_relative_error_vs_float64'][name]:>10.1e}")
            for name, reason in run["skipped"].items():
                print(f"skipped {name}: {reason}")
            for bar in run["bars"].values():
                if bar["value"] is not None:
                    print(f"bar: {bar['variant']} at least {bar['target']}x {bar['runtime']}: "
                          f"{bar['value']:.2f}x ({'met' if bar['met'] else 'MISSED'})")
    full_commit, dirty = git_commit()
    commit = full_commit[:7] if full_commit else "unknown"
    result = {
        "suite": "cpu_runtimes",
        "environment": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit,
            "tree_dirty": dirty,
            "cpu": cpu_name(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "native": native.build_info(),
        },
        "config": {"model": "torchvision vgg16_bn (random BN statistics) / FusedVGG",
                   "dtype": "float32", "repeats": args.repeats, "warmup": args.warmup,
                   "onnx": "torch.onnx.export(model, (x,), dynamo=True), per shape",
                   "openvino": "INFERENCE_PRECISION_HINT f32",
                   "compile": "torch._inductor.config.freezing = True; torch.compile(model)"},
        "runs": runs,
    }
    out = Path(args.out)
    if out.suffix != ".json":
        slug = slugify(cpu_name())
        day = datetime.date.today().strftime("%Y%m%d")
        out = out / f"{slug}-{day}-{commit}-cpu_runtimes.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
