"""Sweep the Triton inference kernel's autotune configs over VGG16's conv blocks on a GPU.

For each block (batch 64, 224x224 input, bf16 by default, channels_last) it times every config in
``_autotune_configs()`` (or, with ``--candidates``, only the at most 8 the autotuner times for
that block) with the config pinned, the autotuned op and its choice, and cuDNN eager (Conv2d +
BatchNorm2d + ReLU (+ MaxPool2d) modules), then prints a table and writes JSON. This is the data
behind the config list; the benchmark suite (python -m vgg_kernels.bench) times the tuned op.

    python benchmarks/tune_triton.py --out results.json [--dtype bf16] [--batch 64]
        [--candidates] [--layers 0,5,9]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import time

import torch
import triton
from torch import nn
from triton.testing import do_bench

from vgg_kernels import ops
from vgg_kernels.backends.triton.conv_bn_relu import (
    _autotune_configs,
    candidate_configs,
    conv_bn_relu_infer_with_config,
    last_tuned_config,
)
from vgg_kernels.bench.layers import layer_specs

# (C, K, H, pool) of VGG16's conv blocks at 224x224.
VGG16_LAYERS = [(spec.in_channels, spec.out_channels, spec.height, spec.pool)
                for spec in layer_specs("D", 224)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _time(fn) -> dict[str, float]:
    """Median, p20, p80 in ms; do_bench clears L2 before every run."""
    median, p20, p80 = do_bench(fn, warmup=25, rep=150, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}


def _matmul_peak_tflops(dtype: torch.dtype) -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    ms = _time(lambda: a @ b)["median_ms"]
    return 2 * 8192**3 / ms / 1e9


def _commit() -> str:
    if os.environ.get("VGG_KERNELS_COMMIT"):
        return os.environ["VGG_KERNELS_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _measure_layer(c: int, k: int, h: int, pool: bool, n: int, dtype: torch.dtype,
                   configs: list[triton.Config] | None) -> dict:
    """Time one block; ``configs=None`` times the autotuner's candidates for it."""
    x = torch.randn(n, c, h, h, device="cuda", dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    block = [nn.Conv2d(c, k, 3, padding=1), nn.BatchNorm2d(k), nn.ReLU(inplace=True)]
    if pool:
        block.append(nn.MaxPool2d(2))
    eager = nn.Sequential(*block).cuda().eval().to(dtype, memory_format=torch.channels_last)
    conv, bn = eager[0], eager[1]
    bn.running_mean.uniform_(-0.1, 0.1)
    bn.running_var.uniform_(0.5, 1.5)
    scale, shift = ops.fold_bn(conv.bias, bn.running_mean, bn.running_var, bn.weight,
                               bn.bias, bn.eps, k, x.device)
    weight = conv.weight.detach()
    row: dict = {"C": c, "K": k, "H": h, "pool": pool, "flops": 2 * n * h * h * k * c * 9}
    with torch.no_grad():
        row["cudnn_eager"] = _time(lambda: eager(x))
        began = time.perf_counter()
        ops.conv_bn_relu_infer(x, weight, scale, shift, pool=pool, backend="triton")
        torch.cuda.synchronize()
        row["autotune_s"] = time.perf_counter() - began
        row["tuned_config"] = last_tuned_config()
        row["triton"] = _time(lambda: ops.conv_bn_relu_infer(x, weight, scale, shift,
                                                              pool=pool, backend="triton"))
        row["configs"] = []
        if configs is None:
            configs = candidate_configs(x, weight, pool)
        for config in configs:
            kwargs = config.all_kwargs()
            try:
                timing = _time(functools.partial(conv_bn_relu_infer_with_config, x, weight,
                                                 scale, shift, pool, **kwargs))
            except Exception as error:  # out of resources, or a descriptor config this
                # shape cannot use (ValueError)
                timing = {"error": f"{type(error).__name__}: {error}"[:200]}
            row["configs"].append({"config": kwargs, **timing})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--candidates", action="store_true",
                        help="time only the configs the autotuner considers for each block")
    parser.add_argument("--layers", default=None,
                        help="comma-separated block indices (0-12) to time; default all")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    peak = _matmul_peak_tflops(torch.bfloat16 if dtype == torch.float32 else dtype)
    configs = None if args.candidates else _autotune_configs()
    indices = (range(len(VGG16_LAYERS)) if args.layers is None
               else [int(i) for i in args.layers.split(",")])
    rows = []
    for c, k, h, pool in (VGG16_LAYERS[i] for i in indices):
        row = _measure_layer(c, k, h, pool, args.batch, dtype, configs)
        flops = row["flops"]
        rows.append(row)
        best = min((cfg for cfg in row["configs"] if "median_ms" in cfg),
                   key=lambda cfg: cfg["median_ms"])
        tflops = flops / row["triton"]["median_ms"] / 1e9
        print(f"C{c:<4}K{k:<4}H{h:<4}pool={pool!s:<5} cudnn {row['cudnn_eager']['median_ms']:.3f}"
              f" ms  triton {row['triton']['median_ms']:.3f} ms ({tflops:.0f} TFLOP/s, "
              f"{100 * tflops / peak:.0f}% of peak, "
              f"{row['cudnn_eager']['median_ms'] / row['triton']['median_ms']:.2f}x)  "
              f"best pinned {best['median_ms']:.3f} ms {best['config']}; tuned "
              f"{row['tuned_config']}", flush=True)
    speedups = [r["cudnn_eager"]["median_ms"] / r["triton"]["median_ms"] for r in rows]
    geomean = float(torch.tensor(speedups).log().mean().exp())
    print(f"matmul peak {peak:.0f} TFLOP/s; geometric-mean speedup over cuDNN eager "
          f"{geomean:.2f}x")
    if args.out:
        env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": triton.__version__, "cuda": torch.version.cuda,
               "python": platform.python_version(), "commit": _commit(),
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(args.out, "w") as f:
            json.dump({"environment": env, "dtype": args.dtype, "batch": args.batch,
                       "peak_tflops": peak, "geomean_speedup": geomean, "layers": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
