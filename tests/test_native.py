"""The native backend (vgg_kernels._C): C++ CPU kernels against the float64 oracle, the training
ops and their autograd glue against the reference backend, input checks, torch.compile through
the TORCH_LIBRARY registration, and (marked gpu) the CUDA kernels against cuDNN."""

from __future__ import annotations

import os
import re
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ODD_SHAPE_IDS,
    ODD_SHAPES,
    assert_within_rule,
    error_report,
    relative_error,
)

import vgg_kernels
from vgg_kernels import FusedConvBNReLU, FusedVGG, ops
from vgg_kernels import backends as registry
from vgg_kernels.backends import native
from vgg_kernels.backends.reference import (
    bn_pre_reference,
    bn_relu_backward_reference,
    bn_relu_pool_reference,
    conv_bn_relu_infer_reference,
    conv_bn_stats_reference,
)

CPU = torch.device("cpu")

SHAPES, SHAPE_IDS = ODD_SHAPES, ODD_SHAPE_IDS


def _native_reason(device: torch.device = CPU, dtype: torch.dtype = torch.float32,
                   op: str = "conv_bn_relu_infer") -> str | None:
    return native.BACKEND.unavailable_reason(device, dtype, op)


@pytest.fixture(params=["direct", "winograd", "winograd4"])
def algorithm(request, monkeypatch):
    monkeypatch.setenv("VGG_KERNELS_CPU_CONV", request.param)
    return request.param


def _conv_inputs(n, c, k, h, w, r, dtype=torch.float32, device=CPU):
    x = torch.randn(n, c, h, w, device=device).to(dtype).contiguous(
        memory_format=torch.channels_last)
    weight = (torch.randn(k, c, r, r, device=device) / (c * r * r) ** 0.5).to(dtype)
    scale = torch.rand(k, device=device) + 0.5
    shift = torch.randn(k, device=device) * 0.5
    return x, weight, scale, shift


def _bn_inputs(k, device=CPU):
    mean = torch.randn(k, device=device) * 0.2
    invstd = torch.rand(k, device=device) + 0.5
    gamma = torch.rand(k, device=device) + 0.5
    beta = torch.randn(k, device=device) * 0.3
    return mean, invstd, gamma, beta


def _f64(*tensors):
    return [t.double() if t is not None else None for t in tensors]


# -- CPU inference kernel ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_cpu_infer_matches_oracle(shape, algorithm, native_cpu, poison_outputs):
    n, c, k, h, w, r, pool = shape
    x, weight, scale, shift = _conv_inputs(n, c, k, h, w, r)
    y = native_cpu.conv_bn_relu_infer(x, weight, scale, shift, pool)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    oracle = conv_bn_relu_infer_reference(*_f64(x, weight, scale, shift), pool)
    torch_result = conv_bn_relu_infer_reference(x, weight, scale, shift, pool)
    assert_within_rule(y, torch_result, oracle, torch.float32)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[6], SHAPES[7]],
                         ids=lambda s: f"C{s[1]}K{s[2]}")
def test_cpu_infer_every_instruction_set(shape, isa, algorithm, native_cpu, monkeypatch,
                                         poison_outputs):
    monkeypatch.setenv("VGG_KERNELS_CPU_ISA", isa)
    n, c, k, h, w, r, pool = shape
    x, weight, scale, shift = _conv_inputs(n, c, k, h, w, r)
    try:
        y = native_cpu.conv_bn_relu_infer(x, weight, scale, shift, pool)
    except RuntimeError as error:
        if "does not have" not in str(error):
            raise
        pytest.skip(f"this CPU or build has no {isa} kernels")
    oracle = conv_bn_relu_infer_reference(*_f64(x, weight, scale, shift), pool)
    assert_within_rule(y, conv_bn_relu_infer_reference(x, weight, scale, shift, pool), oracle,
                       torch.float32)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_cpu_infer_accepts_nchw_and_strided_views(memory_format, native_cpu):
    x, weight, scale, shift = _conv_inputs(2, 5, 6, 8, 10, 3)
    x = x.contiguous(memory_format=memory_format)[:, :, 1:, ::2]
    weight = weight.transpose(2, 3)  # a non-contiguous weight too
    y = native_cpu.conv_bn_relu_infer(x, weight, scale, shift, True)
    oracle = conv_bn_relu_infer_reference(*_f64(x, weight, scale, shift), True)
    assert_within_rule(y, conv_bn_relu_infer_reference(x, weight, scale, shift, True), oracle,
                       torch.float32)


def test_cpu_infer_empty_batch(native_cpu):
    x, weight, scale, shift = _conv_inputs(1, 3, 4, 6, 6, 3)
    y = native_cpu.conv_bn_relu_infer(x[:0], weight, scale, shift, True)
    assert y.shape == (0, 4, 3, 3)


def test_fused_vgg_eval_runs_native_by_default(native_cpu, poison_outputs):
    model = FusedVGG("A", num_classes=10).eval()
    reference = FusedVGG("A", num_classes=10, backend="reference").eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert registry.resolve_backend("auto", CPU, torch.float32, "conv_bn_relu_infer").name == \
        "native"
    with torch.no_grad():
        got, want = model(x), reference(x)
        oracle = reference.double()(x.double())
    assert_within_rule(got, want, oracle, torch.float32)


# -- CPU training ops ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_cpu_conv_bn_stats_matches_oracle(shape, with_bias, algorithm, native_cpu,
                                          poison_outputs):
    n, c, k, h, w, r, _ = shape
    x, weight, _, _ = _conv_inputs(n, c, k, h, w, r)
    bias = torch.randn(k) if with_bias else None
    z, mean, var = native_cpu.conv_bn_stats(x, weight, bias)
    assert z.is_contiguous(memory_format=torch.channels_last)
    assert mean.dtype == var.dtype == torch.float64
    oracle = conv_bn_stats_reference(*_f64(x, weight, bias))
    torch_result = conv_bn_stats_reference(x, weight, bias)
    for got, want, ref in zip((z, mean, var), torch_result, oracle, strict=True):
        assert_within_rule(got, want, ref, torch.float32)


@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("n, k, h, w", [(2, 5, 7, 9), (1, 70, 4, 4), (3, 3, 5, 2)])
def test_cpu_bn_relu_pool_and_backward_match_oracle(n, k, h, w, pool, native_cpu,
                                                    poison_outputs):
    z = torch.randn(n, k, h, w).contiguous(memory_format=torch.channels_last)
    mean, invstd, gamma, beta = _bn_inputs(k)
    scale = gamma * invstd
    y = native_cpu.bn_relu_pool(z, mean, scale, beta, pool)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_within_rule(y, bn_relu_pool_reference(z, mean, scale, beta, pool),
                       bn_relu_pool_reference(*_f64(z, mean, scale, beta), pool), torch.float32)
    grad_y = torch.randn_like(y)
    got = native_cpu.bn_relu_backward(grad_y, z, mean, invstd, scale, beta, pool)
    want = bn_relu_backward_reference(grad_y, z, mean, invstd, scale, beta, pool)
    oracle = bn_relu_backward_reference(*_f64(grad_y, z, mean, invstd, scale, beta), pool)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for g, t, o in zip(got, want, oracle, strict=True):
        assert_within_rule(g, t, o, torch.float32)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[4], SHAPES[5], SHAPES[6]],
                         ids=[SHAPE_IDS[i] for i in (0, 2, 4, 5, 6)])
