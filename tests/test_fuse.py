"""``vgg_kernels.fuse`` on module trees users already have: the lpips package unchanged,
torchvision's feature extractors, a UNet, torchvision's ResNet through tracing, edited VGGs;
and the drop-in guarantees of a fused tree (state_dict, parameters, hooks, parametrizations,
copies, pickling, torch.compile, idempotence) and its report.

Each check compares the fused module with the unfused one in fp32 and a float64 copy (the
oracle), under the project's error rule."""

from __future__ import annotations

import copy
import io
import pickle
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_network_within_rule, assert_within_rule, randomize_bn
from torch import nn

import vgg_kernels
from vgg_kernels import FusedSequential, FusedVGG, fuse, fusion_report, ops
from vgg_kernels.backends import available_backends
from vgg_kernels.backends.triton import interpreting
from vgg_kernels.bench.unet import UNet

torchvision = pytest.importorskip("torchvision")


@contextmanager
def counting_fused_blocks():
    """Counts the fused blocks that run (calls of the two block ops)."""
    counts = {"infer": 0, "train": 0}
    infer, train = ops.conv_bn_relu_infer, ops.conv_bn_relu_train

    def counted_infer(*args, **kwargs):
        counts["infer"] += 1
        return infer(*args, **kwargs)

    def counted_train(*args, **kwargs):
        counts["train"] += 1
        return train(*args, **kwargs)

    ops.conv_bn_relu_infer, ops.conv_bn_relu_train = counted_infer, counted_train
    try:
        yield counts
    finally:
        ops.conv_bn_relu_infer, ops.conv_bn_relu_train = infer, train


def _clear_of_relu_kinks(model: nn.Module) -> nn.Module:
    """BN scales in [0.4, 0.6] and shifts in [1.5, 2.0]: pre-activations sit far from the ReLU's
    kink. A training step's gradients through a whole network are otherwise at the mercy of
    rounding: one pre-activation within rounding of 0, or two pool candidates within rounding
    of each other, sends a whole gradient element one way in one fp32 computation and the
    other way in another (PyTorch's own fp32 run included), and BN's backward spreads it over
    the channel. The kernels' arithmetic is what these tests compare."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.4, 0.6)
                m.bias.uniform_(1.5, 2.0)
    return model


def _trio(model: nn.Module, backend: str = "auto"):
    """(fused copy, the model, a float64 copy)."""
    return fuse(copy.deepcopy(model), backend=backend), model, copy.deepcopy(model).double()


def _check_outputs(fused, eager, oracle, x):
    got, want, exact = fused(x), eager(x), oracle(x.double())
    assert_within_rule(got, want, exact, torch.float32)
    return got, want, exact


def _train_step(model: nn.Module, x: torch.Tensor, lr: float = 0.1):
    """One SGD step on ``mean(model(x) ** 2)``: returns (loss, gradients by name)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss = model(x).square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return loss.detach(), grads


def _check_train_step(fused, eager, oracle, x, skip=()):
    """A train step of each: the loss, and over the network (``assert_network_within_rule``)
    the gradients and the running statistics; ``skip``: gradients that are rounding noise
    (a conv bias before train-mode BN, exactly 0 in exact arithmetic)."""
    results = [_train_step(m, x.to(dtype)) for m, dtype in
               ((fused, torch.float32), (eager, torch.float32), (oracle, torch.float64))]
    assert_within_rule(results[0][0], results[1][0], results[2][0], torch.float32)
    grads = [{n: g for n, g in r[1].items() if n not in skip} for r in results]
    assert_network_within_rule(*grads, torch.float32)
    buffers = [dict(m.named_buffers()) for m in (fused, eager, oracle)]
    for name, value in buffers[1].items():
        if not value.is_floating_point():
            assert torch.equal(buffers[0][name], value), name
    assert_network_within_rule(*[{n: v for n, v in b.items() if v.is_floating_point()}
                                 for b in buffers], torch.float32)


# -- real clients ---------------------------------------------------------------------------------

