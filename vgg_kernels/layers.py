"""The fused execution of conv -> [BatchNorm2d] -> ReLU [-> MaxPool2d(2)] chains: ``run_block``
(one chain as one fused block), the run executor over module lists (``run_modules``,
``FusedSequential``) and over graph nodes (``fused_chain``, used by ``vgg_kernels.fuse`` on
torch.fx graphs), and ``FusedConvBNReLU``, the block as a module of its own.

What a chain accepts is decided from its modules (their channels, kernel sizes, strides) and
checked on every call; nothing derived from the parameters is cached: in eval mode BN's
per-channel scale and shift (K numbers) are folded on every call, so writes through ``.data``,
numpy views or another process are always seen.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from vgg_kernels import ops
from vgg_kernels.backends import check_backend_name
from vgg_kernels.checks import check_module_input

# On a conv that vgg_kernels.freeze froze, in its __dict__ (not a registered attribute: the
# state_dict is unchanged): its backends.native.PackedWeights.
PACKED = "_vgg_kernels_packed"

# -- what the kernels compute ---------------------------------------------------------------------

BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def _base_type(m: nn.Module) -> type:
    """``type(m)``, or the class a ``torch.nn.utils.parametrize`` parametrization derived its
    ``Parametrized...`` class from (the parametrized weight is read as ``m.weight``, so the
    kernels compute with it)."""
    kind = type(m)
    if getattr(m, "parametrizations", None) is not None and kind.__name__.startswith(
            "Parametrized"):
        return kind.__mro__[1]
    return kind


def conv_blocker(m: nn.Module) -> str | None:
    """Why the kernels cannot compute ``m`` as a chain's conv; None when they can: an
    ``nn.Conv2d`` (not a subclass, whose forward may differ), 3x3 with padding 1 or 1x1 without,
    stride 1, no dilation, one group, zero padding."""
    kind = _base_type(m)
    if kind is not nn.Conv2d:
        return (f"a {kind.__name__}, not nn.Conv2d" if isinstance(m, nn.Conv2d)
                else f"not an nn.Conv2d ({kind.__name__})")
    r = tuple(m.kernel_size)
    if r not in ((3, 3), (1, 1)):
        return f"kernel size {r[0]}x{r[1]} (the kernels compute 3x3 and 1x1)"
    if tuple(m.stride) != (1, 1):
        return f"stride {tuple(m.stride)} (the kernels compute stride 1)"
    if m.padding != (r[0] // 2, r[1] // 2):
        return f"padding {m.padding} (a {r[0]}x{r[1]} conv fuses with padding {r[0] // 2})"
    if tuple(m.dilation) != (1, 1):
        return f"dilation {tuple(m.dilation)}"
    if m.groups != 1:
        return f"groups={m.groups}"
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r}"
    return None


def fits_batch_norm(m: nn.Module | None, conv: nn.Conv2d) -> bool:
    """``m`` is a BatchNorm2d (or SyncBatchNorm) of ``conv``'s output channels."""
    return (m is not None and _base_type(m) in BATCH_NORMS
            and m.num_features == conv.out_channels)


def is_relu(m: nn.Module | None) -> bool:
    return m is not None and type(m) is nn.ReLU


def pool_fits(m: nn.Module | None) -> bool:
    """nn.MaxPool2d(2) or (2, 2) with stride 2, floor mode and no indices."""
    if type(m) is not nn.MaxPool2d:
        return False

    def pair(v):
        return (v, v) if isinstance(v, int) else tuple(v)

    return (pair(m.kernel_size) == (2, 2) and pair(m.stride or m.kernel_size) == (2, 2)
            and pair(m.padding) == (0, 0) and pair(m.dilation) == (1, 1)
            and not m.ceil_mode and not m.return_indices)


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