def test_cpu_training_block_matches_oracle(shape, native_cpu):
    """ops._train_on_backend on native vs the reference backend in fp32, both vs float64:
    output, every gradient, and the running statistics."""
    n, c, k, h, w, r, pool = shape
    x, weight, _, _ = _conv_inputs(n, c, k, h, w, r)
    base = {"x": x, "weight": weight, "bias": torch.randn(k) * 0.1,
            "gamma": torch.rand(k) + 0.5, "beta": torch.randn(k) * 0.2}
    stats0 = (torch.randn(k) * 0.1, torch.rand(k) + 0.5)

    def run(backend, dtype):
        leaves = {key: v.to(dtype).clone().requires_grad_(True) for key, v in base.items()}
        stats = [s.to(dtype).clone() for s in stats0]
        y = ops._train_on_backend(backend, leaves["x"], leaves["weight"], leaves["bias"],
                                  leaves["gamma"], leaves["beta"], *stats, 0.1, 1e-5, pool)
        y.backward(grad.to(dtype))
        return y, leaves, stats

    reference = registry.get_backend("reference")
    grad = torch.randn(n, k, h // 2 if pool else h, w // 2 if pool else w)
    y, leaves, stats = run(native_cpu, torch.float32)
    y_t, leaves_t, stats_t = run(reference, torch.float32)
    y_o, leaves_o, stats_o = run(reference, torch.float64)
    assert_within_rule(y, y_t, y_o, torch.float32)
    for key in ("x", "weight", "gamma", "beta"):
        assert_within_rule(leaves[key].grad, leaves_t[key].grad, leaves_o[key].grad,
                           torch.float32)
    # d loss / d conv bias is exactly 0 through train-mode BN: rounding noise on both sides
    assert leaves["bias"].grad.abs().max() < 1e-4
    for got, want, ref in zip(stats, stats_t, stats_o, strict=True):
        assert_within_rule(got, want, ref, torch.float32)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[5] == 3],
                         ids=[i for s, i in zip(SHAPES, SHAPE_IDS, strict=True) if s[5] == 3])
def test_cpu_winograd_weight_gradient_matches_oracle(shape, native_cpu):
    """The Winograd F(3x3, 2x2) weight gradient (every 3x3 layer with 8+ input channels on the
    CPU), odd H and W included, against F.conv2d's weight gradient in fp32 and float64."""
    n, c, k, h, w, _, _ = shape
    x = torch.relu(torch.randn(n, c, h, w)).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(n, k, h, w).contiguous(memory_format=torch.channels_last)
    got = torch.ops.vgg_kernels.conv_wgrad(grad, x)
    want = torch.nn.grad.conv2d_weight(x, (k, c, 3, 3), grad, padding=1)
    oracle = torch.nn.grad.conv2d_weight(x.double(), (k, c, 3, 3), grad.double(), padding=1)
    assert got.shape == (k, c, 3, 3) and got.is_contiguous()
    assert_within_rule(got, want, oracle, torch.float32)


@pytest.mark.parametrize("where", ["x", "grad"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_cpu_winograd_weight_gradient_keeps_non_finite_values(where, value, native_cpu):
    """A transform would turn an Inf into Inf - Inf = NaN: such inputs take ATen's sums, which
    give exactly F.conv2d's infinities and NaNs."""
    x = torch.randn(2, 9, 6, 7).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 5, 6, 7).contiguous(memory_format=torch.channels_last)
    (x if where == "x" else grad)[1, 3, 2, 4] = value
    got = torch.ops.vgg_kernels.conv_wgrad(grad, x)
    want = torch.nn.grad.conv2d_weight(x, (5, 9, 3, 3), grad, padding=1)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))


def test_cpu_fused_block_and_model_train_mode_match_reference(native_cpu):
    block = FusedConvBNReLU(5, 7, pool=True, backend="native")
    twin = FusedConvBNReLU(5, 7, pool=True, backend="reference")
    twin.load_state_dict(block.state_dict())
    x = torch.randn(3, 5, 9, 11)
    x2 = x.clone().requires_grad_(True)
    x = x.requires_grad_(True)
    y, y_twin = block(x), twin(x2)
    assert relative_error(y, y_twin) < 1e-5, error_report(y, y_twin)
    y.square().sum().backward()
    y_twin.square().sum().backward()
    for got, want in ((x.grad, x2.grad), (block.conv.weight.grad, twin.conv.weight.grad),
                      (block.bn.weight.grad, twin.bn.weight.grad),
                      (block.bn.running_var, twin.bn.running_var)):
        assert relative_error(got, want) < 1e-5, error_report(got, want)

    model = FusedVGG("A", num_classes=10, backend="native", dropout=0.0)
    twin_model = FusedVGG("A", num_classes=10, backend="reference", dropout=0.0)
    twin_model.load_state_dict(model.state_dict())
    inputs = torch.randn(2, 3, 32, 32)
    out, out_twin = model(inputs), twin_model(inputs)
    assert relative_error(out, out_twin) < 1e-5, error_report(out, out_twin)
    out.square().sum().backward()
    out_twin.square().sum().backward()
    for index in (0, 4):  # the first conv, and one whose input is recomputed from a z
        got = model.features[index].weight.grad
        want = twin_model.features[index].weight.grad
        assert relative_error(got, want) < 1e-4, error_report(got, want)


# -- input checks --------------------------------------------------------------------------------

