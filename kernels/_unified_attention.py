"""Attention for a flat step batch over the paged KV cache: prefill chunks and decodes in one launch.

The engine's step hands every scheduled token over at once: ``q`` is ``(N, Hq, D)``, sequence
``b`` owns the rows ``query_start_loc[b]:query_start_loc[b + 1]`` and they are its *last*
``q_len_b`` tokens (a whole prompt, the next chunk of a prompt whose prefix is cached, or one
decode token). Their K/V are already in the cache (``write_kv_cache``), so every query only
reads the pool, through its sequence's block table, causal bottom-right.

Design (after vLLM's Triton ``unified_attention``, written anew here):

* Grid ``(query tiles across all sequences, Hkv x head tiles)``. A program owns ``BLOCK_Q``
  consecutive queries of one sequence and the ``GT`` query heads of one KV head's group that
  its head tile covers, stacked as the ``BLOCK_M = BLOCK_Q * GT`` rows of one query tile
  (row ``r`` = query ``r // GT``, head ``r % GT``). So GQA costs no extra cache traffic and a
  decode row (``q_len`` 1) still fills a ``tl.dot`` tile with its ``G`` heads.
* The host does not read ``query_start_loc`` (that would sync): the grid has the upper bound
  ``N // BLOCK_Q + B`` tiles, where sequence ``b``'s tiles start at ``query_start_loc[b] //
  BLOCK_Q + b``; each program finds its sequence by binary search on that and the surplus
  programs return at once.
* Keys are walked in ``BLOCK_N`` tiles gathered through the table
  (``block_table[b, pos // page] * page + pos % page``, as in ``decode_attention``), so the
  tile size is tuned independently of the page size. Two stages as in ``attention``: the keys
  every row of the tile sees whole (no mask work), then the causal diagonal and the ragged end.
* Online softmax in base 2 and fp32, fp32 accumulation.

``BLOCK_M`` follows the longest query of the step: 16 rows when every sequence decodes (the
decode step is memory-bound: the rows are there for ``tl.dot``), up to 64 for short chunks,
and 64 or 128 (autotuned) for prefill. Pass ``max_query_len`` from the scheduler: without it
(and with ``validate=False``) the launcher must assume ``N``.

Compile check (2026-12-01, no GPU): the interpreter configs and a spread of the pruned tuned
configs (fp16/bf16/fp32; D 64, 80, 128, 256; groups 3, 4 and 72; pages 16 and 24) lower to
sm_90 cubins under triton 3.6 and 3.9 with bench/compile_check.py's machinery, none over the
shared memory limit, a few small-tile configs spilling 4-8 bytes; every
GENFUSE_AUTOTUNE=quick config (79 compiles) is spill-free under both.

Not done yet: a split-K (flash-decoding) variant. A decode-only step runs ``B x Hkv``
programs that each walk their whole context, which leaves an H100 mostly idle for a few long
sequences; ``paged_attention`` (decode_attention.py) splits the keys and is the better call
for small decode-only batches until this kernel gets the same split.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _common

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256
# Rows of one query tile when the step is not a prefill: 64 rows x 256 dims of fp32 accumulator
# is 128 registers per thread at 4 warps (decode_attention's limit too). A query group larger
# than this (MQA with many heads) is cut into head tiles, each re-reading the cache.
_MAX_ROWS = 64
_INDEX_DTYPES = (torch.int32, torch.int64)
_REFERENCE_DTYPES = _common.FLOAT_DTYPES + (torch.float64,)  # the tests' float64 oracle


# --------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------
@triton.jit
def _find_sequence(QueryStartLoc, stride_qsl, idx, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence b whose first query tile ``query_start_loc[b] // BLOCK_Q + b`` <= idx."""
    lo = idx * 0
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(QueryStartLoc + mid * stride_qsl).to(tl.int32) // BLOCK_Q + mid
        if first_tile <= idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _key_loop(
    acc, l_i, m_i, q, last_visible,
    k_head, v_head, bt_row,
    stride_kblk, stride_kslot, stride_kd,
    stride_vblk, stride_vslot, stride_vd,
    stride_btn,
    lo, hi, qk_scale,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    MASKED: tl.constexpr,      # causal / key-range mask: the diagonal and ragged tiles only
    EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            pos_ok = pos < hi
            page = tl.load(bt_row + (pos // PAGE_SIZE) * stride_btn, mask=pos_ok, other=0).to(tl.int64)
            kt_mask = d_ok[:, None] & pos_ok[None, :]
            v_mask = pos_ok[:, None] & d_ok[None, :]
        else:
            # Every position is < hi <= seq_len: table entries are in use, no mask needed.
            page = tl.load(bt_row + (pos // PAGE_SIZE) * stride_btn).to(tl.int64)
            kt_mask = d_ok[:, None]
            v_mask = d_ok[None, :]
        slot = pos % PAGE_SIZE
        # K gathered already transposed (BLOCK_D, BLOCK_N) so q @ kt needs no shuffle; int64
        # offsets (page is int64): a pool may hold more than 2**31 elements.
        kt_ptrs = k_head + page[None, :] * stride_kblk + slot[None, :] * stride_kslot + offs_d[:, None] * stride_kd
        v_ptrs = v_head + page[:, None] * stride_vblk + slot[:, None] * stride_vslot + offs_d[None, :] * stride_vd
        if EVEN_D and not MASKED:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        else:
            kt = tl.load(kt_ptrs, mask=kt_mask, other=0.0)
            v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        s = tl.dot(q, kt) * qk_scale  # (BLOCK_M, BLOCK_N) fp32, log2 units
        if MASKED:
            visible = pos_ok[None, :] & (pos[None, :] <= last_visible[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no visible key yet keeps m = -inf; shift by 0 instead so
            # that exp2(-inf - -inf) never makes a NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = m_new
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _unified_attention_kernel(
    # pointers
    Q, K, V, BlockTable, SeqLens, QueryStartLoc, Out,
    # sizes
    qk_scale,  # softmax scale * log2(e)
    num_seqs, num_tokens, n_head_tiles,
    # strides (elements)
    stride_qn, stride_qh, stride_qd,
    stride_kblk, stride_kslot, stride_kh, stride_kd,
    stride_vblk, stride_vslot, stride_vh, stride_vd,
    stride_btb, stride_btn, stride_sl, stride_qsl,
    stride_on, stride_oh, stride_od,
    # meta-parameters
    G: tl.constexpr,           # query heads per KV head
    GT: tl.constexpr,          # query heads per tile (G, or _MAX_ROWS when the group is larger)
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,   # tokens per cache block: // and % become shifts for powers of two
    EVEN_D: tl.constexpr,      # HEAD_DIM == BLOCK_D: no head-dim masks
    BLOCK_D: tl.constexpr,     # next power of two >= HEAD_DIM, at least 16 (tl.dot)
    BLOCK_M: tl.constexpr,     # rows per query tile = BLOCK_Q queries x GT heads (+ padding)
    BLOCK_N: tl.constexpr,     # key positions per iteration (may span pages)
):
    BLOCK_Q: tl.constexpr = BLOCK_M // GT
    tile = tl.program_id(0)
    hkv = tl.program_id(1) // n_head_tiles
    head_tile = tl.program_id(1) % n_head_tiles

    b = _find_sequence(QueryStartLoc, stride_qsl, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(QueryStartLoc + b * stride_qsl).to(tl.int32)
    q_len = tl.load(QueryStartLoc + (b + 1) * stride_qsl).to(tl.int32) - q_start
    q0 = (tile - (q_start // BLOCK_Q + b)) * BLOCK_Q  # first query of this tile, within b
    if q0 >= q_len:
        return  # surplus tile of the upper-bound grid (or a sequence with no queries)
    seq_len = tl.load(SeqLens + b * stride_sl).to(tl.int32)
    context = seq_len - q_len  # cached tokens before this step's queries

    rows = tl.arange(0, BLOCK_M)
    qpos = q0 + rows // GT
    g = head_tile * GT + rows % GT
    tok = q_start + qpos
    # (tok < num_tokens only matters for an unvalidated, malformed query_start_loc: no reads
    # past q then.)
    row_ok = (rows < BLOCK_Q * GT) & (qpos < q_len) & (g < G) & (tok < num_tokens)
    head = hkv * G + g
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = (Q + tok[:, None].to(tl.int64) * stride_qn + head[:, None].to(tl.int64) * stride_qh
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    # Bottom-right causal: query qpos sees keys j <= context + qpos.
    last_visible = context + qpos
    # Keys [0, full) are seen whole by every row of the tile (its first query sees up to
    # context + q0), [full, hi) need the mask; hi is one past the last query's last key.
    full = tl.minimum(tl.maximum(context + q0 + 1, 0), seq_len)
    full = (full // BLOCK_N) * BLOCK_N
    hi = tl.minimum(context + tl.minimum(q0 + BLOCK_Q, q_len), seq_len)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row = BlockTable + b.to(tl.int64) * stride_btb
    k_head = K + hkv.to(tl.int64) * stride_kh
    v_head = V + hkv.to(tl.int64) * stride_vh
    acc, l_i, m_i = _key_loop(
        acc, l_i, m_i, q, last_visible, k_head, v_head, bt_row,
        stride_kblk, stride_kslot, stride_kd, stride_vblk, stride_vslot, stride_vd, stride_btn,
        0, full, qk_scale, HEAD_DIM, PAGE_SIZE, False, EVEN_D, BLOCK_N, BLOCK_D)
    acc, l_i, m_i = _key_loop(
        acc, l_i, m_i, q, last_visible, k_head, v_head, bt_row,
        stride_kblk, stride_kslot, stride_kd, stride_vblk, stride_vslot, stride_vd, stride_btn,
        full, hi, qk_scale, HEAD_DIM, PAGE_SIZE, True, EVEN_D, BLOCK_N, BLOCK_D)

    # Every valid row sees key 0; l = 0 only for rows of malformed unvalidated input: 0 there.
    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_ptrs = (Out + tok[:, None].to(tl.int64) * stride_on + head[:, None].to(tl.int64) * stride_oh
              + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------
# Tuning (CUDA only; the interpreter runs one fixed config)
# --------------------------------------------------------------------------------------
def _configs(block_ms=None):
    """BLOCK_N x warps x stages, times BLOCK_M when the host leaves it to the tuner (prefill)."""
    return [
        triton.Config({"BLOCK_N": bn, **({} if bm is None else {"BLOCK_M": bm})}, num_warps=w, num_stages=s)
        for bm in (block_ms or (None,)) for bn in (16, 32, 64, 128) for w in (4, 8) for s in (2, 3)
    ]


# GENFUSE_AUTOTUNE=quick (the GPU check): (BLOCK_M, BLOCK_N, num_warps, num_stages) per element
# size, head dim class and query tile (host rows <= 32, host rows 64, prefill where BLOCK_M is
# tuned), in order of preference; none spilled in the sm_90 compile check under triton 3.6 or
# 3.9 (see the module docstring; BLOCK_M None = the host's).
_QUICK = {
    (2, 128, "rows16"): ((None, 64, 4, 3), (None, 32, 4, 2)),
    (2, 128, "rows64"): ((None, 32, 8, 2), (None, 64, 8, 3), (None, 16, 4, 2)),
    (2, 128, "prefill"): ((64, 32, 8, 3), (128, 16, 8, 2), (128, 64, 8, 3)),
    (2, 256, "rows16"): ((None, 32, 4, 3), (None, 32, 4, 2)),
    (2, 256, "rows64"): ((None, 32, 8, 2), (None, 32, 8, 3)),
    (2, 256, "prefill"): ((128, 16, 8, 3), (64, 32, 8, 3)),
    (4, 128, "rows16"): ((None, 32, 4, 2),),
    (4, 128, "rows64"): ((None, 32, 8, 3), (None, 16, 4, 2)),
    (4, 128, "prefill"): ((64, 32, 4, 3), (64, 32, 8, 3)),
    (4, 256, "rows16"): ((None, 16, 4, 3), (None, 16, 4, 2)),
    (4, 256, "rows64"): ((None, 16, 8, 2),),
    (4, 256, "prefill"): ((64, 16, 8, 2),),
}


def _quick_configs(elem: int, block_d: int, host_block_m) -> tuple:
    rows = "prefill" if host_block_m is None else ("rows16" if host_block_m <= 32 else "rows64")
    return tuple(_common.quick_key({"BLOCK_N": n, **({} if m is None else {"BLOCK_M": m})}, w, s)
                 for m, n, w, s in _QUICK[(min(elem, 4), 256 if block_d > 128 else 128, rows)])


def _prune(configs, named_args, **kwargs):
    """Drop configs that cannot fit or would spill (limits read off sm_90 cubins for
    attention.py's kernel, whose tiles and two key loops this kernel shares):

    * shared memory: the q tile plus K and V stage buffers of both key loops (triton 3.6
      gives each loop its own) under the device's opt-in limit;
    * registers: fp32 accumulator + score tile, BLOCK_M x (BLOCK_D + BLOCK_N) values, under
      136 per thread for 16-bit inputs and 80 for fp32 (tf32): attention's 144 spilled here
      (D=256, 64 x 32 on 4 warps: 40 bytes under triton 3.9).
    """
    elem = named_args["Q"].element_size()
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    limit = 136 if elem == 2 else 80
    try:
        smem = torch.cuda.get_device_properties(named_args["Q"].device).shared_memory_per_block_optin
    except Exception:  # pragma: no cover - not a CUDA tensor
        smem = 227 * 1024
    kept = []
    for c in configs:
        bm = c.kwargs.get("BLOCK_M", kwargs.get("BLOCK_M"))
        bn = c.kwargs["BLOCK_N"]
        if elem * (bm * block_d + 2 * c.num_stages * 2 * bn * block_d) > smem:
            continue
        if bm * (block_d + bn) > limit * 32 * c.num_warps:
            continue
        if c.num_warps == 8 and bm * bn < 2048:  # under 8 scores a thread: 8 warps only add sync
            continue
        kept.append(c)
    if kept:
        return _common.select_quick(kept, _quick_configs(elem, block_d, kwargs.get("BLOCK_M")))
    # 64 rows x 16 keys on 8 warps fits every head dim <= 256 in any dtype.
    fallback = {"BLOCK_N": 16} if "BLOCK_M" in kwargs else {"BLOCK_M": 64, "BLOCK_N": 16}
    return [triton.Config(fallback, num_warps=8, num_stages=2)]


_KEY = ["G", "GT", "HEAD_DIM", "PAGE_SIZE"]
# BLOCK_M chosen by the host (decode / short chunks): tuned per BLOCK_M.
_tuned_rows = triton.autotune(configs=_configs(), key=_KEY + ["BLOCK_M"],
                              prune_configs_by={"early_config_prune": _prune})(_unified_attention_kernel)
# Prefill (more than _MAX_ROWS rows of some sequence): BLOCK_M tuned too; the grid follows it.
_tuned_prefill = triton.autotune(configs=_configs((64, 128)), key=_KEY,
                                 prune_configs_by={"early_config_prune": _prune})(_unified_attention_kernel)

# The interpreter runs numpy per block: 32-key tiles span 16- and 24-token pages and at most
# 32 rows make a prefill of a few dozen tokens several query tiles (the tests rely on both).
_INTERPRET_BLOCK_N = 32
_INTERPRET_MAX_ROWS = 32


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
def _check_inputs(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, scale, max_query_len,
                  dtypes=_common.FLOAT_DTYPES):
    """Shape, dtype and device checks (no host sync); returns the scale."""
    _common.check_tensor("q", q, ndim=3, dtypes=dtypes)
    _common.check_tensor("k_cache", k_cache, ndim=4, dtypes=dtypes)
    _common.check_tensor("v_cache", v_cache, ndim=4, dtypes=dtypes)
    _common.check_same("q", q, k_cache=k_cache, v_cache=v_cache)
    _common.check_tensor("block_table", block_table, ndim=2, dtypes=_INDEX_DTYPES)
    _common.check_tensor("seq_lens", seq_lens, ndim=1, dtypes=_INDEX_DTYPES)
    _common.check_tensor("query_start_loc", query_start_loc, ndim=1, dtypes=_INDEX_DTYPES)
    _common.check_device("q", q, block_table=block_table, seq_lens=seq_lens, query_start_loc=query_start_loc)
    N, Hq, D = q.shape
    num_blocks, block_size, Hkv, Dk = k_cache.shape
    B = seq_lens.shape[0]
    _common.check_paged_cache(Hq, D, k_cache, v_cache, _MAX_HEAD_DIM)
    if block_table.shape[0] != B or block_table.shape[1] < 1:
        raise ValueError(f"block_table has shape {tuple(block_table.shape)}; expected ({B}, >=1) "
                         f"for seq_lens' {B} sequences")
    if query_start_loc.shape[0] != B + 1:
        raise ValueError(f"query_start_loc has {query_start_loc.shape[0]} entries; expected {B + 1} "
                         f"(one more than seq_lens' {B} sequences)")
    if B == 0 and N > 0:
        raise ValueError(f"q has {N} tokens but seq_lens names no sequence")
    if max_query_len is not None:
        if isinstance(max_query_len, bool) or not isinstance(max_query_len, int):
            raise TypeError(f"max_query_len must be None or an int, got {type(max_query_len).__name__}")
        if max_query_len < 0:
            raise ValueError(f"max_query_len is {max_query_len}; it must be >= 0")
    return _common.check_scale(scale, D)


def _check_data(q, k_cache, block_table, seq_lens, query_start_loc, max_query_len) -> int:
    """The checks that read the index tensors (one host sync); returns the longest query."""
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        raise ValueError("validate=True reads the index tensors on the host, which a CUDA graph "
                         "capture cannot do; pass validate=False for trusted tables")
    N = q.shape[0]
    num_blocks, block_size = k_cache.shape[:2]
    B, width = block_table.shape
    capacity = width * block_size
    qsl, lens = query_start_loc.long(), seq_lens.long()
    q_lens = qsl[1:] - qsl[:-1]
    used = torch.arange(width, device=q.device) * block_size < lens[:, None]  # (B, width)
    bad_entry = used & ((block_table < 0) | (block_table >= num_blocks))
    flags = torch.stack([x.long() for x in (
        qsl[0] != 0, qsl[-1] != N, (q_lens < 0).any(), (lens < 0).any(), (lens < q_lens).any(),
        (lens > capacity).any(), bad_entry.any(), q_lens.max())])  # (B >= 1: N > 0 here)
    (start_bad, end_bad, not_monotone, negative, too_short, too_long, entry_bad,
     longest) = flags.tolist()
    if start_bad:
        raise ValueError(f"query_start_loc[0] is {int(qsl[0])}; it must be 0")
    if end_bad:
        raise ValueError(f"query_start_loc[-1] is {int(qsl[-1])} but q has {N} tokens")
    if not_monotone:
        b = int((q_lens < 0).nonzero()[0, 0])
        raise ValueError(f"query_start_loc decreases: query_start_loc[{b + 1}] = {int(qsl[b + 1])} "
                         f"< query_start_loc[{b}] = {int(qsl[b])}")
    if negative:
        b = int((lens < 0).nonzero()[0, 0])
        raise ValueError(f"seq_lens[{b}] is {int(lens[b])}; it must be >= 0")
    if too_short:
        b = int((lens < q_lens).nonzero()[0, 0])
        raise ValueError(f"seq_lens[{b}] = {int(lens[b])} is less than sequence {b}'s {int(q_lens[b])} "
                         f"queries (seq_lens counts the new tokens too)")
    if too_long:
        b = int((lens > capacity).nonzero()[0, 0])
        raise ValueError(f"seq_lens[{b}] = {int(lens[b])} is past block_table's capacity "
                         f"{width} blocks x {block_size} = {capacity}")
    if entry_bad:
        b, j = (int(x) for x in bad_entry.nonzero()[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(block_table[b, j])} is outside the cache's "
                         f"{num_blocks} blocks (sequence {b} of length {int(lens[b])} uses it)")
    if max_query_len is not None and longest > max_query_len:
        b = int((q_lens > max_query_len).nonzero()[0, 0])
        raise ValueError(f"sequence {b} has {int(q_lens[b])} queries, more than max_query_len = {max_query_len}")
    return int(longest)


def unified_attention(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, *, scale=None,
                      max_query_len=None, validate=True, backend=None):
    """Causal attention of a flat batch of prefill chunks and decode tokens over a paged KV cache.

    For sequence ``b`` with queries ``q[s:e]`` (``s, e = query_start_loc[b], query_start_loc[b+1]``,
    ``q_len = e - s``) and ``L = seq_lens[b]`` cached tokens including those ``q_len``:
    ``out[s + i, h] = softmax_j(scale * q[s + i, h] . K_b[j, h // G]) @ V_b[:, h // G]`` over
    ``j <= L - q_len + i`` (bottom-right causal: the queries are the sequence's last tokens),
    with ``K_b[j] = k_cache[block_table[b, j // block_size], j % block_size]`` and
    ``G = Hq / Hkv``.

    Args:
        q: ``(N, Hq, D)`` fp16/bf16/fp32, any strides (e.g. a slice of a packed QKV projection).
        k_cache, v_cache: ``(num_blocks, block_size, Hkv, D)``, same dtype and device as ``q``,
            any strides; ``Hq % Hkv == 0``; ``1 <= D <= 256`` (non-powers of two masked); any
            ``block_size`` (a constexpr: one compile per page size).
        block_table: ``(B, max_blocks_per_seq)`` int32/int64; entries past a sequence's
            ``ceil(L / block_size)`` blocks are never read (may hold garbage).
        seq_lens: ``(B,)`` int32/int64, ``q_len <= L <= max_blocks_per_seq * block_size``.
        query_start_loc: ``(B + 1,)`` int32/int64, non-decreasing from 0 to ``N``; a sequence
            with ``q_len = 0`` produces no rows.
        scale: softmax scale, default ``1 / sqrt(D)``.
        max_query_len: the longest ``q_len`` of the step, if the caller knows it (the
            scheduler does): picks the query tile (16 rows for a decode-only step); the result
            never depends on it. ``None``: read from the data when validating, else ``N``.
        validate: run the checks that read the index tensors (one host sync): query_start_loc
            starts at 0, ends at ``N`` and never decreases; ``q_len <= L <= capacity``; table
            entries in use lie in ``[0, num_blocks)``; ``q_len <= max_query_len``. ``False``
            trusts the caller (the engine builds the tables); shapes, dtypes and devices are
            always checked.
        backend: ``None``, ``"triton"`` or ``"torch"`` (see ``_common.resolve_backend``).

    Returns:
        ``(N, Hq, D)`` in ``q``'s dtype, contiguous.
    """
    scale = _check_inputs(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, scale, max_query_len)
    use_torch = _common.resolve_backend(backend, q, k_cache, v_cache) == "torch"
    N, Hq, D = q.shape
    if N == 0:
        return _common.empty((0, Hq, D), q.dtype, q.device)
    if validate:
        max_query_len = _check_data(q, k_cache, block_table, seq_lens, query_start_loc, max_query_len)
    if use_torch:
        return _torch_sdpa(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, scale)

    B = seq_lens.shape[0]
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    GT = min(G, _MAX_ROWS)
    n_head_tiles = triton.cdiv(G, GT)
    longest = N if max_query_len is None else max(1, min(max_query_len, N))
    block_d = max(16, _common.next_power_of_2(D))
    out = _common.empty((N, Hq, D), q.dtype, q.device)
    args = (q, k_cache, v_cache, block_table, seq_lens, query_start_loc, out,
            scale * _LOG2E, B, N, n_head_tiles,
            *q.stride(), *k_cache.stride(), *v_cache.stride(),
            *block_table.stride(), seq_lens.stride(0), query_start_loc.stride(0), *out.stride())
    meta = dict(G=G, GT=GT, HEAD_DIM=D, PAGE_SIZE=block_size, EVEN_D=(D == block_d), BLOCK_D=block_d)
    rows = longest * GT
    # Upper bound on the query tiles: sequence b's first tile is query_start_loc[b] // BLOCK_Q + b.
    grid = lambda META: (N // (META["BLOCK_M"] // GT) + B, Hkv * n_head_tiles)  # noqa: E731
    if _common.INTERPRET:
        block_m = max(16, min(_common.next_power_of_2(rows), _INTERPRET_MAX_ROWS), _common.next_power_of_2(GT))
        cfg = dict(meta, BLOCK_M=block_m, BLOCK_N=_INTERPRET_BLOCK_N)
        _common.traceable(_unified_attention_kernel)[grid(cfg)](*args, **cfg, num_warps=4)
    elif rows > _MAX_ROWS:  # (traceable: wrap_triton while torch.compile traces the triton_op)
        _common.traceable(_tuned_prefill)[grid](*args, **meta)
    else:
        block_m = max(16, _common.next_power_of_2(rows), _common.next_power_of_2(GT))
        _common.traceable(_tuned_rows)[grid](*args, **meta, BLOCK_M=block_m)
    return out


# --------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------
def _reference(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, scale):
    """Sequences grouped by query length, each group one batched computation: a decode-only
    step is one group (as ``paged_attention_reference``), a mixed step one group for the
    decodes plus one per distinct chunk length. Within a group the sequences' first
    ``max(L)`` cache slots are gathered and the bottom-right causal mask is explicit. The
    work is laid out KV-head-major, ``(Hkv, Bg, ...)``: the used blocks are gathered and made
    contiguous in that order, so both matmuls read them in place (no per-head copies)."""
    N, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    compute = torch.promote_types(q.dtype, torch.float32)
    out = _common.empty((N, Hq, D), q.dtype, q.device)
    if N == 0:
        return out
    starts = query_start_loc.long()
    q_lens = (starts[1:] - starts[:-1]).tolist()  # the reference may sync the host
    lens_all = seq_lens.long()
    lens_host = lens_all.tolist()
    groups = {}
    for b, tq in enumerate(q_lens):
        if tq > 0:
            groups.setdefault(tq, []).append(b)
    for tq, members in groups.items():
        Bg = len(members)
        idx = torch.tensor(members, device=q.device)
        lens = lens_all[idx]  # (Bg,)
        L = max(lens_host[b] for b in members)
        ragged = min(lens_host[b] for b in members) < L
        n_blocks = -(-L // block_size)
        blocks = block_table[idx, :n_blocks].long()  # (Bg, n_blocks)
        if ragged:
            # A shorter sequence: its entries past its end may be garbage; never gather them.
            in_use = torch.arange(n_blocks, device=q.device) * block_size < lens[:, None]
            blocks = blocks.where(in_use, 0)
        # Gather the used blocks in the pool's own layout (an index_select along a permuted
        # view copies the whole pool first), then lay out only them KV-head-major.
        flat = blocks.flatten()
        k = k_cache[flat].reshape(Bg, n_blocks * block_size, Hkv, D)[:, :L].permute(2, 0, 1, 3)
        v = v_cache[flat].reshape(Bg, n_blocks * block_size, Hkv, D)[:, :L].permute(2, 0, 1, 3)
        k = k.to(compute, memory_format=torch.contiguous_format)  # (Hkv, Bg, L, D)
        v = v.to(compute, memory_format=torch.contiguous_format)
        rows = (starts[idx][:, None] + torch.arange(tq, device=q.device)).reshape(-1)  # (Bg * tq,)
        qg = q.index_select(0, rows).to(compute).view(Bg, tq, Hkv, G, D)
        qg = qg.permute(2, 0, 3, 1, 4).reshape(Hkv, Bg, G * tq, D)  # query head h = kv * G + g
        scores = (qg @ k.transpose(-1, -2)).mul_(scale)  # (Hkv, Bg, G * tq, L)
        if ragged:
            # Slots past a shorter sequence's end were never written (NaN in a fresh pool):
            # its softmax weight there is 0, but 0 * NaN is NaN, so zero those values.
            past_end = torch.arange(L, device=q.device) >= lens[:, None]  # (Bg, L)
            v.masked_fill_(past_end[None, :, :, None], 0.0)  # v is the gather's own copy
        if tq > 1 or ragged:  # else every key is visible
            t = torch.arange(tq, device=q.device).view(1, tq, 1)
            j = torch.arange(L, device=q.device).view(1, 1, L)
            hidden = j > lens.view(Bg, 1, 1) - tq + t  # (Bg, tq, L)
            scores.view(Hkv, Bg, G, tq, L).masked_fill_(hidden[None, :, None], float("-inf"))
        o = torch.softmax(scores, dim=-1) @ v  # (Hkv, Bg, G * tq, D)
        o = o.view(Hkv, Bg, G, tq, D).permute(1, 3, 0, 2, 4).reshape(Bg * tq, Hq, D).to(q.dtype)
        if Bg * tq == N:  # one group holds every row, in order (query_start_loc is monotone)
            return o
        out.index_copy_(0, rows, o)
    return out


# A bucket of sequences padded to its longest may hold at most this much more than their lengths
# (the gather copies the padding too): sequences of a step sorted by length split into a few.
_TORCH_PAD_SLACK = 1.25


def _length_buckets(members: list[int], lens: list[int]) -> list[list[int]]:
    """``members`` (sequences of one query length) split so that each bucket's
    ``len(bucket) * max length <= _TORCH_PAD_SLACK * sum of lengths``; longest first."""
    order = sorted(members, key=lambda b: -lens[b])
    buckets, cur, total = [], [], 0
    for b in order:
        if cur and (len(cur) + 1) * lens[cur[0]] > _TORCH_PAD_SLACK * (total + lens[b]):
            buckets.append(cur)
            cur, total = [], 0
        cur.append(b)
        total += lens[b]
    return buckets + [cur]


def _torch_sdpa(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, scale):
    """The torch backend (what the CPU runtime runs). Sequences are grouped by query length as in
    `_reference`, each group split into buckets of similar lengths (`_length_buckets`: the
    gather copies a bucket padded to its longest), and each bucket is one
    ``scaled_dot_product_attention`` call instead of ~25 small ops, memory-linear in the context
    (SDPA's CPU kernel is blockwise; only a boolean ``(q_len, L)`` mask is built, and none for
    decodes of equal length or a whole prompt). Rows are views when a bucket's sequences are
    consecutive (a decode-only step of equal lengths, a lone prefill).
    Checked against `_reference` (float64) in tests/kernels/test_unified_attention.py."""
    N, Hq, D = q.shape
    dev = q.device
    starts = query_start_loc.tolist()  # the torch path may sync the host
    lens = seq_lens.tolist()
    groups = {}
    for b in range(len(lens)):
        tq = starts[b + 1] - starts[b]
        if tq > 0:
            groups.setdefault(tq, []).append(b)
    out = None
    for tq, members in groups.items():
        for bucket in (_length_buckets(members, lens) if len(members) > 1 else [members]):
            o, rows = _sdpa_bucket(q, k_cache, v_cache, block_table, lens, starts, bucket, tq, scale)
            if isinstance(rows, slice) and o.shape[0] == N:  # one bucket holds every row, in order
                return o
            if out is None:
                out = _common.empty((N, Hq, D), q.dtype, dev)
            if isinstance(rows, slice):
                out[rows] = o
            else:
                out.index_copy_(0, rows, o)
    return out


def _sdpa_bucket(q, k_cache, v_cache, block_table, lens, starts, members, tq, scale):
    """One SDPA call for ``members`` (sequences with ``tq`` queries each, longest first).
    Returns the ``(len(members) * tq, Hq, D)`` output and its rows of ``q`` (a slice or an index)."""
    _, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    dev = q.device
    Bg = len(members)
    L = max(lens[b] for b in members)
    n_blocks = -(-L // block_size)
    if Bg == 1:
        flat = block_table[members[0], :n_blocks]
    else:
        idx = torch.tensor(members, device=dev)
        flat = block_table[idx, :n_blocks]
        # A shorter sequence's entries past its end may be garbage: never gather them.
        short = [lens[b] for b in members]
        if short[-1] < L:
            in_use = torch.arange(n_blocks, device=dev) * block_size < torch.tensor(short, device=dev)[:, None]
            flat = flat.where(in_use, 0)
        flat = flat.flatten()
    # The gather's own copies; index_select copies whole blocks (4-5x faster than k_cache[flat]).
    k = k_cache.index_select(0, flat).view(Bg, n_blocks * block_size, Hkv, D)[:, :L]
    v = v_cache.index_select(0, flat).view(Bg, n_blocks * block_size, Hkv, D)[:, :L]
    mask, causal = None, False
    ragged = Bg > 1 and lens[members[-1]] < L
    if ragged:
        # Slots past a shorter sequence's end were never written (NaN in a fresh pool): the mask
        # adds -inf to their scores, but NaN + -inf and 0 * NaN are NaN, so zero them (an index
        # over the padding only, not a pass over the bucket).
        lens_g = torch.tensor([lens[b] for b in members], device=dev)
        past_end = torch.arange(L, device=dev) >= lens_g[:, None]  # (Bg, L)
        pad = past_end.nonzero(as_tuple=True)
        k[pad] = 0.0
        v[pad] = 0.0
    if ragged or 1 < tq < L:  # bottom-right causal: query t sees keys j <= len - tq + t
        t = torch.arange(tq, device=dev).view(1, tq, 1)
        j = torch.arange(L, device=dev).view(1, 1, L)
        ends = lens_g.view(Bg, 1, 1) if ragged else L
        mask = (j <= ends - tq + t)[:, None]  # (Bg, 1, tq, L)
    elif tq > 1:  # tq == L: a whole prompt, top-left and bottom-right agree
        causal = True
    s0 = starts[members[0]]
    if all(members[i + 1] == members[i] + 1 for i in range(Bg - 1)):  # consecutive: a view of q
        rows = slice(s0, s0 + Bg * tq)
        qg = q[rows]
    else:
        rows = (torch.tensor([starts[b] for b in members], device=dev)[:, None]
                + torch.arange(tq, device=dev)).reshape(-1)
        qg = q.index_select(0, rows)
    o = F.scaled_dot_product_attention(
        qg.view(Bg, tq, Hq, D).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=Hq != Hkv)  # (Bg, Hq, tq, D)
    return o.transpose(1, 2).reshape(Bg * tq, Hq, D), rows


def unified_attention_reference(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, *,
                                scale=None, max_query_len=None, validate=True):
    """Plain torch with the same arguments and checks as :func:`unified_attention`.

    Also takes float64 (the tests' oracle). Computes in fp32 for fp16/bf16 inputs, in the input
    dtype otherwise. Memory: one group's scores, ``(Bg, Hq, q_len, max L)``. The CPU runtime
    runs ``unified_attention(backend="torch")`` instead: the same grouping on torch SDPA.
    """
    scale = _check_inputs(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, scale, max_query_len,
                          dtypes=_REFERENCE_DTYPES)
    if validate and q.shape[0] > 0:
        _check_data(q, k_cache, block_table, seq_lens, query_start_loc, max_query_len)
    return _reference(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, scale)
