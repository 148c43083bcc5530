"""benchmarks/gpu_tests.py, the parallel runner of the GPU tests on a lent GPU (where a broken
runner would cost device time): shards, failures, merged JUnit and exit status, on a tiny suite."""

from __future__ import annotations

import subprocess
import sys
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
