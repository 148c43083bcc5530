"""Backend choice: 'auto', explicit names, VGG_KERNELS_BACKEND, one warning per fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

from vgg_kernels import BACKEND_ENV, BackendFallbackWarning, FusedVGG, ops
from vgg_kernels import backends as registry


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(registry, "_WARNED", set())
    monkeypatch.delenv(BACKEND_ENV, raising=False)


def _resolve(asked, dtype=torch.float32):
    return registry.resolve_backend(asked, torch.device("cpu"), dtype, "conv_bn_relu_infer").name


def _fallbacks(record):
    return [w for w in record if issubclass(w.category, BackendFallbackWarning)]


def test_reference_never_warns():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert _resolve("reference") == "reference"
    assert not _fallbacks(record)


def test_triton_on_cpu_without_interpreter_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert _resolve("triton") == "reference"
        assert _resolve("triton") == "reference"
    messages = [str(w.message) for w in _fallbacks(record)]
    assert len(messages) == 1, messages
    assert "'triton'" in messages[0] and "'reference'" in messages[0]
    assert "TRITON_INTERPRET=1" in messages[0]


def test_triton_runs_on_cpu_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if registry.get_backend("triton").unavailable_reason(
            torch.device("cpu"), torch.float32, "conv_bn_relu_infer") is not None:
        pytest.skip("triton is not importable here")
    assert _resolve("triton") == "triton"


def test_triton_rejects_float64_with_a_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = registry.get_backend("triton").unavailable_reason(
        torch.device("cpu"), torch.float64, "conv_bn_relu_infer")
    assert reason is not None and "float64" in reason


def test_auto_on_cpu_prefers_native_then_reference():
    native_reason = registry.get_backend("native").unavailable_reason(
        torch.device("cpu"), torch.float32, "conv_bn_relu_infer")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        chosen = _resolve("auto")
    if native_reason is None:
        assert chosen == "native" and not _fallbacks(record)
    else:
        assert chosen == "reference"
        (warning,) = _fallbacks(record)
        assert "'native'" in str(warning.message) and native_reason in str(warning.message)


def test_environment_variable_replaces_auto(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "reference")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert _resolve("auto") == "reference"
    assert not _fallbacks(record)


def test_explicit_backend_wins_over_environment_variable(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "native")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if registry.get_backend("triton").unavailable_reason(
            torch.device("cpu"), torch.float32, "conv_bn_relu_infer") is not None:
        pytest.skip("triton is not importable here")
    assert _resolve("triton") == "triton"


def test_bad_environment_variable_names_itself(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "fast")
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match=f"environment variable {BACKEND_ENV}"):
        ops.conv_bn_relu_infer(x, torch.randn(2, 3, 3, 3), torch.ones(2), torch.zeros(2))


def test_model_runs_with_fallback_and_warns_once(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = FusedVGG("A", backend="triton", init_weights=False).eval()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
            model(torch.randn(1, 3, 32, 32))
    assert len(_fallbacks(record)) == 1


def test_unknown_op_is_an_error():
    with pytest.raises(ValueError, match="op must be one of"):
        registry.resolve_backend("auto", torch.device("cpu"), torch.float32, "conv_relu")