def test_lpips_package_unchanged_runs_fused():
    """``fuse(lpips.LPIPS(net='vgg'))``: lpips copies ``features[i]`` into its own
    nn.Sequential slices; fused, its distance and input gradient are the eager ones and every
    VGG block runs on the fused kernels (counted in the profiler)."""
    lpips = pytest.importorskip("lpips")
    if available_backends(torch.device("cpu"), torch.float32)["native"] is not None:
        pytest.skip("the native CPU kernels are not built here")
    torch.manual_seed(0)
    theirs = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    ours, oracle = fuse(copy.deepcopy(theirs)), copy.deepcopy(theirs).double()
    a, b = torch.rand(2, 3, 48, 48) * 2 - 1, torch.rand(2, 3, 48, 48) * 2 - 1
    results = []
    for model, dtype in ((ours, torch.float32), (theirs, torch.float32),
                         (oracle, torch.float64)):
        x = a.to(dtype, copy=True).requires_grad_(True)
        distance = model(x, b.to(dtype)).sum()
        distance.backward()
        results.append((distance.detach(), x.grad))
    for got, want, exact in zip(*results, strict=True):
        assert_within_rule(got, want, exact, torch.float32)

    def kernel_calls(model) -> int:
        with torch.profiler.profile() as profile:
            x = a.clone().requires_grad_(True)
            model(x, b).sum().backward()
        return sum(event.count for event in profile.key_averages()
                   if event.key == "vgg_kernels::conv_bn_relu_infer")

    assert kernel_calls(theirs) == 0
    assert kernel_calls(ours) == 2 * 13  # both images through VGG16's 13 blocks
    report = fusion_report(ours)
    assert len(report.fused) == 13
    assert all("no ReLU follows" in c.reason for c in report.not_fused)  # lpips' 1x1 heads


def test_create_feature_extractor_then_fuse():
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.vgg16_bn(weights=None)).eval()
    nodes = {"features.22": "relu3_3", "features.32": "relu4_3"}
    eager = create_feature_extractor(copy.deepcopy(model), nodes)
    oracle = create_feature_extractor(copy.deepcopy(model).double(), nodes)
    fused = fuse(create_feature_extractor(copy.deepcopy(model), nodes))
    assert "fused_chain" in fused.code
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), counting_fused_blocks() as counts:
        got = fused(x)
    assert counts["infer"] == 10  # every conv up to features.32
    with torch.no_grad():
        want, exact = eager(x), oracle(x.double())
    for name in nodes.values():
        assert_within_rule(got[name], want[name], exact[name], torch.float32)
    for module in (fused, eager, oracle):
        module.train()  # the extractor's train graph, batch statistics
    with counting_fused_blocks() as counts:
        got = fused(x)
    assert counts["train"] == 10
    want, exact = eager(x), oracle(x.double())
    for name in nodes.values():
        assert_within_rule(got[name], want[name], exact[name], torch.float32)
    loaded = pickle.loads(pickle.dumps(fused))
    assert "fused_chain" in loaded.code


def test_unet_train_step_equals_eager():
    """The common UNet (double-conv nn.Sequential stages): its 18 conv-BN-ReLU chains fuse, and
    a training step gives eager's loss, gradients, running statistics and parameters."""
    torch.manual_seed(0)
    fused, eager, oracle = _trio(_clear_of_relu_kinks(UNet(3, 2, width=8)))
    report = fusion_report(fused)
    assert len(report.fused) == 18
    assert [c.modules for c in report.not_fused] == [("outc",)]
    x = torch.randn(2, 3, 64, 64)
    with counting_fused_blocks() as counts:
        _check_train_step(fused, eager, oracle, x)
    assert counts["train"] == 18
    for model in (fused, eager, oracle):
        model.eval()
    with torch.no_grad():
        _check_outputs(fused, eager, oracle, x)


