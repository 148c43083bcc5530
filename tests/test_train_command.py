"""The training command (python -m vgg_kernels.train): the digits split, a short run's outputs,
exact resume, argument errors, torchrun with two CPU processes, --compare-eager and ImageFolder.

Runs are tiny (config A, a few batches of a few images) and run in this process where they can;
a subprocess is used where the process itself is under test (exit status, torchrun).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason="the digits dataset needs scikit-learn (the train extra)")
pytest.importorskip("matplotlib", reason="the curves plot needs matplotlib (the train extra)")
pytest.importorskip("tqdm", reason="the progress bar needs tqdm (the train extra)")

from vgg_kernels import train  # noqa: E402  (after the skips: it needs the train extra)

TINY = ["--config", "A", "--batch-size", "8", "--workers", "0", "--quiet"]


def _run(tmp_path: Path, *options: str, name: str = "out") -> dict:
    """Run the command in this process; returns its metrics.json."""
    out = tmp_path / name
    assert train.main([*TINY, "--out", str(out), *options]) == 0
    return json.loads((out / "metrics.json").read_text())


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


def test_digits_split_is_fixed_and_shaped():
    first, second = train.load_digits_split(), train.load_digits_split()
    assert (first.num_classes, len(first.train), len(first.test)) == (10, 1437, 360)
    for a, b in ((first.train, second.train), (first.test, second.test)):
        assert a.tensors[0].shape[1:] == (3, 32, 32) and a.tensors[0].dtype == torch.float32
        assert a.tensors[1].dtype == torch.int64
        assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    images = first.train.tensors[0]
    assert torch.equal(images[:, 0], images[:, 2]), "the 3 channels must be copies"
    assert abs(images.mean().item()) < 1e-4 and abs(images.std().item() - 1) < 1e-3
    counts = torch.bincount(first.test.tensors[1], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37, f"not stratified: {counts.tolist()}"
    assert train.load_digits_split(40).test.tensors[0].shape == (360, 3, 40, 40)


def test_short_run_writes_metrics_and_plot_and_loss_decreases(tmp_path):
    metrics = _run(tmp_path, "--epochs", "2", "--limit-batches", "8", "--batch-size", "16",
                   "--dropout", "0")
    run = metrics["runs"]["FusedVGG"]
    assert len(run["steps"]["loss"]) == 16 and run["global_step"] == 16
    assert [e["epoch"] for e in run["epochs"]] == [1, 2]
    first, second = run["epochs"]
    assert second["train_loss"] < first["train_loss"], run["steps"]["loss"]
    assert 0.0 <= run["test_accuracy"] <= 1.0 and run["images_per_second"] > 0
    assert metrics["dataset"]["name"] == "digits" and metrics["model"]["config"] == "A"
    assert metrics["environment"]["torch"] == torch.__version__
    png = (tmp_path / "out" / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_resume_continues_bit_for_bit(tmp_path):
    """8 steps straight against 3 steps, a checkpoint, and a resume to 8: the resume crosses
    the end of epoch 1 (4 batches) mid-way and uses dropout, so the model, optimizer, schedule,
    RNG and data order all have to come back exactly."""
    # the default backend (native on the CPU): its kernels repeat their bits run to run
    options = ["--epochs", "3", "--limit-batches", "4", "--dropout", "0.5"]
    straight_ckpt, split_ckpt = tmp_path / "straight.pt", tmp_path / "split.pt"
    straight = _run(tmp_path, *options, "--max-steps", "8", "--checkpoint", str(straight_ckpt),
                    name="straight")
    first = _run(tmp_path, *options, "--max-steps", "3", "--checkpoint", str(split_ckpt),
                 name="first")
    resumed = _run(tmp_path, *options, "--max-steps", "8", "--resume", str(split_ckpt),
                   "--checkpoint", str(split_ckpt), name="resumed")
    losses = straight["runs"]["FusedVGG"]["steps"]["loss"]
    assert len(losses) == 8 and first["runs"]["FusedVGG"]["steps"]["loss"] == losses[:3]
    assert resumed["runs"]["FusedVGG"]["steps"]["loss"] == losses  # exact float equality
    assert resumed["runs"]["FusedVGG"]["steps"]["lr"] == (
        straight["runs"]["FusedVGG"]["steps"]["lr"])
    exact = ("epoch", "step", "train_loss", "train_accuracy", "test_loss", "test_accuracy")
    assert [{k: e[k] for k in exact} for e in resumed["runs"]["FusedVGG"]["epochs"]] == [
        {k: e[k] for k in exact} for e in straight["runs"]["FusedVGG"]["epochs"]]
    a = torch.load(straight_ckpt, weights_only=True)
    b = torch.load(split_ckpt, weights_only=True)
    assert (a["epoch"], a["batch"], a["global_step"]) == (b["epoch"], b["batch"], 8)
    assert a["sampler"] == b["sampler"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a["optimizer"]["state"].items():
        theirs = b["optimizer"]["state"][key]["momentum_buffer"]
        assert torch.equal(value["momentum_buffer"], theirs), key
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


def test_resume_refuses_other_options(tmp_path, capsys):
    ckpt = tmp_path / "run.pt"
    _run(tmp_path, "--epochs", "1", "--limit-batches", "1", "--checkpoint", str(ckpt))
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--epochs", "1", "--limit-batches", "1", "--lr", "0.1",
                    "--resume", str(ckpt), "--out", str(tmp_path / "again")])
    assert exit_info.value.code == 2
    assert "--lr 0.05 (got 0.1)" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--data", "/nonexistent/images"], "--data must be a folder with train/ and val/"),
    (["--config", "Z"], "--config: config must be one of"),
    (["--config", "vgg16", "--batch-norm"], "implies batch_norm=False"),
    (["--batch-size", "0"], "--batch-size must be a positive integer (got 0)"),
    (["--epochs", "-1"], "--epochs must be a positive integer (got -1)"),
    (["--amp", "fp8"], "argument --amp: invalid choice: 'fp8'"),
    (["--image-size", "16"], "--image-size must be at least 32"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--resume", "/nonexistent/run.pt"], "--resume: no checkpoint file"),
    (["--batch-size", "5000"], "--batch-size must be at most the training images per process"),
])
def test_bad_arguments_are_usage_errors(options, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(options)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert errors == [err.splitlines()[-1]], err
    assert errors[0].startswith(f"{train.PROG}: error: ") and message in errors[0], err


def test_bad_argument_in_a_process_has_no_traceback():
    result = subprocess.run([sys.executable, "-m", "vgg_kernels.train", "--batch-size", "0"],
                            capture_output=True, text=True, timeout=120, check=False,
                            env=_subprocess_env())
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"{train.PROG}: error: --batch-size must be a positive integer (got 0)")


def test_help_shows_defaults():
    help_text = " ".join(train.build_parser().format_help().split())
    for text in ("--epochs EPOCHS", "(default: 3)", "(default: A)", "(default: compact)",
                 "(default: runs/train)", "--compare-eager", "--resume PATH"):
        assert text in help_text


def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    env = {**_subprocess_env(), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         "-m", "vgg_kernels.train", *TINY, "--epochs", "1", "--limit-batches", "3",
         "--sync-bn", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=240, check=False, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    run = metrics["runs"]["FusedVGG"]
    assert metrics["world_size"] == 2 and len(run["steps"]["loss"]) == 3
    assert (out / "curves.png").is_file()
    # each step's loss and the epoch's counts are over both processes' batches (2 x 8 images)
    assert run["epochs"][0]["train_images"] == 3 * 2 * 8
    assert result.stdout.count("test accuracy") == 1, "only rank 0 prints"


def test_compare_eager_reports_both_models(tmp_path, capsys):
    metrics = _run(tmp_path, "--epochs", "1", "--limit-batches", "2", "--compare-eager")
    captured = capsys.readouterr().out
    assert set(metrics["runs"]) == {"FusedVGG", "eager"}
    fused, eager = metrics["runs"]["FusedVGG"], metrics["runs"]["eager"]
    # same initial weights, data order and dropout masks: the losses agree to rounding
    assert len(eager["steps"]["loss"]) == 2 and eager["images_per_second"] > 0
    assert fused["steps"]["loss"] == pytest.approx(eager["steps"]["loss"], rel=1e-3)
    table = captured[captured.index("model"):]
    assert "test accuracy" in table and "FusedVGG" in table and "eager" in table


def test_image_folder_data(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    pytest.importorskip("torchvision")
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 6), ("val", 3)):
        for label in ("cat", "dog"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = torch.randint(0, 256, (40, 48, 3), generator=generator,
                                       dtype=torch.uint8).numpy()
                image_module.fromarray(pixels).save(folder / f"{index}.png")
    metrics = _run(tmp_path, "--data", str(tmp_path / "images"), "--image-size", "32",
                   "--batch-size", "4", "--epochs", "1")
    assert metrics["dataset"]["classes"] == ["cat", "dog"]
    assert (metrics["dataset"]["train_images"], metrics["dataset"]["test_images"]) == (12, 6)
    assert metrics["dataset"]["image_size"] == 32
    assert len(metrics["runs"]["FusedVGG"]["steps"]["loss"]) == 3  # 12 images, batches of 4
