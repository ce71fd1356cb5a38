"""Benchmark cases for attention() (FlashAttention-2 forward, prefill shapes).

Compute-bound: ``flops`` counts the two matmuls, 4 * D FLOPs per visible (query, key) pair
per head (2 * D for q.k, 2 * D for p.v); causal counts only the visible pairs (about half). Full shapes hold about 16k tokens per call (B * T) with 16 query heads,
head dims 64 and 128, and one GQA case (16 query / 4 kv heads). One more is the Stable
Diffusion 1.5 VAE's mid-block attention (AutoencoderKL, 512x512 images): a single head of
dimension 512 over the 64 x 64 = 4096 latent pixels, non-causal. FLOPs count the useful work
only: above head dim 256 genfuse recomputes the scores per output chunk (1.5x to 2.5x that).

Baselines are what a user runs instead: torch SDPA restricted to its FlashAttention-2
backend, plain SDPA (whatever backend torch picks, e.g. cuDNN on H100), and
``flash_attn.flash_attn_func`` when that package is installed (its (B, T, H, D) inputs are
built once, outside the timed call). A baseline that cannot run a case (flash needs fp16/bf16,
older torch lacks GQA in SDPA's flash path) is dropped when the case is built.
On CPU ("smoke") the baselines are the torch reference and SDPA with an explicit mask.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from genfuse.kernels._attention import attention, attention_reference

from .harness import Case

_TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}

# (B, Hq, Hkv, T, D, causal): self-attention prefill, S == T
_FULL = [
    (16, 16, 16, 1024, 64, False),
    (16, 16, 16, 1024, 64, True),
    (16, 16, 16, 1024, 128, False),
    (4, 16, 16, 4096, 64, True),
    (4, 16, 16, 4096, 128, False),
    (4, 16, 16, 4096, 128, True),
    (1, 16, 16, 16384, 128, True),
    (4, 16, 4, 4096, 128, True),     # GQA 4:1
    (1, 1, 1, 4096, 512, False),     # SD 1.5 VAE mid-block (one head, D = 512 split over programs)
]
# The GPU check's headline cases (bench/gpu_check.sh): sequence 4k, head dims 64 and 128,
# causal and not, against SDPA.
HEADLINE = [
    (4, 16, 16, 4096, 64, False),
    (4, 16, 16, 4096, 64, True),
    (4, 16, 16, 4096, 128, False),
    (4, 16, 16, 4096, 128, True),
]
# (B, Hq, Hkv, T, S, D, causal): tiny, includes T != S (bottom-right mask) and GQA
_SMOKE = [
    (1, 2, 2, 40, 40, 32, False),
    (1, 2, 2, 40, 40, 32, True),
    (2, 4, 2, 24, 40, 64, True),
    (1, 1, 1, 40, 40, 320, False),   # head dim > 256: the split-D path
]


def visible_pairs(t: int, s: int, causal: bool) -> int:
    """(query, key) pairs the bottom-right causal mask leaves visible (all T*S if not causal)."""
    if not causal:
        return t * s
    return sum(min(max(i + s - t + 1, 0), s) for i in range(t))


def _sdpa(q, k, v, causal, mask, gqa):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          enable_gqa=gqa)


def _flash_backend():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def _runs(fn: Callable[[], object]) -> bool:
    """Whether a baseline accepts this case (called once, outside any timing)."""
    try:
        fn()
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


def cases(device: str, dtype: torch.dtype, size: str) -> List[Case]:
    if size not in ("full", "headline", "smoke"):
        raise ValueError(f"size must be 'full', 'headline' or 'smoke', got {size!r}")
    shapes = (_SMOKE if size == "smoke" else
              [(b, hq, hkv, t, t, d, c) for b, hq, hkv, t, d, c in (_FULL if size == "full" else HEADLINE)])
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None

    out: List[Case] = []
    for b, hq, hkv, t, s, d, causal in shapes:
        q = torch.randn(b, hq, t, d, device=device, dtype=dtype)
        k = torch.randn(b, hkv, s, d, device=device, dtype=dtype)
        v = torch.randn(b, hkv, s, d, device=device, dtype=dtype)
        gqa = hq != hkv
        # SDPA's is_causal aligns top-left; with T != S the bottom-right mask is explicit.
        mask = None
        if causal and t != s:
            i = torch.arange(t, device=device)[:, None]
            mask = torch.arange(s, device=device)[None, :] <= i + (s - t)   # (T, S)

        baselines: Dict[str, Callable[[], object]] = {}
        if device == "cuda":
            def flash_sdpa(q=q, k=k, v=v, causal=causal, gqa=gqa):
                with _flash_backend():
                    return _sdpa(q, k, v, causal, None, gqa)
            if mask is None and _runs(flash_sdpa):
                baselines["sdpa_flash"] = flash_sdpa
            baselines["sdpa"] = lambda q=q, k=k, v=v, c=causal, m=mask, g=gqa: _sdpa(q, k, v, c, m, g)
            if flash_attn_func is not None and dtype != torch.float32 and d <= 256:
                # flash-attn wants (B, T, H, D); its causal mask is bottom-right like ours. It
                # stops at head dim 256.
                qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
                baselines["flash_attn"] = (
                    lambda qt=qt, kt=kt, vt=vt, c=causal: flash_attn_func(qt, kt, vt, causal=c).transpose(1, 2))
        else:
            baselines["reference"] = lambda q=q, k=k, v=v, c=causal: attention_reference(q, k, v, causal=c)
            baselines["sdpa"] = lambda q=q, k=k, v=v, c=causal, m=mask, g=gqa: _sdpa(q, k, v, c, m, g)

        name = f"B{b} Hq{hq} Hkv{hkv} T{t} S{s} D{d}" + (" causal" if causal else "")
        out.append(Case(
            kernel="attention", name=name,
            genfuse=lambda q=q, k=k, v=v, c=causal: attention(q, k, v, causal=c),
            baselines=baselines,
            flops=4.0 * b * hq * d * visible_pairs(t, s, causal),
            # q, k, v read once and o written once: the floor, not the (B*Hq*T/BLOCK_M)-fold
            # re-reads of K/V a tiled kernel actually does (those mostly hit L2).
            bytes=float(q.element_size() * (2 * q.numel() + k.numel() + v.numel())),
            check_tol=_TOL[dtype],
            meta={"B": b, "Hq": hq, "Hkv": hkv, "T": t, "S": s, "D": d, "causal": causal,
                  "dtype": str(dtype).replace("torch.", "")},
        ))
    return out