def test_resnet18_fuses_its_basic_blocks_through_tracing():
    torch.manual_seed(0)
    resnet = _clear_of_relu_kinks(torchvision.models.resnet18(num_classes=10))
    fused, eager, oracle = _trio(resnet)
    block = fused.layer1[0]
    assert type(block) is torchvision.models.resnet.BasicBlock
    report = fusion_report(fused)
    assert sorted(c.modules[0] for c in report.fused) == [
        "layer1.0.conv1", "layer1.1.conv1", "layer2.1.conv1", "layer3.1.conv1", "layer4.1.conv1"]
    reasons = {c.modules[0]: c.reason for c in report.not_fused}
    assert reasons["conv1"].startswith("kernel size 7x7")
    assert reasons["layer2.0.conv1"].startswith("stride (2, 2)")
    assert "not a ReLU" in reasons["layer1.0.conv2"]
    x = torch.randn(2, 3, 64, 64)  # layer4's BN sees 8 values per channel
    for model in (fused, eager, oracle):
        model.eval()
    with torch.no_grad(), counting_fused_blocks() as counts:
        _check_outputs(fused, eager, oracle, x)
    assert counts["infer"] == 5
    for model in (fused, eager, oracle):
        model.train()
    _check_train_step(fused, eager, oracle, x)


@pytest.mark.parametrize("edit", ["grayscale", "truncated"])
def test_edited_vgg_runs_fused_like_torchvision(edit):
    """Edits made the usual way: a one-channel first conv, ``features[:-1]`` at 16x16. The
    input checks come from the modules there, and the blocks still run fused."""
    torch.manual_seed(0)
    theirs = randomize_bn(torchvision.models.vgg11_bn(weights=None, num_classes=10)).eval()
    ours = FusedVGG.from_torchvision(theirs)
    channels, size = 3, 32
    for model in (theirs, ours):
        if edit == "grayscale":
            model.features[0] = nn.Conv2d(1, 64, 3, padding=1)
        else:
            model.features = model.features[:-1]
    if edit == "grayscale":
        ours.features[0].load_state_dict(theirs.features[0].state_dict())
        channels = 1
    else:
        size = 16
    oracle = copy.deepcopy(theirs).double()
    x = torch.randn(2, channels, size, size)
    with torch.no_grad(), counting_fused_blocks() as counts:
        _check_outputs(ours, theirs, oracle, x)
    assert counts["infer"] == 8
    with pytest.raises(ValueError, match=f"x must have {channels} channels"):
        ours(torch.randn(2, channels + 1, size, size))
    if edit == "truncated":
        with pytest.raises(ValueError, match="at least 16x16 for the 4 2x2 max-pools"):
            ours(torch.randn(2, 3, 8, 8))


# -- drop-in guarantees ---------------------------------------------------------------------------

def test_state_dict_parameters_and_an_earlier_optimizer_are_unchanged():
    torch.manual_seed(0)
    model = _clear_of_relu_kinks(UNet(3, 2, width=4))
    twin, oracle = copy.deepcopy(model), copy.deepcopy(model).double()
    keys = list(model.state_dict())
    parameters = [id(p) for p in model.parameters()]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin, oracle)]
    fuse(model)
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == parameters
    assert [n for n, _ in model.named_modules()] == [n for n, _ in twin.named_modules()]
    x = torch.randn(2, 3, 32, 32)
    for m, optimizer in zip((model, twin, oracle), optimizers, strict=True):
        m(x.to(next(m.parameters()).dtype)).square().mean().backward()
        optimizer.step()
    assert_network_within_rule(*[dict(m.named_parameters()) for m in (model, twin, oracle)],
                               torch.float32)


def test_fuse_is_idempotent_and_sets_the_backend():
    model = nn.Sequential(torchvision.models.resnet18(num_classes=4).layer1,
                          nn.Sequential(nn.Conv2d(64, 8, 3, padding=1), nn.ReLU()))
    fuse(model)
    first = str(fusion_report(model))
    block = model[0][0]
    code = block.__dict__["_vgg_kernels_traced"].graphs[True].code
    fuse(fuse(model))
    assert str(fusion_report(model)) == first
    assert block.__dict__["_vgg_kernels_traced"].graphs[True].code == code
    assert type(model[1]) is FusedSequential
    fuse(model, backend="reference")
    assert model[1].backend == "reference"
    assert "backend = 'reference'" in block.__dict__["_vgg_kernels_traced"].graphs[True].code


def _clients():
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    resnet = randomize_bn(torchvision.models.resnet18(num_classes=4))
    return {
        "sequential": nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                    nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                    nn.Conv2d(8, 8, 1), nn.ReLU()),
        "graph_module": create_feature_extractor(
            randomize_bn(torchvision.models.vgg11_bn(weights=None)).eval(),
            {"features.10": "relu3_1"}),
        "traced": resnet.layer1,
    }


