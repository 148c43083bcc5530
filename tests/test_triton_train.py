"""The Triton training block (conv with statistics in its epilogue, normalise + ReLU (+ pool),
the fused BN backward, dgrad and wgrad), the folded blocks' gradients (frozen networks, conv +
bias + ReLU training) and their wiring (torch.library, torch.compile, determinism). On the CPU
in the interpreter, on small odd shapes; marked gpu, compiled, against cuDNN on VGG16's
layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ODD_SHAPE_IDS, ODD_SHAPES, assert_within_rule, relative_error
from torch import nn

from vgg_kernels import FusedSequential, ops
from vgg_kernels.backends import get_backend
from vgg_kernels.backends.triton import interpreting

pytest.importorskip("triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the interpreter is slow: a third of the odd shapes (C = 3 with pool, odd sizes, 1x1, batch 1,
# more than one block of channels with a tail)
TRAIN_SHAPES = [ODD_SHAPES[i] for i in (0, 2, 4, 6)]
TRAIN_IDS = [ODD_SHAPE_IDS[i] for i in (0, 2, 4, 6)]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> torch.device:
    """Each test runs in the interpreter on the CPU and, marked gpu, compiled on a GPU."""
    if request.param == "cpu" and not interpreting():
        pytest.skip("the CPU runs Triton kernels only under TRITON_INTERPRET=1")
    return torch.device(request.param)


@pytest.fixture
def poison_outputs(monkeypatch):
    from vgg_kernels.backends.triton import conv_bn_relu

    monkeypatch.setattr(conv_bn_relu, "POISON_OUTPUTS", True)


def _train_case(shape, device):
    n, c, k, h, w, r, pool = shape
    base = {"x": torch.randn(n, c, h, w, device=device),
            "weight": torch.randn(k, c, r, r, device=device) / (c * r * r) ** 0.5,
            "bias": torch.randn(k, device=device) * 0.1,
            "gamma": torch.rand(k, device=device) + 0.5,
            "beta": torch.randn(k, device=device) * 0.2}
    stats = (torch.randn(k, device=device) * 0.1, torch.rand(k, device=device) + 0.5)
    out = (h // 2, w // 2) if pool else (h, w)
    grad = torch.randn(n, k, *out, device=device)
    return base, stats, grad, pool


def _run_train(backend, base, stats0, grad, pool, dtype):
    """One forward and backward of the training block on ``backend``: x and weight in
    ``dtype``, the BN parameters and statistics in fp32 (float64 for the oracle), as
    mixed-precision training keeps them."""
    bn_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = {key: v.to(bn_dtype if key in ("bias", "gamma", "beta") else dtype)
              .clone().requires_grad_(True) for key, v in base.items()}
    stats = [s.to(bn_dtype).clone() for s in stats0]
    x = leaves["x"].contiguous(memory_format=torch.channels_last)
    y = ops._train_on_backend(backend, x, leaves["weight"], leaves["bias"], leaves["gamma"],
                              leaves["beta"], *stats, 0.1, 1e-5, pool)
    y.backward(grad.to(dtype))
    return y, leaves, stats


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", TRAIN_SHAPES, ids=TRAIN_IDS)
def test_training_block_matches_oracle(shape, dtype, device, poison_outputs):
    """Output, running statistics and the gradients of x, weight, gamma and beta within the
    error rule of the reference backend's decomposition in the same dtype (float64 oracle).

    bf16 gradients are left to ``test_backward_kernels_match_oracle``, on identical inputs:
    end to end, the ReLU mask and the pool's choice among near-equal values follow z's bf16
    rounding, and which elements flip is chance (on these shapes PyTorch's own bf16 gradients
    are 0.1 to 0.5 off the float64 oracle as often as not)."""
    base, stats0, grad, pool = _train_case(shape, device)
    triton, reference = get_backend("triton"), get_backend("reference")
    y, leaves, stats = _run_train(triton, base, stats0, grad, pool, dtype)
    y_t, leaves_t, stats_t = _run_train(reference, base, stats0, grad, pool, dtype)
    y_o, leaves_o, stats_o = _run_train(reference, base, stats0, grad, pool, torch.float64)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert_within_rule(y, y_t, y_o, dtype)
    for got, want, oracle in zip(stats, stats_t, stats_o, strict=True):
        assert_within_rule(got, want, oracle, torch.float32)
    if dtype == torch.bfloat16:
        return
    for key in ("x", "weight", "gamma", "beta"):
        assert_within_rule(leaves[key].grad, leaves_t[key].grad, leaves_o[key].grad, dtype)
    # d loss / d conv bias is exactly 0 through train-mode BN: rounding noise on both sides
    scale = leaves_o["weight"].grad.abs().max()
    assert leaves["bias"].grad.abs().max() <= 1e-2 * scale


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", TRAIN_SHAPES, ids=TRAIN_IDS)
def test_backward_kernels_match_oracle(shape, dtype, device, poison_outputs):
    """The BN + ReLU (+ pool) backward, dgrad and wgrad on identical inputs against the
    reference's (PyTorch's ops, cuDNN's convolutions on a GPU) in the same dtype and in
    float64."""
    n, c, k, h, w, r, pool = shape
    triton, reference = get_backend("triton"), get_backend("reference")
    x = torch.randn(n, c, h, w, device=device).to(dtype).contiguous(
        memory_format=torch.channels_last)
    weight = (torch.randn(k, c, r, r, device=device) / (c * r * r) ** 0.5).to(dtype)
    z = torch.randn(n, k, h, w, device=device).to(dtype).contiguous(
        memory_format=torch.channels_last)
    mean = torch.randn(k, device=device, dtype=torch.float64) * 0.2
    invstd = torch.rand(k, device=device) + 0.5
    scale = invstd * (torch.rand(k, device=device) + 0.5)
    beta = torch.randn(k, device=device) * 0.3
    out = (h // 2, w // 2) if pool else (h, w)
    grad_y = torch.randn(n, k, *out, device=device).to(dtype).contiguous(
        memory_format=torch.channels_last)

    def f64(*ts):
        return [t.double() for t in ts]

    got = triton.bn_relu_backward(grad_y, z, mean, invstd, scale, beta, pool)
    want = reference.bn_relu_backward(grad_y, z, mean, invstd, scale, beta, pool)
    oracle = reference.bn_relu_backward(*f64(grad_y, z), mean, *f64(invstd, scale, beta), pool)
    for g, t, o in zip(got[:3], want[:3], oracle[:3], strict=True):
        assert_within_rule(g, t, o, dtype)
    grad_z = got[0]
    assert_within_rule(triton.conv_dgrad(grad_z, weight, list(x.shape)),
                       reference.conv_dgrad(grad_z, weight, list(x.shape)),
                       reference.conv_dgrad(*f64(grad_z, weight), list(x.shape)), dtype)
    assert_within_rule(triton.conv_wgrad(grad_z, x, list(weight.shape)),
                       reference.conv_wgrad(grad_z, x, list(weight.shape)),
                       reference.conv_wgrad(*f64(grad_z, x), list(weight.shape)), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mean, std", [(1e3, 1.0), (1e4, 1.0)])
def test_batch_statistics_at_large_means(mean, std, dtype, device):
    """The epilogue's per-tile statistics, merged with Chan's formula: the batch variance and
    the running variance of activations with mean 1e3 (1e4) and std 1, against float64."""
    k = 8
    x = (torch.randn(4, k, 9, 7, device=device) * std + mean).to(dtype)
    weight = torch.eye(k, device=device).view(k, k, 1, 1).to(dtype)
    running = (torch.zeros(k, device=device), torch.ones(k, device=device))
    z, batch_mean, batch_var = get_backend("triton").conv_bn_stats(x, weight, None)
    exact_var, exact_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    theirs_var, theirs_mean = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)
    assert_within_rule(batch_mean, theirs_mean, exact_mean, torch.float32)
    assert_within_rule(batch_var, theirs_var, exact_var, torch.float32)
    ops.conv_bn_relu_train(x, weight, None, None, None, *running, momentum=1.0,
                           backend="triton")
    count = x.numel() // k
    exact_unbiased = exact_var * count / (count - 1)
    assert_within_rule(running[1], theirs_var * count / (count - 1), exact_unbiased,
                       torch.float32)


def test_training_runs_are_bit_identical_in_deterministic_mode(device):
    """Every reduction (statistics, BN backward, wgrad) adds per-block partial sums in a fixed
    order, without float atomics: two runs give the same bits."""
    base, stats0, grad, pool = _train_case(ODD_SHAPES[6], device)
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_run_train(get_backend("triton"), base, stats0, grad, pool, torch.float32)
                for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    (y0, leaves0, stats_a), (y1, leaves1, stats_b) = runs
    assert torch.equal(y0, y1)
    for key in leaves0:
        assert torch.equal(leaves0[key].grad, leaves1[key].grad), key
    for a, b in zip(stats_a, stats_b, strict=True):
        assert torch.equal(a, b)


# -- folded blocks: frozen networks and conv + bias + ReLU training --------------------------------

def _folded_case(shape, device, dtype):
    n, c, k, h, w, r, pool = shape
    x = torch.randn(n, c, h, w, device=device).to(dtype).contiguous(
        memory_format=torch.channels_last)
    weight = (torch.randn(k, c, r, r, device=device) / (c * r * r) ** 0.5).to(dtype)
    scale = torch.rand(k, device=device) + 0.5
    shift = torch.randn(k, device=device) * 0.5
    return x, weight, scale, shift, pool


def _folded_reference(x, weight, scale, shift, pool, activation):
    view = (1, -1, 1, 1)
    full = torch.relu(F.conv2d(x, weight, padding=weight.shape[-1] // 2).float()
                      * scale.view(view) + shift.view(view)).to(x.dtype)
    if not pool:
        return (full,)
    pooled = F.max_pool2d(full, 2)
    return (pooled, full) if activation else (pooled,)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tapped", [False, True], ids=["output", "tap"])
@pytest.mark.parametrize("shape", TRAIN_SHAPES, ids=TRAIN_IDS)
def test_frozen_block_input_gradient_matches_oracle(shape, tapped, dtype, device,
                                                    poison_outputs):
    """Weights without gradients: the forward keeps the output or the pool's window codes, the
    backward is one dgrad whose operand loads apply the mask (and the tapped activation's
    gradient); against PyTorch's ops in the same dtype and in float64."""
    x, weight, scale, shift, pool = _folded_case(shape, device, dtype)
    activation = tapped and pool
    if activation and (x.shape[2] % 2 or x.shape[3] % 2):
        pytest.skip("a tapped activation before the pool needs even H and W on the fused "
                    "path (others take the unfused one, tested elsewhere)")
    grads = [torch.randn(t.shape, device=device)
             for t in _folded_reference(x, weight, scale, shift, pool, activation)]
    results = []
    for dtype_, fn in ((dtype, "ours"), (dtype, "torch"), (torch.float64, "oracle")):
        leaf = x.detach().to(dtype_).clone().requires_grad_(True)
        if fn == "ours":
            out = ops.conv_bn_relu_infer(leaf, weight, scale, shift, pool=pool,
                                         activation=activation, backend="triton")
            outs = out if isinstance(out, tuple) else (out,)
        else:
            outs = _folded_reference(leaf, weight.to(dtype_), scale.to(torch.float64
                                     if dtype_ == torch.float64 else torch.float32),
                                     shift.to(torch.float64 if dtype_ == torch.float64
                                              else torch.float32), pool, activation)
        torch.autograd.backward(outs, [g.to(dtype_) for g in grads])
        results.append((outs, leaf.grad))
    (outs, grad_x), (outs_t, grad_t), (outs_o, grad_o) = results
    for got, want, oracle in zip(outs, outs_t, outs_o, strict=True):
        assert_within_rule(got, want, oracle, dtype)
    assert_within_rule(grad_x, grad_t, grad_o, dtype)


