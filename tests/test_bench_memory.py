"""vgg_kernels.bench memory: what the saved-tensor count includes, and a real CPU measurement
of VGG16-BN's training step, fused native against eager (the fused chain keeps one tensor per
block where eager keeps the conv input, the BN input and the ReLU output)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from vgg_kernels.bench import compare_results, validate_result
from vgg_kernels.bench.bars import MEMORY_VS_EAGER, evaluate_bars
from vgg_kernels.bench.cli import main
from vgg_kernels.bench.memory import saved_tensor_bytes
from vgg_kernels.bench.results import merge_results, tracked_figures

KEY = "memory/D/b2/r32/fp32"


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def memory_result(tmp_path_factory) -> Path:
    """FusedVGG('D') (VGG16-BN) native and the eager model, batch 2, 32x32, fp32."""
    out = tmp_path_factory.mktemp("bench") / "memory.json"
    status = main(["memory", "--device", "cpu", "--config", "D", "--batch", "2",
                   "--resolution", "32", "--backends", "native,eager", "--warmup", "0",
                   "--peak-size", "128", "--quiet", "--out", str(out)])
    assert status == 0
    return out


def cases_of(result: dict) -> dict[str, dict]:
    return {case["variant"]: case for case in result["suites"]["memory"]["cases"]}


def test_saved_bytes_count_each_storage_once_without_parameters():
    scale = nn.Parameter(torch.randn(64))
    model = nn.Module()
    model.scale = scale
    model.register_buffer("offset", torch.randn(64))
    x = torch.randn(64, requires_grad=True)

    def step() -> torch.Tensor:
        y = x * model.scale  # saves x and the parameter
        z = y.view(8, 8)
        # saves z twice (one storage, y's) and the buffer
        return (z * z).sum() + (model.offset * y).sum()

    figures = saved_tensor_bytes(model, step, (x,))
    assert figures["saved_bytes"] == 2 * 64 * 4  # x and y, once each
    assert figures["saved_storages"] == 2
    assert figures["saved_input_bytes"] == 64 * 4
    assert figures["saved_tensors"] >= 4
    assert x.grad is not None  # the backward ran, so the saved tensors were freed


def test_fused_vgg16_bn_saves_under_0_6_of_eager(memory_result):
    data = json.loads(memory_result.read_text())
    assert validate_result(data) == []
    suite = data["suites"]["memory"]
    cases = {c["variant"]: c for c in suite["cases"]}
    assert set(cases) == {"torch_eager", "native"}
    eager, native = cases["torch_eager"], cases["native"]
    assert eager["key"] == f"{KEY}/torch_eager" and native["key"] == f"{KEY}/native"
    ratio = native["saved_bytes"] / eager["saved_bytes"]
    assert native["saved_ratio_to_eager"] == pytest.approx(ratio)
    assert ratio < MEMORY_VS_EAGER, (
        f"native saves {native['saved_bytes']} B against eager's {eager['saved_bytes']} B "
        f"({ratio:.3f}x)")
    assert native["peak_growth_bytes"] is None and "CPU" in native["peak_growth_note"]
    # both keep the input batch (the first conv's input): 2 x 3 x 32 x 32 fp32
    assert eager["saved_input_bytes"] == native["saved_input_bytes"] == 2 * 3 * 32 * 32 * 4


def test_memory_bars_compare_and_show(memory_result, tmp_path, capsys):
    data = json.loads(memory_result.read_text())
    (bar,) = evaluate_bars([("cpu", data)])
    assert bar.name.startswith("native activation memory of a training step over torch_eager")
    assert bar.better == "lower" and bar.met and bar.target == 0.6
    assert main(["bars", str(memory_result)]) == 0
    assert "at most 0.60x: met" in capsys.readouterr().out
    figures = tracked_figures(data)
    assert figures[f"{KEY}/native/saved_ratio"].better == "lower"
    assert f"{KEY}/torch_eager/saved_ratio" not in figures
    assert main(["compare", str(memory_result), str(memory_result)]) == 0
    grown = copy.deepcopy(data)
    native = next(c for c in grown["suites"]["memory"]["cases"] if c["variant"] == "native")
    native["saved_bytes"] = int(native["saved_bytes"] * 1.5)
    native["saved_ratio_to_eager"] *= 1.5
    verdicts = {c.key: c.verdict for c in compare_results(data, grown).changes}
    assert verdicts[f"{KEY}/native/saved_memory"] == "regression"
    assert verdicts[f"{KEY}/torch_eager/saved_memory"] == "same"
    native["saved_bytes"] = int(0.9 * cases_of(grown)["torch_eager"]["saved_bytes"])
    (bar,) = evaluate_bars([("grown", grown)])
    assert bar.value == pytest.approx(0.9, rel=1e-6)
    assert not bar.met and "0.90x against at most 0.60x: missed by 1.50x" in bar.line()
    assert main(["show", str(memory_result)]) == 0
    assert "saved / eager" in capsys.readouterr().out


def test_merge_of_the_new_suites(memory_result, tmp_path):
    data = json.loads(memory_result.read_text())
    other = copy.deepcopy(data)
    other["suites"] = {"perceptual": {"settings": {"taps": ["relu1_2"]}, "cases": [],
                                      "skipped": [], "summary": {"baseline": "torch_eager",
                                                                 "speedup": {}}}}
    other["interrupted"] = "interrupted by signal SIGTERM"
    merged = merge_results([data, other])
    assert set(merged["suites"]) == {"memory", "perceptual"}
    assert validate_result(merged) == []
    assert merged["interrupted"] == "perceptual: interrupted by signal SIGTERM"
    unknown = copy.deepcopy(data)
    unknown["suites"] = {"memory_v2": data["suites"]["memory"]}
    with pytest.raises(ValueError, match="unknown suite 'memory_v2'"):
        merge_results([data, unknown])
    bad = copy.deepcopy(data)
    bad["suites"]["memory"]["cases"][0]["saved_bytes"] = -1
    assert any("saved_bytes must be a non-negative integer" in p for p in validate_result(bad))
