"""``gate``: the CPU regression gate. For a fixed set of blocks it measures how much faster the
native kernels run than eager PyTorch on the same machine, in the same process, and compares
those ratios with a committed baseline's: a different or busy machine shifts both sides of each
ratio alike, a slower kernel shifts only one.

Each case is a block of VGG16's shape family on the native backend against the same block as
eager modules (channels_last, fp32, batch 4): inference blocks (BN folded), training blocks
(forward and backward) and a frozen block's input gradient. The two run in alternating order,
one call each per round (every case once per round); a case's figure is the ratio of the two
sides' fastest rounds (load
from other processes only adds time, so the fastest round is the least disturbed one; on the
2-core machine CI runs on, medians of paired ratios moved by up to 40% between runs of the same
code, these by up to 8%). Cases whose eager side is itself unstable are left out: PyTorch's
64 -> 64 block at 112x112 with its max-pool took 24 to 38 ms from one run to the next, and the
ratio of the 64 -> 128 block at 56x56 rose by up to 56%. The
run's summary is the geometric mean over the cases.

Verdict against a baseline: a regression when the geometric mean falls below (1 - threshold)
of the baseline's (default 10%) or any case's ratio below (1 - case threshold) of its baseline
ratio (default 15%). Measured there: runs of the same code moved the geometric mean by -3% to
0% and a case by at most 10%; with every native CPU op 25% slower the geometric mean fell by
20-23%, each case by 14-27%.
``VGG_KERNELS_TEST_SLOWDOWN`` (a factor, test-only) makes every native CPU op spin until it has
taken that factor of its own time: the gate's tests use it to show that the gate fails.
"""

from __future__ import annotations

import datetime
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vgg_kernels.bench.environment import collect_environment

GATE_SUITE = "cpu_gate"
DEFAULT_THRESHOLD = 0.10
DEFAULT_CASE_THRESHOLD = 0.15


@dataclass(frozen=True)
class GateCase:
    """One block: mode 'infer' (eval, folded), 'train' (forward + backward) or 'frozen' (input
    gradient of an eval block whose weights need none)."""

    name: str
    mode: str
    n: int
    c: int
    k: int
    size: int
    pool: bool


CASES = (
    GateCase("infer-256-256-28", "infer", 4, 256, 256, 28, False),
    GateCase("infer-128-128-56", "infer", 4, 128, 128, 56, False),
    GateCase("infer-512-512-14-pool", "infer", 4, 512, 512, 14, True),
    GateCase("train-64-64-56-pool", "train", 4, 64, 64, 56, True),
    GateCase("train-256-256-28", "train", 4, 256, 256, 28, False),
    GateCase("frozen-128-128-56-pool", "frozen", 4, 128, 128, 56, True),
)


def _modules(case: GateCase) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(case.c, case.k, 3, padding=1), nn.BatchNorm2d(case.k),
                               nn.ReLU()]
    if case.pool:
        layers.append(nn.MaxPool2d(2))
    eager = nn.Sequential(*layers)
    with torch.no_grad():
        eager[1].running_mean.uniform_(-0.2, 0.2)
        eager[1].running_var.uniform_(0.5, 1.5)
    return eager.to(memory_format=torch.channels_last)


