"""The fused layers: ``FusedConvBNReLU``, one conv + BatchNorm2d + ReLU (+ MaxPool2d(2)) block,
and ``FusedSequential``, an ``nn.Sequential`` of plain torch modules whose conv -> BN -> ReLU
(-> pool) runs execute as fused blocks (FusedVGG's ``features``)."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vgg_kernels import ops
from vgg_kernels.backends import check_backend_name

# -- the BN fold, cached per conv -----------------------------------------------------------------

# conv module -> (key, scale, shift): the eval-mode fold of its block, recomputed when any input
# changes (tensor versions and storage). Weak keys: a dropped model drops its entries.
_FOLDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fold_inputs(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> list[torch.Tensor | None]:
    """conv bias, running mean, running var, gamma, beta (None where absent)."""
    if bn is None:
        return [conv.bias, None, None, None, None]
    return [conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias]


def folded_scale_shift(conv: nn.Conv2d, bn: nn.BatchNorm2d | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel fp32 (scale, shift) of the eval-mode block ``conv -> bn``.

    Cached while the parameters and statistics are unchanged (tensor versions and storage), so
    eval-mode inference launches only the fused kernel per block; recomputed, and
    differentiable, when autograd needs it. Every change made through torch (in-place ops,
    optimizer steps, ``load_state_dict``, ``.to()``) is seen. A write through ``.data``
    (``bn.running_mean.data.copy_(...)``) bypasses torch's version counters: ``train()`` and
    ``eval()`` on the fused module drop the cache, so switching modes after such writes
    refreshes it.
    """
    inputs = _fold_inputs(conv, bn)
    eps = bn.eps if bn is not None else 0.0
    device = conv.weight.device
    k = conv.out_channels
    if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)):
        return ops.fold_bn(*inputs, eps, k, device)
    key = (eps, device, *((None if t is None else (t.data_ptr(), t._version)) for t in inputs))
    cached = _FOLDS.get(conv)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, *ops.fold_bn(*inputs, eps, k, device))
        _FOLDS[conv] = cached
    return cached[1], cached[2]


def _drop_folds(modules: Iterable[nn.Module]) -> None:
    for module in modules:
        _FOLDS.pop(module, None)


