"""The native small-batch linear kernel (``ops.linear``): against float64 on odd sizes,
non-finite values, gradients, where it runs and where ``F.linear`` does, and the linear layers
of a fused ``nn.Sequential``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_within_rule
from torch import nn

import vgg_kernels
from vgg_kernels import ops
from vgg_kernels.layers import FusedSequential


# rows 1..8 (every register-tile height, both output-pair and single-row tails), input widths
# below, at and past one vector and past the kernel's L2 block (131072 / rows floats)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("features", [(1, 1), (7, 3), (37, 11), (130, 17), (40000, 5)],
                         ids=lambda f: f"{f[0]}to{f[1]}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_native_linear_matches_float64(rows, features, bias, native_cpu, poison_outputs):
    fan_in, fan_out = features
    x = torch.randn(rows, fan_in)
    weight = torch.randn(fan_out, fan_in)
    b = torch.randn(fan_out) if bias else None
    got = torch.ops.vgg_kernels.linear(x, weight, b)
    oracle = F.linear(x.double(), weight.double(), None if b is None else b.double())
    assert_within_rule(got, F.linear(x, weight, b), oracle, torch.float32)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")],
                         ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", ["x", "weight", "bias"])
def test_native_linear_propagates_non_finite_values(value, where, native_cpu):
    x, weight, bias = torch.randn(3, 41), torch.randn(6, 41), torch.randn(6)
    {"x": x, "weight": weight, "bias": bias}[where].view(-1)[4] = value
    got = torch.ops.vgg_kernels.linear(x, weight, bias)
    want = F.linear(x, weight, bias)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got[torch.isinf(got)], want[torch.isinf(want)])


def test_native_linear_bad_inputs_name_the_argument(native_cpu):
    call = torch.ops.vgg_kernels.linear
    with pytest.raises(RuntimeError, match="x must have 5 features"):
        call(torch.randn(2, 4), torch.randn(3, 5), None)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(3,\)"):
        call(torch.randn(2, 5), torch.randn(3, 5), torch.randn(4))
    with pytest.raises(RuntimeError, match="x must be a 2-D tensor"):
        call(torch.randn(2, 2, 5), torch.randn(3, 5), None)
    with pytest.raises(RuntimeError, match="linear runs float32 tensors"):
        call(torch.randn(2, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64),
             None)


def test_linear_gradients_match_f_linear(native_cpu):
    x = torch.randn(4, 23, requires_grad=True)
    weight = torch.randn(9, 23, requires_grad=True)
    bias = torch.randn(9, requires_grad=True)
    assert ops.linear_runs_native(x, weight, bias)
    out = ops.linear(x, weight, bias)
    assert out.grad_fn is not None
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, weight, bias), grad)
    want = torch.autograd.grad(F.linear(x, weight, bias), (x, weight, bias), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    # only the input needs a gradient (a frozen classifier)
    frozen = ops.linear(x, weight.detach(), bias.detach())
    (gx,) = torch.autograd.grad(frozen, x, grad)
    torch.testing.assert_close(gx, want[0])


def test_linear_double_backward_names_the_way_out(native_cpu):
    x = torch.randn(2, 6, requires_grad=True)
    weight = torch.randn(3, 6, requires_grad=True)
    (gx,) = torch.autograd.grad(ops.linear(x, weight).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="linear does not support double backward"):
        gx.sum().backward()


@pytest.mark.parametrize("case", ["9 rows", "float64", "3-D input", "strided weight",
                                  "reference backend", "environment", "vmap"])
def test_linear_runs_f_linear_outside_its_domain(case, native_cpu, monkeypatch):
    """Where the kernel does not pay or cannot see the tensors as plain CPU float32 ones,
    ``ops.linear`` is ``F.linear`` itself: bit for bit."""
    x, weight, bias = torch.randn(4, 12), torch.randn(5, 12), torch.randn(5)
    backend = "auto"
    if case == "9 rows":
        x = torch.randn(9, 12)
    elif case == "float64":
        x, weight, bias = x.double(), weight.double(), bias.double()
    elif case == "3-D input":
        x = torch.randn(2, 3, 12)
    elif case == "strided weight":
        weight = torch.randn(12, 5).t()
    elif case == "reference backend":
        backend = "reference"
    elif case == "environment":
        monkeypatch.setenv("VGG_KERNELS_BACKEND", "reference")
    if case == "vmap":
        batched = torch.randn(3, 4, 12)
        got = torch.func.vmap(lambda t: ops.linear(t, weight, bias))(batched)
        torch.testing.assert_close(got, F.linear(batched, weight, bias))
        return
    assert not ops.linear_runs_native(x, weight, bias, backend)
    assert torch.equal(ops.linear(x, weight, bias, backend=backend), F.linear(x, weight, bias))


def test_fused_sequential_runs_its_linear_layers_native(native_cpu, monkeypatch):
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 20), nn.ReLU(), nn.Linear(20, 7)).eval()
    plain = copy.deepcopy(model)
    keys = list(model.state_dict())
    params = list(model.parameters())
    vgg_kernels.fuse(model)
    assert type(model) is FusedSequential and type(model[1]) is nn.Linear
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    x = torch.randn(3, 3, 4, 4)
    calls = []
    monkeypatch.setattr(ops, "_native_linear", lambda *a: calls.append(a[0].shape) or
                        torch.ops.vgg_kernels.linear(*a))
    with torch.no_grad():
        assert_within_rule(model(x), plain(x), copy.deepcopy(plain).double()(x.double()),
                           torch.float32)
    assert calls == [(3, 48), (3, 20)]
    # a layer with hooks runs as itself, the hooks called by its own call
    seen = []
    model[3].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model[1].register_forward_pre_hook(lambda m, i: (i[0] * 0,))
    with torch.no_grad():
        out = model(x)
    assert seen == [torch.Size([3, 7])]
    torch.testing.assert_close(out, plain[3](torch.relu(plain[1].bias)).expand(3, 7))


def test_fused_linear_reads_the_weight_on_every_call(native_cpu):
    model = vgg_kernels.fuse(nn.Sequential(nn.Linear(10, 4)))
    layer = model[0]
    x = torch.randn(2, 10)
    with torch.no_grad():
        model(x)
        layer.weight.data.mul_(2)  # a write torch does not track
        layer.weight.numpy()[0, 0] += 1.0  # through a numpy view
        torch.testing.assert_close(model(x), F.linear(x, layer.weight, layer.bias))


def test_fused_linear_under_parametrization_and_script(native_cpu):
    model = vgg_kernels.fuse(nn.Sequential(nn.Linear(10, 4)))
    layer = model[0]
    nn.utils.parametrizations.weight_norm(layer)
    x = torch.randn(2, 10)
    want = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(model(x), want)
    model(x).sum().backward()
    assert layer.parametrizations.weight.original0.grad is not None
    fused = vgg_kernels.fuse(nn.Sequential(nn.Linear(10, 4)))
    scripted = torch.jit.script(fused)
    torch.testing.assert_close(scripted(x), F.linear(x, fused[0].weight, fused[0].bias))


def test_fused_vgg_classifier_runs_native_at_small_batch(native_cpu, monkeypatch):
    model = vgg_kernels.FusedVGG("A", num_classes=10).eval()
    assert type(model.classifier) is FusedSequential
    calls = []
    kernel = torch.ops.vgg_kernels.linear

    def counting(*args):
        calls.append(args[0].shape[0])
        return kernel(*args)

    monkeypatch.setattr(ops, "_native_linear", counting)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert calls == [2, 2, 2]
