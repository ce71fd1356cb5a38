"""Decode attention over a paged KV cache (flash-decoding).

Design. Decoding is memory-bound: every step reads each sequence's whole K/V cache to produce
a handful of query rows. The kernel therefore

* reads each K/V position **once per KV head**: one program owns one KV head and stacks its
  whole query group (the ``G = Hq / Hkv`` query heads x ``Tq`` new tokens) as the rows of one
  query tile, so GQA/MQA costs no extra cache traffic;
* splits the keys of each sequence into ``num_splits`` chunks (grid ``(B, Hkv, num_splits)``)
  so that a small batch still fills the GPU; each split writes an fp32 partial output and its
  log-sum-exp, and a second tiny kernel merges the splits. With one split the first kernel
  writes the output directly (``SPLIT`` constexpr) and the merge is skipped;
* gathers the physical cache slot of every position through the block table
  (``block_table[b, pos // page] * page + pos % page``) instead of walking one page per
  iteration: a tile of ``BLOCK_N`` positions may span several pages, so the tile size is tuned
  for bandwidth independently of the page size (16-token pages would otherwise mean 16-key
  tiles), and any page size works, powers of two or not. The page size is a constexpr so that
  ``//`` and ``%`` compile to shifts and masks for the usual power-of-two pages.

Softmax runs online in base 2 (``exp2`` with ``scale * log2(e)`` folded into the scores) and
in fp32; the partial log-sum-exps are base-2 as well.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import _common

_LOG2E = 1.4426950408889634
# Rows of one query tile (query heads of the group x new tokens). 64 rows x 128 dims of fp32
# accumulator is 64 registers per thread at 4 warps; a larger group (MQA with many heads, long
# speculative tails) is cut into several row tiles along grid axis 1, each re-reading the cache.
_MAX_ROWS = 64
_MAX_HEAD_DIM = 256
_MAX_SPLITS = 256
# A split must cover at least this many keys: one split reads >= 256 * D * 2 (K and V) elements
# and writes G * Tq * D fp32 partials, so at 256 keys the partial write and the merge cost a
# few percent of the cache traffic, and fewer keys per split buys no more parallelism.
_MIN_KEYS_PER_SPLIT = 256
_MAX_AUTO_SPLITS = 64
_H100_SMS = 132  # stands in for the SM count when there is no GPU (the interpreter)


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _paged_attention_split_kernel(
    # pointers
    Q, K, V, BlockTable, SeqLens, Out, PartOut, PartLse,
    # sizes
    qk_scale,  # softmax scale * log2(e)
    num_splits, n_row_tiles, Hq, Tq, G,
    # strides (elements)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kblk, stride_kslot, stride_kh, stride_kd,
    stride_vblk, stride_vslot, stride_vh, stride_vd,
    stride_btb, stride_btn, stride_sl,
    stride_ob, stride_oh, stride_ot, stride_od,
    # meta-parameters
    ROWS: tl.constexpr,        # G * Tq: real rows of the query group
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,   # tokens per cache block
    SPLIT: tl.constexpr,       # False: write the output; True: write partials for the merge
    BLOCK_G: tl.constexpr,     # rows per query tile (>= 16 for tl.dot)
    BLOCK_D: tl.constexpr,     # next power of two >= HEAD_DIM (masked)
    BLOCK_N: tl.constexpr,     # key positions per iteration (may span pages)
):
    b = tl.program_id(0)
    hkv = tl.program_id(1) // n_row_tiles
    row_tile = tl.program_id(1) % n_row_tiles
    split = tl.program_id(2)

    # Row r of the tile is query head hkv * G + r // Tq, new token r % Tq.
    rows = row_tile * BLOCK_G + tl.arange(0, BLOCK_G)
    row_ok = rows < ROWS
    g = rows // Tq
    t = rows % Tq
    head = hkv * G + g
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    seq_len = tl.load(SeqLens + b * stride_sl).to(tl.int32)
    # Causal, aligned bottom-right: new token t sits at position seq_len - Tq + t.
    last_visible = seq_len - Tq + t  # [BLOCK_G]

    # This split's share of the sequence, balanced per sequence (no host sync on seq_lens) and
    # rounded to whole tiles; trailing splits of a short sequence are empty.
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    q_ptrs = (Q + b.to(tl.int64) * stride_qb + head[:, None].to(tl.int64) * stride_qh
              + t[:, None] * stride_qt + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    bt_row = BlockTable + b.to(tl.int64) * stride_btb
    k_head = K + hkv.to(tl.int64) * stride_kh
    v_head = V + hkv.to(tl.int64) * stride_vh

    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_ok = pos < end
        # Physical slot of every position; table entries past the sequence are never read.
        page = tl.load(bt_row + (pos // PAGE_SIZE) * stride_btn, mask=pos_ok, other=0).to(tl.int64)
        slot = pos % PAGE_SIZE
        kv_mask = pos_ok[:, None] & d_ok[None, :]
        # int64 offsets: a cache pool may hold more than 2**31 elements.
        k = tl.load(k_head + page[:, None] * stride_kblk + slot[:, None] * stride_kslot
                    + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_head + page[:, None] * stride_vblk + slot[:, None] * stride_vslot
                    + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)

        s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_G, BLOCK_N], base-2 logits
        visible = pos_ok[None, :] & (pos[None, :] <= last_visible[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; shift by 0 instead so that
        # exp2(-inf - -inf) never produces NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # l = 0: no visible key (o = 0, lse = -inf). l = NaN (NaN or +inf scores) is not "no key":
    # its NaN lse must reach the merge and the output, as torch's softmax gives NaN.
    has_keys = l_i != 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out_mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        # Partials are (B, Hq, Tq, num_splits[, D]) contiguous fp32. A split (or a row) that saw
        # no key writes o = 0 and lse = -inf: weight 0 in the merge.
        part_row = ((b.to(tl.int64) * Hq + head) * Tq + t) * num_splits + split  # [BLOCK_G]
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(PartLse + part_row, lse, mask=row_ok)
        tl.store(PartOut + part_row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=out_mask)
    else:
        o_ptrs = (Out + b.to(tl.int64) * stride_ob + head[:, None].to(tl.int64) * stride_oh
                  + t[:, None] * stride_ot + offs_d[None, :] * stride_od)
        tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=out_mask)


@triton.jit
def _paged_attention_merge_kernel(
    # pointers
    PartOut, PartLse, Out,
    # sizes
    num_splits, Hq, Tq,
    # strides of Out (elements)
    stride_ob, stride_oh, stride_ot, stride_od,
    # meta-parameters
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per output row (b, h, t): out = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max).
    row = tl.program_id(0).to(tl.int64)
    t = row % Tq
    h = (row // Tq) % Hq
    b = row // (Tq * Hq)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    lse = tl.load(PartLse + row * num_splits + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # empty splits: 2^-inf = 0
    # Empty splits are not even read: their weight is 0 whatever they hold.
    live = lse > float("-inf")
    o = tl.load(PartOut + (row * num_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                mask=live[:, None] & d_ok[None, :], other=0.0)
    den = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(den > 0.0, den, 1.0)
    tl.store(Out + b * stride_ob + h * stride_oh + t * stride_ot + offs_d * stride_od,
             out.to(Out.dtype.element_ty), mask=d_ok)


def _configs():
    return [
        triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
        for n in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]


# GENFUSE_AUTOTUNE=quick (the GPU check): (BLOCK_N, num_warps, num_stages) per element size and
# head dim class, in order of preference, each compiled for sm_90 by bench/compile_check.py
# (--quick) without spills under triton 3.6 and 3.9 (fp32 64-key tiles on 4 warps spill there,
# so fp32 takes them on 8).
_QUICK = {
    (2, 128): ((64, 4, 2), (128, 8, 2), (32, 4, 3)),
    (2, 256): ((32, 8, 2), (64, 8, 2)),
    (4, 128): ((32, 4, 2), (64, 8, 2)),
    (4, 256): ((32, 8, 2),),
}


def _quick_configs(elem: int, block_d: int) -> tuple:
    return tuple(_common.quick_key({"BLOCK_N": n}, w, s)
                 for n, w, s in _QUICK[(elem, 256 if block_d > 128 else 128)])


def _prune(configs, named_args, **kwargs):
    # K and V tiles of every pipeline stage live in shared memory: keep them under ~160 KiB
    # (H100 has 228 KiB per SM) so that at least one program fits, preferably two.
    elem = named_args["Q"].element_size()
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 256))
    kept = [c for c in configs
            if 2 * c.num_stages * c.kwargs["BLOCK_N"] * block_d * elem <= 160 * 1024]
    return _common.select_quick(kept, _quick_configs(elem, block_d)) or configs[:1]


_paged_attention_split_tuned = triton.autotune(
    configs=_configs(),
    key=["ROWS", "HEAD_DIM", "PAGE_SIZE", "SPLIT", "num_splits"],
    prune_configs_by={"early_config_prune": _prune},
)(_paged_attention_split_kernel)

# The interpreter runs every autotune config, so it gets one fixed, small-but-not-tiny config
# (32-key tiles span pages of 16 and 24 tokens, which the tests rely on).
_INTERPRET_CONFIG = {"BLOCK_N": 32, "num_warps": 4}


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _H100_SMS


def num_splits_heuristic(programs: int, max_keys: int, sm_count: int = _H100_SMS) -> int:
    """Key splits for ``programs`` (batch x KV heads x row tiles) over at most ``max_keys`` keys.

    Enough splits that about four programs per SM are in flight (a 4-warp decode program keeps
    few loads outstanding; it takes several per SM to saturate HBM), but no split shorter than
    ``_MIN_KEYS_PER_SPLIT`` keys and at most ``_MAX_AUTO_SPLITS``. ``max_keys`` comes from the
    block table's width, which the host knows without reading ``seq_lens`` (no sync). E.g. on
    an H100 with Hkv = 8: B=1 at 4k keys -> 16 splits, B=8 -> 9, B=32 -> 3, B=64 -> 1.
    """
    by_fill = -(-4 * sm_count // max(programs, 1))
    by_len = max_keys // _MIN_KEYS_PER_SPLIT
    return max(1, min(by_fill, by_len, _MAX_AUTO_SPLITS))


def _seq_lens_bound(tq: int, width: int, block_size: int) -> str:
    return (f"a sequence holds at least its {tq} new token(s), at most block_table's {width} "
            f"blocks x {block_size} slots")


def _check_indices(block_table, seq_lens, tq: int, num_blocks: int, block_size: int) -> None:
    """``seq_lens`` in ``[max(Tq, 1), width * block_size]`` and every table entry a sequence
    uses in ``[0, num_blocks)``: one masked min/max reduction and one host sync. Entries past
    a sequence's end are never read and may hold anything."""
    B, width = block_table.shape
    if B == 0:
        return
    lo, cap = max(tq, 1), width * block_size
    # Row b reads entry j iff j * block_size < seq_lens[b] (any seq_len, valid or not).
    used = torch.arange(width, device=block_table.device) * block_size < seq_lens.view(B, 1)
    (len_min, len_max), (blk_min, blk_max) = _common.min_max(seq_lens, block_table.where(used, 0))
    if len_min < lo or len_max > cap:
        _common.raise_out_of_range("seq_lens", seq_lens, lo, cap, _seq_lens_bound(tq, width, block_size))
    if blk_min < 0 or blk_max >= num_blocks:
        _common.raise_out_of_range("block_table", block_table, 0, num_blocks - 1,
                                   f"k_cache has {num_blocks} blocks", where=used)


