"""The ``memory`` suite: activation memory of one training step, fused models against eager.

For ``FusedVGG(config)`` (default D, VGG16-BN) on each selected fused backend and the eager model
with torchvision's layout (``make_eager_vgg``), same weights, dtype (no autocast), batch and
channels_last input, in train mode:

- ``saved_bytes``: the bytes of the tensors autograd saves for the backward during one training
  forward (model + cross-entropy), seen by ``torch.autograd.graph.saved_tensors_hooks``. Each
  storage counts once, whole (keyed by ``untyped_storage().data_ptr()``: views and tensors saved
  twice share it), and parameters and buffers are left out (storages of ``model.parameters()``
  and ``model.buffers()``, and tensors saved as views of them). The input batch counts when a
  variant saves it (``saved_input_bytes`` says how much of the total it is).
- on CUDA, ``peak_growth_bytes``: ``torch.cuda.max_memory_allocated`` over one step (forward,
  loss, backward; gradients set to None before) minus the memory allocated before it: the
  activations at their peak plus the parameter gradients and the backward's temporaries. Not
  measured on a CPU (null, with the reason).

Both are measured after ``warmup`` training steps (default 1: Triton autotunes and caching
allocators fill on the first; 0 is fine for ``saved_bytes``, which no warm-up changes), and
reported with their ratio to the eager model's. Nothing is timed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vgg_kernels.bench.layers import _short_error
from vgg_kernels.bench.model import NUM_CLASSES, _weights
from vgg_kernels.bench.model import _build as build_model
from vgg_kernels.bench.results import memory_prefix
from vgg_kernels.bench.settings import (
    COMPILE,
    RunInterrupted,
    RunSettings,
    baseline_name,
    select_backends,
)
from vgg_kernels.bench.table import format_table
from vgg_kernels.bench.timing import synchronize

TRAIN_OP = "conv_bn_relu_train"
SAVED_NOTE = ("bytes of the storages saved for the backward during one training forward "
              "(torch.autograd.graph.saved_tensors_hooks), each storage once, parameters and "
              "buffers excluded")
PEAK_NOTE = ("torch.cuda.max_memory_allocated over one step (forward, loss, backward; grads "
             "None before) minus memory_allocated before it")
NO_COMPILE_NOTE = "not a variant of this suite (it compares the fused models with eager)"
CPU_PEAK_NOTE = ("not measured on a CPU: torch keeps no allocation statistics for CPU tensors; "
                 "saved_bytes is the comparison")


def _storage_key(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(data_ptr, nbytes) of the tensor's storage; None for tensors without a plain storage."""
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested or functional wrappers
        return None
    return storage.data_ptr(), storage.nbytes()


def saved_tensor_bytes(model: nn.Module, step: Callable[[], torch.Tensor],
                       inputs: tuple[torch.Tensor, ...] = ()) -> dict[str, int]:
    """Run ``step()`` (a training forward returning the loss) under saved-tensor hooks and count
    what autograd keeps: ``saved_bytes`` (distinct storages, whole, without parameters and
    buffers), ``saved_storages``, ``saved_tensors`` (every save, counting repeats and views),
    ``saved_input_bytes`` (of it, the storages of ``inputs``). Returns those with the loss
    dropped after its backward, so the saved tensors are freed."""
    excluded = {key[0] for t in (*model.parameters(), *model.buffers())
                if (key := _storage_key(t)) is not None}
    input_ptrs = {key[0] for t in inputs if (key := _storage_key(t)) is not None}
    storages: dict[int, int] = {}
    saves = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saves
        saves += 1
        key = _storage_key(tensor)
        if key is not None and key[0] not in excluded and key[1] > 0:
            storages[key[0]] = max(storages.get(key[0], 0), key[1])
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = step()
    loss.backward()
    return {"saved_bytes": sum(storages.values()), "saved_storages": len(storages),
            "saved_tensors": saves,
            "saved_input_bytes": sum(n for ptr, n in storages.items() if ptr in input_ptrs)}


def _build(variant: str, settings: RunSettings, state: dict[str, torch.Tensor]) -> nn.Module:
    """The model suite's model (same weights, run dtype, channels_last), in train mode."""
    return build_model(variant, settings, state).train()