def _callables(case: GateCase) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(eager, native) calls of the case, on the same weights and input."""
    from vgg_kernels.fusion import fuse

    torch.manual_seed(0)
    eager = _modules(case)
    native = fuse(_modules(case), backend="native")
    native.load_state_dict(eager.state_dict())
    x = torch.randn(case.n, case.c, case.size, case.size).contiguous(
        memory_format=torch.channels_last)
    if case.mode == "infer":
        eager.eval()
        native.eval()

        def run(model):
            def call():
                with torch.no_grad():
                    return model(x)
            return call
        return run(eager), run(native)
    if case.mode == "frozen":
        for model in (eager, native):
            model.eval().requires_grad_(False)

        def run(model):
            def call():
                leaf = x.detach().requires_grad_(True)
                return torch.autograd.grad(model(leaf).square().sum(), leaf)[0]
            return call
        return run(eager), run(native)

    def run(model):
        def call():
            leaf = x.detach().requires_grad_(True)
            return torch.autograd.grad(model(leaf).square().sum(),
                                       [leaf, *model.parameters()])
        return call
    return run(eager.train()), run(native.train())


def _summary(case: GateCase, eager_ms: list[float], native_ms: list[float]) -> dict[str, Any]:
    ratios = [e / n for e, n in zip(eager_ms, native_ms, strict=True)]
    return {"name": case.name, "mode": case.mode, "shape": [case.n, case.c, case.k, case.size,
                                                            case.size], "pool": case.pool,
            "eager_ms": eager_ms, "native_ms": native_ms, "ratios": ratios,
            "ratio": min(eager_ms) / min(native_ms)}


def run_gate(cases: tuple[GateCase, ...] = CASES, repeats: int = 21,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every case; returns the result (its ``geomean`` over the cases' ratios). Every
    case is built and warmed up first; each round then times every case once, eager and native
    in alternating order, so that a slow phase of the machine falls on all of them."""
    from vgg_kernels.backends import available_backends

    reason = available_backends(torch.device("cpu"), torch.float32)["native"]
    if reason is not None:
        raise RuntimeError(f"the gate measures the native CPU kernels, which cannot run: "
                           f"native {reason}")
    began = time.perf_counter()
    calls = [_callables(case) for case in cases]
    for eager, native in calls:
        for _ in range(2):
            eager()
            native()
    times: list[tuple[list[float], list[float]]] = [([], []) for _ in cases]
    for i in range(repeats):
        for (eager, native), (eager_ms, native_ms) in zip(calls, times, strict=True):
            order = ((eager, eager_ms), (native, native_ms))
            for fn, out in (order if i % 2 == 0 else order[::-1]):
                started = time.perf_counter()
                fn()
                out.append((time.perf_counter() - started) * 1e3)
    measured = [_summary(case, *sides) for case, sides in zip(cases, times, strict=True)]
    for result in measured:
        log(f"  {result['name']}: eager / native {result['ratio']:.2f} (fastest eager "
            f"{min(result['eager_ms']):.2f} ms, native {min(result['native_ms']):.2f} ms)")
    geomean = math.exp(sum(math.log(r["ratio"]) for r in measured) / len(measured))
    return {"suite": GATE_SUITE, "environment": collect_environment(torch.device("cpu"), []),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "repeats": repeats, "threads": torch.get_num_threads(), "cases": measured,
            "geomean": geomean, "wall_s": time.perf_counter() - began}


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One baseline from several runs of the same cases: each case's median ratio, and the
    geometric mean of those (a single run's ratios are one draw of the machine's state)."""
    merged = dict(runs[0])
    merged["cases"] = []
    for i, case in enumerate(runs[0]["cases"]):
        ratios = [run["cases"][i]["ratio"] for run in runs]
        merged["cases"].append({**case, "ratio": statistics.median(ratios), "run_ratios": ratios})
    merged["geomean"] = math.exp(sum(math.log(c["ratio"]) for c in merged["cases"])
                                 / len(merged["cases"]))
    merged["runs"] = len(runs)
    return merged


def judge_gate(baseline: dict[str, Any], new: dict[str, Any],
               threshold: float = DEFAULT_THRESHOLD,
               case_threshold: float = DEFAULT_CASE_THRESHOLD) -> tuple[bool, list[str]]:
    """(passed, report lines): the new ratios against the baseline's."""
    lines = []
    failed = False
    old_cases = {c["name"]: c for c in baseline["cases"]}
    for case in new["cases"]:
        old = old_cases.get(case["name"])
        if old is None:
            lines.append(f"  {case['name']}: {case['ratio']:.2f} (no baseline)")
            continue
        change = case["ratio"] / old["ratio"]
        bad = change < 1.0 - case_threshold
        failed |= bad
        lines.append(f"  {case['name']}: {case['ratio']:.2f} against {old['ratio']:.2f} "
                     f"({(change - 1) * 100:+.0f}%){'  REGRESSION' if bad else ''}")
    change = new["geomean"] / baseline["geomean"]
    bad = change < 1.0 - threshold
    failed |= bad
    lines.append(f"geomean eager / native: {new['geomean']:.2f} against {baseline['geomean']:.2f} "
                 f"({(change - 1) * 100:+.0f}%; a case fails below -{case_threshold:.0%}, the "
                 f"geomean below -{threshold:.0%}){'  REGRESSION' if bad else ''}")
    return not failed, lines


def load_gate(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if data.get("suite") != GATE_SUITE or "geomean" not in data:
        raise ValueError(f"{path}: not a gate result (suite {data.get('suite')!r})")
    return data
