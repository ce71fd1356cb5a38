"""RMSNorm and LayerNorm over the last dimension, optionally fused with the residual add.

Both are memory-bound: a row of N elements is read once, its statistics are reduced in fp32
registers, and the normalized row is written once. The fused-residual variant
(``residual=...``) reads x and the residual once and writes both ``norm(x + residual)`` and
``x + residual``, where the unfused sequence ``h = x + residual; norm(h)`` moves 3 reads and
2 writes of M*N elements: the fusion saves one full read of h (1/5 of the traffic).

Rounding of the sum (the decision the fused-add kernels of vLLM and HF-derived runtimes make
too): h = x + residual is computed in fp32, *stored* rounded to x's dtype (that is the residual
stream the next layer reads), and the fp32 h, not its rounded copy, is normalized. The
reference does the same, so backends agree to within one rounding of the output.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from . import _common

# One program holds a whole row in registers. Past 64k columns (256 KiB of fp32 per row) the
# registers of one 32-warp program spill so badly that a two-pass kernel would be needed; no
# model here has a hidden size near that, so the limit is explicit instead.
MAX_N = 65536


@triton.jit
def _norm_fwd_kernel(
    # pointers
    x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, h_ptr,
    # sizes
    M, N, eps,
    # strides, in elements (x and residual may be strided 2-D views; y and h are contiguous)
    stride_xm, stride_xn, stride_rm, stride_rn, stride_w, stride_b, stride_ym, stride_hm,
    # meta-parameters
    IS_RMS: tl.constexpr,        # RMSNorm (no mean, no bias) or LayerNorm
    HAS_RESIDUAL: tl.constexpr,  # h = x + residual, also written out
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,       # rows per program (> 1 only for short rows)
    BLOCK_N: tl.constexpr,       # next_power_of_2(N): the whole row at once, masked
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    # int64 offsets: M * stride passes 2^31 elements for large activations (32k x 64k).
    rows64 = rows.to(tl.int64)[:, None]
    cols64 = cols.to(tl.int64)[None, :]

    h = tl.load(x_ptr + rows64 * stride_xm + cols64 * stride_xn, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows64 * stride_rm + cols64 * stride_rn, mask=mask, other=0.0)
        h = h + r.to(tl.float32)
        # The residual stream is kept in the activation dtype; the fp32 h is normalized below.
        tl.store(h_ptr + rows64 * stride_hm + cols64, h.to(h_ptr.dtype.element_ty), mask=mask)

    if IS_RMS:
        # Masked columns loaded as 0 and add nothing to the sum of squares.
        mean_sq = tl.sum(h * h, axis=1) / N
        y = h * tl.rsqrt(mean_sq + eps)[:, None]
    else:
        mean = tl.sum(h, axis=1) / N
        # Two-pass variance on the register-resident row (no E[x^2] - E[x]^2 cancellation);
        # masked columns must be zeroed again after subtracting the mean.
        d = tl.where(mask, h - mean[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / N
        y = d * tl.rsqrt(var + eps)[:, None]

    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols * stride_w, mask=col_ok, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_BIAS:
        b = tl.load(b_ptr + cols * stride_b, mask=col_ok, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(y_ptr + rows64 * stride_ym + cols64, y.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
def _launch_settings(n: int, m: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of ``n`` columns; raises past :data:`MAX_N`.

    Short rows (N <= 1024) are packed several to a program so each program moves about 4k
    elements: one 576-wide row per program would leave most of a 4-warp program idle and
    pay the launch/scheduling cost per row. Warps grow with the tile so every thread holds
    at most ~32-64 fp32 values (no spills up to 64k columns with 32 warps).
    """
    if n > MAX_N:
        raise ValueError(f"x has {n} columns; the Triton norm kernels hold one row in registers "
                         f"and support at most {MAX_N} (use backend='torch')")
    block_m, block_n = _common.row_tile(m, n, elems=4096)
    num_warps = _common.warps_for(block_m * block_n, ((4096, 4), (8192, 8), (32768, 16)), 32)
    return block_m, block_n, num_warps


def _check_inputs(x, weight, bias, residual, eps) -> float:
    _common.check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _common.check_tensor(name, t, ndim=1)
            if t.shape[0] != n:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but x's last dimension is {n}")
    if residual is not None:
        _common.check_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}")
    _common.check_same("x", x, weight=weight, bias=bias, residual=residual)
    return _common.check_real("eps", eps, nonnegative=True)


