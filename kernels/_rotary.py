"""Rotary position embedding (rotate-half, Llama / GPT-NeoX style) for q and k in one launch.

For each token (b, t) at position ``p = positions[b, t]`` and each head, with rotary dim r
(even, <= D) and ``x1 = x[:r/2]``, ``x2 = x[r/2:r]``::

    out[:r/2]  = x1 * cos[p] - x2 * sin[p]
    out[r/2:r] = x2 * cos[p] + x1 * sin[p]
    out[r:]    = x[r:]                       (partial rotary: the rest passes through)

Memory-bound: q and k are read once and written once; the cos/sin row of a token is loaded
once per program and reused by every head the program holds, so the tables add r*4 bytes
per (token, program) against 2*H*D*elem bytes of q/k traffic.

``rope_cos_sin`` builds the fp32 tables, including Llama-3 frequency scaling exactly as
Hugging Face ``transformers`` computes it (``_compute_llama3_parameters``), in fp32 with the
same operations so the tables match HF's bit for bit on the same device.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _common

_POSITION_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _rotate_heads(
    src_ptr, dst_ptr,            # src/dst already offset to (b, head 0, t)
    cos, sin,                    # (BLOCK_HALF,) fp32 rows for this token's position
    h0, n_heads,                 # first head of this block, heads in the tensor
    stride_sh, stride_sd, stride_dh,
    HALF, D,
    HAS_TAIL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
):
    heads = h0 + tl.arange(0, BLOCK_H)
    h_ok = heads < n_heads
    rows_s = heads.to(tl.int64)[:, None] * stride_sh
    rows_d = heads.to(tl.int64)[:, None] * stride_dh
    c = tl.arange(0, BLOCK_HALF)[None, :]
    m = h_ok[:, None] & (c < HALF)
    # The two halves are loaded as separate tiles (no shuffle across lanes, no re-read).
    x1 = tl.load(src_ptr + rows_s + c * stride_sd, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src_ptr + rows_s + (c + HALF) * stride_sd, mask=m, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(dst_ptr + rows_d + c, o1.to(dst_ptr.dtype.element_ty), mask=m)
    tl.store(dst_ptr + rows_d + (c + HALF), o2.to(dst_ptr.dtype.element_ty), mask=m)
    if HAS_TAIL:  # partial rotary: copy x[r:] through unchanged
        ct = 2 * HALF + tl.arange(0, BLOCK_TAIL)[None, :]
        mt = h_ok[:, None] & (ct < D)
        xt = tl.load(src_ptr + rows_s + ct * stride_sd, mask=mt, other=0.0)
        tl.store(dst_ptr + rows_d + ct, xt, mask=mt)


@triton.jit
def _rotary_kernel(
    # pointers
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, pos_ptr,
    # sizes
    T, HQ, HKV, HALF, D,
    # strides, in elements (q/k arbitrary; outputs contiguous (B, H, T, D))
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_qob, stride_qoh, stride_qot,
    stride_kob, stride_koh, stride_kot,
    stride_cp, stride_cc, stride_sp, stride_sc,
    stride_pb, stride_pt,        # stride_pb == 0 for shared 1-D positions
    # meta-parameters
    HAS_TAIL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
):
    # Grid: (B * T, q head blocks + k head blocks). One token per program along axis 0 (up to
    # 2^31 tokens); axis 1 walks q's heads, then k's, so both tensors share one launch.
    pid_bt = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = (pid_bt // T).to(tl.int64)
    t = (pid_bt % T).to(tl.int64)
    # Positions are range-checked by the launcher (validate=True) or trusted (validate=False).
    pos = tl.load(pos_ptr + b * stride_pb + t * stride_pt).to(tl.int64)
    c = tl.arange(0, BLOCK_HALF)
    c_ok = c < HALF
    cos = tl.load(cos_ptr + pos * stride_cp + c * stride_cc, mask=c_ok, other=1.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_sp + c * stride_sc, mask=c_ok, other=0.0).to(tl.float32)

    n_q_blocks = tl.cdiv(HQ, BLOCK_H)
    if pid_h < n_q_blocks:
        _rotate_heads(q_ptr + b * stride_qb + t * stride_qt, qo_ptr + b * stride_qob + t * stride_qot,
                      cos, sin, pid_h * BLOCK_H, HQ, stride_qh, stride_qd, stride_qoh, HALF, D,
                      HAS_TAIL, BLOCK_H, BLOCK_HALF, BLOCK_TAIL)
    else:
        _rotate_heads(k_ptr + b * stride_kb + t * stride_kt, ko_ptr + b * stride_kob + t * stride_kot,
                      cos, sin, (pid_h - n_q_blocks) * BLOCK_H, HKV, stride_kh, stride_kd, stride_koh,
                      HALF, D, HAS_TAIL, BLOCK_H, BLOCK_HALF, BLOCK_TAIL)


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
def _launch_settings(hq: int, hkv: int, half: int, d: int) -> Tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_HALF, BLOCK_TAIL, num_warps).

    A program takes up to ~2k elements of one token (16 heads of D=128): enough bytes in
    flight per program to stream at bandwidth, while the cos/sin row is reused across its
    heads. Blocks never mix q and k heads, so a k block may be partly masked (GQA: 8 KV heads
    in a 16-head block); masked lanes move no bytes.
    """
    block_half = _common.next_power_of_2(half)
    tail = d - 2 * half
    block_tail = _common.next_power_of_2(tail) if tail > 0 else 1
    width = 2 * block_half + (block_tail if tail > 0 else 0)
    # width is a sum of powers of two (e.g. 16 + 16 + 64 = 96 for head 80 / rotary 32), so
    # 2048 // width need not be one: round the cap down, tl.arange takes powers of two only.
    block_h = min(_common.next_power_of_2(max(hq, hkv)), _common.prev_power_of_2(2048 // width))
    num_warps = 4 if block_h * width <= 2048 else 8
    return block_h, block_half, block_tail, num_warps


def _check_inputs(q, k, cos, sin, positions) -> None:
    _common.check_tensor("q", q, ndim=4)
    _common.check_tensor("k", k, ndim=4)
    _common.check_same("q", q, k=k)
    (bq, _, tq, dq), (bk, _, tk, dk) = q.shape, k.shape
    if bk != bq:
        raise ValueError(f"k has batch {bk} but q has {bq}")
    if tk != tq:
        raise ValueError(f"k has {tk} tokens (dim 2) but q has {tq}")
    if dk != dq:
        raise ValueError(f"k has head dim {dk} but q has {dq}")
    _common.check_tensor("cos", cos, ndim=2, dtypes=(torch.float32,))
    _common.check_tensor("sin", sin, ndim=2, dtypes=(torch.float32,))
    if sin.shape != cos.shape:
        raise ValueError(f"sin has shape {tuple(sin.shape)} but cos has {tuple(cos.shape)}")
    n_pos, half = cos.shape
    if half == 0 or n_pos == 0:
        raise ValueError(f"cos must be (max_positions, rotary_dim / 2) with both > 0, got {tuple(cos.shape)}")
    if 2 * half > dq:
        raise ValueError(f"cos has {half} columns, so the rotary dim is {2 * half}, "
                         f"more than q's head dim {dq}")
    _common.check_tensor("positions", positions, ndim=(1, 2), dtypes=_POSITION_DTYPES)
    want = (tq,) if positions.dim() == 1 else (bq, tq)
    if tuple(positions.shape) != want:
        raise ValueError(f"positions has shape {tuple(positions.shape)}; expected (T,) = ({tq},) "
                         f"or (B, T) = ({bq}, {tq})")
    _common.check_device("q", q, cos=cos, sin=sin, positions=positions)


def _check_positions(positions: torch.Tensor, n_pos: int) -> None:
    """Every position indexes a row of the tables: one min/max reduction, one host sync."""
    if positions.numel() == 0:
        return
    ((lo, hi),) = _common.min_max(positions)
    if lo < 0 or hi >= n_pos:
        _common.raise_out_of_range("positions", positions, 0, n_pos - 1,
                                   f"the cos/sin tables have {n_pos} rows")


def rotary_embedding(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    *,
    validate: bool = True,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Apply rotate-half rotary embedding to q and k (one kernel launch for both).

    With ``p = positions[b, t]`` (or ``positions[t]``), ``h = r / 2``, for every head::

        out[..., :h]  = x[..., :h] * cos[p] - x[..., h:r] * sin[p]
        out[..., h:r] = x[..., h:r] * cos[p] + x[..., :h] * sin[p]
        out[..., r:]  = x[..., r:]

    Shapes:
        q ``(B, Hq, T, D)`` and k ``(B, Hkv, T, D)``, same dtype, any strides (e.g. views of
        a packed ``(B, T, Hq + 2*Hkv, D)`` projection); Hq and Hkv are independent (GQA).
        cos, sin ``(max_positions, r/2)`` float32 (from :func:`rope_cos_sin`), r <= D.
        positions ``(B, T)`` (per-sequence, e.g. batched decode) or ``(T,)`` (shared), int32
        or int64, each in ``[0, max_positions)``.
    ``validate=True`` checks the positions against the tables (ValueError naming the first one
    out of range) with one min/max reduction that syncs the host; a caller whose positions are
    right by construction (the engine, a CUDA graph capture) passes ``validate=False``, and an
    out-of-range position then reads outside the tables.
    Returns ``(q_out, k_out)``, new contiguous ``(B, H, T, D)`` tensors in q's dtype; the
    rotation is computed in fp32.
    """
    _check_inputs(q, k, cos, sin, positions)
    if validate:
        _check_positions(positions, cos.shape[0])
    if _common.resolve_backend(backend, q, k) == "torch":
        return rotary_embedding_reference(q, k, cos, sin, positions)

    (B, hq, T, D), hkv, half = q.shape, k.shape[1], cos.shape[1]
    q_out = _common.empty(q.shape, q.dtype, q.device)
    k_out = _common.empty(k.shape, k.dtype, k.device)
    if B * T == 0 or hq + hkv == 0:
        return q_out, k_out
    block_h, block_half, block_tail, num_warps = _launch_settings(hq, hkv, half, D)
    grid = (B * T, triton.cdiv(hq, block_h) + triton.cdiv(hkv, block_h))
    stride_pb, stride_pt = (0, positions.stride(0)) if positions.dim() == 1 else positions.stride()
    _common.launch(_rotary_kernel, None, grid,
        q, k, q_out, k_out, cos, sin, positions,
        T, hq, hkv, half, D,
        *q.stride(), *k.stride(),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        stride_pb, stride_pt,
        HAS_TAIL=2 * half < D, BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_TAIL=block_tail,
        num_warps=num_warps,
    )
    return q_out, k_out


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama-3 frequency scaling, the operations of HF ``_compute_llama3_parameters``.

    Wavelengths shorter than ``original / high_freq_factor`` are kept, those longer than
    ``original / low_freq_factor`` are stretched by ``factor``, and the band between is
    interpolated linearly in ``original / wavelen``.
    """
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def _check_scaling(scaling: object) -> dict:
    if not isinstance(scaling, dict):
        raise TypeError(f"scaling must be None or a dict (HF rope_scaling), got {type(scaling).__name__}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"scaling has rope_type {kind!r}; only 'llama3' is supported")
    missing = [key for key in _LLAMA3_KEYS if key not in scaling]
    if missing:
        raise ValueError(f"scaling (llama3) is missing {', '.join(missing)}")
    for key in _LLAMA3_KEYS:  # each divides something: NaN, inf, 0 or < 0 make garbage tables
        _common.check_real(f"scaling {key}", scaling[key], positive=True)
    if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError(f"scaling high_freq_factor ({scaling['high_freq_factor']}) must exceed "
                         f"low_freq_factor ({scaling['low_freq_factor']})")
    return scaling


def rope_cos_sin(
    max_positions: int,
    rotary_dim: int,
    theta: float = 10000.0,
    *,
    device: Optional[torch.device | str] = None,
    scaling: Optional[dict] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fp32 tables ``cos[p, i] = cos(p * f_i)``, ``sin[p, i] = sin(p * f_i)``.

    ``f_i = theta ** (-2 i / rotary_dim)`` for ``i < rotary_dim / 2``, optionally rescaled by
    ``scaling``: None or a Hugging Face Llama-3 ``rope_scaling`` dict ``{"rope_type": "llama3",
    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}``.
    Computed in fp32 like ``transformers`` (positions exact below 2^24).

    Returns ``(cos, sin)``, each ``(max_positions, rotary_dim // 2)`` float32 on ``device``.
    """
    if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 1:
        raise ValueError(f"max_positions must be a positive int, got {max_positions!r}")
    if (isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim < 2
            or rotary_dim % 2):
        raise ValueError(f"rotary_dim must be a positive even int, got {rotary_dim!r}")
    theta = _common.check_real("theta", theta, positive=True)
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
    inv_freq = 1.0 / (float(theta) ** exponent)                        # (r/2,)
    if scaling is not None:
        inv_freq = _llama3_inv_freq(inv_freq, _check_scaling(scaling))
    pos = torch.arange(max_positions, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)                                 # (P, r/2)
    return angles.cos(), angles.sin()


# --------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------
def rotary_embedding_reference(q, k, cos, sin, positions):
    B, _, T, _ = q.shape
    pos = positions.long()
    pos = pos.expand(B, T) if pos.dim() == 1 else pos                  # (B, T)
    half = cos.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    c = cos[pos].to(acc)[:, None]                                       # (B, 1, T, r/2)
    s = sin[pos].to(acc)[:, None]

    def rotate(x):
        xf = x.to(acc)
        x1, x2, rest = xf[..., :half], xf[..., half:2 * half], xf[..., 2 * half:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)
