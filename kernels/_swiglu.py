"""SwiGLU gating: ``silu(gate) * up`` from one fused ``[gate | up]`` projection.

The MLP's first GEMM usually produces gate and up side by side, ``(M, 2N)``. The torch
composite ``F.silu(g) * u`` reads g, writes silu(g), reads it back with u and writes the
product: 5 * M*N elements. This kernel reads g and u once and writes y once: 3 * M*N, the
floor for the op. Computed in fp32, stored in x's dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _common


@triton.jit
def _swiglu_kernel(
    # pointers
    x_ptr, y_ptr,
    # sizes: x is (M, 2N), y is (M, N)
    M, N,
    # strides, in elements (x any 2-D strides; y contiguous)
    stride_xm, stride_xn, stride_ym,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # A 1-D grid walked row-major over (M / BLOCK_M, N / BLOCK_N) tiles: no 65535 limit on a
    # grid axis, and neighbouring programs stream neighbouring memory.
    pid = tl.program_id(0)
    n_blocks_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_blocks_n
    pid_n = pid % n_blocks_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    # int64 offsets: M * stride_xm passes 2^31 for prefill-sized activations (16k x 28k).
    rows64 = rows.to(tl.int64)[:, None]
    cols64 = cols.to(tl.int64)[None, :]
    row_ptrs = x_ptr + rows64 * stride_xm
    g = tl.load(row_ptrs + cols64 * stride_xn, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(row_ptrs + (cols64 + N) * stride_xn, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + rows64 * stride_ym + cols64, y.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
def _launch_settings(m: int, n: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): ~4k outputs (8k inputs) per program.

    Rows of up to 1024 outputs per tile keep each row segment 2 KiB (bf16) contiguous for
    coalesced loads; short rows are stacked so a program still moves ~24 KiB (bf16), enough
    bytes in flight per SM to stream at HBM bandwidth with a few programs resident.
    """
    block_m, block_n = _common.row_tile(m, n, elems=4096, max_block_n=1024)
    num_warps = _common.warps_for(block_m * block_n, ((4095, 4),), 8)
    return block_m, block_n, num_warps


def swiglu(x: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """``y = silu(gate) * up`` with ``gate, up = x[..., :N], x[..., N:]`` (gate first).

    ``silu(g) = g * sigmoid(g)``, computed in fp32.

    Shapes: x ``(..., 2N)`` (a 2-D x may have any strides, e.g. a column slice of a wider
    projection; a >2-D x whose leading dims cannot be merged is copied once by ``reshape``).
    Returns y ``(..., N)``, a new contiguous tensor in x's dtype.
    """
    _common.check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0 or x.shape[-1] % 2:
        raise ValueError(f"x's last dimension must be even and > 0 ([gate | up]), got shape {tuple(x.shape)}")
    if _common.resolve_backend(backend, x) == "torch":
        return swiglu_reference(x)

    n2 = x.shape[-1]
    n = n2 // 2
    x2 = _common.rows(x, n2)                                 # a view whenever one exists
    m = x2.shape[0]
    y = _common.empty((m, n), x.dtype, x.device)
    if m > 0:
        block_m, block_n, num_warps = _launch_settings(m, n)
        grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
        _common.launch(_swiglu_kernel, None, grid,
            x2, y, m, n,
            x2.stride(0), x2.stride(1), y.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    return y.view(*x.shape[:-1], n)


# --------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------
def swiglu_reference(x):
    n = x.shape[-1] // 2
    acc = torch.promote_types(x.dtype, torch.float32)
    gate, up = x[..., :n].to(acc), x[..., n:].to(acc)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)
