"""genfuse._C.gemm_matmul, the float32 matmul the runtime uses for steps of many tokens
(csrc/gemm.h): every CPU path, every weight type (the GGML blocks and dense float32), awkward
shapes, against a float64 oracle with gemm.h's bound; bitwise batch invariance (across M, N
slices, row positions and thread counts) and the binding's one-line errors.

The bound: y[m, n] is, per vector lane l of L, an FMA chain over k = l, l + L, ... then a fixed
tree over the L lanes (portable: one float32 product and add a term, L = 1), so against the
float64 product of x and the dequantized weights
  |y - o| <= (ceil(K / L) + log2 L + 1) * 2^-24 * sum_k |x_k w_k|.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="gguf is in the test extra; the GPU image lacks it unless its wheel is carried (bench/gpu_check.sh)")
from gguf import GGMLQuantizationType as T
from gguf import quants
from gguf_writer_helpers import quantize_k

from genfuse import _C

PATHS = _C.cpu_paths()
LANES = {"avx512-vnni": 16, "avx512": 16, "avx-vnni": 8, "avx2": 8, "portable": 1}
TYPES = [T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
BLOCK = {T.Q4_0: 32, T.Q4_1: 32, T.Q8_0: 32, T.Q4_K: 256, T.Q5_K: 256, T.Q6_K: 256}


def weight(N, K, qtype, seed=0):
    """(what gemm_matmul takes as w, its type id, the float32 weights it stands for (N, K))."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((N, K)) * rng.uniform(0.01, 2.0, size=(N, 1))
         + rng.uniform(-0.3, 0.3, size=(N, 1))).astype(np.float32)
    if qtype is None:
        return w, 0, w
    blocks = quantize_k(w, qtype) if qtype in (T.Q4_K, T.Q5_K, T.Q6_K) else quants.quantize(w, qtype)
    return blocks, int(qtype), quants.dequantize(blocks, qtype).reshape(N, K)


def gemm(x, w, type_, N, threads=1, path=None):
    y = np.full((x.shape[0], N), np.nan, np.float32)
    _C.gemm_matmul(x, w, type_, y, threads, path)
    return y


def check_bound(y, x, wf, path):
    K = x.shape[1]
    L = LANES[path]
    o = x.astype(np.float64) @ wf.astype(np.float64).T
    s = np.abs(x.astype(np.float64)) @ np.abs(wf.astype(np.float64)).T
    bound = (math.ceil(K / L) + math.log2(L) + 1) * 2.0 ** -24 * s
    err = np.abs(y.astype(np.float64) - o)
    assert np.all(err <= bound), f"{path}: worst error {(err / np.maximum(bound, 1e-300)).max():.2f} x the bound"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("qtype", TYPES + [None], ids=lambda t: "F32" if t is None else t.name)
def test_matches_the_float64_oracle_within_the_bound(path, qtype):
    K = BLOCK.get(qtype, 32) * 2
    rng = np.random.default_rng(1)
    for N in (1, 3, 5, 17, 33):
        w, tid, wf = weight(N, K, qtype, seed=N)
        for M in (1, 2, 5, 7, 13, 50):
            x = rng.standard_normal((M, K)).astype(np.float32)
            check_bound(gemm(x, w, tid, N, path=path), x, wf, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("K", [1, 7, 15, 16, 17, 31, 100, 577])
def test_dense_weights_take_any_width(path, K):
    """Dense K need not be a multiple of the vector: the tail goes through a masked load."""
    rng = np.random.default_rng(K)
    w, tid, wf = weight(9, K, None, seed=K)
    x = rng.standard_normal((8, K)).astype(np.float32)
    check_bound(gemm(x, w, tid, 9, path=path), x, wf, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q6_K, None], ids=lambda t: "F32" if t is None else t.name)
