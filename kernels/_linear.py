"""Linear layer with a fused epilogue: ``act(x @ weight.T + bias) + residual`` in one kernel.

Two kernels, picked by the launcher on the number of rows M:

* **M > 16 (prefill, training-style batches)**: a tiled GEMM. Each program owns one
  BLOCK_M x BLOCK_N output tile and walks K with an fp32 accumulator; programs are ordered in
  GROUP_M super-rows (Triton tutorial 03) so that consecutive programs share weight tiles in
  L2. The epilogue (bias -> activation -> residual) runs on the fp32 tile in registers before
  the single store. Unfused, ``F.gelu(F.linear(x, w, b)) + r`` makes four extra passes over
  the M x N output (write y, read y, write gelu(y), read it for the add): for M=8192,
  N=14336 in bf16 that is ~940 MB of extra HBM traffic, ~0.3 ms at 3 TB/s (two passes,
  ~0.15 ms, remain when torch.compile fuses the pointwise tail behind a cuBLAS GEMM).
* **M <= 16 (decode)**: memory-bound. The weight (N*K elements) dwarfs x and the output, so
  the only thing that matters is streaming every weight byte from HBM exactly once with
  enough bytes in flight. Each program owns BLOCK_N output columns for *all* M rows (M is
  padded to 16, the smallest ``tl.dot`` tile, and masked), so no weight tile is loaded twice;
  the grid is ``cdiv(N, BLOCK_N)`` programs, and BLOCK_N is chosen (autotune + a pruning rule)
  so that this fills the ~132 SMs of an H100. Split-K would fill the machine for small N too,
  but the activation is non-linear and would need a second pass, so it is not done here.

Mode flags (``HAS_BIAS``, ``HAS_RESIDUAL``, ``ACTIVATION``) are ``tl.constexpr`` so absent
parts of the epilogue compile away. Strides are passed explicitly; Triton specialises a
stride equal to 1, so contiguous operands get vectorised loads without a separate code path.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _common

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu", "tanh")  # a subset of _common.EPILOGUES
SMALL_M = 16  # rows handled by the decode kernel; also its padded tl.dot M tile


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _epilogue_store(acc, rm, rn, M, N,
                    b_ptr, r_ptr, out_ptr,
                    stride_b, stride_rm, stride_rn, stride_om, stride_on,
                    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr):
    """bias -> activation -> residual on the fp32 tile, then the one store of the output."""
    mask_n = rn < N
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn * stride_b, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    acc = _common.epilogue(acc, ACTIVATION, 0.0)
    mask = (rm[:, None] < M) & mask_n[None, :]
    # int64 row/column offsets: M*N (or a transposed residual's stride times N) can pass 2^31
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rm64[:, None] * stride_rm + rn64[None, :] * stride_rn, mask=mask, other=0.0)
        acc = acc + r.to(tl.float32)
    out_ptrs = out_ptr + rm64[:, None] * stride_om + rn64[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linear_gemm_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, r_ptr, out_ptr,
    # sizes (M_BUCKET only keys the autotuner: M rounded up to a power of two, capped)
    M, N, K, M_BUCKET,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b,
    stride_rm, stride_rn, stride_om, stride_on,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile of ``act(x @ w.T + b) + r`` per program (grouped order)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M super-grouping: GROUP_M consecutive programs walk down a column of tiles, so the
    # weight tiles they read are shared through L2 instead of re-read from HBM per row of tiles.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Loads wrap rows/columns past the edge back into range (tutorial 03) so that only the K
    # tail is masked inside the loop; the wrapped lanes are dropped by the store mask.
    rm_load = (rm % M).to(tl.int64)
    rn_load = (rn % N).to(tl.int64)
    x_ptrs = x_ptr + rm_load[:, None] * stride_xm + rk[None, :] * stride_xk   # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + rk[:, None] * stride_wk + rn_load[None, :] * stride_wn   # (BLOCK_K, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
        b = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc=acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    _epilogue_store(acc, rm, rn, M, N, b_ptr, r_ptr, out_ptr,
                    stride_b, stride_rm, stride_rn, stride_om, stride_on,
                    HAS_BIAS, HAS_RESIDUAL, ACTIVATION)


@triton.jit
def _linear_small_m_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, r_ptr, out_ptr,
    # sizes (M <= BLOCK_M)
    M, N, K,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b,
    stride_rm, stride_rn, stride_om, stride_on,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """BLOCK_N output columns for all M (<= BLOCK_M) rows per program: each weight byte is
    read by exactly one program, once; x (M x K, tiny) is re-read from L2 by every program."""
    pid_n = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk                  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + rk[:, None] * stride_wk + rn.to(tl.int64)[None, :] * stride_wn     # (BLOCK_K, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & (rk[None, :] < k_left), other=0.0)
        # masked on N too (no wrap-around here): a wrapped lane would re-read weight rows
        b = tl.load(w_ptrs, mask=(rk[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc=acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    _epilogue_store(acc, rm, rn, M, N, b_ptr, r_ptr, out_ptr,
                    stride_b, stride_rm, stride_rn, stride_om, stride_on,
                    HAS_BIAS, HAS_RESIDUAL, ACTIVATION)


# --------------------------------------------------------------------------------------
# Tuning (CUDA only; the interpreter launches the plain kernels with the fixed sizes below)
# --------------------------------------------------------------------------------------
# Interpreter tiles: small enough that tests stay fast, big enough (> 16) that the masks and
# the K loop are exercised on the awkward test shapes.
_INTERP_GEMM = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
_INTERP_SMALL_M = dict(BLOCK_M=SMALL_M, BLOCK_N=32, BLOCK_K=64)
_M_BUCKET_CAP = 8192  # past this, M no longer changes the best tile; do not re-tune per M


@functools.lru_cache(maxsize=None)
def _device_limits(index: int) -> tuple:
    """(shared memory bytes per block, SM count) of CUDA device ``index``."""
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(index)
        return int(props["max_shared_mem"]), int(props["multiprocessor_count"])
    except Exception:  # pragma: no cover - unusual driver; H100 numbers
        return 227 * 1024, 132


def _gemm_configs():
    """Tile / warp / stage candidates for the large-M GEMM.

    Two static rules keep the list to what can win on an H100: the fp32 accumulator stays at
    <= 128 registers per thread (BLOCK_M * BLOCK_N <= 4096 * num_warps; more spills), and 8
    warps only for tiles of >= 128x128 elements (smaller tiles starve 8 warps of work).
    Short K steps (BLOCK_K=32) need a deeper pipeline to hide HBM latency, hence stages 4/5;
    BLOCK_K=64 moves twice the bytes per stage, hence 3/4. Shared memory is pruned per dtype
    in ``_prune_gemm``.
    """
    configs = []
    for bm in (64, 128, 256):
        for bn in (64, 128, 256):
            for warps in (4, 8):
                if bm * bn > 4096 * warps or (warps == 8 and bm * bn < 128 * 128):
                    continue
                for bk, stages in ((32, 4), (32, 5), (64, 3), (64, 4)):
                    configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                                 num_warps=warps, num_stages=stages))
    return configs


# GENFUSE_AUTOTUNE=quick (the GPU check): (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per
# element size, in order of preference, each compiled for sm_90 by bench/compile_check.py
# (--quick) without spills under triton 3.6 and 3.9. 128x256x64 on 8 warps, 3 stages is Triton
# tutorial 03's Hopper pick for 16-bit inputs; the 64-row tiles are what ``_prune_gemm`` leaves
# for M <= 64 (its tile-vs-problem rule), so every M bucket keeps two or three candidates.
# fp32 (tf32) tiles move twice the bytes per stage: 128x256x64 does not fit, 32-deep K steps.
_QUICK_GEMM = {
    2: ((128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)),
    4: ((128, 128, 32, 8, 4), (128, 64, 32, 4, 4), (64, 64, 32, 4, 4)),
}
# The decode kernel: (BLOCK_N, BLOCK_K, num_stages), 4 warps. 16- and 32-wide tiles keep the
# grid filling the SMs for small N (``_prune_small_m`` keeps the narrowest when none fills);
# the deeper K tiles keep more weight bytes in flight per program for large N.
_QUICK_SMALL_M = {
    2: ((32, 256, 4), (64, 128, 4), (16, 256, 4)),
    4: ((32, 128, 4), (64, 64, 4), (16, 128, 4)),
}


def _quick_gemm(elem: int) -> tuple:
    return tuple(_common.quick_key({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, w, s)
                 for bm, bn, bk, w, s in _QUICK_GEMM[elem])


def _quick_small_m(elem: int) -> tuple:
    return tuple(_common.quick_key({"BLOCK_M": SMALL_M, "BLOCK_N": bn, "BLOCK_K": bk}, 4, s)
                 for bn, bk, s in _QUICK_SMALL_M[elem])


def _prune_gemm(configs, named_args, **kwargs):
    """Drop configs that overflow shared memory or whose tile is far larger than the problem."""
    args = {**named_args, **kwargs}
    x = args["x_ptr"]
    smem, _ = _device_limits(x.device.index or 0)
    m_cap = max(64, args["M_BUCKET"])
    n_cap = max(64, _common.next_power_of_2(args["N"]))
    keep = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        # one stage holds an x tile and a weight tile; the pipeline keeps num_stages of them
        if c.num_stages * (bm + bn) * bk * x.element_size() > smem:
            continue
        if bm > m_cap or bn > n_cap:
            continue
        keep.append(c)
    return (_common.select_quick(keep, _quick_gemm(x.element_size()))
            or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])])


def _small_m_configs():
    """BLOCK_N x BLOCK_K weight tiles for the decode kernel.

    The kernel is a weight stream: per SM what matters is bytes in flight
    (BLOCK_N * BLOCK_K * elt * num_stages) and that the grid, cdiv(N, BLOCK_N), covers the SMs.
    Narrow BLOCK_N fills the machine for N=4096 (BLOCK_N=32 -> 128 programs); wide BLOCK_N
    with short BLOCK_K suits large N. ``_prune_small_m`` removes tiles that leave SMs idle.
    """
    return [triton.Config({"BLOCK_M": SMALL_M, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=s)
            for bn in (16, 32, 64, 128) for bk in (64, 128, 256) for s in (3, 4, 5)]


def _prune_small_m(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    x, n, k = args["x_ptr"], args["N"], args["K"]
    smem, sms = _device_limits(x.device.index or 0)
    fits = [c for c in configs
            if c.num_stages * (SMALL_M + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * x.element_size() <= smem
            and c.kwargs["BLOCK_K"] <= max(64, _common.next_power_of_2(k))]
    # Fill the machine: keep tiles whose grid occupies at least 3/4 of the SMs. When N is too
    # small for any tile to do that, keep the narrowest tile (the most programs we can get).
    filled = [c for c in fits if triton.cdiv(n, c.kwargs["BLOCK_N"]) * 4 >= sms * 3]
    if not filled:
        narrowest = min(c.kwargs["BLOCK_N"] for c in fits)
        filled = [c for c in fits if c.kwargs["BLOCK_N"] == narrowest]
    return _common.select_quick(filled, _quick_small_m(x.element_size()))


_linear_gemm_tuned = triton.autotune(
    configs=_gemm_configs(), key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune_gemm},
)(_linear_gemm_kernel)

# M does not key the decode kernel: every M <= 16 runs the same padded 16-row tile.
_linear_small_m_tuned = triton.autotune(
    configs=_small_m_configs(), key=["N", "K"], prune_configs_by={"early_config_prune": _prune_small_m},
)(_linear_small_m_kernel)


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
           activation: Optional[str] = None, residual: Optional[torch.Tensor] = None,
           backend: Optional[str] = None) -> torch.Tensor:
    """``out = act(x @ weight.T + bias) + residual`` in one kernel (fp32 accumulation).

    Args:
        x: ``(..., K)``, any number of leading dims (flattened into M rows), K >= 1.
        weight: ``(N, K)`` as in ``nn.Linear``; any strides (a transposed view, or rows sliced
            out of a fused QKV weight).
        bias: optional ``(N,)``.
        activation: one of ``ACTIVATIONS``: None, "relu", "gelu" (exact, erf), "gelu_tanh"
            (``F.gelu(approximate="tanh")``), "silu", "tanh". Applied after the bias.
        residual: optional, exactly the output's shape ``(..., N)``; added after the
            activation.
        backend: None, "triton" or "torch" (see ``_common.resolve_backend``).

    Returns:
        ``(..., N)`` in x's dtype (fp16, bf16 or fp32; all inputs share dtype and device).
        M == 0 or N == 0 gives an empty output.
    """
    _common.check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., K), got shape {tuple(x.shape)}")
    _common.check_tensor("weight", weight, ndim=2)
    if bias is not None:
        _common.check_tensor("bias", bias, ndim=1)
    if residual is not None:
        _common.check_tensor("residual", residual)
    _common.check_same("x", x, weight=weight, bias=bias, residual=residual)
    act = _common.check_activation(activation, ACTIVATIONS)
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features (last dim of shape {tuple(x.shape)}) "
                         f"but weight (N, K) has K={k} (shape {tuple(weight.shape)})")
    if k == 0:
        raise ValueError(f"x and weight have K=0 input features (x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}); linear needs K >= 1")
    if bias is not None and bias.shape[0] != n:
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},) for weight {tuple(weight.shape)}")
    out_shape = (*x.shape[:-1], n)
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected the output's {out_shape}")

    if _common.resolve_backend(backend, x, weight, bias, residual) == "torch":
        return linear_reference(x, weight, bias, activation=activation, residual=residual)

    m = x.numel() // k
    out = _common.empty((m, n), x.dtype, x.device)  # (M, N), contiguous
    if m == 0 or n == 0:
        return out.view(out_shape)
    x2 = _common.rows(x, k)                                           # (M, K)
    r2 = _common.rows(residual, n) if residual is not None else out   # (M, N); out is a never-read dummy
    b = bias if bias is not None else out                      # never read when HAS_BIAS=False
    args = (x2, weight, b, r2, out, m, n, k)
    strides = (x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
               bias.stride(0) if bias is not None else 0,
               r2.stride(0) if residual is not None else 0, r2.stride(1) if residual is not None else 0,
               out.stride(0), out.stride(1))
    flags = dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                 ACTIVATION=act)

    if m <= SMALL_M:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _common.launch(_linear_small_m_kernel, _linear_small_m_tuned, grid, *args, *strides,
                       interpret_meta=_INTERP_SMALL_M, **flags)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        m_bucket = min(_common.next_power_of_2(m), _M_BUCKET_CAP)
        _common.launch(_linear_gemm_kernel, _linear_gemm_tuned, grid, *args, m_bucket, *strides,
                       interpret_meta=_INTERP_GEMM, **flags)
    return out.view(out_shape)


# --------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------
def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                     activation: Optional[str] = None, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The unfused torch sequence: ``act(F.linear(x, weight, bias)) + residual`` (any dtype)."""
    y = _common.epilogue_reference(F.linear(x, weight, bias), activation)  # (..., N)
    if residual is not None:
        y = y + residual
    return y
