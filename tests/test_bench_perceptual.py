"""vgg_kernels.bench perceptual: a tiny real CPU run of the perceptual-loss suite (frozen VGG16,
forward to the deepest tap + input gradient), its schema, compare, bars and option checks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from vgg_kernels.bench import compare_results, validate_result
from vgg_kernels.bench.bars import evaluate_bars
from vgg_kernels.bench.cli import main
from vgg_kernels.bench.perceptual import tap_indices
from vgg_kernels.bench.results import tracked_figures

KEY = "perceptual/vgg16/relu1_2+relu2_2/b1/r32/fp32"


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def perceptual_result(tmp_path_factory) -> Path:
    """VGG16 to relu2_2, batch 1, 32x32, native and eager, one timed call each (seconds)."""
    out = tmp_path_factory.mktemp("bench") / "perceptual.json"
    status = main(["perceptual", "--device", "cpu", "--batch", "1", "--resolution", "32",
                   "--taps", "relu1_2,relu2_2", "--backends", "native,eager", "--no-compile",
                   "--warmup", "0", "--repeats", "1", "--peak-size", "128", "--quiet", "--out",
                   str(out)])
    assert status == 0
    return out


def _scaled(result: dict, variant: str, factor: float) -> dict:
    """A copy with ``variant``'s images/s multiplied by ``factor`` (and speedup to match)."""
    changed = copy.deepcopy(result)
    for case in changed["suites"]["perceptual"]["cases"]:
        if case["variant"] == variant:
            for field in ("images_per_s", "images_per_s_low", "images_per_s_high", "speedup",
                          "speedup_low", "speedup_high"):
                case[field] *= factor
    return changed


def test_perceptual_run_is_schema_valid(perceptual_result):
    data = json.loads(perceptual_result.read_text())
    assert validate_result(data) == []
    suite = data["suites"]["perceptual"]
    assert suite["settings"]["taps"] == ["relu1_2", "relu2_2"]
    assert suite["settings"]["config"] == "vgg16"
    assert {c["key"] for c in suite["cases"]} == {f"{KEY}/torch_eager", f"{KEY}/native"}
    native = next(c for c in suite["cases"] if c["variant"] == "native")
    # fp32 input gradient of the fused path against eager's
    assert native["rel_error_vs_baseline"] < 1e-4
    # (files keep 6 significant digits)
    assert native["speedup"] == pytest.approx(
        suite["cases"][0]["median_ms"] / native["median_ms"], rel=1e-5)
    assert suite["summary"]["speedup"]["native"]["value"] == pytest.approx(native["speedup"])
    assert native["mean_rel_error_vs_baseline"] <= native["rel_error_vs_baseline"]
    # 2 x forward FLOPs: conv1_1, conv1_2 at 32px, conv2_1, conv2_2 at 16px
    forward = 2 * (32 * 32 * (64 * 3 + 64 * 64) + 16 * 16 * (128 * 64 + 128 * 128)) * 9
    assert suite["settings"]["flops_per_call"] == pytest.approx(2 * forward, rel=1e-5)
    assert suite["settings"]["variants"] == ["torch_eager", "native"]  # baseline first


def test_perceptual_compare_show_and_figures(perceptual_result, capsys):
    data = json.loads(perceptual_result.read_text())
    figures = tracked_figures(data)
    assert figures[f"{KEY}/native/speedup"].better == "higher"
    assert f"{KEY}/torch_eager/speedup" not in figures  # 1.0 by definition
    assert main(["compare", str(perceptual_result), str(perceptual_result)]) == 0
    verdicts = {c.key: c.verdict for c in compare_results(data, _scaled(data, "native", 0.5))
                .changes}
    assert verdicts[f"{KEY}/native/images_per_s"] == "regression"
    assert verdicts[f"{KEY}/native/speedup"] == "regression"
    assert main(["show", str(perceptual_result)]) == 0
    out = capsys.readouterr().out
    assert "perceptual loss: VGG vgg16 to relu2_2" in out and "grad x rel err max / mean" in out


def test_perceptual_bars(perceptual_result, tmp_path, capsys):
    data = json.loads(perceptual_result.read_text())
    rates = {c["variant"]: c["images_per_s"] for c in data["suites"]["perceptual"]["cases"]}
    (bar,) = evaluate_bars([("cpu", data)])
    assert bar.name == "native perceptual loss over torch_eager" and bar.target == 1.25
    assert bar.value == pytest.approx(rates["native"] / rates["torch_eager"])
    faster = _scaled(data, "native", 2.0 * rates["torch_eager"] / rates["native"])
    path = tmp_path / "faster.json"
    path.write_text(json.dumps(faster))
    assert main(["bars", str(path)]) == 0
    assert "native perceptual loss over torch_eager: 2.00x against 1.25x: met" in (
        capsys.readouterr().out)
    # on CUDA: 1.5x eager, and 1.15x torch.compile in max-autotune-no-cudagraphs mode
    gpu = json.loads(json.dumps(faster).replace("torch_eager", "cudnn_eager"))
    gpu["environment"]["device_type"] = "cuda"
    suite = gpu["suites"]["perceptual"]
    compiled = copy.deepcopy(suite["cases"][0])
    compiled.update(variant="torch_compile", key=f"{KEY}/torch_compile",
                    images_per_s=1.9 * rates["torch_eager"])
    suite["cases"].append(compiled)
    suite["settings"]["compile_mode"] = "max-autotune-no-cudagraphs"
    bars = {bar.name: bar for bar in evaluate_bars([("gpu", gpu)])}
    assert bars["native perceptual loss over cudnn_eager"].target == 1.5
    versus = bars["native perceptual loss over torch.compile (max-autotune-no-cudagraphs)"]
    assert versus.value == pytest.approx(2.0 / 1.9) and not versus.met
    suite["settings"]["compile_mode"] = "default"  # a weaker baseline: no bar
    assert len(evaluate_bars([("gpu", gpu)])) == 1


@pytest.mark.parametrize("arguments, message", [
    (["--taps", "relu1_2,conv9_9"], "--taps must name layers of vgg16"),
    (["--taps", "relu1_2,relu1_2"], "--taps must be distinct"),
    (["--resolution", "4"], "--resolution must be at least 8"),
])
def test_perceptual_bad_options_exit_2(arguments, message, capsys):
    assert main(["perceptual", "--device", "cpu", *arguments]) == 2
    assert message in capsys.readouterr().err


def test_tap_indices_follow_torchvision():
    assert tap_indices("vgg16", ["relu1_2", "relu2_2", "relu3_3", "relu4_3"]) == [3, 8, 15, 22]
    assert tap_indices("vgg16_bn", ["relu1_2"]) == [5]
