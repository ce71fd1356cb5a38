"""Benchmark cases for ``linear`` (GEMM with a fused bias/activation/residual epilogue).

Three groups (size "full", GPU):

* plain large GEMMs (M=N=K=4096 and 8192, M=16384 N=K=4096, a Llama-ish MLP up-projection
  M=8192 N=14336 K=4096): compute-bound, judged in TFLOP/s (2*M*N*K) against cuBLAS through
  ``torch.matmul`` and ``F.linear``;
* the same shapes with bias + gelu_tanh + residual, against the unfused torch sequence
  ``F.gelu(F.linear(x, w, b), approximate="tanh") + r`` and that sequence under
  ``torch.compile`` (which fuses the pointwise tail but keeps the GEMM in cuBLAS);
* decode shapes M = 1, 8, 16 with (N, K) in (4096, 4096), (14336, 4096), (4096, 14336):
  memory-bound, flops=0 and bytes = weight + x + out read/written once, judged in GB/s
  against ``F.linear``, timed inside CUDA graphs (a launch is microseconds). A 4096x4096 bf16
  weight (32 MB) fits in the H100's 50 MB L2, and a graph replays without flushing it, so
  each decode call rotates through enough identical weight copies (>= 256 MB in all) that
  every call streams its weight from HBM.

Size "headline" (the GPU check, bench/gpu_check.sh): M=N=K=4096 plain and with the epilogue,
and one decode shape (M=1, N=K=4096) plain and with the epilogue, without the torch.compile
baselines (their compile time does not fit the check).

Size "smoke": tiny CPU shapes through both kernels, with and without the epilogue.
"""
from __future__ import annotations

import itertools
from typing import List

import torch
import torch.nn.functional as F

from genfuse.kernels._linear import linear

from .harness import Case

_TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
_ROTATE_BYTES = 256 * 2**20  # > 5x the H100's L2
# (M, N, K) of the GPU check's headline cases (bench/gpu_check.sh)
HEADLINE_LARGE = [(4096, 4096, 4096)]
HEADLINE_DECODE = [(1, 4096, 4096)]


def _unfused(x, w, b, r):
    return F.gelu(F.linear(x, w, b), approximate="tanh") + r


def _inputs(m, n, k, device, dtype):
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)  # keeps outputs O(1)
    b = torch.randn(n, device=device, dtype=dtype)
    r = torch.randn(m, n, device=device, dtype=dtype)
    return x, w, b, r


def cases(device: str, dtype: torch.dtype, size: str) -> List[Case]:
    if size == "full":
        large = [(4096, 4096, 4096), (8192, 8192, 8192), (16384, 4096, 4096), (8192, 14336, 4096)]
        decode = [(m, n, k) for m in (1, 8, 16) for n, k in ((4096, 4096), (14336, 4096), (4096, 14336))]
    elif size == "headline":
        large, decode = HEADLINE_LARGE, HEADLINE_DECODE
    elif size == "smoke":
        large = [(40, 48, 64)]          # > 16 rows: the tiled GEMM
        decode = [(3, 40, 72)]          # <= 16 rows: the decode kernel
    else:
        raise ValueError(f"size must be 'full', 'headline' or 'smoke', got {size!r}")
    # torch.compile only on CUDA (slow to build on CPU, and not what we measure there);
    # dynamic=False: one specialised graph per shape, as a user with fixed shapes would get.
    compiled = torch.compile(_unfused, dynamic=False) if device == "cuda" and size == "full" else None
    e = torch.empty((), dtype=dtype).element_size()
    tol = _TOL[dtype]
    name = str(dtype).replace("torch.", "")
    out: List[Case] = []

    for m, n, k in large:
        x, w, b, r = _inputs(m, n, k, device, dtype)
        meta = {"M": m, "N": n, "K": k, "dtype": name}
        gemm_bytes = (m * k + n * k + m * n) * e
        out.append(Case(
            "linear", f"M{m} N{n} K{k}",
            genfuse=lambda x=x, w=w: linear(x, w),
            baselines={"torch.matmul": lambda x=x, w=w: torch.matmul(x, w.t()),
                       "F.linear": lambda x=x, w=w: F.linear(x, w)},
            flops=2.0 * m * n * k, bytes=gemm_bytes, check_tol=tol, meta={**meta, "epilogue": "none"}))
        baselines = {"torch unfused": lambda x=x, w=w, b=b, r=r: _unfused(x, w, b, r)}
        if compiled is not None:
            baselines["torch.compile"] = lambda x=x, w=w, b=b, r=r: compiled(x, w, b, r)
        out.append(Case(
            "linear", f"M{m} N{n} K{k} +bias gelu_tanh +res",
            genfuse=lambda x=x, w=w, b=b, r=r: linear(x, w, b, activation="gelu_tanh", residual=r),
            baselines=baselines,
            flops=2.0 * m * n * k, bytes=gemm_bytes + (n + m * n) * e, check_tol=tol,
            meta={**meta, "epilogue": "bias+gelu_tanh+residual"}))

    for m, n, k in decode:
        x, w, _, _ = _inputs(m, n, k, device, dtype)
        w_bytes = n * k * e
        copies = max(1, -(-_ROTATE_BYTES // w_bytes)) if device == "cuda" else 1
        ws = [w] + [w.clone() for _ in range(copies - 1)]  # identical values: any copy gives the same output
        # One counter per callable: a graph capture records n_repeat calls, each on the next copy.
        g_it, t_it = itertools.cycle(ws), itertools.cycle(ws)
        out.append(Case(
            "linear", f"decode M{m} N{n} K{k}",
            genfuse=lambda x=x, it=g_it: linear(x, next(it)),
            baselines={"F.linear": lambda x=x, it=t_it: F.linear(x, next(it))},
            flops=0.0, bytes=w_bytes + (m * k + m * n) * e, cuda_graph=True, check_tol=tol,
            meta={"M": m, "N": n, "K": k, "dtype": name, "epilogue": "none", "weight_copies": copies}))
    if size != "full":  # the decode kernel with the full epilogue, on CPU as well
        m, n, k = decode[0]
        x, w, b, r = _inputs(m, n, k, device, dtype)
        # on the GPU as the plain decode case: rotated weight copies, inside a CUDA graph
        copies = max(1, -(-_ROTATE_BYTES // (n * k * e))) if device == "cuda" else 1
        ws = [w] + [w.clone() for _ in range(copies - 1)]
        g_it, t_it = itertools.cycle(ws), itertools.cycle(ws)
        out.append(Case(
            "linear", f"decode M{m} N{n} K{k} +bias gelu_tanh +res",
            genfuse=lambda it=g_it: linear(x, next(it), b, activation="gelu_tanh", residual=r),
            baselines={"torch unfused": lambda it=t_it: _unfused(x, next(it), b, r)},
            flops=0.0, bytes=(n * k + m * k + n + 2 * m * n) * e, cuda_graph=device == "cuda", check_tol=tol,
            meta={"M": m, "N": n, "K": k, "dtype": name, "epilogue": "bias+gelu_tanh+residual",
                  "weight_copies": copies}))
    return out