BAD_CALLS = {  # name -> (call on (x, weight, scale, shift) of a C=3, K=4, 6x6 problem, message)
    "x 3-D": (lambda v, x, w, s, b: v.conv_bn_relu_infer(x[0], w, s, b, False),
              "x must be a 4-D tensor"),
    "x channels": (lambda v, x, w, s, b: v.conv_bn_relu_infer(x[:, :2], w, s, b, False),
                   "x must have 3 channels"),
    "kernel 2x2": (lambda v, x, w, s, b: v.conv_bn_relu_infer(x, w[..., :2, :2], s, b, False),
                   "weight must have kernel size 3x3 or 1x1"),
    "weight 3-D": (lambda v, x, w, s, b: v.conv_bn_relu_infer(x, w[0], s, b, False),
                   "weight must be a 4-D tensor"),
    "scale length": (lambda v, x, w, s, b: v.conv_bn_relu_infer(x, w, s[:3], b, False),
                     r"scale must have shape \(4,\)"),
    "shift 2-D": (lambda v, x, w, s, b: v.conv_bn_relu_infer(x, w, s, b[:, None], False),
                  r"shift must have shape \(4,\)"),
    "x fp16 on CPU": (lambda v, x, w, s, b: v.conv_bn_relu_infer(x.half(), w, s, b, False),
                      "x must be float32 on the CPU"),
    "pool 1x6": (lambda v, x, w, s, b: v.conv_bn_relu_infer(x[:, :, :1], w, s, b, True),
                 "x must be at least 2x2"),
    "bias length": (lambda v, x, w, s, b: v.conv_bn_stats(x, w, torch.zeros(5)),
                    r"bias must have shape \(4,\)"),
    "z 3-D": (lambda v, x, w, s, b: v.bn_relu_pool(x[0], s[:3], s[:3], b[:3], False),
              "z must be a 4-D tensor"),
    "bn mean length": (lambda v, x, w, s, b: v.bn_relu_pool(x, s, s[:3], b[:3], False),
                       r"mean must have shape \(3,\)"),
    "bn scale length": (lambda v, x, w, s, b: v.bn_relu_pool(x, s[:3], s, b[:3], False),
                        r"scale must have shape \(3,\)"),
    "grad_y shape": (lambda v, x, w, s, b: v.bn_relu_backward(
        torch.zeros(1, 3, 6, 6), x, *(torch.ones(3),) * 4, True), "grad_y must have shape"),
    "mean length": (lambda v, x, w, s, b: v.bn_relu_backward(
        torch.zeros(1, 3, 3, 3), x, torch.ones(2), *(torch.ones(3),) * 3, True),
        r"mean must have shape \(3,\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_inputs_name_the_argument(case, native_cpu):
    call, match = BAD_CALLS[case]
    x, weight, scale, shift = _conv_inputs(1, 3, 4, 6, 6, 3)
    with pytest.raises(RuntimeError, match=match):
        call(torch.ops.vgg_kernels, x, weight, scale, shift)


def test_bad_environment_knobs_are_named(native_cpu, monkeypatch):
    x, weight, scale, shift = _conv_inputs(1, 3, 4, 6, 6, 3)
    monkeypatch.setenv("VGG_KERNELS_CPU_CONV", "fft")
    with pytest.raises(RuntimeError, match="VGG_KERNELS_CPU_CONV must be"):
        native_cpu.conv_bn_relu_infer(x, weight, scale, shift, False)
    monkeypatch.setenv("VGG_KERNELS_CPU_CONV", "auto")
    monkeypatch.setenv("VGG_KERNELS_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="VGG_KERNELS_CPU_ISA must be"):
        native_cpu.conv_bn_relu_infer(x, weight, scale, shift, False)


def test_unavailable_reasons_say_why(native_cpu):
    assert "supports float32 on CPU" in _native_reason(CPU, torch.float16)
    assert _native_reason(CPU, torch.float32, "conv_bn_relu_train") is None
    assert "has no" in _native_reason(CPU, torch.float32, "winograd")


def test_missing_extension_falls_back_to_reference_with_one_warning(monkeypatch):
    """Without a prebuilt extension and with the JIT build turned off, native is unavailable and
    names the reason; 'auto' then runs reference with a single warning."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setitem(sys.modules, "vgg_kernels._C", None)  # makes the import fail
    monkeypatch.delattr(vgg_kernels, "_C", raising=False)
    monkeypatch.setenv("VGG_KERNELS_JIT", "0")
    monkeypatch.setattr(registry, "_WARNED", set())
    reason = _native_reason()
    assert reason is not None and "VGG_KERNELS_JIT=0" in reason
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            name = registry.resolve_backend("auto", CPU, torch.float32, "conv_bn_relu_infer").name
            assert name == "reference"
    fallbacks = [w for w in record if issubclass(w.category, registry.BackendFallbackWarning)]
    assert len(fallbacks) == 1 and "'native'" in str(fallbacks[0].message)


# -- torch.compile -------------------------------------------------------------------------------

def test_compile_fullgraph_eval_through_native_registration(native_cpu):
    torch._dynamo.reset()
    model = FusedVGG("A", num_classes=10, backend="native").eval()
    x = torch.randn(2, 3, 32, 32)
    traced_ops: set[str] = set()

    def recording_backend(gm, example_inputs):
        traced_ops.update(str(node.target) for node in gm.graph.nodes
                          if node.op == "call_function")
        return gm.forward

    with torch.no_grad():
        expected = model(x)
        got = torch.compile(model, fullgraph=True, backend=recording_backend)(x)
        torch._dynamo.reset()
        got_aot = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert any("vgg_kernels.conv_bn_relu_infer" in op for op in traced_ops), traced_ops
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_aot, expected, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def _opcheck_cases(device: torch.device, dtype: torch.dtype):
    """Each registered op with inputs of an odd shape (pool on odd sizes, a conv bias)."""
    x, weight, scale, shift = _conv_inputs(2, 5, 8, 7, 9, 3, dtype, device)
    z, mean, _ = torch.ops.vgg_kernels.conv_bn_stats(x, weight, shift)
    grad_y = torch.randn(2, 8, 3, 4, device=device).to(dtype).contiguous(
        memory_format=torch.channels_last)
    invstd = torch.rand(8, device=device) + 0.5
    return {
        "conv_bn_relu_infer": (x, weight, scale, shift, True),
        "conv_bn_stats": (x, weight, shift),
        "bn_relu_pool": (z, mean, scale, shift, True),
        "bn_relu_backward": (grad_y, z, mean, invstd, scale, shift, True),
        "conv_wgrad": (z, x),
        "linear": (torch.randn(3, 37, device=device), torch.randn(11, 37, device=device),
                   torch.randn(11, device=device)),
        "conv_bn_relu_infer_packed": lambda: (x, weight, *_packed(x, weight, True), scale,
                                              shift, True),
    }


def _packed(x, weight, pool):
    layout = torch.ops.vgg_kernels.conv_weight_layout(x, weight, pool)
    return torch.ops.vgg_kernels.pack_conv_weight(weight, layout), layout


def _opcheck(device: torch.device, dtype: torch.dtype, name: str) -> None:
    args = _opcheck_cases(device, dtype)[name]
    if callable(args):
        args = args()
    torch.library.opcheck(getattr(torch.ops.vgg_kernels, name).default, args)


@pytest.mark.parametrize("name", ["conv_bn_relu_infer", "conv_bn_stats", "bn_relu_pool",
                                  "bn_relu_backward", "conv_wgrad", "linear",
                                  "conv_bn_relu_infer_packed"])
def test_cpu_ops_pass_opcheck(name, native_cpu):
    """torch.library.opcheck: outputs alias neither inputs nor each other, as the schemas say;
    the fake kernels give the real outputs' shapes, dtypes and strides; AOT dispatch traces."""
    _opcheck(CPU, torch.float32, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["conv_bn_relu_infer", "conv_bn_stats", "bn_relu_pool",
                                  "bn_relu_backward"])
def test_cuda_ops_pass_opcheck(name, dtype, native_cuda):
    _opcheck(torch.device("cuda"), dtype, name)


# -- CUDA kernels against cuDNN (run by benchmarks/device_native.sh) -----------------------------

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# VGG16's distinct conv layers at 224x224: (C, K, H, pool)
VGG16_LAYERS = [(3, 64, 224, False), (64, 64, 224, True), (64, 128, 112, False),
                (128, 128, 112, True), (128, 256, 56, False), (256, 256, 56, True),
                (256, 512, 28, False), (512, 512, 28, True), (512, 512, 14, False),
                (512, 512, 14, True)]
GPU_BATCH = 8


@pytest.fixture
def native_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reason = _native_reason(torch.device("cuda"), torch.float16)
    if reason is not None:
        pytest.skip(f"the native backend cannot run on this GPU: {reason}")
    return native.BACKEND


def _round_tf32(t: torch.Tensor) -> torch.Tensor:
    """t rounded to tf32's 10 mantissa bits (to nearest, ties to even): what tensor cores read."""
    bits = t.float().contiguous().view(torch.int32).to(torch.int64)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.to(torch.int32).view(torch.float32).reshape(t.shape)


def _torch_error_reference(dtype, torch_result, tf32_result, oracle):
    """PyTorch's own result to measure the error rule against. For fp32 with allow_tf32, cuDNN
    may or may not pick a tf32 algorithm for a given shape: take the looser of its result and an
    exact computation on tf32-rounded operands (the error tf32 mode permits)."""
    if dtype != torch.float32 or not torch.backends.cudnn.allow_tf32:
        return torch_result
    if relative_error(tf32_result, oracle) > relative_error(torch_result, oracle):
        return tf32_result
    return torch_result


def _cudnn_block(x, weight, bias, gamma, beta, mean, var, pool, training):
    """cuDNN conv + batch_norm + relu (+ max_pool2d), PyTorch's eager ops."""
    y = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2)
    y = torch.relu(F.batch_norm(y, mean, var, gamma, beta, training, 0.1, 1e-5))
    return F.max_pool2d(y, 2) if pool else y


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("layer", VGG16_LAYERS, ids=lambda s: "C{}K{}H{}pool{}".format(*s))
def test_cuda_infer_matches_cudnn(layer, dtype, native_cuda):
    c, k, h, pool = layer
    dev = torch.device("cuda")
    x, weight, _, _ = _conv_inputs(GPU_BATCH, c, k, h, h, 3, dtype, dev)
    bias, (mean, invstd, gamma, beta) = torch.randn(k, device=dev) * 0.1, _bn_inputs(k, dev)
    var = invstd.pow(-2) - 1e-5
    scale, shift = ops.fold_bn(bias, mean, var, gamma, beta, 1e-5, k, dev)
    y = native_cuda.conv_bn_relu_infer(x, weight, scale, shift, pool)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    # cuDNN's mixed-precision BN: dtype activations, fp32 parameters and statistics
    torch_result = _cudnn_block(x, weight, bias.to(dtype), gamma, beta, mean, var, pool, False)
    oracle = _cudnn_block(*_f64(x, weight, bias, gamma, beta, mean, var), pool, False)
    tf32_result = _cudnn_block(*_f64(_round_tf32(x), _round_tf32(weight), bias, gamma, beta, mean,
                                     var), pool, False).float()
    assert_within_rule(y, _torch_error_reference(dtype, torch_result, tf32_result, oracle), oracle,
                       dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("layer", [VGG16_LAYERS[0], VGG16_LAYERS[3], VGG16_LAYERS[8]],
                         ids=lambda s: "C{}K{}H{}pool{}".format(*s))
def test_cuda_infer_fp32_without_tf32(layer, native_cuda, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    c, k, h, pool = layer
    dev = torch.device("cuda")
    x, weight, scale, shift = _conv_inputs(GPU_BATCH, c, k, h, h, 3, torch.float32, dev)
    y = native_cuda.conv_bn_relu_infer(x, weight, scale, shift, pool)
    oracle = conv_bn_relu_infer_reference(*_f64(x, weight, scale, shift), pool)
    assert_within_rule(y, conv_bn_relu_infer_reference(x, weight, scale, shift, pool), oracle,
                       torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_cuda_infer_odd_shapes(shape, dtype, native_cuda):
    n, c, k, h, w, r, pool = shape
    x, weight, scale, shift = _conv_inputs(n, c, k, h, w, r, dtype, torch.device("cuda"))
    y = native_cuda.conv_bn_relu_infer(x, weight, scale, shift, pool)
    oracle = conv_bn_relu_infer_reference(*_f64(x, weight, scale, shift), pool)
    tf32_result = conv_bn_relu_infer_reference(
        *_f64(_round_tf32(x), _round_tf32(weight), scale, shift), pool).float()
    torch_result = conv_bn_relu_infer_reference(x, weight, scale, shift, pool)
    assert_within_rule(y, _torch_error_reference(dtype, torch_result, tf32_result, oracle),
                       oracle, dtype)


def _wgmma_missing() -> str | None:
    """Why the wgmma kernels cannot run here, or None."""
    if torch.cuda.get_device_capability() != (9, 0):
        return "the wgmma kernel runs on compute capability 9.0 GPUs"
    if "90" not in native.build_info().get("cuda", ""):
        return "the extension was not built for compute capability 9.0"
    return None


@pytest.fixture
def native_wgmma(native_cuda, monkeypatch):
    """The native backend with its Hopper kernel switched on (VGG_KERNELS_NATIVE_WGMMA=1)."""
    reason = _wgmma_missing()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("VGG_KERNELS_NATIVE_WGMMA", "1")
    return native_cuda


@pytest.mark.gpu
def test_cuda_wgmma_availability_follows_the_build(native_wgmma):
    """device_native.sh builds for 9.0a, so on an H100/H200 the Hopper kernel must be there."""
    assert native.cuda_wgmma_available()


# (N, C, K, H, W, R, pool): C and K multiples of 8 (the wgmma kernel's domain) or C below 8
# (padded to 8), tiles cut at every edge: K not a multiple of 128, rows not a multiple of 128,
# odd H and W with pooling.
WGMMA_SHAPES = [(2, 64, 72, 9, 11, 3, True), (1, 24, 40, 5, 7, 1, False),
                (3, 136, 264, 7, 6, 3, True), (1, 8, 8, 1, 1, 3, False),
                (2, 520, 136, 6, 5, 3, False), (2, 3, 64, 9, 11, 3, True),
                (1, 5, 16, 6, 5, 3, False)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layer", VGG16_LAYERS, ids=lambda s: "C{}K{}H{}pool{}".format(*s))
def test_cuda_wgmma_infer_matches_cudnn(layer, dtype, native_wgmma):
    test_cuda_infer_matches_cudnn(layer, dtype, native_wgmma)


@pytest.mark.gpu
@pytest.mark.parametrize("tile", ["auto", "64", "128", "256"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", WGMMA_SHAPES,
                         ids=["N{}C{}K{}H{}W{}R{}pool{}".format(*s) for s in WGMMA_SHAPES])
def test_cuda_wgmma_infer_odd_shapes(shape, dtype, tile, native_wgmma, monkeypatch):
    """Every channel tile (64, 128, 256 output channels per CTA, or the kernel's choice)."""
    if tile != "auto":
        monkeypatch.setenv("VGG_KERNELS_NATIVE_WGMMA_TILE", tile)
    test_cuda_infer_odd_shapes(shape, dtype, native_wgmma)


# (N, C, K, H, W, R, pool) for the halo kernel: 3x3, C a multiple of 64; output tiles cut at
# every edge (H, W not multiples of 16 and 8, a 1x1 image, odd H and W with pooling), K not a
# multiple of the channel tile, several channel blocks, several images; the last has more
# (pixel tile, 64-channel block) tiles than an H100 has SMs, so the persistent C == 64 kernel
# of =halo-t walks several tiles per CTA and reloads its weights between channel blocks.
HALO_SHAPES = [(2, 64, 72, 9, 11, 3, True), (1, 128, 40, 17, 9, 3, False),
               (3, 64, 264, 7, 6, 3, True), (1, 64, 8, 1, 1, 3, False),
               (2, 192, 136, 19, 23, 3, False), (1, 64, 64, 33, 16, 3, True),
               (6, 64, 136, 40, 36, 3, True)]


@pytest.fixture(params=["halo", "halo-t"])
def native_wgmma_halo(request, native_wgmma, monkeypatch):
    """The native backend with VGG_KERNELS_NATIVE_WGMMA=halo (pixels as the MMA's M operand)
    and =halo-t (pixels as N)."""
    monkeypatch.setenv("VGG_KERNELS_NATIVE_WGMMA", request.param)
    return native_wgmma


@pytest.mark.gpu
@pytest.mark.parametrize("layer", VGG16_LAYERS, ids=lambda s: "C{}K{}H{}pool{}".format(*s))
def test_cuda_wgmma_halo_infer_matches_cudnn(layer, native_wgmma_halo):
    test_cuda_infer_matches_cudnn(layer, torch.bfloat16, native_wgmma_halo)


@pytest.mark.gpu
@pytest.mark.parametrize("tile", ["auto", "64", "128", "256"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", HALO_SHAPES,
                         ids=["N{}C{}K{}H{}W{}R{}pool{}".format(*s) for s in HALO_SHAPES])
def test_cuda_wgmma_halo_infer_odd_shapes(shape, dtype, tile, native_wgmma_halo, monkeypatch):
    """Every channel tile of the pixels-as-M kernel; the pixels-as-N one has 64 channels per CTA
    (the tile switch does not apply to it)."""
    if tile != "auto":
        if os.environ["VGG_KERNELS_NATIVE_WGMMA"] == "halo-t":
            pytest.skip("halo-t has one channel tile")
        monkeypatch.setenv("VGG_KERNELS_NATIVE_WGMMA_TILE", tile)
    test_cuda_infer_odd_shapes(shape, dtype, native_wgmma_halo)


def _past_2_31_elements(c: int, h: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A channels_last batch of c x h x h images whose input, or 64-channel output, has more than
    2**31 elements: n - 1 copies of one image, then another (so only two images need an
    oracle), and those two images."""
    if torch.cuda.get_device_properties(0).total_memory < 32 * 2**30:
        pytest.skip("needs 32 GiB of GPU memory")
    n = 2**31 // (max(c, 64) * h * h) + 2
    pair = torch.randn(2, c, h, h, device="cuda").to(dtype).contiguous(
        memory_format=torch.channels_last)
    big = torch.empty(n, c, h, h, device="cuda", dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    big[:-1].copy_(pair[:1].expand(n - 1, c, h, h))
    big[-1].copy_(pair[1])
    assert n * max(c, 64) * h * h > 2**31
    return big, pair


def _assert_copies_agree(t: torch.Tensor) -> None:
    """Images 1 .. n-2 of a result on _past_2_31_elements' batch equal image 0 (up to rounding:
    an offset that wraps at 2**31 reads or writes another image's data)."""
    for chunk in t[1:-1].split(64):
        gap = (chunk.float() - t[:1].float()).abs().amax()
        assert gap <= 1e-2 * t[0].float().abs().amax(), f"images differ by {gap.item():.3e}"


# (VGG_KERNELS_NATIVE_WGMMA, C, pool): every CUDA inference kernel (WMMA, the short-reduction
# kernel for C = 3, the plain wgmma kernel, halo, halo-t and its persistent C == 64 form) on a
# 224x224 batch past 2**31 input elements (C = 3: output elements); without the pool the output
# passes 2**31 elements as well. One test runs them in turn, so the GPU test shards never hold
# several of these batches at once.
BIG_BATCH_KERNELS = [("0", 3, False), ("0", 64, False), ("1", 64, True), ("halo", 64, False),
                     ("halo-t", 64, True), ("halo-t", 128, False)]


@pytest.mark.gpu
def test_cuda_infer_offsets_past_2_31_elements(native_cuda, poison_outputs, monkeypatch):
    """Off Hopper, the WMMA and short-reduction kernels only."""
    cases = [case for case in BIG_BATCH_KERNELS if case[0] == "0" or not _wgmma_missing()]
    failures = []
    for c in sorted({c for _, c, _ in cases}):
        big, pair = _past_2_31_elements(c, 224, torch.bfloat16)
        _, weight, scale, shift = _conv_inputs(1, c, 64, 1, 1, 3, torch.bfloat16,
                                               torch.device("cuda"))
        for mode, _, pool in [case for case in cases if case[1] == c]:
            monkeypatch.setenv("VGG_KERNELS_NATIVE_WGMMA", mode)
            y = native_cuda.conv_bn_relu_infer(big, weight, scale, shift, pool)
            oracle = conv_bn_relu_infer_reference(*_f64(pair, weight, scale, shift), pool)
            theirs = conv_bn_relu_infer_reference(pair, weight, scale, shift, pool)
            try:
                assert_within_rule(y[[0, -1]], theirs, oracle, torch.bfloat16)
                _assert_copies_agree(y)
            except AssertionError as error:
                failures.append(f"VGG_KERNELS_NATIVE_WGMMA={mode}, C={c}, pool={pool}: {error}")
            del y
        del big
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
def test_cuda_conv_bn_stats_offsets_past_2_31_elements(native_cuda, poison_outputs):
    """The training forward's conv output and its per-channel statistics past 2**31 elements."""
    big, pair = _past_2_31_elements(64, 224, torch.bfloat16)
    _, weight, _, _ = _conv_inputs(1, 64, 64, 1, 1, 3, torch.bfloat16, torch.device("cuda"))
    bias = torch.randn(64, device="cuda") * 0.1
    z, mean, var = native_cuda.conv_bn_stats(big, weight, bias)
    n = big.shape[0]

    def expected(x, w, b):
        """z of the pair, and the batch's mean and variance: n - 1 copies of image 0, then image
        1, each image's statistics merged with Chan's formula (equal counts) in float64."""
        z0, mean0, var0 = conv_bn_stats_reference(x[:1], w, b)
        z1, mean1, var1 = conv_bn_stats_reference(x[1:], w, b)
        mean0, var0, mean1, var1 = _f64(mean0, var0, mean1, var1)
        merged = ((n - 1) * mean0 + mean1) / n
        spread = (n - 1) * (var0 + (mean0 - merged).square()) + var1 + (mean1 - merged).square()
        return torch.cat([z0, z1]), merged, spread / n

    oracle = expected(*_f64(pair, weight, bias))
    theirs = expected(pair, weight, bias)
    assert mean.dtype == var.dtype == torch.float64
    for got, t, o in zip((z[[0, -1]], mean, var), theirs, oracle, strict=True):
        assert_within_rule(got, t, o, torch.bfloat16)
    _assert_copies_agree(z)


def _cuda_kernel_names(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [event.name for event in prof.events()
            if event.device_type == torch.autograd.DeviceType.CUDA]


# the kernel each switch value runs a layer on: demangled (kernel<T, 64, true, ...>) or mangled
# (...kernelI...Li64ELb1E...) names; the halo kernel's third template argument is pixels-as-N
_HALO_M = r"conv_wgmma_halo_kernel(<[^,]+, \d+, false|I\w+?Li\d+ELb0E)"
_HALO_N = r"conv_wgmma_halo_kernel(<[^,]+, 64, true|I\w+?Li64ELb1E)"
_RESIDENT = r"conv_wgmma_halo_resident_kernel[<I]"
_PLAIN = r"conv_wgmma_kernel[<I]"
_NARROW = r"conv_narrow_kernel[<I]"
_WMMA = r"conv_bn_relu_kernel[<I]"


@pytest.mark.gpu
@pytest.mark.parametrize("mode, c, r, kernel", [
    ("halo", 64, 3, _HALO_M), ("halo-t", 128, 3, _HALO_N), ("halo-t", 64, 3, _RESIDENT),
    ("halo", 24, 3, _PLAIN), ("halo-t", 24, 3, _PLAIN), ("halo", 64, 1, _PLAIN),
    ("1", 64, 3, _PLAIN)],
    ids=["halo-C64R3", "halo-t-C128R3", "halo-t-C64R3", "halo-C24R3", "halo-t-C24R3",
         "halo-C64R1", "1-C64R3"])
def test_cuda_wgmma_switch_picks_the_kernel(mode, c, r, kernel, native_wgmma, monkeypatch):
    """=halo and =halo-t run 3x3 layers with C % 64 == 0 on the halo kernel in their
    orientation (=halo-t with C == 64 on its persistent weight-resident form), the rest on the
    other wgmma kernel; =1 never runs a halo kernel."""
    monkeypatch.setenv("VGG_KERNELS_NATIVE_WGMMA", mode)
    x, weight, scale, shift = _conv_inputs(2, c, 16, 12, 10, r, torch.bfloat16,
                                           torch.device("cuda"))
    names = _cuda_kernel_names(
        lambda: native_wgmma.conv_bn_relu_infer(x, weight, scale, shift, False))
    launched = [name for name in names if "conv_wgmma" in name]
    assert launched and all(re.search(kernel, name) for name in launched), names


# what each value of native.cuda_last_infer_kernel() launches
_KERNEL_NAMES = {"wmma": _WMMA, "narrow": _NARROW, "wgmma": _PLAIN, "halo": _HALO_M,
                 "halo-t": f"{_HALO_N}|{_RESIDENT}"}


@pytest.mark.gpu
@pytest.mark.parametrize("layer", [VGG16_LAYERS[0], VGG16_LAYERS[1], VGG16_LAYERS[2],
                                   VGG16_LAYERS[7]],
                         ids=lambda s: "C{}K{}H{}pool{}".format(*s))
def test_cuda_auto_keeps_a_correct_kernel(layer, native_cuda, monkeypatch):
    """VGG_KERNELS_NATIVE_WGMMA=auto: the first call per shape times every kernel that applies
    (and its result is right); later calls launch only the kept one."""
    monkeypatch.setenv("VGG_KERNELS_NATIVE_WGMMA", "auto")
    test_cuda_infer_matches_cudnn(layer, torch.bfloat16, native_cuda)
    kept = native.cuda_last_infer_kernel()
    allowed = {"wmma", "narrow"} | (set() if _wgmma_missing() else {"wgmma", "halo", "halo-t"})
    assert kept in allowed
    c, k, h, pool = layer
    x, weight, scale, shift = _conv_inputs(GPU_BATCH, c, k, h, h, 3, torch.bfloat16,
                                           torch.device("cuda"))
    names = _cuda_kernel_names(
        lambda: native_cuda.conv_bn_relu_infer(x, weight, scale, shift, pool))
    convs = [name for name in names if re.search("|".join(_KERNEL_NAMES.values()), name)]
    assert len(convs) == 1 and re.search(_KERNEL_NAMES[kept], convs[0]), (kept, names)
    assert native.cuda_last_infer_kernel() == kept


@pytest.mark.gpu
@pytest.mark.parametrize("variable, value, expected", [
    ("VGG_KERNELS_NATIVE_WGMMA", "yes", "must be 0, 1, halo, halo-t or auto"),
    ("VGG_KERNELS_NATIVE_WGMMA_TILE", "96", "must be 64, 128 or 256")],
    ids=["wgmma", "tile"])
def test_cuda_wgmma_switches_reject_other_values(variable, value, expected, native_wgmma,
                                                 monkeypatch):
    monkeypatch.setenv(variable, value)
    x, weight, scale, shift = _conv_inputs(1, 16, 16, 4, 4, 3, torch.bfloat16,
                                           torch.device("cuda"))
    with pytest.raises(RuntimeError, match=f"{variable} {expected}"):
        native_wgmma.conv_bn_relu_infer(x, weight, scale, shift, False)


# (N, C, K, H, W, R, pool) for the short-reduction kernel: 3x3, C from 1 to 7 (one to four
# 16-long reduction steps), K a multiple of 8 but not always of 64 (several channel blocks, the
# last one partial), tiles cut at every edge (H, W not multiples of 8 and 16, a 1x1 image, odd H
# and W with pooling); the last has more tiles than its persistent grid has CTAs on an H200, so
# CTAs walk several tiles.
NARROW_SHAPES = [(2, 3, 64, 9, 17, 3, False), (2, 3, 72, 11, 19, 3, True),
                 (1, 1, 8, 5, 3, 3, True), (1, 7, 16, 17, 18, 3, False),
                 (2, 5, 136, 8, 16, 3, True), (1, 2, 64, 1, 1, 3, False),
                 (3, 4, 24, 3, 33, 3, False), (1, 6, 8, 16, 15, 3, True),
                 (8, 3, 128, 100, 98, 3, False)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", NARROW_SHAPES,
                         ids=["N{}C{}K{}H{}W{}R{}pool{}".format(*s) for s in NARROW_SHAPES])
def test_cuda_narrow_infer_odd_shapes(shape, dtype, native_cuda, poison_outputs):
    test_cuda_infer_odd_shapes(shape, dtype, native_cuda)


@pytest.mark.gpu
@pytest.mark.parametrize("narrow, c, r, dtype, kernel", [
    ("", 3, 3, torch.bfloat16, _NARROW), ("1", 7, 3, torch.float16, _NARROW),
    ("0", 3, 3, torch.bfloat16, _WMMA), ("", 8, 3, torch.bfloat16, _WMMA),
    ("", 3, 1, torch.bfloat16, _WMMA), ("", 3, 3, torch.float32, _WMMA)],
    ids=["default-C3", "1-C7", "0-C3", "default-C8", "default-C3R1", "default-C3-fp32"])
def test_cuda_narrow_switch_picks_the_kernel(narrow, c, r, dtype, kernel, native_cuda,
                                            monkeypatch):
    """fp16/bf16 3x3 layers with at most 7 input channels run on the short-reduction kernel
    unless VGG_KERNELS_NATIVE_NARROW=0; the rest on the WMMA kernel (fp32: its tf32 form)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setenv("VGG_KERNELS_NATIVE_WGMMA", "0")
    monkeypatch.setenv("VGG_KERNELS_NATIVE_NARROW", narrow)
    x, weight, scale, shift = _conv_inputs(2, c, 16, 12, 10, r, dtype, torch.device("cuda"))
    names = _cuda_kernel_names(
        lambda: native_cuda.conv_bn_relu_infer(x, weight, scale, shift, False))
    launched = [name for name in names if re.search(f"{_NARROW}|{_WMMA}", name)]
    assert launched and all(re.search(kernel, name) for name in launched), names


@pytest.mark.gpu
def test_cuda_narrow_switch_rejects_other_values(native_cuda, monkeypatch):
    monkeypatch.setenv("VGG_KERNELS_NATIVE_NARROW", "yes")
    x, weight, scale, shift = _conv_inputs(1, 3, 16, 4, 4, 3, torch.bfloat16,
                                           torch.device("cuda"))
    with pytest.raises(RuntimeError, match="VGG_KERNELS_NATIVE_NARROW must be 0 or 1"):
        native_cuda.conv_bn_relu_infer(x, weight, scale, shift, False)


@pytest.mark.gpu
@pytest.mark.parametrize("layer", [VGG16_LAYERS[0], VGG16_LAYERS[4], VGG16_LAYERS[8]],
                         ids=lambda s: "C{}K{}H{}pool{}".format(*s))
def test_cuda_conv_bn_stats_tf32(layer, native_cuda, monkeypatch):
    """The training forward's conv on tensor cores in tf32 (the default for fp32)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    c, k, h, _ = layer
    x, weight, _, _ = _conv_inputs(GPU_BATCH, c, k, h, h, 3, torch.float32, torch.device("cuda"))
    bias = torch.randn(k, device="cuda") * 0.1
    got = native_cuda.conv_bn_stats(x, weight, bias)
    oracle = conv_bn_stats_reference(*_f64(x, weight, bias))
    tf32 = conv_bn_stats_reference(*_f64(_round_tf32(x), _round_tf32(weight), bias))
    theirs = conv_bn_stats_reference(x, weight, bias)
    for g, t, t32, o in zip(got, theirs, tf32, oracle, strict=True):
        assert_within_rule(g, _torch_error_reference(torch.float32, t, t32.float(), o), o,
                           torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("layer", VGG16_LAYERS, ids=lambda s: "C{}K{}H{}pool{}".format(*s))
def test_cuda_training_matches_cudnn(layer, dtype, native_cuda, monkeypatch):
    """Forward (conv_bn_stats + bn_relu_pool), backward (bn_relu_backward, then cuDNN dgrad and
    wgrad) and the running statistics, against cuDNN's conv + batch_norm + relu + max_pool2d.
    fp32 runs without tf32 (test_cuda_conv_bn_stats_tf32 covers that path), so both sides are
    full fp32 throughout.

    In fp32 the gradients are left to test_cuda_bn_relu_backward_matches_oracle: end to end, a
    pre-activation within rounding of 0 (or two near-equal values in a pooling window) takes the
    other side of the ReLU mask (or the other argmax) in any fp32 forward, and one such element
    moves an O(1) gradient. Seen on an H200: max error 1e-2 against the float64 oracle with a
    mean error of 1e-5 on 6 of 10 layers, while cuDNN happened to flip none. In fp16/bf16 the
    rounding of the gradients themselves dominates and the end-to-end rule is meaningful."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    c, k, h, pool = layer
    dev = torch.device("cuda")
    x, weight, _, _ = _conv_inputs(GPU_BATCH, c, k, h, h, 3, dtype, dev)
    base = {"x": x, "weight": weight, "bias": torch.randn(k, device=dev) * 0.1,
            "gamma": torch.rand(k, device=dev) + 0.5, "beta": torch.randn(k, device=dev) * 0.2}
    stats0 = (torch.randn(k, device=dev) * 0.1, torch.rand(k, device=dev) + 0.5)
    out = h // 2 if pool else h
    grad = torch.randn(GPU_BATCH, k, out, out, device=dev)

    def leaves_in(dtype_):
        # conv operands in dtype_; BN parameters fp32 (cuDNN's mixed-precision BN) or fp64
        bn_dtype = torch.float64 if dtype_ == torch.float64 else torch.float32
        return {key: v.to(bn_dtype if key in ("gamma", "beta") else dtype_).clone()
                .requires_grad_(True) for key, v in base.items()}

    ours, stats = leaves_in(dtype), [s.clone() for s in stats0]
    y = ops._train_on_backend(native_cuda, ours["x"], ours["weight"], ours["bias"],
                              ours["gamma"], ours["beta"], *stats, 0.1, 1e-5, pool)
    y.backward(grad.to(dtype))
    results = {}
    for name, dtype_ in (("torch", dtype), ("oracle", torch.float64)):
        leaves = leaves_in(dtype_)
        st = [s.to(torch.float64 if dtype_ == torch.float64 else torch.float32).clone()
              for s in stats0]
        out_ = _cudnn_block(leaves["x"], leaves["weight"], leaves["bias"], leaves["gamma"],
                            leaves["beta"], *st, pool, True)
        out_.backward(grad.to(dtype_))
        results[name] = (out_, leaves, st)
    (y_t, leaves_t, stats_t), (y_o, leaves_o, stats_o) = results["torch"], results["oracle"]
    assert_within_rule(y, y_t, y_o, dtype)
    for got, want, ref in zip(stats, stats_t, stats_o, strict=True):
        assert_within_rule(got, want, ref, dtype)
    if dtype != torch.float32:
        for key in ("x", "weight", "gamma", "beta"):
            assert_within_rule(ours[key].grad, leaves_t[key].grad, leaves_o[key].grad, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("layer", VGG16_LAYERS, ids=lambda s: "C{}K{}H{}pool{}".format(*s))
def test_cuda_bn_relu_backward_matches_oracle(layer, dtype, native_cuda):
    """The fused BN + ReLU (+ pool) backward on identical inputs against the float64 reference
    (and PyTorch's own ops in dtype for the error rule), on VGG16's activation shapes."""
    _, k, h, pool = layer
    dev = torch.device("cuda")
    z = torch.randn(GPU_BATCH, k, h, h, device=dev).to(dtype).contiguous(
        memory_format=torch.channels_last)
    mean, invstd, gamma, beta = _bn_inputs(k, dev)
    scale = gamma * invstd  # as the forward computes it for bn_relu_pool
    out = h // 2 if pool else h
    grad_y = torch.randn(GPU_BATCH, k, out, out, device=dev).to(dtype).contiguous(
        memory_format=torch.channels_last)
    got = native_cuda.bn_relu_backward(grad_y, z, mean, invstd, scale, beta, pool)
    want = bn_relu_backward_reference(grad_y, z, mean, invstd, scale, beta, pool)
    oracle = bn_relu_backward_reference(*_f64(grad_y, z, mean, invstd, scale, beta), pool)
    assert got[0].dtype == dtype and got[0].is_contiguous(memory_format=torch.channels_last)
    assert got[1].dtype == got[2].dtype == torch.float32
    for g, t, o in zip(got, want, oracle, strict=True):
        assert_within_rule(g, t, o, dtype)


# (VGG_KERNELS_NATIVE_WGMMA, VGG_KERNELS_NATIVE_NARROW, dtype, allow_tf32, C, R, the kernel
# native.cuda_last_infer_kernel() must name or None for any): every CUDA inference kernel and
# form of its epilogue. K = 24, a multiple of 8, is in every kernel's domain.
NAN_KERNELS = [
    ("0", "0", torch.float32, False, 16, 3, "wmma"),  # the CUDA-core fp32 kernel
    ("0", "0", torch.float32, True, 16, 3, "wmma"),  # WMMA in tf32
    ("0", "0", torch.float16, False, 16, 3, "wmma"),
    ("0", "0", torch.bfloat16, False, 3, 1, "wmma"),  # element-wise loads
    ("0", "1", torch.bfloat16, False, 3, 3, "narrow"),
    ("0", "1", torch.float16, False, 7, 3, "narrow"),
    ("1", "1", torch.bfloat16, False, 64, 3, "wgmma"),
    ("1", "1", torch.float16, False, 3, 3, "wgmma"),  # C padded to 8
    ("1", "1", torch.bfloat16, False, 24, 1, "wgmma"),
    ("halo", "1", torch.bfloat16, False, 128, 3, "halo"),
    ("halo-t", "1", torch.float16, False, 128, 3, "halo-t"),
    ("halo-t", "1", torch.bfloat16, False, 64, 3, "halo-t"),  # the persistent C == 64 form
    ("auto", "1", torch.bfloat16, False, 64, 3, None),
]
NAN_KERNEL_IDS = [f"{m}-narrow{n}-{str(d)[6:]}-tf32{t}-C{c}R{r}"
                  for m, n, d, t, c, r, _ in NAN_KERNELS]


@pytest.mark.gpu
@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("where", ["x", "weight", "scale"])
@pytest.mark.parametrize("mode, narrow, dtype, tf32, c, r, kernel", NAN_KERNELS,
                         ids=NAN_KERNEL_IDS)
def test_cuda_infer_keeps_nan(mode, narrow, dtype, tf32, c, r, kernel, where, pool, native_cuda,
                              monkeypatch):
    """A NaN in x, in the weight or in the scale gives NaN exactly where the float64 reference
    (torch.relu, then nn.MaxPool2d) gives it, pooled and not, in every inference kernel: fmaxf
    would turn relu(NaN) into 0 and drop a NaN from its window. The other outputs stay right."""
    if mode not in ("0", "auto") and _wgmma_missing():
        pytest.skip(_wgmma_missing())
    monkeypatch.setenv("VGG_KERNELS_NATIVE_WGMMA", mode)
    monkeypatch.setenv("VGG_KERNELS_NATIVE_NARROW", narrow)
    monkeypatch.delenv("VGG_KERNELS_NATIVE_WGMMA_TILE", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    k, h, w = 24, 9, 11
    x, weight, scale, shift = _conv_inputs(2, c, k, h, w, r, dtype, torch.device("cuda"))
    if where == "x":
        x[0, c - 1, 4, 5] = float("nan")  # inside: every channel of the outputs around it
        x[1, 0, 0, w - 1] = float("nan")  # a corner; with the pool, in a dropped column
    elif where == "weight":
        weight[5, c // 2, r // 2, r // 2] = float("nan")  # the centre tap: all of channel 5
    else:
        scale[17] = float("nan")
    y = native_cuda.conv_bn_relu_infer(x, weight, scale, shift, pool)
    if kernel is not None:
        assert native.cuda_last_infer_kernel() == kernel
    oracle = conv_bn_relu_infer_reference(*[t.cpu() for t in _f64(x, weight, scale, shift)],
                                          pool)
    nan = oracle.isnan()
    assert nan.any() and not nan.all()
    got = y.cpu()
    assert torch.equal(got.isnan(), nan), (
        f"NaN at {got.isnan().sum().item()} outputs, {(got.isnan() & nan).sum().item()} of "
        f"the reference's {nan.sum().item()}")
    # the other outputs, by the usual rule (NaN replaced by 0 on every side)
    theirs = conv_bn_relu_infer_reference(x, weight, scale, shift, pool).cpu().masked_fill(nan, 0)
    tf32_result = conv_bn_relu_infer_reference(
        *[t.cpu() for t in _f64(_round_tf32(x), _round_tf32(weight), scale, shift)], pool)
    oracle = oracle.masked_fill(nan, 0)
    theirs = _torch_error_reference(dtype, theirs, tf32_result.float().masked_fill(nan, 0), oracle)
    assert_within_rule(got.masked_fill(nan, 0), theirs, oracle, dtype)


# (dtype, allow_tf32): conv_bn_stats on the CUDA-core fp32 kernel and on the WMMA kernel in tf32,
# fp16 and bf16
STATS_PATHS = [(torch.float32, False), (torch.float32, True), (torch.float16, False),
               (torch.bfloat16, False)]


@pytest.mark.gpu
@pytest.mark.parametrize("mean, std", [(1e3, 1.0), (1e3, 0.01), (1e4, 1.0), (1e4, 0.01)])
@pytest.mark.parametrize("case", ["identity", "bias"])
@pytest.mark.parametrize("dtype, tf32", STATS_PATHS,
                         ids=["fp32", "tf32", "fp16", "bf16"])
def test_cuda_conv_bn_stats_far_from_zero(case, mean, std, dtype, tf32, native_cuda,
                                          monkeypatch):
    """Channels whose mean is 1e3 or 1e4 and whose spread is 1 or 0.01 keep their variance
    (E[z^2] - E[z]^2 in fp32 loses it to cancellation): z = x through a 1x1 identity weight with
    x = mean + std * noise, or a 3x3 conv of spread std plus a bias of about mean. Many row tiles,
    the last one partial (n h w = 2697 rows)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    dev = torch.device("cuda")
    n, h, w = 3, 29, 31
    if case == "identity":
        if dtype != torch.float32 or tf32:
            pytest.skip("only fp32 holds x = mean + std * noise (fp16, bf16 and tf32 round "
                        "most of the spread away, down to a variance of 0)")
        c = k = 24
        x = (mean + std * torch.randn(n, c, h, w, device=dev)).contiguous(
            memory_format=torch.channels_last)
        weight = torch.eye(c, device=dev).view(c, c, 1, 1)
        bias = None
    else:
        c, k = 16, 24
        x, weight, _, _ = _conv_inputs(n, c, k, h, w, 3, dtype, dev)
        weight = (weight.float() * std).to(dtype)
        bias = mean + torch.randn(k, device=dev)
    got = native_cuda.conv_bn_stats(x, weight, bias)
    assert got[1].dtype == got[2].dtype == torch.float64
    oracle = conv_bn_stats_reference(*_f64(x, weight, bias))
    theirs = conv_bn_stats_reference(x, weight, bias)
    tf32_result = conv_bn_stats_reference(*_f64(_round_tf32(x), _round_tf32(weight), bias))
    for g, t, t32, o in zip(got, theirs, tf32_result, oracle, strict=True):
        assert_within_rule(g, _torch_error_reference(dtype, t, t32.float(), o), o, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("k", [24, 13], ids=["K24", "K13"])  # 16-byte vectors; one at a time
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_cuda_bn_relu_backward_mask_matches_forward(dtype, k, pool, native_cuda):
    """bn_relu_backward's ReLU mask and pool argmax are bn_relu_pool's where pre = (z - mean) *
    scale + beta is within rounding of 0: per channel, about half of z is one value whose pre
    is 0 or one fp32 ulp either side of it as a subtraction of the mean (hi, then lo), a multiply
    and an add round it (an FMA gives other signs), tied within the pool windows; the rest is 5%
    or 10% away. The gradient must flow exactly where the reference's forward routes it, and
    into exactly the windows whose output is positive."""
    dev = torch.device("cuda")
    n, h, w = 2, 7, 9
    sign = torch.where(torch.rand(k) < 0.5, -1.0, 1.0)
    center = ((1 + torch.rand(k)) * sign).to(dtype).float()  # per channel: z where pre ~ 0
    # a float64 mean with low bits (the kernels take it as hi + lo), 0.7 center away from it
    mean = center.double() * 0.3 + torch.rand(k, dtype=torch.float64) * 1e-6
    hi = mean.float()
    lo = (mean - hi.double()).float()
    scale = (1.5 + torch.rand(k)) * sign[torch.randperm(k)]
    # |((center - hi) - lo) * scale| >= 1: one ulp of it (2**-24 and up) is no fp16 underflow
    product = ((center - hi) - lo) * scale
    step = torch.randint(-1, 2, (k,))
    target = torch.where(step > 0, torch.nextafter(product, product + 1),
                         torch.where(step < 0, torch.nextafter(product, product - 1), product))
    beta = -target  # pre = product + beta = product - target: 0 or one ulp, exactly
    offset = torch.tensor([-0.1, -0.05, 0.05, 0.1])[torch.randint(0, 4, (n, k, h, w))]
    offset = torch.where(torch.rand(n, k, h, w) < 0.5, 0.0, offset)
    z = (center.view(1, -1, 1, 1) * (1 + offset)).to(dtype).to(dev).contiguous(
        memory_format=torch.channels_last)  # exactly center where offset == 0
    mean, hi, lo, scale, beta = (t.to(dev) for t in (mean, hi, lo, scale, beta))
    invstd = torch.full((k,), 0.5, device=dev)

    y = native_cuda.bn_relu_pool(z, mean, scale, beta, pool)
    assert torch.equal(y, bn_relu_pool_reference(z, mean, scale, beta, pool))
    grad_y = torch.ones_like(y)
    grad_z, grad_gamma, grad_beta = native_cuda.bn_relu_backward(grad_y, z, mean, invstd, scale,
                                                                 beta, pool)
    # g (1 where the gradient flows, else 0) from grad_z = scale * (g - (sum g + xhat *
    # sum g xhat) / count), to within grad_z's rounding
    view = (1, -1, 1, 1)
    xhat = ((z.float() - hi.view(view)) - lo.view(view)) * invstd.view(view)
    g = (grad_z.float() / scale.view(view)
         + (grad_beta.view(view) + xhat * grad_gamma.view(view)) / (n * h * w))
    flows = g > 0.5

    pre = bn_pre_reference(z, mean, scale, beta)
    if pool:
        activation = torch.relu(pre).to(dtype)
        _, index = F.max_pool2d(activation, 2, return_indices=True)
        routed = torch.zeros(n, k, h * w, device=dev).scatter_(2, index.flatten(2), 1.0)
        expected = (routed.view(n, k, h, w) > 0) & (pre > 0)
        assert torch.equal(F.max_pool2d(flows.float(), 2) > 0, y > 0)
    else:
        expected = pre > 0
        assert torch.equal(flows, y > 0)
    assert expected.any() and not expected.all()
    assert torch.equal(flows, expected), (
        f"{(flows != expected).sum().item()} of {expected.numel()} mask elements differ")
    assert torch.equal(grad_beta, expected.sum((0, 2, 3)).float())