def folded_scale_shift(conv: nn.Conv2d, bn: nn.BatchNorm2d | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel (scale, shift) of the eval-mode block ``conv -> bn`` (``ops.fold_bn``),
    computed from the parameters and statistics as they are now: fp32 (float64 for a float64
    model) and differentiable."""
    return _fold(conv, bn, conv.weight.device)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, device: torch.device
          ) -> tuple[torch.Tensor, torch.Tensor]:
    if bn is None:
        return ops.fold_bn(conv.bias, None, None, None, None, 0.0, conv.out_channels, device)
    return ops.fold_bn(conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps,
                       conv.out_channels, device)


def run_block(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, pool: bool, x: torch.Tensor,
              backend: str, activation: bool = False, chain: list | None = None):
    """``maxpool2x2?(relu(bn(conv(x))))`` as one fused block, with ``nn.BatchNorm2d``'s
    semantics: batch statistics in training (or without running statistics), running ones
    (folded into the conv's epilogue, afresh on every call) otherwise; the running statistics,
    momentum, ``momentum=None`` and ``num_batches_tracked`` are updated as BatchNorm2d updates
    them, once the block has run.

    Each parameter is read once per call, so a parametrization (``torch.nn.utils.
    parametrize``: weight_norm, spectral_norm) is evaluated once, as by ``conv(x)``.

    ``activation`` (with ``pool``): return ``(pooled, relu output)``, the full-resolution
    activation too (in eval mode the kernel's second epilogue store).

    ``chain``: a one-element list carrying the previous training block's ``ops.TrainRecipe``
    in and this block's out, so that consecutive training blocks keep only their z for the
    backward (see ``ops.conv_bn_relu_train``)."""
    weight = conv.weight
    check_module_input(x, conv, weight)
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
        scale, shift = _fold(conv, bn, weight.device)
        if chain is not None:
            chain[0] = None
        packed = conv.__dict__.get(PACKED) if type(weight) is nn.Parameter else None
        return ops.conv_bn_relu_infer(x, weight, scale, shift, pool=pool, backend=backend,
                                      activation=activation, packed=packed)
    momentum = 0.0 if bn.momentum is None else bn.momentum
    counted = bn.training and bn.track_running_stats and bn.num_batches_tracked is not None
    if counted and bn.momentum is None:  # cumulative moving average, this batch included
        momentum = 1.0 / float(bn.num_batches_tracked + 1)
    keep_stats = not bn.training or bn.track_running_stats
    want_recipe = chain is not None and torch.is_grad_enabled()
    y, recipe = ops.conv_bn_relu_train(
        x, weight, conv.bias, bn.weight, bn.bias,
        bn.running_mean if keep_stats else None, bn.running_var if keep_stats else None,
        momentum=momentum, eps=bn.eps, pool=pool and not activation, backend=backend,
        process_group=_sync_group(bn),
        input_recipe=chain[0] if want_recipe else None, return_recipe=True)
    if counted:
        bn.num_batches_tracked.add_(1)
    if chain is not None:
        chain[0] = recipe if want_recipe else None
    if pool and activation:
        return torch.nn.functional.max_pool2d(y, 2), y
    return y


# -- hooks ----------------------------------------------------------------------------------------

def global_hooks() -> bool:
    """Whether module hooks registered for every module (``register_module_forward_hook``, ...)
    are set: then every module runs as itself."""
    from torch.nn.modules import module as torch_module

    return any(getattr(torch_module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


def _hook_kinds(m: nn.Module | None) -> list[str]:
    """The kinds of hooks registered on ``m``."""
    if m is None:
        return []
    kinds = [name for name, hooks in (
        ("forward pre-hook", m._forward_pre_hooks), ("forward hook", m._forward_hooks),
        ("backward hook", m._backward_hooks),
        ("backward pre-hook", getattr(m, "_backward_pre_hooks", None))) if hooks]
    return kinds


def _needs_plain_call(m: nn.Module | None) -> bool:
    """Hooks that only a real call of ``m`` honours: pre-hooks (they may change the input)
    and backward hooks."""
    return m is not None and bool(m._forward_pre_hooks or m._backward_hooks
                                  or getattr(m, "_backward_pre_hooks", None))


def _call_forward_hooks(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Call ``module``'s forward hooks on (args, output) as ``module(*args)`` would; a hook's
    return value replaces the output."""
    with_kwargs = getattr(module, "_forward_hooks_with_kwargs", {})
    for hook_id, hook in list(module._forward_hooks.items()):
        result = hook(module, args, {}, output) if hook_id in with_kwargs else hook(
            module, args, output)
        if result is not None:
            output = result
    return output


# -- runs -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """A conv, an optional BatchNorm2d, a ReLU (a module, or None for ``torch.relu`` in a
    graph) and an optional 2x2/2 MaxPool2d, executed as one fused block; ``start`` is the
    conv's position in a module list."""

    start: int
    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None
    relu: nn.ReLU | None
    pool: nn.MaxPool2d | None

    @property
    def length(self) -> int:
        return 2 + (self.bn is not None) + (self.pool is not None)

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.conv, self.bn, self.relu, self.pool) if m is not None]

    def hook_blocker(self) -> str | None:
        """Why this run executes as plain module calls right now (hooks that a fused block
        cannot honour), or None: hooks of any kind on its conv or BN, pre-hooks or backward
        hooks on its ReLU, forward hooks on a ReLU that is not in-place (they would be given
        its input, which the fused block never forms), global module hooks."""
        if global_hooks():
            return "global module hooks are registered"
        for what, m in (("conv", self.conv), ("BatchNorm2d", self.bn)):
            kinds = _hook_kinds(m)
            if kinds:
                return f"{', '.join(kinds)} on its {what}"
        if _needs_plain_call(self.relu):
            return f"{', '.join(_hook_kinds(self.relu))} on its ReLU"
        if self.relu is not None and self.relu._forward_hooks and not self.relu.inplace:
            return "forward hook on its ReLU, which is not in-place"
        return None


