"""Benchmark cases for RMSNorm / LayerNorm (with and without the fused residual add).

Memory-bound: ``bytes`` counts x (+ residual) read, weight/bias read, y (+ h) written, once.
Full shapes move 64 MB to 1 GB per call, past the H100's 50 MB L2 (and do_bench flushes L2
between repetitions anyway). Baselines are what a user writes: ``F.rms_norm`` /
``F.layer_norm``, preceded by the add when there is a residual, and the same composite
under ``torch.compile`` on CUDA. Size "headline" (the GPU check, bench/gpu_check.sh): RMSNorm
alone and with the residual at two of the full shapes, without the torch.compile baselines.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from genfuse.kernels import _norm as norm

from .harness import Case

_TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
HEADLINE_SHAPES = [(4096, 4096), (16384, 8192)]  # (M, N), the GPU check's (bench/gpu_check.sh)


def _rms(x, w, eps):
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def _rms_add(x, r, w, eps):
    h = x + r
    return _rms(h, w, eps), h


def _ln(x, w, b, eps):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _ln_add(x, r, w, b, eps):
    h = x + r
    return F.layer_norm(h, (h.shape[-1],), w, b, eps), h


def cases(device: str, dtype: torch.dtype, size: str) -> List[Case]:
    if size == "full":
        shapes = [(4096, 4096), (16384, 8192), (32768, 576)]
    elif size == "headline":
        shapes = HEADLINE_SHAPES
    elif size == "smoke":
        shapes = [(5, 64), (3, 100)]
    else:
        raise ValueError(f"size must be 'full', 'headline' or 'smoke', got {size!r}")
    compiled = {}
    if device == "cuda" and size == "full":  # no torch.compile baseline on CPU (slow to build, not measured)
        compiled = {f.__name__: torch.compile(f, dynamic=False) for f in (_rms, _rms_add, _ln, _ln_add)}

    out: List[Case] = []
    for m, n in shapes:
        x = torch.randn(m, n, device=device, dtype=dtype)
        r = torch.randn(m, n, device=device, dtype=dtype)
        w = (1.0 + 0.1 * torch.randn(n, device=device)).to(dtype)
        b = (0.1 * torch.randn(n, device=device)).to(dtype)
        e = x.element_size()
        meta = {"M": m, "N": n, "dtype": str(dtype).replace("torch.", "")}

        def add(name, genfuse, baselines, fn_name, args, streams, params):
            # streams: M x N tensors read or written; params: N-vectors read (weight, bias)
            if fn_name in compiled:
                baselines["torch.compile"] = (lambda f=compiled[fn_name], a=args: f(*a))
            out.append(Case(kernel="norm", name=f"{name} M{m} N{n}", genfuse=genfuse,
                            baselines=baselines, bytes=(streams * m + params) * n * e,
                            check_tol=_TOL[dtype], meta=dict(meta, op=name)))

        add("rms_norm", lambda x=x, w=w: norm.rms_norm(x, w, 1e-6),
            {"torch": lambda x=x, w=w: _rms(x, w, 1e-6)}, "_rms", (x, w, 1e-6), 2, 1)
        add("rms_norm+residual", lambda x=x, r=r, w=w: norm.rms_norm(x, w, 1e-6, residual=r),
            {"torch": lambda x=x, r=r, w=w: _rms_add(x, r, w, 1e-6)}, "_rms_add", (x, r, w, 1e-6), 4, 1)
        if size == "headline":
            continue
        add("layer_norm", lambda x=x, w=w, b=b: norm.layer_norm(x, w, b, 1e-5),
            {"torch": lambda x=x, w=w, b=b: _ln(x, w, b, 1e-5)}, "_ln", (x, w, b, 1e-5), 2, 2)
        add("layer_norm+residual",
            lambda x=x, r=r, w=w, b=b: norm.layer_norm(x, w, b, 1e-5, residual=r),
            {"torch": lambda x=x, r=r, w=w, b=b: _ln_add(x, r, w, b, 1e-5)},
            "_ln_add", (x, r, w, b, 1e-5), 4, 2)
    return out
