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
from vgg_kernels.backends.triton.conv_bn_relu import (
    _autotune_configs,
    describe_config,
    extras_fit,
    shared_memory_estimate,
    stats_config,
)

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


def _compile(kernel, signature_of, constexprs: dict, divisible, num_warps: int,
             num_stages: int, arch: int):
    """``triton.compile`` of ``kernel`` for ``GPUTarget('cuda', arch, 32)``: ``signature_of``
    maps each non-constexpr argument name to its type; ``divisible`` arguments are specialised
    as multiples of 16."""
    if interpreting():
        raise RuntimeError("ahead-of-time compiles need a process without TRITON_INTERPRET=1 "
                           "(its kernels are interpreter functions)")
    names = kernel.arg_names
    signature = {name: "constexpr" if name in constexprs else signature_of(name)
                 for name in names}
    source = ASTSource(
        kernel, signature,
        {(names.index(n),): v for n, v in constexprs.items()},
        {(names.index(n),): [["tt.divisibility", 16]] for n in divisible if n in names},
    )
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def compile_config(config: triton.Config, *, dtype: str = "bf16", r: int = 3, pool: bool = False,
                   flat_channels: int = 0, segments: bool = False, arch: int = 90,
                   epilogue: int = 0, extras: bool = False):
    """Compile the forward kernel with ``config`` (an entry of ``_autotune_configs()``);
    ``flat_channels`` > 0 compiles the flattened reduction for that C, on row segments with
    ``segments``; ``epilogue`` 1 the training forward's statistics epilogue; ``extras`` (with
    pool) the tapped activation and window-code stores of the input gradient's forward."""
    constexprs = {
        "R": r, "POOL": pool, "FLAT_K": flat_channels, "SEGMENTS": segments,
        "EVEN_C": not flat_channels,
        "INPUT_PRECISION": "ieee", "UPCAST": False,
        "TMA_OK": bool(config.kwargs["USE_TMA"]), "stride_xc": 1, "stride_wc": 1, "stride_yc": 1,
        "EPILOGUE": epilogue, "STORE_ACTIVATION": extras, "STORE_CODES": extras,
        **config.kwargs,
    }

    def signature_of(name: str) -> str:
        if name in ("x_ptr", "w_ptr", "y_ptr", "a_ptr"):
            return _POINTER_TYPES[dtype]
        if name == "code_ptr":
            return "*u8"
        if name in ("scale_ptr", "shift_ptr", "stats_ptr"):
            return "*fp32"
        return "i32"

    divisible = [n for n in _DIVISIBLE
                 if not (flat_channels and n in ("C", "stride_xn", "stride_xh", "stride_xw",
                                                 "stride_wk", "stride_wr", "stride_ws"))]
    return _compile(kernels.conv_bn_relu_fwd_kernel, signature_of, constexprs, divisible,
                    config.num_warps, config.num_stages, arch)


# The training and input-gradient kernels (train_kernels.py): pointer arguments holding
# activations take the storage type, masks of pooled blocks uint8 codes, the rest fp32.
_ACTIVATION_POINTERS = ("g_ptr", "x_ptr", "z_ptr", "grad_y_ptr", "y_ptr", "grad_z_ptr",
                        "grad_pre_ptr", "w_ptr", "out_ptr", "act_ptr", "grad_a_ptr")


def compile_train_kernel(name: str, constexprs: dict, *, dtype: str = "bf16", arch: int = 90,
                         num_warps: int = 4, num_stages: int = 3):
    """Compile ``train_kernels.<name>`` with ``constexprs`` (meta-parameters and flags)."""
    from vgg_kernels.backends.triton import train_kernels

    kernel = getattr(train_kernels, name)
    codes = constexprs.get("POOL", False) and constexprs.get("PROLOGUE", 1)

    def signature_of(arg: str) -> str:
        if arg in _ACTIVATION_POINTERS:
            return _POINTER_TYPES[dtype]
        if arg == "mask_ptr":
            return "*u8" if codes else _POINTER_TYPES[dtype]
        if arg.endswith("_ptr"):
            return "*fp32"
        return "i32"

    divisible = [n for n in kernel.arg_names if n.endswith("_ptr")] + ["K", "C"]
    return _compile(kernel, signature_of, constexprs, divisible, num_warps, num_stages, arch)


