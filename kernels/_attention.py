"""Scaled dot-product attention forward (FlashAttention-2), causal or not, with GQA/MQA.

One program owns a tile of BLOCK_M query rows of one (batch, query head) and streams the
keys and values of its kv head through shared memory BLOCK_N rows at a time, keeping the
softmax online (running max ``m``, running sum ``l``, fp32 accumulator): the T x S score
matrix never touches HBM. HBM traffic is therefore q + o once and k + v once per query tile,
instead of the 2 * B * Hq * T * S * 4 bytes the materialised scores would cost.

Conventions:

* Scores are kept in log2 units: ``scale * log2(e)`` is folded into the fp32 scores once, so
  the softmax uses ``exp2`` (one MUFU instruction) instead of ``exp`` (a multiply + exp2).
* Causal masks align bottom-right (flash-attn's KV-cache convention): query ``i`` of ``T``
  sees keys ``j <= i + S - T``. With T > S the first ``T - S`` query rows see no key; they
  output 0 and their log-sum-exp is -inf (torch SDPA would return NaN there).
* The key loop runs in two stages: blocks that every row of the tile sees in full (no mask
  work in the hot loop), then the blocks on the causal diagonal and/or the ragged last
  block (key index >= S) with the mask applied. Causal tiles stop at the last key block any
  of their rows can see, so fully-masked blocks cost nothing.

Head dims 257..512 (the VAE mid-block: one 512-wide head over 4096 tokens) split the output
columns: a program owns BLOCK_DV (128 or 256) of them for its query tile, grid axis 0 counting
query tiles times ceil(D / BLOCK_DV) chunks. Each program still computes the full-width scores
q @ K^T (its q tile, BLOCK_M x 512, sits in shared memory as the operand of the dot, like the
K tiles) and so redoes the softmax of its query tile: the chunked accumulator (BLOCK_M x
BLOCK_DV fp32) is what fits in registers, not the q tile. The price is recomputed scores:
with 256-wide chunks a 512 head does 1.5x the FLOPs of one pass (2 x 2D for q.k, 2D for p.v),
with 128-wide ones 2.5x. The gain besides fitting: the VAE's B * H = 1 gives only
4096 / 64 = 64 query tiles, half an H100's 132 SMs; two chunks make 128 programs. One
program per query tile (BLOCK_DV = 512) would need the whole 512-wide fp32 accumulator in
registers (128 per thread at 64 rows on 8 warps, beside the score tile): in the sm_90 compile
check such tiles spilled in every config under triton 3.6 and in all but 64x16 on 8 warps
under 3.9. A single loop, masked throughout, covers all keys here (see the kernel: triton 3.6
gives a second loop its own K/V buffers).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from . import _common

# Head dims are padded to a power of two (masked loads). Up to 256 one program owns all D
# columns of its query tile; above, the q tile and an fp32 BLOCK_M x 512 accumulator no longer
# fit next to the K/V tiles, so the output columns are split over programs (module docstring).
MAX_HEAD_DIM = 512
_MAX_UNSPLIT_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


@triton.jit
def _attn_inner(
    acc, l_i, m_i, q,
    kt_ptrs, v_ptrs,                # K^T (BLOCK_D, BLOCK_N) and V (BLOCK_N, BLOCK_DV) tiles at key lo
    stride_kn, stride_vn,
    offs_m, offs_d, offs_dv, lo, hi, S, diag, qk_scale,
    HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,           # apply the key-range / causal mask (edge blocks only)
    IS_CAUSAL: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM      # the V columns this program outputs (d_ok unless D is split)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            n_ok = cols < S
            if EVEN_D:
                kt = tl.load(kt_ptrs, mask=n_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
            else:
                kt = tl.load(kt_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        else:
            if EVEN_D:
                kt = tl.load(kt_ptrs)
                v = tl.load(v_ptrs)
            else:
                kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=dv_ok[None, :], other=0.0)
        qk = tl.dot(q, kt) * qk_scale               # (BLOCK_M, BLOCK_N) fp32, log2 units
        if MASKED:
            keep = n_ok[None, :]
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(keep, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row that has seen no key yet keeps m = -inf; subtract 0 instead so that
            # exp2(-inf - -inf) never makes a NaN (p and alpha both come out 0).
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_sub = m_new
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
        # Advancing the pointers (64-bit) keeps every integer offset small: `start_n * stride`
        # in int32 would overflow past 2^31 elements of a long packed KV cache.
        kt_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i, kt_ptrs, v_ptrs


@triton.jit
def _attn_fwd_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    # sizes
    Hq, T, S, GROUP, qk_scale,
    # strides, in elements (q/k/v arbitrary; o is contiguous (B, Hq, T, D), lse (B, Hq, T))
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_ot,
    # autotune key only: bucketed sequence lengths (unused in the body)
    T_BUCKET, S_BUCKET,
    # meta-parameters
    IS_CAUSAL: tl.constexpr,
    RETURN_LSE: tl.constexpr,
    # The head dim is a compile-time constant: models have one or two, and a constant bound
    # lets the compiler vectorise and pipeline the masked loads of padded head dims (80, 40).
    HEAD_DIM: tl.constexpr,
    EVEN_D: tl.constexpr,           # HEAD_DIM == BLOCK_D: no head-dim masks at all
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,          # next_power_of_2(D), at least 16 (tl.dot's minimum)
    # Output columns per program: BLOCK_D (one program per query tile, D <= 256), or a chunk
    # of it (D > 256): then axis 0 also counts the ceil(D / BLOCK_DV) chunks, see _split_configs.
    BLOCK_DV: tl.constexpr,
):
    if BLOCK_DV == BLOCK_D:
        start_m = tl.program_id(0)
        dv0 = 0
    else:
        # The chunks of one query tile are neighbours on axis 0, so they run together and
        # share their q and K/V reads in L2.
        start_m = tl.program_id(0) // ((HEAD_DIM + BLOCK_DV - 1) // BLOCK_DV)
        dv0 = (tl.program_id(0) % ((HEAD_DIM + BLOCK_DV - 1) // BLOCK_DV)) * BLOCK_DV
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_hkv = off_h // GROUP        # GQA: query heads [g*GROUP, (g+1)*GROUP) share kv head g

    # int64 bases: B * H * T * D passes 2^31 elements for long-context batches.
    m0 = start_m * BLOCK_M
    q_base = q_ptr + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh + m0.to(tl.int64) * stride_qt
    k_base = k_ptr + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
    v_base = v_ptr + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh
    o_base = o_ptr + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh + m0.to(tl.int64) * stride_ot

    offs_i = tl.arange(0, BLOCK_M)          # row within the tile
    offs_m = m0 + offs_i                    # query index
    offs_d = tl.arange(0, BLOCK_D)          # head dim of q and K (the scores use all of it)
    offs_dv = dv0 + tl.arange(0, BLOCK_DV)  # head dim of V and out that this program writes
    m_ok = offs_m < T
    dv_ok = offs_dv < HEAD_DIM
    q_ptrs = q_base + offs_i[:, None] * stride_qt + offs_d[None, :] * stride_qd
    if EVEN_D:
        q = tl.load(q_ptrs, mask=m_ok[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=m_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # Key range [0, hi) this tile can see, and its prefix [0, full) that every row of the tile
    # sees whole (rounded down to a block): bottom-right causal means row i sees j <= i + diag.
    diag = S - T
    if IS_CAUSAL:
        hi = tl.minimum(tl.maximum(m0 + BLOCK_M + diag, 0), S)
        full = tl.minimum(tl.maximum(m0 + diag + 1, 0), S)
    else:
        hi = S
        full = S
    full = (full // BLOCK_N) * BLOCK_N

    # K is loaded already transposed (BLOCK_D, BLOCK_N) so q @ kT needs no register shuffle.
    # The masked stage starts where the unmasked one left its pointers (key `full`).
    offs_n = tl.arange(0, BLOCK_N)
    kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    if BLOCK_DV == BLOCK_D:
        acc, l_i, m_i, kt_ptrs, v_ptrs = _attn_inner(
            acc, l_i, m_i, q, kt_ptrs, v_ptrs, stride_kn, stride_vn,
            offs_m, offs_d, offs_dv, 0, full, S, diag, qk_scale, HEAD_DIM, False, IS_CAUSAL, EVEN_D, BLOCK_N)
    else:
        # Split D: one masked loop over all keys. The mask is a few integer ops per score next
        # to a >= 257-long dot product, and a second loop would get its own K/V stage buffers
        # under triton 3.6 (a 512 x BLOCK_N K tile each), which no fp32 tile could afford.
        full = 0
    acc, l_i, m_i, kt_ptrs, v_ptrs = _attn_inner(
        acc, l_i, m_i, q, kt_ptrs, v_ptrs, stride_kn, stride_vn,
        offs_m, offs_d, offs_dv, full, hi, S, diag, qk_scale, HEAD_DIM, True, IS_CAUSAL, EVEN_D, BLOCK_N)

    # Rows that saw no key (causal, T > S) have l = 0: output 0 and lse = -inf, not NaN. A row
    # whose scores held NaN or +inf has l = NaN and must stay NaN (as torch), hence != not >.
    seen = l_i != 0.0
    inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    out = acc * inv_l[:, None]
    o_ptrs = o_base + offs_i[:, None] * stride_ot + offs_dv[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])
    if RETURN_LSE:
        # back from log2 units to natural log: lse = ln(2) * (m + log2(l))
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        lse_base = lse_ptr + (off_b.to(tl.int64) * Hq + off_h) * T
        if dv0 == 0:  # split D: every chunk computed the same lse, the first one writes it
            tl.store(lse_base + offs_m, lse, mask=m_ok)


# --------------------------------------------------------------------------------------
# Tuning (CUDA only; the interpreter runs one fixed config)
# --------------------------------------------------------------------------------------
def _configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)
    ]


def _split_configs():
    """Head dims 257..512: the output columns are split over BLOCK_DV-wide chunks (see the
    module docstring), each chunk's program recomputing the full-width scores.

    Key tiles stay at 16 or 32 rows: a K tile is 512 wide, so 64 rows cost 64 KiB (fp16) per
    stage, and such tiles spilled or overflowed shared memory in all but one sm_90 compile
    tried. 128-wide chunks give 4 programs per query tile of D=512 (occupancy for small
    B * H) at 2.5x the useful FLOPs, 256-wide ones 2 at 1.5x: the autotuner picks."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_DV": dv}, num_warps=w, num_stages=s)
        for bm in (64, 128) for bn in (16, 32) for dv in (128, 256) for w in (4, 8) for s in (2, 3, 4)
    ]


