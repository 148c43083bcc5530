"""Run the `gpu`-marked tests in parallel pytest processes, without pytest-xdist.

    python benchmarks/gpu_tests.py --shards 4 --junitxml OUT/gpu-tests.xml [--marker gpu]
        [paths...]      (default paths: tests)

Most of a GPU test's time is compiling and autotuning kernels, which is CPU work, so a 16-core
GPU machine runs the suite several times faster in parallel. The collected tests are dealt
round-robin to the shards (neighbouring parametrizations, which compile similar kernels, land in
different shards and balance the load); each shard writes its own log and JUnit file next to
--junitxml, and the files are merged into --junitxml. Prints each shard's failures and one
totals line; exits 1 when a test failed or a shard did not finish.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

_COUNTS = ("tests", "failures", "errors", "skipped")


def collect(marker: str, paths: list[str]) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-m", marker, *paths],
        capture_output=True, text=True, check=False)
    ids: list[str] = []
    for line in done.stdout.splitlines():
        if not line.strip():
            break  # the node ids end at the first blank line; warnings summaries follow
        if "::" in line and not line.startswith(" ") and line not in ids:
            ids.append(line)
    if done.returncode not in (0, 5) or not ids:
        sys.stdout.write(done.stdout[-3000:] + done.stderr[-3000:])
    return ids


def merge_junit(parts: list[str], target: str, seconds: float) -> dict[str, int]:
    """One <testsuites> holding every shard's test cases, with summed counts."""
    totals = dict.fromkeys(_COUNTS, 0)
    merged = ET.Element("testsuite", name="pytest")
    for path in parts:
        if not os.path.exists(path):
            continue
        for suite in ET.parse(path).getroot().iter("testsuite"):
            for key in _COUNTS:
                totals[key] += int(suite.get(key, 0))
            merged.extend(suite.findall("testcase"))
    for key in _COUNTS:
        merged.set(key, str(totals[key]))
    merged.set("time", f"{seconds:.3f}")  # wall clock of the parallel run
    root = ET.Element("testsuites")
    root.append(merged)
    ET.ElementTree(root).write(target, encoding="utf-8", xml_declaration=True)
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--junitxml", required=True)
    parser.add_argument("--marker", default="gpu", help="pytest -m expression")
    parser.add_argument("paths", nargs="*", default=["tests"])
    args = parser.parse_args()
    ids = collect(args.marker, args.paths)
    if not ids:
        print("gpu_tests: no tests collected")
        return 1
    shards = max(1, min(args.shards, len(ids)))
    stem = os.path.splitext(args.junitxml)[0]
    began = time.monotonic()
    running = []
    for index in range(shards):
        chosen = ids[index::shards]
        log = open(f"{stem}-{index}.log", "w")
        command = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
                   f"--junitxml={stem}-{index}.xml", *chosen]
        running.append((index, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT),
                        log, len(chosen)))
    status = 0
    for index, process, log, count in running:
        code = process.wait()
        log.close()
        with open(f"{stem}-{index}.log") as handle:
            lines = handle.read().splitlines()
        for line in lines:
            if line.startswith(("FAILED ", "ERROR ")):
                print(line[:200])
        print(f"gpu_tests: shard {index} ({count} tests) exit {code}: "
              f"{lines[-1] if lines else 'no output'}")
        if code not in (0, 5):
            status = 1
    seconds = time.monotonic() - began
    totals = merge_junit([f"{stem}-{i}.xml" for i in range(shards)], args.junitxml, seconds)
    print(f"gpu_tests: {totals['tests']} tests, {totals['failures']} failed, "
          f"{totals['errors']} errors, {totals['skipped']} skipped in {shards} shards, "
          f"{seconds:.0f}s")
    if totals["tests"] < len(ids):
        print(f"gpu_tests: only {totals['tests']} of {len(ids)} tests reported")
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