def train_kernel_cases(arch: int = 90) -> list[tuple[str, dict, int, int]]:
    """(kernel name, constexprs, num_warps, num_stages) of every training and input-gradient
    kernel a GPU run launches: each dgrad and wgrad config (dgrad plain and with the fused
    mask/unpool prologue, tapped), and the elementwise kernels with and without pool."""
    from vgg_kernels.backends.triton import train

    precision = {"INPUT_PRECISION": "ieee", "UPCAST": False}
    cases = []
    for m, n, k, w, s in train._DGRAD_CONFIGS:
        blocks = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, **precision, "R": 3}
        cases.append(("conv_dgrad_kernel", {**blocks, "PROLOGUE": 0, "POOL": False,
                                            "TAPPED": False, "EVEN_K": True}, w, s))
        cases.append(("conv_dgrad_kernel", {**blocks, "PROLOGUE": 1, "POOL": True,
                                            "TAPPED": True, "EVEN_K": True}, w, s))
    for k, c, p, w, s in train._WGRAD_CONFIGS:
        cases.append(("conv_wgrad_kernel", {"BLOCK_K": k, "BLOCK_C": c, "BLOCK_P": p,
                                            **precision, "R": 3}, w, s))
    blocks = {key: value for key, value in train._ELEMENTWISE.items() if key != "num_warps"}
    for pool in (False, True):
        for name in ("bn_relu_pool_kernel", "bn_relu_backward_reduce_kernel",
                     "bn_relu_backward_apply_kernel"):
            cases.append((name, {**blocks, "POOL": pool}, train._ELEMENTWISE["num_warps"], 1))
        cases.append(("relu_pool_backward_kernel", {**blocks, "POOL": pool, "TAPPED": pool},
                      train._ELEMENTWISE["num_warps"], 1))
    return cases


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
    parser.add_argument("--kernels", choices=("infer", "train"), default="infer",
                        help="infer: the forward kernel's configs (--select, --pool); train: "
                             "the training and input-gradient kernels (every GPU config), and "
                             "the forward's statistics epilogue and extra stores")
    args = parser.parse_args()
    if args.kernels == "train":
        _main_train(args)
        return
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


def _main_train(args) -> None:
    rows = []

    def record(label: str, build) -> None:
        row: dict = {"config": label}
        try:
            row.update(asdict(report(build())))
        except Exception as error:  # a kernel this target cannot compile: say so, go on
            row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
        rows.append(row)

    for name, constexprs, warps, stages in train_kernel_cases(args.arch):
        flags = ",".join(f"{k}={v}" for k, v in constexprs.items()
                         if k in ("PROLOGUE", "POOL", "TAPPED") or k.startswith("BLOCK"))
        record(f"{name} {flags} w{warps} s{stages}",
               lambda name=name, c=constexprs, w=warps, s=stages: compile_train_kernel(
                   name, c, dtype=args.dtype, arch=args.arch, num_warps=w, num_stages=s))
    configs = _autotune_configs(hopper=args.arch >= 90)
    for config in configs:
        label = describe_config(config.all_kwargs())
        if stats_config(config):
            record(f"fwd stats {label}", lambda c=config: compile_config(
                c, dtype=args.dtype, arch=args.arch, epilogue=1,
                flat_channels=3 if c.kwargs["PROGRAMS_PER_SM"] else 0))
        if (config.kwargs["USE_TMA"] and extras_fit(config)
                and shared_memory_estimate(config, 2, extras=True) <= 227 * 1024):
            record(f"fwd pool+extras {label}", lambda c=config: compile_config(
                c, dtype=args.dtype, arch=args.arch, pool=True, extras=True))
    if args.json:
        print(json.dumps(rows))
        return
    for row in rows:
        if "error" in row:
            print(f"{row['config']:<70} {row['error'][:60]}")
        else:
            print(f"{row['config']:<70} regs {row['registers']!s:>4} spill "
                  f"{row['spill_bytes']!s:>5} smem {row['shared_bytes'] / 1024:>4.0f} KB")


if __name__ == "__main__":
    main()
