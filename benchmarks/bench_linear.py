"""The native small-batch linear kernel against ``F.linear`` (MKL/oneDNN) on VGG's classifier
layers, each case timed in interleaved rounds, with both results' error against float64; the
measurements behind ``vgg_kernels.ops.LINEAR_MAX_ROWS``.

    python benchmarks/bench_linear.py [--rows 1,2,4,8,16,32] [--repeats 9]

Prints medians in ms per layer and row count.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from vgg_kernels.bench.timing import interleaved_medians

LAYERS = [(25088, 4096), (4096, 4096), (4096, 1000)]


def _error(got: torch.Tensor, oracle: torch.Tensor) -> float:
    return float((got.double() - oracle).abs().max() / oracle.abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    from vgg_kernels.backends import native

    reason = native._load()
    if reason is not None:
        raise SystemExit(f"the native extension is not available: {reason}")
    kernel = torch.ops.vgg_kernels.linear
    torch.manual_seed(0)
    print(f"{'layer':<14}{'rows':>5}{'torch ms':>10}{'native ms':>11}{'speedup':>9}"
          f"{'err torch':>11}{'err native':>12}")
    for fan_in, fan_out in LAYERS:
        weight, bias = torch.randn(fan_out, fan_in), torch.randn(fan_out)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, fan_in)
            with torch.no_grad():
                operands = (x, weight, bias)
                times = interleaved_medians({"torch": lambda a=operands: F.linear(*a),
                                      "native": lambda a=operands: kernel(*a)}, args.repeats)
                oracle = F.linear(x.double(), weight.double(), bias.double())
                errors = (_error(F.linear(x, weight, bias), oracle),
                          _error(kernel(x, weight, bias), oracle))
            print(f"{fan_in}->{fan_out:<8}{rows:>5}{times['torch']:>10.2f}"
                  f"{times['native']:>11.2f}{times['torch'] / times['native']:>8.2f}x"
                  f"{errors[0]:>11.1e}{errors[1]:>12.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
