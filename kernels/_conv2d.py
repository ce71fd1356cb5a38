"""2-D convolution as an implicit GEMM with a fused epilogue (bias, activation, residual).

GEMM view of ``out = act(conv(up(x), weight) + bias) + residual``:

* M      = N * Ho * Wo    output pixels        (rows of the tile, ``BLOCK_M``)
* N_gemm = K              output channels      (columns, ``BLOCK_N``)
* reduce = R * S * C      taps x input channels (``BLOCK_C`` channels per step)

No im2col buffer exists: each reduction step computes, for its tap ``(r, s)`` and channel
block, the input address of every output pixel on the fly and masks what falls into the zero
padding. A VAE decoder conv at 512 channels and 64x64 would otherwise materialise a
``(4096, 4608)`` im2col matrix, 9x the input's bytes, written and read back once per layer.

``upsample=u`` folds a nearest-neighbour ``u``x upsample into the indexing: the conv runs on the
virtual ``(u*H, u*W)`` image and reads ``x[..., ih // u, iw // u]`` (the VAE's Upsample2D +
conv), so the upsampled tensor (u^2 times the input) never exists either.

Fast layout: channels-last activations *and* weights (``t.to(memory_format=torch.channels_last)``,
done once at load time for the weights). The reduction then runs along the contiguous channel
dim of both operands, so the loads vectorise and Triton pipelines them with cp.async into
wgmma (checked by compiling for sm_90: a 3-stage 128x128x64 fp16 tile uses 96 KB of shared
memory). NCHW tensors are accepted through their strides, without copies, and computed
correctly, but their gathers cannot be proven contiguous: scalar loads, no pipelining, slow.

This file also holds :func:`fold_batchnorm` (eval-mode BatchNorm folded into the weights of a
conv or transposed conv at load time) and the activation helper the transposed conv shares.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _common

ACTIVATIONS = (None, "relu", "silu", "tanh", "sigmoid", "leaky_relu")  # a subset of _common.EPILOGUES
IntPair = Union[int, Tuple[int, int]]


@triton.jit
def _conv2d_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, res_ptr, out_ptr,
    # sizes
    N, C, H, W, K, Ho, Wo, R, S,
    stride_h, stride_w, pad_h, pad_w,
    negative_slope,
    # strides (elements)
    sxn, sxc, sxh, sxw,
    swk, swc, swr, sws,
    sb,
    srn, srk, srh, srw,
    son, sok, soh, sow,
    # meta-parameters
    UPSAMPLE: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_M: tl.constexpr,
):
    # ---- tile coordinates: grouped ordering so the GROUP_M row tiles that share a weight
    # column tile run together and the input tile they re-read stays in L2 -----------------
    M = N * Ho * Wo
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(K, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)        # output pixels (n, oh, ow)
    offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)        # output channels
    offs_c = tl.arange(0, BLOCK_C)                          # input channels within a block
    m_ok = offs_m < M
    k_ok = offs_k < K
    n_idx = offs_m // (Ho * Wo)
    pix = offs_m % (Ho * Wo)
    oh = pix // Wo
    ow = pix % Wo
    # int64 for the image offset: N*C*H*W can pass 2^31 elements at large batch; offsets
    # inside one image stay int32.
    x_rows = x_ptr + n_idx.to(tl.int64) * sxn               # (BLOCK_M,) pointers
    ih0 = oh * stride_h - pad_h                             # on the virtual (upsampled) grid
    iw0 = ow * stride_w - pad_w
    HV = H * UPSAMPLE
    WV = W * UPSAMPLE

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat loop over (tap, channel block) rather than nested loops: Triton software-
    # pipelines the innermost loop only, and at C=128, BLOCK_C=64 a nested channel loop would
    # be two iterations long.
    num_cb = tl.cdiv(C, BLOCK_C)
    for it in range(0, R * S * num_cb):
        tap = it // num_cb
        c0 = (it % num_cb) * BLOCK_C
        r = tap // S
        s = tap % S
        ihv = ih0 + r
        iwv = iw0 + s
        pix_ok = m_ok & (ihv >= 0) & (ihv < HV) & (iwv >= 0) & (iwv < WV)
        # clamp before dividing: masked rows may sit at negative (padding) coordinates
        ih = tl.maximum(ihv, 0) // UPSAMPLE
        iw = tl.maximum(iwv, 0) // UPSAMPLE
        cc = c0 + offs_c
        c_ok = cc < C
        a_ptrs = (x_rows + ih * sxh + iw * sxw)[:, None] + cc[None, :] * sxc
        a = tl.load(a_ptrs, mask=pix_ok[:, None] & c_ok[None, :], other=0.0)
        b_ptrs = w_ptr + offs_k[None, :] * swk + cc[:, None] * swc + r * swr + s * sws
        b = tl.load(b_ptrs, mask=c_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)

    # ---- epilogue in fp32: + bias, activation, + residual; one rounding to the output dtype --
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_k * sb, mask=k_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    acc = _common.epilogue(acc, ACTIVATION, negative_slope)
    tile_ok = m_ok[:, None] & k_ok[None, :]
    if HAS_RESIDUAL:
        r_ptrs = (res_ptr + n_idx.to(tl.int64) * srn + oh * srh + ow * srw)[:, None] + offs_k[None, :] * srk
        acc = acc + tl.load(r_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    o_ptrs = (out_ptr + n_idx.to(tl.int64) * son + oh * soh + ow * sow)[:, None] + offs_k[None, :] * sok
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


def _configs():
    """CUDA tile candidates. 128x128 tiles with 64-channel steps feed the tensor cores at the
    VAE's 128-512 channels; the narrow-N configs exist for the 3-channel RGB output convs."""
    cfgs = []
    for bm, bn, bc, warps, stages in [
        (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 64, 32, 4, 5),
        (128, 32, 64, 4, 4), (128, 16, 64, 4, 4), (128, 64, 16, 4, 4), (64, 32, 16, 4, 4),
        (64, 16, 16, 2, 3),  # tiny problems (unit-test shapes, a handful of channels)
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_C": bc, "GROUP_M": 8},
                                  num_warps=warps, num_stages=stages))
    return cfgs


