"""The CPU regression gate (python -m vgg_kernels.bench gate): ratios of the native kernels to
eager PyTorch measured in one run, judged against a baseline's; an injected 25% slowdown of the
kernels (the test-only VGG_KERNELS_TEST_SLOWDOWN) fails it, the same kernels pass it."""

from __future__ import annotations

import json

import pytest
import torch

from vgg_kernels.backends import available_backends
from vgg_kernels.bench.cli import main
from vgg_kernels.bench.gate import judge_gate

CASES = "infer-128-128-56,train-256-256-28"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    if available_backends(torch.device("cpu"), torch.float32)["native"] is not None:
        pytest.skip("the gate measures the native CPU kernels, which are not built here")
    path = tmp_path_factory.mktemp("gate") / "baseline.json"
    assert main(["gate", "--write-baseline", "--baseline", str(path), "--cases", CASES,
                 "--repeats", "9", "--threads", "1", "--baseline-runs", "1"]) == 0
    return path


def test_the_same_kernels_pass_the_gate(baseline, tmp_path):
    out = tmp_path / "run.json"
    assert main(["gate", "--baseline", str(baseline), "--cases", CASES, "--repeats", "9",
                 "--threads", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {c["name"] for c in data["cases"]} == set(CASES.split(","))
    assert all(len(c["ratios"]) == 9 for c in data["cases"])


def test_a_baseline_is_the_median_of_its_runs():
    from vgg_kernels.bench.gate import merge_runs

    def run(ratios):
        return {"cases": [{"name": f"c{i}", "ratio": r} for i, r in enumerate(ratios)]}

    merged = merge_runs([run([1.0, 2.0]), run([3.0, 2.2]), run([2.0, 1.8])])
    assert [c["ratio"] for c in merged["cases"]] == [2.0, 2.0]
    assert merged["geomean"] == pytest.approx(2.0) and merged["runs"] == 3


def test_a_25_percent_slower_kernel_fails_the_gate(baseline, monkeypatch, capsys):
    monkeypatch.setenv("VGG_KERNELS_TEST_SLOWDOWN", "1.25")
    assert main(["gate", "--baseline", str(baseline), "--cases", CASES, "--repeats", "9",
                 "--threads", "1"]) == 1
    assert "REGRESSION" in capsys.readouterr().out


def test_judge_gate_thresholds():
    def result(ratios):
        cases = [{"name": f"c{i}", "ratio": r} for i, r in enumerate(ratios)]
        geomean = 1.0
        for r in ratios:
            geomean *= r ** (1 / len(ratios))
        return {"cases": cases, "geomean": geomean}

    base = result([2.0, 2.0, 2.0])
    assert judge_gate(base, result([1.9, 1.9, 2.0]))[0]          # -5%: noise
    assert not judge_gate(base, result([1.6, 2.0, 2.0]))[0]      # one case -20%
    assert not judge_gate(base, result([1.76, 1.76, 1.76]))[0]   # every case -12%: the geomean


@pytest.mark.parametrize("arguments, message", [
    (["--cases", "infer-9-9-9"], "--cases must name gate cases"),
    (["--repeats", "0"], "--repeats, --baseline-runs and --threads must be positive"),
    (["--baseline", "/nonexistent/gate.json"], "cannot read the baseline"),
])
def test_gate_bad_arguments_exit_2(arguments, message, capsys):
    assert main(["gate", *arguments]) == 2
    assert message in capsys.readouterr().err