@pytest.mark.parametrize("client", ["sequential", "graph_module", "traced"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_and_pickles_stay_fused_and_independent(client, how):
    model = fuse(_clients()[client].eval())
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    twin.eval()  # a deep copy of torchvision's extractor starts in train mode
    channels = 3 if client != "traced" else 64
    x = torch.randn(2, channels, 16, 16)
    with torch.no_grad():
        want = model(x)
        with counting_fused_blocks() as counts:
            got = twin(x)
        assert counts["infer"] > 0
        if isinstance(want, dict):
            want, got = want["relu3_1"], got["relu3_1"]
        assert torch.equal(got, want)
        for p in twin.parameters():  # the copy runs on its own parameters
            p.mul_(0.5)
        again = model(x)
        assert torch.equal(again["relu3_1"] if isinstance(again, dict) else again, want)


@pytest.mark.parametrize("client", ["sequential", "graph_module", "traced"])
def test_compile_fullgraph_of_fused_trees(client):
    torch._dynamo.reset()
    model = fuse(_clients()[client].eval())
    x = torch.randn(2, 3 if client != "traced" else 64, 16, 16)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    if isinstance(want, dict):
        want, got = want["relu3_1"], got["relu3_1"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_compile_fullgraph_of_a_fused_training_step():
    torch._dynamo.reset()
    torch.manual_seed(0)
    fused, eager, _ = _trio(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(fused, fullgraph=True)
    got = compiled(x)
    got.square().mean().backward()
    want = eager(x)
    want.square().mean().backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused[0].weight.grad, eager[0].weight.grad, rtol=1e-3,
                               atol=1e-4)
    torch._dynamo.reset()


def _hooked_pair(kind: str):
    """(fused, eager) copies of a traced client (a block whose forward calls conv, BN, ReLU
    and a pool) with a hook of ``kind`` on a chain module."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.relu = nn.ReLU(inplace=True)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            return self.pool(self.relu(self.bn(self.conv(x))))

    torch.manual_seed(0)
    eager = randomize_bn(Block()).eval()
    if kind == "bn_forward_hook":
        eager.bn.register_forward_hook(lambda m, args, out: out * 2)
    elif kind == "conv_pre_hook":
        eager.conv.register_forward_pre_hook(lambda m, args: (args[0] + 1,))
    elif kind == "relu_inplace_hook":
        eager.relu.register_forward_hook(lambda m, args, out: out.clamp_(max=0.1))
    elif kind == "pool_hook":
        eager.pool.register_forward_hook(lambda m, args, out: out - 1)
    elif kind == "spectral_norm":
        nn.utils.spectral_norm(eager.conv)
    elif kind == "weight_norm_parametrization":
        nn.utils.parametrizations.weight_norm(eager.conv)
    fused = fuse(copy.deepcopy(eager))
    assert fusion_report(fused).chains[0].modules[0] == "conv"
    return fused, eager


@pytest.mark.parametrize("kind", ["bn_forward_hook", "conv_pre_hook", "relu_inplace_hook",
                                  "pool_hook", "spectral_norm", "weight_norm_parametrization"])
def test_hooks_and_parametrizations_on_a_traced_chain_are_honoured(kind):
    fused, eager = _hooked_pair(kind)
    oracle = copy.deepcopy(eager).double()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        _check_outputs(fused, eager, oracle, x)
    reason = fusion_report(fused).chains[0].reason
    if kind in ("bn_forward_hook", "conv_pre_hook", "spectral_norm"):
        assert "hook" in reason
    else:
        assert reason is None  # fused, with the hook's or the parametrization's effect
    if kind == "relu_inplace_hook":
        return  # eager's own backward refuses a ReLU output changed in place
    fused.train()
    eager.train()
    oracle.train()
    _check_train_step(fused, eager, oracle, x, skip=("conv.bias",))


def test_a_chain_whose_values_are_used_elsewhere_is_not_fused():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.relu = nn.ReLU()

        def forward(self, x):
            y = self.conv(x)
            return self.relu(y), y

    model = fuse(TwoHeads())
    (entry,) = fusion_report(model).chains
    assert not entry.fused and entry.reason == "its output is used by 2 nodes"
    assert "forward" not in model.__dict__


def test_functional_relu_and_a_training_branch_are_fused_per_mode():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x):
            y = F.relu(self.bn(self.conv(x)))
            return y * 2 if self.training else y

    torch.manual_seed(0)
    fused, eager, oracle = _trio(randomize_bn(Block()))
    x = torch.randn(2, 3, 6, 5)
    for mode in (True, False):
        for model in (fused, eager, oracle):
            model.train(mode)
        with torch.no_grad(), counting_fused_blocks() as counts:
            _check_outputs(fused, eager, oracle, x)
        assert counts["train" if mode else "infer"] == 1


def test_sequential_subclasses_are_fused_through_tracing():
    from torchvision.ops import Conv2dNormActivation

    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(Conv2dNormActivation(3, 8), Conv2dNormActivation(8, 8),
                                        Conv2dNormActivation(8, 4, stride=2))).eval()
    fused, eager, oracle = _trio(model)
    report = fusion_report(fused)
    assert len(report.fused) == 2 and "stride" in report.not_fused[0].reason
    with torch.no_grad():
        _check_outputs(fused, eager, oracle, torch.randn(2, 3, 8, 8))


def test_report_names_untraceable_and_dtype(capsys):
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.relu = nn.ReLU()

        def forward(self, x):
            if x.sum() > 0:  # control flow on a value: torch.fx cannot trace it
                x = -x
            return self.relu(self.conv(x))

    model = nn.ModuleDict({"dynamic": DataDependent(),
                           "wide": nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())})
    fuse(model, verbose=True)
    printed = capsys.readouterr().out
    assert "vgg_kernels.fuse: 1 of 2 convs" in printed
    report = fusion_report(model)
    reasons = {c.modules[0]: c.reason for c in report.chains}
    assert "does not trace" in reasons["dynamic.conv"]
    assert reasons["wide.0"] is None
    x = torch.randn(1, 3, 5, 5)
    assert torch.equal(model["dynamic"](x), DataDependent.forward(model["dynamic"], x))
    model.double()
    reasons = {c.modules[0]: c.reason for c in fusion_report(model).chains}
    assert reasons["wide.0"].startswith("float64 on cpu: runs PyTorch's ops")
    model.float()
    model["wide"][0].register_forward_pre_hook(lambda m, args: None)
    reasons = {c.modules[0]: c.reason for c in fusion_report(model).chains}
    assert "forward pre-hook on its conv" in reasons["wide.0"]


def test_fuse_rejects_bad_arguments():
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        fuse("vgg16")
    with pytest.raises(ValueError, match="backend must be one of"):
        fuse(nn.Sequential(), backend="cudnn")


def test_triton_interpreter_runs_fused_clients():
    """The Triton kernels through ``fuse`` (interpreter, small shapes): a Sequential's training
    step and a feature extractor's graph in eval mode."""
    if not interpreting():
        pytest.skip("the CPU runs Triton kernels only under TRITON_INTERPRET=1")
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(6, 5, 3, padding=1, bias=False),
                          nn.BatchNorm2d(5), nn.ReLU(inplace=True))
    fused, eager, oracle = _trio(model, backend="triton")
    x = torch.randn(2, 3, 6, 7)
    with counting_fused_blocks() as counts:
        _check_train_step(fused, eager, oracle, x, skip=("0.bias",))
    assert counts["train"] == 2
    for m in (fused, eager, oracle):
        m.eval()
    nodes = {"2": "relu1", "6": "relu2"}
    graphs = [create_feature_extractor(m, nodes) for m in (eager, oracle)]
    fused_graph = fuse(create_feature_extractor(copy.deepcopy(eager), nodes), backend="triton")
    with torch.no_grad():
        got, want, exact = fused_graph(x), graphs[0](x), graphs[1](x.double())
    for name in nodes.values():
        assert_within_rule(got[name], want[name], exact[name], torch.float32)


def test_fuse_is_exported_at_the_top_level():
    assert vgg_kernels.fuse is fuse and vgg_kernels.fusion_report is fusion_report
