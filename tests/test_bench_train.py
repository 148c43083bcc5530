"""vgg_kernels.bench on the training path: ``layers --mode train`` (suite layers_train) on a tiny
CPU run, its schema, compare and bars; the model suite's autocast training step (mode
train_amp) and the comparison of files written before and after it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from vgg_kernels.bench import compare_results, validate_result
from vgg_kernels.bench.bars import evaluate_bars
from vgg_kernels.bench.cli import main
from vgg_kernels.bench.results import merge_results, tracked_figures

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
H200_MODEL = RESULTS / "nvidia-h200-20261126-c0bb73a-model.json"
PREFIX = "layers-train/A/b1/r32/fp32"


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def train_result(tmp_path_factory) -> Path:
    """A real tiny CPU run: VGG A, batch 1, 32x32, conv1_1 (+pool) and conv3_1, native and
    eager, one timed call each (a few seconds)."""
    out = tmp_path_factory.mktemp("bench") / "layers-train.json"
    status = main(["layers", "--mode", "train", "--device", "cpu", "--config", "A", "--batch",
                   "1", "--resolution", "32", "--dtype", "fp32", "--layers", "conv1_1,conv3_1",
                   "--backends", "native,eager", "--no-compile", "--warmup", "0", "--repeats",
                   "1", "--peak-size", "128", "--quiet", "--out", str(out)])
    assert status == 0
    return out


def _as_gpu(result: dict) -> dict:
    """The CPU result relabelled as a CUDA one (baseline cudnn_eager), for the GPU-only bars."""
    gpu = json.loads(json.dumps(result).replace("torch_eager", "cudnn_eager"))
    gpu["environment"]["device_type"] = "cuda"
    return gpu


def test_layers_train_run_is_schema_valid(train_result):
    data = json.loads(train_result.read_text())
    assert validate_result(data) == []
    assert list(data["suites"]) == ["layers_train"]
    suite = data["suites"]["layers_train"]
    assert suite["settings"]["mode"] == "train" and "3x" in suite["settings"]["flops"]
    assert [layer["name"] for layer in suite["layers"]] == ["conv1_1", "conv3_1"]
    keys = {c["key"] for c in suite["cases"]}
    assert keys == {f"{PREFIX}/{layer}/{backend}" for layer in ("conv1_1", "conv3_1")
                    for backend in ("torch_eager", "native")}
    for case in suite["cases"]:
        assert len(case["samples_ms"]) == 1
        if case["backend"] == "native":
            errors = case["rel_errors"]
            assert set(errors) == {"output", "x", "weight", "bn_weight", "bn_bias"}
            assert case["rel_error_vs_baseline"] == max(errors.values()) < 1e-4, errors
    conv1_1 = suite["layers"][0]  # 3x the forward: 2 * 32 * 32 * 64 * 3 * 9 per image
    # (files keep 6 significant digits)
    assert conv1_1["flops"] == pytest.approx(3 * 2 * 32 * 32 * 64 * 3 * 9, rel=1e-5)
    assert main(["validate", str(train_result)]) == 0


def test_layers_train_compare_and_figures(train_result, capsys):
    data = json.loads(train_result.read_text())
    figures = tracked_figures(data)
    assert f"{PREFIX}/conv3_1/native/ms" in figures
    assert figures[f"{PREFIX}/geomean/native/speedup"].better == "higher"
    assert not any(key.startswith("layers/") for key in figures)  # never an inference key
    assert main(["compare", str(train_result), str(train_result)]) == 0
    slower = copy.deepcopy(data)
    for case in slower["suites"]["layers_train"]["cases"]:
        if case["backend"] == "native":
            case["samples_ms"] = [3 * s for s in case["samples_ms"]]
            for field in ("median_ms", "p20_ms", "p80_ms"):
                case[field] *= 3
    verdicts = {c.key: c.verdict for c in compare_results(data, slower).changes}
    assert verdicts[f"{PREFIX}/conv1_1/native/ms"] == "regression"
    assert main(["show", str(train_result)]) == 0
    out = capsys.readouterr().out
    assert "training forward + backward" in out and "conv3_1" in out


def test_layers_train_bars(train_result, capsys):
    data = json.loads(train_result.read_text())
    assert evaluate_bars([("cpu", data)]) == []  # a GPU bar: nothing on a CPU file
    gpu = _as_gpu(data)
    suite = gpu["suites"]["layers_train"]
    base = {c["layer"]: c["median_ms"] for c in suite["cases"] if c["backend"] == "cudnn_eager"}
    for case in suite["cases"]:
        if case["backend"] == "native":
            case["median_ms"] = base[case["layer"]] / (0.8 if case["layer"] == "conv3_1" else 2)
    (bar,) = evaluate_bars([("gpu", gpu)])
    assert bar.name == "native training block (forward + backward), slowest over cuDNN eager"
    assert bar.value == pytest.approx(0.8) and not bar.met
    assert "slowest conv3_1" in bar.detail and "slower than eager: conv3_1 0.80x" in bar.detail
    suite["cases"][-1]["median_ms"] = base["conv3_1"] / 1.1
    (bar,) = evaluate_bars([("gpu", gpu)])
    assert bar.met and bar.value == pytest.approx(1.1)


def test_layers_train_needs_batch_norm_and_keeps_inference_keys(train_result, capsys):
    assert main(["layers", "--mode", "train", "--device", "cpu", "--config", "vgg11",
                 "--resolution", "32"]) == 2
    assert "BatchNorm" in capsys.readouterr().err
    inference = json.loads(train_result.read_text())
    inference["suites"] = {"layers": copy.deepcopy(inference["suites"]["layers_train"])}
    for case in inference["suites"]["layers"]["cases"]:
        case["key"] = case["key"].replace("layers-train/", "layers/")
    merged = merge_results([inference, json.loads(train_result.read_text())])
    assert validate_result(merged) == []
    figures = tracked_figures(merged)
    assert "layers/A/b1/r32/fp32/conv1_1/native/ms" in figures
    assert f"{PREFIX}/conv1_1/native/ms" in figures
    wrong = json.loads(train_result.read_text())
    wrong["suites"]["layers_train"]["cases"][0]["key"] = "layers/A/b1/r32/fp32/conv1_1/x"
    assert any("must start with 'layers-train/'" in p for p in validate_result(wrong))


def test_autocast_train_step_keeps_fp32_parameters():
    """The model suite's step under autocast: the convs compute in bf16, the parameters, their
    gradients and the SGD state stay fp32."""
    from vgg_kernels.bench.model import _train_step

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    seen: list[torch.dtype] = []
    model[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = model[0].weight.detach().clone()
    step = _train_step(model, optimizer, torch.tensor([0, 3]), torch.device("cpu"),
                       torch.bfloat16)
    step(torch.randn(2, 3, 8, 8))
    assert seen == [torch.bfloat16]
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in model.parameters())
    assert not torch.equal(model[0].weight, before)
    momentum = optimizer.state[model[0].weight]["momentum_buffer"]
    assert momentum.dtype == torch.float32


def test_model_suite_records_autocast_training(tmp_path):
    """A bf16 model run on a CPU: inference cases in bf16 keep their mode, the training step is
    train_amp (autocast bf16), and the native backend, which has no bf16 CPU training kernels,
    is skipped with the reason instead of timed on a fallback."""
    out = tmp_path / "model.json"
    assert main(["model", "--device", "cpu", "--config", "A", "--batch", "1", "--resolution",
                 "32", "--dtype", "bf16", "--backends", "native,eager", "--no-compile",
                 "--warmup", "0", "--repeats", "1", "--peak-size", "128", "--quiet", "--out",
                 str(out)]) == 0
    data = json.loads(out.read_text())
    assert validate_result(data) == []
    suite = data["suites"]["model"]
    assert suite["settings"]["train_mode"] == "train_amp"
    assert suite["settings"]["train_precision"].startswith("autocast bf16")
    keys = {c["key"] for c in suite["cases"]}
    assert "model/A/b1/r32/bf16/torch_eager/train_amp" in keys
    assert "model/A/b1/r32/bf16/torch_eager/inference" in keys
    assert not any(key.endswith("/train") for key in keys)
    reasons = [s["reason"] for s in suite["skipped"] if s["variant"] == "native"]
    assert reasons and all("bfloat16" in r or "conv_bn_relu_train" in r for r in reasons)


def test_old_model_files_load_and_do_not_compare_their_train_cases_with_autocast_ones():
    old = json.loads(H200_MODEL.read_text())
    assert validate_result(old) == []
    new = copy.deepcopy(old)
    new["suites"]["model"]["settings"].update(train_mode="train_amp",
                                              train_precision="autocast bf16")
    cases = new["suites"]["model"]["cases"]
    for case in cases:
        if case["mode"] == "train":
            case["mode"] = "train_amp"
            case["key"] = case["key"][:-len("train")] + "train_amp"
    # (the committed run skipped the compiled training step: one at 2000 img/s stands in)
    eager_step = next(c for c in cases if c["key"].endswith("cudnn_eager/train_amp"))
    cases.append({**eager_step, "variant": "torch_compile", "images_per_s": 2000.0,
                  "key": eager_step["key"].replace("cudnn_eager", "torch_compile")})
    assert validate_result(new) == []
    comparison = compare_results(old, new)
    assert comparison.regressions == []
    assert any(key.endswith("/train/images_per_s") for key in comparison.missing)
    assert any(key.endswith("/train_amp/images_per_s") for key in comparison.added)
    assert not any("/train" in c.key for c in comparison.changes)
    # the training-step bars read only the autocast cases (the old file's bf16-parameter
    # training is another workload)
    names = [bar.name for bar in evaluate_bars([("old", old)])]
    assert not any("training step" in name for name in names)
    rates = {c["variant"]: c["images_per_s"] for c in new["suites"]["model"]["cases"]
             if c["mode"] == "train_amp"}
    bars = {bar.name: bar for bar in evaluate_bars([("new", new)])}
    eager = bars["triton model training step (autocast bf16) over eager"]
    assert eager.value == pytest.approx(rates["triton"] / rates["cudnn_eager"])
    assert eager.target == 1.3
    compiled = bars["triton model training step (autocast bf16) over torch.compile "
                    "(max-autotune-no-cudagraphs)"]
    assert compiled.value == pytest.approx(rates["triton"] / rates["torch_compile"])
    assert compiled.target == 1.1
