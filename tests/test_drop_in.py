"""Drop-in under what PyTorch users do to a module, each against eager PyTorch with the same
weights: in-place hooks, pre-hooks and parametrizations, float64, writes torch does not track,
dtype checks, taps before in-place modules, eps, torch.inference_mode, empty batches,
torch.func transforms, Triton from threads, and the first layer's padded taps with Inf."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn, relative_error
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

from vgg_kernels import (
    BackendFallbackWarning,
    FusedConvBNReLU,
    FusedSequential,
    FusedVGG,
    VGGFeatures,
    fuse,
    ops,
)
from vgg_kernels.backends import available_backends
from vgg_kernels.backends.triton import interpreting

CPU = torch.device("cpu")
INFER = [name for name in ("native", "triton", "reference")
         if available_backends(CPU, torch.float32)[name] is None]
TRAIN = [name for name in ("native", "triton", "reference")
         if available_backends(CPU, torch.float32, "conv_bn_relu_train")[name] is None]


def _stack(batch_norm: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1)]
    layers += [nn.BatchNorm2d(8)] if batch_norm else []
    layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Conv2d(8, 6, 3, padding=1)]
    layers += [nn.BatchNorm2d(6)] if batch_norm else []
    layers += [nn.ReLU(inplace=True)]
    return randomize_bn(nn.Sequential(*layers))


def _block_and_eager(pool: bool = True, **kwargs):
    block = FusedConvBNReLU(3, 8, pool=pool, **kwargs)
    randomize_bn(block)
    eager = nn.Sequential(copy.deepcopy(block.conv), copy.deepcopy(block.bn), nn.ReLU(),
                          *([nn.MaxPool2d(2)] if pool else []))
    return block, eager


# -- in-place hooks before a pool -----------------------------------------------------------------

@pytest.mark.parametrize("backend", INFER)
@pytest.mark.parametrize("mode", ["eval", "train_no_grad"])
def test_in_place_hook_on_the_relu_before_a_pool_changes_the_pooled_output(backend, mode):
    torch.manual_seed(0)
    eager = _stack()
    fused = fuse(copy.deepcopy(eager), backend=backend)
    for model in (fused, eager):
        model[2].register_forward_hook(lambda m, args, out: out.clamp_(max=0.1))
        model.train(mode != "eval")
    x = torch.randn(2, 3, 6, 8)
    with torch.no_grad():
        got, want = fused(x), eager(x)
    assert relative_error(got, want) < 1e-5
    assert fused[1].num_batches_tracked.item() == eager[1].num_batches_tracked.item()


def test_in_place_hook_before_a_pool_reaches_fused_vgg_logits():
    torch.manual_seed(0)
    ours = FusedVGG("A", num_classes=10).eval()
    theirs = copy.deepcopy(ours)
    theirs.features = nn.Sequential(*theirs.features)  # the plain modules, run one by one
    for model in (ours, theirs):
        model.features[2].register_forward_hook(lambda m, args, out: out.mul_(0.5))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(ours(x), theirs(x)) < 1e-5


# -- pre-hooks and parametrizations of a block ----------------------------------------------------

def test_block_runs_pre_hooks_of_its_conv_spectral_norm():
    torch.manual_seed(0)
    block, eager = _block_and_eager()
    nn.utils.spectral_norm(block.conv)
    eager[0] = copy.deepcopy(block.conv)
    x = torch.randn(2, 3, 6, 6)
    got, want = block(x), eager(x)
    assert relative_error(got, want) < 1e-5
    got.square().sum().backward()
    want.square().sum().backward()
    assert block.conv.weight_orig.grad is not None
    assert relative_error(block.conv.weight_orig.grad, eager[0].weight_orig.grad) < 1e-4


def test_block_with_hook_based_weight_norm_trains_after_load_state_dict():
    torch.manual_seed(0)
    block, eager = _block_and_eager()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook-based API is deprecated
        nn.utils.weight_norm(block.conv)
        nn.utils.weight_norm(eager[0])
    eager.load_state_dict({k.replace("conv.", "0.").replace("bn.", "1."): v
                           for k, v in block.state_dict().items()})
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (block, eager)]
    for _ in range(2):
        x = torch.randn(2, 3, 6, 6)
        for model, optimizer in zip((block, eager), optimizers, strict=True):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
        assert relative_error(block.conv.weight_v, eager[0].weight_v) < 1e-5
    with torch.no_grad():
        assert relative_error(block.eval()(x), eager.eval()(x)) < 1e-5


def test_block_runs_parametrized_weights_fused():
    torch.manual_seed(0)
    block, eager = _block_and_eager()
    nn.utils.parametrizations.weight_norm(block.conv)
    eager[0] = copy.deepcopy(block.conv)
    x = torch.randn(2, 3, 6, 6)
    got, want = block(x), eager(x)
    assert relative_error(got, want) < 1e-5
    got.square().sum().backward()
    want.square().sum().backward()
    original = block.conv.parametrizations.weight.original1
    assert relative_error(original.grad, eager[0].parametrizations.weight.original1.grad) < 1e-4


# -- float64 --------------------------------------------------------------------------------------

def test_float64_eval_is_float64_accurate_and_passes_gradcheck():
    torch.manual_seed(0)
    block, eager = _block_and_eager()
    block.double().eval()
    eager.double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackendFallbackWarning)  # fp64 runs PyTorch's ops
        with torch.no_grad():
            assert relative_error(block(x), eager(x)) < 1e-13
        gamma = block.bn.weight

        def as_gamma(g):
            return functional_call(block, {"bn.weight": g}, (x,))

        assert torch.autograd.gradcheck(as_gamma, (gamma.detach().requires_grad_(True),))


# -- writes torch does not track ------------------------------------------------------------------

@pytest.mark.parametrize("write", ["data", "numpy"])
def test_eval_sees_writes_that_torch_does_not_track(write):
    torch.manual_seed(0)
    eager = _stack()
    fused = fuse(copy.deepcopy(eager)).eval()
    eager.eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        fused(x)  # a first call, before the writes
        for model in (fused, eager):
            if write == "data":
                model[1].running_mean.data.add_(0.5)
                model[0].weight.data.mul_(-1.0)
            else:
                model[1].running_var.numpy()[:] = 2.0
                model[0].bias.detach().numpy()[:] += 1.0
        assert relative_error(fused(x), eager(x)) < 1e-5


def test_eval_sees_a_shared_memory_update_from_another_process():
    """``share_memory()``: another process writes the BN statistics; the next call sees them."""
    torch.manual_seed(0)
    model = fuse(_stack()).eval()
    model.share_memory()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        before = model(x)
    context = torch.multiprocessing.get_context("spawn")
    means = [m.running_mean for m in model if isinstance(m, nn.BatchNorm2d)]
    worker = context.Process(target=_add_in_place, args=(means, 0.75))
    worker.start()
    worker.join(300)
    assert worker.exitcode == 0
    expected = copy.deepcopy(model)
    with torch.no_grad():
        after = model(x)
        plain = nn.Sequential(*expected)(x)
    assert not torch.equal(after, before)
    assert relative_error(after, plain) < 1e-5


def _add_in_place(tensors, value):
    for t in tensors:
        t.add_(value)


# -- input dtypes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("entry", ["sequential", "block", "features"])
def test_an_input_of_another_dtype_is_refused_as_conv2d_refuses_it(entry, dtype):
    if entry == "sequential":
        model = fuse(_stack()).eval()
    elif entry == "block":
        model = FusedConvBNReLU(3, 8).eval()
    else:
        model = VGGFeatures("vgg11", taps=("relu1_1",))
    x = torch.randn(1, 3, 6, 6, dtype=dtype)
    with pytest.raises(TypeError, match=f"x must be float32 like the weight of Conv2d.*got "
                                        f"{str(dtype).replace('torch.', '')}"):
        model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as nn.Conv2d: autocast casts both
        if dtype != torch.float64:
            model(x)


# -- the first layer's padded taps ----------------------------------------------------------------

@pytest.mark.parametrize("dtype, k", [(torch.float32, 64), (torch.bfloat16, 60),
                                      (torch.float16, 60)], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_one_non_finite_pixel_of_the_first_layer_poisons_what_conv2d_poisons(dtype, k, value):
    if not interpreting():
        pytest.skip("the CPU runs Triton kernels only under TRITON_INTERPRET=1")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 9)
    x[0, 2, 4, 4] = value
    weight = torch.randn(k, 3, 3, 3)
    scale, shift = torch.rand(k) + 0.5, torch.randn(k)
    got = ops.conv_bn_relu_infer(x.to(dtype), weight.to(dtype), scale, shift, backend="triton")
    want = torch.relu(F.conv2d(x.double(), weight.double(), padding=1)
                      * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))
    assert torch.equal(torch.isnan(got), torch.isnan(want))


# -- taps before in-place modules -----------------------------------------------------------------

@pytest.mark.parametrize("backend", INFER)
def test_a_fused_relu_tap_followed_by_an_in_place_module_is_kept_as_returned(backend):
    torch.manual_seed(0)
    modules = [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True),
               nn.Hardtanh(0.0, 0.1, inplace=True)]
    fused = FusedSequential(*modules, backend=backend).eval()
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        out, taps = fused.forward_with_taps(x, {1: "relu"})
        expected = torch.relu(modules[0](x))
    assert relative_error(taps["relu"], expected) < 1e-5
    assert taps["relu"].max() > 0.1 and out.max() <= 0.1


# -- eps ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", TRAIN)
def test_eps_zero_in_training_is_refused_as_batch_norm_refuses_it(backend):
    block = FusedConvBNReLU(3, 4, eps=0.0, backend=backend)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        block(torch.randn(2, 3, 4, 4))
    assert block.bn.num_batches_tracked.item() == 0
    fused = fuse(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, eps=0),
                               nn.ReLU()), backend=backend)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        fused(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="eps must be positive during training"):
        ops.conv_bn_relu_train(torch.randn(2, 3, 4, 4), torch.randn(4, 3, 3, 3), None, None,
                               None, None, None, eps=0.0, backend=backend)


# -- torch.inference_mode and failed steps --------------------------------------------------------

@pytest.mark.parametrize("backend", TRAIN)
@pytest.mark.parametrize("case", ["train_forward", "built_inside", "inference_parameters"])
def test_inference_mode_as_eager(backend, case):
    torch.manual_seed(0)
    eager = _stack()
    if case == "built_inside":
        with torch.inference_mode():
            eager = copy.deepcopy(eager)
    fused = fuse(copy.deepcopy(eager), backend=backend)
    if case == "inference_parameters":
        with torch.inference_mode():
            state = {k: v.clone() for k, v in eager.state_dict().items()}
            fused.load_state_dict(state, assign=True)
            eager.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    x = torch.randn(2, 3, 6, 6)
    with torch.inference_mode():
        got, want = fused(x), eager(x)
    assert relative_error(got, want) < 1e-5
    for name, value in eager.named_buffers():
        assert relative_error(dict(fused.named_buffers())[name], value) < 1e-5, name
    for model in (fused, eager):
        model.eval()
    with torch.inference_mode():
        assert relative_error(fused(x), eager(x)) < 1e-5
    with torch.no_grad():
        assert relative_error(fused(x), eager(x)) < 1e-5


@pytest.mark.parametrize("backend", [b for b in TRAIN if b != "reference"])
def test_a_failed_training_block_leaves_the_statistics_unchanged(backend, monkeypatch):
    """A block that fails changes no state: its running statistics and num_batches_tracked
    are updated only once its kernels have run (here the last one fails)."""
    from vgg_kernels.backends import get_backend

    fused = fuse(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
                 backend=backend)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(torch.randn(1, 3, 1, 1))

    def failing(*args, **kwargs):
        raise RuntimeError("the normalisation kernel failed")

    monkeypatch.setattr(type(get_backend(backend)), "bn_relu_pool", failing)
    with pytest.raises(RuntimeError, match="the normalisation kernel failed"):
        fused(torch.randn(2, 3, 4, 4))
    for name, value in fused.state_dict().items():
        assert torch.equal(value, before[name]), name


# -- empty batches --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", INFER)
def test_an_empty_batch_in_eval_gives_zero_gradients(backend):
    eager = _stack()
    fused = fuse(copy.deepcopy(eager), backend=backend).eval()
    y = fused(torch.randn(0, 3, 6, 6))
    assert y.shape == (0, 6, 3, 3) and y.grad_fn is not None
    y.sum().backward()
    for name, p in fused.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name


# -- torch.func -----------------------------------------------------------------------------------

def _renamed(state: dict) -> dict:
    return {k.replace("conv.", "0.").replace("bn.", "1."): v for k, v in state.items()}


@pytest.mark.parametrize("backend", TRAIN)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_torch_func_grad_and_jacrev(backend, mode):
    torch.manual_seed(0)
    block, eager = _block_and_eager(backend=backend)
    block.train(mode == "train")
    eager.train(mode == "train")
    x = torch.randn(2, 3, 6, 6)
    params = dict(block.named_parameters())
    buffers = {k: v.clone() for k, v in block.named_buffers()}
    eager_buffers = _renamed({k: v.clone() for k, v in block.named_buffers()})

    def loss(model):
        return lambda p, b, x: functional_call(model, (p, b), (x,)).square().sum()

    got = grad(loss(block))(params, buffers, x)
    want = grad(loss(eager))(_renamed(params), eager_buffers, x)
    for name, value in _renamed(got).items():
        if name == "0.bias" and mode == "train":
            continue  # exactly 0 through train-mode BN: both sides are rounding noise
        assert relative_error(value, want[name]) < 1e-4, name
    for name, value in _renamed(buffers).items():
        assert relative_error(value.double(), eager_buffers[name].double()) < 1e-5, name
    if mode == "eval":
        jacobian = jacrev(lambda x: block(x).sum((2, 3)))(x)
        expected = jacrev(lambda x: eager(x).sum((2, 3)))(x)
        assert relative_error(jacobian, expected) < 1e-4


@pytest.mark.parametrize("backend", INFER)
def test_torch_func_vmap(backend):
    torch.manual_seed(0)
    block, eager = _block_and_eager(backend=backend)
    block.eval()
    eager.eval()
    xs = torch.randn(3, 2, 3, 6, 6)
    with torch.no_grad():
        assert relative_error(vmap(block)(xs), vmap(eager)(xs)) < 1e-5
    stats_free = FusedConvBNReLU(3, 4, track_running_stats=False, backend=backend)
    twin = nn.Sequential(copy.deepcopy(stats_free.conv), copy.deepcopy(stats_free.bn),
                         nn.ReLU())
    assert relative_error(vmap(stats_free)(xs), vmap(twin)(xs)) < 1e-5
    tracked = FusedConvBNReLU(3, 4, backend=backend)
    # ours (Functions' vmap rule) or PyTorch's batch_norm (the reference backend): one error
    with pytest.raises(RuntimeError, match="vmap over a training-mode block|running_mean or "
                                           "running_var, which will be updated in place"):
        vmap(tracked)(xs)


def test_torch_func_jvp_falls_back_to_pytorchs_ops_with_a_warning(monkeypatch):
    """Forward-mode AD runs PyTorch's ops, with the fallback warning; in training, without
    running statistics (whose in-place update no grad transform allows, eager's included)."""
    from vgg_kernels import backends

    torch.manual_seed(0)
    x, tangent = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    for mode in (False, True):
        monkeypatch.setattr(backends, "_WARNED", set())  # the warning is once per process
        block, eager = _block_and_eager(track_running_stats=not mode)
        block.train(mode)
        eager.train(mode)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, derivative = jvp(block, (x,), (tangent,))
        want, want_derivative = jvp(eager, (x,), (tangent,))
        assert relative_error(out, want) < 1e-5
        assert relative_error(derivative, want_derivative) < 1e-5
        if available_backends(CPU, torch.float32)["native"] is None:
            assert any("no forward-mode derivative" in str(w.message) for w in caught)


# -- threads and fresh processes ------------------------------------------------------------------

def test_triton_interpreter_launches_from_threads_all_succeed():
    if not interpreting():
        pytest.skip("the CPU runs Triton kernels only under TRITON_INTERPRET=1")
    torch.manual_seed(0)
    x = torch.randn(1, 5, 6, 7)
    weight = torch.randn(8, 5, 3, 3)
    scale, shift = torch.rand(8) + 0.5, torch.randn(8)
    expected = ops.conv_bn_relu_infer(x, weight, scale, shift, backend="reference")
    results: list[torch.Tensor | BaseException] = []
    barrier = threading.Barrier(16)

    def work():
        barrier.wait()
        try:
            results.append(ops.conv_bn_relu_infer(x, weight, scale, shift, backend="triton"))
        except BaseException as error:  # noqa: BLE001 - collected and reported below
            results.append(error)

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert all(relative_error(r, expected) < 1e-5 for r in results)


def test_a_model_built_in_a_fresh_process_runs_under_inference_mode():
    """The first call of a fresh process, inside inference mode (nothing warmed up before)."""
    script = textwrap.dedent("""
        import torch
        from vgg_kernels import FusedVGG
        with torch.inference_mode():
            model = FusedVGG("A", num_classes=4)
            y = model(torch.randn(2, 3, 32, 32))
        assert y.shape == (2, 4) and torch.isfinite(y).all()
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_float64_training_matches_eager_within_the_rule():
    """Training in float64 keeps float64 accuracy (runs PyTorch's ops, with one warning)."""
    torch.manual_seed(0)
    eager = _stack().double()
    fused = fuse(copy.deepcopy(eager))
    oracle = copy.deepcopy(eager)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackendFallbackWarning)
        got = fused(x)
    assert relative_error(got, oracle(x)) < 1e-13
