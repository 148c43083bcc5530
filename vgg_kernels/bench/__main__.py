"""``python -m vgg_kernels.bench``: see vgg_kernels/bench/__init__.py."""

import sys

from vgg_kernels.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
