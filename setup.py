"""Build script: the Python package, plus the optional compiled extension vgg_kernels._C.

The extension is built when torch is importable at build time, i.e. with
``pip install --no-build-isolation -e .`` (torch is deliberately not a build requirement: an
isolated build would fetch a second torch and build against it). With nvcc and a CUDA build of
torch it holds the CPU and the CUDA kernels (CUDAExtension), otherwise the CPU kernels only
(CppExtension). Without torch, or with ``VGG_KERNELS_SKIP_EXT=1``, the package installs without
it and vgg_kernels/backends/native.py builds it on first use.

Knobs: VGG_KERNELS_SKIP_EXT, VGG_KERNELS_CUDA_ARCHS (default "9.0a"; setting it builds the CUDA
kernels where no GPU is visible), VGG_KERNELS_CPU_ONLY, MAX_JOBS, CUDA_HOME; see csrc/build.py.
The build uses ninja (``pip install ninja``).
"""

import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_config():
    spec = importlib.util.spec_from_file_location(
        "vgg_kernels_build", os.path.join(ROOT, "csrc", "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _announce(message: str) -> None:
    """``message`` on stderr, and on the terminal when pip captures stderr (pip shows a build's
    output only with -v): the user sees what is built, and for how long, before it starts."""
    print(message, file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as terminal:
            terminal.write(message + "\n")
    except OSError:  # no terminal (CI, a pipe): stderr is all there is
        pass


def _extension_kwargs() -> dict:
    if os.environ.get("VGG_KERNELS_SKIP_EXT", "").strip().lower() in ("1", "true", "yes", "on"):
        print("vgg_kernels: VGG_KERNELS_SKIP_EXT is set; not building vgg_kernels._C",
              file=sys.stderr)
        return {}
    if not os.path.isfile(os.path.join(ROOT, "csrc", "vgg_kernels.cpp")):
        return {}
    build = _load_build_config()
    cuda_home = build.prepare_environment()  # before torch.utils.cpp_extension reads CUDA_HOME
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("vgg_kernels: torch is not importable at build time (use pip install "
              "--no-build-isolation); vgg_kernels._C will be built on first use",
              file=sys.stderr)
        return {}
    with_cuda, why = build.cuda_decision(cuda_home)
    kind = CUDAExtension if with_cuda else CppExtension
    jobs = int(os.environ["MAX_JOBS"])
    # measured on a 2-core Zen 4: the CPU kernels in about 1.5 minutes, with the CUDA kernels
    # for one target about 5; they shrink with more cores (MAX_JOBS)
    minutes = (5 if with_cuda else 1.5) * min(1.0, 2 / max(1, jobs)) ** 0.5
    what = ("CPU and CUDA kernels for " + ";".join(build.cuda_archs()) if with_cuda
            else "CPU kernels only")
    _announce(f"vgg_kernels: building vgg_kernels._C with {what} ({why}); MAX_JOBS={jobs}, "
              f"about {minutes:.1f} minutes here (pip install -v shows the compile)")
    extension = kind(
        name="vgg_kernels._C",
        sources=[os.path.relpath(s, ROOT) for s in build.sources(with_cuda)],
        include_dirs=build.include_dirs(),
        extra_compile_args=build.compile_args(with_cuda),
        extra_link_args=build.link_args(),
    )
    return {"ext_modules": [extension],
            "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_extension_kwargs())