def test_bitwise_batch_invariant(path, qtype):
    """A row of y has the same bits whatever else is in the batch, where it sits, which weight
    rows are computed with it and how many threads share the work."""
    K = BLOCK.get(qtype, 32) * 3
    N = 45
    w, tid, _ = weight(N, K, qtype, seed=7)
    x = np.random.default_rng(2).standard_normal((37, K)).astype(np.float32)
    full = gemm(x, w, tid, N, threads=1, path=path)
    for threads in (2, 3, 8):
        assert np.array_equal(gemm(x, w, tid, N, threads=threads, path=path).view(np.uint32), full.view(np.uint32))
    for m in (0, 5, 36):
        assert np.array_equal(gemm(x[m:m + 1], w, tid, N, path=path).view(np.uint32), full[m:m + 1].view(np.uint32))
    assert np.array_equal(gemm(x[3:20], w, tid, N, path=path).view(np.uint32), full[3:20].view(np.uint32))
    if tid == 0:  # a slice of dense rows is itself a weight
        part = np.ascontiguousarray(w[11:30])
        assert np.array_equal(gemm(x, part, 0, 19, path=path).view(np.uint32), full[:, 11:30].view(np.uint32))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_packed_weights_give_the_bits_of_their_dequantized_rows(path, qtype):
    """Each panel is dequantized (vectorized for Q4_0/Q4_1/Q8_0) to exactly gguf's float32
    weights: the product equals the one over those weights as dense rows, bit for bit. Scales
    include float16 subnormals and a negative Q4_1 minimum."""
    K, N = BLOCK[qtype] * 3, 13
    w, tid, wf = weight(N, K, qtype, seed=11)
    if qtype in (T.Q4_0, T.Q4_1, T.Q8_0):
        b = w.reshape(N, K // 32, -1).copy()
        b[0, :, :2] = np.array([2.0 ** -20], np.float16).view(np.uint8)  # a subnormal scale d
        if qtype == T.Q4_1:
            b[1, :, 2:4] = np.array([-0.75], np.float16).view(np.uint8)  # the minimum m
        w = b.reshape(N, -1)
        wf = quants.dequantize(w, qtype).reshape(N, K)
    x = np.random.default_rng(4).standard_normal((10, K)).astype(np.float32)
    dense = gemm(x, np.ascontiguousarray(wf, np.float32), 0, N, path=path)
    assert np.array_equal(gemm(x, w, tid, N, path=path).view(np.uint32), dense.view(np.uint32))


def test_paths_agree_with_each_other_within_their_bounds():
    """The same product on every path (a path-selection mix-up would break this first)."""
    w, tid, wf = weight(20, 512, T.Q4_K, seed=3)
    x = np.random.default_rng(3).standard_normal((9, 512)).astype(np.float32)
    ys = {p: gemm(x, w, tid, 20, path=p) for p in PATHS}
    for p, y in ys.items():
        check_bound(y, x, wf, p)


def test_zero_rows_and_nan_propagation():
    w, tid, _ = weight(6, 64, T.Q8_0)
    y = np.zeros((0, 6), np.float32)
    _C.gemm_matmul(np.zeros((0, 64), np.float32), w, tid, y)
    x = np.ones((3, 64), np.float32)
    x[1, 10] = np.nan
    y = gemm(x, w, tid, 6)
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()


@pytest.mark.parametrize("call, message", [
    (lambda: _C.gemm_matmul(np.ones((2, 64), np.float64), *weight(4, 64, T.Q8_0)[:2], np.zeros((2, 4), np.float32)), "x must be"),
    (lambda: _C.gemm_matmul(np.ones((2, 48), np.float32), *weight(4, 64, T.Q8_0)[:2], np.zeros((2, 4), np.float32)), "48"),
    (lambda: _C.gemm_matmul(np.ones((2, 64), np.float32), *weight(4, 64, T.Q8_0)[:2], np.zeros((2, 5), np.float32)), "y must be"),
    (lambda: _C.gemm_matmul(np.ones((2, 64), np.float32), np.ones((4, 63), np.float32), 0, np.zeros((2, 4), np.float32)), "K=64"),
    (lambda: _C.gemm_matmul(np.ones((2, 64), np.float32), *weight(4, 64, T.Q8_0)[:2], np.zeros((2, 4), np.float32), 1, "sse9"), "sse9"),
    (lambda: _C.gemm_matmul(np.ones((2, 64), np.float32), *weight(4, 64, T.Q8_0)[:1], 5, np.zeros((2, 4), np.float32)), "type"),
])
def test_bad_arguments_are_one_line_errors(call, message):
    with pytest.raises((ValueError, TypeError)) as e:
        call()
    text = str(e.value)
    assert message in text and "\n" not in text, text


def test_output_sharing_the_input_is_refused():
    x = np.ones((4, 64), np.float32)
    with pytest.raises(ValueError, match="share memory"):
        _C.gemm_matmul(x, np.ones((64, 64), np.float32), 0, x)