def find_runs(modules: Sequence[nn.Module]) -> list[Run | int]:
    """The execution plan of a module list: a ``Run`` for every conv -> [BN] -> ReLU
    [-> 2x2 MaxPool2d] the kernels can compute, the position of every other module."""
    plan: list[Run | int] = []
    i = 0
    while i < len(modules):
        conv = modules[i]
        if conv_blocker(conv) is None:
            j = i + 1
            bn = None
            if j < len(modules) and fits_batch_norm(modules[j], conv):
                bn = modules[j]
                j += 1
            if j < len(modules) and is_relu(modules[j]):
                pool = modules[j + 1] if j + 1 < len(modules) else None
                run = Run(i, conv, bn, modules[j], pool if pool_fits(pool) else None)
                plan.append(run)
                i += run.length
                continue
        plan.append(i)
        i += 1
    return plan


def _run_plain(run: Run, x: torch.Tensor, want_activation: bool = False):
    """The run's modules called one by one (hooks and all); with ``want_activation``,
    ``(output, ReLU output)``."""
    y = run.conv(x)
    if run.bn is not None:
        y = run.bn(y)
    y = run.relu(y) if run.relu is not None else torch.relu(y)
    activation = y
    if run.pool is not None:
        y = run.pool(y)
    return (y, activation) if want_activation else y


def execute_run(run: Run, x: torch.Tensor, backend: str, chain: list | None = None,
                want_activation: bool = False):
    """One run as one fused block, with its modules' hooks honoured: hooks a fused block cannot
    honour (``Run.hook_blocker``) make it plain module calls; forward hooks on an in-place
    ReLU are called with the block's output, and then, where a pool follows, the pool module
    itself runs on what the hooks left (so a hook that changes the activation in place, or
    replaces it, changes the pooled output as in eager execution); hooks on the pool make it
    run as itself too. With ``want_activation``, returns ``(output, ReLU output)``."""
    if run.hook_blocker() is not None:
        if chain is not None:
            chain[0] = None
        return _run_plain(run, x, want_activation)
    relu_hooks = run.relu is not None and bool(run.relu._forward_hooks)
    pool_hooks = run.pool is not None and bool(_hook_kinds(run.pool))
    if run.pool is None or relu_hooks or pool_hooks:
        y = run_block(run.conv, run.bn, False, x, backend, chain=chain)
        if relu_hooks:
            y = _call_forward_hooks(run.relu, (y,), y)
        activation = y
        if run.pool is not None:
            y = run.pool(y)
            if chain is not None:
                chain[0] = None
    elif want_activation:
        y, activation = run_block(run.conv, run.bn, True, x, backend, activation=True)
        if chain is not None:
            chain[0] = None
    else:
        y = run_block(run.conv, run.bn, True, x, backend, chain=chain)
        activation = None
    return (y, activation) if want_activation else y


def linear_fits(m: nn.Module) -> bool:
    """Whether ``m`` is a plain ``nn.Linear`` whose call ``run_modules`` may replace by
    ``ops.linear`` (hooks are honoured by the module's own call)."""
    return type(m) is nn.Linear and not _hook_kinds(m)


