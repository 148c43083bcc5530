"""benchmarks/gpu_tests.py, the parallel runner of the GPU tests on a lent GPU (where a broken
runner would cost device time): shards, failures, merged JUnit and exit status, on a tiny suite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

RUNNER = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_tests.py"

SUITE = '''
import pytest

@pytest.mark.parametrize("i", range(7))
def test_numbers(i):
    assert i != 3

def test_skipped():
    pytest.skip("not here")

@pytest.mark.gpu
def test_left_out_by_the_marker():
    raise AssertionError("deselected")
'''


def test_runner_shards_reports_and_merges(tmp_path):
    (tmp_path / "test_tiny.py").write_text(SUITE)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    junit = tmp_path / "out" / "gpu-tests.xml"
    junit.parent.mkdir()
    done = subprocess.run([sys.executable, str(RUNNER), "--shards", "3", "--junitxml", str(junit),
                           "--marker", "not gpu", "test_tiny.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED test_tiny.py::test_numbers[3]" in done.stdout
    assert "8 tests, 1 failed, 0 errors, 1 skipped in 3 shards" in done.stdout
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "8" and suite.get("failures") == "1"
    assert len(suite.findall("testcase")) == 8
    assert sorted(p.name for p in junit.parent.glob("gpu-tests-*.xml")) == [
        "gpu-tests-0.xml", "gpu-tests-1.xml", "gpu-tests-2.xml"]


FAULTY_SUITE = '''
import os
import signal

def _note(name):
    with open("pids.txt", "a") as handle:
        handle.write(f"{name} {os.getpid()}\\n")

def test_a():
    _note("a")

def test_b_sticky():
    _note("b")
    raise RuntimeError("CUDA error: an illegal memory access was encountered")

def test_c():
    _note("c")

def test_d_dies():
    _note("d")
    os.kill(os.getpid(), signal.SIGKILL)

def test_e():
    _note("e")

def test_f_fails():
    _note("f")
    assert False, "an ordinary failure keeps the process"

def test_g():
    _note("g")
'''


def test_runner_goes_on_after_sticky_errors_and_dead_processes(tmp_path):
    """A sticky CUDA error stops its process after that test and a killed process loses only
    the test it was running: the shard's other tests run in fresh processes and are reported."""
    (tmp_path / "test_faulty.py").write_text(FAULTY_SUITE)
    junit = tmp_path / "out" / "gpu-tests.xml"  # the runner makes the directory
    done = subprocess.run([sys.executable, str(RUNNER), "--shards", "1", "--junitxml", str(junit),
                           "--marker", "not gpu", "test_faulty.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "FAILED test_faulty.py::test_b_sticky" in output
    assert "FAILED test_faulty.py::test_f_fails" in output
    assert "CRASHED test_faulty.py::test_d_dies" in output
    assert "MISSING" not in output
    assert "7 tests, 3 failed, 0 errors, 0 skipped in 1 shards" in output
    assert "(7 tests, 3 processes) exit 2, -9, 1" in output
    pids = dict(line.split() for line in (tmp_path / "pids.txt").read_text().splitlines())
    assert pids["a"] == pids["b"] != pids["c"] == pids["d"] != pids["e"] == pids["f"] == pids["g"]
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "7" and suite.get("failures") == "3"
    crashed = [case for case in suite.findall("testcase") if case.get("name") == "test_d_dies"]
    assert len(crashed) == 1 and crashed[0].find("failure") is not None


HANGING_SUITE = '''
import time

def test_a():
    pass

def test_b_hangs():
    time.sleep(600)

def test_c():
    pass
'''


def test_runner_kills_a_hung_process_and_goes_on(tmp_path):
    (tmp_path / "test_hang.py").write_text(HANGING_SUITE)
    junit = tmp_path / "gpu-tests.xml"
    done = subprocess.run([sys.executable, str(RUNNER), "--shards", "1", "--test-timeout", "3",
                           "--junitxml", str(junit), "--marker", "not gpu", "test_hang.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "CRASHED test_hang.py::test_b_hangs - no test finished for 3 s" in output
    assert "3 tests, 1 failed, 0 errors, 0 skipped in 1 shards" in output


def test_runner_reports_finished_tests_when_terminated(tmp_path):
    """An outer `timeout` sends SIGTERM to the runner's process group: the merged report still
    holds every test that finished."""
    (tmp_path / "test_hang.py").write_text(HANGING_SUITE)
    junit = tmp_path / "gpu-tests.xml"
    runner = subprocess.Popen([sys.executable, str(RUNNER), "--shards", "1", "--junitxml",
                               str(junit), "--marker", "not gpu", "test_hang.py"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    finished = tmp_path / "gpu-tests-0.done"
    deadline = time.monotonic() + 60
    while not (finished.exists() and finished.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # test_b_hangs is running
    os.killpg(runner.pid, signal.SIGTERM)
    output, _ = runner.communicate(timeout=60)
    assert runner.returncode == 1, output
    assert "stopped by SIGTERM" in output
    assert "MISSING test_hang.py::test_b_hangs" in output
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    assert [case.get("name") for case in suite.findall("testcase")] == ["test_a"]


REORDERING_CONFTEST = '''
def pytest_collection_modifyitems(items):
    items.reverse()  # as a plugin that reorders tests would: each run reverses what it was given
'''

ORDERED_SUITE = '''
import os
import signal

def test_1():
    pass

def test_2_dies():
    os.kill(os.getpid(), signal.SIGKILL)

def test_3():
    pass
'''


def test_runner_blames_the_test_that_was_running(tmp_path):
    """The runner's list and a process's run order can differ (a plugin that reorders tests):
    the crash is blamed on the test the process had started, not on the next in the list."""
    (tmp_path / "conftest.py").write_text(REORDERING_CONFTEST)
    (tmp_path / "test_order.py").write_text(ORDERED_SUITE)
    junit = tmp_path / "gpu-tests.xml"
    done = subprocess.run([sys.executable, str(RUNNER), "--shards", "1", "--junitxml", str(junit),
                           "--marker", "not gpu", "test_order.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    output = done.stdout + done.stderr
    assert "CRASHED test_order.py::test_2_dies" in output, output
    assert "3 tests, 1 failed, 0 errors, 0 skipped in 1 shards" in output, output
