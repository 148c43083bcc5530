"""pytest plugin that benchmarks/gpu_tests.py loads into each of its pytest processes.

- Records each test as it starts and when it has finished (after its teardown: node id, outcome,
  message) in the file named by GPU_TESTS_FINISHED, so the runner knows which test a process
  died in, which ones it did not run, and what the finished ones gave when the process died
  before writing its JUnit file.
- Stops the process after a test that failed with a sticky CUDA error (an illegal address, a
  launch failure, ...): the CUDA context is lost and every later CUDA call in the process would
  fail with the same error, so the runner goes on with the remaining tests in a fresh process
  instead of reporting them all as failures of one kernel.
"""

from __future__ import annotations

import json
import os

import pytest

# CUDA errors after which the context cannot be used again (the CUDA runtime's descriptions).
STICKY_CUDA_ERRORS = (
    "illegal memory access",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "hardware stack error",
    "device-side assert",
    "operation not supported on global/shared address space",
)


def sticky_cuda_error(text: str) -> bool:
    return any(message in text for message in STICKY_CUDA_ERRORS)


_OUTCOMES: dict[str, tuple[str, str]] = {}  # node id -> (worst outcome so far, its message)
_RANK = {"passed": 0, "skipped": 1, "failed": 2}


def pytest_runtest_logstart(nodeid, location):
    """A line naming the test about to run: if the process dies, the runner knows which one."""
    path = os.environ.get("GPU_TESTS_FINISHED")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"started": nodeid}) + "\n")


def pytest_runtest_logreport(report):
    """One JSON line per finished test: node id, outcome (failed if any phase failed) and the
    first line of the failure or skip reason; the runner builds JUnit entries from them when the
    process dies before pytest writes its own."""
    path = os.environ.get("GPU_TESTS_FINISHED")
    if not path:
        return
    outcome, message = _OUTCOMES.get(report.nodeid, ("passed", ""))
    if _RANK[report.outcome] > _RANK[outcome]:
        text = str(report.longrepr) if report.longrepr is not None else ""
        lines = [line for line in text.splitlines() if line.strip()]
        outcome, message = report.outcome, (lines[-1] if lines else "")[:500]
    _OUTCOMES[report.nodeid] = (outcome, message)
    if report.when == "teardown":
        with open(path, "a") as handle:
            handle.write(json.dumps({"nodeid": report.nodeid, "outcome": outcome,
                                     "message": message}) + "\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and sticky_cuda_error(str(call.excinfo.value)):
        item.session.shouldstop = (f"sticky CUDA error in {item.nodeid}; the remaining tests need "
                                   f"a fresh process")
