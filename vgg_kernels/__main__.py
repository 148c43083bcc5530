"""Main job: run FusedVGG on the best backend here, check it against the reference, time it.

    python -m vgg_kernels [--config D] [--batch-size N] [--resolution R] [--dtype bf16] ...

Prints one table: backend, device, dtype, images/s of FusedVGG and of the eager model with
torchvision's layout (same weights, channels_last), and the max error against a float64
reference. Exits 1 when the error exceeds the dtype's tolerance.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from vgg_kernels import FusedVGG, make_eager_vgg
from vgg_kernels.backends import BACKEND_NAMES, resolve_backend
from vgg_kernels.models.vgg import parse_config

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# max |y - y_ref| / max |y_ref| on the logits, by storage dtype; fp32 on a GPU may run as tf32
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 8e-2}
TOLERANCE_TF32 = 1e-2


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        prog="python -m vgg_kernels",
        description="Run FusedVGG (eval mode) on the best available backend, check it against a "
                    "float64 reference and compare its throughput with the eager model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="D",
                        help="VGG config: A, A-LRN, B, C, D, E or a torchvision name")
    parser.add_argument("--no-batch-norm", action="store_true", help="build the config without BN")
    parser.add_argument("--batch-size", type=int, default=64 if cuda else 4,
                        help="images per batch")
    parser.add_argument("--resolution", type=int, default=224 if cuda else 112,
                        help="input height and width (at least 32)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32",
                        help="storage dtype")
    parser.add_argument("--device", default="cuda" if cuda else "cpu", help="cuda[:N] or cpu")
    parser.add_argument("--backend", choices=BACKEND_NAMES, default="auto",
                        help="kernels to run")
    parser.add_argument("--iters", type=int, default=20 if cuda else 3,
                        help="timed iterations per model (after one warm-up)")
    args = parser.parse_args(argv)
    try:
        parse_config(args.config, False if args.no_batch_norm else None)
    except (TypeError, ValueError) as error:
        parser.error(f"--config: {error}")
    if args.batch_size <= 0 or args.iters <= 0:
        parser.error("--batch-size and --iters must be positive")
    if args.resolution < 32:
        parser.error(f"--resolution must be at least 32 (five 2x2 pools; got {args.resolution})")
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:N] (got {args.device!r})")
    if args.device.startswith("cuda") and not cuda:
        parser.error("--device cuda was given, but torch sees no CUDA device")
    return args


def _images_per_second(model: torch.nn.Module, x: torch.Tensor, iters: int) -> float:
    with torch.no_grad():
        model(x)  # warm-up: compiles and autotunes kernels
        if x.is_cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                model(x)
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            began = time.perf_counter()
            for _ in range(iters):
                model(x)
            seconds = time.perf_counter() - began
    return iters * x.shape[0] / seconds


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = resolve_backend(args.backend, device, dtype, "conv_bn_relu_infer").name
    for warning in caught:
        print(f"note: {warning.message}")

    fused = FusedVGG(args.config, batch_norm=False if args.no_batch_norm else None,
                     backend=args.backend)
    for module in fused.modules():  # non-trivial BN statistics, so folding is exercised
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    eager = make_eager_vgg(args.config, batch_norm=fused.batch_norm, init_weights=False)
    eager.load_state_dict(fused.state_dict(), strict=True)
    fused = fused.eval().to(device=device, dtype=dtype)
    eager = eager.eval().to(device=device, dtype=dtype, memory_format=torch.channels_last)

    x = torch.randn(args.batch_size, 3, args.resolution, args.resolution, device=device)
    with torch.no_grad():
        out = fused(x.to(dtype)).double()
        reference = make_eager_vgg(args.config, batch_norm=fused.batch_norm, init_weights=False)
        reference.load_state_dict(fused.state_dict(), strict=True)
        expected = reference.eval().to(device=device, dtype=torch.float64)(
            x.to(dtype).double())
    error = ((out - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    tf32 = dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32
    tolerance = TOLERANCE_TF32 if tf32 else TOLERANCE[dtype]

    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    fused_ips = _images_per_second(fused, x, args.iters)
    eager_ips = _images_per_second(eager, x, args.iters)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = [
        ("config", f"{fused.config}{' (BN)' if fused.batch_norm else ''}"),
        ("backend", backend),
        ("device", name),
        ("dtype", args.dtype),
        ("input", f"{args.batch_size}x3x{args.resolution}x{args.resolution}"),
        ("FusedVGG images/s", f"{fused_ips:.1f}"),
        ("eager images/s", f"{eager_ips:.1f}"),
        ("speedup", f"{fused_ips / eager_ips:.2f}x"),
        ("max error vs float64", f"{error:.2e} (tolerance {tolerance:.0e})"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if not error <= tolerance:
        print("FAILED: FusedVGG disagrees with the reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
