"""Run the `gpu`-marked tests in parallel pytest processes, without pytest-xdist.

    python benchmarks/gpu_tests.py --shards 4 --junitxml OUT/gpu-tests.xml [--marker gpu]
        [paths...]      (default paths: tests)

Most of a GPU test's time is compiling and autotuning kernels, which is CPU work, so a 16-core
GPU machine runs the suite several times faster in parallel. The collected tests are dealt
round-robin to the shards (neighbouring parametrizations, which compile similar kernels, land in
different shards and balance the load); each shard writes its own log and JUnit file next to
--junitxml, and the files are merged into --junitxml. Prints each shard's failures and one
totals line; exits 1 when a test failed or a shard did not finish.

A kernel that faults must not take the rest of a shard with it: each pytest process loads
gpu_tests_plugin.py, which records the tests it finished and stops the process after a sticky
CUDA error (an illegal address and the like, after which every CUDA call in the process fails).
A shard whose process stopped early, or died (a segfault), goes on with its unfinished tests in a
fresh process, at most --restarts times; a process in which no test has finished for
--test-timeout seconds (a hung kernel) is killed and treated the same. A test that was running
when its process died is reported as failed ("crashed"), one that never ran as missing. On
SIGTERM (an outer timeout) the runner stops its processes and still writes the merged report of
every test that finished.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
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


def merge_junit(parts: list[str], target: str, seconds: float,
                extra: list[tuple[str, str, str]] = ()) -> dict[str, int]:
    """One <testsuites> holding every shard's test cases, with summed counts, plus `extra` (node
    id, outcome, message) test cases that no JUnit file holds."""
    totals = dict.fromkeys(_COUNTS, 0)
    merged = ET.Element("testsuite", name="pytest")
    for path in parts:
        if not os.path.exists(path):
            continue
        for suite in ET.parse(path).getroot().iter("testsuite"):
            for key in _COUNTS:
                totals[key] += int(suite.get(key, 0))
            merged.extend(suite.findall("testcase"))
    for nodeid, outcome, message in extra:
        module, _, name = nodeid.partition("::")
        case = ET.SubElement(merged, "testcase", classname=module.removesuffix(".py").replace(
            "/", "."), name=name, time="0")
        totals["tests"] += 1
        if outcome == "failed":
            ET.SubElement(case, "failure", message=message).text = message
            totals["failures"] += 1
        elif outcome == "skipped":
            ET.SubElement(case, "skipped", message=message)
            totals["skipped"] += 1
    for key in _COUNTS:
        merged.set(key, str(totals[key]))
    merged.set("time", f"{seconds:.3f}")  # wall clock of the parallel run
    root = ET.Element("testsuites")
    root.append(merged)
    ET.ElementTree(root).write(target, encoding="utf-8", xml_declaration=True)
    return totals


class Shard:
    """One shard's tests, run in as many pytest processes as faults make necessary."""

    stopping = threading.Event()  # set on SIGTERM: no more processes, report what finished

    def __init__(self, index: int, ids: list[str], stem: str, restarts: int,
                 test_timeout: float):
        self.index, self.ids, self.stem, self.restarts = index, ids, stem, restarts
        self.test_timeout = test_timeout
        self.hung = False
        self.parts: list[str] = []
        self.crashed: list[tuple[str, str]] = []
        self.unwritten: list[tuple[str, str, str]] = []  # finished in a process that then died
        self.missing: list[str] = []
        self.lines: list[str] = []
        self.codes: list[int] = []

    def _run_once(self, tests: list[str], attempt: int) -> tuple[int, set[str], str | None]:
        """Run `tests` in one pytest process: (exit code, finished node ids, the test that had
        started and not finished, if any)."""
        suffix = "" if attempt == 0 else f"-r{attempt}"
        junit = f"{self.stem}-{self.index}{suffix}.xml"
        finished = os.path.abspath(f"{self.stem}-{self.index}{suffix}.done")
        if os.path.exists(finished):
            os.remove(finished)
        env = dict(os.environ, GPU_TESTS_FINISHED=finished)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (os.path.dirname(os.path.abspath(__file__)), env.get("PYTHONPATH")) if p)
        command = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
                   "-p", "gpu_tests_plugin", f"--junitxml={junit}", *tests]
        with open(f"{self.stem}-{self.index}.log", "a") as log:
            log.write(f"== gpu_tests: shard {self.index}, process {attempt + 1}: "
                      f"{len(tests)} tests\n")
            log.flush()
            code = self._watch(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                env=env), finished)
        lines = []
        if os.path.exists(finished):
            with open(finished) as handle:
                lines = [json.loads(line) for line in handle if line.strip()]
        records = [line for line in lines if "nodeid" in line]
        done = {r["nodeid"] for r in records}
        started = [line["started"] for line in lines if "started" in line]
        running = started[-1] if started and started[-1] not in done else None
        if os.path.exists(junit):
            self.parts.append(junit)
        else:  # died before pytest wrote it: the finished tests' own records stand in
            self.unwritten += [(r["nodeid"], r["outcome"], r["message"]) for r in records]
        return code, done, running

    def _watch(self, process: subprocess.Popen, finished: str) -> int:
        """Wait for the process; kill it when no test has finished for test_timeout seconds
        (a hung kernel) or when the runner is stopping."""
        self.hung = False
        last_size, last_change = -1, time.monotonic()
        while process.poll() is None:
            size = os.path.getsize(finished) if os.path.exists(finished) else 0
            if size != last_size:
                last_size, last_change = size, time.monotonic()
            elif time.monotonic() - last_change > self.test_timeout:
                self.hung = True
                process.kill()
            if self.stopping.is_set():
                process.kill()
            time.sleep(0.2)
        return process.returncode

    def run(self) -> None:
        remaining = list(self.ids)
        attempt = 0
        while remaining:
            code, done, running = self._run_once(remaining, attempt)
            self.codes.append(code)
            if code == -signal.SIGTERM:  # the outer timeout's signal reached the process first
                Shard.stopping.set()
            left = [t for t in remaining if t not in done]
            if not left:
                break
            if self.stopping.is_set():
                self.missing.extend(left)
                break
            if code < 0 or code not in (0, 1, 2, 5):
                # the process died during left[0] (a segfault, an abort, a hang): report it
                why = (f"no test finished for {self.test_timeout:.0f} s; the test process was "
                       f"killed" if self.hung else
                       f"the test process died (exit code {code})")
                # pytest may reorder tests (fixture scopes): the plugin names the one running
                victim = running if running in left else left[0]
                self.crashed.append((victim, f"{why} while this test ran"))
                left = [t for t in left if t != victim]
            elif code != 2:
                # ended normally without running these (not collected): nothing to retry
                self.missing.extend(left)
                break
            if attempt == self.restarts:
                self.missing.extend(left)
                break
            remaining = left
            attempt += 1
        with open(f"{self.stem}-{self.index}.log") as handle:
            self.lines = handle.read().splitlines()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--restarts", type=int, default=8,
                        help="fresh processes per shard after a fault (default 8)")
    parser.add_argument("--test-timeout", type=float, default=240,
                        help="seconds without a finished test after which a shard's process "
                             "is killed as hung (default 240)")
    parser.add_argument("--junitxml", required=True)
    parser.add_argument("--marker", default="gpu", help="pytest -m expression")
    parser.add_argument("paths", nargs="*", default=["tests"])
    args = parser.parse_args()
    ids = collect(args.marker, args.paths)
    if not ids:
        print("gpu_tests: no tests collected")
        return 1
    count = max(1, min(args.shards, len(ids)))
    stem = os.path.splitext(args.junitxml)[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.junitxml)), exist_ok=True)
    for index in range(count):
        if os.path.exists(f"{stem}-{index}.log"):
            os.remove(f"{stem}-{index}.log")
    began = time.monotonic()
    shards = [Shard(index, ids[index::count], stem, args.restarts, args.test_timeout)
              for index in range(count)]
    # An outer `timeout` sends SIGTERM (to the whole process group): stop the shards and still
    # report every test that finished.
    signal.signal(signal.SIGTERM, lambda signum, frame: Shard.stopping.set())
    threads = [threading.Thread(target=shard.run) for shard in shards]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.5)
    if Shard.stopping.is_set():
        print("gpu_tests: stopped by SIGTERM; reporting the tests that finished")
    status = 0
    for shard in shards:
        for line in shard.lines:
            if line.startswith(("FAILED ", "ERROR ")):
                print(line[:200])
        for nodeid, message in shard.crashed:
            print(f"CRASHED {nodeid} - {message}"[:200])
        for nodeid in shard.missing:
            print(f"MISSING {nodeid}"[:200])
        exits = ", ".join(str(code) for code in shard.codes)
        summary = [line for line in shard.lines if not line.startswith("== gpu_tests")]
        print(f"gpu_tests: shard {shard.index} ({len(shard.ids)} tests, "
              f"{len(shard.codes)} process{'es' if len(shard.codes) > 1 else ''}) exit {exits}: "
              f"{summary[-1] if summary else 'no output'}")
        if shard.crashed or shard.missing or any(code not in (0, 5) for code in shard.codes):
            status = 1
    seconds = time.monotonic() - began
    parts = [part for shard in shards for part in shard.parts]
    extra = [entry for shard in shards for entry in shard.unwritten]
    extra += [(nodeid, "failed", message) for shard in shards for nodeid, message in shard.crashed]
    totals = merge_junit(parts, args.junitxml, seconds, extra)
    print(f"gpu_tests: {totals['tests']} tests, {totals['failures']} failed, "
          f"{totals['errors']} errors, {totals['skipped']} skipped in {count} shards, "
          f"{seconds:.0f}s")
    if totals["tests"] < len(ids):
        print(f"gpu_tests: only {totals['tests']} of {len(ids)} tests reported")
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
