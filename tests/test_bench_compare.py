"""vgg_kernels.bench: compare's verdicts on synthetic result files, the schema of a real tiny CPU
run, merge, plot and the README section."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from vgg_kernels.bench import SCHEMA_VERSION, compare_results, judge, validate_result
from vgg_kernels.bench.cli import main
from vgg_kernels.bench.results import Figure, merge_results, tracked_figures
from vgg_kernels.bench.timing import percentile, summarize

PREFIX = "layers/D/b64/r224/bf16"


def _layers_suite(samples: dict[tuple[str, str], list[float]],
                  baseline: str = "cudnn_eager") -> dict:
    cases = []
    for (layer, backend), values in samples.items():
        stats = summarize(values)
        cases.append({"key": f"{PREFIX}/{layer}/{backend}", "layer": layer, "backend": backend,
                      "samples_ms": values, **stats.as_dict(), "tflops": 100.0 / stats.median,
                      "pct_of_peak": 10.0 / stats.median})
    base = {c["layer"]: c for c in cases if c["backend"] == baseline}
    for c in cases:
        b = base[c["layer"]]
        c["speedup"] = b["median_ms"] / c["median_ms"]
        c["speedup_low"] = b["p20_ms"] / c["p80_ms"]
        c["speedup_high"] = b["p80_ms"] / c["p20_ms"]
    geomean = {}
    for backend in dict.fromkeys(c["backend"] for c in cases):
        mine = [c for c in cases if c["backend"] == backend]
        geomean[backend] = {
            k: math.exp(sum(math.log(c[field]) for c in mine) / len(mine))
            for k, field in (("value", "speedup"), ("low", "speedup_low"),
                             ("high", "speedup_high"))}
        geomean[backend]["layers"] = len(mine)
    layers = [{"name": name, "index": i, "in_channels": 64, "out_channels": 64, "kernel": 3,
               "height": 56, "width": 56, "pool": False, "flops": 1e10, "bytes": 1e7,
               "intensity": 1e3} for i, name in enumerate(dict.fromkeys(k[0] for k in samples))]
    return {"settings": {"config": "D", "batch": 64, "resolution": 224, "dtype": "bf16",
                         "device": "cuda", "warmup": 1, "repeats": 5, "backends": ["all"],
                         "baseline": baseline, "compile_mode": None},
            "layers": layers, "cases": cases, "skipped": [],
            "summary": {"baseline": baseline, "geomean_speedup": geomean}}


def _result(samples: dict[tuple[str, str], list[float]], device_type: str = "cuda",
            model: dict | None = None) -> dict:
    peak_samples = [1.0, 1.01, 0.99]
    stats = summarize(peak_samples)
    result = {
        "schema_version": SCHEMA_VERSION,
        "tool": "vgg_kernels.bench",
        "environment": {"device_type": device_type, "device_name": "Synthetic GPU",
                        "device_slug": "synthetic-gpu" if device_type == "cuda" else "cpu",
                        "torch": "2.14.1", "triton": "3.8.0", "cuda": "13.0",
                        "python": "3.12", "git_commit": "0" * 40,
                        "date": "2026-01-01T00:00:00+00:00", "command_line": "synthetic"},
        "peak": {"matmul": {"size": 8192, "dtype": "bfloat16", "samples_ms": peak_samples,
                            **stats.as_dict(), "tflops": 700.0},
                 "bandwidth": {"samples_ms": peak_samples, **stats.as_dict(), "gbps": 3000.0}},
        "suites": {"layers": _layers_suite(samples)},
    }
    if model is not None:
        result["suites"]["model"] = model
    return result


def _model_suite(train_ms: list[float], memory: int) -> dict:
    stats = summarize(train_ms)
    case = {"key": "model/D/b64/r224/bf16/triton/train", "variant": "triton", "mode": "train",
            "samples_ms": train_ms, **stats.as_dict(), "images_per_s": 64e3 / stats.median,
            "images_per_s_low": 64e3 / stats.p80, "images_per_s_high": 64e3 / stats.p20,
            "peak_memory_bytes": memory, "peak_memory_note": "synthetic"}
    return {"settings": {"config": "D", "batch": 64, "resolution": 224, "dtype": "bf16",
                         "variants": ["triton"], "baseline": "cudnn_eager"},
            "cases": [case], "skipped": []}


def _spread(center: float, rel: float = 0.005) -> list[float]:
    """Five samples within +-rel of center (a quiet GPU)."""
    return [center * (1 + rel * f) for f in (-1.0, -0.5, 0.0, 0.5, 1.0)]


BASE = {("conv1_1", "cudnn_eager"): _spread(2.0), ("conv1_1", "triton"): _spread(1.0),
        ("conv2_1", "cudnn_eager"): _spread(4.0), ("conv2_1", "triton"): _spread(2.0)}


def _write(tmp_path: Path, name: str, data: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def _verdicts(old: dict, new: dict, threshold: float | None = None) -> dict[str, str]:
    return {c.key: c.verdict for c in compare_results(old, new, threshold).changes}


def test_synthetic_results_are_schema_valid():
    assert validate_result(_result(BASE, model=_model_suite(_spread(50.0), 2**30))) == []


def test_regression_fails(tmp_path, capsys):
    new = dict(BASE)
    new[("conv1_1", "triton")] = _spread(1.2)  # 20% slower, spreads far apart
    verdicts = _verdicts(_result(BASE), _result(new))
    assert verdicts[f"{PREFIX}/conv1_1/triton/ms"] == "regression"
    assert verdicts[f"{PREFIX}/conv2_1/triton/ms"] == "same"
    assert verdicts[f"{PREFIX}/geomean/triton/speedup"] == "regression"
    status = main(["compare", _write(tmp_path, "old.json", _result(BASE)),
                   _write(tmp_path, "new.json", _result(new))])
    out = capsys.readouterr()
    assert status == 1
    assert "REGRESSION" in out.out and "FAILED" in out.err


def test_improvement_passes(tmp_path):
    new = dict(BASE)
    new[("conv2_1", "triton")] = _spread(1.5)
    verdicts = _verdicts(_result(BASE), _result(new))
    assert verdicts[f"{PREFIX}/conv2_1/triton/ms"] == "improvement"
    assert verdicts[f"{PREFIX}/geomean/triton/speedup"] == "improvement"
    assert main(["compare", _write(tmp_path, "old.json", _result(BASE)),
                 _write(tmp_path, "new.json", _result(new))]) == 0


def test_noise_does_not_fail(tmp_path):
    # a noisy old run: median 1.0 but p80 at ~1.3; the new median is 15% slower, yet its fast
    # end is within the old spread, so the rule calls it noise, not a regression
    noisy = dict(BASE)
    noisy[("conv1_1", "triton")] = [0.9, 0.95, 1.0, 1.3, 1.35]
    new = dict(BASE)
    new[("conv1_1", "triton")] = [1.0, 1.1, 1.15, 1.2, 1.4]
    verdicts = _verdicts(_result(noisy), _result(new))
    assert verdicts[f"{PREFIX}/conv1_1/triton/ms"] == "noise"
    assert main(["compare", _write(tmp_path, "old.json", _result(noisy)),
                 _write(tmp_path, "new.json", _result(new))]) == 0


def test_threshold_flag_and_cpu_default():
    new = dict(BASE)
    new[("conv1_1", "triton")] = _spread(1.15)  # 15% slower, quiet spreads
    key = f"{PREFIX}/conv1_1/triton/ms"
    assert _verdicts(_result(BASE), _result(new))[key] == "regression"  # GPU default 5%
    assert _verdicts(_result(BASE), _result(new), threshold=0.2)[key] == "same"
    cpu_old, cpu_new = _result(BASE, "cpu"), _result(new, "cpu")
    assert compare_results(cpu_old, cpu_new).threshold == 0.25
    assert _verdicts(cpu_old, cpu_new)[key] == "same"
    new[("conv1_1", "triton")] = _spread(1.4)
    assert _verdicts(_result(BASE, "cpu"), _result(new, "cpu"))[key] == "regression"


def test_judge_directions():
    old_time = Figure(1.0, 0.99, 1.01, "lower", "ms")
    assert judge(old_time, Figure(1.2, 1.19, 1.21, "lower", "ms"), 0.05) == "regression"
    assert judge(old_time, Figure(0.8, 0.79, 0.81, "lower", "ms"), 0.05) == "improvement"
    old_rate = Figure(100.0, 99.0, 101.0, "higher", "img/s")
    assert judge(old_rate, Figure(80.0, 79.0, 81.0, "higher", "img/s"), 0.05) == "regression"
    assert judge(old_rate, Figure(120.0, 119.0, 121.0, "higher", "img/s"), 0.05) == "improvement"
    assert judge(old_rate, Figure(101.0, 99.0, 103.0, "higher", "img/s"), 0.05) == "same"


def test_model_throughput_and_memory_are_tracked():
    old = _result(BASE, model=_model_suite(_spread(50.0), 10 * 2**30))
    new = _result(BASE, model=_model_suite(_spread(50.0), 12 * 2**30))
    figures = tracked_figures(new)
    key = "model/D/b64/r224/bf16/triton/train"
    assert figures[f"{key}/images_per_s"].better == "higher"
    verdicts = _verdicts(old, new)
    assert verdicts[f"{key}/peak_memory"] == "regression"
    assert verdicts[f"{key}/images_per_s"] == "same"


def test_missing_cases_are_reported_not_failed(tmp_path, capsys):
    old = _result(BASE)
    new = _result({k: v for k, v in BASE.items() if k != ("conv2_1", "triton")})
    comparison = compare_results(old, new)
    assert f"{PREFIX}/conv2_1/triton/ms" in comparison.missing
    assert comparison.regressions == []
    verdicts = {c.key: c.verdict for c in comparison.changes}
    assert verdicts[f"{PREFIX}/geomean/triton/speedup"] == "incomparable"  # 1 layer vs 2
    old_path, new_path = _write(tmp_path, "old.json", old), _write(tmp_path, "new.json", new)
    assert main(["compare", old_path, new_path]) == 0
    assert "missing in new" in capsys.readouterr().out
    assert main(["compare", old_path, new_path, "--fail-on-missing"]) == 1
    # and the other way round: a new backend is listed as new, not a failure
    assert main(["compare", new_path, old_path]) == 0
    assert "new figure" in capsys.readouterr().out


def test_schema_mismatch_is_an_error(tmp_path, capsys):
    newer = _result(BASE)
    newer["schema_version"] = SCHEMA_VERSION + 1
    status = main(["compare", _write(tmp_path, "old.json", _result(BASE)),
                   _write(tmp_path, "new.json", newer)])
    assert status == 2
    assert "schema_version" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("not json")
    assert main(["compare", str(tmp_path / "junk.json"), str(tmp_path / "old.json")]) == 2


def test_baseline_dir(tmp_path, capsys):
    new_path = _write(tmp_path, "new.json", _result(BASE))
    baselines = tmp_path / "baselines"
    baselines.mkdir()
    assert main(["compare", "--baseline-dir", str(baselines), new_path]) == 0
    assert "no baseline" in capsys.readouterr().out
    assert main(["compare", "--baseline-dir", str(baselines), "--require-baseline",
                 new_path]) == 2
    slower = dict(BASE)
    slower[("conv2_1", "cudnn_eager")] = _spread(5.0)
    _write(baselines, "synthetic-gpu.json", _result(BASE))
    assert main(["compare", "--baseline-dir", str(baselines), new_path,
                 _write(tmp_path, "slower.json", _result(slower))]) == 1


def test_merge_combines_suites(tmp_path):
    layers_only = _result(BASE)
    model_only = _result(BASE, model=_model_suite(_spread(50.0), 2**30))
    del model_only["suites"]["layers"]
    merged = merge_results([layers_only, model_only])
    assert set(merged["suites"]) == {"layers", "model"}
    assert validate_result(merged) == []
    with pytest.raises(ValueError, match="appears twice"):
        merge_results([layers_only, copy.deepcopy(layers_only)])
    out = tmp_path / "baseline.json"
    assert main(["merge", str(out), _write(tmp_path, "a.json", layers_only),
                 _write(tmp_path, "b.json", model_only)]) == 0
    assert validate_result(json.loads(out.read_text())) == []


def test_percentile_matches_linear_rule():
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 20) == pytest.approx(1.8)
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0


@pytest.fixture(scope="module")
def tiny_cpu_result(tmp_path_factory) -> Path:
    """A real, tiny CPU `layers` run (config A, batch 1, 32x32, 2 repeats): about a second."""
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    status = main(["layers", "--device", "cpu", "--config", "A", "--batch", "1",
                   "--resolution", "32", "--dtype", "fp32", "--warmup", "0", "--repeats", "2",
                   "--no-compile", "--peak-size", "128", "--quiet", "--out", str(out)])
    assert status == 0
    return out


def test_tiny_cpu_layers_run_is_schema_valid(tiny_cpu_result):
    data = json.loads(tiny_cpu_result.read_text())
    assert validate_result(data) == []
    suite = data["suites"]["layers"]
    assert [layer["name"] for layer in suite["layers"]] == [
        "conv1_1", "conv2_1", "conv3_1", "conv3_2", "conv4_1", "conv4_2", "conv5_1", "conv5_2"]
    backends = {c["backend"] for c in suite["cases"]}
    assert {"torch_eager", "reference"} <= backends and "triton" not in backends
    skipped = {s["backend"]: s["reason"] for s in suite["skipped"]}
    assert "interpreter" in skipped["triton"] and "--no-compile" in skipped["torch_compile"]
    assert all(len(c["samples_ms"]) == 2 and c["rel_error_vs_baseline"] < 1e-5
               for c in suite["cases"])
    assert data["environment"]["device_slug"] == "cpu"
    assert main(["validate", str(tiny_cpu_result)]) == 0
    assert main(["compare", str(tiny_cpu_result), str(tiny_cpu_result)]) == 0


def test_plot_writes_pngs(tiny_cpu_result, tmp_path):
    pytest.importorskip("matplotlib", reason="plot needs the optional matplotlib (bench extra)")
    assert main(["plot", str(tiny_cpu_result), "--out-dir", str(tmp_path)]) == 0
    for chart in ("speedup", "roofline"):
        png = tmp_path / f"{tiny_cpu_result.stem}-{chart}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"


def test_readme_section(tmp_path):
    from vgg_kernels.bench.readme import END, NO_RESULT, START, render_section, update_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nintro\n\n{START}\nold text\n{END}\n")
    assert update_readme(readme, tmp_path, None)  # no git, no committed result here
    assert readme.read_text() == f"# x\n\nintro\n\n{START}\n{NO_RESULT}\n{END}\n"
    assert not update_readme(readme, tmp_path, None)
    text = render_section(_result(BASE, model=_model_suite(_spread(50.0), 2**30)),
                          "benchmarks/results/x.json", ["benchmarks/plots/x-speedup.png"])
    assert "| conv1_1 |" in text and "2.00x" in text and "x-speedup.png" in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="bench:start"):
        update_readme(readme, tmp_path, None)


def test_time_limit_skips_compile_with_reason(tmp_path):
    out = tmp_path / "limited.json"
    assert main(["layers", "--device", "cpu", "--config", "A", "--batch", "1", "--resolution",
                 "32", "--warmup", "0", "--repeats", "1", "--backends", "compile",
                 "--time-limit", "0", "--peak-size", "128", "--quiet", "--out", str(out)]) == 0
    suite = json.loads(out.read_text())["suites"]["layers"]
    assert {c["backend"] for c in suite["cases"]} == {"torch_eager"}
    reasons = [s["reason"] for s in suite["skipped"] if s["backend"] == "torch_compile"]
    assert len(reasons) == 8 and all("--time-limit" in r for r in reasons)


def test_bad_arguments_exit_2(capsys):
    assert main(["layers", "--device", "cpu", "--batch", "0"]) == 2
    assert main(["layers", "--device", "cpu", "--backends", "cudnn,triton"]) == 2
    assert "--backends" in capsys.readouterr().err
    assert main(["layers", "--device", "cpu", "--config", "A", "--layers", "conv1_2"]) == 2
    assert "conv1_1, conv2_1" in capsys.readouterr().err


def test_layers_option_times_only_the_named_blocks(tmp_path):
    out = tmp_path / "two.json"
    assert main(["layers", "--device", "cpu", "--config", "A", "--batch", "1", "--resolution",
                 "32", "--repeats", "2", "--warmup", "0", "--backends", "eager", "--no-compile",
                 "--layers", "conv5_2,conv1_1", "--peak-size", "128", "--quiet", "--out",
                 str(out)]) == 0
    data = json.loads(out.read_text())
    assert validate_result(data) == []
    suite = data["suites"]["layers"]
    assert [layer["name"] for layer in suite["layers"]] == ["conv1_1", "conv5_2"]
    assert suite["settings"]["layers"] == ["conv5_2", "conv1_1"]


def test_readme_uses_newest_committed_gpu_result(tmp_path):
    import subprocess

    from vgg_kernels.bench.readme import END, START, update_readme

    if subprocess.run(["git", "--version"], capture_output=True, check=False).returncode:
        pytest.skip("needs git to tell committed result files from others")
    results = tmp_path / "results"
    results.mkdir()
    older, newer = _result(BASE), _result(BASE)
    newer["environment"]["date"] = "2026-02-01T00:00:00+00:00"
    newer["suites"]["layers"]["cases"][0]["median_ms"] = 1.234
    _write(results, "gpu-old.json", older)
    _write(results, "gpu-new.json", newer)
    _write(results, "cpu.json", _result(BASE, "cpu"))
    _write(results, "uncommitted.json", _result(BASE) | {"environment": {
        **older["environment"], "date": "2027-01-01T00:00:00+00:00"}})
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "results/gpu-old.json", "results/gpu-new.json",
                    "results/cpu.json"], cwd=tmp_path, check=True)
    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\n{END}\n")
    details = tmp_path / "docs" / "benchmarks.md"
    details.parent.mkdir()
    details.write_text(f"# Benchmarks\n\n{START}\n{END}\n")
    assert update_readme(readme, results, None, details=details)
    text = readme.read_text()
    assert "gpu-new.json" in text and "Synthetic GPU" in text
    assert "1.234" not in text and "docs/benchmarks.md" in text  # the per-block table moved
    assert "1.234" in details.read_text() and "gpu-new.json" in details.read_text()


def test_interrupted_run_still_writes_what_it_measured(tmp_path, monkeypatch):
    from vgg_kernels.bench import layers as bench_layers
    from vgg_kernels.bench.settings import RunInterrupted

    real = bench_layers._run_layer

    def stop_at_conv3_1(spec, *args, **kwargs):
        if spec.name == "conv3_1":  # what the SIGTERM handler raises under an outer `timeout`
            raise RunInterrupted("interrupted by signal SIGTERM")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(bench_layers, "_run_layer", stop_at_conv3_1)
    out = tmp_path / "partial.json"
    status = main(["layers", "--device", "cpu", "--config", "A", "--batch", "1",
                   "--resolution", "32", "--warmup", "0", "--repeats", "1", "--no-compile",
                   "--backends", "reference", "--peak-size", "128", "--quiet", "--out", str(out)])
    assert status == 124
    data = json.loads(out.read_text())
    assert validate_result(data) == []
    assert "SIGTERM" in data["interrupted"]
    assert [layer["name"] for layer in data["suites"]["layers"]["layers"]] == ["conv1_1", "conv2_1"]


def test_table_names_the_triton_config_each_layer_ran():
    suite = _layers_suite(BASE)
    triton = next(c for c in suite["cases"] if c["backend"] == "triton")
    triton["kernel_config"] = {"label": "tma 8x16/256/64 w8 s3 p1", "USE_TMA": True}
    from vgg_kernels.bench.layers import format_layers

    table = format_layers(suite)
    assert "triton configs: conv1_1 tma 8x16/256/64 w8 s3 p1" in table
    assert validate_result(_result(BASE)) == []


def test_l2_read_kernel_reads_every_element_each_pass():
    """The kernel behind peak.l2_read (timed on CUDA only) sums what it reads, so none of its
    loads is dead code; the interpreter checks the sums."""
    pytest.importorskip("triton")
    from vgg_kernels.backends.triton import interpreting
    from vgg_kernels.bench.peak import measure_l2_bandwidth

    assert measure_l2_bandwidth(torch.device("cpu"), warmup=1, repeats=1) is None
    if not interpreting():
        pytest.skip("the CPU runs Triton kernels only under TRITON_INTERPRET=1")
    from vgg_kernels.bench.l2_read import l2_read_kernel

    x = torch.rand(3000)
    out = torch.empty(2 * 256)
    l2_read_kernel[(2,)](x, out, x.numel(), 3, BLOCK=256)
    torch.testing.assert_close(out.sum(), 3 * x.sum(), rtol=1e-5, atol=1e-3)