# Hopper has 227 KB of shared memory per block; leave room for the epilogue's scratch.
_SMEM_BUDGET = 200 * 1024


def _prune_tiles(configs, m: int, n: int, c: int, elsize: int):
    """Shared by conv2d and conv_transpose2d: drop tiles far larger than the problem (a
    128-wide channel tile on a 3-channel conv only multiplies zeros; a 256-row tile on 64
    pixels idles) and pipelines whose stages cannot fit in shared memory (fp32 at 128x256).
    Always keeps at least the smallest config."""
    m_limit = max(64, _common.next_power_of_2(m))
    n_limit = max(16, _common.next_power_of_2(n))
    c_limit = max(16, _common.next_power_of_2(c))
    kept = []
    for cfg in configs:
        bm, bn, bc = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_C"]
        smem = cfg.num_stages * (bm * bc + bc * bn) * elsize
        if bm <= m_limit and bn <= n_limit and bc <= c_limit and smem <= _SMEM_BUDGET:
            kept.append(cfg)
    return kept or [min(configs, key=lambda cfg: cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"]
                        * cfg.kwargs["BLOCK_C"])]


# GENFUSE_AUTOTUNE=quick (the GPU check): (BLOCK_M, BLOCK_N, BLOCK_C, num_warps, num_stages) by
# output channels, in order of preference. None spills on sm_90 under triton 3.6 or 3.9 in
# either layout (compile_check.py --tuned 100 and --quick, 2026-12-01; only the 256-wide tiles
# spill, in NCHW). Inputs of few channels (RGB, a 4-channel latent) fail every 64-channel
# step: ``_common.select_quick`` then keeps the first tile ``_prune_tiles`` allows.
_QUICK = (
    (128, ((128, 128, 64, 8, 3), (64, 128, 64, 4, 4))),   # VAE's 128-512 channels
    (32, ((128, 64, 64, 4, 4), (64, 64, 64, 4, 4))),
    (0, ((128, 16, 64, 4, 4), (64, 16, 16, 2, 3))),       # the RGB output conv, tiny tests
)


