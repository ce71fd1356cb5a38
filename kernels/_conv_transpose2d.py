"""Transposed 2-D convolution as sub-pixel implicit GEMMs with a fused bias + activation.

``out[n, co, oh, ow] = sum_{ci, r, s} x[n, ci, ih, iw] * w[ci, co, r, s]`` over the taps with
``oh = ih * stride_h - pad_h + r`` and ``ow = iw * stride_w - pad_w + s``.

Why sub-pixel phases rather than a direct gather: in a gather formulation every output pixel
tests every tap for ``(oh + pad - r) % stride == 0``, so a tile that mixes output rows of all
residues multiplies ``stride_h * stride_w`` times more (mostly masked) products than it keeps:
4x the tensor-core work for DCGAN's stride-2 layers. Splitting the output by *phase*
``(qh, qw) = (oh % stride_h, ow % stride_w)`` removes the test: within one phase the taps that
land are exactly ``r = r0 + stride_h * t`` with ``r0 = (qh + pad_h) % stride_h`` and the input
row is ``ih = i + dh - t`` for output row ``oh = qh + stride_h * i``, ``dh = (qh + pad_h - r0) //
stride_h``: a stride-1 correlation with ``ceil((R - r0) / stride_h)`` taps. One launch covers
all ``stride_h * stride_w`` phases; each program takes one phase's tile of pixels.

GEMM view per phase: M = N * Hq * Wq phase pixels, N_gemm = C_out, reduction = taps * C_in.

Boundary taps: a tile only loops over the taps that are in range for *some* of its rows (the
tap range is an interval computed from the tile's min/max row), so a tile never multiplies a
tap that is padding for all its pixels. For tiny spatial sizes (DCGAN's 1x1 -> 4x4 latent
projection, the 4x4 -> 8x8 layer) the pixel order puts the batch index fastest
(``BATCH_INNER``): a tile then holds one output position across many images, and of the 16
taps of the 1x1 -> 4x4 layer it runs exactly the one that lands, instead of all 16.

Fast layout, as for conv2d: channels-last activations and a channels-last weight
(``(C_in, C_out, R, S)`` with C_out contiguous); NCHW is correct but unpipelined.

``fold_batchnorm`` (eval-mode BatchNorm folded into a transposed conv's weight and bias) lives
in ``conv2d.py`` and is re-exported here: call it with ``transposed=True``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _common
from ._conv2d import (IntPair, _activation_reference, _check_activation, _out_like, _pair,
                     _prune_tiles)
from ._conv2d import fold_batchnorm  # noqa: F401  (re-export; see the module docstring)


@triton.jit
def _conv_transpose2d_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, out_ptr,
    # sizes
    N, CI, H, W, CO, Ho, Wo, R, S,
    pad_h, pad_w,
    negative_slope,
    # strides (elements)
    sxn, sxc, sxh, sxw,
    swi, swo, swr, sws,
    sb,
    son, soc, soh, sow,
    # meta-parameters
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, BATCH_INNER: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_M: tl.constexpr,
):
    # ---- which phase, which tile: every phase gets the grid of the largest phase (phase
    # (0, 0), ceil(Ho / stride) rows); the few programs past a smaller phase's end mask out --
    HQ_MAX = tl.cdiv(Ho, STRIDE_H)
    WQ_MAX = tl.cdiv(Wo, STRIDE_W)
    num_pid_m = tl.cdiv(N * HQ_MAX * WQ_MAX, BLOCK_M)
    num_pid_n = tl.cdiv(CO, BLOCK_N)
    pid = tl.program_id(0)
    per_phase = num_pid_m * num_pid_n
    phase = pid // per_phase
    pid = pid % per_phase
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    qh = phase // STRIDE_W
    qw = phase % STRIDE_W
    Hq = (Ho - qh + STRIDE_H - 1) // STRIDE_H            # this phase's output rows
    Wq = (Wo - qw + STRIDE_W - 1) // STRIDE_W
    r0 = (qh + pad_h) % STRIDE_H                         # first kernel row landing on phase qh
    s0 = (qw + pad_w) % STRIDE_W
    Tr = (R - r0 + STRIDE_H - 1) // STRIDE_H             # its taps: r = r0 + STRIDE_H * t
    Ts = (S - s0 + STRIDE_W - 1) // STRIDE_W
    dh = (qh + pad_h - r0) // STRIDE_H                   # ih = i + dh - t
    dw = (qw + pad_w - s0) // STRIDE_W

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)     # output channels
    offs_c = tl.arange(0, BLOCK_C)                       # input channels within a block
    m_ok = offs_m < N * Hq * Wq
    o_ok = offs_o < CO
    if BATCH_INNER:
        n_idx = offs_m % N
        pix = offs_m // N
    else:
        n_idx = offs_m // (Hq * Wq)
        pix = offs_m % (Hq * Wq)
    i = pix // Wq
    j = pix % Wq
    x_rows = x_ptr + n_idx.to(tl.int64) * sxn            # int64: N*C*H*W may pass 2^31

    # ---- taps in range for some row of this tile: t in (i + dh - H, i + dh] ------------------
    BIG = 1 << 30
    i_lo = tl.min(tl.where(m_ok, i, BIG), axis=0)
    i_hi = tl.max(tl.where(m_ok, i, -1), axis=0)
    j_lo = tl.min(tl.where(m_ok, j, BIG), axis=0)
    j_hi = tl.max(tl.where(m_ok, j, -1), axis=0)
    t_lo = tl.maximum(i_lo + dh - H + 1, 0)
    t_hi = tl.minimum(i_hi + dh + 1, Tr)
    u_lo = tl.maximum(j_lo + dw - W + 1, 0)
    u_hi = tl.minimum(j_hi + dw + 1, Ts)
    n_t = tl.maximum(t_hi - t_lo, 0)
    n_u = tl.maximum(u_hi - u_lo, 0)                     # 0 for an empty tile or tap-less phase

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # one flat (tap, channel block) loop: the loop Triton software-pipelines
    num_cb = tl.cdiv(CI, BLOCK_C)
    for it in range(0, n_t * n_u * num_cb):
        tap = it // num_cb
        c0 = (it % num_cb) * BLOCK_C
        t = t_lo + tap // n_u
        u = u_lo + tap % n_u
        ih = i + dh - t
        iw = j + dw - u
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        cc = c0 + offs_c
        c_ok = cc < CI
        a_ptrs = (x_rows + ih * sxh + iw * sxw)[:, None] + cc[None, :] * sxc
        a = tl.load(a_ptrs, mask=pix_ok[:, None] & c_ok[None, :], other=0.0)
        r = r0 + STRIDE_H * t
        s = s0 + STRIDE_W * u
        b_ptrs = w_ptr + cc[:, None] * swi + offs_o[None, :] * swo + r * swr + s * sws
        b = tl.load(b_ptrs, mask=c_ok[:, None] & o_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)

    # ---- epilogue in fp32: + bias, activation; one rounding; scatter to the phase's pixels ---
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_o * sb, mask=o_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    acc = _common.epilogue(acc, ACTIVATION, negative_slope)
    oh = qh + STRIDE_H * i
    ow = qw + STRIDE_W * j
    o_ptrs = (out_ptr + n_idx.to(tl.int64) * son + oh * soh + ow * sow)[:, None] + offs_o[None, :] * soc
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & o_ok[None, :])


def _configs():
    """CUDA tile candidates: 128-wide tiles for DCGAN's 128-512 channel layers, narrow-N
    tiles for the 3-channel RGB output layer, short channel steps for the 100-channel latent."""
    cfgs = []
    for bm, bn, bc, warps, stages in [
        (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4), (128, 256, 64, 8, 3), (64, 64, 32, 4, 5), (128, 64, 32, 4, 4),
        (128, 32, 64, 4, 4), (128, 16, 64, 4, 4), (64, 32, 32, 4, 4), (64, 16, 32, 4, 4),
        (64, 16, 16, 2, 3),  # tiny problems (unit-test shapes, a handful of channels)
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_C": bc, "GROUP_M": 8},
                                  num_warps=warps, num_stages=stages))
    return cfgs


# GENFUSE_AUTOTUNE=quick (the GPU check): (BLOCK_M, BLOCK_N, BLOCK_C, num_warps, num_stages) by
# output channels, in order of preference. The sm_90 compile check of every kept config at the
# DCGAN's layers (compile_check.py --tuned 100, triton 3.6, 2026-12-01) found 64-channel steps
# spilling in NCHW on these layers (64x128x64: 68-584 bytes; 128x128x64 on the 100-channel
# latent: 100), so the quick tiles step 32 channels (16 for the tiny tests); under 3.9,
# 128x64x32 spills in NCHW at 64 output channels (700 bytes), hence 64-row tiles there. None of
# these spills under 3.6 in either layout (compile_check.py --quick); under 3.9 only 64x16x16
# in fp32 (4-8 bytes).
_QUICK = (
    (128, ((128, 128, 32, 8, 4), (128, 64, 32, 4, 4))),   # DCGAN's 128-512 channel layers
    (32, ((64, 64, 32, 4, 5), (64, 32, 32, 4, 4))),
    (0, ((64, 16, 32, 4, 4), (64, 16, 16, 2, 3))),        # the RGB output layer, tiny tests
)


def _quick_configs(out_channels: int) -> tuple:
    tiles = next(t for least, t in _QUICK if out_channels >= least)
    return tuple(_common.quick_key({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_C": bc, "GROUP_M": 8}, w, s)
                 for bm, bn, bc, w, s in tiles)


def _prune(configs, named_args, **kwargs):
    """conv2d's rule on one phase's GEMM (pixels x C_out x C_in)."""
    a = {**named_args, **kwargs}  # the constexpr strides arrive as keyword arguments
    m = a["N"] * triton.cdiv(a["Ho"], a["STRIDE_H"]) * triton.cdiv(a["Wo"], a["STRIDE_W"])
    kept = _prune_tiles(configs, m, a["CO"], a["CI"], a["x_ptr"].element_size())
    return _common.select_quick(kept, _quick_configs(a["CO"]))


# Tuned per exact layer shape: a generator has a handful of distinct layers, each tuned once.
_conv_transpose2d_kernel_tuned = triton.autotune(
    configs=_configs(), key=["N", "CI", "H", "W", "CO", "R", "S", "STRIDE_H", "STRIDE_W"],
    prune_configs_by={"early_config_prune": _prune},
)(_conv_transpose2d_kernel)

# the interpreter runs one fixed, small-but-not-tiny tile (every tl.dot dim >= 16)
_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_C": 16, "GROUP_M": 4}

# Batch-fastest pixel order when one phase holds fewer pixels than this (see the module
# docstring): tiles then see one output position each and skip every tap that misses it.
# Above it the (n, i, j) order keeps NCHW loads contiguous along the image row.
_BATCH_INNER_MAX_PIXELS = 64


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
def conv_transpose2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    output_padding: IntPair = 0,
    activation: Optional[str] = None,
    negative_slope: float = 0.2,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``out = act(conv_transpose2d(x, weight, stride, padding, output_padding) + bias)``.

    Shapes:
        x       ``(N, C_in, H, W)``, any strides (NCHW or channels-last memory); N may be 0
        weight  ``(C_in, C_out, R, S)`` as ``nn.ConvTranspose2d`` (groups=1, dilation=1)
        bias    ``(C_out,)`` or None
        out     ``(N, C_out, Ho, Wo)`` in x's dtype; channels-last memory when x or weight
                is channels-last (cuDNN's rule), contiguous NCHW otherwise
    with ``Ho = (H - 1) * stride_h - 2 * pad_h + R + output_padding_h`` (likewise Wo).

    ``stride``, ``padding``, ``output_padding`` are ints or ``(h, w)`` pairs, as in torch:
    ``output_padding < stride`` (it only adds rows/columns at the far edge, which get bias
    alone where no tap lands). ``activation``: None, "relu", "silu", "tanh", "sigmoid",
    "leaky_relu" (slope ``negative_slope``, default 0.2). fp32 accumulation; bias and
    activation in fp32 before one rounding. Eval-mode BatchNorm after the conv folds into
    ``weight``/``bias`` with ``fold_batchnorm(..., transposed=True)``.
    """
    _common.check_tensor("x", x, ndim=4)
    _common.check_tensor("weight", weight, ndim=4)
    _common.check_same("x", x, weight=weight)
    n, ci, h, w = x.shape
    cw, co, r, s = weight.shape
    if cw != ci:
        raise ValueError(f"weight has {cw} input channels but x has {ci} "
                         f"(transposed-conv weight (C_in, C_out, R, S) = {tuple(weight.shape)})")
    if min(ci, h, w, co, r, s) < 1:  # an empty batch (N = 0) is fine: an empty output
        raise ValueError(f"empty transposed conv: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if bias is not None:
        _common.check_tensor("bias", bias, ndim=1)
        _common.check_same("x", x, bias=bias)
        if bias.shape[0] != co:
            raise ValueError(f"bias has {bias.shape[0]} elements but weight has {co} output channels")
    sh, sw = _pair("stride", stride, 1)
    ph, pw = _pair("padding", padding, 0)
    oph, opw = _pair("output_padding", output_padding, 0)
    if oph >= sh or opw >= sw:
        raise ValueError(f"output_padding {(oph, opw)} must be smaller than stride {(sh, sw)}")
    negative_slope = _check_activation(activation, negative_slope)
    ho = (h - 1) * sh - 2 * ph + r + oph
    wo = (w - 1) * sw - 2 * pw + s + opw
    if ho < 1 or wo < 1:
        raise ValueError(f"padding {(ph, pw)} leaves no output: (H, W) = {(h, w)}, kernel {r}x{s}, "
                         f"stride {(sh, sw)} give {ho}x{wo}")

    if _common.resolve_backend(backend, x, weight, bias) == "torch":
        return conv_transpose2d_reference(x, weight, bias, stride=(sh, sw), padding=(ph, pw),
                                          output_padding=(oph, opw), activation=activation,
                                          negative_slope=negative_slope)

    out = _out_like(x, weight, (n, co, ho, wo))
    if n == 0:
        return out
    b_arg = bias if bias is not None else out        # never read when HAS_BIAS is False
    args = (x, weight, b_arg, out, n, ci, h, w, co, ho, wo, r, s, ph, pw, negative_slope,
            *x.stride(), *weight.stride(), bias.stride(0) if bias is not None else 0, *out.stride())
    hq, wq = triton.cdiv(ho, sh), triton.cdiv(wo, sw)
    meta = dict(STRIDE_H=sh, STRIDE_W=sw, BATCH_INNER=n > 1 and hq * wq < _BATCH_INNER_MAX_PIXELS,
                HAS_BIAS=bias is not None, ACTIVATION=activation or "")

    def grid(cfg):  # every phase gets the largest phase's tile count
        return (sh * sw * triton.cdiv(n * hq * wq, cfg["BLOCK_M"]) * triton.cdiv(co, cfg["BLOCK_N"]),)

    _common.launch(_conv_transpose2d_kernel, _conv_transpose2d_kernel_tuned, grid, *args,
                   interpret_meta=_INTERPRET_CONFIG, **meta)
    return out


# --------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------
def conv_transpose2d_reference(x, weight, bias=None, *, stride=1, padding=0, output_padding=0,
                               activation=None, negative_slope=0.2):
    """Plain torch: ``F.conv_transpose2d`` then the activation."""
    y = F.conv_transpose2d(x, weight, bias, stride=stride, padding=padding, output_padding=output_padding)
    return _activation_reference(y, activation, negative_slope)
