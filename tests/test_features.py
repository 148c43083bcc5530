"""FusedVGG as torchvision code uses it: features slices, hooks, torchvision's feature
extraction, the lpips package, VGGFeatures' taps, and the tracers and exporters (torch.jit,
torch.export, ONNX)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_within_rule, relative_error
from torch import nn

from vgg_kernels import FusedSequential, FusedVGG, VGGFeatures
from vgg_kernels.models.features import layer_names

torchvision = pytest.importorskip("torchvision")

LPIPS_SLICES = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]


def _pair(name: str = "vgg16", **kwargs):
    """A torchvision VGG in eval mode and FusedVGG with the same weights (random BN
    statistics for the BN configs, so the fold is not the identity)."""
    theirs = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    for m in theirs.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    ours = FusedVGG.from_torchvision(theirs)
    return ours, theirs


def _check(got: torch.Tensor, torch_result: torch.Tensor, oracle: torch.Tensor) -> None:
    assert got.shape == torch_result.shape
    assert_within_rule(got, torch_result, oracle, torch.float32)


# -- features slices and hooks ------------------------------------------------------------------

def test_lpips_style_slices_give_torchvisions_maps():
    """features[:4], [4:9], [9:16], [16:23], [23:30]: torchvision's shapes and values (they used
    to be slices of fused blocks with the pools inside: 128@16 where torchvision gives 64@64)."""
    ours, theirs = _pair()
    oracle_model = torchvision.models.vgg16(weights=None).double().eval()
    oracle_model.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 64, 64)
    h_ours, h_theirs, h_oracle = x, x, x.double()
    with torch.no_grad():
        for a, b in LPIPS_SLICES:
            assert isinstance(ours.features[a:b], FusedSequential)
            h_ours = ours.features[a:b](h_ours)
            h_theirs = theirs.features[a:b](h_theirs)
            h_oracle = oracle_model.features[a:b](h_oracle)
            _check(h_ours, h_theirs, h_oracle)


def test_index_based_freezing_freezes_torchvisions_layers():
    ours, theirs = _pair()
    for model in (ours, theirs):
        for p in model.features[:24].parameters():
            p.requires_grad_(False)
    frozen = [[n for n, p in m.named_parameters() if not p.requires_grad] for m in (ours, theirs)]
    assert frozen[0] == frozen[1] and len(frozen[0]) == 20


@pytest.mark.parametrize("index", [3, 4, 8, 0, 1], ids=["relu_before_pool", "pool", "relu2_2",
                                                          "conv", "relu_no_pool"])
def test_forward_hooks_inside_fused_runs_see_the_modules_outputs(index):
    """A hook on any module inside a fused run fires once with that module's output (for the
    ReLU before a pool, the full-resolution activation the kernel writes next to the pooled
    one)."""
    ours, theirs = _pair()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        oracle = copy.deepcopy(theirs).double()(x.double()).float()
    seen: dict[str, list[torch.Tensor]] = {"ours": [], "theirs": []}
    for key, model in (("ours", ours), ("theirs", theirs)):
        model.features[index].register_forward_hook(
            lambda m, args, out, key=key: seen[key].append(out.detach().clone()))
    with torch.no_grad():
        _check(ours(x), theirs(x), oracle)
    assert len(seen["ours"]) == len(seen["theirs"]) == 1
    assert seen["ours"][0].shape == seen["theirs"][0].shape
    assert relative_error(seen["ours"][0], seen["theirs"][0]) < 1e-5


def test_a_hook_that_replaces_an_output_changes_the_rest_as_in_torchvision():
    ours, theirs = _pair()
    for model in (ours, theirs):
        model.features[3].register_forward_hook(lambda m, args, out: out * 0.5)
        model.features[1].register_forward_pre_hook(lambda m, args: (args[0] + 1.0,))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(ours(x), theirs(x)) < 1e-5


def test_create_feature_extractor_gives_torchvisions_nodes_and_values():
    from torchvision.models.feature_extraction import (
        create_feature_extractor,
        get_graph_node_names,
    )

    ours, theirs = _pair()
    assert get_graph_node_names(ours) == get_graph_node_names(theirs)
    nodes = {"features.3": "relu1_2", "features.15": "relu3_3", "classifier.0": "fc6"}
    extract_ours = create_feature_extractor(ours, nodes)
    extract_theirs = create_feature_extractor(theirs, nodes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, want = extract_ours(x), extract_theirs(x)
    for name in nodes.values():
        assert relative_error(got[name], want[name]) < 1e-5, name


def test_from_torchvision_keeps_requires_grad_and_modes():
    theirs = torchvision.models.vgg11_bn(weights=None)
    theirs.requires_grad_(False)
    theirs.classifier[6].requires_grad_(True)
    theirs.eval()
    theirs.features[1].train()
    ours = FusedVGG.from_torchvision(theirs)
    assert ([p.requires_grad for p in ours.parameters()]
            == [p.requires_grad for p in theirs.parameters()])
    assert ([m.training for m in ours.modules()] == [m.training for m in theirs.modules()])


# -- VGGFeatures ---------------------------------------------------------------------------------

def test_layer_names_follow_the_literature():
    names = layer_names("D", False)
    assert names[:5] == ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1"]
    assert names[15] == "relu3_3" and names[22] == "relu4_3" and names[-1] == "pool5"
    bn = layer_names("D", True)
    assert bn[:3] == ["conv1_1", "bn1_1", "relu1_1"] and len(bn) == 44
    assert layer_names("A-LRN", False)[2] == "lrn1"


@pytest.mark.parametrize("name", ["vgg16", "vgg19_bn"])
def test_vgg_features_match_torchvision_at_every_tap_kind(name):
    theirs = getattr(torchvision.models, name)(weights=None).eval()
    names = layer_names(*{"vgg16": ("D", False), "vgg19_bn": ("E", True)}[name])
    taps = ("relu1_2", "conv3_3", 15, "pool4", names[-2])
    features = VGGFeatures(name, taps=taps, state_dict=theirs.state_dict())
    assert not any(p.requires_grad for p in features.parameters()) and not features.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = features(x)
        h, want = x, {}
        for i, m in enumerate(theirs.features):
            h = m(h)
            want[names[i]] = want[i] = h.clone()
    assert list(got) == list(taps)
    for tap in taps:
        assert relative_error(got[tap], want[tap]) < 1e-5, tap
    assert len(features.features) == len(names) - 1  # only up to the deepest tap


def test_vgg_features_rejects_bad_taps_and_loads_strictly():
    with pytest.raises(ValueError, match="tap 'relu9_9' must be one of"):
        VGGFeatures("vgg16", taps=("relu9_9",))
    with pytest.raises(ValueError, match="features index"):
        VGGFeatures("vgg16", taps=(31,))
    with pytest.raises(TypeError, match="sequence"):
        VGGFeatures("vgg16", taps="relu1_2")
    state = torchvision.models.vgg16(weights=None).state_dict()
    state.pop("features.0.weight")
    with pytest.raises(RuntimeError, match=r"features\.0\.weight"):
        VGGFeatures("vgg16", taps=("relu1_2",), state_dict=state)


def test_perceptual_input_gradient_matches_torchvision():
    """The perceptual-loss pattern: frozen eval VGG16, taps before every pool, loss on the maps,
    gradient to the input image only."""
    theirs = torchvision.models.vgg16(weights=None).eval().requires_grad_(False)
    features = VGGFeatures("vgg16", state_dict=theirs.state_dict())
    target = torch.randn(2, 3, 64, 64)
    results = []
    for run in ("ours", "theirs", "oracle"):
        x = target.clone().double() if run == "oracle" else target.clone()
        x.requires_grad_(True)
        if run == "ours":
            maps = list(features(x).values())
        else:
            model = theirs.double() if run == "oracle" else theirs.float()
            h, maps = x, []
            for i, m in enumerate(model.features[:30]):
                h = m(h)
                if i in (3, 8, 15, 22, 29):
                    maps.append(h)
        loss = sum(m.square().mean() for m in maps)
        loss.backward()
        results.append((loss.detach(), x.grad))
    theirs.float()
    for got, want, oracle in zip(results[0], results[1], results[2], strict=True):
        assert_within_rule(got, want, oracle.float(), torch.float32)


# -- the lpips package --------------------------------------------------------------------------

def test_lpips_with_fused_vgg_gives_the_same_distance_and_gradient(monkeypatch):
    lpips = pytest.importorskip("lpips")
    import lpips.pretrained_networks as networks

    torch.manual_seed(0)
    reference = torchvision.models.vgg16(weights=None)
    monkeypatch.setattr(networks.tv, "vgg16",
                        lambda *args, **kwargs: reference, raising=True)
    theirs = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    monkeypatch.setattr(networks.tv, "vgg16",
                        lambda *args, **kwargs: FusedVGG.from_torchvision(reference),
                        raising=True)
    ours = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    ours.lin0.load_state_dict(theirs.lin0.state_dict())
    for i in range(1, 5):
        getattr(ours, f"lin{i}").load_state_dict(getattr(theirs, f"lin{i}").state_dict())
    a, b = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    results = []
    for model in (ours, theirs):
        x = a.clone().requires_grad_(True)
        distance = model(x, b).sum()
        distance.backward()
        results.append((distance.detach(), x.grad))
    assert relative_error(results[0][0], results[1][0]) < 1e-5
    assert relative_error(results[0][1], results[1][1]) < 1e-4


# -- tracers and exporters ----------------------------------------------------------------------

def test_jit_trace_of_a_fresh_model_traces_the_bn_fold_as_computation():
    ours, _ = _pair("vgg11_bn", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    fresh = FusedVGG("A", num_classes=10).eval()
    fresh.load_state_dict(ours.state_dict())
    traced = torch.jit.trace(fresh, x)  # the model's first call: no build_info error
    state = ours.state_dict()
    state["features.1.running_mean"] += 0.3
    ours.load_state_dict(state)
    traced.load_state_dict(state)
    with torch.no_grad():
        assert relative_error(traced(x), ours(x)) < 1e-5


def test_jit_script_compiles_the_plain_model():
    ours, theirs = _pair("vgg11_bn", num_classes=10)
    scripted = torch.jit.script(ours)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(scripted(x), theirs(x)) < 1e-5


def test_torch_export_program_is_portable(tmp_path):
    """torch.export gives standard aten ops only: the saved program loads and runs in a fresh
    process that never imports vgg_kernels."""
    ours, theirs = _pair("vgg11_bn", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(ours, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("vgg_kernels" in t for t in targets), targets
    path = tmp_path / "vgg.pt2"
    torch.export.save(program, str(path))
    torch.save({"x": x, "y": theirs(x).detach()}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        import torch
        program = torch.export.load({str(path)!r})
        io = torch.load({str(tmp_path / 'io.pt')!r})
        y = program.module()(io["x"])
        assert "vgg_kernels" not in sys.modules
        error = ((y - io["y"]).abs().max() / io["y"].abs().max()).item()
        assert error < 1e-5, error
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, cwd=str(tmp_path), env=env)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_onnx_export_runs_in_onnxruntime_with_a_dynamic_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    ours, theirs = _pair("vgg11_bn", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "vgg.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(ours, (x,), str(path), dynamo=True, dynamic_shapes={"x": {0: batch}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for n in (1, 3):
        xs = torch.randn(n, 3, 32, 32)
        (got,) = session.run(None, {name: xs.numpy()})
        with torch.no_grad():
            assert relative_error(torch.from_numpy(got), theirs(xs)) < 1e-5
