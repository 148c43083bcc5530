"""PyTorch's semantics at the edges, on every backend that runs here: batch statistics of
channels whose mean is large against their spread, NaN and Inf through every epilogue, one ReLU
mask shared by the forward and the backward, BN parameters given one at a time, first calls from
several threads, double backward, and arguments on mixed devices."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_within_rule, relative_error

from vgg_kernels import FusedConvBNReLU, FusedVGG, ops
from vgg_kernels.backends import available_backends
from vgg_kernels.models.vgg import make_eager_vgg

CPU = torch.device("cpu")


def _runs_here(op: str, dtype: torch.dtype = torch.float32) -> list[str]:
    """The compiled backends that run ``op`` on this machine's CPU (Triton in the interpreter)."""
    reasons = available_backends(CPU, dtype, op)
    return [name for name in ("native", "triton") if reasons.get(name) is None]


TRAIN_BACKENDS = _runs_here("conv_bn_relu_train")
INFER_BACKENDS = _runs_here("conv_bn_relu_infer")


def _need(backends: list[str]) -> None:
    if not backends:
        pytest.skip("no compiled backend runs on this machine's CPU")


def _train_block(x, weight, bias, gamma, beta, backend, pool=False):
    """One training step of the op; returns y and the running statistics (momentum 1: the
    batch's mean and unbiased variance)."""
    k = weight.shape[0]
    running = (torch.zeros(k, dtype=x.dtype), torch.ones(k, dtype=x.dtype))
    y = ops.conv_bn_relu_train(x, weight, bias, gamma, beta, *running, momentum=1.0,
                               pool=pool, backend=backend)
    return y, running


def _torch_block(x, weight, bias, gamma, beta, pool=False):
    k = weight.shape[0]
    running = (torch.zeros(k, dtype=x.dtype), torch.ones(k, dtype=x.dtype))
    y = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2)
    y = torch.relu(F.batch_norm(y, *running, gamma, beta, True, 1.0, 1e-5))
    return (F.max_pool2d(y, 2) if pool else y), running


# -- batch statistics at large means ------------------------------------------------------------

@pytest.mark.parametrize("backend", TRAIN_BACKENDS or ["none"])
@pytest.mark.parametrize("std", [1.0, 0.01])
@pytest.mark.parametrize("mean", [1e2, 1e3, 1e4])
@pytest.mark.parametrize("conv", ["identity1x1", "bias3x3"])
def test_batch_statistics_keep_their_precision_at_large_means(conv, mean, std, backend):
    """Outputs, running statistics and every gradient within PyTorch fp32's own error of the
    float64 result when a channel's mean is up to 1e4 (1e6 with std 0.01) times its spread:
    no E[z^2] - E[z]^2 (mean 1e4 gave a variance of 8.0 against 1.09)."""
    _need(TRAIN_BACKENDS)
    c = k = 8
    if conv == "identity1x1":  # z is x itself: the statistics alone decide the error
        x = torch.randn(4, c, 9, 7) * std + mean
        weight, bias = torch.eye(k).view(k, c, 1, 1), None
    else:
        x = torch.randn(4, c, 9, 7)
        weight = torch.randn(k, c, 3, 3) * std / (9 * c) ** 0.5
        bias = torch.full((k,), mean)
    # beta keeps the pre-activations away from 0: an fp32 z (or PyTorch's) is within rounding
    # of a value whose other side of the ReLU moves an O(1) gradient, and which elements that
    # befalls is chance (test_forward_and_backward_share_one_relu_mask covers the mask).
    gamma, beta = torch.rand(k) + 0.5, torch.randn(k) * 0.2 + 6
    grad = torch.randn(4, k, 9, 7)

    def run(fn, dtype, **kw):
        leaves = [t.detach().to(dtype).clone().requires_grad_(True) if t is not None else None
                  for t in (x, weight, bias, gamma, beta)]
        y, running = fn(*leaves, **kw)
        y.backward(grad.to(dtype))
        return y, running, [t.grad for t in leaves if t is not None]

    ours = run(_train_block, torch.float32, backend=backend)
    theirs = run(_torch_block, torch.float32)
    oracle = run(_torch_block, torch.float64)
    assert_within_rule(ours[0], theirs[0], oracle[0], torch.float32)
    for got, want, exact in zip(ours[1], theirs[1], oracle[1], strict=True):
        assert_within_rule(got, want, exact, torch.float32)
    for got, want, exact in zip(ours[2], theirs[2], oracle[2], strict=True):
        if conv == "bias3x3" and got.shape == (k,) and exact.abs().max() < 1e-6:
            continue  # the conv bias before BN: exactly 0 in exact arithmetic, rounding noise
        assert_within_rule(got, want, exact, torch.float32)


