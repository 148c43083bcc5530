"""nn.SyncBatchNorm.convert_sync_batchnorm on the fused blocks (FusedVGG's): two CPU processes
(gloo) with batches of different sizes give what one process gives on the whole batch: outputs,
gradients summed over the processes, and running statistics."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import relative_error

from vgg_kernels import FusedConvBNReLU
from vgg_kernels.backends import available_backends

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

BATCHES = (2, 3)  # per process: the statistics must weigh the processes by their counts
STEPS = 2


def _backends() -> list[tuple[str, torch.dtype]]:
    """The reference backend in float64 (a tight check of the algebra) and the native kernels,
    where they run here, in float32."""
    cases = [("reference", torch.float64)]
    cpu = torch.device("cpu")
    if available_backends(cpu, torch.float32, "conv_bn_relu_train")["native"] is None:
        cases.append(("native", torch.float32))
    return cases


def _model(backend: str, dtype: torch.dtype) -> torch.nn.Module:
    """Blocks as FusedVGG builds them (3x3 with pool, 3x3, 1x1), small enough for CPU tests."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        FusedConvBNReLU(3, 16, pool=True, backend=backend),
        FusedConvBNReLU(16, 24, backend=backend),
        FusedConvBNReLU(24, 8, kernel_size=1, backend=backend),
    ).to(dtype).train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model


def _inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(sum(BATCHES), 3, 10, 14, dtype=dtype) for _ in range(STEPS)]


def _run(model, batches) -> dict:
    """Forward and backward of each step's batch (loss: the sum of squared outputs); outputs,
    gradients and buffers by state_dict key. No optimizer step: the gradients accumulate."""
    outputs = [model(x) for x in batches]
    for y in outputs:
        y.square().sum().backward()
    state = model.state_dict(keep_vars=True)
    conv_biases = [m.conv.bias for m in model.modules() if isinstance(m, FusedConvBNReLU)]
    return {
        "conv_bias_keys": {k for k, v in state.items() if any(v is b for b in conv_biases)},
        "outputs": [y.detach() for y in outputs],
        "grads": {k: v.grad.detach().clone() for k, v in state.items()
                  if isinstance(v, torch.nn.Parameter)},
        "buffers": {k: v.detach().clone() for k, v in state.items()
                    if not isinstance(v, torch.nn.Parameter)},
    }


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    try:
        start = sum(BATCHES[:rank])
        for backend, dtype in _backends():
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(_model(backend, dtype))
            batches = [x[start:start + BATCHES[rank]] for x in _inputs(dtype)]
            torch.save(_run(model, batches), os.path.join(out_dir, f"{backend}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_over_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(len(BATCHES), str(tmp_path / "init"), str(tmp_path)),
             nprocs=len(BATCHES), join=True)
    for backend, dtype in _backends():
        whole = _run(_model(backend, dtype), _inputs(dtype))
        parts = [torch.load(tmp_path / f"{backend}-{rank}.pt") for rank in range(len(BATCHES))]
        bound = 1e-10 if dtype == torch.float64 else 1e-4
        for step, want in enumerate(whole["outputs"]):
            got = torch.cat([part["outputs"][step] for part in parts])
            assert relative_error(got, want) < bound, (backend, "output", step)
        for key, want in whole["grads"].items():
            got = sum(part["grads"][key] for part in parts)
            if key in whole["conv_bias_keys"]:
                # d loss / d conv bias is 0 through train-mode BN: rounding noise on both sides
                assert got.abs().max() <= bound * whole["grads"][key.replace(
                    "bias", "weight")].abs().max(), (backend, key)
                continue
            assert relative_error(got, want) < bound, (backend, "grad", key)
        for key, want in whole["buffers"].items():
            for part in parts:  # every process holds the statistics of the whole batch
                got = part["buffers"][key]
                if want.is_floating_point():
                    assert relative_error(got, want) < bound, (backend, key)
                else:
                    assert torch.equal(got, want), (backend, key)


def test_without_distributed_a_sync_batchnorm_block_trains_as_batchnorm():
    """No process group: nn.SyncBatchNorm computes plain batch statistics, and so does the
    block."""
    model = _model("reference", torch.float64)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(_model("reference", torch.float64))
    x = _inputs(torch.float64)[0]
    assert relative_error(synced(x), model(x)) < 1e-12