# GENFUSE_AUTOTUNE=quick (the GPU check): per (element size, padded head dim) a short list
# from the full spaces, (BLOCK_M, BLOCK_N, num_warps, num_stages) in order of preference. Read
# off the sm_90 compile check of every kept config (bench/compile_check.py --tuned 100, D 64 /
# 80 / 128 / 256 / 320 / 512, 2026-12-01): these compile without spills under both triton 3.6
# (the GPU machine's) and 3.9, except where said. Under 3.6 every 4-warp 16-bit tile from D=80
# up spills (64x32 at D=128: 156 bytes), so the 16-bit lists are 8-warp tiles; at D=256 every
# 16-bit tile spills under 3.6, 64x32 on 8 warps least (232-276 bytes; none under 3.9). fp32
# D=256 keeps only 64x32/8 warps/2 stages under 3.9 (112 bytes of spills) and nothing under
# 3.6 (the pruning's 64x16 fallback, no spills). Head dims <= 64 share one list; the pruning
# drops 128-row tiles for short queries.
_QUICK = {
    (2, 64): ((128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3)),
    (2, 128): ((128, 32, 8, 3), (64, 32, 8, 3)),
    (2, 256): ((64, 32, 8, 3), (64, 32, 8, 4)),
    (4, 64): ((64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 8, 3)),
    (4, 128): ((64, 32, 8, 3), (128, 32, 8, 2)),
    (4, 256): ((64, 32, 8, 2),),
}
# D > 256 (split D): (BLOCK_M, BLOCK_N, BLOCK_DV, num_warps, num_stages), per element size; no
# spills under either version (fp32 keeps only its one config).
_QUICK_SPLIT = {
    2: ((64, 16, 256, 4, 2), (64, 32, 128, 4, 2)),
    4: ((64, 16, 128, 8, 2),),
}


