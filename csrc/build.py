"""How vgg_kernels._C is built: sources, flags and environment, shared by setup.py (ahead of time)
and vgg_kernels/backends/native.py (JIT with torch.utils.cpp_extension.load on first use).

Plain standard library at import; torch is imported only by the functions that need it, after
``prepare_environment`` has fixed CUDA_HOME (torch.utils.cpp_extension reads it at import).

Knobs (environment variables):
    VGG_KERNELS_CUDA_ARCHS  GPU targets, ``;``-separated, as in TORCH_CUDA_ARCH_LIST (``8.0``,
                            ``9.0a``, ``9.0+PTX``); default TORCH_CUDA_ARCH_LIST, else ``9.0a``.
                            Setting either builds the CUDA kernels on a machine without a
                            visible GPU (otherwise only the CPU kernels are built there).
    VGG_KERNELS_CPU_ONLY    ``1``: build the CPU kernels only, even where nvcc is found.
    VGG_KERNELS_PTXAS_VERBOSE  ``1``: pass ``-Xptxas -v`` (registers and spills per kernel).
    MAX_JOBS                parallel compile jobs (default: the number of CPUs).
    CUDA_HOME               the CUDA toolkit (default: /usr/local/cuda, else nvcc's on PATH).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig

CSRC = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "9.0a"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home() -> str | None:
    """The CUDA toolkit with an nvcc, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:  # /usr/local/bin/nvcc may be a wrapper script: resolve links only
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
                os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def prepare_environment() -> str | None:
    """Set CUDA_HOME (before torch.utils.cpp_extension is imported) and MAX_JOBS; returns
    CUDA_HOME or None."""
    home = find_cuda_home()
    if home is not None:
        os.environ["CUDA_HOME"] = home
    os.environ.setdefault("MAX_JOBS", str(max(1, os.cpu_count() or 1)))
    return home


def cuda_decision(cuda_home: str | None) -> tuple[bool, str]:
    """Whether to build the CUDA kernels, and why (for the build's announcement): nvcc found,
    torch a CUDA build, not VGG_KERNELS_CPU_ONLY, and a GPU visible or GPU targets asked for
    (VGG_KERNELS_CUDA_ARCHS or TORCH_CUDA_ARCH_LIST): a CPU-only machine does not spend minutes
    on kernels it cannot run unless asked to (CI asks, so they compile on every submission)."""
    if _truthy("VGG_KERNELS_CPU_ONLY"):
        return False, "VGG_KERNELS_CPU_ONLY is set"
    if cuda_home is None:
        return False, "no CUDA toolkit (nvcc) found"
    import torch

    if torch.version.cuda is None:
        return False, "torch is not a CUDA build"
    asked = os.environ.get("VGG_KERNELS_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if asked:
        return True, f"GPU targets asked for ({asked})"
    if torch.cuda.is_available():
        return True, "a GPU is visible"
    return False, ("no GPU is visible (set VGG_KERNELS_CUDA_ARCHS, e.g. 9.0a, to build the "
                   "CUDA kernels anyway)")


def want_cuda(cuda_home: str | None) -> bool:
    """Build the CUDA kernels (see ``cuda_decision``)."""
    return cuda_decision(cuda_home)[0]


def cuda_archs() -> list[str]:
    """The requested GPU targets, e.g. ['9.0a'] or ['8.0', '9.0+PTX']."""
    spec = (os.environ.get("VGG_KERNELS_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
            or DEFAULT_CUDA_ARCHS)
    archs = [a.strip() for a in spec.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    for arch in archs:
        number = arch.removesuffix("+PTX")
        if not number.replace(".", "", 1).removesuffix("a").isdigit() or "." not in number:
            raise ValueError(f"VGG_KERNELS_CUDA_ARCHS entries must look like 8.0, 9.0a or 9.0+PTX "
                             f"(got {arch!r} in {spec!r})")
        major = int(number.split(".")[0])
        if major < 8:
            raise ValueError(f"VGG_KERNELS_CUDA_ARCHS: the CUDA kernels need compute capability "
                             f"8.0 or newer (cp.async, bf16 tensor cores); got {arch!r}")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc -gencode flags; passing them stops torch from adding its own arch list."""
    flags = []
    for arch in archs:
        number = arch.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def sources(with_cuda: bool) -> list[str]:
    """Absolute paths of the sources to compile."""
    files = [os.path.join(CSRC, "vgg_kernels.cpp")]
    files += sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    if with_cuda:
        files += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))
        files += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    # torch.utils.cpp_extension.load puts every object file in one directory by base name
    stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise RuntimeError(f"csrc/ source files need distinct base names (JIT builds put all "
                           f"objects in one directory); clashing: {clashes}")
    return files


def include_dirs() -> list[str]:
    """Extra include directories: the pip-installed CUDA headers next to torch (cusparse.h and
    friends for ATen's CUDA headers live in site-packages/nvidia/cu13/include)."""
    dirs = [CSRC]
    site = sysconfig.get_paths()["purelib"]
    for candidate in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))):
        if os.path.isfile(os.path.join(candidate, "cusparse.h")):
            dirs.append(candidate)
    return dirs


def openmp_flags() -> list[str]:
    """at::parallel_for is inline OpenMP code: without -fopenmp it silently runs on one thread.
    On Linux the extension then links libgomp.so.1, which resolves to the copy torch has already
    loaded, so torch.set_num_threads governs both."""
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def link_args() -> list[str]:
    return openmp_flags()


def compile_args(with_cuda: bool) -> dict[str, list[str]]:
    """Flags for the host compiler ('cxx') and nvcc ('nvcc')."""
    defines = ["-DVGG_KERNELS_WITH_CUDA"] if with_cuda else []
    # -ffp-contract=off: the training ops' pre-activation z * scale + shift is a multiply and an
    # add, rounded the same in the forward and the backward (their ReLU masks must agree); the
    # conv kernels' FMAs are explicit intrinsics, which the flag leaves alone.
    args = {"cxx": ["-O3", "-ffp-contract=off", *openmp_flags(), *defines]}
    if with_cuda:
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", *defines,
                *gencode_flags(cuda_archs())]
        if _truthy("VGG_KERNELS_PTXAS_VERBOSE"):
            nvcc += ["-Xptxas", "-v"]
        args["nvcc"] = nvcc
    return args
