"""One way to check a kernel: poison its outputs, compare with a float64 reference by
relative error, with a tolerance per dtype (KERNELS.md, "Correct first")."""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from genfuse.kernels._common import poison_outputs

# ||out - ref|| / ||ref|| bands. fp32 on a GPU runs tl.dot in tf32 (about 1e-3).
TOLERANCE = {
    ("cpu", torch.float32): 1e-5,
    ("cuda", torch.float32): 5e-3,
    ("cpu", torch.float16): 3e-3,
    ("cuda", torch.float16): 3e-3,
    ("cuda", torch.bfloat16): 2e-2,
}

# fp32 and fp16 everywhere; bf16 only on the GPU (the interpreter cannot compute in bf16).
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu),
]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or Inf anywhere in ``out`` gives inf."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / denom if denom > 0 else num


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None,
                 *, tol: float | None = None, name: str = "output") -> float:
    """Assert ``out`` is within the dtype's relative-error band of ``ref``; returns the error."""
    dtype = dtype or out.dtype
    if tol is None:
        tol = TOLERANCE[(out.device.type, dtype)]
    err = rel_error(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} ({dtype}, {out.device})"
    return err


def poisoned(fn: Callable, *args, **kwargs):
    """Call ``fn`` with every kernel output buffer pre-filled with NaN."""
    with poison_outputs():
        return fn(*args, **kwargs)


def to64(*tensors):
    """float64 CPU copies for the reference (None passes through)."""
    out = tuple(None if t is None else t.detach().double().cpu() for t in tensors)
    return out if len(out) > 1 else out[0]