@pytest.mark.parametrize("backend", TRAIN_BACKENDS or ["none"])
def test_batch_statistics_of_two_values_per_channel(backend):
    """N * H * W = 2, the smallest batch BatchNorm accepts (errors of 1.8e-3 in the output and
    7.6e-2 in the gradients came from the same cancellation)."""
    _need(TRAIN_BACKENDS)
    for seed in range(20):
        torch.manual_seed(seed)
        x = torch.randn(2, 5, 1, 1) * 3 + 7
        weight = torch.randn(6, 5, 1, 1)
        gamma, beta = torch.rand(6) + 0.5, torch.randn(6)
        ours, _ = _train_block(x, weight, None, gamma, beta, backend)
        theirs, _ = _torch_block(x, weight, None, gamma, beta)
        oracle, _ = _torch_block(*(t.double() for t in (x, weight)), None, gamma.double(),
                                 beta.double())
        assert_within_rule(ours, theirs, oracle, torch.float32)


# -- NaN and Inf --------------------------------------------------------------------------------

def _poison(what: str, x, weight, scale, shift):
    x, weight, scale, shift = (t.clone() for t in (x, weight, scale, shift))
    value = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[what.split(":")[1]]
    where = what.split(":")[0]
    if where == "x":
        x[0, 1, 2, 3] = value
    elif where == "weight":
        weight[2, 1, 0, 1] = value
    elif where == "scale":
        scale[3] = value
    else:
        shift[3] = value
    return x, weight, scale, shift


def _assert_same_specials(got: torch.Tensor, want: torch.Tensor,
                           nan_superset: bool = False) -> None:
    """NaN, +Inf and -Inf exactly where ``want`` has them; the finite rest close.
    ``nan_superset``: ``got`` may hold NaN where ``want`` is finite too (see the weight case)."""
    checks = (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf))
    for name, test in checks:
        if name == "NaN" and nan_superset:
            assert (test(got) | ~test(want)).all(), f"{name} missing where expected"
            continue
        assert torch.equal(test(got), test(want)), (
            f"{name}: {int(test(got).sum())} elements, expected {int(test(want).sum())}")
    finite = torch.isfinite(want) & torch.isfinite(got)
    if finite.any():
        assert relative_error(got[finite], want[finite]) < 1e-4


@pytest.mark.parametrize("backend", INFER_BACKENDS or ["none"])
@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("what", ["x:nan", "x:inf", "x:-inf", "weight:nan", "scale:nan",
                                  "shift:nan", "shift:inf"])
def test_nan_and_inf_propagate_through_the_inference_epilogue(what, pool, backend):
    """As torch.relu and nn.MaxPool2d: relu(NaN) is NaN, a window holding a NaN pools to NaN,
    and one infinite input gives +-inf wherever the convolution does (Winograd's transforms
    alone would turn it into Inf - Inf = NaN, which the ReLU used to zero)."""
    _need(INFER_BACKENDS)
    x = torch.randn(2, 6, 8, 10)
    weight = torch.randn(12, 6, 3, 3) / 4
    scale, shift = torch.rand(12) + 0.5, torch.randn(12) * 0.1
    scale[::2] *= -1  # negative scales make -inf pre-activations: the ReLU's zeros
    args = _poison(what, x, weight, scale, shift)
    want = ops.conv_bn_relu_infer(*args, pool=pool, backend="reference")
    assert not torch.isfinite(want).all()
    got = ops.conv_bn_relu_infer(*args, pool=pool, backend=backend)
    # A NaN weight times the zero padding is NaN (IEEE 0 * NaN), which the kernels compute and
    # PyTorch's CPU convolution skips: at the border the kernels' output is NaN as well.
    _assert_same_specials(got, want, nan_superset=what == "weight:nan")


@pytest.mark.parametrize("backend", ["auto", "reference", *INFER_BACKENDS])
@pytest.mark.parametrize("statistic", ["nan_mean", "nan_var", "negative_var"])
def test_bad_running_statistics_give_nan_as_eager_does(statistic, backend):
    """A NaN or negative running_var (or a NaN running_mean) in an eval block: NaN in that
    channel, as nn.BatchNorm2d gives, not an all-zero channel."""
    block = FusedConvBNReLU(4, 6, pool=True, backend=backend).eval()
    eager = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.BatchNorm2d(6),
                                torch.nn.ReLU(), torch.nn.MaxPool2d(2)).eval()
    eager[0].load_state_dict(block.conv.state_dict())
    with torch.no_grad():
        if statistic == "nan_mean":
            block.bn.running_mean[2] = float("nan")
        else:
            block.bn.running_var[2] = float("nan") if statistic == "nan_var" else -1.0
    eager[1].load_state_dict(block.bn.state_dict())
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        got, want = block(x), eager(x)
    assert torch.isnan(want[:, 2]).all()
    _assert_same_specials(got, want)


