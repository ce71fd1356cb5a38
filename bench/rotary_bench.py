"""Benchmark cases for rotary embedding (q and k in one launch).

q and k are strided views of one packed ``(B, T, Hq + 2*Hkv, D)`` QKV projection, as a model
produces them. Memory-bound: ``bytes`` = q and k read + written, the positions read and the
cos/sin rows of the distinct positions read. The baseline is the Hugging Face Llama
composite (gather cos/sin rows, ``cat((c, c))``, ``q * cos + rotate_half(q) * sin`` in the
activation dtype) and the same under ``torch.compile`` on CUDA.
"""
from __future__ import annotations

from typing import List

import torch

from genfuse.kernels import _rotary as rotary

from .harness import Case

_TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_rope(q, k, cos, sin, positions):
    """What transformers' Llama does with full rotary (r = D)."""
    c, s = cos[positions], sin[positions]                     # (B, T, D/2) fp32
    c = torch.cat((c, c), dim=-1).unsqueeze(1).to(q.dtype)    # (B, 1, T, D)
    s = torch.cat((s, s), dim=-1).unsqueeze(1).to(q.dtype)
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def cases(device: str, dtype: torch.dtype, size: str) -> List[Case]:
    if size == "full":
        # (B, T, Hq, Hkv, D, offset range, cuda_graph): Llama-3-8B prefill, and batched decode
        shapes = [(8, 2048, 32, 8, 128, 1024, False), (64, 1, 32, 8, 128, 8192, True)]
    else:
        shapes = [(2, 5, 4, 2, 64, 16, False), (3, 1, 3, 1, 32, 40, False)]
    compiled = torch.compile(hf_rope, dynamic=False) if device == "cuda" else None

    out: List[Case] = []
    for B, T, hq, hkv, D, offsets, graph in shapes:
        qkv = torch.randn(B, T, hq + 2 * hkv, D, device=device, dtype=dtype)
        q = qkv[:, :, :hq].transpose(1, 2)                    # (B, Hq, T, D) strided view
        k = qkv[:, :, hq:hq + hkv].transpose(1, 2)            # (B, Hkv, T, D)
        cos, sin = rotary.rope_cos_sin(T + offsets, D, 500000.0, device=device)
        # Every sequence starts at its own offset (a batch of requests at different lengths).
        start = torch.randint(0, offsets, (B, 1), device=device)
        positions = start + torch.arange(T, device=device)    # (B, T) int64
        e = q.element_size()
        n_pos = torch.unique(positions).numel()
        nbytes = 2 * (q.numel() + k.numel()) * e + positions.numel() * 8 + n_pos * D * 4
        baselines = {"HF torch": lambda q=q, k=k, c=cos, s=sin, p=positions: hf_rope(q, k, c, s, p)}
        if compiled is not None:
            baselines["torch.compile"] = lambda q=q, k=k, c=cos, s=sin, p=positions: compiled(q, k, c, s, p)
        out.append(Case(
            kernel="rotary", name=f"B{B} T{T} Hq{hq} Hkv{hkv} D{D}",
            genfuse=lambda q=q, k=k, c=cos, s=sin, p=positions: rotary.rotary_embedding(q, k, c, s, p),
            baselines=baselines, bytes=nbytes, cuda_graph=graph and device == "cuda",
            check_tol=_TOL[dtype],
            meta={"B": B, "T": T, "Hq": hq, "Hkv": hkv, "D": D, "dtype": str(dtype).replace("torch.", "")},
        ))
    return out
