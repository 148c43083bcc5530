"""What the Triton kernel compiles to on a GPU target, without the GPU.

Compiles ``kernels.conv_bn_relu_fwd_kernel`` ahead of time for a CUDA target (sm_90a by default)
with one autotune config, specialised like a VGG layer would be (16-divisible pointers, channel
counts and strides, unit channel strides), and reports what decides its speed: registers and
spills, shared memory, and how the main loop moves data (TMA copies, cp.async, warpgroup MMAs,
shared-memory to register copies). Needs Triton 3.4 or newer with its bundled ptxas (and
cuobjdump for registers), in a process without TRITON_INTERPRET=1.

    python -m vgg_kernels.backends.triton.codegen [--arch 90] [--dtype bf16] [--pool]
        [--select 16,17] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vgg_kernels.backends.triton import interpreting, kernels
from vgg_kernels.backends.triton.conv_bn_relu import _autotune_configs, describe_config

_POINTER_TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
# Arguments a VGG layer's launch specialises as multiples of 16 (pointers, C, K, strides).
_DIVISIBLE = ("x_ptr", "w_ptr", "scale_ptr", "shift_ptr", "y_ptr", "C", "K",
              "stride_xn", "stride_xh", "stride_xw", "stride_wk", "stride_wr", "stride_ws",
              "stride_yn", "stride_yh", "stride_yw")


@dataclass
class CodegenReport:
    registers: int | None  # per thread (None without cuobjdump)
    spill_bytes: int | None  # stack frame per thread
    shared_bytes: int
    tma_loads: int  # TMA global -> shared copies in the TTGIR
    tma_stores: int
    cp_async: int  # cp.async instructions in the PTX
    wgmma: int  # warpgroup MMA ops in the TTGIR
    shared_to_register: int  # ttg.local_load ops: operands staged through registers
    global_16bit_loads: int  # one-element 2-byte global loads in the PTX (gathers)


def compile_config(config: triton.Config, *, dtype: str = "bf16", r: int = 3, pool: bool = False,
                   flat_channels: int = 0, segments: bool = False, arch: int = 90):
    """Compile the kernel for ``GPUTarget('cuda', arch, 32)`` with ``config`` (an entry of
    ``_autotune_configs()``); ``flat_channels`` > 0 compiles the flattened reduction for that C,
    on row segments with ``segments``."""
    if interpreting():
        raise RuntimeError("ahead-of-time compiles need a process without TRITON_INTERPRET=1 "
                           "(its kernels are interpreter functions)")
    kernel = kernels.conv_bn_relu_fwd_kernel
    names = kernel.arg_names
    constexprs = {
        "R": r, "POOL": pool, "FLAT_K": flat_channels, "SEGMENTS": segments,
        "EVEN_C": not flat_channels,
        "INPUT_PRECISION": "ieee", "UPCAST": False,
        "TMA_OK": bool(config.kwargs["USE_TMA"]), "stride_xc": 1, "stride_wc": 1, "stride_yc": 1,
        **config.kwargs,
    }
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("x_ptr", "w_ptr", "y_ptr"):
            signature[name] = _POINTER_TYPES[dtype]
        elif name in ("scale_ptr", "shift_ptr"):
            signature[name] = "*fp32"
        else:
            signature[name] = "i32"
    divisible = [n for n in _DIVISIBLE
                 if not (flat_channels and n in ("C", "stride_xn", "stride_xh", "stride_xw",
                                                 "stride_wk", "stride_wr", "stride_ws"))]
    source = ASTSource(
        kernel, signature,
        {(names.index(n),): v for n, v in constexprs.items()},
        {(names.index(n),): [["tt.divisibility", 16]] for n in divisible},
    )
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        out = subprocess.run([tool, "-res-usage", handle.name], capture_output=True, text=True,
                             check=False).stdout
    match = re.search(r"REG:(\d+).*?STACK:(\d+)", out, re.S)
    return (int(match.group(1)), int(match.group(2))) if match else (None, None)


def report(compiled) -> CodegenReport:
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    registers, spills = _resource_usage(compiled.asm["cubin"])
    return CodegenReport(
        registers=registers,
        spill_bytes=spills,
        shared_bytes=compiled.metadata.shared,
        tma_loads=ttgir.count("ttng.async_tma_copy_global_to_local"),
        tma_stores=ttgir.count("ttng.async_tma_copy_local_to_global"),
        cp_async=len(re.findall(r"cp\.async\.c[ag]\.", ptx)),
        wgmma=ttgir.count("ttng.warp_group_dot "),
        shared_to_register=ttgir.count("ttg.local_load"),
        global_16bit_loads=len(re.findall(r"ld\.global(?:\.(?!v\d)[a-z0-9:]+)*\.[bu]16\s",
                                          ptx)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10")
    parser.add_argument("--dtype", choices=sorted(_POINTER_TYPES), default="bf16")
    parser.add_argument("--pool", action="store_true", help="compile the fused max-pool")
    parser.add_argument("--select", default=None,
                        help="comma-separated indices into _autotune_configs(hopper=ARCH >= 90); "
                             "default all")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead")
    args = parser.parse_args()
    configs = _autotune_configs(hopper=args.arch >= 90)
    if args.select is not None:
        configs = [configs[int(i)] for i in args.select.split(",")]
    rows = []
    for config in configs:
        # persistent pointer configs: the first layer's one-step reduction, on row segments
        # where the step is wide enough for them (three rows of 16)
        flat = 3 if config.kwargs["PROGRAMS_PER_SM"] and not config.kwargs["USE_TMA"] else 0
        segments = bool(flat) and config.kwargs["BLOCK_K"] >= 48
        row = {"config": describe_config(config.all_kwargs()) + (" seg" if segments else ""),
               **config.kwargs, "num_warps": config.num_warps,
               "num_stages": config.num_stages}
        try:
            row.update(asdict(report(compile_config(config, dtype=args.dtype, pool=args.pool,
                                                    flat_channels=flat, segments=segments,
                                                    arch=args.arch))))
        except Exception as error:  # a config this target cannot compile: say so, go on
            row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
        rows.append(row)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'config':<28} {'regs':>5} {'spill':>6} {'smem KB':>8} {'tma ld':>7} {'cp.async':>8} "
          f"{'wgmma':>6} {'smem->reg':>9}")
    for row in rows:
        if "error" in row:
            print(f"{row['config']:<28} {row['error'][:70]}")
            continue
        print(f"{row['config']:<28} {row['registers']!s:>5} {row['spill_bytes']!s:>6} "
              f"{row['shared_bytes'] / 1024:>8.0f} {row['tma_loads']:>7} {row['cp_async']:>8} "
              f"{row['wgmma']:>6} {row['shared_to_register']:>9}")


if __name__ == "__main__":
    main()