@pytest.mark.parametrize("backend", ["auto", *INFER_BACKENDS])
def test_one_nan_pixel_reaches_every_logit(backend):
    """FusedVGG('A') in eval with one NaN pixel returns NaN logits, as torchvision's does."""
    if backend == "triton":
        pytest.skip("a whole VGG in the Triton interpreter is too slow for CI; the epilogue "
                    "test above covers the kernel")
    model = FusedVGG("A", num_classes=10, backend=backend).eval()
    eager = make_eager_vgg("A", num_classes=10).eval()
    eager.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    x[0, 1, 5, 7] = float("nan")
    with torch.no_grad():
        got, want = model(x), eager(x)
    assert torch.isnan(want).all()
    assert torch.isnan(got).all()


@pytest.mark.parametrize("backend", TRAIN_BACKENDS or ["none"])
@pytest.mark.parametrize("pool", [False, True])
def test_nan_propagates_in_training(backend, pool):
    _need(TRAIN_BACKENDS)
    x = torch.randn(2, 3, 6, 6)
    x[1, 0, 2, 2] = float("nan")
    weight, gamma, beta = torch.randn(5, 3, 3, 3), torch.rand(5) + 0.5, torch.randn(5)
    got, running = _train_block(x, weight, None, gamma, beta, backend, pool)
    want, running_want = _torch_block(x, weight, None, gamma, beta, pool)
    _assert_same_specials(got, want)
    for a, b in zip(running, running_want, strict=True):
        assert torch.equal(torch.isnan(a), torch.isnan(b))


# -- one ReLU mask ------------------------------------------------------------------------------

def _mask_case():
    """z (through a 1x1 identity conv) with many pixels equal to one value zc, and beta chosen
    so that their pre-activation is 0 up to rounding: ``z * scale + shift`` (the forward's) and
    ``(z - mean) * invstd * gamma + beta`` then disagree on the sign of some of them."""
    k = 64
    x = torch.randn(3, k, 12, 12)
    zc = torch.randn(k)
    x[:, :, :6] = zc.view(1, k, 1, 1)
    x = x.contiguous(memory_format=torch.channels_last)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    invstd = torch.rsqrt(var + 1e-5)
    gamma = torch.rand(k) + 0.5
    beta = -((zc - mean) * invstd * gamma)
    scale = gamma * invstd
    shift = beta - mean * scale
    forward_pre = zc * scale + shift
    backward_pre = (zc - mean) * invstd * gamma + beta
    disagree = int(((forward_pre > 0) != (backward_pre > 0)).sum())
    return x, torch.eye(k).view(k, k, 1, 1), gamma, beta, disagree


@pytest.mark.parametrize("backend", ["reference", *TRAIN_BACKENDS])
@pytest.mark.parametrize("pool", [False, True])
def test_forward_and_backward_share_one_relu_mask(backend, pool):
    """With a gradient of ones, grad_beta is the number of elements the backward lets through:
    exactly the number of positive outputs of the forward (a pre-activation within rounding of
    0 once went one way in the forward and the other in the backward, dropping a gradient of
    1.22)."""
    x, weight, gamma, beta, disagree = _mask_case()
    assert disagree > 0, "the case must separate the two formulas"
    beta = beta.clone().requires_grad_(True)
    y = ops.conv_bn_relu_train(x, weight, None, gamma, beta, None, None, pool=pool,
                               backend=backend)
    y.backward(torch.ones_like(y))
    assert torch.equal(beta.grad, (y > 0).sum((0, 2, 3)).to(beta.grad.dtype))


# -- BN parameters one at a time ----------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", *TRAIN_BACKENDS])
@pytest.mark.parametrize("given", ["bn_weight", "bn_bias"])
def test_bn_weight_and_bias_each_on_their_own(given, backend):
    """bn_weight without bn_bias raised in backward; bn_bias without bn_weight got no
    gradient."""
    x = torch.randn(2, 3, 6, 5)
    weight = torch.randn(4, 3, 3, 3)
    param = (torch.rand(4) + 0.5) if given == "bn_weight" else torch.randn(4)
    grad = torch.randn(2, 4, 6, 5)
    results = []
    for dtype, fn in ((torch.float32, "ours"), (torch.float64, "oracle")):
        p = param.to(dtype).clone().requires_grad_(True)
        xx = x.to(dtype).clone().requires_grad_(True)
        gamma, beta = (p, None) if given == "bn_weight" else (None, p)
        if fn == "ours":
            y = ops.conv_bn_relu_train(xx, weight.to(dtype), None, gamma, beta, None, None,
                                       backend=backend)
        else:
            y = torch.relu(F.batch_norm(F.conv2d(xx, weight.to(dtype), padding=1), None, None,
                                        gamma, beta, True))
        y.backward(grad.to(dtype))
        results.append((y, p.grad, xx.grad))
    for got, want in zip(results[0], results[1], strict=True):
        assert got is not None
        assert relative_error(got, want) < 1e-4


