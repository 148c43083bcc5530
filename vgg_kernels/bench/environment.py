"""The environment block of a result file: device, software versions, commit, date, command.

No hostname and no user name is recorded.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def slugify(name: str) -> str:
    """``'NVIDIA H100 80GB HBM3'`` -> ``'nvidia-h100-80gb-hbm3'``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def device_slug(device: torch.device) -> str:
    """Name of the baseline file for a device: the GPU's name slugified, or ``'cpu'``."""
    if device.type == "cuda":
        return slugify(torch.cuda.get_device_name(device))
    return "cpu"


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _run(command: list[str], cwd: Path | None = None) -> str | None:
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=20,
                                check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def git_commit() -> tuple[str | None, bool | None]:
    """(commit of the checkout holding this package, whether tracked files differ from it).

    Without a git checkout (a copied working tree on a lent GPU) the commit comes from the
    ``VGG_KERNELS_COMMIT`` environment variable that benchmarks/device_check.sh exports.
    """
    commit = _run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT)
    if commit is None:
        return os.environ.get("VGG_KERNELS_COMMIT") or None, None
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT)
    return commit, bool(status) if status is not None else None


_SWITCHES = ("VGG_KERNELS_BACKEND", "VGG_KERNELS_NATIVE_WGMMA", "VGG_KERNELS_NATIVE_WGMMA_TILE",
             "VGG_KERNELS_NATIVE_NARROW", "VGG_KERNELS_TRITON_TMA",
             "VGG_KERNELS_TRITON_PAD_CHANNELS", "VGG_KERNELS_TRITON_SEGMENTS")


def collect_environment(device: torch.device, argv: list[str]) -> dict[str, Any]:
    """The ``environment`` block: what ran, where, and from which commit."""
    from vgg_kernels import __version__

    try:
        import triton

        triton_version: str | None = triton.__version__
    except Exception:  # a missing or broken triton is a fact to record, not an error
        triton_version = None
    commit, dirty = git_commit()
    env: dict[str, Any] = {
        "device_type": device.type,
        "device_name": cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "device_slug": device_slug(device),
        "compute_capability": None,
        "driver": None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "vgg_kernels": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command_line": shlex.join([sys.executable.rsplit("/", 1)[-1], "-m", "vgg_kernels.bench",
                                    *argv]),
        # kernel switches that change what a backend runs (VGG_KERNELS_BACKEND, ...)
        "switches": {name: value for name, value in sorted(os.environ.items())
                     if name in _SWITCHES},
    }
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        env["compute_capability"] = f"{major}.{minor}"
        env["driver"] = _driver_version()
    return env