def _tracing() -> bool:
    """Tracers that record module calls or aten ops (torch.fx, torch.jit.trace, torch.export,
    the ONNX exporters): they see the plain modules, so what they produce is standard PyTorch
    (torchvision's node names; exported and traced programs that run without vgg_kernels)."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    from torch.fx import _symbolic_trace

    # is_fx_symbolic_tracing: torch.fx.symbolic_trace only (is_fx_tracing, in older torch, is
    # also true under torch.export)
    symbolic = getattr(_symbolic_trace, "is_fx_symbolic_tracing", _symbolic_trace.is_fx_tracing)
    if symbolic():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


# -- one block ------------------------------------------------------------------------------------

def _sync_group(bn: nn.BatchNorm2d | None):
    """The torch.distributed group whose batch statistics the block uses in training: ``bn`` an
    ``nn.SyncBatchNorm`` (``nn.SyncBatchNorm.convert_sync_batchnorm``) in training, with more
    than one process in the group, as nn.SyncBatchNorm decides; else None."""
    if not (isinstance(bn, nn.SyncBatchNorm) and bn.training):
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group if bn.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def run_block(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, pool: bool, x: torch.Tensor,
              backend: str, activation: bool = False, chain: list | None = None):
    """``maxpool2x2?(relu(bn(conv(x))))`` as one fused block, with ``nn.BatchNorm2d``'s
    semantics: batch statistics in training (or without running statistics), running ones
    (folded into the conv's epilogue) otherwise; the running statistics, momentum,
    ``momentum=None`` and ``num_batches_tracked`` are updated as BatchNorm2d updates them.

    ``activation`` (with ``pool``): return ``(pooled, relu output)``, the full-resolution
    activation too (in eval mode the kernel's second epilogue store).

    ``chain``: a one-element list carrying the previous training block's ``ops.TrainRecipe``
    in and this block's out, so that consecutive training blocks keep only their z for the
    backward (see ``ops.conv_bn_relu_train``)."""
    if _tracing():  # standard ops for the tracers and exporters (BN as computation)
        y = conv(x)
        y = torch.relu(bn(y) if bn is not None else y)
        if not pool:
            return y
        pooled = torch.nn.functional.max_pool2d(y, 2)
        return (pooled, y) if activation else pooled
    use_batch_stats = bn is not None and (
        bn.training or (bn.running_mean is None and bn.running_var is None))
    if not use_batch_stats:
        scale, shift = folded_scale_shift(conv, bn)
        return ops.conv_bn_relu_infer(x, conv.weight, scale, shift, pool=pool, backend=backend,
                                      activation=activation)
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    keep_stats = not bn.training or bn.track_running_stats
    y, recipe = ops.conv_bn_relu_train(
        x, conv.weight, conv.bias, bn.weight, bn.bias,
        bn.running_mean if keep_stats else None, bn.running_var if keep_stats else None,
        momentum=momentum, eps=bn.eps, pool=pool and not activation, backend=backend,
        process_group=_sync_group(bn), input_recipe=chain[0] if chain else None,
        return_recipe=True)
    if chain is not None:
        chain[0] = recipe
    if pool and activation:
        return torch.nn.functional.max_pool2d(y, 2), y
    return y


class FusedConvBNReLU(nn.Module):
    """Conv (3x3 pad 1, or 1x1) + optional BatchNorm2d + ReLU + optional 2x2/2 max-pool.

    Parameters live in ``self.conv`` (an ``nn.Conv2d``) and ``self.bn`` (an ``nn.BatchNorm2d`` or
    ``None``), so initialisation, state_dict entries and BN options are exactly torch's. In eval
    mode (or without BN) the block runs one fused inference kernel with BN folded into a scale and
    shift; in train mode it uses batch statistics and updates the running ones as
    ``nn.BatchNorm2d`` does (momentum, ``momentum=None`` for a cumulative average,
    ``num_batches_tracked``, ``track_running_stats=False``, ``affine=False``). After
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` the statistics in training are those of the
    whole distributed batch, as with nn.SyncBatchNorm.

    Input (N, in_channels, H, W); output (N, out_channels, H', W') in channels_last memory, with
    H' = H // 2 when ``pool`` else H.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *,
                 batch_norm: bool = True, pool: bool = False, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, backend: str = "auto",
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if kernel_size not in (1, 3):
            raise ValueError(f"kernel_size must be 3 or 1 (got {kernel_size!r})")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int (got {value!r})")
        self.backend = check_backend_name(backend)
        self.pool = bool(pool)
        factory = {"device": device, "dtype": dtype}
        # The weight stays in nn.Conv2d's own (contiguous) layout, as users and
        # torch.nn.utils.parameters_to_vector expect; the kernels read it through its strides.
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                              **factory)
        self.bn = (nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, affine=affine,
                                  track_running_stats=track_running_stats, **factory)
                   if batch_norm else None)

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    @property
    def kernel_size(self) -> int:
        return self.conv.kernel_size[0]

    def extra_repr(self) -> str:
        return f"pool={self.pool}, backend={self.backend!r}"

    def folded_scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel fp32 (scale, shift) of the eval-mode block (see the module-level
        ``folded_scale_shift``: cached, refreshed on every change torch tracks)."""
        return folded_scale_shift(self.conv, self.bn)

    def train(self, mode: bool = True) -> FusedConvBNReLU:
        _drop_folds([self.conv])  # see folded_scale_shift
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_block(self.conv, self.bn, self.pool, x, self.backend)


# -- runs of plain modules ------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """Positions ``start`` .. ``start + length - 1`` of a module list: a conv, an optional
    BatchNorm2d, a ReLU and an optional 2x2/2 MaxPool2d, executed as one fused block."""

    start: int
    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None
    relu: nn.ReLU
    pool: nn.MaxPool2d | None

    @property
    def length(self) -> int:
        return 2 + (self.bn is not None) + (self.pool is not None)

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.conv, self.bn, self.relu, self.pool) if m is not None]


def _fusable_conv(m: nn.Module) -> bool:
    """An nn.Conv2d (not a subclass, whose forward may differ) that the kernels compute: 3x3
    with padding 1 or 1x1 without, stride 1, no dilation or groups, zero padding."""
    if type(m) is not nn.Conv2d:
        return False
    r = m.kernel_size
    return (r in ((3, 3), (1, 1)) and m.padding == (r[0] // 2, r[1] // 2)
            and m.stride == (1, 1) and m.dilation == (1, 1) and m.groups == 1
            and m.padding_mode == "zeros")


def _fusable_pool(m: nn.Module | None) -> bool:
    """nn.MaxPool2d(2) or (2, 2) with stride 2, floor mode and no indices."""
    if type(m) is not nn.MaxPool2d:
        return False
    def pair(v):
        return (v, v) if isinstance(v, int) else tuple(v)
    return (pair(m.kernel_size) == (2, 2) and pair(m.stride or m.kernel_size) == (2, 2)
            and pair(m.padding) == (0, 0) and pair(m.dilation) == (1, 1)
            and not m.ceil_mode and not m.return_indices)


def find_runs(modules: Sequence[nn.Module]) -> list[Run | int]:
    """The execution plan of a module list: a ``Run`` for every conv -> [BN] -> ReLU
    [-> 2x2 MaxPool2d] the kernels can compute, the position of every other module."""
    plan: list[Run | int] = []
    i = 0
    while i < len(modules):
        conv = modules[i]
        if _fusable_conv(conv):
            j = i + 1
            bn = None
            if (j < len(modules) and type(modules[j]) in (nn.BatchNorm2d, nn.SyncBatchNorm)
                    and modules[j].num_features == conv.out_channels):
                bn = modules[j]
                j += 1
            if j < len(modules) and type(modules[j]) is nn.ReLU:
                relu = modules[j]
                pool = modules[j + 1] if j + 1 < len(modules) else None
                run = Run(i, conv, bn, relu, pool if _fusable_pool(pool) else None)
                plan.append(run)
                i += run.length
                continue
        plan.append(i)
        i += 1
    return plan


def _global_hooks() -> bool:
    from torch.nn.modules import module as torch_module

    return any(getattr(torch_module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


def _hooked(m: nn.Module | None) -> bool:
    """Whether calling ``m`` does more than its forward: hooks of any kind."""
    return m is not None and bool(m._forward_hooks or _needs_plain_call(m))


def _call_forward_hooks(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Call ``module``'s forward hooks on (args, output) as ``module(*args)`` would (global
    hooks send the whole run through plain module calls, see ``run_modules``); a hook's
    return value replaces the output."""
    with_kwargs = getattr(module, "_forward_hooks_with_kwargs", {})
    for hook_id, hook in list(module._forward_hooks.items()):
        result = hook(module, args, {}, output) if hook_id in with_kwargs else hook(
            module, args, output)
        if result is not None:
            output = result
    return output


def _needs_plain_call(m: nn.Module | None) -> bool:
    """Hooks that only a real call of ``m`` honours: pre-hooks (they may change the input)
    and backward hooks."""
    return m is not None and bool(m._forward_pre_hooks or m._backward_hooks
                                  or getattr(m, "_backward_pre_hooks", None))


def run_modules(modules: Sequence[nn.Module], x: torch.Tensor, backend: str,
                taps: dict[int, str] | None = None,
                plan: list[Run | int] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``modules`` in order as ``nn.Sequential`` would, with every fusable run (see
    ``find_runs``) as one fused block. Returns the output and, for each position in ``taps``
    (position -> name), that module's output.

    Hooks are honoured. Forward hooks on a run's ReLU or pool are called with the fused
    block's full-resolution activation, which the kernel writes next to the pooled output (the
    input of an in-place ReLU is its output, as in eager execution); a tapped ReLU costs the
    same second store and nothing else. A conv or BN with hooks, a tapped conv or BN, a
    pre-hook or backward hook anywhere in the run, or forward hooks on a ReLU that is not
    in-place, make the run execute as plain module calls. Global module hooks, and the
    tracers and exporters (``_tracing``), run every module as itself.
    """
    taps = taps or {}
    plan = find_runs(modules) if plan is None else plan
    tapped: dict[str, torch.Tensor] = {}

    def tap(position: int, value: torch.Tensor) -> None:
        # a tapped output that the next module changes in place (torchvision's ReLUs) is kept
        # as it was: a copy
        following = modules[position + 1] if position + 1 < len(modules) else None
        tapped[taps[position]] = (value.clone() if getattr(following, "inplace", False)
                                  else value)

    if _tracing() or _global_hooks():
        for i, m in enumerate(modules):
            x = m(x)
            if i in taps:
                tap(i, x)
        return x, tapped
    chain: list = [None]  # the last training block's recipe (see run_block)
    for step in plan:
        if isinstance(step, int):
            x = modules[step](x)
            if step in taps:
                tap(step, x)
            continue
        run = step
        relu_at = run.start + 1 + (run.bn is not None)
        pool_at = relu_at + 1
        plain = (any(_hooked(m) for m in (run.conv, run.bn))
                 or any(_needs_plain_call(m) for m in (run.relu, run.pool))
                 or any(p in taps for p in range(run.start, relu_at))
                 or (bool(run.relu._forward_hooks) and not run.relu.inplace))
        if plain:
            for offset, m in enumerate(run.modules()):
                x = m(x)
                if run.start + offset in taps:
                    tap(run.start + offset, x)
            continue
        relu_hooks = bool(run.relu._forward_hooks)
        pool_hooks = run.pool is not None and bool(run.pool._forward_hooks)
        if run.pool is None:
            x = run_block(run.conv, run.bn, False, x, backend, chain=chain)
            if relu_hooks:
                x = _call_forward_hooks(run.relu, (x,), x)
            if relu_at in taps:
                tapped[taps[relu_at]] = x
            continue
        if relu_at in taps or relu_hooks or pool_hooks:
            x, activation = run_block(run.conv, run.bn, True, x, backend, activation=True)
            if relu_hooks:
                hooked = _call_forward_hooks(run.relu, (activation,), activation)
                if hooked is not activation:  # a hook replaced the output: pool that instead
                    activation = hooked
                    x = torch.nn.functional.max_pool2d(activation, 2)
            if relu_at in taps:
                tapped[taps[relu_at]] = activation
            if pool_hooks:
                x = _call_forward_hooks(run.pool, (activation,), x)
        else:
            x = run_block(run.conv, run.bn, True, x, backend, chain=chain)
        if pool_at in taps:
            tapped[taps[pool_at]] = x
    return x, tapped


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` of plain torch modules (``Conv2d``, ``BatchNorm2d``, ``ReLU``,
    ``MaxPool2d``, anything else) that runs every conv -> [BN] -> ReLU [-> MaxPool2d(2)] it
    holds as one fused block (``find_runs``), and every other module as itself.

    The modules, their names, indices, parameters, buffers and state_dict are exactly those of
    the ``nn.Sequential`` it replaces (FusedVGG's ``features`` is torchvision's), so slicing
    (``features[4:9]``, a ``FusedSequential`` too), name-based parameter groups, index-based
    freezing and hooks work as with torchvision; only the execution is fused. ``backend``
    chooses the kernels (``'auto'``, ``'triton'``, ``'native'``, ``'reference'``).
    """

    def __init__(self, *args, backend: str = "auto") -> None:
        super().__init__(*args)
        self.backend = check_backend_name(backend)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return FusedSequential(OrderedDict(list(self._modules.items())[idx]),
                                   backend=self.backend)
        return super().__getitem__(idx)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    def train(self, mode: bool = True) -> FusedSequential:
        _drop_folds(self.modules())  # see folded_scale_shift
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_modules(list(self), x, self.backend)[0]

    def forward_with_taps(self, x: torch.Tensor, taps: dict[int, str]
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The output and the outputs of the modules at positions ``taps`` (position ->
        name; positions count from this container's first module)."""
        return run_modules(list(self), x, self.backend, taps)

    def __prepare_scriptable__(self) -> nn.Sequential:
        """``torch.jit.script`` compiles the plain ``nn.Sequential`` of the same modules."""
        return nn.Sequential(OrderedDict(self._modules))
