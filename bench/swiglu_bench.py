"""Benchmark cases for SwiGLU gating on a fused ``[gate | up]`` projection.

Memory-bound: ``bytes`` = x read (M * 2N) + y written (M * N). The full prefill shape is
Llama-3-8B's MLP (intermediate 14336) over 16k tokens: 1.4 GB per call in bf16. The decode
shape (64 tokens, 5.5 MB) runs in a CUDA graph. Baselines: ``F.silu(g) * u`` on the two
halves, and the same under ``torch.compile`` on CUDA.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from genfuse.kernels._swiglu import swiglu

from .harness import Case

_TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def torch_swiglu(x):
    n = x.shape[-1] // 2
    return F.silu(x[..., :n]) * x[..., n:]


def cases(device: str, dtype: torch.dtype, size: str) -> List[Case]:
    if size == "full":
        shapes = [(16384, 14336, False), (64, 14336, True)]    # (M, N, cuda_graph)
    else:
        shapes = [(5, 96, False), (3, 7, False)]
    compiled = torch.compile(torch_swiglu, dynamic=False) if device == "cuda" else None

    out: List[Case] = []
    for m, n, graph in shapes:
        x = torch.randn(m, 2 * n, device=device, dtype=dtype)
        baselines = {"torch": lambda x=x: torch_swiglu(x)}
        if compiled is not None:
            baselines["torch.compile"] = lambda x=x: compiled(x)
        out.append(Case(
            kernel="swiglu", name=f"M{m} N{n}", genfuse=lambda x=x: swiglu(x),
            baselines=baselines, bytes=3 * m * n * x.element_size(),
            cuda_graph=graph and device == "cuda", check_tol=_TOL[dtype],
            meta={"M": m, "N": n, "dtype": str(dtype).replace("torch.", "")},
        ))
    return out