def _quick_configs(elem: int, block_d: int) -> Tuple[tuple, ...]:
    """The quick list (``_common.config_key`` form) for this element size and padded head dim."""
    if block_d > _MAX_UNSPLIT_HEAD_DIM:
        return tuple(_common.quick_key({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_DV": dv}, w, s)
                     for bm, bn, dv, w, s in _QUICK_SPLIT[elem])
    return tuple(_common.quick_key({"BLOCK_M": bm, "BLOCK_N": bn}, w, s)
                 for bm, bn, w, s in _QUICK[(elem, max(64, block_d))])


def _triton_version() -> Tuple[int, int]:
    try:
        return tuple(int(p) for p in triton.__version__.split(".")[:2])  # type: ignore[return-value]
    except ValueError:  # pragma: no cover - unusual version string
        return (3, 9)


# K/V stage buffers the sm_90 cubins allocate beyond ``num_stages`` (bench/compile_check.py):
# triton 3.9 exactly num_stages; triton 3.6 (the GPU machine's) up to two more (fp16/bf16 mostly
# +2, fp32 +1): without this, e.g. fp32 D=256 kept only 64x32/8 warps/2 stages, which asks 3.6
# for 256 KiB and cannot launch. +2 bounds every 3.6 config measured (versions in between were
# not measured and get the same bound).
_EXTRA_KV_BUFFERS = 0 if _triton_version() >= (3, 9) else 2


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs that cannot fit or would spill, so autotuning times only real candidates.

    * shared memory: the q tile plus ``num_stages`` buffers of K and V (exactly what the
      sm_90 cubins of triton 3.9 allocate; ``_EXTRA_KV_BUFFERS`` more on older triton) must
      fit the device's opt-in limit;
    * registers: the fp32 accumulator (BLOCK_M x BLOCK_D) plus the fp32 score tile
      (BLOCK_M x BLOCK_N), in values per thread, stays under a limit read off sm_90 cubins
      (ptxas resource usage, triton 3.9, head dim a constexpr so padded dims behave like
      powers of two): 16-bit tiles spill past 144 (D=128 128x64 on 4 warps = 192 spills 88
      bytes, D=256 64x64 on 4 warps = 160 spills 80; 144 = D=256 64x32 on 4 warps uses 252
      registers, no stack; one 128 config, D=128 64x128 on 4 warps, spills ~50 bytes and is
      left to the autotuner), fp32 (tf32) tiles spill from 96 (D=128 64x64 on 4 warps);
    * a 128-row tile on a query of <= 64 rows would be at least half padding.

    Split head dims (D > 256, ``BLOCK_DV`` < ``BLOCK_D`` in the config) follow the same two
    rules with the V tile and the accumulator BLOCK_DV wide, measured on every config of
    ``_split_configs`` for D=512, fp16 and fp32, under triton 3.6 and 3.9. Their single key
    loop makes 3.6 allocate exactly the shared memory 3.9 does (no extra K/V buffers). 16-bit
    tiles spill at 144 values per thread there (64x32 with 256-wide chunks and 128x16 with
    128-wide ones, both on 4 warps, under 3.9), so the limit is 136 (64x16/256-wide on 4
    warps: 246 registers, no stack); fp32 tiles at 68 (64x16/256-wide on 8 warps) spilled 8
    bytes at D=512 and 88 at D=320 under 3.9, so the fp32 limit is 64, which with the shared
    memory leaves 64x16/128-wide on 8 warps (also the fallback).
    """
    q = named_args["q_ptr"]
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    t = named_args["T"]
    elem = q.element_size()
    limit = 144 if elem == 2 else 80
    split_limit = 136 if elem == 2 else 64
    try:
        smem_limit = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
    except Exception:  # pragma: no cover - older torch / not a CUDA tensor
        smem_limit = 227 * 1024
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        block_dv = c.kwargs.get("BLOCK_DV", block_d)
        kv_buffers = c.num_stages + (_EXTRA_KV_BUFFERS if block_dv == block_d else 0)
        if elem * (bm * block_d + kv_buffers * bn * (block_d + block_dv)) > smem_limit:
            continue
        if bm * (block_dv + bn) > (limit if block_dv == block_d else split_limit) * 32 * c.num_warps:
            continue
        if bm == 128 and t <= 64:
            continue
        kept.append(c)
    # Always something to run: these tiles fit every head dim <= 256 (and 257..512, in
    # 128-wide chunks) in any dtype, without spills, on triton 3.6 and 3.9 (fp32 D=256: 160 /
    # 128 KiB of shared memory; fp32 D=512: 208 KiB).
    if kept:
        return _common.select_quick(kept, _quick_configs(elem, block_d))
    if block_d > _MAX_UNSPLIT_HEAD_DIM:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_DV": 128}, num_warps=8, num_stages=2)]
    return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 16}, num_warps=8, num_stages=2)]


_attn_fwd_tuned = triton.autotune(
    configs=_configs(),
    # (tensor dtypes are part of every autotune key already)
    key=["HEAD_DIM", "IS_CAUSAL", "T_BUCKET", "S_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_attn_fwd_kernel)
# The same kernel for D > 256, where BLOCK_DV (the output chunk) is tuned too.
_attn_fwd_split_tuned = triton.autotune(
    configs=_split_configs(),
    key=["HEAD_DIM", "IS_CAUSAL", "T_BUCKET", "S_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_attn_fwd_kernel)

# The interpreter runs numpy per block: fewer, larger blocks are faster there, and 32 keeps
# awkward shapes (217, primes) exercising the ragged-block masks.
_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4}
# D > 256: 128-wide output chunks, so D=512 runs 4 chunk programs per query tile and D=300
# three (the last one ragged): the tests see several chunks and a partial one.
_INTERPRET_SPLIT_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_DV": 128, "num_warps": 4}


def _bucket(n: int) -> int:
    """Autotune key for a sequence length: the next power of 4 in [64, 16384]. Coarse on
    purpose: each new key re-times every surviving config (~30), and the best tile changes
    with the number of query tiles and loop length only by factors, not by every 2x."""
    b = 64
    while b < n and b < 16384:
        b *= 4
    return b


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
def _check_inputs(q, k, v, scale) -> float:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _common.check_tensor(name, t, ndim=4)
    _common.check_same("q", q, k=k, v=v)
    b, hq, _, d = q.shape
    bk, hkv, s, dk = k.shape
    if bk != b:
        raise ValueError(f"k has batch {bk} but q has batch {b}")
    if dk != d:
        raise ValueError(f"k has head dim {dk} but q has head dim {d}")
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)} but k has shape {tuple(k.shape)}")
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"q has {hq} heads, not a multiple of k's {hkv}")
    if s < 1:
        raise ValueError(f"k and v have {s} keys; attention needs at least one")
    if d < 1 or d > MAX_HEAD_DIM:
        raise ValueError(f"q has head dim {d}; supported head dims are 1..{MAX_HEAD_DIM}")
    return _common.check_scale(scale, d)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Multi-head attention forward, ``softmax(scale * q @ k^T + mask) @ v`` per head.

    Shapes:
        q: ``(B, Hq, T, D)``; k, v: ``(B, Hkv, S, D)`` with ``Hq % Hkv == 0`` (GQA/MQA:
        query head ``h`` attends with kv head ``h // (Hq // Hkv)``). Any strides: q/k/v may
        be views of one packed QKV projection, read in place. ``T >= 0``, ``S >= 1``,
        ``1 <= D <= 512`` (other head dims than 16..512 powers of two are padded to the next
        power of two, at least 16, and masked; above 256 the output columns are split over
        programs that each recompute the scores, see the module docstring).
        returns out ``(B, Hq, T, D)`` contiguous, in q's dtype; with ``return_lse=True``
        ``(out, lse)`` where lse ``(B, Hq, T)`` float32 is ``logsumexp_j(scale * q_i . k_j)``
        over the visible keys (natural log).

    ``scale`` defaults to ``1 / sqrt(D)``. ``causal=True`` aligns the mask bottom-right:
    query ``i`` sees keys ``j <= i + S - T`` (the KV-cache convention of flash-attn, not
    SDPA's top-left ``is_causal``). Rows that see no key (``T > S``) give 0 and lse -inf;
    a NaN or +inf among a row's scores makes that row NaN, as torch's softmax does.
    fp16/bf16/fp32 inputs; softmax and accumulation in fp32 (on CUDA, fp32 dots run in tf32).
    """
    scale = _check_inputs(q, k, v, scale)
    if _common.resolve_backend(backend, q, k, v) == "torch":
        return _attention_torch(q, k, v, causal, scale, return_lse)

    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    out = _common.empty((b, hq, t, d), q.dtype, q.device)
    lse = _common.empty((b, hq, t), torch.float32, q.device) if return_lse else None
    if out.numel() == 0:
        return (out, lse) if return_lse else out
    if hq > 65535 or b > 65535:
        raise ValueError(f"q has batch {b} and {hq} heads; the grid allows at most 65535 of each")

    block_d = max(16, _common.next_power_of_2(d))
    args = (
        q, k, v, out, lse if return_lse else out,
        hq, t, s, hq // hkv, scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride()[:3],
        _bucket(t), _bucket(s),
    )
    meta = dict(IS_CAUSAL=bool(causal), RETURN_LSE=bool(return_lse), HEAD_DIM=d,
                EVEN_D=(d == block_d), BLOCK_D=block_d)
    # Heads and batch on grid axes 1 and 2 (each <= 65535) rather than B * Hq on one axis;
    # axis 0 counts query tiles, times the output-column chunks when D is split.
    if d <= _MAX_UNSPLIT_HEAD_DIM:
        meta["BLOCK_DV"] = block_d
        grid = lambda META: (triton.cdiv(t, META["BLOCK_M"]), hq, b)  # noqa: E731
        tuned = _attn_fwd_tuned
        interp = _INTERPRET_CONFIG
    else:
        grid = lambda META: (  # noqa: E731
            triton.cdiv(t, META["BLOCK_M"]) * triton.cdiv(d, META["BLOCK_DV"]), hq, b)
        tuned = _attn_fwd_split_tuned
        interp = _INTERPRET_SPLIT_CONFIG
    _common.launch(_attn_fwd_kernel, tuned, grid, *args, interpret_meta=interp, **meta)
    return (out, lse) if return_lse else out


def _attention_torch(q, k, v, causal: bool, scale: float, return_lse: bool):
    """The CPU path (``backend="torch"``): torch's SDPA where no mask is needed (non-causal, or a
    causal decode row ``T == 1``, which sees every key), the reference otherwise.

    SDPA's fused CPU kernel neither materializes the (T, S) scores nor repeats K/V per query
    head (``enable_gqa``), which the reference does to stay an obvious oracle; in a decode step
    of a 135M model that was about a fifth of the time. Masked cases stay on the reference:
    SDPA adds its mask to scores already computed, so a NaN in a hidden key would reach rows
    that never see it (the kernels never load hidden keys). Also kept there: ``return_lse``
    (SDPA does not return it) and float64 (the tests' oracle precision).
    """
    if return_lse or q.dtype == torch.float64 or q.shape[2] == 0 or (causal and q.shape[2] != 1):
        return attention_reference(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, scale=scale, enable_gqa=bool(q.shape[1] != k.shape[1]))   # (B, Hq, T, D)
    return out.contiguous()


# --------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------
def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Plain torch attention with the same conventions as :func:`attention`.

    Materialises the (T, S) scores and the bottom-right causal mask. Computes in fp32 (fp64
    for fp64 inputs); lse comes back in that compute dtype.
    """
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    ct = torch.promote_types(q.dtype, torch.float32)
    group = hq // hkv
    qc = q.to(ct)
    kc = k.to(ct).repeat_interleave(group, dim=1)        # (B, Hq, S, D)
    vc = v.to(ct).repeat_interleave(group, dim=1)        # (B, Hq, S, D)
    scores = (qc @ kc.transpose(-1, -2)) * scale         # (B, Hq, T, S)
    if causal:
        i = torch.arange(t, device=q.device)[:, None]
        j = torch.arange(s, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + (s - t), float("-inf"))   # (T, S) bottom-right
    lse = torch.logsumexp(scores, dim=-1)                # (B, Hq, T); -inf for empty rows
    # Only rows that see no key (lse = -inf) give 0; a row whose scores hold NaN or +inf has a
    # NaN or +inf lse and must come out NaN, as torch's softmax and the kernel give.
    seen = (lse != float("-inf"))[..., None]
    p = torch.where(seen, torch.exp(scores - torch.where(seen, lse[..., None], 0.0)), 0.0)
    out = (p @ vc).to(q.dtype)                           # (B, Hq, T, D)
    return (out, lse) if return_lse else out
