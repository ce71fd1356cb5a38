"""GroupNorm with an optional fused SiLU: the normalisation in every ResNet block of a VAE decoder.

    y = act((x - mean[n, g]) / sqrt(var[n, g] + eps) * weight[c] + bias[c])

with the statistics of sample ``n`` and group ``g`` taken over the group's C/G channels and
every spatial position. In the Stable Diffusion VAE a group is large: 512 channels / 32
groups = 16 channels x 512 x 512 pixels = 4M elements, and there are only N*G = 32 groups.

Design (two kernels, three logical passes, x read twice and written once):

1. ``_gn_stats_kernel``, grid ``(N*G, SPLIT)``: program ``(ng, k)`` walks spatial chunk
   ``k`` of group ``ng`` in tiles of ``BLOCK_C`` channels x ``BLOCK_S`` positions and writes
   the chunk's partial ``(count, mean, M2)`` to a tiny fp32 workspace ``(N*G, 3, SPLIT)``.
   One program per group would leave 100 of an H100's 132 SMs idle for the 32 VAE groups and
   stream 8 MB through one SM; splitting each group over SPLIT programs fills the GPU
   (about 4 programs per SM) for the cost of 12 bytes per program.
2. ``_gn_apply_kernel``, same grid: every program first merges the SPLIT partials of its
   group (a few hundred bytes, L2-resident) into mean and rstd, then normalises its chunk,
   applies the per-channel affine and the activation, and stores in the input dtype.
   Merging in each program instead of in a third "finalize" launch saves a launch.

Numerics (all in fp32). The naive one-pass ``E[x^2] - E[x]^2`` cancels catastrophically when
|mean| >> std (a group with mean 100 and std 0.1 loses all 7 digits of fp32). Instead:

* every value is first shifted by ``K`` = the group's first element (``x - K`` is exact by
  Sterbenz' lemma when ``x`` and ``K`` are within a factor of two, and small otherwise), and
  the kernels carry the *shifted* mean. This keeps ``(x - K) - mean_d`` accurate even when
  the true mean is not representable to within std * 1e-7 in fp32 (the mean 100, std 0.1
  case: one ulp at 100 is 7.6e-6 = 7.6e-5 std, too coarse for the fp32 error band);
* each tile's statistics are exact two-pass ones (tile mean, then centred sum of squares,
  both in registers), and tiles and chunks are combined with Chan et al.'s parallel update
  ``M2 = M2_a + M2_b + delta^2 * n_a * n_b / n``, which never subtracts two large sums.
  This is chunked Welford: one read of x for the statistics, robust for any shift.

Memory layouts: x is any ``(N, C, *spatial)`` view. Spatial dims that are contiguous with
each other (NCHW and channels-last both qualify) merge into one strided dim, so both common
layouts run the same 1-D-spatial kernel with explicit strides and no copy; a cropped view
keeps two spatial dims (``SPATIAL_2D``). The output is allocated in the input's dim order,
so a channels-last input gets a channels-last output.
"""
from __future__ import annotations

import logging
import math
import numbers
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import _common

__all__ = ["group_norm", "group_norm_reference", "ACTIVATIONS"]

ACTIVATIONS = (None, "silu")
_log = logging.getLogger("genfuse")
_warned_copy = False


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _tile_offsets(s, stride_h, stride_w, W, SPATIAL_2D: tl.constexpr):
    """Offsets (in elements, relative to the group base) of spatial positions ``s``."""
    s64 = s.to(tl.int64)  # int64: a position times a channels-last stride can pass 2^31
    if SPATIAL_2D:
        # A view whose two spatial dims do not merge (e.g. a crop): split s into (h, w).
        h = s64 // W
        offs = h * stride_h + (s64 - h * W) * stride_w
    else:
        offs = s64 * stride_w
    return offs