@pytest.mark.parametrize("shape", TRAIN_SHAPES, ids=TRAIN_IDS)
def test_conv_bias_relu_block_trains_on_the_fused_path(shape, device, poison_outputs):
    """Without BN (torchvision's vgg16): conv + bias + ReLU (+ pool) forward and backward,
    gradients of x, weight and bias (the bias's from the mask pass's sums)."""
    x, weight, _, bias, pool = _folded_case(shape, device, torch.float32)
    grad = None
    results = []
    for dtype in (torch.float32, torch.float64):
        leaves = [t.detach().to(dtype).clone().requires_grad_(True) for t in (x, weight, bias)]
        if dtype == torch.float32:
            y = ops.conv_bn_relu(*leaves, batch_norm=False, pool=pool, backend="triton")
        else:
            y = torch.relu(F.conv2d(leaves[0], leaves[1], leaves[2],
                                    padding=weight.shape[-1] // 2))
            y = F.max_pool2d(y, 2) if pool else y
        grad = torch.randn(y.shape, device=device) if grad is None else grad
        y.backward(grad.to(dtype))
        results.append((y, [t.grad for t in leaves]))
    (y, got), (y_o, want) = results
    assert relative_error(y, y_o) < 1e-5
    for g, o in zip(got, want, strict=True):
        assert relative_error(g, o) < 1e-4


# -- a VGG-shaped network trained for 20 steps ---------------------------------------------------

def _small_vgg(backend: str | None) -> nn.Module:
    """VGG's pattern at the smallest size the interpreter trains in CI time: a 3x3 block with
    pool, a 3x3 block, a 1x1 block (config C's) with pool, BN throughout, then a linear
    classifier; the fused features (FusedSequential) or, with backend None, the same plain
    modules."""
    layers: list[nn.Module] = []
    c = 3
    for width, kernel, pool in ((4, 3, True), (8, 3, False), (8, 1, True)):
        layers += [nn.Conv2d(c, width, kernel, padding=kernel // 2), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True)]
        if pool:
            layers.append(nn.MaxPool2d(2, 2))
        c = width
    features = (nn.Sequential(*layers) if backend is None
                else FusedSequential(*layers, backend=backend))
    return nn.Sequential(features, nn.Flatten(1), nn.Linear(8 * 4 * 4, 10))


@pytest.fixture
def large_interpreter_blocks(monkeypatch):
    """Interpreted programs cost tens of milliseconds each whatever their size: whole-network
    runs use large blocks (the odd-shape tests keep the small ones)."""
    from vgg_kernels.backends.triton import conv_bn_relu, train

    monkeypatch.setattr(conv_bn_relu, "INTERPRETER_BLOCKS", {
        **conv_bn_relu.INTERPRETER_BLOCKS, "BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32})
    monkeypatch.setattr(train, "_DGRAD_INTERPRETED", {"BLOCK_M": 128, "BLOCK_N": 32,
                                                       "BLOCK_K": 32})
    monkeypatch.setattr(train, "_WGRAD_INTERPRETED", {"BLOCK_K": 32, "BLOCK_C": 32,
                                                       "BLOCK_P": 512})
    monkeypatch.setattr(train, "_ELEMENTWISE_INTERPRETED", {"BLOCK_P": 256, "BLOCK_K": 32})


def test_twenty_sgd_steps_follow_the_eager_modules(device, large_interpreter_blocks):
    """20 SGD steps (momentum 0.9) of a VGG-style network on the Triton backend against the
    same network as plain PyTorch modules from the same weights, on the same batches: the
    losses agree at every step within 1e-3 relative (fp32; the two differ only by rounding,
    which 20 steps of training amplify), and so do the weights after the last step."""
    torch.manual_seed(0)
    ours = _small_vgg("triton").to(device)
    theirs = _small_vgg(None).to(device)
    theirs.load_state_dict(ours.state_dict())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ours, theirs)]
    batches = [(torch.randn(2, 3, 16, 16, device=device),
                torch.randint(0, 10, (2,), device=device)) for _ in range(20)]
    for step, (x, target) in enumerate(batches):
        losses = []
        for model, optimizer in zip((ours, theirs), optimizers, strict=True):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-3 * abs(losses[1]), (step, losses)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        if a.is_floating_point():
            assert relative_error(a, b) < 1e-2


# -- wiring --------------------------------------------------------------------------------------

def _op_cases(device: torch.device, dtype: torch.dtype) -> dict[str, tuple]:
    from vgg_kernels.backends.triton.train import OPS

    x = torch.randn(2, 5, 6, 8, device=device).to(dtype).contiguous(
        memory_format=torch.channels_last)
    weight = torch.randn(7, 5, 3, 3, device=device).to(dtype) / 4
    k = 7
    vec = torch.rand(k, device=device) + 0.5
    z, mean, var = OPS["conv_bn_stats"](x, weight, vec)
    pooled = torch.randn(2, k, 3, 4, device=device).to(dtype).contiguous(
        memory_format=torch.channels_last)
    y, _, codes = OPS["infer_outputs"](x, weight, vec, vec - 1, True, False, True)
    return {
        "conv_bn_stats": (x, weight, vec),
        "bn_relu_pool": (z, mean, vec, vec - 1, True),
        "bn_relu_backward": (pooled, z, mean, vec, vec, vec - 1, True),
        "conv_dgrad": (z, None, None, None, None, weight, list(x.shape), False, 0),
        "conv_wgrad": (z, x, list(weight.shape)),
        "infer_outputs": (x, weight, vec, vec - 1, True, True, True),
        "relu_pool_backward": (pooled, codes, None, None, vec, True, [2, k, 6, 8]),
    }


@pytest.mark.parametrize("name", ["conv_bn_stats", "bn_relu_pool", "bn_relu_backward",
                                  "conv_dgrad", "conv_wgrad", "infer_outputs",
                                  "relu_pool_backward"])
def test_training_ops_pass_opcheck(name, device):
    """torch.library.opcheck on every op: schemas, fake kernels (shapes, dtypes, strides), no
    aliasing, AOT dispatch."""
    from vgg_kernels.backends.triton.train import OPS

    torch.library.opcheck(OPS[name], _op_cases(device, torch.float32)[name])


def test_compiled_training_step_traces_without_graph_breaks(device, large_interpreter_blocks):
    """torch.compile(fullgraph=True) of a train-mode fused network: forward and backward trace
    through the registered ops (opaque custom ops in the interpreter, Triton ops on a GPU), and
    give the eager fused network's loss and gradients."""
    torch.manual_seed(0)
    model = _small_vgg("triton").to(device).train()
    twin = _small_vgg("triton").to(device).train()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16, device=device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(x).square().sum()
    loss.backward()
    want = twin(x).square().sum()
    want.backward()
    assert relative_error(loss, want) < 1e-5
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert relative_error(a.grad, b.grad) < 1e-4
    torch._dynamo.reset()


# -- GPU: VGG16's layers against cuDNN -----------------------------------------------------------

# VGG16's distinct conv layers at 224x224: (C, K, H, pool)
VGG16_LAYERS = [(3, 64, 224, False), (64, 64, 224, True), (64, 128, 112, False),
                (128, 128, 112, True), (128, 256, 56, False), (256, 256, 56, True),
                (256, 512, 28, False), (512, 512, 28, True), (512, 512, 14, False),
                (512, 512, 14, True)]
GPU_BATCH = 8


def _cudnn_block(leaves, stats, pool):
    y = F.conv2d(leaves["x"], leaves["weight"], leaves["bias"].to(leaves["x"].dtype), padding=1)
    y = torch.relu(F.batch_norm(y, *stats, leaves["gamma"], leaves["beta"], True, 0.1, 1e-5))
    return F.max_pool2d(y, 2) if pool else y


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", VGG16_LAYERS, ids=lambda s: "C{}K{}H{}pool{}".format(*s))
def test_gpu_training_block_matches_cudnn(layer, dtype, monkeypatch):
    """Forward, running statistics and every gradient at batch 8 against cuDNN's conv +
    batch_norm + relu (+ max_pool2d) in the same dtype and in float64 (fp32 without tf32 on
    both sides). In fp32 the gradients are left to the kernel test on identical inputs (a
    pre-activation within rounding of 0 flips an O(1) gradient in any fp32 forward)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    c, k, h, pool = layer
    dev = torch.device("cuda")
    base = {"x": torch.randn(GPU_BATCH, c, h, h, device=dev),
            "weight": torch.randn(k, c, 3, 3, device=dev) / (9 * c) ** 0.5,
            "bias": torch.randn(k, device=dev) * 0.1,
            "gamma": torch.rand(k, device=dev) + 0.5, "beta": torch.randn(k, device=dev) * 0.2}
    stats0 = (torch.randn(k, device=dev) * 0.1, torch.rand(k, device=dev) + 0.5)
    out = h // 2 if pool else h
    grad = torch.randn(GPU_BATCH, k, out, out, device=dev)
    results = {}
    for name, dtype_ in (("ours", dtype), ("cudnn", dtype), ("oracle", torch.float64)):
        bn_dtype = torch.float64 if dtype_ == torch.float64 else torch.float32
        leaves = {key: v.to(bn_dtype if key in ("bias", "gamma", "beta") else dtype_)
                  .clone().requires_grad_(True) for key, v in base.items()}
        stats = [s.to(bn_dtype).clone() for s in stats0]
        x = leaves["x"].contiguous(memory_format=torch.channels_last)
        if name == "ours":
            y = ops.conv_bn_relu_train(x, leaves["weight"], leaves["bias"], leaves["gamma"],
                                       leaves["beta"], *stats, pool=pool, backend="triton")
        else:
            y = _cudnn_block({**leaves, "x": x}, stats, pool)
        y.backward(grad.to(dtype_))
        results[name] = (y, leaves, stats)
    (y, leaves, stats), (y_t, leaves_t, stats_t), (y_o, leaves_o, stats_o) = results.values()
    assert_within_rule(y, y_t, y_o, dtype)
    for got, want, ref in zip(stats, stats_t, stats_o, strict=True):
        assert_within_rule(got, want, ref, dtype)
    if dtype != torch.float32:
        for key in ("x", "weight", "gamma", "beta"):
            assert_within_rule(leaves[key].grad, leaves_t[key].grad, leaves_o[key].grad, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", VGG16_LAYERS, ids=lambda s: "C{}K{}H{}pool{}".format(*s))
def test_gpu_frozen_block_input_gradient_matches_cudnn(layer, dtype, monkeypatch):
    """A frozen block's output, tapped activation (before a pool) and input gradient at batch 8
    against cuDNN's ops in the same dtype and in float64."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    c, k, h, pool = layer
    x, weight, scale, shift, _ = _folded_case((GPU_BATCH, c, k, h, h, 3, pool),
                                             torch.device("cuda"), dtype)
    grads = [torch.randn(t.shape, device="cuda")
             for t in _folded_reference(x, weight, scale, shift, pool, pool)]
    results = []
    for dtype_, fn in ((dtype, "ours"), (dtype, "cudnn"), (torch.float64, "oracle")):
        leaf = x.detach().to(dtype_).clone().requires_grad_(True)
        if fn == "ours":
            out = ops.conv_bn_relu_infer(leaf, weight, scale, shift, pool=pool, activation=pool,
                                         backend="triton")
            outs = out if isinstance(out, tuple) else (out,)
        else:
            wide = torch.float64 if dtype_ == torch.float64 else torch.float32
            outs = _folded_reference(leaf, weight.to(dtype_), scale.to(wide), shift.to(wide),
                                     pool, pool)
        torch.autograd.backward(outs, [g.to(dtype_) for g in grads])
        results.append((outs, leaf.grad))
    (outs, grad_x), (outs_t, grad_t), (outs_o, grad_o) = results
    for got, want, oracle in zip(outs, outs_t, outs_o, strict=True):
        assert_within_rule(got, want, oracle, dtype)
    if dtype != torch.float32:
        assert_within_rule(grad_x, grad_t, grad_o, dtype)


@pytest.mark.gpu
def test_gpu_training_step_runs_under_cuda_graphs():
    """torch.compile(mode="reduce-overhead") of a train-mode fused network (CUDA graphs over
    the Triton ops): the same loss and gradients as the eager fused network, over steps."""
    torch.manual_seed(0)
    model = _small_vgg("triton").cuda().train()
    twin = _small_vgg("triton").cuda().train()
    twin.load_state_dict(model.state_dict())
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        x = torch.randn(4, 3, 16, 16, device="cuda")
        for m in (model, twin):
            m.zero_grad(set_to_none=True)
        loss = compiled(x).square().sum()
        loss.backward()
        want = twin(x).square().sum()
        want.backward()
        assert relative_error(loss, want) < 1e-4
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            assert relative_error(a.grad, b.grad) < 1e-3
    torch._dynamo.reset()


def test_activation_checkpointing_over_fused_blocks(device, large_interpreter_blocks):
    """torch.utils.checkpoint over a fused training network: the gradients of the network
    without checkpointing (the running statistics are updated twice, as with PyTorch's BN)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = _small_vgg("triton").to(device).train()
    twin = _small_vgg("triton").to(device).train()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16, device=device)
    checkpoint(model, x, use_reentrant=False).square().sum().backward()
    twin(x).square().sum().backward()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert relative_error(a.grad, b.grad) < 1e-4
