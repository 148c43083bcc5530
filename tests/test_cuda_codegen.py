"""What the native Hopper kernels (csrc/cuda/conv_wgmma*.cu) compile to for sm_90a, checked
without a GPU: no register spills (in the short-reduction kernel, conv_narrow.cu, too), and the
warpgroup MMAs of a reduction step issued back to back (asynchronous) rather than each waiting
for the one before. ptxas serializes them (warning C7515)
when it sees the accumulators written by other instructions inside the MMA pipeline, which a
harmless-looking change to the loop or the epilogue can cause; the kernel stays correct and only
gets slower, so nothing else would notice before a benchmark on a lent GPU."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
HOPPER_SOURCES = ["conv_wgmma.cu", "conv_wgmma_halo.cu"]
SOURCES = [*HOPPER_SOURCES, "conv_narrow.cu"]


def _nvcc() -> str:
    spec = importlib.util.spec_from_file_location("vgg_kernels_build_config",
                                                  os.path.join(CSRC, "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    home = build.find_cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit (nvcc) here")
    return os.path.join(home, "bin", "nvcc")


def _cuobjdump() -> str | None:
    """cuobjdump from the toolkit, else the one Triton bundles; None without either."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    triton_spec = importlib.util.find_spec("triton")
    if triton_spec is None or triton_spec.origin is None:
        return None
    bundled = os.path.join(os.path.dirname(triton_spec.origin), "backends", "nvidia", "bin",
                           "cuobjdump")
    return bundled if os.path.exists(bundled) else None


@pytest.fixture(scope="module", params=SOURCES)
def compiled(request, tmp_path_factory):
    """(ptxas report, object file, source name) of one source compiled for sm_90a."""
    out = tmp_path_factory.mktemp("sm90a") / (request.param + ".o")
    # the defines torch's extension build passes to nvcc, as in the real build
    command = [_nvcc(), "-std=c++17", "-O3", "--expt-relaxed-constexpr",
               "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
               "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
               "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v", "-I", CSRC,
               "-c", os.path.join(CSRC, "cuda", request.param), "-o", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr, out, request.param


def test_no_kernel_spills(compiled):
    report, _, _ = compiled
    entries = re.findall(r"Compiling entry function '(\w+)'", report)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert entries and len(spills) == len(entries), report[-3000:]
    assert all(stores == "0" and loads == "0" for stores, loads in spills), report[-3000:]


def test_mmas_are_not_serialized(compiled):
    report, _, _ = compiled
    assert "C7515" not in report, [line for line in report.splitlines() if "C7515" in line]


def test_mmas_are_issued_back_to_back(compiled):
    """In the SASS of every kernel, some warpgroup MMAs follow one another with no wait between
    them (an MMA group of a reduction step); serialized MMAs each wait for the one before
    (WARPGROUP.DEPBAR between every two HGMMAs)."""
    _, obj, source = compiled
    if source not in HOPPER_SOURCES:
        pytest.skip(f"{source} has no warpgroup MMAs")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton) to read the SASS")
    sass = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True,
                          timeout=300, check=True).stdout
    functions = re.split(r"\n\s*Function : ", sass)[1:]
    kernels = [f for f in functions if "HGMMA" in f]
    assert kernels, "no kernel with warpgroup MMAs in the sm_90a code"
    for body in kernels:
        name = body.split("\n", 1)[0].strip()
        between = re.split(r"\bHGMMA\.", body)[1:-1]  # the code after each HGMMA but the last
        assert any("WARPGROUP.DEPBAR" not in code for code in between), name