@triton.jit
def _gn_stats_kernel(
    # pointers
    x_ptr, ws_ptr,
    # sizes: groups, channels per group, spatial positions (and the inner width when 2-D),
    # positions per program, programs per group
    G, CPG, S, W, S_PER_PROG, SPLIT,
    # strides of x, in elements
    stride_xn, stride_xc, stride_xh, stride_xw,
    # meta-parameters
    SPATIAL_2D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_ng = tl.program_id(0)
    pid_sp = tl.program_id(1)
    n = pid_ng // G
    g = pid_ng % G
    # int64: n * stride_xn exceeds 2^31 for a batch of large images.
    x_grp = x_ptr + n.to(tl.int64) * stride_xn + (g * CPG).to(tl.int64) * stride_xc
    shift = tl.load(x_grp).to(tl.float32)  # K: the group's first element (see module doc)

    s_lo = pid_sp * S_PER_PROG
    s_hi = tl.minimum(S, s_lo + S_PER_PROG)
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + offs_c
        mask_c = c < CPG
        ptr_c = x_grp + c.to(tl.int64)[:, None] * stride_xc  # (BLOCK_C, 1)
        n_c = tl.minimum(CPG - c0, BLOCK_C)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + offs_s
            mask = mask_c[:, None] & (s < s_hi)[None, :]
            ptrs = ptr_c + _tile_offsets(s, stride_xh, stride_xw, W, SPATIAL_2D)[None, :]
            x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_C, BLOCK_S)
            d = tl.where(mask, x - shift, 0.0)
            # Exact two-pass statistics of this tile (it is in registers) ...
            n_b = (n_c * tl.minimum(s_hi - s0, BLOCK_S)).to(tl.float32)
            mean_b = tl.sum(tl.sum(d, axis=1), axis=0) / n_b
            dev = tl.where(mask, d - mean_b, 0.0)
            m2_b = tl.sum(tl.sum(dev * dev, axis=1), axis=0)
            # ... merged into the running ones with Chan's parallel update.
            n_ab = count + n_b
            delta = mean_b - mean
            mean += delta * (n_b / n_ab)
            m2 += m2_b + delta * delta * (count * (n_b / n_ab))
            count = n_ab
    ws = ws_ptr + pid_ng.to(tl.int64) * 3 * SPLIT + pid_sp
    tl.store(ws, count)
    tl.store(ws + SPLIT, mean)
    tl.store(ws + 2 * SPLIT, m2)