def _norm(x, weight, bias, eps, residual, is_rms):
    n = x.shape[-1]
    x2 = _common.rows(x, n)  # a 2-D x keeps its strides; others a view when one exists
    m = x2.shape[0]
    y = _common.empty((m, n), x.dtype, x.device)
    h = _common.empty((m, n), x.dtype, x.device) if residual is not None else None
    if m > 0:
        r2 = _common.rows(residual, n) if residual is not None else x2  # dummy pointer when unused
        block_m, block_n, num_warps = _launch_settings(n, m)
        grid = (triton.cdiv(m, block_m),)
        _common.launch(_norm_fwd_kernel, None, grid,
            x2, r2, weight if weight is not None else x2, bias if bias is not None else x2,
            y, h if h is not None else y,
            m, n, eps,
            x2.stride(0), x2.stride(1), r2.stride(0), r2.stride(1),
            weight.stride(0) if weight is not None else 0, bias.stride(0) if bias is not None else 0,
            y.stride(0), h.stride(0) if h is not None else 0,
            IS_RMS=is_rms, HAS_RESIDUAL=residual is not None,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    y = y.view(x.shape)
    return (y, h.view(x.shape)) if residual is not None else y


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    residual: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """RMSNorm over the last dimension, optionally after adding a residual.

    ``y = h / sqrt(mean(h**2, -1) + eps) * weight`` with ``h = x`` or ``h = x + residual``.

    Shapes: x ``(..., N)`` (any leading dims; a 2-D x may have any strides), weight ``(N,)``,
    residual ``(..., N)`` like x. Returns y ``(..., N)`` in x's dtype, or ``(y, h)`` when
    ``residual`` is given, both from one pass (h rounded to x's dtype; y normalizes the fp32
    h, see the module docstring). Statistics are accumulated in fp32. N <= 65536 on the
    Triton path.
    """
    _common.check_tensor("x", x)
    _common.check_tensor("weight", weight, ndim=1)
    eps = _check_inputs(x, weight, None, residual, eps)
    if _common.resolve_backend(backend, x, weight, residual) == "torch":
        return rms_norm_reference(x, weight, eps, residual=residual)
    return _norm(x, weight, None, eps, residual, is_rms=True)


def layer_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float = 1e-5,
    *,
    residual: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """LayerNorm over the last dimension, optionally after adding a residual.

    ``y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias`` (biased variance, as
    ``torch.nn.functional.layer_norm``) with ``h = x`` or ``h = x + residual``; a ``None``
    weight means 1 and a ``None`` bias means 0.

    Shapes: x ``(..., N)`` (a 2-D x may have any strides), weight ``(N,)`` or None, bias
    ``(N,)`` or None, residual ``(..., N)`` like x. Returns y ``(..., N)`` in x's dtype, or
    ``(y, h)`` when ``residual`` is given (h rounded to x's dtype, y from the fp32 h).
    """
    eps = _check_inputs(x, weight, bias, residual, eps)
    if _common.resolve_backend(backend, x, weight, bias, residual) == "torch":
        return layer_norm_reference(x, weight, bias, eps, residual=residual)
    return _norm(x, weight, bias, eps, residual, is_rms=False)


# --------------------------------------------------------------------------------------
# References: plain torch, in fp32 (or float64 for float64 inputs)
# --------------------------------------------------------------------------------------
def _sum_in_acc(x, residual):
    acc = torch.promote_types(x.dtype, torch.float32)
    h = x.to(acc)
    if residual is not None:
        h = h + residual.to(acc)
    return h


def rms_norm_reference(x, weight, eps=1e-6, *, residual=None):
    h = _sum_in_acc(x, residual)
    # h * rsqrt(mean(h^2) + eps) * weight, as one torch op
    y = torch.nn.functional.rms_norm(h, (h.shape[-1],), weight.to(h.dtype), eps).to(x.dtype)
    return (y, h.to(x.dtype)) if residual is not None else y


def layer_norm_reference(x, weight, bias, eps=1e-5, *, residual=None):
    h = _sum_in_acc(x, residual)
    mean = h.mean(dim=-1, keepdim=True)
    var = (h - mean).pow(2).mean(dim=-1, keepdim=True)
    y = (h - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(h.dtype)
    if bias is not None:
        y = y + bias.to(h.dtype)
    y = y.to(x.dtype)
    return (y, h.to(x.dtype)) if residual is not None else y
