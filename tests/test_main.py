"""The main job (python -m vgg_kernels) runs, prints its table and checks the error."""

from __future__ import annotations

import subprocess
import sys


def test_main_job_runs_and_prints_table():
    result = subprocess.run(
        [sys.executable, "-m", "vgg_kernels", "--config", "A", "--batch-size", "1",
         "--resolution", "32", "--iters", "1", "--device", "cpu", "--backend", "reference"],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    for row in ("backend", "FusedVGG images/s", "eager images/s", "max error vs float64"):
        assert row in result.stdout


def test_main_job_help():
    result = subprocess.run([sys.executable, "-m", "vgg_kernels", "--help"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and "--config" in result.stdout


def test_main_job_names_a_bad_config_in_one_line():
    result = subprocess.run([sys.executable, "-m", "vgg_kernels", "--config", "Z"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--config: config must be one of" in result.stderr


def test_main_job_help_shows_the_defaults():
    result = subprocess.run([sys.executable, "-m", "vgg_kernels", "--help"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert "(default: D)" in result.stdout and "(default: auto)" in result.stdout
