"""The shared plumbing every kernel uses: backend choice, validation, poisoned outputs."""
import pytest
import torch

from genfuse.kernels import _common
from helpers import assert_close, rel_error


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        _common.resolve_backend("cuda", torch.zeros(1))


def test_torch_backend_always_wins():
    assert _common.resolve_backend("torch", torch.zeros(1)) == "torch"


def test_cpu_default_follows_the_interpreter(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setattr(_common, "INTERPRET", True)
    assert _common.resolve_backend(None, x) == "triton"
    monkeypatch.setattr(_common, "INTERPRET", False)
    assert _common.resolve_backend(None, x) == "torch"


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _common.resolve_backend("triton", torch.zeros(1))


def test_bf16_in_the_interpreter(monkeypatch, caplog):
    monkeypatch.setattr(_common, "INTERPRET", True)
    monkeypatch.setattr(_common, "_warned_bf16_fallback", False)
    x = torch.zeros(1, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        _common.resolve_backend("triton", x)
    with caplog.at_level("WARNING", logger="genfuse"):
        assert _common.resolve_backend(None, x) == "torch"
        assert _common.resolve_backend(None, x) == "torch"
    assert sum("bfloat16" in r.message for r in caplog.records) == 1  # said once, not per call


def test_check_tensor_names_the_argument():
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        _common.check_tensor("weight", [1.0])
    with pytest.raises(ValueError, match=r"q must have 4 dimensions, got shape \(2, 3\)"):
        _common.check_tensor("q", torch.zeros(2, 3), ndim=4)
    with pytest.raises(TypeError, match="x has dtype float64"):
        _common.check_tensor("x", torch.zeros(2, dtype=torch.float64))


def test_check_same_names_both_arguments():
    a = torch.zeros(2)
    with pytest.raises(TypeError, match="k has dtype float16 but q has float32"):
        _common.check_same("q", a, k=torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match="v is on meta but q is on cpu"):
        _common.check_same("q", a, v=torch.zeros(2, device="meta"))


def test_poisoned_outputs_start_as_nan_and_fail_the_check():
    with _common.poison_outputs():
        out = _common.empty((3, 4), torch.float32, torch.device("cpu"))
    assert torch.isnan(out).all()
    assert rel_error(out, torch.ones(3, 4)) == float("inf")
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(out, torch.ones(3, 4))
    assert _common._POISON is False  # the context restores the previous setting
