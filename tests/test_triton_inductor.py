"""torch.compile (Inductor) decides from a user-defined Triton kernel's TTIR which tensor
arguments it writes and which it only reads. An output the analysis misses counts as never
written: the compiled graph could then drop the launch or reuse the output's buffer. This checks,
without a GPU, that the analysis finds exactly the outputs written for every autotune config:
``y_ptr`` for inference (the pointer path's ``tt.store``, the descriptor path's
``tt.descriptor_store`` through a descriptor built in the kernel, with and without the fused
pool, and the flattened first-layer configs), also ``a_ptr`` and ``code_ptr`` where the pool's
extra stores run, and ``stats_ptr`` with the training forward's statistics epilogue.

The TTIR is generated for sm_90 in a subprocess without TRITON_INTERPRET (the CPU tests set it,
which turns the kernels into interpreter functions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
tkw = pytest.importorskip("torch._higher_order_ops.triton_kernel_wrap")
if not hasattr(triton.runtime.driver, "set_active"):
    pytest.skip("this Triton cannot be given a GPU target without a GPU", allow_module_level=True)

from vgg_kernels.backends.triton import conv_bn_relu  # noqa: E402

_ANALYSIS = r"""
import json
import torch
import triton
from triton.backends.compiler import GPUTarget
from torch._higher_order_ops import triton_kernel_wrap as tkw
from vgg_kernels.backends.triton import conv_bn_relu, kernels


class HopperTarget:  # all the analysis asks of the active driver
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(HopperTarget())


def written(kernel, kwargs):
    if hasattr(tkw, "identify_accessed_tensors"):  # torch 2.12+
        return sorted(dep.name for dep in
                      tkw.identify_accessed_tensors(kernel, kwargs, {}).read_writes.writes)
    return sorted(tkw.identify_mutated_tensors(kernel, kwargs, {}))


# the launch's arguments as conv_bn_relu._launch passes them: unused outputs are y (the
# activation) or one-element dummies; extras: the activation and the pool codes stored too;
# stats: the training forward's statistics epilogue
def arguments(config, pool, channels, extras=False, stats=False):
    n, h, w, k = 2, 16, 16, 64
    cl = torch.channels_last
    x = torch.empty(n, channels, h, w, dtype=torch.float16).contiguous(memory_format=cl)
    weight = torch.empty(k, channels, 3, 3, dtype=torch.float16).contiguous(memory_format=cl)
    ho, wo = (h // 2, w // 2) if pool else (h, w)
    y = torch.empty(n, k, ho, wo, dtype=torch.float16).contiguous(memory_format=cl)
    activation = torch.empty(n, h, w, k, dtype=torch.float16) if extras else y
    byte = torch.uint8
    codes = torch.empty(n, ho, wo, k, dtype=byte) if extras else torch.empty(1, dtype=byte)
    tiles = n * ho * wo // config.kwargs["BLOCK_M"] + 1
    statistics = torch.empty(3, tiles, k) if stats else torch.empty(1)
    kwargs = dict(x_ptr=x, w_ptr=weight, scale_ptr=torch.empty(k), shift_ptr=torch.empty(k),
                  y_ptr=y, a_ptr=activation, code_ptr=codes, stats_ptr=statistics,
                  N=n, C=channels, H=h, W=w, K=k, HO=ho, WO=wo, M_TOTAL=n * ho * wo)
    for prefix, tensor, dims in (("x", x, "nchw"), ("w", weight, "kcrs"), ("y", y, "nchw")):
        kwargs.update({f"stride_{prefix}{d}": s for d, s in zip(dims, tensor.stride())})
    flat = conv_bn_relu._flat_channels(x, weight)
    kwargs.update(R=3, POOL=pool, FLAT_K=flat, SEGMENTS=False, EVEN_C=not flat,
                  INPUT_PRECISION="ieee", UPCAST=False, TMA_OK=bool(config.kwargs["USE_TMA"]),
                  EPILOGUE=int(stats), STORE_ACTIVATION=extras, STORE_CODES=extras,
                  **config.kwargs)
    return kwargs


rows = []
configs = conv_bn_relu._autotune_configs()
for index, config in enumerate(configs):
    flat_config = config.kwargs["PROGRAMS_PER_SM"] and not config.kwargs["USE_TMA"]
    channels = 3 if flat_config else 64
    cases = [("infer", False, False, False), ("infer", True, False, False)]
    if conv_bn_relu.extras_fit(config):
        cases.append(("extras", True, True, False))
    if conv_bn_relu.stats_config(config):
        cases.append(("stats", False, False, True))
    for epilogue, pool, extras, stats in cases:
        kwargs = arguments(config, pool, channels, extras, stats)
        rows.append({"index": index, "epilogue": epilogue, "pool": pool,
                     "USE_TMA": config.kwargs["USE_TMA"],
                     "written": written(kernels.conv_bn_relu_fwd_kernel, kwargs)})
# what a compiled launch hands Inductor: the autotuned kernel, analysed with its first config
autotuned = triton.autotune(configs=configs, key=["C"])(kernels.conv_bn_relu_fwd_kernel)
kwargs = arguments(configs[0], False, 64)
for name in configs[0].kwargs:
    kwargs.pop(name)
rows.append({"index": "autotuned", "pool": False, "written": written(autotuned, kwargs)})
print(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def analysis_rows() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _ANALYSIS], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


WRITTEN = {"infer": ["y_ptr"], "extras": ["a_ptr", "code_ptr", "y_ptr"],
           "stats": ["stats_ptr", "y_ptr"]}


def test_inductor_sees_only_the_outputs_written(analysis_rows):
    configs = conv_bn_relu._autotune_configs()
    assert sum(row.get("epilogue") == "infer" for row in analysis_rows) == 2 * len(configs)
    assert any(row.get("USE_TMA") for row in analysis_rows), "no descriptor config analysed"
    assert any(row.get("epilogue") == "extras" and row["USE_TMA"] for row in analysis_rows)
    assert any(row.get("epilogue") == "stats" for row in analysis_rows)
    for row in analysis_rows:
        assert row["written"] == WRITTEN[row.get("epilogue", "infer")], row
