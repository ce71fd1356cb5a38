"""Benchmark cases for unified_attention (a step's prefill chunks and decodes over the paged cache).

Each case is one step's batch: decode-only, a lone prefill (with or without a cached prefix),
and mixes of one chunk with many decodes, the engine's common step. The floor is reading every
sequence's K and V once plus q and the output, ``bytes = sum_b L_b * Hkv * D * 2 * elem +
2 * N * Hq * D * elem``; the FLOPs are ``4 * D * Hq`` per visible (query, key) pair. A case is
rated in TFLOP/s when its FLOPs outlast its bytes at the reference ceilings (long prefills),
else in GB/s against the copy ceiling (decodes, mixes); ``meta`` keeps both counts.

Baselines, all on the same random data:

* ``sdpa_gathered``: torch SDPA on contiguous copies of each sequence's cache gathered once,
  outside the timed call (the best case for torch: no paging at all). Decodes of equal
  length are one SDPA call with the ``G`` query heads of a KV head folded into the query
  length (exact for one new token); a chunk is one call with its bottom-right causal mask
  (``is_causal`` when it has no prefix) on K/V expanded to ``Hq`` heads; a mix runs both.
* ``paged_attention`` (decode-only cases): genfuse's flash-decoding kernel on the same pool,
  which splits long contexts over programs (unified_attention does not yet, see its module).
* ``genfuse_dense`` (prefill cases): genfuse's ``attention`` on the gathered contiguous K/V:
  what paging through the block table costs against dense tiles.
* ``two_launches`` (mixes): ``attention`` for the chunk plus ``paged_attention`` for the
  decodes, the path without a unified kernel (outputs concatenated: one extra copy of q's size).

genfuse runs with ``validate=False`` and ``max_query_len`` given, as the engine calls it (and as
a CUDA graph requires). Decode-sized steps are timed inside CUDA graphs.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from genfuse.kernels._attention import attention
from genfuse.kernels._decode_attention import paged_attention
from genfuse.kernels._unified_attention import unified_attention, unified_attention_reference

from . import harness

KERNEL = "unified_attention"


def _paged_batch(device, dtype, seqs: Sequence[Tuple[int, int]], Hq, Hkv, D, block_size, gen):
    """``seqs`` = [(cached prefix, new queries)]: each sequence's blocks at random physical places
    of one pool (a real allocator after some churn), ``-1`` past each end of the table."""
    lens = [c + t for c, t in seqs]
    n_blocks = [-(-L // block_size) for L in lens]
    pool = sum(n_blocks)
    dev_gen = torch.Generator(device=device).manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    k = torch.randn(pool, block_size, Hkv, D, generator=dev_gen, device=device, dtype=dtype)
    v = torch.randn(pool, block_size, Hkv, D, generator=dev_gen, device=device, dtype=dtype)
    perm = torch.randperm(pool, generator=gen)
    table = torch.full((len(seqs), max(n_blocks)), -1, dtype=torch.int32)
    start = 0
    for b, n in enumerate(n_blocks):
        table[b, :n] = perm[start:start + n]
        start += n
    q_lens = [t for _, t in seqs]
    q = torch.randn(sum(q_lens), Hq, D, generator=dev_gen, device=device, dtype=dtype)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, table.to(device), torch.tensor(lens, dtype=torch.int32).to(device), qsl.to(device)


def _gather(cache, table, b, L):
    """One sequence's cache as a contiguous (Hkv, L, D) tensor."""
    pages = cache[table[b, : -(-L // cache.shape[1])].long()]  # (n, block_size, Hkv, D)
    return pages.flatten(0, 1)[:L].transpose(0, 1).contiguous()


def _counts(seqs, Hq, Hkv, D, elem):
    pairs = sum(t * c + t * (t + 1) // 2 for c, t in seqs)  # visible (query, key) pairs
    n = sum(t for _, t in seqs)
    flops = 4.0 * D * Hq * pairs
    nbytes = float(sum(c + t for c, t in seqs) * Hkv * D * 2 * elem + 2 * n * Hq * D * elem)
    return flops, nbytes


def _baselines(q, k, v, table, seqs, Hq, Hkv, D, *, dense_peers: bool):
    """SDPA on the gathered cache (and genfuse's two-launch / dense paths) for a batch of any
    number of decodes (equal contexts) and at most one chunk, each group contiguous in q."""
    G = Hq // Hkv
    dec = [b for b, (_, t) in enumerate(seqs) if t == 1]
    chunks = [b for b, (_, t) in enumerate(seqs) if t > 1]
    if len(chunks) > 1 or (dec and chunks and not (chunks[0] == 0 and dec == list(range(1, len(seqs))))):
        raise ValueError("bench batches are decodes only, one chunk only, or one chunk first then decodes")
    if len({seqs[b][0] for b in dec}) > 1:
        raise ValueError("the decodes of a bench batch share one context length (one SDPA call)")
    parts_sdpa, parts_genfuse = [], []
    if chunks:
        c, t = seqs[0]
        S = c + t
        kc, vc = _gather(k, table, 0, S)[None], _gather(v, table, 0, S)[None]  # (1, Hkv, S, D)
        ke, ve = kc.repeat_interleave(G, 1), vc.repeat_interleave(G, 1)  # (1, Hq, S, D)
        qc = q[:t].transpose(0, 1)[None]  # (1, Hq, t, D)
        mask = None if c == 0 else torch.ones(t, S, dtype=torch.bool, device=q.device).tril(diagonal=c)

        def chunk_sdpa():
            out = F.scaled_dot_product_attention(qc, ke, ve, attn_mask=mask, is_causal=mask is None)
            return out[0].transpose(0, 1)  # (t, Hq, D)

        def chunk_genfuse():
            return attention(qc, kc, vc, causal=True)[0].transpose(0, 1)

        parts_sdpa.append(chunk_sdpa)
        parts_genfuse.append(chunk_genfuse)
    if dec:
        L = seqs[dec[0]][0] + 1
        kd = torch.stack([_gather(k, table, b, L) for b in dec])  # (Bd, Hkv, L, D)
        vd = torch.stack([_gather(v, table, b, L) for b in dec])
        row0 = 0 if not chunks else seqs[0][1]
        qd = q[row0:row0 + len(dec)]
        q_fold = qd.view(len(dec), Hkv, G, D)  # head hkv * G + g -> (hkv, g)
        qd4 = qd.unsqueeze(2)  # (Bd, Hq, 1, D)
        tab_d, lens_d = table[dec[0]:dec[-1] + 1], torch.full((len(dec),), L, dtype=torch.int32, device=q.device)

        def dec_sdpa():
            return F.scaled_dot_product_attention(q_fold, kd, vd).reshape(len(dec), Hq, D)

        def dec_genfuse():
            return paged_attention(qd4, k, v, tab_d, lens_d, validate=False).squeeze(2)

        parts_sdpa.append(dec_sdpa)
        parts_genfuse.append(dec_genfuse)

    def run(parts):
        return parts[0]() if len(parts) == 1 else torch.cat([p() for p in parts])

    out = {"sdpa_gathered": lambda: run(parts_sdpa)}
    if dense_peers:
        name = "two_launches" if (dec and chunks) else ("paged_attention" if dec else "genfuse_dense")
        out[name] = lambda: run(parts_genfuse)
    return out


def _case(device, dtype, label, seqs, *, Hq=32, Hkv=8, D=128, block_size=16, gen, cuda_graph=True,
          smoke=False) -> harness.Case:
    q, k, v, table, lens, qsl = _paged_batch(device, dtype, seqs, Hq, Hkv, D, block_size, gen)
    max_q = max(t for _, t in seqs)
    flops, nbytes = _counts(seqs, Hq, Hkv, D, q.element_size())
    baselines = _baselines(q, k, v, table, seqs, Hq, Hkv, D, dense_peers=not smoke)
    if smoke:
        baselines = {"reference": lambda: unified_attention_reference(q, k, v, table, lens, qsl), **baselines}
    n_dec = sum(1 for _, t in seqs if t == 1)
    return harness.Case(
        kernel=KERNEL,
        name=f"{label} Hq{Hq} Hkv{Hkv} D{D} page{block_size}",
        genfuse=lambda: unified_attention(q, k, v, table, lens, qsl, max_query_len=max_q, validate=False),
        baselines=baselines,
        flops=harness.flops_if_compute_bound(flops, nbytes),
        bytes=nbytes,
        cuda_graph=cuda_graph,
        check_tol=2e-2 if dtype == torch.bfloat16 else 5e-3,
        meta={"sequences": len(seqs), "decodes": n_dec, "tokens": int(q.shape[0]),
              "context_tokens": sum(c + t for c, t in seqs), "max_query_len": max_q,
              "Hq": Hq, "Hkv": Hkv, "D": D, "block_size": block_size,
              "attention_flops": flops, "floor_bytes": nbytes},
    )


def cases(device: str, dtype: torch.dtype, size: str) -> List[harness.Case]:
    gen = torch.Generator().manual_seed(0)
    if size == "smoke":
        # Tiny CPU shapes (the interpreter): decodes, a chunk after a prefix, a mix; the
        # baselines are the reference and SDPA on the gathered cache.
        return [
            _case(device, dtype, "smoke decode B3 L19", [(18, 1)] * 3, Hq=4, Hkv=2, D=32, gen=gen, smoke=True),
            _case(device, dtype, "smoke chunk 9 after 20", [(20, 9)], Hq=6, Hkv=2, D=16, block_size=8,
                  gen=gen, smoke=True),
            _case(device, dtype, "smoke mix chunk 5 + 2 decodes", [(0, 5), (30, 1), (30, 1)], Hq=3, Hkv=1,
                  D=16, gen=gen, smoke=True),
        ]
    if size != "full":
        raise ValueError(f"size must be 'full' or 'smoke', got {size!r}")
    mix = [(1536, 512)] + [(2047, 1)] * 63  # one 512-token chunk beside 63 decodes at 2k
    return [
        # Llama-3-8B heads
        _case(device, dtype, "decode B64 L2048", [(2047, 1)] * 64, gen=gen),
        _case(device, dtype, "decode B8 L8192", [(8191, 1)] * 8, gen=gen),
        _case(device, dtype, "prefill T2048", [(0, 2048)], gen=gen, cuda_graph=False),
        _case(device, dtype, "chunk T1024 after 3072", [(3072, 1024)], gen=gen, cuda_graph=False),
        _case(device, dtype, "mix chunk 512 after 1536 + 63 decodes L2048", mix, gen=gen),
        # Llama-3.2-1B heads (the engine benchmark's shape)
        _case(device, dtype, "mix chunk 512 after 1536 + 63 decodes L2048", mix, D=64, gen=gen),
        # SmolLM2-135M heads: a group of 3
        _case(device, dtype, "decode B64 L1024", [(1023, 1)] * 64, Hq=9, Hkv=3, D=64, gen=gen),
    ]
