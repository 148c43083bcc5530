"""What the Triton kernel compiles to for an H100/H200 (sm_90a), checked without a GPU: the
descriptor path keeps both wgmma operands in the TMA shared-memory tiles, fits shared memory and
does not spill; the first layer's persistent tiles do not spill, and on row segments load their
input as vectors, never element by element. A change that sends an operand through registers, a
config that no longer fits, or a gather that stops vectorizing fails here instead of only
showing up as a slower benchmark on a lent GPU.

The compiles run in a subprocess without TRITON_INTERPRET (the CPU tests set it, which turns the
kernels into interpreter functions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 4):
    pytest.skip("ahead-of-time compiles of device-side descriptors need Triton 3.4+",
                allow_module_level=True)

from vgg_kernels.backends.triton import conv_bn_relu  # noqa: E402

H100_SHARED_MEMORY = 227 * 1024  # per block, opt-in


def _compile(indices: list[int], pool: bool) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "vgg_kernels.backends.triton.codegen", "--json",
               "--select", ",".join(map(str, indices))]
    if pool:
        command.append("--pool")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    errors = [row for row in rows if "error" in row]
    assert not errors, errors
    return rows


@pytest.fixture(scope="module")
def descriptor_rows() -> dict[bool, list[dict]]:
    """The widest descriptor tile (128 pixels x 256 channels) and the first tile of several
    images, with and without pooling, and every 64-channel descriptor tile (the largest
    pipelines)."""
    configs = conv_bn_relu._autotune_configs(hopper=True)  # as the sm_90a compiles
    widest = [i for i, c in enumerate(configs)
              if c.kwargs["USE_TMA"] and c.kwargs["BLOCK_N"] == 256][:1]
    images = [i for i, c in enumerate(configs)
              if c.kwargs["USE_TMA"] and conv_bn_relu.tile_images(c.kwargs) > 1][:1]
    narrow = [i for i, c in enumerate(configs)
              if c.kwargs["USE_TMA"] and c.kwargs["BLOCK_N"] == 64]
    assert widest and images and narrow
    return {False: _compile(widest + images + narrow, pool=False),
            True: _compile(widest + images, pool=True)}


@pytest.mark.parametrize("pool", [False, True])
def test_descriptor_path_feeds_wgmma_from_tma_tiles(descriptor_rows, pool):
    for row in descriptor_rows[pool]:
        assert row["tma_loads"] > 0 and row["tma_stores"] > 0 and row["cp_async"] == 0, row
        assert row["wgmma"] >= 1, row
        assert row["shared_to_register"] == 0, f"an MMA operand goes through registers: {row}"
        assert row["spill_bytes"] in (0, None), row


def test_descriptor_configs_fit_shared_memory(descriptor_rows):
    """The pruner's estimate keeps these configs; the compiled kernels must agree."""
    for row in descriptor_rows[False] + descriptor_rows[True]:
        assert row["shared_bytes"] <= H100_SHARED_MEMORY, row


@pytest.fixture(scope="module")
def first_layer_rows() -> list[dict]:
    """Every persistent pointer config: the first layer's one-step tiles (codegen compiles the
    64-wide ones on row segments, the others on the flattened gather)."""
    configs = conv_bn_relu._autotune_configs(hopper=True)
    persistent = [i for i, c in enumerate(configs)
                  if c.kwargs["PROGRAMS_PER_SM"] and not c.kwargs["USE_TMA"]]
    assert any(configs[i].kwargs["BLOCK_K"] == 64 for i in persistent)
    return _compile(persistent, pool=False)


def test_first_layer_tiles_do_not_spill(first_layer_rows):
    for row in first_layer_rows:
        assert row["spill_bytes"] in (0, None), row


def test_row_segments_load_the_input_as_vectors(first_layer_rows):
    """On row segments the only 2-byte loads are the weight tile's (loaded once per program);
    the gathered tiles load their input 2 bytes at a time (the comparison shows the count
    tells the two apart)."""
    for row in first_layer_rows:
        weights = row["BLOCK_K"] * row["BLOCK_N"] // (32 * row["num_warps"])
        if row["config"].endswith(" seg"):
            assert row["global_16bit_loads"] <= weights, row
        else:
            assert row["global_16bit_loads"] > weights, row


@pytest.fixture(scope="module")
def train_rows() -> list[dict]:
    """The training and input-gradient kernels in every config a GPU run can launch: dgrad
    (plain, and with the fused mask/unpool prologue), wgrad, the elementwise BN kernels, the
    forward's statistics epilogue, and the descriptor tiles that also store the tapped
    activation and the window codes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "vgg_kernels.backends.triton.codegen",
                           "--kernels", "train", "--json"], env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    errors = [row for row in rows if "error" in row]
    assert not errors, errors
    return rows


def test_training_kernels_do_not_spill_and_fit_shared_memory(train_rows):
    names = {row["config"].split()[0] for row in train_rows}
    assert {"conv_dgrad_kernel", "conv_wgrad_kernel", "bn_relu_backward_apply_kernel",
            "fwd"} <= names
    for row in train_rows:
        assert row["spill_bytes"] in (0, None), row
        assert row["shared_bytes"] <= H100_SHARED_MEMORY, row
