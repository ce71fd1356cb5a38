"""GGUF weights kept in their quantized blocks on the CPU, and the matmul that reads them.

Why: decoding one token reads every weight once, so on a CPU a decode step costs about the
weights' bytes over the memory bandwidth. SmolLM2-135M dequantized to float32 is 0.54 GB; kept
as the file ships it (Q4_1 layers, a Q8_0 embedding) it is 0.10 GB. `PackedWeight` holds a
Q4_0 / Q4_1 / Q8_0 / Q4_K / Q5_K / Q6_K tensor's raw blocks, and `linear` / `embedding` below
multiply with it or look rows up in it through the C++ kernels of ``genfuse._C``. The matmul is
llama.cpp's scheme (csrc/qdot.h; the K-quants' 256-weight blocks in csrc/kquant.h): the
activations are quantized once per call to integer blocks of 32 with a float32 scale, and each
block (K-quants: each 32-weight sub-block) product is an exact integer dot (vpdpwssd / vpdpbusd
where the CPU has VNNI; the path is picked at run time from CPUID, `genfuse info` names it,
GENFUSE_CPU_PATH forces one). The activation blocks are 32-bit by default (two int16 halves:
x to ~2^-32 of its block maximum, so the result is the dequantized float32 weight times x up
to float32 rounding, and greedy tokens match transformers); GENFUSE_ACT_BITS=16 or 8 trades
accuracy for speed (8 is llama.cpp's Q8: 1.3-1.4x faster kernels here, SmolLM2's logits move
by ~1e-2 relative and greedy tokens diverge within a few steps; 16: ~1e-4). With b bits the
result is within  sum_blocks dx / 2 * sum |w|  of x @ W, dx = max |x| / (2^(b-1) - 1) per block
(dx * 2^-16 for 32 bits); for the K-quants the activation blocks are 256 wide (llama.cpp's Q8_K
grouping, csrc/kquant.h). That kernel is bound by the weight's bytes; for more than
`QDOT_MAX_ROWS` rows of x (prompt chunks, wide decode batches) the arithmetic is, and `linear`
takes csrc/gemm.h instead: weight panels dequantized to float32 into cache, then a float32 GEMM
with x as it is (within float32 rounding of x @ dequantize(W); batch-invariant too, though not
the same bits as the integer-dot result). Embedding rows are exactly what
`gguf.quants.dequantize` gives.

The model files call `linear` and `embedding` from here: they pass a `PackedWeight` to the C++
kernel and anything else on to `genfuse.kernels.linear` / plain indexing, so one model
definition serves both. Packing is a CPU, float32, torch-backend affair (`can_pack`): on CUDA,
or when the Triton kernels run under the interpreter, weights are dequantized at load instead.
"""
from __future__ import annotations

import os

import torch
from genfuse.kernels import ACTIVATIONS
from genfuse.kernels import linear as _kernel_linear
from genfuse.kernels._common import check_activation, epilogue_reference

from .threads import kernel_threads

