"""Benchmark suite: ``python -m vgg_kernels.bench {layers,model,all,perceptual,memory,compare,bars,
show,merge,plot,readme,validate}``.

- ``layers``: every fused block of a VGG config, per backend, against eager modules and
  ``torch.compile``; ms (median, p20, p80, raw samples), TFLOP/s, % of a peak measured in the
  same run, speedup over eager and its geometric mean (vgg_kernels/bench/layers.py).
  ``--mode train``: each block's training forward + backward (BN with batch statistics;
  gradients of the input, conv weight and bias, BN weight and bias) against the eager modules in
  train mode and their ``torch.compile``; FLOPs counted as 3x the forward's; suite
  ``layers_train``, keys ``layers-train/...`` (vgg_kernels/bench/layers_train.py).
- ``model``: whole-model inference (run dtype) and mixed-precision training-step (autocast, fp32
  parameters; mode ``train_amp``) images/s and peak memory (vgg_kernels/bench/model.py).
- ``all``: layers then model, in one result file.
- ``perceptual``: a perceptual loss through a frozen VGG16 (taps relu1_2 .. relu4_3,
  ``--taps``): forward + input gradient per fused backend (``VGGFeatures``) against the eager
  features and ``torch.compile``; ms, images/s, speedup, input-gradient error
  (vgg_kernels/bench/perceptual.py).
- ``memory``: bytes saved for the backward by one training forward of ``FusedVGG`` (default D)
  per fused backend against the eager model (saved-tensor hooks; on CUDA also the peak
  allocation growth), and the ratio (vgg_kernels/bench/memory.py).
- ``compare OLD NEW``: per tracked figure, the change and a spread-aware verdict; exit 1 on a
  regression, 2 on unreadable files or a schema mismatch (vgg_kernels/bench/compare.py).
- ``bars``: the performance bars result files meet or miss (vgg_kernels/bench/bars.py).
- ``show``: the tables of result files; ``merge``: one file from the suites of several.
- ``plot``: PNG charts from result files (matplotlib: the ``bench`` extra).
- ``readme``: rewrite README.md's generated section from the newest committed GPU result.
- ``validate``: check result files against the schema (vgg_kernels/bench/results.py).

Defaults by device (CUDA / CPU): layers and model batch 64 / 2 at 224px; perceptual batch 32 / 2
at 256 / 128px; memory batch 64 / 4 at 224 / 64px; dtype bf16 / fp32.

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
