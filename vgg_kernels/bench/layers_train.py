"""The ``layers_train`` suite (``layers --mode train``): every block's training forward + backward
per fused backend, against the eager modules in train mode and ``torch.compile`` of them.

A block is conv (3x3 pad 1, or 1x1) + BatchNorm2d with batch statistics + ReLU (+ the following
2x2 max-pool), as ``FusedVGG`` trains it. One timed call is the forward and the backward of
``y.backward(g)`` for a fixed random ``g`` (``torch.autograd.grad``, so that no ``.grad`` is
accumulated), asking for the gradients of the input x, the conv weight and bias and the BN
weight and bias; the running statistics are updated in place, as in training. Candidates:

- each selected fused backend: ``vgg_kernels.ops.conv_bn_relu_train`` on the eager block's own
  parameters and running statistics;
- the eager modules (the baseline): Conv2d + BatchNorm2d (train) + ReLU(inplace) (+ MaxPool2d),
  channels_last, parameters and tensors in the run's dtype (no autocast: bf16 blocks on a GPU,
  fp32 on a CPU);
- ``torch.compile`` of the eager modules (compiled once per block, forward and backward).

FLOPs per call are 3x the forward conv's (forward, input gradient, weight gradient; BN, ReLU
and pool are not counted), so TFLOP/s and % of peak compare with the inference suite's.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vgg_kernels import ops
from vgg_kernels.bench.layers import (
    LayerSpec,
    _make_case,
    _relative_error,
    _short_error,
    layer_specs,
    run_layer_suite,
    set_speedups,
)
from vgg_kernels.bench.results import layers_train_prefix
from vgg_kernels.bench.settings import (
    COMPILE,
    TIME_LIMIT_REASON,
    RunSettings,
    baseline_name,
    select_backends,
)
from vgg_kernels.bench.timing import rotating_input_count, time_calls, time_first_call

TRAIN_OP = "conv_bn_relu_train"
FLOPS_FACTOR = 3
FLOPS_NOTE = ("3x the forward conv's FLOPs (forward, input gradient, weight gradient); BN, ReLU "
              "and pool not counted")
BYTES_NOTE = "3x the forward's fewest bytes (input, weights and output once per pass)"
# The conv bias's gradient is left out of the errors: before a train-mode BN it is zero in exact
# arithmetic (the BN subtracts the batch mean), so both sides hold rounding noise only.
GRADIENTS = ("x", "weight", "bn_weight", "bn_bias")
NO_BN_MESSAGE = ("--mode train times conv + BatchNorm (batch statistics) + ReLU blocks: --config "
                 "must be one with BatchNorm (a plain letter such as D, or vgg16_bn; got {!r})")


def build_eager_train_block(spec: LayerSpec, device: torch.device,
                            dtype: torch.dtype) -> nn.Sequential:
    """Conv2d + BatchNorm2d (train mode, gamma in [0.5, 1.5], beta in [-0.1, 0.1]) + ReLU
    (+ MaxPool2d(2)), in ``dtype``, channels_last, every parameter requiring a gradient."""
    if not spec.batch_norm:
        raise ValueError(NO_BN_MESSAGE.format(spec.name))
    conv = nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel, padding=spec.kernel // 2)
    bn = nn.BatchNorm2d(spec.out_channels)
    with torch.no_grad():  # non-trivial affine parameters, so their gradients are exercised
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.1, 0.1)
    modules: list[nn.Module] = [conv, bn, nn.ReLU(inplace=True)]
    if spec.pool:
        modules.append(nn.MaxPool2d(2))
    block = nn.Sequential(*modules).train()
    return block.to(device=device, dtype=dtype).to(memory_format=torch.channels_last)


def _fused_forward(block: nn.Sequential, pool: bool, backend: str,
                   x: torch.Tensor) -> torch.Tensor:
    conv, bn = block[0], block[1]
    return ops.conv_bn_relu_train(x, conv.weight, conv.bias, bn.weight, bn.bias,
                                  bn.running_mean, bn.running_var, momentum=bn.momentum,
                                  eps=bn.eps, pool=pool, backend=backend)


def _forward_backward(forward: Callable[[torch.Tensor], torch.Tensor],
                      params: tuple[torch.Tensor, ...], grad_out: torch.Tensor
                      ) -> Callable[[torch.Tensor], tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
    """One training call: (y, (grad x, grad weight, grad bias, grad gamma, grad beta))."""
    def call(x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        y = forward(x)
        return y, torch.autograd.grad(y, (x, *params), grad_out)
    return call


def _errors(actual: tuple[torch.Tensor, tuple[torch.Tensor, ...]],
            expected: tuple[torch.Tensor, tuple[torch.Tensor, ...]]) -> dict[str, float]:
    """Relative errors (max |difference| / max |expected|) of the output and the gradients."""
    (y, grads), (y_ref, grads_ref) = actual, expected
    named = dict(zip(("x", "weight", "bias", "bn_weight", "bn_bias"), grads, strict=True))
    named_ref = dict(zip(("x", "weight", "bias", "bn_weight", "bn_bias"), grads_ref, strict=True))
    errors = {"output": _relative_error(y.detach(), y_ref.detach())}
    errors.update({name: _relative_error(named[name], named_ref[name]) for name in GRADIENTS})
    return errors


def _run_train_layer(spec: LayerSpec, settings: RunSettings, fused: list[str],
                     compile_block: bool, prefix: str,
                     peak_tflops: float) -> tuple[list[dict[str, Any]], list[dict]]:
    """Time one block's forward + backward for the baseline, every fused backend and compile;
    (cases, skipped)."""
    device, dtype = settings.device, settings.dtype
    flops = FLOPS_FACTOR * spec.flops(settings.batch)
    block = build_eager_train_block(spec, device, dtype)
    conv, bn = block[0], block[1]
    params = (conv.weight, conv.bias, bn.weight, bn.bias)
    element_size = torch.empty((), dtype=dtype).element_size()
    input_bytes = settings.batch * spec.in_channels * spec.height * spec.width * element_size
    count = rotating_input_count(input_bytes, device)
    inputs = [torch.randn(settings.batch, spec.in_channels, spec.height, spec.width,
                          device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
              .requires_grad_() for _ in range(count)]
    out_h, out_w = (spec.height // 2, spec.width // 2) if spec.pool else (spec.height, spec.width)
    grad_out = torch.randn(settings.batch, spec.out_channels, out_h, out_w, device=device,
                           dtype=dtype).contiguous(memory_format=torch.channels_last)
    cases: list[dict[str, Any]] = []
    skipped: list[dict] = []
    eager = _forward_backward(block, params, grad_out)
    expected = eager(inputs[0])
    samples = time_calls(eager, inputs, device=device, warmup=settings.warmup,
                         repeats=settings.repeats)
    cases.append(_make_case(prefix, spec, baseline_name(device), samples, flops, peak_tflops,
                            count, {"rel_error_vs_baseline": 0.0}))
    candidates: list[tuple[str, Any]] = [
        (name, _forward_backward(functools.partial(_fused_forward, block, spec.pool, name),
                                 params, grad_out))
        for name in fused]
    if compile_block and settings.past_deadline():
        skipped.append({"backend": COMPILE, "layer": spec.name, "reason": TIME_LIMIT_REASON})
    elif compile_block:
        torch._dynamo.reset()  # a fresh cache per block: no recompile limit, no reuse
        compiled = torch.compile(block, mode=settings.resolved_compile_mode())
        candidates.append((COMPILE, _forward_backward(compiled, params, grad_out)))
    for name, fn in candidates:
        try:
            extra: dict[str, Any] = {}
            if name == COMPILE:
                extra["compile_s"] = time_first_call(fn, inputs[0], device)
            errors = _errors(fn(inputs[0]), expected)
            extra["rel_error_vs_baseline"] = max(errors.values())
            extra["rel_errors"] = errors
            samples = time_calls(fn, inputs, device=device, warmup=settings.warmup,
                                 repeats=settings.repeats)
        except Exception as error:  # one failing backend must not lose the others
            skipped.append({"backend": name, "layer": spec.name, "reason": _short_error(error)})
            continue
        cases.append(_make_case(prefix, spec, name, samples, flops, peak_tflops, count, extra))
    set_speedups(cases)
    return cases, skipped


def run_layers_train(settings: RunSettings, peak: dict[str, Any],
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the suite; returns the ``suites.layers_train`` block (vgg_kernels/bench/results.py):
    the ``layers`` block's fields, with ``settings.mode`` "train" and the notes on FLOPs."""
    began = time.perf_counter()
    selection = select_backends(settings, TRAIN_OP)
    specs = layer_specs(settings.config, settings.resolution)
    if specs and not specs[0].batch_norm:
        raise ValueError(NO_BN_MESSAGE.format(settings.config))
    if settings.layers:
        specs = [spec for spec in specs if spec.name in settings.layers]
    suite_settings = {**settings.as_dict(), "mode": "train", "flops": FLOPS_NOTE,
                      "bytes": BYTES_NOTE, "precision": f"{settings.dtype_name} tensors and "
                                                        f"parameters, no autocast"}
    return run_layer_suite(settings, peak, log, began=began, selection=selection, specs=specs,
                           suite_settings=suite_settings,
                           prefix=layers_train_prefix(suite_settings),
                           run_layer=_run_train_layer, work_factor=FLOPS_FACTOR)