def paged_attention(q, k_cache, v_cache, block_table, seq_lens, *, scale=None, num_splits=None,
                    validate=True, backend=None):
    """Attention of a few new query tokens per sequence over a paged KV cache (decode step).

    ``out[b, h, t] = softmax_j(scale * q[b, h, t] . K_b[j, h // G]) @ V_b[:, h // G]`` over the
    cache positions ``j <= seq_lens[b] - Tq + t`` (causal among the new tokens, aligned
    bottom-right: their keys/values are already the last ``Tq`` entries of the cache), where
    ``K_b[j] = k_cache[block_table[b, j // block_size], j % block_size]`` and ``G = Hq / Hkv``.

    Args:
        q: ``(B, Hq, Tq, D)`` fp16/bf16/fp32, any strides. ``Tq`` = 1 for plain decode.
        k_cache, v_cache: ``(num_blocks, block_size, Hkv, D)`` (flash-attn's paged layout), same
            dtype and device as ``q``, any strides; ``Hq % Hkv == 0``; ``D <= 256``; any
            ``block_size`` (a constexpr: one compile per page size).
        block_table: ``(B, max_blocks_per_seq)`` int32/int64: physical block of each logical
            block, in ``[0, num_blocks)``; entries past a sequence's length are never read
            (may hold garbage).
        seq_lens: ``(B,)`` int32/int64: valid cache tokens per sequence, including the ``Tq``
            new ones: ``max(Tq, 1) <= seq_lens[b] <= max_blocks_per_seq * block_size``.
        scale: softmax scale, a positive finite float; default ``1 / sqrt(D)``.
        num_splits: key splits per sequence (flash-decoding); ``None`` picks
            :func:`num_splits_heuristic` from the table width and the SM count.
        validate: check ``seq_lens`` and the table entries each sequence uses against the
            bounds above (ValueError naming the first bad entry), with one masked min/max
            reduction that syncs the host. A caller whose tables are right by construction
            (the engine's decode step, a CUDA graph capture, which cannot sync) passes
            ``validate=False``; a bad index then reads outside the cache.
        backend: ``None``, ``"triton"`` or ``"torch"`` (see ``_common.resolve_backend``).

    Returns:
        ``(B, Hq, Tq, D)`` in ``q``'s dtype.
    """
    _common.check_tensor("q", q, ndim=4)
    _common.check_tensor("k_cache", k_cache, ndim=4)
    _common.check_tensor("v_cache", v_cache, ndim=4)
    _common.check_same("q", q, k_cache=k_cache, v_cache=v_cache)
    index_dtypes = (torch.int32, torch.int64)
    _common.check_tensor("block_table", block_table, ndim=2, dtypes=index_dtypes)
    _common.check_tensor("seq_lens", seq_lens, ndim=1, dtypes=index_dtypes)
    _common.check_device("q", q, block_table=block_table, seq_lens=seq_lens)
    B, Hq, Tq, D = q.shape
    num_blocks, block_size, Hkv, Dk = k_cache.shape
    _common.check_paged_cache(Hq, D, k_cache, v_cache, _MAX_HEAD_DIM)
    if block_table.shape[0] != B or block_table.shape[1] < 1:
        raise ValueError(f"block_table has shape {tuple(block_table.shape)}; expected ({B}, >=1) for q's batch {B}")
    if seq_lens.shape[0] != B:
        raise ValueError(f"seq_lens has shape {tuple(seq_lens.shape)}; expected ({B},) for q's batch {B}")
    if num_splits is not None:
        if isinstance(num_splits, bool) or not isinstance(num_splits, int):
            raise TypeError(f"num_splits must be None or an int, got {type(num_splits).__name__}")
        if not 1 <= num_splits <= _MAX_SPLITS:
            raise ValueError(f"num_splits is {num_splits}; supported: 1..{_MAX_SPLITS}")
    scale = _common.check_scale(scale, D)
    if validate:
        _check_indices(block_table, seq_lens, Tq, num_blocks, block_size)
    if _common.resolve_backend(backend, q, k_cache, v_cache) == "torch":
        return paged_attention_reference(q, k_cache, v_cache, block_table, seq_lens, scale=scale)

    out = _common.empty((B, Hq, Tq, D), q.dtype, q.device)
    if out.numel() == 0:
        return out
    G = Hq // Hkv
    rows = G * Tq
    block_g = min(max(16, _common.next_power_of_2(rows)), _MAX_ROWS)
    n_row_tiles = triton.cdiv(rows, block_g)
    block_d = max(16, _common.next_power_of_2(D))
    if num_splits is None:
        num_splits = num_splits_heuristic(B * Hkv * n_row_tiles, block_table.shape[1] * block_size,
                                          _sm_count(q.device))
    split = num_splits > 1
    if split:
        # fp32 partials and base-2 log-sum-exps, (B, Hq, Tq, num_splits[, D]) contiguous.
        part_out = _common.empty((B, Hq, Tq, num_splits, D), torch.float32, q.device)
        part_lse = _common.empty((B, Hq, Tq, num_splits), torch.float32, q.device)
    else:
        part_out = part_lse = out  # unused: SPLIT=False compiles those stores away
    grid = (B, Hkv * n_row_tiles, num_splits)
    args = (q, k_cache, v_cache, block_table, seq_lens, out, part_out, part_lse,
            scale * _LOG2E, num_splits, n_row_tiles, Hq, Tq, G,
            *q.stride(), *k_cache.stride(), *v_cache.stride(),
            *block_table.stride(), seq_lens.stride(0), *out.stride())
    meta = dict(ROWS=rows, HEAD_DIM=D, PAGE_SIZE=block_size, SPLIT=split, BLOCK_G=block_g,
                BLOCK_D=block_d)
    _common.launch(_paged_attention_split_kernel, _paged_attention_split_tuned, grid, *args,
                   interpret_meta=_INTERPRET_CONFIG, **meta)
    if split:
        block_s = _common.next_power_of_2(num_splits)
        # A row is at most 256 splits x 256 dims of fp32: 2 warps for small rows, 4 beyond.
        warps = 4 if block_s * block_d >= 8192 else 2
        _common.traceable(_paged_attention_merge_kernel)[(B * Hq * Tq,)](
            part_out, part_lse, out, num_splits, Hq, Tq, *out.stride(),
            HEAD_DIM=D, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=warps)
    return out