@triton.jit
def _gn_apply_kernel(
    # pointers (w_ptr / b_ptr are dummies when HAS_WEIGHT / HAS_BIAS are off)
    x_ptr, y_ptr, w_ptr, b_ptr, ws_ptr,
    # sizes, as in _gn_stats_kernel
    G, CPG, S, W, S_PER_PROG, SPLIT, eps,
    # strides of x, y, weight and bias, in elements
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_yn, stride_yc, stride_yh, stride_yw,
    stride_w, stride_b,
    # meta-parameters
    SPATIAL_2D: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr, SPLIT_BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_ng = tl.program_id(0)
    pid_sp = tl.program_id(1)
    n = pid_ng // G
    g = pid_ng % G
    x_grp = x_ptr + n.to(tl.int64) * stride_xn + (g * CPG).to(tl.int64) * stride_xc
    y_grp = y_ptr + n.to(tl.int64) * stride_yn + (g * CPG).to(tl.int64) * stride_yc
    shift = tl.load(x_grp).to(tl.float32)

    # Merge the group's SPLIT partials (count_i, mean_i, M2_i) in one step:
    # mean = sum(n_i mean_i) / n,  M2 = sum(M2_i) + sum(n_i (mean_i - mean)^2).
    k = tl.arange(0, SPLIT_BLOCK)
    mask_k = k < SPLIT
    ws = ws_ptr + pid_ng.to(tl.int64) * 3 * SPLIT + k
    cnt_k = tl.load(ws, mask=mask_k, other=0.0)
    mean_k = tl.load(ws + SPLIT, mask=mask_k, other=0.0)
    m2_k = tl.load(ws + 2 * SPLIT, mask=mask_k, other=0.0)
    count = tl.sum(cnt_k, axis=0)
    mean = tl.sum(cnt_k * mean_k, axis=0) / count
    dm = mean_k - mean
    m2 = tl.sum(m2_k, axis=0) + tl.sum(cnt_k * dm * dm, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / count + eps)  # biased variance, as torch's group_norm

    s_lo = pid_sp * S_PER_PROG
    s_hi = tl.minimum(S, s_lo + S_PER_PROG)
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + offs_c
        mask_c = c < CPG
        # Per-channel scale and offset, loaded once per channel block: y = (d - mean) * a + b.
        a = tl.zeros([BLOCK_C], dtype=tl.float32) + rstd
        if HAS_WEIGHT:
            a = a * tl.load(w_ptr + (g * CPG + c) * stride_w, mask=mask_c, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b = tl.load(b_ptr + (g * CPG + c) * stride_b, mask=mask_c, other=0.0).to(tl.float32)
        else:
            b = tl.zeros([BLOCK_C], dtype=tl.float32)
        xc = x_grp + c.to(tl.int64)[:, None] * stride_xc
        yc = y_grp + c.to(tl.int64)[:, None] * stride_yc
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + offs_s
            mask = mask_c[:, None] & (s < s_hi)[None, :]
            x_offs = _tile_offsets(s, stride_xh, stride_xw, W, SPATIAL_2D)[None, :]
            # other=K: masked lanes normalise to about -mean*rstd instead of -K*rstd, which
            # could overflow exp() in the sigmoid (harmless, they are never stored, but noisy).
            x = tl.load(xc + x_offs, mask=mask, other=shift).to(tl.float32)
            # (x - K) - mean_d, never x - (K + mean_d): see the module doc.
            y = ((x - shift) - mean) * a[:, None] + b[:, None]
            if ACTIVATION == "silu":
                y = y * tl.sigmoid(y)
            y_offs = _tile_offsets(s, stride_yh, stride_yw, W, SPATIAL_2D)[None, :]
            tl.store(yc + y_offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# Tuning: one place. Memory-bound, so tiles of 1K-8K elements (enough loads in flight per
# SM) and BLOCK_C = the whole group when it has <= 64 channels (VAE: 4, 8 or 16), so the
# per-channel affine is loaded once per program.
# --------------------------------------------------------------------------------------
_MAX_SPLIT = 256       # partials merged as one vector of next_power_of_2(SPLIT) lanes
_GPU_GRANULE = 256     # spatial chunk granularity on GPU (a multiple of the smaller BLOCK_S)
_INTERP_BLOCK_S = 64   # interpreter: one fixed config, small-but-not-tiny
_INTERP_BLOCK_C = 16
_INTERP_TARGET_PROGRAMS = 8  # so that CPU tests also exercise the split path


_MAX_BLOCK_S = 2048


def _configs() -> List[triton.Config]:
    # BLOCK_S down to 1: for (N, C) inputs or 1x1 maps the tile is all channels.
    return [triton.Config({"BLOCK_S": 1 << i}, num_warps=nw)
            for i in range(_MAX_BLOCK_S.bit_length()) for nw in (4, 8)]


# GENFUSE_AUTOTUNE=quick (the GPU check): (tile elements, num_warps) in order of preference, the
# middle of the 1K-8K range the pruning keeps. bench/compile_check.py --quick (sm_90, the SD VAE's
# group shapes): no spills under triton 3.6; under 3.9 4 bytes in one fp32 and one fp16 case.
# 8 warps on 4096 elements spilled (4-16 bytes) at 4 channels a group under both, so they are
# out. Small groups keep the first tile the pruning allows.
_QUICK = ((4096, 4), (2048, 4))


def _quick_configs(block_c: int) -> tuple:
    stages = triton.Config({}).num_stages  # what every config of ``_configs`` gets
    return tuple(_common.quick_key({"BLOCK_S": elems // block_c}, w, stages)
                 for elems, w in _QUICK if block_c <= elems <= block_c * _MAX_BLOCK_S)


def _prune(configs, named_args, **kwargs):
    """Tiles of 1K-8K elements that do not overhang a program's chunk; for small groups,
    the largest tile that fits."""
    args = {**named_args, **kwargs}
    block_c = args["BLOCK_C"]
    s_cap = _common.next_power_of_2(args["S_PER_PROG"])
    bs = lambda c: c.kwargs["BLOCK_S"]  # noqa: E731
    fits = [c for c in configs if bs(c) <= s_cap and block_c * bs(c) <= 8192]
    big = [c for c in fits if block_c * bs(c) >= 1024]
    kept = big or [c for c in fits if bs(c) == max(bs(f) for f in fits)]
    return _common.select_quick(kept, _quick_configs(block_c))


# The layout decides the coalesced axis, so the key holds the spatial stride (1 for NCHW).
_KEY = ["CPG", "S_PER_PROG", "stride_xw", "SPATIAL_2D"]
_gn_stats_tuned = triton.autotune(configs=_configs(), key=_KEY,
                                  prune_configs_by={"early_config_prune": _prune})(_gn_stats_kernel)
_gn_apply_tuned = triton.autotune(configs=_configs(), key=_KEY,
                                  prune_configs_by={"early_config_prune": _prune})(_gn_apply_kernel)

_SM_COUNT = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _launch_settings(ng: int, cpg: int, s: int, device: torch.device) -> Tuple[int, int, int]:
    """(BLOCK_C, S_PER_PROG, SPLIT): how each group's spatial extent is cut across programs.

    Aim for about 4 programs per SM in total (a memory-bound kernel needs several resident
    programs per SM to keep enough loads in flight), never cutting chunks below one granule.
    """
    if _common.INTERPRET or device.type != "cuda":  # same choice as the launcher's
        block_c, granule, target = min(_common.next_power_of_2(cpg), _INTERP_BLOCK_C), \
            _INTERP_BLOCK_S, _INTERP_TARGET_PROGRAMS
    else:
        # Up to 64 channels per tile, more when the spatial extent is tiny ((N, C) inputs).
        block_c = min(_common.next_power_of_2(cpg), max(64, 8192 // _common.next_power_of_2(s)))
        granule, target = _GPU_GRANULE, 4 * _sm_count(device)
    split = max(1, min(-(-target // ng), -(-s // granule), _MAX_SPLIT))
    if split == 1:
        return block_c, s, 1
    s_per_prog = -(-(-(-s // split)) // granule) * granule  # ceil(s / split) rounded up to a granule
    return block_c, s_per_prog, -(-s // s_per_prog)


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
def _merge_dims(sizes: Sequence[int], *strides: Sequence[int]) -> Tuple[List[int], List[List[int]]]:
    """Drop size-1 dims and merge neighbours that are contiguous in *every* stride set."""
    out_sizes: List[int] = []
    out_strides: List[List[int]] = [[] for _ in strides]
    for i, size in enumerate(sizes):
        if size == 1:
            continue
        if out_sizes and all(st[-1] == ss[i] * size for st, ss in zip(out_strides, strides)):
            out_sizes[-1] *= size
            for st, ss in zip(out_strides, strides):
                st[-1] = ss[i]
        else:
            out_sizes.append(size)
            for st, ss in zip(out_strides, strides):
                st.append(ss[i])
    return out_sizes, out_strides


def _empty_like_layout(x: torch.Tensor) -> torch.Tensor:
    """A new tensor shaped like ``x`` with x's dim order (NCHW stays NCHW, NHWC stays NHWC).

    Allocated through ``_common.empty`` on the permuted shape, so test poisoning applies.
    """
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))  # stable: ties keep dim order
    out = _common.empty([x.shape[d] for d in order], x.dtype, x.device)
    inverse = [0] * x.dim()
    for pos, d in enumerate(order):
        inverse[d] = pos
    return out.permute(inverse)


def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5, *,
               activation: Optional[str] = None, backend: Optional[str] = None) -> torch.Tensor:
    """GroupNorm over ``(N, C, *spatial)`` with an optional fused activation.

    ``y[n, c, ...] = act((x[n, c, ...] - mean[n, g]) * rsqrt(var[n, g] + eps) * weight[c] + bias[c])``
    where ``g = c // (C // num_groups)`` and mean / biased var are taken in fp32 over the
    group's ``C // num_groups`` channels and all spatial positions (as ``torch.nn.GroupNorm``).

    Args:
        x: ``(N, C)`` or ``(N, C, *spatial)``, typically ``(N, C, H, W)``; fp16 / bf16 / fp32;
            any strides (NCHW, channels-last, crops) without a copy for up to two unmergeable
            spatial dims.
        num_groups: G, a divisor of C.
        weight, bias: ``(C,)`` or None (then 1 and 0), same device and dtype as x.
        eps: added to the variance, >= 0.
        activation: None or ``"silu"`` (``y * sigmoid(y)``, fused: saves writing and re-reading y).
        backend: None, ``"triton"`` or ``"torch"`` (see ``_common.resolve_backend``).

    Returns:
        ``(N, C, *spatial)`` in x's dtype and dim order (channels-last in, channels-last out).
    """
    _common.check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions (N, C, *spatial), got shape {tuple(x.shape)}")
    C = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    if num_groups <= 0 or C % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must be positive and divide the {C} channels of x")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _common.check_tensor(name, t, ndim=1)
        if t.shape[0] != C:
            raise ValueError(f"{name} has {t.shape[0]} elements but x has {C} channels")
    _common.check_same("x", x, weight=weight, bias=bias)
    eps = _common.check_real("eps", eps, nonnegative=True)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if _common.resolve_backend(backend, x, weight, bias) == "torch":
        return group_norm_reference(x, num_groups, weight, bias, eps, activation=activation)

    out = _empty_like_layout(x)
    N, G = x.shape[0], num_groups
    spatial, (sx, sy) = _merge_dims(x.shape[2:], x.stride()[2:], out.stride()[2:])
    if len(spatial) > 2:
        # Three or more spatial dims that do not merge (a 5-D crop): rare enough to pay a
        # copy for rather than carry a third stride through the kernels. Said once.
        global _warned_copy
        if not _warned_copy:
            _warned_copy = True
            _log.warning("group_norm: copying a %d-D input whose spatial dims do not merge", x.dim())
        x = x.contiguous()
        out = _common.empty(x.shape, x.dtype, x.device)
        spatial, (sx, sy) = _merge_dims(x.shape[2:], x.stride()[2:], out.stride()[2:])
    if out.numel() == 0:
        return out
    spatial_2d = len(spatial) == 2
    # Pad to (H, W): W is the inner spatial size, H * W = S; stride 0 for an absent dim.
    H, W = ([1] + spatial)[-2:] if spatial else (1, 1)
    sx, sy = ([0, 0] + sx)[-2:], ([0, 0] + sy)[-2:]
    S, cpg = H * W, C // G

    block_c, s_per_prog, split = _launch_settings(N * G, cpg, S, x.device)
    ws = _common.empty((N * G, 3, split), torch.float32, x.device)  # (count, mean, M2) partials
    grid = (N * G, split)
    sizes = (G, cpg, S, W, s_per_prog, split)
    x_strides = (x.stride(0), x.stride(1), sx[0], sx[1])
    y_strides = (out.stride(0), out.stride(1), sy[0], sy[1])
    meta = dict(SPATIAL_2D=spatial_2d, BLOCK_C=block_c)
    # the interpreter: one fixed config (autotuning there would run every config)
    fixed = dict(BLOCK_S=min(_INTERP_BLOCK_S, _common.next_power_of_2(s_per_prog)), num_warps=4)
    dummy = x  # never read when HAS_WEIGHT / HAS_BIAS is off
    _common.launch(_gn_stats_kernel, _gn_stats_tuned, grid, x, ws, *sizes, *x_strides,
                   interpret_meta=fixed, **meta)
    _common.launch(_gn_apply_kernel, _gn_apply_tuned, grid,
                   x, out, weight if weight is not None else dummy, bias if bias is not None else dummy,
                   ws, *sizes, float(eps), *x_strides, *y_strides,
                   weight.stride(0) if weight is not None else 0, bias.stride(0) if bias is not None else 0,
                   HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACTIVATION=activation,
                   SPLIT_BLOCK=_common.next_power_of_2(split), interpret_meta=fixed, **meta)
    return out


# --------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------
def group_norm_reference(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                         bias: Optional[torch.Tensor] = None, eps: float = 1e-5, *,
                         activation: Optional[str] = None) -> torch.Tensor:
    """Plain torch GroupNorm (+ activation), computed in at least fp32, returned in x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64
    N, C = x.shape[:2]
    # The group size spelled out, not -1: reshape cannot infer it for an empty batch (N = 0).
    group_size = C // num_groups * math.prod(x.shape[2:])
    xg = x.to(compute).reshape(N, num_groups, group_size)          # (N, G, C/G * spatial)
    mean = xg.mean(dim=-1, keepdim=True)                            # (N, G, 1)
    var = ((xg - mean) ** 2).mean(dim=-1, keepdim=True)             # biased, (N, G, 1)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)      # (N, C, *spatial)
    per_channel = (1, C) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(compute).reshape(per_channel)
    if bias is not None:
        y = y + bias.to(compute).reshape(per_channel)
    if activation == "silu":
        y = y * torch.sigmoid(y)
    return y.to(x.dtype)
