"""FusedVGG: configs, parameter counts, torchvision state_dict compatibility and equality."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MODEL_RTOL, error_report, is_bias_before_train_bn, relative_error
from torch import nn

from vgg_kernels import CONFIGS, FusedConvBNReLU, FusedVGG, make_eager_vgg
from vgg_kernels.models.vgg import TORCHVISION_NAMES

torchvision = pytest.importorskip("torchvision")

# Simonyan & Zisserman's configurations with BatchNorm (the reference post's table).
PARAMETER_COUNTS_BN = {
    "A": 132_868_840,
    "B": 133_053_736,
    "C": 133_647_400,
    "D": 138_365_992,
    "E": 143_678_248,
}
TV_BUILDERS = {name: getattr(torchvision.models, name) for name in TORCHVISION_NAMES}


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("config", sorted(PARAMETER_COUNTS_BN))
def test_parameter_counts_match_the_table(config):
    assert count(FusedVGG(config, init_weights=False)) == PARAMETER_COUNTS_BN[config]


def test_a_lrn_has_lrn_after_the_first_relu_and_the_same_parameters_as_a():
    model = FusedVGG("A-LRN", init_weights=False)
    types = [type(m) for m in model.features[:5]]
    assert types == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.LocalResponseNorm, nn.MaxPool2d]
    lrn = model.features[3]
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 1e-4, 0.75, 2.0)
    assert count(model) == PARAMETER_COUNTS_BN["A"]


def test_config_c_has_three_1x1_convolutions():
    model = FusedVGG("C", init_weights=False)
    sizes = [m.kernel_size[0] for m in model.features if isinstance(m, nn.Conv2d)]
    assert sizes.count(1) == 3 and sizes.count(3) == 10


@pytest.mark.parametrize("name", sorted(TV_BUILDERS))
def test_module_tree_is_torchvisions(name):
    """Names, types and order of every module, parameter and buffer are torchvision's: no key
    mapping anywhere, so name-based parameter groups and index-based freezing work."""
    config, bn = TORCHVISION_NAMES[name]
    ours = FusedVGG(config, batch_norm=bn, init_weights=False)
    theirs = TV_BUILDERS[name](weights=None, init_weights=False)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    names_ours = {n: type(m) for n, m in ours.named_modules() if n}
    names_theirs = {n: type(m) for n, m in theirs.named_modules() if n}
    assert names_ours.keys() == names_theirs.keys()
    for n, kind in names_theirs.items():
        if n not in ("features", "classifier"):  # ours are FusedSequential (nn.Sequential)
            assert names_ours[n] is kind, n
    assert isinstance(ours.features, nn.Sequential)
    assert isinstance(ours.classifier, nn.Sequential)
    for i, module in enumerate(theirs.features):
        assert repr(ours.features[i]) == repr(module), i


def test_block_module_stays_public():
    block = FusedConvBNReLU(3, 8, pool=True)
    assert isinstance(block.conv, nn.Conv2d) and isinstance(block.bn, nn.BatchNorm2d)


@pytest.mark.parametrize("name", sorted(TV_BUILDERS))
def test_parameter_counts_match_torchvision(name):
    assert count(FusedVGG(name, init_weights=False)) == count(
        TV_BUILDERS[name](weights=None, init_weights=False))


def test_torchvision_names_set_batch_norm():
    assert FusedVGG("vgg16_bn", init_weights=False).batch_norm
    assert not FusedVGG("vgg16", init_weights=False).batch_norm
    with pytest.raises(ValueError, match="batch_norm"):
        FusedVGG("vgg16", batch_norm=True)


@pytest.mark.parametrize("name", sorted(TV_BUILDERS))
def test_strict_load_of_torchvision_state_dict_both_ways(name):
    config, bn = TORCHVISION_NAMES[name]
    tv = TV_BUILDERS[name](weights=None)
    fused = FusedVGG(config, batch_norm=bn, init_weights=False)
    fused.load_state_dict(tv.state_dict(), strict=True)
    ours = fused.state_dict()
    assert list(ours) == list(tv.state_dict())
    for key, value in tv.state_dict().items():
        assert ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key
    back = TV_BUILDERS[name](weights=None)
    back.load_state_dict(ours, strict=True)


def test_old_checkpoint_without_num_batches_tracked_loads():
    tv = torchvision.models.vgg11_bn(weights=None)
    state = tv.state_dict()
    old = type(state)((k, v) for k, v in state.items() if not k.endswith("num_batches_tracked"))
    old._metadata = copy.deepcopy(state._metadata)
    for key in old._metadata:  # BatchNorm's version 1 had no num_batches_tracked
        if key.startswith("features.") and key.count(".") == 1:
            old._metadata[key]["version"] = 1
    fused = FusedVGG("A", init_weights=False)
    fused.load_state_dict(old, strict=True)
    plain = type(state)(old)  # and a dict that lost its metadata altogether
    FusedVGG("A", init_weights=False).load_state_dict(plain, strict=True)


def test_strict_load_reports_missing_and_unexpected_keys():
    state = torchvision.models.vgg11_bn(weights=None).state_dict()
    state.pop("features.1.running_mean")
    state["features.99.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"features\.1\.running_mean|features\.99\.weight"):
        FusedVGG("A", init_weights=False).load_state_dict(state, strict=True)


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("batch_norm", [True, False])
def test_eager_vgg_loads_fused_state_dict(config, batch_norm):
    fused = FusedVGG(config, batch_norm=batch_norm)
    eager = make_eager_vgg(config, batch_norm=batch_norm, init_weights=False)
    eager.load_state_dict(fused.state_dict(), strict=True)


def test_weight_init_follows_torchvision():
    model = FusedVGG("A")
    conv, bn = model.features[0], model.features[1]
    fan_out = 64 * 9
    std = conv.weight.std().item()
    assert abs(std - (2.0 / fan_out) ** 0.5) < 0.25 * (2.0 / fan_out) ** 0.5
    assert torch.all(conv.bias == 0) and torch.all(bn.weight == 1)
    assert torch.all(bn.bias == 0)
    linear = model.classifier[0]
    assert abs(linear.weight.std().item() - 0.01) < 1e-3 and torch.all(linear.bias == 0)


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial BN parameters and running statistics (fresh random values)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
        elif isinstance(m, nn.Conv2d):
            m.bias.data.uniform_(-0.1, 0.1)


def _assert_close(actual, expected, what):
    err = relative_error(actual, expected)
    assert err <= MODEL_RTOL, f"{what}: relative error {err:.2e}; {error_report(actual, expected)}"


@pytest.mark.parametrize("name", ["vgg11", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19"])
def test_from_torchvision_matches_in_eval(name):
    tv = TV_BUILDERS[name](weights=None).eval()
    _randomise_bn(tv)
    fused = FusedVGG.from_torchvision(tv, backend="reference")
    assert not fused.training
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        _assert_close(fused(x), tv(x), "eval output")


@pytest.mark.parametrize("name", ["vgg11_bn", "vgg16_bn"])
def test_from_torchvision_matches_in_training(name):
    """Outputs, gradients, and running statistics and weights after an SGD step.

    FusedVGG computes in channels_last; torchvision is run in channels_last too, because torch's
    own NCHW and channels_last CPU convolutions differ by up to 8e-6 (max error / max magnitude)
    in these weight gradients, which would leave no room under the 1e-5 bound.
    """
    tv = TV_BUILDERS[name](weights=None, dropout=0.0).train()
    _randomise_bn(tv)
    fused = FusedVGG.from_torchvision(tv, backend="reference")
    tv = tv.to(memory_format=torch.channels_last)
    assert fused.training
    opt_tv = torch.optim.SGD(tv.parameters(), lr=0.01, momentum=0.9)
    opt_fused = torch.optim.SGD(fused.parameters(), lr=0.01, momentum=0.9)
    for step in range(2):
        x = torch.randn(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 1000, (3,))
        out_tv, out_fused = tv(x), fused(x)
        _assert_close(out_fused, out_tv, f"step {step} output")
        nn.functional.cross_entropy(out_tv, target).backward()
        nn.functional.cross_entropy(out_fused, target).backward()
        fused_grads = _grads_by_torchvision_key(fused)
        for key, p in tv.named_parameters():
            if is_bias_before_train_bn(tv, key):
                # d loss / d conv bias is exactly 0 through train-mode BN: both are rounding noise
                assert fused_grads[key].abs().max() < 1e-5 and p.grad.abs().max() < 1e-5, key
                continue
            _assert_close(fused_grads[key], p.grad, f"step {step} grad {key}")
        opt_tv.step()
        opt_fused.step()
        opt_tv.zero_grad()
        opt_fused.zero_grad()
    state_tv, state_fused = tv.state_dict(), fused.state_dict()
    for key, value in state_tv.items():
        if value.is_floating_point():
            _assert_close(state_fused[key], value, f"after steps: {key}")
        else:
            assert torch.equal(state_fused[key], value), key


def _grads_by_torchvision_key(model: FusedVGG) -> dict[str, torch.Tensor]:
    """Gradients keyed like the state_dict (torchvision's names)."""
    by_param = {id(p): p for p in model.parameters()}
    state = model.state_dict(keep_vars=True)
    return {k: by_param[id(v)].grad for k, v in state.items() if id(v) in by_param}


def test_eval_mode_gradients_match_torchvision():
    tv = torchvision.models.vgg11_bn(weights=None).eval()
    _randomise_bn(tv)
    fused = FusedVGG.from_torchvision(tv, backend="reference")
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    tv(x).square().sum().backward()
    fused(x2).square().sum().backward()
    _assert_close(x2.grad, x.grad, "input grad")
    grads = _grads_by_torchvision_key(fused)
    for key, p in tv.named_parameters():
        _assert_close(grads[key], p.grad, key)


def test_from_torchvision_rejects_other_models():
    with pytest.raises(TypeError, match="torchvision VGG"):
        FusedVGG.from_torchvision(nn.Linear(2, 2))


def test_batch_of_zero_returns_empty_logits():
    model = FusedVGG("A", init_weights=False).eval()
    out = model(torch.randn(0, 3, 32, 32))
    assert out.shape == (0, 1000)


@pytest.mark.parametrize("bad, error, match", [
    (torch.randn(3, 32, 32), ValueError, "4-D"),
    (torch.randn(1, 4, 32, 32), ValueError, "3 channels"),
    (torch.randn(1, 3, 16, 32), ValueError, "at least 32x32"),
    (torch.randint(0, 255, (1, 3, 32, 32)), TypeError, "floating-point"),
    (torch.randn(1, 3, 32, 32, dtype=torch.float16), TypeError,
     "x must be float32 like the model's parameters .got float16.; .* torch.autocast"),
    (torch.randn(1, 3, 32, 32, device="meta"), ValueError,
     "x must be on the model's device cpu .got meta."),
    ([[1.0]], TypeError, "torch.Tensor"),
])
def test_model_rejects_bad_input(bad, error, match):
    model = FusedVGG("A", init_weights=False).eval()
    with pytest.raises(error, match=match):
        model(bad)


@pytest.mark.parametrize("kwargs, match", [
    ({"config": "F"}, "config must be one of"),
    ({"config": "vgg18"}, "config must be one of"),
    ({"config": 16}, "config must be a str"),
    ({"config": "D", "num_classes": 0}, "num_classes"),
    ({"config": "D", "dropout": 1.5}, "dropout"),
    ({"config": "D", "backend": "cudnn"}, "backend must be one of"),
])
def test_model_rejects_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        FusedVGG(**kwargs)