def _quick_configs(out_channels: int) -> tuple:
    tiles = next(t for least, t in _QUICK if out_channels >= least)
    return tuple(_common.quick_key({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_C": bc, "GROUP_M": 8}, w, s)
                 for bm, bn, bc, w, s in tiles)


def _prune(configs, named_args, **kwargs):
    a = named_args
    kept = _prune_tiles(configs, a["N"] * a["Ho"] * a["Wo"], a["K"], a["C"], a["x_ptr"].element_size())
    return _common.select_quick(kept, _quick_configs(a["K"]))


# Tuned per exact problem (batch, spatial size, channels, kernel, stride, upsample): a
# network has a handful of distinct conv shapes, each tuned once.
_conv2d_kernel_tuned = triton.autotune(
    configs=_configs(), key=["N", "Ho", "Wo", "K", "C", "R", "S", "stride_h", "UPSAMPLE"],
    prune_configs_by={"early_config_prune": _prune},
)(_conv2d_kernel)

# One fixed, small-but-not-tiny tile for the interpreter (autotune there would run every
# config); every tl.dot dim stays >= 16.
_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_C": 16, "GROUP_M": 4}


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
def _pair(name: str, v: IntPair, minimum: int) -> Tuple[int, int]:
    """An int or a pair of ints, each >= minimum (shared with conv_transpose2d)."""
    pair = (v, v) if isinstance(v, int) and not isinstance(v, bool) else v
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(p, int) and not isinstance(p, bool) for p in pair)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    return int(pair[0]), int(pair[1])


def _check_activation(activation: Optional[str], negative_slope: object) -> float:
    """The epilogue's activation name and leaky_relu slope (any finite real), as a float."""
    _common.check_activation(activation, ACTIVATIONS)
    return _common.check_real("negative_slope", negative_slope)


def _strictly_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _out_like(x: torch.Tensor, weight: torch.Tensor, shape: Tuple[int, int, int, int]) -> torch.Tensor:
    """Output memory format, cuDNN's rule: channels-last when x or the weight is channels-last
    (a channels-last chain of convs never converts, and a 1x1 latent input, which is both
    formats at once, follows its weight), contiguous NCHW otherwise. Either is one strided
    store here: NCHW tiles store runs along the image row, channels-last along the channels."""
    n, k, ho, wo = shape
    if _strictly_channels_last(x) or _strictly_channels_last(weight):
        return _common.empty((n, ho, wo, k), x.dtype, x.device).permute(0, 3, 1, 2)
    return _common.empty(shape, x.dtype, x.device)


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    upsample: int = 1,
    activation: Optional[str] = None,
    negative_slope: float = 0.2,
    residual: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``out = act(conv2d(up(x), weight, stride, padding) + bias) + residual``, one kernel.

    Shapes:
        x        ``(N, C, H, W)``, any strides (NCHW or channels-last memory); N may be 0
        weight   ``(K, C, R, S)`` as ``nn.Conv2d`` (groups=1, dilation=1), any strides
        bias     ``(K,)`` or None
        residual ``(N, K, Ho, Wo)`` or None, added after the activation
        out      ``(N, K, Ho, Wo)`` in x's dtype; channels-last memory when x or weight is
                 channels-last (cuDNN's rule), contiguous NCHW otherwise
    where, with ``Hu, Wu = upsample * H, upsample * W``,
        ``Ho = (Hu + 2*pad_h - R) // stride_h + 1``,  ``Wo = (Wu + 2*pad_w - S) // stride_w + 1``.

    ``up`` is a nearest-neighbour upsample by the integer ``upsample`` (``x[..., h // u, w // u]``),
    folded into the input indexing. ``stride``/``padding`` are ints or ``(h, w)`` pairs; padding
    is zeros. ``activation`` is one of None, "relu", "silu", "tanh", "sigmoid", "leaky_relu"
    (``max(x, 0) + negative_slope * min(x, 0)``; the default slope 0.2 is DCGAN's, pass 0.01
    for torch's default). Accumulation is fp32; bias, activation and residual are applied in
    fp32 before the single rounding to the output dtype.
    """
    _common.check_tensor("x", x, ndim=4)
    _common.check_tensor("weight", weight, ndim=4)
    _common.check_same("x", x, weight=weight)
    n, c, h, w = x.shape
    k, cw, r, s = weight.shape
    if cw != c:
        raise ValueError(f"weight has {cw} input channels but x has {c} "
                         f"(weight (K, C, R, S) = {tuple(weight.shape)})")
    if min(c, h, w, k, r, s) < 1:  # an empty batch (N = 0) is fine: an empty output
        raise ValueError(f"empty conv: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if bias is not None:
        _common.check_tensor("bias", bias, ndim=1)
        _common.check_same("x", x, bias=bias)
        if bias.shape[0] != k:
            raise ValueError(f"bias has {bias.shape[0]} elements but weight has {k} output channels")
    sh, sw = _pair("stride", stride, 1)
    ph, pw = _pair("padding", padding, 0)
    if not isinstance(upsample, int) or isinstance(upsample, bool) or upsample < 1:
        raise ValueError(f"upsample must be a positive int, got {upsample!r}")
    negative_slope = _check_activation(activation, negative_slope)
    ho = (h * upsample + 2 * ph - r) // sh + 1
    wo = (w * upsample + 2 * pw - s) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"kernel {r}x{s} is larger than the padded input {h * upsample + 2 * ph}x"
                         f"{w * upsample + 2 * pw} (padding {(ph, pw)}, upsample {upsample})")
    if residual is not None:
        _common.check_tensor("residual", residual, ndim=4)
        _common.check_same("x", x, residual=residual)
        if tuple(residual.shape) != (n, k, ho, wo):
            raise ValueError(f"residual has shape {tuple(residual.shape)}, "
                             f"expected the output's {(n, k, ho, wo)}")

    if _common.resolve_backend(backend, x, weight, bias, residual) == "torch":
        return conv2d_reference(x, weight, bias, stride=(sh, sw), padding=(ph, pw), upsample=upsample,
                                activation=activation, negative_slope=negative_slope, residual=residual)

    out = _out_like(x, weight, (n, k, ho, wo))
    if n == 0:
        return out
    b_arg = bias if bias is not None else out          # never read when HAS_BIAS is False
    r_arg = residual if residual is not None else out
    r_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    args = (x, weight, b_arg, r_arg, out,
            n, c, h, w, k, ho, wo, r, s, sh, sw, ph, pw, negative_slope,
            *x.stride(), *weight.stride(), bias.stride(0) if bias is not None else 0,
            *r_strides, *out.stride())
    meta = dict(UPSAMPLE=upsample, HAS_BIAS=bias is not None, ACTIVATION=activation or "",
                HAS_RESIDUAL=residual is not None)
    m = n * ho * wo

    def grid(cfg):
        return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(k, cfg["BLOCK_N"]),)

    _common.launch(_conv2d_kernel, _conv2d_kernel_tuned, grid, *args,
                   interpret_meta=_INTERPRET_CONFIG, **meta)
    return out


# --------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------
def _activation_reference(y: torch.Tensor, activation: Optional[str], negative_slope: float) -> torch.Tensor:
    return _common.epilogue_reference(y, activation, negative_slope)


def conv2d_reference(x, weight, bias=None, *, stride=1, padding=0, upsample=1, activation=None,
                     negative_slope=0.2, residual=None):
    """Plain torch: nearest upsample, ``F.conv2d``, then the epilogue ops one by one."""
    if upsample != 1:
        x = F.interpolate(x, scale_factor=upsample, mode="nearest")
    y = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    y = _activation_reference(y, activation, negative_slope)
    if residual is not None:
        y = y + residual
    return y


@torch.no_grad()
def fold_batchnorm(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps=1e-5, *,
                   transposed=False):
    """Fold an eval-mode BatchNorm that follows a conv into the conv's weight and bias.

    ``BN(conv(x, w) + b) = conv(x, w * g) + (b - mean) * g + beta`` with
    ``g = bn_weight / sqrt(running_var + eps)``, scaling each *output* channel: dim 0 of a
    conv weight ``(K, C, R, S)``, dim 1 of a transposed-conv weight ``(C_in, C_out, R, S)``
    (``transposed=True``). ``bias`` may be None (DCGAN's convs have none); ``bn_weight`` /
    ``bn_bias`` None mean the affine-free BN (1 and 0). Plain torch, done once at load time,
    computed in float64 and returned in the weight's dtype.
    """
    _common.check_tensor("weight", weight, ndim=4, dtypes=())
    k = weight.shape[1] if transposed else weight.shape[0]
    for name, t in (("bias", bias), ("bn_weight", bn_weight), ("bn_bias", bn_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        if t is None and name in ("running_mean", "running_var"):
            raise ValueError(f"{name} is required (eval-mode BatchNorm uses the running statistics)")
        if t is not None:
            _common.check_tensor(name, t, ndim=1, dtypes=())
            if t.shape[0] != k:
                raise ValueError(f"{name} has {t.shape[0]} elements but the conv has {k} output channels")
    eps = _common.check_real("eps", eps, nonnegative=True)
    g = running_var.double().add(eps).rsqrt()
    if bn_weight is not None:
        g = g * bn_weight.double()
    b = -running_mean.double() if bias is None else bias.double() - running_mean.double()
    b = b * g
    if bn_bias is not None:
        b = b + bn_bias.double()
    shape = (1, k, 1, 1) if transposed else (k, 1, 1, 1)
    w = weight.double() * g.reshape(shape)
    return w.to(weight.dtype), b.to(weight.dtype)
