"""``python -m vgg_kernels.bench bars``: the performance bars on the committed H200 results (where
they are missed) and on the same files made to meet every bar."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from vgg_kernels.bench.bars import evaluate_bars
from vgg_kernels.bench.cli import main

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
LAYERS = RESULTS / "nvidia-h200-20261126-c0bb73a-layers.json"
MODEL = RESULTS / "nvidia-h200-20261126-c0bb73a-model.json"


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _bars(*results: dict) -> dict:
    return {bar.name: bar for bar in evaluate_bars([("file", r) for r in results])}


def test_committed_h200_results_against_the_bars():
    layers, model = _load(LAYERS), _load(MODEL)
    bars = _bars(layers, model)
    summary = layers["suites"]["layers"]["summary"]["geomean_speedup"]
    triton = bars["triton per-block geomean over cuDNN eager"]
    assert triton.value == pytest.approx(summary["triton"]["value"], rel=1e-4)
    assert not triton.met
    native = bars["native per-block geomean over cuDNN eager"]
    assert native.value == pytest.approx(summary["native"]["value"], rel=1e-4)
    assert not native.met
    peak = bars["triton blocks with C >= 64, lowest % of the bf16 peak"]
    wide = [c["pct_of_peak"] for c in layers["suites"]["layers"]["cases"]
            if c["backend"] == "triton" and c["layer"] != "conv1_1"]
    assert peak.value == pytest.approx(min(wide)) and not peak.met
    assert "conv4_2 59%" in peak.detail and "conv4_3" not in peak.detail
    # conv1_2: 236.8 GFLOP at the run's 795 TFLOP/s, against 514 MB at 4.2 TB/s
    assert "conv1_2 33% (0.910 ms; floor 0.298 ms, FLOP-bound)" in peak.detail
    inference = {c["variant"]: c["images_per_s"] for c in model["suites"]["model"]["cases"]
                 if c["mode"] == "inference"}
    eager = bars["triton model inference over eager"]
    assert eager.value == pytest.approx(inference["triton"] / inference["cudnn_eager"])
    assert eager.met
    compiled = bars["triton model inference over torch.compile (max-autotune-no-cudagraphs)"]
    assert compiled.value == pytest.approx(inference["triton"] / inference["torch_compile"])
    assert not compiled.met
    assert "missed by" in compiled.line() and "met" in eager.line()


def test_exit_status_follows_the_bars(tmp_path, capsys):
    assert main(["bars", str(LAYERS), str(MODEL)]) == 1
    assert "missed by" in capsys.readouterr().out
    layers, model = _load(LAYERS), _load(MODEL)
    suite = layers["suites"]["layers"]
    base = {c["layer"]: c["median_ms"] for c in suite["cases"] if c["backend"] == "cudnn_eager"}
    for case in suite["cases"]:
        if case["backend"] in ("triton", "native"):
            case["median_ms"] = base[case["layer"]] / 2
            case["pct_of_peak"] = max(case["pct_of_peak"], 61.0)
    for case in model["suites"]["model"]["cases"]:
        if case["variant"] == "triton":
            case["images_per_s"] = 20000.0
    paths = []
    for name, result in (("layers.json", layers), ("model.json", model)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(result))
    assert main(["bars", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert "missed" not in out and out.count(": met") == 5
    bars = _bars(layers, model)
    assert math.isclose(bars["triton per-block geomean over cuDNN eager"].value, 2.0)


def test_switches_name_the_bar_and_nothing_to_evaluate_is_an_error(tmp_path, capsys):
    layers = copy.deepcopy(_load(LAYERS))
    layers["environment"]["switches"] = {"VGG_KERNELS_NATIVE_WGMMA": "auto"}
    names = list(_bars(layers))
    assert "native per-block geomean over cuDNN eager [VGG_KERNELS_NATIVE_WGMMA=auto]" in names
    layers["suites"] = {}
    path = tmp_path / "empty.json"
    path.write_text(json.dumps(layers))
    assert main(["bars", str(path)]) == 2
    assert "no bar can be evaluated" in capsys.readouterr().out
