"""The K-quants Q4_K / Q5_K / Q6_K (csrc/kquant.h): dequantization bitwise equal to
gguf.quants.dequantize, the integer-dot matmul on every CPU path against a float64 oracle with
kquant.h's bound, the packed weight, and the binding's checks.

The bounds, for y = qdot_matmul(x, W) with W in a K-quant:
- against o = dequantize(W) @ (dx * qx) in float64 (qx, dx from quantize_activations): the
  dots are exact integers, so the error is float32 rounding: of the block terms and their sum
  over the n = K / 32 blocks (2n terms with the Q4_K / Q5_K min terms), and of the dequantized
  weights themselves (half an ulp each):  |y - o| <= (2n + 16) * 2^-23 * S,  S = sum_k |xq_k|
  (|w_k| + 2 |m_k|), m_k the sub-block's min offset dmin * mn (0 for Q6_K): the kernel sums
  d sc q = w + m and m separately, so their magnitudes are what rounding scales with.
- against the float activations add  sum_b dx_b tau sum_{k in b} |w_k|  (tau 1/2 for 8 and 16
  bits, 2^-16 for 32: qdot's own test allows the same), times 1 + 4e-5.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="gguf is in the test extra; the GPU image lacks it unless its wheel is carried (bench/gpu_check.sh)")
from gguf import GGMLQuantizationType as T
from gguf import quants
from gguf_writer_helpers import quantize_k

from genfuse import _C
from genfuse.runtime.quant import BLOCK_BYTES, PackedWeight, linear

TYPES = [T.Q4_K, T.Q5_K, T.Q6_K]
PATHS = _C.cpu_paths()
EPS32 = 2.0 ** -23
BB = {T.Q4_K: 144, T.Q5_K: 176, T.Q6_K: 210}
F16_OFFSETS = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}  # d (and dmin) in each block


def packed(N, K, qtype, seed=0):
    """(K-quant blocks uint8 (N, bytes), their float32 dequantization (N, K)) of random weights,
    rows of different scales, some offset from zero (so the Q4_K / Q5_K mins matter)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N, K)) * rng.uniform(0.01, 2.0, size=(N, 1)) + rng.uniform(-0.5, 0.5, size=(N, 1))
    blocks = quantize_k(w.astype(np.float32), qtype)
    return blocks, quants.dequantize(blocks, qtype).reshape(N, K)


def dequant_c(blocks, qtype, K, rows=None, threads=1):
    n = blocks.shape[0] if rows is None else len(rows)
    out = np.full((n, K), np.nan, np.float32)
    _C.dequantize_rows(blocks, int(qtype), K, rows, out, threads)
    return out


def assert_bitwise(got, want):
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def min_offsets(blocks, qtype, K):
    """|m| per weight (N, K) float64: each sub-block's dmin * mn (Q6_K has none)."""
    N = blocks.shape[0]
    if qtype == T.Q6_K:
        return np.zeros((N, K))
    b = blocks.reshape(-1, BB[qtype])
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float64)  # (blocks, 1)
    _, mn = quants.Q4_K.get_scale_min(b[:, 4:16].copy())
    return np.repeat(np.abs(dmin * mn.astype(np.float64)), 32, axis=1).reshape(N, K)