# GGML type ids (gguf.GGMLQuantizationType), weights per block and bytes per block. The K-quants
# (llama.cpp's Q4_K_M / Q5_K_M files) hold 256 weights a block (csrc/kquant.h).
QTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
BLOCK_WEIGHTS = {"Q4_0": 32, "Q4_1": 32, "Q8_0": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
BLOCK = 32  # the smallest block (Q4_0 / Q4_1 / Q8_0); a type's own is BLOCK_WEIGHTS[qtype]

# Up to this many rows of x a packed matmul takes the integer-dot kernel (csrc/qdot.h), bound by
# the weight's bytes (it reads each weight once per 4 rows); past it the float32 GEMM over
# dequantized weight panels (csrc/gemm.h), bound by arithmetic. Both run on the kernels' thread
# pool, so torch's own threads stay out of the way (bench/README.md has the crossover).
QDOT_MAX_ROWS = 8


def act_bits() -> int:
    """The activation blocks' width for packed matmuls: GENFUSE_ACT_BITS (32, 16 or 8), default 32."""
    raw = os.environ.get("GENFUSE_ACT_BITS", "32")
    if raw not in ("32", "16", "8"):
        raise ValueError(f"GENFUSE_ACT_BITS={raw!r}: choose 32 (float32-exact, the default), 16 or 8")
    return int(raw)


def _ext():
    from genfuse import _C

    return _C


def can_pack(device: torch.device, dtype: torch.dtype, backend: str) -> bool:
    """Whether a model on ``device`` in ``dtype`` whose kernels resolve to ``backend`` can keep
    packed weights: CPU, float32, the torch ops (not the Triton interpreter), and the C++
    extension present."""
    if device.type != "cpu" or dtype != torch.float32 or backend != "torch":
        return False
    try:
        _ext().qdot_matmul  # noqa: B018 - an extension built before this kernel lacks it
    except (ImportError, AttributeError):
        return False
    return True


class PackedWeight:
    """An ``(N, K)`` weight as GGML blocks: ``data`` is uint8 ``(N, K // block * block bytes)``,
    block = `BLOCK_WEIGHTS` [qtype] (32, or 256 for the K-quants).

    Rows are independent (each is K / block whole blocks), so row gathers (`take_rows`, llama.cpp's
    q/k un-permutation) and row concatenation (`cat`, the fused QKV weight) work on the bytes.
    ``dtype`` is the dtype it computes in (float32).
    """

    __slots__ = ("_data_np", "data", "qtype", "shape")
    dtype = torch.float32

    def __init__(self, data: torch.Tensor, qtype: str, K: int):
        if qtype not in QTYPES:
            raise ValueError(f"unsupported quant type {qtype!r}; supported: {', '.join(QTYPES)}")
        block = BLOCK_WEIGHTS[qtype]
        if K <= 0 or K % block:
            raise ValueError(f"{qtype} rows hold whole blocks of {block}: K={K} is not a multiple")
        row_bytes = K // block * BLOCK_BYTES[qtype]
        if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != row_bytes:
            raise ValueError(f"{qtype} data for K={K} must be uint8 (N, {row_bytes}), got "
                             f"{data.dtype} {tuple(data.shape)}")
        if data.device.type != "cpu":
            raise ValueError(f"packed weights live on the CPU, got {data.device}")
        self.data = data.contiguous()
        self.qtype = qtype
        self.shape = torch.Size((data.shape[0], K))
        self._data_np = self.data.numpy()  # the zero-copy view the extension reads

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def __repr__(self) -> str:
        return f"PackedWeight({self.qtype}, shape={tuple(self.shape)}, {self.nbytes / 2**20:.1f} MiB)"

    def take_rows(self, index: torch.Tensor) -> PackedWeight:
        """The rows ``index`` (a permutation or a subset), still packed."""
        return PackedWeight(self.data[index], self.qtype, self.shape[1])

    @staticmethod
    def cat(weights: list[PackedWeight]) -> PackedWeight:
        """Row-wise concatenation of packed weights of one format and width."""
        first = weights[0]
        if any(w.qtype != first.qtype or w.shape[1] != first.shape[1] for w in weights):
            raise ValueError("cat needs packed weights of one format and width, got "
                             + ", ".join(f"{w.qtype} {tuple(w.shape)}" for w in weights))
        return PackedWeight(torch.cat([w.data for w in weights]), first.qtype, first.shape[1])

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 ``(N, K)`` (or ``(len(rows), K)``): what `gguf.quants.dequantize` computes."""
        K = self.shape[1]
        idx = None if rows is None else rows.reshape(-1).to(torch.int64)
        out = torch.empty((self.shape[0] if idx is None else idx.numel(), K), dtype=torch.float32)
        _ext().dequantize_rows(self._data_np, QTYPES[self.qtype], K, None if idx is None else idx.numpy(),
                               out.numpy(), kernel_threads())
        return out


class PackedRows:
    """Row blocks packed in different formats, multiplied as one ``(sum N_i, K)`` weight.

    llama.cpp's quantizer often gives ``attn_v`` a bigger type than ``attn_q`` / ``attn_k``;
    the fused QKV weight of such a file is a `PackedRows` of three `PackedWeight`s, each part
    one `quant_matmul` into its own columns of the output.
    """

    __slots__ = ("parts", "shape")
    dtype = torch.float32

    def __init__(self, parts: list[PackedWeight]):
        if len({p.shape[1] for p in parts}) != 1:
            raise ValueError("row blocks of one weight need one width, got "
                             + ", ".join(str(tuple(p.shape)) for p in parts))
        self.parts = list(parts)
        self.shape = torch.Size((sum(p.shape[0] for p in parts), parts[0].shape[1]))

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def __repr__(self) -> str:
        return f"PackedRows({', '.join(map(repr, self.parts))})"

    def dequantize(self) -> torch.Tensor:
        return torch.cat([p.dequantize() for p in self.parts])


def cat_rows(weights: list) -> torch.Tensor | PackedWeight | PackedRows:
    """``torch.cat`` of row blocks: dense tensors, packed weights of one format (one
    `PackedWeight`) or of several (a `PackedRows`); a packed + dense mix is dequantized."""
    if all(isinstance(w, PackedWeight) for w in weights):
        if len({(w.qtype, w.shape[1]) for w in weights}) == 1:
            return PackedWeight.cat(weights)
        return PackedRows(weights)
    if any(isinstance(w, PackedWeight) for w in weights):
        # e.g. a Q4_1 q_proj next to an F16 v_proj: dequantize the packed ones.
        weights = [w.dequantize() if isinstance(w, PackedWeight) else w for w in weights]
    return torch.cat(weights)


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None, *, activation: str | None = None,
           residual: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """`genfuse.kernels.linear` for dense weights; for a `PackedWeight` / `PackedRows`, the C++
    matmul plus the same epilogue (bias, activation, residual) in place on its output."""
    if not isinstance(weight, (PackedWeight, PackedRows)):
        return _kernel_linear(x, weight, bias, activation=activation, residual=residual, backend=backend)
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the packed weight {tuple(weight.shape)} takes {K}")
    check_activation(activation, ACTIVATIONS)  # before any work, with linear's own message
    x2 = x.reshape(-1, K)
    if x2.dtype != torch.float32 or x2.device.type != "cpu":
        raise ValueError(f"packed weights multiply float32 CPU inputs, got {x2.dtype} on {x2.device}")
    x2 = x2.contiguous()
    y = _packed_matmul(x2, weight, kernel_threads())
    y = y.view(*x.shape[:-1], N)
    if bias is not None:
        y += bias
    if activation is not None:
        y = epilogue_reference(y, activation)  # the kernels' own epilogue table (genfuse.kernels._common)
    if residual is not None:
        y += residual
    return y


def _packed_matmul(x2: torch.Tensor, weight, threads: int) -> torch.Tensor:
    """x2 (M, K) contiguous float32 @ weight.T -> (M, N): genfuse._C.qdot_matmul for up to
    QDOT_MAX_ROWS rows, genfuse._C.gemm_matmul past them."""
    M, ext = x2.shape[0], _ext()
    if isinstance(weight, PackedWeight):
        y = torch.empty((M, weight.shape[0]), dtype=torch.float32)
        args = (x2.numpy(), weight._data_np, QTYPES[weight.qtype], y.numpy(), threads)
        if M <= QDOT_MAX_ROWS:
            ext.qdot_matmul(*args, None, act_bits())
        else:
            ext.gemm_matmul(*args)
        return y
    outs = [_packed_matmul(x2, p, threads) for p in weight.parts]  # PackedRows: one call a part
    return torch.cat(outs, dim=1)


def embedding(table, tokens: torch.Tensor) -> torch.Tensor:
    """``table[tokens]`` for a dense table or a `PackedWeight` (only the looked-up rows are decoded)."""
    if not isinstance(table, PackedWeight):
        return table[tokens]
    return table.dequantize(tokens).view(*tokens.shape, table.shape[1])