# -- first calls from several threads -----------------------------------------------------------

def test_first_calls_from_threads_all_succeed():
    """Four threads making their first call at once (behind a barrier, in a fresh process,
    where the backend registry is still empty): every one gets its result."""
    script = textwrap.dedent("""
        import threading
        import torch
        from vgg_kernels import ops

        barrier = threading.Barrier(4)
        errors, results = [], []
        x, w = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3)
        scale, shift = torch.ones(4), torch.zeros(4)

        def first_call():
            barrier.wait()
            try:
                results.append(ops.conv_bn_relu_infer(x, w, scale, shift))
            except Exception as error:
                errors.append(repr(error))

        threads = [threading.Thread(target=first_call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(results) == 4 and all(torch.equal(r, results[0]) for r in results)
        print("ok")
    """)
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


# -- double backward, mixed devices, parameters_to_vector ---------------------------------------

@pytest.mark.parametrize("backend", TRAIN_BACKENDS or ["none"])
def test_double_backward_through_the_training_block_says_it_is_unsupported(backend):
    _need(TRAIN_BACKENDS)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    y = ops.conv_bn_relu_train(x, torch.randn(4, 3, 3, 3), None, torch.ones(4), torch.zeros(4),
                               None, None, backend=backend)
    (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        grad_x.sum().backward()


def test_double_backward_on_the_reference_backend_works():
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    y = ops.conv_bn_relu_train(x, torch.randn(4, 3, 3, 3, dtype=torch.float64), None,
                               torch.ones(4, dtype=torch.float64),
                               torch.zeros(4, dtype=torch.float64), None, None,
                               backend="reference")
    (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    grad_x.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _native_ops():
    from vgg_kernels.backends import native

    if native._load() is not None:
        pytest.skip("the compiled extension is not available")
    return torch.ops.vgg_kernels


@pytest.mark.parametrize("op, args", [
    ("conv_bn_relu_infer", ("x", "weight", "scale", "shift", False)),
    ("conv_bn_stats", ("x", "weight", "bias")),
    ("bn_relu_pool", ("z", "mean", "scale", "shift", True)),
    ("bn_relu_backward", ("grad_y", "z", "mean", "scale", "scale", "shift", True)),
])
def test_ops_called_with_a_meta_argument_raise(op, args):
    """One argument on the meta device, the rest on the CPU: the call reached the fake kernel,
    which returned uninitialised memory instead of an error."""
    vk = _native_ops()
    values = {"x": torch.randn(1, 3, 4, 4), "weight": torch.randn(4, 3, 3, 3),
              "bias": torch.zeros(4), "z": torch.randn(1, 4, 4, 4),
              "grad_y": torch.randn(1, 4, 2, 2), "mean": torch.zeros(4, dtype=torch.float64),
              "scale": torch.ones(4), "shift": torch.zeros(4)}
    names = [a for a in args if isinstance(a, str)]
    for meta in names[1:]:
        call = [values[a].to("meta") if a == meta else values.get(a, a) for a in args]
        with pytest.raises((ValueError, RuntimeError), match="device"):
            getattr(vk, op)(*call)


def test_parameters_to_vector_works_on_fused_vgg():
    model = FusedVGG("A", num_classes=10)
    vector = torch.nn.utils.parameters_to_vector(model.parameters())
    assert vector.numel() == sum(p.numel() for p in model.parameters())
    torch.nn.utils.vector_to_parameters(vector * 2, model.parameters())


@pytest.mark.parametrize("backend", TRAIN_BACKENDS or ["none"])
def test_training_steps_are_bit_identical_across_runs(backend):
    """Two runs of the same training steps give the same bits (exact resumption of training
    needs it): the CPU conv's threads take work items in any order, so each item keeps its own
    statistics, merged in item order."""
    _need(TRAIN_BACKENDS)
    if backend == "triton":
        pytest.skip("the Triton backend's determinism is tested in test_triton_train.py")

    def run():
        torch.manual_seed(0)
        model = FusedVGG("A", num_classes=10, dropout=0.0, backend=backend).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(6, 3, 32, 32)
        target = torch.randint(0, 10, (6,))
        losses = []
        for _ in range(3):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return losses, model.state_dict()

    (losses_a, state_a), (losses_b, state_b) = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(losses_a, losses_b, strict=True))
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
