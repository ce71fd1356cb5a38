"""Benchmark cases for paged decode attention (flash-decoding), against what a user would run.

Decode is memory-bound: the floor is reading every sequence's K and V once, so ``bytes`` is
``sum_b seq_lens[b] * Hkv * D * 2 (K and V) * elem`` plus q and the output, and the result is
reported as GB/s against the copy ceiling. Baselines:

* ``sdpa_contiguous``: torch SDPA on a contiguous ``(B, Hkv, L, D)`` copy of the cache gathered
  once, outside the timed call, the best case for torch (no paging at all). For ``Tq = 1`` the
  ``G`` query heads of a KV head are folded into SDPA's query length, which is exact (one new
  token sees every key) and lets SDPA read each K/V head once, like genfuse does.
* ``flash_attn_kvcache``: ``flash_attn.flash_attn_with_kvcache`` on the same paged cache and
  block table, when flash-attn is installed and accepts the page size (flash-attn 2 requires
  pages of a multiple of 256 tokens; the probe call decides).

Decode launches are tiny, so every case is timed inside a CUDA graph. All full-size cases are
built up front (the runner builds the list first): about 25 GB of bf16 caches and their
contiguous copies, which fits an 80 GB H100.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from genfuse.kernels._decode_attention import paged_attention, paged_attention_reference

from . import harness

KERNEL = "decode_attention"
# (batch, context) of the GPU check's headline cases (bench/gpu_check.sh), page size 16
HEADLINE = [(8, 8192), (8, 32768)]


def _paged_inputs(device, dtype, B, Hq, Hkv, D, seq_lens, block_size, Tq, gen):
    """A pool with each sequence's blocks at random physical places (a real allocator's layout
    after some churn), a table with ``-1`` past each sequence's end, and random q/K/V."""
    n_blocks = [-(-L // block_size) for L in seq_lens]
    pool = sum(n_blocks)
    dev_gen = torch.Generator(device=device).manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    # Drawn on the device: the largest pools hold billions of elements.
    k = torch.randn(pool, block_size, Hkv, D, generator=dev_gen, device=device, dtype=dtype)
    v = torch.randn(pool, block_size, Hkv, D, generator=dev_gen, device=device, dtype=dtype)
    perm = torch.randperm(pool, generator=gen)
    table = torch.full((B, max(n_blocks)), -1, dtype=torch.int32)
    start = 0
    for b, n in enumerate(n_blocks):
        table[b, :n] = perm[start:start + n]
        start += n
    q = torch.randn(B, Hq, Tq, D, generator=dev_gen, device=device, dtype=dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return q, k, v, table.to(device), lens.to(device)


def _gather_contiguous(cache, table, L):
    """(num_blocks, block_size, Hkv, D) pages of equal-length sequences -> (B, Hkv, L, D)."""
    B, n = table.shape
    pages = cache[table[:, : -(-L // cache.shape[1])].long()]  # (B, n, block_size, Hkv, D)
    return pages.flatten(1, 2)[:, :L].transpose(1, 2).contiguous()


def _flash_attn_baseline(q, k, v, table, lens) -> Optional[Callable]:
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    q_bthd = q.transpose(1, 2)  # flash-attn wants (B, Tq, Hq, D), last dim contiguous

    def call():
        out = flash_attn_with_kvcache(q_bthd, k, v, cache_seqlens=lens, block_table=table, causal=True)
        return out.transpose(1, 2)  # (B, Hq, Tq, D)

    try:
        call()
    except RuntimeError:  # e.g. flash-attn 2's "block size must be divisible by 256"
        return None
    return call


def _case(device, dtype, B, L, block_size, *, Hq=32, Hkv=8, D=128, Tq=1, gen) -> harness.Case:
    q, k, v, table, lens = _paged_inputs(device, dtype, B, Hq, Hkv, D, [L] * B, block_size, Tq, gen)
    elem = q.element_size()
    nbytes = B * L * Hkv * D * 2 * elem + 2 * q.numel() * elem  # K+V read, q read, out written
    baselines = {}
    if Tq == 1:
        G = Hq // Hkv
        kc, vc = _gather_contiguous(k, table, L), _gather_contiguous(v, table, L)
        q_fold = q.reshape(B, Hkv, G, D)  # head hkv * G + g -> (hkv, g): G rows per KV head

        def sdpa():
            out = torch.nn.functional.scaled_dot_product_attention(q_fold, kc, vc)
            return out.reshape(B, Hq, 1, D)

        baselines["sdpa_contiguous"] = sdpa
    if device == "cuda":
        fa = _flash_attn_baseline(q, k, v, table, lens)
        if fa is not None:
            baselines["flash_attn_kvcache"] = fa
    return harness.Case(
        kernel=KERNEL,
        name=f"B{B} Hq{Hq} Hkv{Hkv} D{D} L{L} page{block_size} Tq{Tq}",
        genfuse=lambda: paged_attention(q, k, v, table, lens),
        baselines=baselines,
        flops=0.0,
        bytes=float(nbytes),
        cuda_graph=True,
        check_tol=2e-2 if dtype == torch.bfloat16 else 5e-3,
        meta={"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "seq_len": L, "block_size": block_size, "Tq": Tq},
    )


def cases(device: str, dtype: torch.dtype, size: str) -> List[harness.Case]:
    gen = torch.Generator().manual_seed(0)
    if size == "smoke":
        # Tiny CPU shapes (the interpreter); the baseline is the reference on the same pool.
        out = []
        for B, Hq, Hkv, D, seq_lens, bs, Tq in [(2, 4, 2, 32, [19, 40], 16, 1),
                                                  (3, 6, 2, 16, [5, 33, 64], 8, 2)]:
            q, k, v, table, lens = _paged_inputs(device, dtype, B, Hq, Hkv, D, seq_lens, bs, Tq, gen)
            elem = q.element_size()
            out.append(harness.Case(
                kernel=KERNEL,
                name=f"smoke B{B} Hq{Hq} Hkv{Hkv} D{D} page{bs} Tq{Tq}",
                genfuse=lambda a=(q, k, v, table, lens): paged_attention(*a, num_splits=2),
                baselines={"reference": lambda a=(q, k, v, table, lens): paged_attention_reference(*a)},
                bytes=float(sum(seq_lens) * Hkv * D * 2 * elem + 2 * q.numel() * elem),
                cuda_graph=True,
                meta={"seq_lens": seq_lens, "block_size": bs, "Tq": Tq},
            ))
        return out
    if size == "headline":  # the GPU check (bench/gpu_check.sh): contexts 8k and 32k, batch 8
        return [_case(device, dtype, B, L, 16, gen=gen) for B, L in HEADLINE]
    if size != "full":
        raise ValueError(f"size must be 'full', 'headline' or 'smoke', got {size!r}")
    out = [_case(device, dtype, B, L, 16, gen=gen)
           for B in (1, 8, 32) for L in (4096, 8192, 16384, 32768)]
    out.append(_case(device, dtype, 8, 16384, 256, gen=gen))  # flash-attn 2's page size
    return out