def _call_module(m: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    """``m(x)``; a plain hook-free ``nn.Linear`` runs ``ops.linear`` (the native small-batch
    kernel on a CPU, else ``F.linear``), reading its parameters as its own forward would."""
    if linear_fits(m):
        return ops.linear(x, m.weight, m.bias, backend=backend)
    return m(x)


def run_modules(modules: Sequence[nn.Module], x: torch.Tensor, backend: str,
                taps: dict[int, str] | None = None,
                plan: list[Run | int] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``modules`` in order as ``nn.Sequential`` would, with every fusable run (see
    ``find_runs``) as one fused block (``execute_run``). Returns the output and, for each
    position in ``taps`` (position -> name), that module's output.

    A tapped ReLU before a pool costs the kernel a second store and nothing else; a tapped conv
    or BN makes its run plain module calls. A tapped output that the next module changes in
    place (torchvision's in-place ReLUs) is a copy, as it was when the module returned it.
    Global module hooks, and the tracers and exporters (``_tracing``), run every module as
    itself."""
    taps = taps or {}
    tapped: dict[str, torch.Tensor] = {}

    def tap(position: int, value: torch.Tensor) -> None:
        following = modules[position + 1] if position + 1 < len(modules) else None
        tapped[taps[position]] = (value.clone() if getattr(following, "inplace", False)
                                  else value)

    if _tracing() or global_hooks():
        for i, m in enumerate(modules):
            x = m(x)
            if i in taps:
                tap(i, x)
        return x, tapped
    plan = find_runs(modules) if plan is None else plan
    chain: list = [None]  # the last training block's recipe (see run_block)
    for step in plan:
        if isinstance(step, int):
            x = _call_module(modules[step], x, backend)
            if step in taps:
                tap(step, x)
            continue
        run = step
        relu_at = run.start + 1 + (run.bn is not None)
        pool_at = relu_at + 1
        if any(p in taps for p in range(run.start, relu_at)):
            chain[0] = None
            for offset, m in enumerate(run.modules()):
                x = m(x)
                if run.start + offset in taps:
                    tap(run.start + offset, x)
            continue
        if relu_at in taps:
            x, activation = execute_run(run, x, backend, chain, want_activation=True)
            tap(relu_at, activation)
        else:
            x = execute_run(run, x, backend, chain)
        if run.pool is not None and pool_at in taps:
            tap(pool_at, x)
    return x, tapped


def fused_chain(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d | None,
                relu: nn.ReLU | None, pool: nn.MaxPool2d | None, backend: str = "auto",
                activation: bool = False):
    """A chain of a torch.fx graph (``vgg_kernels.fuse`` puts a call to this function where
    the graph called ``conv``, ``bn``, ``relu`` and ``pool``): the modules as one fused block,
    or as themselves where the kernels cannot compute them now (a module replaced since by one
    they cannot compute, hooks, tracers). ``relu`` None stands for ``torch.relu``. With
    ``activation``, returns ``(output, ReLU output)``.

    Traced again by ``torch.fx`` (as when a fused GraphModule is unpickled), the call stays one
    node of the graph; other tracers and exporters see the plain modules."""
    if isinstance(x, torch.fx.Proxy):
        return x.tracer.create_proxy("call_function", fused_chain, (x, conv, bn, relu, pool),
                                     {"backend": backend, "activation": activation})
    run = Run(0, conv, bn, relu, pool)
    fits = (conv_blocker(conv) is None and (bn is None or fits_batch_norm(bn, conv))
            and (relu is None or is_relu(relu)) and (pool is None or pool_fits(pool)))
    if not fits or _tracing():
        return _run_plain(run, x, activation)
    return execute_run(run, x, backend, want_activation=activation)


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` of plain torch modules (``Conv2d``, ``BatchNorm2d``, ``ReLU``,
    ``MaxPool2d``, anything else) that runs every conv -> [BN] -> ReLU [-> MaxPool2d(2)] it
    holds as one fused block (``find_runs``), every hook-free ``nn.Linear`` through
    ``ops.linear`` (on a CPU at batch 1 to 8, a kernel that reads the weight once), and every
    other module as itself.

    The modules, their names, indices, parameters, buffers and state_dict are exactly those of
    the ``nn.Sequential`` it replaces (``vgg_kernels.fuse`` turns an ``nn.Sequential`` into
    one in place), so slicing (``features[4:9]``, a ``FusedSequential`` too), name-based
    parameter groups, index-based freezing and hooks work as with the plain one; only the
    execution is fused. ``backend`` chooses the kernels (``'auto'``, ``'triton'``, ``'native'``,
    ``'reference'``).
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


# -- the block as a module ------------------------------------------------------------------------

class FusedConvBNReLU(nn.Module):
    """Conv (3x3 pad 1, or 1x1) + optional BatchNorm2d + ReLU + optional 2x2/2 max-pool.

    Parameters live in ``self.conv`` (an ``nn.Conv2d``) and ``self.bn`` (an ``nn.BatchNorm2d`` or
    ``None``), so initialisation, state_dict entries and BN options are exactly torch's. In eval
    mode (or without BN) the block runs one fused inference kernel with BN folded into a scale and
    shift; in train mode it uses batch statistics and updates the running ones as
    ``nn.BatchNorm2d`` does (momentum, ``momentum=None`` for a cumulative average,
    ``num_batches_tracked``, ``track_running_stats=False``, ``affine=False``). After
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` the statistics in training are those of the
    whole distributed batch, as with nn.SyncBatchNorm. Hooks on ``conv`` or ``bn`` (pre-hooks
    such as the hook-based ``nn.utils.spectral_norm`` included) make the block call them as
    modules; parametrizations (``torch.nn.utils.parametrizations``) run fused.

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
        """The per-channel (scale, shift) of the eval-mode block, from the parameters and
        statistics as they are now (see ``ops.fold_bn``)."""
        return folded_scale_shift(self.conv, self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if global_hooks() or _hook_kinds(self.conv) or _hook_kinds(self.bn):
            y = self.conv(x)
            y = torch.relu(self.bn(y) if self.bn is not None else y)
            return torch.nn.functional.max_pool2d(y, 2) if self.pool else y
        return run_block(self.conv, self.bn, self.pool, x, self.backend)
