"""``fuse(module)``: the fused execution of every conv -> [BatchNorm2d] -> ReLU [-> MaxPool2d(2)]
chain in a module tree the user already has, in place, and ``fusion_report(module)``: which
chains run fused and why the others do not.

Three ways in, one executor (``vgg_kernels.layers``):

- an ``nn.Sequential`` holding a chain becomes a ``FusedSequential`` (an ``nn.Sequential``
  subclass: same modules, indices, slices and state_dict);
- a ``torch.fx.GraphModule`` (``create_feature_extractor``, ``symbolic_trace``) gets each chain
  of ``call_module`` nodes replaced by one call of ``layers.fused_chain`` on the same modules;
- any other module whose own ``forward`` calls a chain (a ResNet basic block, a user's block)
  is traced with ``torch.fx``, its child modules kept as leaves, in train and in eval mode; the
  rewritten graph then runs as that module's forward, on the module itself (its attributes and
  children are looked up on every call). A module that does not trace is left as it is, and the
  report says why.

Parameters, buffers, module names and state_dict are untouched, so an optimizer built before
``fuse`` keeps working; ``fuse`` is idempotent.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from vgg_kernels.backends import check_backend_name, planned_backend
from vgg_kernels.checks import dtype_name
from vgg_kernels.layers import (
    BATCH_NORMS,
    PACKED,
    FusedConvBNReLU,
    FusedSequential,
    Run,
    _base_type,
    _tracing,
    conv_blocker,
    find_runs,
    fits_batch_norm,
    fused_chain,
    is_relu,
    pool_fits,
)

__all__ = ["fuse", "freeze", "unfreeze", "fusion_report", "FusionReport", "ChainReport"]

# On a module fused by tracing, in its __dict__ (not a registered attribute: the state_dict and
# the module's children are unchanged): the _Traced record; and its instance-level forward.
_TRACED = "_vgg_kernels_traced"

_FUNCTIONAL_RELUS = (torch.relu, F.relu)
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def fuse(module: nn.Module, *, backend: str = "auto", verbose: bool = False) -> nn.Module:
    """Run every conv -> [BatchNorm2d] -> ReLU [-> MaxPool2d(2, 2)] chain in ``module``'s tree
    with the fused kernels; returns ``module`` itself, changed in place.

    Chains: an ``nn.Conv2d`` 3x3 with padding 1, or 1x1; stride 1, dilation 1, one group, any
    channel counts, with or without bias; then optionally a ``BatchNorm2d`` (or
    ``SyncBatchNorm``) of its channels; an ``nn.ReLU`` (or ``torch.relu`` in a traced
    forward); optionally an ``nn.MaxPool2d(2, 2)``. They run folded in eval mode, with the
    statistics epilogue and the fused backward in training, and on the input-gradient path when
    the weights are frozen. Found in ``nn.Sequential`` containers at any depth, in
    ``torch.fx.GraphModule`` graphs, and in the ``forward`` of other modules through
    ``torch.fx`` tracing where it traces.

    Everything a user sees stays: parameters (the same objects), buffers, names, state_dict
    keys and order, outputs, gradients and running statistics (to the kernels' rounding).
    Hooks and parametrizations on a chain's modules are honoured on every call: the chain runs
    as plain module calls, or fused with the hook's effect. ``deepcopy``, pickling and
    ``torch.save`` work, and so does ``torch.compile(fullgraph=True)``; calling ``fuse`` again
    changes nothing but the backend.

    ``backend``: ``'auto'``, ``'triton'``, ``'native'`` or ``'reference'``. ``verbose``: print
    ``fusion_report(module)``, which chains run fused and why the others do not.

    An ``nn.Sequential`` holding an ``nn.Linear`` (VGG's classifier) becomes a
    ``FusedSequential`` too: a float32 CPU batch of 1 to 8 rows runs its linear layers on the
    native small-batch kernel, which reads each weight once (VGG's first classifier layer at
    batch 4: 2.6x faster than PyTorch's GEMM); anything else runs ``F.linear``.
    """
    check_backend_name(backend)
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module (got {type(module).__name__})")
    _fuse_tree(module, backend)
    if verbose:
        print(fusion_report(module))
    return module


def freeze(module: nn.Module) -> nn.Module:
    """Let the native CPU kernels keep each fused conv's packed weight (its Winograd transform,
    or the direct kernel's panels) from call to call, instead of packing it on every inference
    call; returns ``module``, changed in place. Opt-in, like ``torch.jit.freeze``: after it,
    inference does not see writes to the conv weights that torch does not track (``.data``,
    numpy views, another process writing a shared model) until ``unfreeze`` (or ``freeze``
    again). Writes torch does track (optimizer steps, in-place ops, ``load_state_dict``) repack
    on the next call; weights that are inference tensors (built under
    ``torch.inference_mode``) have no version counter, so only a new storage repacks them.
    Training, gradients, tapped activations and other backends and devices run as without it.

    What it saves is the packing, which the kernels otherwise redo on every call: on a 2-core
    Zen 4, VGG16-BN runs 1.11-1.18x faster at batch 4, 112x112 and 1.49x at batch 1, 112x112
    (``benchmarks/bench_cpu_model.py``, ``benchmarks/bench_cpu_runtimes.py``); the packed
    forms take 1.8x (F(2x2)) to 4x (F(4x4)) the weights' memory per layout used.

    ``module`` must have been through ``fuse`` (``FusedVGG`` has); parametrized conv weights
    (weight_norm, spectral_norm) are computed on every call and are not kept."""
    from vgg_kernels.backends.native import PackedWeights

    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module (got {type(module).__name__})")
    report = fusion_report(module)
    if not report.fused:
        raise ValueError("freeze: no conv of module runs fused; call vgg_kernels.fuse(module) "
                         "first")
    named = dict(module.named_modules())
    for entry in report.fused:
        conv = named.get(entry.modules[0])
        if isinstance(conv, nn.Conv2d) and PACKED not in conv.__dict__ and not (
                torch.nn.utils.parametrize.is_parametrized(conv, "weight")):
            conv.__dict__[PACKED] = PackedWeights()
    return module


def unfreeze(module: nn.Module) -> nn.Module:
    """Undo ``freeze``: drop every packed weight in ``module``'s tree; returns ``module``."""
    for m in module.modules():
        m.__dict__.pop(PACKED, None)
    return module


def _fuse_tree(module: nn.Module, backend: str) -> None:
    if isinstance(module, FusedSequential):
        module.backend = backend
    elif isinstance(module, FusedConvBNReLU):
        module.backend = backend
        return
    elif isinstance(module, fx.GraphModule):
        _fuse_graph_module(module, backend)
    elif type(module) is nn.Sequential:
        if (any(isinstance(step, Run) for step in find_runs(list(module)))
                or any(type(m) is nn.Linear for m in module)):
            module.__class__ = FusedSequential
            module.backend = backend
    elif _owned_convs(module):
        _fuse_by_tracing(module, backend)
    for child in module.children():
        _fuse_tree(child, backend)


def _owned_convs(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The convs that ``module``'s own forward calls directly: its conv children, and those
    inside its ModuleList/ModuleDict children (which have no forward of their own)."""
    found = []
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            found.append((prefix + name, child))
        elif isinstance(child, _CONTAINERS):
            found += _owned_convs(child, f"{prefix}{name}.")
    return found


# -- torch.fx graphs ------------------------------------------------------------------------------

@dataclass
class _GraphChain:
    """A chain found in a graph: the nodes calling its modules, in order."""

    conv: fx.Node
    bn: fx.Node | None
    relu: fx.Node
    pool: fx.Node | None
    activation: bool  # the ReLU's output is used beyond the pool


@dataclass
class _GraphMiss:
    conv: fx.Node
    reason: str


def _module_of(root: nn.Module, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return root.get_submodule(node.target)
    except AttributeError:
        return None


def _describe_node(root: nn.Module, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{type(_module_of(root, node)).__name__} ({node.target})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "output":
        return "the graph's output"
    return f"{node.op} {node.target}"


def _only_user(node: fx.Node) -> fx.Node | str:
    users = list(node.users)
    if len(users) == 1:
        return users[0]
    if not users:
        return "its output is not used"
    return f"its output is used by {len(users)} nodes"


def _applies_to(node: fx.Node, value: fx.Node) -> bool:
    """``node`` is a call on ``value`` alone."""
    return len(node.args) == 1 and node.args[0] is value and not node.kwargs


def _is_relu_node(root: nn.Module, node: fx.Node, value: fx.Node) -> bool:
    if node.op == "call_module":
        return is_relu(_module_of(root, node)) and _applies_to(node, value)
    if node.op == "call_function" and node.target in _FUNCTIONAL_RELUS:
        return (len(node.args) >= 1 and node.args[0] is value
                and set(node.kwargs) <= {"inplace"} and len(node.args) <= 2)
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return _applies_to(node, value)
    return False


def _graph_chain(root: nn.Module, conv: fx.Node) -> _GraphChain | _GraphMiss:
    """The chain starting at call_module node ``conv``, or why there is none."""
    module = _module_of(root, conv)
    reason = conv_blocker(module)
    if reason is not None:
        return _GraphMiss(conv, reason)
    if len(conv.args) != 1 or conv.kwargs or not isinstance(conv.args[0], fx.Node):
        return _GraphMiss(conv, "called with more than its input")
    value = conv
    nxt = _only_user(value)
    if isinstance(nxt, str):
        return _GraphMiss(conv, nxt)
    bn = None
    if nxt.op == "call_module" and _base_type(_module_of(root, nxt)) in BATCH_NORMS:
        if not (fits_batch_norm(_module_of(root, nxt), module) and _applies_to(nxt, value)):
            return _GraphMiss(conv, f"followed by {_describe_node(root, nxt)}, which does not "
                                    f"fit its {module.out_channels} channels")
        bn = value = nxt
        nxt = _only_user(value)
        if isinstance(nxt, str):
            return _GraphMiss(conv, f"{nxt} (after its BatchNorm2d)")
    if not _is_relu_node(root, nxt, value):
        where = "its BatchNorm2d is followed" if bn is not None else "followed"
        return _GraphMiss(conv, f"{where} by {_describe_node(root, nxt)}, not a ReLU")
    relu = nxt
    pools = [u for u in relu.users
             if u.op == "call_module" and pool_fits(_module_of(root, u)) and _applies_to(u, relu)]
    pool = pools[0] if len(pools) == 1 else None
    activation = pool is not None and len(relu.users) > 1
    return _GraphChain(conv, bn, relu, pool, activation)


def _graph_chains(root: nn.Module, graph: fx.Graph) -> list[_GraphChain | _GraphMiss]:
    return [_graph_chain(root, node) for node in graph.nodes
            if node.op == "call_module" and isinstance(_module_of(root, node), nn.Conv2d)]


def _rewrite(graph: fx.Graph, root: nn.Module, backend: str) -> int:
    """Replace every chain of ``graph`` by one ``fused_chain`` call (and set the backend of the
    calls already there); returns how many calls the graph holds."""
    calls = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target is fused_chain:
            node.kwargs = {**node.kwargs, "backend": backend}
            calls += 1
    for found in _graph_chains(root, graph):
        if isinstance(found, _GraphMiss):
            continue
        chain = found
        with graph.inserting_before(chain.conv):
            def attribute(node: fx.Node | None) -> fx.Node | None:
                return None if node is None or node.op != "call_module" else graph.get_attr(
                    node.target)

            modules = [attribute(chain.conv), attribute(chain.bn), attribute(chain.relu),
                       attribute(chain.pool)]
            # the conv's input as it is now: an earlier rewrite may have replaced it
            call = graph.call_function(fused_chain, (chain.conv.args[0], *modules),
                                       {"backend": backend, "activation": chain.activation})
            if chain.activation:
                output = graph.call_function(operator.getitem, (call, 0))
                activation = graph.call_function(operator.getitem, (call, 1))
        if chain.activation:
            chain.pool.replace_all_uses_with(output)
            graph.erase_node(chain.pool)
            chain.relu.replace_all_uses_with(activation)
        else:
            (chain.pool or chain.relu).replace_all_uses_with(call)
            if chain.pool is not None:
                graph.erase_node(chain.pool)
        for node in (chain.relu, chain.bn, chain.conv):
            if node is not None:
                graph.erase_node(node)
        calls += 1
    return calls


def _graphs_of(gm: fx.GraphModule) -> list[fx.Graph]:
    """The graph of ``gm`` and, for torchvision's feature extractors (``DualGraphModule``), the
    train and eval graphs it switches between."""
    graphs = [gm.graph]
    for name in ("train_graph", "eval_graph"):
        graph = getattr(gm, name, None)
        if isinstance(graph, fx.Graph) and all(graph is not g for g in graphs):
            graphs.append(graph)
    return graphs


def _fuse_graph_module(gm: fx.GraphModule, backend: str) -> None:
    changed = False
    for graph in _graphs_of(gm):
        changed |= _rewrite(graph, gm, backend) > 0
    if changed:
        gm.graph.lint()
        gm.recompile()


# -- other modules: torch.fx tracing --------------------------------------------------------------

class _ChildrenAsLeaves(fx.Tracer):
    """Traces one module's own forward: every submodule call is a leaf ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


@dataclass
class _Traced:
    """A module fused by tracing: the rewritten forward for each mode (``module.training``),
    GraphModules whose code runs with the module itself as ``self``."""

    graphs: dict[bool, fx.GraphModule] = field(default_factory=dict)


def _trace(module: nn.Module) -> dict[bool, fx.Graph]:
    """The module's forward traced in train and in eval mode (only its own ``training`` flag
    changes; children are leaves): forwards that branch on ``self.training`` get one graph per
    mode. Raises what the tracer raises."""
    graphs = {}
    was = module.training
    try:
        for mode in (True, False):
            object.__setattr__(module, "training", mode)
            graphs[mode] = _ChildrenAsLeaves().trace(module)
    finally:
        object.__setattr__(module, "training", was)
    return graphs


def _untraceable_reason(module: nn.Module) -> str | None:
    """Why ``module``'s forward is not traced at all (None: it may be)."""
    if "forward" in module.__dict__ and _TRACED not in module.__dict__:
        return "its forward is an instance attribute"
    if type(module).forward is nn.Module.forward:
        return "it has no forward"
    return None


def _unfuse_traced(module: nn.Module) -> None:
    if _TRACED in module.__dict__:
        del module.__dict__[_TRACED]
        module.__dict__.pop("forward", None)


def _fuse_by_tracing(module: nn.Module, backend: str) -> None:
    if _untraceable_reason(module) is not None:
        return
    _unfuse_traced(module)
    try:
        graphs = _trace(module)
    except Exception:  # noqa: BLE001 - any failure leaves the module as it is; the report says why
        return
    if not sum(_rewrite(graph, module, backend) for graph in graphs.values()):
        return
    traced = _Traced()
    codes: dict[str, fx.GraphModule] = {}
    for mode, graph in graphs.items():
        gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
        traced.graphs[mode] = codes.setdefault(gm.code, gm)
    module.__dict__[_TRACED] = traced
    module.__dict__["forward"] = functools.partial(_traced_forward, module)


def _traced_forward(module: nn.Module, *args, **kwargs):
    """The forward of a module fused by tracing: the rewritten graph of its current mode, run
    with the module as ``self``; its own forward under tracers, so that they record the plain
    modules."""
    if _tracing():
        return type(module).forward(module, *args, **kwargs)
    gm = module.__dict__[_TRACED].graphs[module.training]
    return type(gm).forward(module, *args, **kwargs)


# -- the report -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChainReport:
    """One conv of the tree: ``modules`` are the qualified names of its chain (the conv alone
    when there is none); ``fused`` whether the chain runs on the fused kernels now; ``reason``
    why not (None when fused)."""

    modules: tuple[str, ...]
    fused: bool
    reason: str | None = None


@dataclass
class FusionReport:
    """What ``fuse`` made of a module tree, as it stands: one ``ChainReport`` per conv."""

    chains: list[ChainReport]

    @property
    def fused(self) -> list[ChainReport]:
        return [c for c in self.chains if c.fused]

    @property
    def not_fused(self) -> list[ChainReport]:
        return [c for c in self.chains if not c.fused]

    def __str__(self) -> str:
        lines = [f"vgg_kernels.fuse: {len(self.fused)} of {len(self.chains)} convs run in fused "
                 f"chains"]
        for chain in self.chains:
            names = " -> ".join(chain.modules)
            if chain.fused:
                lines.append(f"  fused      {names}")
            else:
                lines.append(f"  not fused  {names}: {chain.reason}")
        return "\n".join(lines)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _mode_op(bn: nn.Module | None) -> str:
    training = bn is not None and (bn.training or (bn.running_mean is None
                                                   and bn.running_var is None))
    return "conv_bn_relu_train" if training else "conv_bn_relu_infer"


def _runtime_reason(run: Run, backend: str) -> str | None:
    """Why a chain that ``fuse`` set up does not run on the kernels right now: hooks, or a
    dtype or device no kernel backend runs (then PyTorch's ops run it)."""
    blocker = run.hook_blocker()
    if blocker is not None:
        return f"{blocker}: runs as plain module calls while they are registered"
    weight = run.conv.weight
    name, why = planned_backend(backend, weight.device, weight.dtype, _mode_op(run.bn))
    if name == "reference" and backend != "reference":
        return (f"{dtype_name(weight.dtype)} on {weight.device.type}: runs PyTorch's ops "
                f"because {why}")
    return None


def _list_entries(modules: list[nn.Module], names: list[str], fused: bool, backend: str
                  ) -> list[ChainReport]:
    entries = []
    for step in find_runs(modules):
        if isinstance(step, Run):
            chain = tuple(names[step.start:step.start + step.length])
            reason = (_runtime_reason(step, backend) if fused
                      else "fusable, but its nn.Sequential has not been through fuse()")
            entries.append(ChainReport(chain, reason is None, reason))
        elif isinstance(modules[step], nn.Conv2d):
            entries.append(ChainReport((names[step],), False,
                                       _list_miss_reason(modules, step)))
    return entries


def _list_miss_reason(modules: list[nn.Module], i: int) -> str:
    conv = modules[i]
    reason = conv_blocker(conv)
    if reason is not None:
        return reason
    j = i + 1
    if j < len(modules) and _base_type(modules[j]) in BATCH_NORMS:
        if not fits_batch_norm(modules[j], conv):
            return f"followed by {modules[j]}, which does not fit its {conv.out_channels} channels"
        j += 1
    if j >= len(modules):
        return "no ReLU follows it in its nn.Sequential"
    return f"followed by {type(modules[j]).__name__}, not nn.ReLU"


def _fused_call_entry(root: nn.Module, node: fx.Node, prefix: str) -> ChainReport:
    modules = [root.get_submodule(a.target) if isinstance(a, fx.Node) else None
               for a in node.args[1:5]]
    names = tuple(_join(prefix, a.target) for a in node.args[1:5] if isinstance(a, fx.Node))
    conv, bn, relu, pool = modules
    run = Run(0, conv, bn, relu, pool)
    reason = _runtime_reason(run, node.kwargs.get("backend", "auto"))
    return ChainReport(names, reason is None, reason)


def _graph_entries(root: nn.Module, graph: fx.Graph, prefix: str, fused: bool
                   ) -> list[ChainReport]:
    entries = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target is fused_chain:
            entries.append(_fused_call_entry(root, node, prefix))
    for found in _graph_chains(root, graph):
        if isinstance(found, _GraphMiss):
            entries.append(ChainReport((_join(prefix, found.conv.target),), False, found.reason))
        else:
            names = tuple(_join(prefix, n.target) for n in (found.conv, found.bn, found.relu,
                                                           found.pool)
                          if n is not None and n.op == "call_module")
            entries.append(ChainReport(names, False, "fusable, but not fused: " + (
                "this graph has not been through fuse()" if not fused else
                "fuse() left it (a module was replaced since)")))
    return entries


def fusion_report(module: nn.Module) -> FusionReport:
    """Every conv in ``module``'s tree, with whether it runs in a fused chain now and, for those
    that do not, why: a stride, kernel size or other conv the kernels do not compute, no ReLU
    after it, hooks (the chain runs as plain module calls while they are registered), a dtype
    or device no kernel backend runs, a forward that does not trace, or a container that has not
    been through ``fuse``. ``fuse(module, verbose=True)`` prints it."""
    entries: list[ChainReport] = []
    covered: set[int] = set()

    def add(new: list[ChainReport], prefix_modules: dict[str, nn.Module]) -> None:
        for entry in new:
            conv = prefix_modules.get(entry.modules[0])
            if conv is not None:
                if id(conv) in covered:
                    continue
                covered.add(id(conv))
            entries.append(entry)

    named = dict(module.named_modules())
    for name, m in module.named_modules():
        if isinstance(m, FusedConvBNReLU):
            run = Run(0, m.conv, m.bn, None, None)
            reason = _runtime_reason(run, m.backend)
            add([ChainReport((_join(name, "conv"),), reason is None, reason)], named)
        elif isinstance(m, (FusedSequential, nn.Sequential)) and type(m) in (
                FusedSequential, nn.Sequential):
            children = list(m.named_children())
            add(_list_entries([c for _, c in children], [_join(name, n) for n, _ in children],
                              isinstance(m, FusedSequential),
                              getattr(m, "backend", "auto")), named)
        elif isinstance(m, fx.GraphModule):
            add(_graph_entries(m, m.graph, name, True), named)
        elif _TRACED in m.__dict__:
            gm = m.__dict__[_TRACED].graphs[m.training]
            add(_graph_entries(m, gm.graph, name, True), named)
        elif _owned_convs(m):
            owned = _owned_convs(m)
            reason = _untraceable_reason(m)
            if reason is None:
                try:
                    graph = _trace(m)[m.training]
                except Exception as error:  # noqa: BLE001 - reported
                    reason = f"its forward does not trace ({type(error).__name__}: " \
                             f"{str(error).strip().splitlines()[0][:200]})"
                else:
                    add(_graph_entries(m, graph, name, False), named)
                    continue
            add([ChainReport((_join(name, n),), False, conv_blocker(c) or f"in "
                             f"{type(m).__name__}, whose forward is not fused: {reason}")
                 for n, c in owned], named)
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d) and id(m) not in covered:
            covered.add(id(m))
            entries.append(ChainReport((name,), False, conv_blocker(m) or
                                       "not called in a chain by any forward fuse() reads"))
    return FusionReport(entries)