def _measure(model: nn.Module, settings: RunSettings, x: torch.Tensor,
             target: torch.Tensor) -> dict[str, Any]:
    device = settings.device

    def forward() -> torch.Tensor:
        return F.cross_entropy(model(x), target)

    for _ in range(settings.warmup):
        model.zero_grad(set_to_none=True)
        forward().backward()
    model.zero_grad(set_to_none=True)
    synchronize(device)
    figures: dict[str, Any] = saved_tensor_bytes(model, forward, (x,))
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        forward().backward()
        synchronize(device)
        figures["peak_growth_bytes"] = torch.cuda.max_memory_allocated(device) - before
        figures["peak_growth_note"] = PEAK_NOTE
        model.zero_grad(set_to_none=True)
    else:
        figures["peak_growth_bytes"] = None
        figures["peak_growth_note"] = CPU_PEAK_NOTE
    return figures


def run_memory(settings: RunSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the suite; returns the ``suites.memory`` block (see vgg_kernels/bench/results.py)."""
    began = time.perf_counter()
    device, dtype = settings.device, settings.dtype
    selection = select_backends(settings, TRAIN_OP)
    baseline = baseline_name(device)
    variants = [baseline, *selection.fused]
    suite_settings = {**settings.as_dict(), "variants": variants, "saved": SAVED_NOTE,
                      "peak_growth": PEAK_NOTE if device.type == "cuda" else CPU_PEAK_NOTE,
                      "loss": "cross-entropy over num_classes 1000"}
    suite_settings.pop("repeats", None)  # nothing is timed
    suite_settings["compile_mode"] = None
    prefix = memory_prefix(suite_settings)
    skipped: list[dict[str, Any]] = [
        {"variant": name, "reason": NO_COMPILE_NOTE if name == COMPILE else reason}
        for name, reason in selection.skipped]
    state = _weights(settings.config)
    x = torch.randn(settings.batch, 3, settings.resolution, settings.resolution, device=device,
                    dtype=dtype).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, NUM_CLASSES, (settings.batch,), device=device)
    cases: list[dict[str, Any]] = []
    interrupted = None
    for variant in variants:
        try:
            model = _build(variant, settings, state)
            figures = _measure(model, settings, x, target)
            del model
        except RunInterrupted as stop:
            interrupted = f"{stop}; {variant} and later variants were not measured"
            skipped.append({"variant": variant, "reason": interrupted})
            break
        except Exception as error:  # one failing variant must not lose the others
            if variant == baseline:
                raise
            skipped.append({"variant": variant, "reason": _short_error(error)})
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        cases.append({"key": f"{prefix}/{variant}", "variant": variant, **figures})
        log(f"  {variant}: saved {figures['saved_bytes'] / 2**20:.1f} MiB in "
            f"{figures['saved_storages']} storages")
    base = cases[0] if cases and cases[0]["variant"] == baseline else None
    for case in cases:
        if base is None:
            break
        case["saved_ratio_to_eager"] = case["saved_bytes"] / base["saved_bytes"]
        if case["peak_growth_bytes"] is not None and base["peak_growth_bytes"]:
            case["peak_growth_ratio_to_eager"] = (case["peak_growth_bytes"]
                                                  / base["peak_growth_bytes"])
        else:
            case["peak_growth_ratio_to_eager"] = None
    return {"settings": suite_settings, "wall_s": time.perf_counter() - began, "cases": cases,
            "skipped": skipped, "summary": {"baseline": baseline}, "interrupted": interrupted}


def format_memory(suite: dict[str, Any]) -> str:
    """The terminal table: one row per variant, MiB saved and the ratio to eager."""
    s = suite["settings"]
    rows = []
    for case in suite["cases"]:
        growth = case["peak_growth_bytes"]
        ratio = case.get("peak_growth_ratio_to_eager")
        rows.append([case["variant"], f"{case['saved_bytes'] / 2**20:.2f}",
                     case["saved_storages"], f"{case['saved_input_bytes'] / 2**20:.2f}",
                     f"{case.get('saved_ratio_to_eager', float('nan')):.3f}",
                     "n/a" if growth is None else f"{growth / 2**20:.1f}",
                     "n/a" if ratio is None else f"{ratio:.3f}"])
    title = (f"activation memory of a training step: VGG {s['config']}, batch {s['batch']}, "
             f"{s['resolution']}px, {s['dtype']}")
    table = format_table(["variant", "saved MiB", "storages", "of it input MiB",
                          "saved / eager", "peak growth MiB", "growth / eager"], rows)
    notes = [f"skipped {s['variant']}: {s['reason']}" for s in suite["skipped"]]
    return "\n".join([title, table, *notes])
