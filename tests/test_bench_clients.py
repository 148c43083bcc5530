"""vgg_kernels.bench lpips and unet: tiny real CPU runs of the ``fuse()`` client suites (the lpips
package's LPIPS(net='vgg') distance + input gradient; the common UNet's training step), their
schema, figures, bars, the interleaved timer, and option checks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from vgg_kernels.bench import validate_result
from vgg_kernels.bench.bars import evaluate_bars
from vgg_kernels.bench.cli import main
from vgg_kernels.bench.results import tracked_figures
from vgg_kernels.bench.timing import time_interleaved


@pytest.fixture(scope="module")
def client_results(tmp_path_factory) -> dict[str, Path]:
    """Both suites on the CPU, native and eager, one timed call each."""
    pytest.importorskip("lpips")
    folder = tmp_path_factory.mktemp("bench")
    paths = {}
    for suite, extra in (("lpips", ["--batch", "1", "--resolution", "32"]),
                         ("unet", ["--batch", "2", "--resolution", "16", "--width", "4"])):
        out = folder / f"{suite}.json"
        status = main([suite, "--device", "cpu", *extra, "--backends",
                       "native,eager", "--no-compile", "--warmup", "0", "--repeats", "1",
                       "--peak-size", "128", "--quiet", "--out", str(out)])
        assert status == 0
        paths[suite] = out
    return paths


@pytest.mark.parametrize("suite, key", [("lpips", "lpips/vgg/b1/r32/fp32"),
                                        ("unet", "unet/unet-w4/b2/r16/fp32")])
def test_client_runs_are_schema_valid(client_results, suite, key):
    data = json.loads(client_results[suite].read_text())
    assert validate_result(data) == []
    block = data["suites"][suite]
    assert block["settings"]["variants"] == ["torch_eager", "eager_channels_last", "native"]
    assert {c["key"] for c in block["cases"]} == {f"{key}/torch_eager",
                                                 f"{key}/eager_channels_last", f"{key}/native"}
    native = next(c for c in block["cases"] if c["variant"] == "native")
    assert native["rel_error_vs_baseline"] < 1e-3  # the first call's gradient against eager's
    assert native["speedup"] == pytest.approx(block["cases"][0]["median_ms"]
                                              / native["median_ms"], rel=1e-5)
    figures = tracked_figures(data)
    assert figures[f"{key}/native/speedup"].better == "higher"
    assert f"{key}/torch_eager/speedup" not in figures
    if suite == "unet":
        assert native["loss_rel_error_vs_baseline"] < 1e-4


def _with_speedup(data: dict, suite: str, variant: str, speedup: float) -> dict:
    changed = copy.deepcopy(data)
    cases = changed["suites"][suite]["cases"]
    base = next(c for c in cases if c["variant"] == "torch_eager")["images_per_s"]
    for case in cases:
        if case["variant"] == variant:
            case["images_per_s"] = base * speedup
    return changed


def test_client_bars(client_results):
    lpips = json.loads(client_results["lpips"].read_text())
    unet = json.loads(client_results["unet"].read_text())
    bars = {bar.name.split(" (")[0]: bar for bar in evaluate_bars([
        ("lpips", _with_speedup(lpips, "lpips", "native", 1.4)),
        ("unet", _with_speedup(unet, "unet", "native", 1.1))])}
    lpips_bar = bars["native fuse(): lpips.LPIPS(net='vgg') distance + input gradient"]
    assert lpips_bar.target == 1.35 and lpips_bar.met
    unet_bar = bars["native fuse(): UNet training step"]
    assert unet_bar.target == 1.2 and not unet_bar.met
    gpu = json.loads(json.dumps(lpips).replace("torch_eager", "cudnn_eager"))
    gpu["environment"]["device_type"] = "cuda"
    block = gpu["suites"]["lpips"]
    compiled = copy.deepcopy(block["cases"][0])
    compiled.update(variant="torch_compile", key=compiled["key"].replace("cudnn_eager",
                                                                          "torch_compile"))
    block["cases"].append(compiled)
    block["settings"]["compile_mode"] = "max-autotune-no-cudagraphs"
    targets = sorted(bar.target for bar in evaluate_bars([("gpu", gpu)]))
    assert targets == [1.15, 1.5]


def test_time_interleaved_runs_every_function_in_each_round():
    calls: list[str] = []
    fns = {name: (lambda x, name=name: calls.append(name)) for name in ("a", "b")}
    samples = time_interleaved(fns, [0], device=torch.device("cpu"), warmup=1, repeats=3)
    assert calls == ["a", "b"] * 4
    assert {name: len(times) for name, times in samples.items()} == {"a": 3, "b": 3}


@pytest.mark.parametrize("arguments, message", [
    (["unet", "--width", "0"], "--width must be positive"),
    (["unet", "--resolution", "8"], "--resolution must be at least 16"),
    (["lpips", "--resolution", "8"], "--resolution must be at least 16"),
])
def test_client_bad_options_exit_2(arguments, message, capsys):
    assert main([*arguments, "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err
