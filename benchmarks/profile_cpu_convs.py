"""Per-conv CPU timings behind the native backend's algorithm choices, each case timed in
interleaved rounds (one call of every variant per round) so that load from other processes hits
all variants alike.

    python benchmarks/profile_cpu_convs.py forward [N,C,K,H[,pool] ...]
    python benchmarks/profile_cpu_convs.py wgrad [N,C,K,H ...]

``forward``: the inference block (conv + scale/shift + ReLU, + 2x2 pool with ``pool`` 1) on the
native backend with VGG_KERNELS_CPU_CONV forced to each algorithm, next to nn.Conv2d alone
(oneDNN); the choice of csrc/cpu/ops_cpu.cpp (choose_algorithm, winograd4_pays).
``wgrad``: the weight gradient of a 3x3 conv, the extension's Winograd kernel against oneDNN's
(WGRAD_WINOGRAD_MIN_CHANNELS in vgg_kernels/backends/native.py).
Without shapes, VGG16's and the UNet's layers at batch 4. Prints medians in ms.
"""

from __future__ import annotations

import argparse
import os

import torch

from vgg_kernels.bench.timing import interleaved_medians

FORWARD_SHAPES = ["4,64,64,112,1", "4,64,128,56", "4,128,128,56,1", "4,128,256,28",
                  "4,256,256,28", "4,256,512,14", "4,512,512,14", "4,512,512,7",
                  "4,64,64,64", "4,128,128,32", "4,256,256,16", "4,512,512,8", "4,1024,256,8",
                  "1,64,64,224,1", "1,512,512,28", "32,256,512,4"]
WGRAD_SHAPES = ["4,3,64,112", "4,8,64,64", "4,64,64,64", "4,128,128,32", "4,256,256,16",
                "4,512,512,8", "4,512,512,4", "4,1024,256,8", "32,64,64,32", "32,256,256,8",
                "32,512,512,4", "32,512,512,2", "4,512,512,14", "4,64,64,112"]


def _with_algorithm(algorithm: str, fn):
    def call():
        os.environ["VGG_KERNELS_CPU_CONV"] = algorithm
        try:
            return fn()
        finally:
            os.environ.pop("VGG_KERNELS_CPU_CONV", None)
    return call


def _forward_case(text: str, repeats: int) -> str:
    from vgg_kernels import ops

    n, c, k, h, *rest = (int(v) for v in text.split(","))
    pool = bool(rest and rest[0])
    x = torch.relu(torch.randn(n, c, h, h)).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(k, c, 3, 3) * (2.0 / (9 * c)) ** 0.5
    scale, shift = torch.rand(k) + 0.5, torch.randn(k) * 0.1
    conv = torch.nn.Conv2d(c, k, 3, padding=1).eval()

    def block():
        return ops.conv_bn_relu_infer(x, weight, scale, shift, pool=pool, backend="native")

    variants = {name: _with_algorithm(name, block)
                for name in ("direct", "winograd", "winograd4", "auto")}
    variants["onednn conv"] = lambda: conv(x)
    with torch.no_grad():
        times = interleaved_medians(variants, repeats)
    return (f"N{n} C{c} K{k} {h}x{h}{' pool' if pool else ''}: "
            + "  ".join(f"{name} {value:.2f}" for name, value in times.items()))


def _wgrad_case(text: str, repeats: int) -> str:
    from vgg_kernels.backends.native import BACKEND, _load
    from vgg_kernels.backends.reference import conv_wgrad_reference

    _load()

    n, c, k, h = (int(v) for v in text.split(","))
    x = torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(n, k, h, h).contiguous(memory_format=torch.channels_last)
    shape = [k, c, 3, 3]
    times = interleaved_medians({"winograd": lambda: torch.ops.vgg_kernels.conv_wgrad(grad, x),
                          "onednn": lambda: conv_wgrad_reference(grad, x, shape),
                          "chosen": lambda: BACKEND.conv_wgrad(grad, x, shape)}, repeats)
    return (f"N{n} C{c} K{k} {h}x{h} (N*H*W {n * h * h}): "
            + "  ".join(f"{name} {value:.2f}" for name, value in times.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("op", choices=("forward", "wgrad"))
    parser.add_argument("shapes", nargs="*", metavar="N,C,K,H[,pool]")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    case = _forward_case if args.op == "forward" else _wgrad_case
    for shape in args.shapes or (FORWARD_SHAPES if args.op == "forward" else WGRAD_SHAPES):
        print(case(shape, args.repeats), flush=True)


if __name__ == "__main__":
    main()