# --------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------
def paged_attention_reference(q, k_cache, v_cache, block_table, seq_lens, *, scale=None,
                              num_splits=None):
    """Plain torch: gather each sequence's K/V from the pool, explicit bottom-right causal mask.

    Same arguments as :func:`paged_attention` (``num_splits`` is ignored; ``seq_lens`` is read
    on the host and checked, the table entries are not: see ``validate``). Computes in fp32 for
    fp16/bf16 inputs, in the input dtype otherwise (float64 in tests). The whole batch at once:
    every sequence's first ``max(seq_lens)`` cache slots are gathered and slots past its own
    length are masked; the ``G = Hq / Hkv`` query heads sharing a KV head are stacked as extra
    query rows (a view of ``q``), so K and V are never copied per query head.
    """
    B, Hq, Tq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    if B == 0:
        return q.new_empty(q.shape)
    lens = seq_lens.tolist()  # the host needs the longest length: the reference may sync
    lo, cap = max(Tq, 1), block_table.shape[1] * block_size
    if min(lens) < lo or max(lens) > cap:
        _common.raise_out_of_range("seq_lens", seq_lens, lo, cap,
                                   _seq_lens_bound(Tq, block_table.shape[1], block_size))
    L = max(lens)
    n_blocks = -(-L // block_size)
    blocks = block_table[:, :n_blocks].long()  # (B, n_blocks)
    if min(lens) <= (n_blocks - 1) * block_size:  # a shorter sequence: entries past it may be garbage
        used = torch.arange(n_blocks, device=q.device) * block_size < seq_lens.view(B, 1)
        blocks = blocks.where(used, 0)  # never read them
    k = k_cache[blocks].reshape(B, n_blocks * block_size, Hkv, D)[:, :L].to(compute)  # (B, L, Hkv, D)
    v = v_cache[blocks].reshape(B, n_blocks * block_size, Hkv, D)[:, :L].to(compute)
    if min(lens) < L:
        # Slots past a shorter sequence's end may hold anything: a NaN there would leak into the
        # output through 0 * NaN in p @ v, where the kernel never loads them.
        past = torch.arange(L, device=q.device) >= seq_lens.view(B, 1)  # (B, L)
        v = v.masked_fill(past[:, :, None, None], 0)
    qg = q.to(compute).reshape(B, Hkv, G * Tq, D)  # query head h = kv * G + g
    scores = (qg @ k.permute(0, 2, 3, 1)).mul_(scale)  # (B, Hkv, G * Tq, L)
    if Tq > 1 or min(lens) < L:  # else every key is visible to every query: no mask
        t = torch.arange(Tq, device=q.device).view(1, Tq, 1)
        j = torch.arange(L, device=q.device).view(1, 1, L)
        hidden = j > seq_lens.view(B, 1, 1) - Tq + t  # (B, Tq, L)
        scores.view(B, Hkv, G, Tq, L).masked_fill_(hidden[:, None, None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v.transpose(1, 2)  # (B, Hkv, G * Tq, D)
    return out.view(B, Hq, Tq, D).to(q.dtype)
