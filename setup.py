"""Build script: the Python package, plus the optional compiled extension vgg_kernels._C.

The extension is built only when torch is importable at build time (install with
``--no-build-isolation``) and csrc/ holds sources; otherwise the package installs without it and
builds it on first use (see vgg_kernels/backends/native.py).
"""

from setuptools import setup

setup()