def act_dequantized(x, bits):
    """(dx * qx (M, K) float64, dx (M, K / 256)) as qdot_matmul quantizes x for a K-quant."""
    q, d, s = _C.quantize_activations(x, bits, 256)
    M, K = x.shape
    assert d.shape == (M, K // 256) and s.shape == (M, K // 32)
    q = q.astype(np.float64)
    if bits == 32:
        q = q.reshape(M, K // 32, 2, 32)
        q = (q[:, :, 0] + q[:, :, 1] * 2.0 ** -16).reshape(M, K)
    xq = q * np.repeat(d.astype(np.float64), 256, axis=1)
    np.testing.assert_allclose(s, xq.reshape(M, -1, 32).sum(-1), rtol=1e-6, atol=1e-30)  # the per-32 sums
    return xq, d.astype(np.float64)


def bounds(x, bits, blocks, qtype, W):
    """(o, float bound against o, o_x = x @ W in float64, bound against o_x)."""
    M, K = x.shape
    xq, dx = act_dequantized(x, bits)
    o = xq @ W.T.astype(np.float64)
    mag = np.abs(W).astype(np.float64) + 2 * min_offsets(blocks, qtype, K)
    n = K // 32
    rounding = (2 * n + 16) * EPS32 * (np.abs(xq) @ mag.T)
    tau = 2.0 ** -16 if bits == 32 else 0.5
    wsum = np.abs(W).astype(np.float64).reshape(W.shape[0], K // 256, 256).sum(-1)  # (N, K / 256)
    act = (dx * tau) @ wsum.T * (1 + 4e-5)
    return o, rounding, x.astype(np.float64) @ W.T.astype(np.float64), rounding + act


# --------------------------------------------------------------------------- dequantization


def special_blocks(qtype, n, seed):
    """``n`` blocks: random bytes with their fp16 scales set to edge values (max, -max, the
    smallest subnormal, -0, inf, NaN, 1), all-zero blocks and all-0xFF blocks."""
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (n, BB[qtype]), dtype=np.uint8)
    edges = np.array([65504.0, -65504.0, 2.0 ** -24, -0.0, np.inf, np.nan, 1.0, 6.1e-5], np.float16)
    for off in F16_OFFSETS[qtype]:
        b[:, off:off + 2] = rng.choice(edges, n).view(np.uint8).reshape(n, 2)
    b[: n // 8] = 0
    b[n // 8: n // 4] = 0xFF
    return b


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_is_gguf_bitwise(qtype):
    K = 768
    for blocks in (np.random.default_rng(1).integers(0, 256, (11, K // 256 * BB[qtype]), dtype=np.uint8),
                   special_blocks(qtype, 11 * 3, seed=2).reshape(11, -1),
                   packed(9, K, qtype)[0]):
        with np.errstate(invalid="ignore", over="ignore"):  # gguf's numpy on inf / NaN scales
            want = quants.dequantize(blocks, qtype).reshape(blocks.shape[0], K)
        assert_bitwise(dequant_c(blocks, qtype, K), want)
        assert_bitwise(dequant_c(blocks, qtype, K, threads=2), want)
        rows = [4, 0, 4, 10 % blocks.shape[0]]
        assert_bitwise(dequant_c(blocks, qtype, K, rows=rows), want[rows])


def test_quantizer_round_trips():
    """The test files' K-quant writer (gguf_writer_helpers.quantize_k) gives blocks gguf reads
    back close to the input: its layout is gguf's (a wrong nibble or scale order would not)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 512)).astype(np.float32)
    for qtype, tol in ((T.Q4_K, 0.09), (T.Q5_K, 0.045), (T.Q6_K, 0.025)):
        back = quants.dequantize(quantize_k(w, qtype), qtype).reshape(w.shape)
        rel = np.sqrt(((back - w) ** 2).mean()) / w.std()
        assert rel < tol, (qtype.name, rel)


# --------------------------------------------------------------------------- the matmul


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("path", PATHS)
def test_matmul_within_bound_every_path(qtype, path):
    """M = 1..5 and 17 (4-row tiles and their tails), N odd, K = 256, 512, 768, all widths."""
    rng = np.random.default_rng(4)
    worst = 0.0
    for K in (256, 512, 768):
        blocks, W = packed(13, K, qtype, seed=K)
        for M in (1, 2, 3, 4, 5, 17):
            x = (rng.standard_normal((M, K)) * rng.uniform(0.1, 10, size=(M, 1))).astype(np.float32)
            x[0, :256] = 0.0  # an all-zero activation block (one scale per 256)
            for bits in (32, 16, 8):
                y = np.full((M, 13), np.nan, np.float32)
                _C.qdot_matmul(x, blocks, int(qtype), y, 1, path, bits)
                o, r_o, o_x, r_x = bounds(x, bits, blocks, qtype, W)
                assert np.all(np.abs(y - o) <= r_o), (K, M, bits, np.abs(y - o).max(), r_o.min())
                assert np.all(np.abs(y - o_x) <= r_x), (K, M, bits)
                live = r_o > 0  # (K = 256: row 0 is all zero, and so must be its y)
                worst = max(worst, float((np.abs(y - o)[live] / r_o[live]).max(initial=0.0)))
    assert worst > 0  # not all exact: the rounding bound is what is being checked


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_bound_catches_one_wrong_weight(qtype):
    """The check above has teeth: one weight of one sub-block changed by a single step of the
    quantization fails it, at every activation width and on every path."""
    K, N = 512, 5
    blocks, W = packed(N, K, qtype, seed=7)
    x = np.random.default_rng(8).standard_normal((2, K)).astype(np.float32)
    bad = blocks.copy()
    # row 3, second K block: its first qs byte (Q6_K: ql) gets its low nibble's lowest bit flipped
    qs = {T.Q4_K: 16, T.Q5_K: 48, T.Q6_K: 0}[qtype]
    bad[3, BB[qtype] + qs] ^= 1
    changed = quants.dequantize(bad, qtype).reshape(N, K) != W
    assert changed.sum() == 1 and changed[3].any()
    for path in PATHS:
        for bits in (32, 16, 8):
            y = np.empty((2, N), np.float32)
            _C.qdot_matmul(x, bad, int(qtype), y, 1, path, bits)
            o, r_o, _, _ = bounds(x, bits, blocks, qtype, W)
            assert not np.all(np.abs(y - o) <= r_o), (path, bits)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_paths_agree_threads_do_not_matter_nan_propagates(qtype):
    K, N = 768, 37
    blocks, _ = packed(N, K, qtype, seed=9)
    x = np.random.default_rng(10).standard_normal((3, K)).astype(np.float32)
    x[1, 300] = np.inf
    ys = {}
    for path in PATHS:
        for threads in (1, 2):
            y = np.empty((3, N), np.float32)
            _C.qdot_matmul(x, blocks, int(qtype), y, threads, path, 32)
            ys[path, threads] = y
        assert np.array_equal(ys[path, 1], ys[path, 2], equal_nan=True)  # rows of W are split, never a dot
        assert np.isnan(ys[path, 1][1]).all() and np.isfinite(ys[path, 1][[0, 2]]).all()
    ref = ys["portable", 1][[0, 2]]
    for (path, _), y in ys.items():
        np.testing.assert_allclose(y[[0, 2]], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # the float-decoding entry point takes K-quants too (integer dots at 32 bits)
    y = np.empty((3, N), np.float32)
    _C.quant_matmul(x, blocks, int(qtype), y, 1, True)
    assert np.array_equal(y, ys["portable", 1], equal_nan=True)


def test_binding_checks_k_quant_shapes():
    blocks, _ = packed(3, 512, T.Q4_K)
    x = np.zeros((1, 384), np.float32)
    with pytest.raises(ValueError, match="multiple of 256"):
        _C.qdot_matmul(x, np.zeros((3, 144), np.uint8), 12, np.empty((1, 3), np.float32))
    with pytest.raises(ValueError, match="multiple of 256"):
        _C.dequantize_rows(np.zeros((3, 144), np.uint8), 12, 128, None, np.empty((3, 128), np.float32))
    with pytest.raises(ValueError, match="bytes a row"):
        _C.qdot_matmul(np.zeros((1, 512), np.float32), blocks[:, :-1].copy(), 12, np.empty((1, 3), np.float32))
    with pytest.raises(ValueError, match="Q6_K=14"):
        _C.qdot_matmul(np.zeros((1, 512), np.float32), blocks, 11, np.empty((1, 3), np.float32))  # Q3_K


# --------------------------------------------------------------------------- the packed weight


def test_packed_weight_k_quants():
    K = 512
    parts = {q: packed(6, K, q, seed=11) for q in TYPES}
    for q, (blocks, W) in parts.items():
        pw = PackedWeight(torch.from_numpy(blocks.copy()), q.name, K)
        assert pw.nbytes == 6 * K // 256 * BLOCK_BYTES[q.name]
        assert torch.equal(pw.dequantize(), torch.from_numpy(W))
        idx = torch.tensor([5, 1, 1])
        assert torch.equal(pw.take_rows(idx).dequantize(), torch.from_numpy(W)[idx])
        assert torch.equal(pw.dequantize(idx), torch.from_numpy(W)[idx])
        both = PackedWeight.cat([pw, pw.take_rows(torch.tensor([0]))])
        assert torch.equal(both.dequantize(), torch.from_numpy(np.concatenate([W, W[:1]])))
        x = torch.randn(2, K)
        y = linear(x, pw)
        ref = x.double() @ torch.from_numpy(W).double().T
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
        with pytest.raises(ValueError, match="blocks of 256: K=288"):
            PackedWeight(torch.zeros((6, 144), dtype=torch.uint8), q.name, 288)


def test_tensor_parallel_column_split_of_k_quants():
    """A row-parallel layer's input split (runtime.distributed.shard_cols) cuts K-quant rows at
    whole 256-weight blocks: the pieces dequantize to the dense columns; other cuts are refused."""
    from genfuse.runtime.distributed import shard_cols

    blocks, W = packed(4, 768, T.Q6_K, seed=12)
    pw = PackedWeight(torch.from_numpy(blocks.copy()), "Q6_K", 768)
    for cols in (slice(0, 256), slice(256, 768)):
        assert torch.equal(shard_cols(pw, cols).dequantize(), torch.from_numpy(W[:, cols]))
    with pytest.raises(ValueError, match="only at multiples of 256"):
        shard_cols(pw, slice(0, 384))
