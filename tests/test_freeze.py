"""``vgg_kernels.freeze``: the native CPU kernels keep each fused conv's packed weight across
calls. Same results as without it, bit for bit; repacked after writes torch tracks; the writes
it does not track are not seen until ``unfreeze`` (its documented trade); copies, pickles,
threads, non-finite weights, gradients and the ops' layouts."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vgg_kernels
from vgg_kernels.layers import PACKED


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(inplace=True),
        nn.Conv2d(24, 8, 1), nn.ReLU())
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return vgg_kernels.fuse(model.eval())


def _stores(model: nn.Module) -> list:
    return [m.__dict__[PACKED] for m in model.modules() if PACKED in m.__dict__]


@pytest.mark.parametrize("algorithm", ["auto", "direct", "winograd", "winograd4"])
@pytest.mark.parametrize("shape", [(1, 3, 9, 11), (3, 3, 16, 16)], ids=["odd", "even"])
def test_frozen_model_gives_the_same_bits(algorithm, shape, native_cpu, monkeypatch):
    monkeypatch.setenv("VGG_KERNELS_CPU_CONV", algorithm)
    model = _model()
    frozen = vgg_kernels.freeze(copy.deepcopy(model))
    assert len(_stores(frozen)) == 3
    x = torch.randn(shape)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(frozen(x), want)
        assert torch.equal(frozen(x), want)  # the packed forms now reused
    assert all(len(store) == 1 for store in _stores(frozen))


def test_tracked_writes_repack_and_untracked_ones_wait_for_unfreeze(native_cpu):
    model = _model()
    frozen = vgg_kernels.freeze(copy.deepcopy(model))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        frozen(x)
        # tracked: an in-place op, load_state_dict (copy_), an optimizer step
        frozen[0].weight.mul_(1.5)
        model[0].weight.mul_(1.5)
        assert torch.equal(frozen(x), model(x))
        state = {k: v * 0.5 if k.endswith("weight") else v
                 for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        frozen.load_state_dict(state)
        assert torch.equal(frozen(x), model(x))
    for net in (model, frozen):
        net.train()
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
        torch.manual_seed(1)
        net(torch.randn(2, 3, 8, 8)).mean().backward()
        optimizer.step()
        net.eval()
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x))
        # untracked: .data and numpy views are not seen by a frozen model (its trade) ...
        assert model(x).count_nonzero() > 0
        frozen[4].weight.data.add_(0.25)
        model[4].weight.data.add_(0.25)
        assert not torch.equal(frozen(x), model(x))
        # ... until unfreeze
        vgg_kernels.unfreeze(frozen)
        assert not _stores(frozen)
        torch.testing.assert_close(frozen(x), model(x))


def test_copies_and_pickles_start_empty(native_cpu):
    frozen = vgg_kernels.freeze(_model())
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        want = frozen(x)
        for twin in (copy.deepcopy(frozen), pickle.loads(pickle.dumps(frozen))):
            stores = _stores(twin)
            assert len(stores) == 3 and all(len(s) == 0 for s in stores)
            assert torch.equal(twin(x), want)


def test_first_calls_from_threads_pack_once(native_cpu):
    frozen = vgg_kernels.freeze(_model())
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        want = copy.deepcopy(frozen)(x)
    results, barrier = [], threading.Barrier(4)

    def call():
        barrier.wait()
        with torch.no_grad():
            results.append(frozen(x))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(torch.equal(r, want) for r in results)
    assert all(len(store) == 1 for store in _stores(frozen))


def test_infinite_weight_is_not_kept_and_propagates(native_cpu):
    frozen = vgg_kernels.freeze(_model())
    with torch.no_grad():
        frozen[4].weight[2, 5, 1, 1] = float("inf")
        x = torch.rand(1, 3, 8, 8)
        got = frozen(x)
        unfrozen = vgg_kernels.unfreeze(copy.deepcopy(frozen))
        want = unfrozen(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))


def test_gradients_and_training_run_as_without_freeze(native_cpu):
    model = _model()
    frozen = vgg_kernels.freeze(copy.deepcopy(model))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    (g_frozen,) = torch.autograd.grad(frozen(x).sum(), x)
    (g_plain,) = torch.autograd.grad(model(x).sum(), x)
    assert torch.equal(g_frozen, g_plain)
    assert all(len(store) == 0 for store in _stores(frozen))  # no packing under autograd


def test_freeze_needs_a_fused_module():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    with pytest.raises(ValueError, match="call vgg_kernels.fuse"):
        vgg_kernels.freeze(plain)
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        vgg_kernels.freeze("vgg16")


def test_parametrized_weights_are_not_kept(native_cpu):
    model = _model()
    nn.utils.parametrizations.weight_norm(model[0])
    vgg_kernels.freeze(model)
    assert PACKED not in model[0].__dict__
    assert PACKED in model[4].__dict__


def test_packed_op_matches_the_plain_op_and_refuses_foreign_layouts(native_cpu):
    ops = torch.ops.vgg_kernels
    x = torch.randn(2, 16, 10, 10).contiguous(memory_format=torch.channels_last)
    weight, scale, shift = torch.randn(24, 16, 3, 3), torch.rand(24), torch.randn(24)
    layout = ops.conv_weight_layout(x, weight, True)
    packed = ops.pack_conv_weight(weight, layout)
    want = ops.conv_bn_relu_infer(x, weight, scale, shift, True)
    assert torch.equal(ops.conv_bn_relu_infer_packed(x, weight, packed, layout, scale, shift,
                                                     True), want)
    # a layout this call would not choose: the op packs for itself
    other = (layout // 4) * 4 + (layout % 4 + 1) % 3
    wrong = ops.pack_conv_weight(weight, other)
    assert torch.equal(ops.conv_bn_relu_infer_packed(x, weight, wrong, other, scale, shift,
                                                     True), want)
    with pytest.raises(RuntimeError, match="is not a layout of the"):
        ops.pack_conv_weight(weight, 99)
    oracle = F.max_pool2d(torch.relu(F.conv2d(x.double(), weight.double(), padding=1)
                                     * scale.double()[:, None, None]
                                     + shift.double()[:, None, None]), 2)
    torch.testing.assert_close(want.double(), oracle, rtol=1e-4, atol=1e-4)


def test_a_model_built_under_inference_mode_freezes(native_cpu):
    """Inference tensors have no version counter: their packed forms are kept by storage."""
    with torch.inference_mode():
        plain, frozen = _model(), vgg_kernels.freeze(_model())
        assert frozen[0].weight.is_inference()
        x = torch.randn(2, 3, 8, 8)
        want = plain(x)
        assert torch.equal(frozen(x), want)
        assert torch.equal(frozen(x), want)
    assert all(len(store) == 1 for store in _stores(frozen))
