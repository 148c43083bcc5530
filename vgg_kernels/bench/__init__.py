"""Benchmark suite: ``python -m vgg_kernels.bench {layers,model,all,compare,plot,readme,validate}``.

- ``layers``: every fused block of a VGG config, per backend, against eager modules and
  ``torch.compile``; ms (median, p20, p80, raw samples), TFLOP/s, % of a peak measured in the
  same run, speedup over eager and its geometric mean (vgg_kernels/bench/layers.py).
- ``model``: whole-model inference and training-step images/s and peak memory
  (vgg_kernels/bench/model.py).
- ``all``: both, in one result file.
- ``compare OLD NEW``: per tracked figure, the change and a spread-aware verdict; exit 1 on a
  regression, 2 on unreadable files or a schema mismatch (vgg_kernels/bench/compare.py).
- ``plot``: PNG charts from result files (matplotlib: the ``bench`` extra).
- ``readme``: rewrite README.md's generated section from the newest committed GPU result.
- ``validate``: check result files against the schema (vgg_kernels/bench/results.py).

Timing: CUDA events around each call on GPUs, ``time.perf_counter`` on CPUs; warm-up first; input
buffers cycled so that the working set exceeds the cache (vgg_kernels/bench/timing.py).
"""

from vgg_kernels.bench.compare import Comparison, compare_results, judge
from vgg_kernels.bench.results import (
    SCHEMA_VERSION,
    Figure,
    ResultFileError,
    load_result,
    tracked_figures,
    validate_result,
    write_result,
)

__all__ = [
    "SCHEMA_VERSION",
    "Comparison",
    "Figure",
    "ResultFileError",
    "compare_results",
    "judge",
    "load_result",
    "tracked_figures",
    "validate_result",
    "write_result",
]
