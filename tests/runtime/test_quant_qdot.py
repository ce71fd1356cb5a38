"""genfuse._C.qdot_matmul, the integer-dot matmul the runtime uses on packed GGUF weights
(csrc/qdot.h): every code path this CPU runs, with 32-bit (the runtime's: two int16 halves),
16-bit and 8-bit (llama.cpp's) activation blocks, against one float64 oracle; the activation
quantization and its error bound, GENFUSE_CPU_PATH, threads and bad input.

The two bounds, for y = qdot(x, W):
- against the oracle  o = dequantize(W) @ (dx * qx)  in float64 (qx, dx from
  quantize_activations): the
  block dots are exact integers, so the only error is float32 rounding of the int32 lanes'
  conversion (int16 widths: at most 2^-24 of the lane's sum |w x|), of the per-block scale
  products and of the sum over the nb = K / 32 blocks (per float32 lane over the row's groups
  of blocks, then a fixed tree over the lanes; csrc/qdot.cpp):
  |y - o| <= (nb + 16) * 2^-23 * S  with S = sum_k |xq_k| (|d u_k| + |m|) (the Q4_1 offset form
  d u + m is what is summed, so its magnitude is what rounding scales with).
- against the float activations: each qx is within half a step of x / dx, so
  |y - x @ W| <= |y - o| + sum_b dx_b / 2 * sum_{k in b} |w_k|  (times 1 + 4e-5: x * (1 / dx)
  is rounded twice in float32 before it is rounded to an integer); for 32 bits, high + low / 2^16
  is within 2^-16 of x / dx (computed in float64), so dx / 2 becomes dx * 2^-16.
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="gguf is in the test extra; the GPU image lacks it unless its wheel is carried (bench/gpu_check.sh)")
from gguf import GGMLQuantizationType as T
from gguf import quants

from genfuse import _C

TYPES = [T.Q4_0, T.Q4_1, T.Q8_0]
PATHS = _C.cpu_paths()
EPS32 = 2.0 ** -23


def packed(N, K, qtype, seed=0):
    """(gguf blocks uint8 (N, bytes), their float32 dequantization (N, K)) of random weights."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((N, K)) * rng.uniform(0.01, 2.0, size=(N, 1))).astype(np.float32)
    blocks = quants.quantize(w, qtype)
    return blocks, quants.dequantize(blocks, qtype)


def weight_magnitude(blocks, qtype, K):
    """|d u| + |m| per weight (N, K) float64: the terms the kernel sums, before they cancel."""
    N = blocks.shape[0]
    bb = {T.Q4_0: 18, T.Q4_1: 20, T.Q8_0: 34}[qtype]
    b = blocks.reshape(N, K // 32, bb)
    d = np.abs(b[..., :2].copy().view(np.float16).astype(np.float64))  # (N, nb, 1)
    if qtype == T.Q8_0:
        q = np.abs(b[..., 2:].view(np.int8).astype(np.float64))
        return (d * q).reshape(N, K)
    nib = b[..., bb - 16:]
    u = np.concatenate([nib & 15, nib >> 4], axis=-1).astype(np.float64)
    if qtype == T.Q4_0:
        return (d * np.abs(u - 8)).reshape(N, K)
    m = np.abs(b[..., 2:4].copy().view(np.float16).astype(np.float64))
    return (d * u + m).reshape(N, K)


def integer_activations(x, bits):
    """(qx as float64 (M, K), dx (M, K / 32)); for 32 bits qx = high + low / 2^16."""
    q, d, _ = _C.quantize_activations(x, bits)
    q = q.astype(np.float64)
    if bits == 32:  # per block: 32 high parts, then 32 low parts
        M, K = x.shape
        blocks = q.reshape(M, K // 32, 2, 32)
        q = (blocks[:, :, 0] + blocks[:, :, 1] * 2.0 ** -16).reshape(M, K)
    return q, d


def dequantized_activations(x, bits=32):
    q, d = integer_activations(x, bits)
    return q * np.repeat(d.astype(np.float64), 32, axis=1), d


def oracle_bound(x, blocks, qtype, bits=32):
    """The float32 rounding bound (M, N) of qdot(x, blocks) against the float64 oracle."""
    K = x.shape[1]
    xq, _ = dequantized_activations(x, bits)
    return (K // 32 + 16) * EPS32 * (np.abs(xq) @ weight_magnitude(blocks, qtype, K).T)


def activation_bound(x, deq, bits=32):
    """sum_b dx_b / 2 * sum_{k in b} |w_k| (M, N): the most that quantizing x can move x @ W."""
    _, d = dequantized_activations(x, bits)
    step = {8: 0.5 + 4e-5, 16: 0.5 + 4e-5, 32: 2.0 ** -16}[bits]  # of dx, see module doc
    half_step = np.repeat(d.astype(np.float64), 32, axis=1) * step
    return half_step @ np.abs(deq.astype(np.float64)).T


def qdot(x, blocks, qtype, threads=1, path=None, bits=32):
    y = np.full((x.shape[0], blocks.shape[0]), np.nan, np.float32)
    _C.qdot_matmul(x, blocks, int(qtype), y, threads, path, bits)
    return y


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            line = next(ln for ln in f if ln.startswith("flags"))
        return set(line.split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def test_every_path_this_cpu_has_is_exercised():
    """The paths under test are what CPUID offers: a CPU with AVX-512 VNNI must list
    avx512-vnni, and so on, so a detection bug cannot quietly shrink the parametrization."""
    flags = cpu_flags()
    assert PATHS[-1] == "portable" and _C.cpu_path() in PATHS
    expect = {"avx2": {"avx2", "fma", "f16c"}, "avx-vnni": {"avx2", "fma", "f16c", "avx_vnni"},
              "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"},
              "avx512-vnni": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}}
    for path, needs in expect.items():
        if flags:
            assert (path in PATHS) == (needs <= flags), (path, PATHS)
    if os.environ.get("GENFUSE_CPU_PATH") in (None, "", "auto"):
        assert _C.cpu_path() == PATHS[0]  # the best one


@pytest.mark.parametrize("bits", [32, 16, 8], ids=["q32", "q16", "q8"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("M,N,K", [(1, 1, 32), (1, 37, 64), (2, 20, 96), (3, 100, 576), (4, 9, 160),
                                   (5, 130, 1536), (9, 33, 256)])
def test_matches_the_float64_oracle_and_the_float_activations(path, qtype, M, N, K, bits):
    """K/32 odd and even (the 512-bit Q8 code takes blocks in pairs, then one), M across the
    four-row tiles, N across thread chunks."""
    blocks, deq = packed(N, K, qtype, seed=M * 1000 + N)
    x = (np.random.default_rng(1).standard_normal((M, K)) * 3).astype(np.float32)
    x[:, :8] += 20.0  # an outlier channel: one block's step is much coarser than the others'
    y = qdot(x, blocks, qtype, 2, path, bits)
    xq, _ = dequantized_activations(x, bits)
    oracle = xq @ deq.astype(np.float64).T
    bound = oracle_bound(x, blocks, qtype, bits)
    assert np.all(np.abs(y - oracle) <= bound), np.max(np.abs(y - oracle) / bound)
    exact = x.astype(np.float64) @ deq.astype(np.float64).T
    abound = activation_bound(x, deq, bits) + bound
    assert np.all(np.abs(y - exact) <= abound), np.max(np.abs(y - exact) / abound)


@pytest.mark.parametrize("bits", [32, 16, 8], ids=["q32", "q16", "q8"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_paths_agree_with_each_other(qtype, bits):
    blocks, _ = packed(300, 1024, qtype, seed=4)
    x = np.random.default_rng(5).standard_normal((6, 1024)).astype(np.float32)
    ref = qdot(x, blocks, qtype, 1, "portable", bits)
    bound = 2 * oracle_bound(x, blocks, qtype, bits)
    for path in PATHS:
        assert np.all(np.abs(qdot(x, blocks, qtype, 1, path, bits) - ref) <= bound), path


@pytest.mark.parametrize("bits,Q,dtype", [(16, 32767, np.int16), (8, 127, np.int8)], ids=["q16", "q8"])
def test_quantize_activations(bits, Q, dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 256)) * rng.uniform(1e-3, 1e3, size=(3, 1))).astype(np.float32)
    x[1, 32:64] = 0.0  # an all-zero block
    x[2, 64:96] = np.float32(1e-40)  # subnormal values: Q / amax would overflow
    x[2, 96:128] = np.float32(2.0 ** -95)  # just above the flush threshold of 2^-96
    q, d, s = _C.quantize_activations(x, bits)
    assert q.dtype == dtype and q.shape == (3, 256) and d.shape == s.shape == (3, 8)
    assert d[2, 2] == 0 and not q[2, 64:96].any()  # below 2^-96: a zero block
    x[2, 64:96] = 0.0
    amax = np.abs(x).reshape(3, 8, 32).max(-1)
    assert np.array_equal(d, (amax / np.float32(Q)).astype(np.float32))
    qa = np.abs(q.astype(np.int64))
    assert qa.max() <= Q and np.all(qa.reshape(3, 8, 32).max(-1)[amax > 0] == Q)
    drep = np.repeat(d.astype(np.float64), 32, axis=1)
    assert np.all(np.abs(x - q * drep) <= drep * (0.5 + 4e-5))
    assert np.array_equal(s, (d * q.astype(np.int64).reshape(3, 8, 32).sum(-1).astype(np.float32)).astype(np.float32))
    assert d[1, 1] == 0 and not q[1, 32:64].any()
    # half to even: with amax = Q the step is exactly 1
    h = np.zeros((1, 32), np.float32)
    h[0, 0], h[0, 1], h[0, 2], h[0, 3] = Q, 0.5, 1.5, -2.5
    assert list(_C.quantize_activations(h, bits)[0][0, :4]) == [Q, 0, 2, -2]


def test_quantize_activations_32_bits():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 128)) * rng.uniform(1e-3, 1e3, size=(2, 1))).astype(np.float32)
    x[1, :32] = 0.0
    q, d, s = _C.quantize_activations(x, 32)
    assert q.dtype == np.int16 and q.shape == (2, 256) and d.shape == s.shape == (2, 4)
    amax = np.abs(x).reshape(2, 4, 32).max(-1)
    assert np.array_equal(d, (amax / np.float32(32767)).astype(np.float32))
    xq, _ = dequantized_activations(x, 32)
    drep = np.repeat(d.astype(np.float64), 32, axis=1)
    assert np.all(np.abs(x - xq) <= drep * 2.0 ** -16)
    np.testing.assert_allclose(s, (xq.reshape(2, 4, 32).sum(-1)), rtol=1e-6, atol=0)
    assert not q[1, :64].any() and d[1, 0] == 0


@pytest.mark.parametrize("path", PATHS)
def test_non_finite_inputs_give_nan_rows(path):
    blocks, _ = packed(16, 64, T.Q4_1)
    x = np.ones((3, 64), np.float32)
    x[0, 5], x[1, 40] = np.nan, np.inf
    y = qdot(x, blocks, T.Q4_1, 1, path)
    assert np.isnan(y[:2]).all() and np.isfinite(y[2]).all()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_give_identical_results(threads):
    """Rows of W are split between threads, never the sum over K: same bits."""
    blocks, _ = packed(3072, 576, T.Q4_1)
    x = np.random.default_rng(2).standard_normal((2, 576)).astype(np.float32)
    assert np.array_equal(qdot(x, blocks, T.Q4_1, 1), qdot(x, blocks, T.Q4_1, threads))


def test_cpu_path_env_var(monkeypatch):
    """GENFUSE_CPU_PATH forces the default path; a name that is unknown, or that this CPU lacks,
    is a one-line ValueError naming the choices."""
    blocks, _ = packed(8, 64, T.Q8_0)
    x = np.random.default_rng(3).standard_normal((1, 64)).astype(np.float32)
    for path in PATHS:
        monkeypatch.setenv("GENFUSE_CPU_PATH", path)
        assert _C.cpu_path() == path
        assert np.array_equal(qdot(x, blocks, T.Q8_0), qdot(x, blocks, T.Q8_0, path=path))
    monkeypatch.setenv("GENFUSE_CPU_PATH", "auto")
    assert _C.cpu_path() == PATHS[0]
    monkeypatch.setenv("GENFUSE_CPU_PATH", "sse9")
    with pytest.raises(ValueError, match=r"GENFUSE_CPU_PATH: unknown CPU path 'sse9'; choose one of .*portable"):
        _C.cpu_path()
    with pytest.raises(ValueError, match="unknown CPU path 'sse9'"):
        qdot(x, blocks, T.Q8_0)
    missing = [p for p in ["avx512-vnni", "avx-vnni", "avx512", "avx2"] if p not in PATHS]
    for p in missing:  # only on a CPU without it
        monkeypatch.setenv("GENFUSE_CPU_PATH", p)
        with pytest.raises(ValueError, match=re.escape(f"GENFUSE_CPU_PATH={p}: this CPU lacks it")):
            _C.cpu_path()
        with pytest.raises(ValueError, match="not supported"):
            qdot(x, blocks, T.Q8_0, path=p)


def test_bad_arguments_raise():
    blocks, _ = packed(8, 64, T.Q4_1)
    x, y = np.zeros((2, 64), np.float32), np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="unknown CPU path 'fast'"):
        _C.qdot_matmul(x, blocks, int(T.Q4_1), y, 1, "fast")
    with pytest.raises(ValueError, match="unknown quant type"):
        _C.qdot_matmul(x, blocks, 1, y)
    with pytest.raises(ValueError, match="bytes a row"):
        _C.qdot_matmul(x, blocks, int(T.Q8_0), y)
    with pytest.raises(TypeError, match="float32"):
        _C.qdot_matmul(x.astype(np.float64), blocks, int(T.Q4_1), y)
    with pytest.raises(ValueError, match=r"y must be \(2, 8\)"):
        _C.qdot_matmul(x, blocks, int(T.Q4_1), np.zeros((2, 9), np.float32))
    with pytest.raises(ValueError, match="share memory"):
        xy = np.ones((2, 64), np.float32)
        _C.qdot_matmul(xy, packed(64, 64, T.Q8_0)[0], int(T.Q8_0), xy)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        _C.qdot_matmul(x.tolist(), blocks, int(T.Q4_1), y)
    with pytest.raises(ValueError, match="multiple of 32"):
        _C.quantize_activations(np.zeros((1, 48), np.float32))
    with pytest.raises(ValueError, match="act_bits must be 8, 16 or 32, got 4"):
        _C.qdot_matmul(x, blocks, int(T.Q4_1), y, 1, None, 4)
    _C.qdot_matmul(np.zeros((0, 64), np.float32), blocks, int(T.Q4_1), np.zeros((0, 8), np.float32), 4)  # M = 0
    _C.qdot_matmul(x, blocks[:0], int(T.Q4_1), np.zeros((2, 0), np.float32), 4)  # N = 0


# Awkward shapes for the SIMD paths' tiles: 4 weight rows x up to 4 (512-bit) or 2 (256-bit)
# activation rows, over groups of 4 or 2 blocks; N not a multiple of 4, M across the tile sizes
# and the pre-decoded path (M above the tile), K = 1, 2, 3 and 18 blocks (partial last groups).
AWKWARD_N = [1, 3, 5, 7, 9, 17]
AWKWARD_M = [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 33, 64]
AWKWARD_K = [32, 64, 96, 576]


@pytest.fixture(scope="module")
def awkward_cases():
    """Per (qtype, K): blocks (17 rows), x (64 rows), and per bits the float64 oracle and bound."""
    out = {}
    for qtype in TYPES:
        for K in AWKWARD_K:
            blocks, deq = packed(max(AWKWARD_N), K, qtype, seed=K + int(qtype))
            rng = np.random.default_rng(K)
            x = (rng.standard_normal((max(AWKWARD_M), K)) * rng.uniform(0.1, 10, size=(max(AWKWARD_M), 1))).astype(np.float32)
            x[:, :3] += 15.0  # an outlier channel
            per_bits = {}
            for bits in (32, 16, 8):
                xq, _ = dequantized_activations(x, bits)
                per_bits[bits] = (xq @ deq.astype(np.float64).T, oracle_bound(x, blocks, qtype, bits))
            out[qtype, K] = blocks, x, per_bits
    return out


@pytest.mark.parametrize("bits", [32, 16, 8], ids=["q32", "q16", "q8"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_awkward_shapes_match_the_oracle_and_do_not_depend_on_the_tiling(awkward_cases, path, qtype, bits):
    """Every (M, N, K) of the lists above against the float64 oracle within the bound; and a row's
    result is the same bits whatever M and N it is computed in (the tiles never mix rows), so
    each (M, N) product equals the top-left corner of the (64, 17) one."""
    for K in AWKWARD_K:
        blocks, x, per_bits = awkward_cases[qtype, K]
        oracle, bound = per_bits[bits]
        full = qdot(x, blocks, qtype, 1, path, bits)
        assert np.all(np.abs(full - oracle) <= bound), (K, np.max(np.abs(full - oracle) / bound))
        for i, M in enumerate(AWKWARD_M):
            N = AWKWARD_N[(i + K) % len(AWKWARD_N)]
            y = qdot(x[:M], blocks[:N], qtype, 1 + i % 2, path, bits)
            assert np.array_equal(y, full[:M, :N]), (M, N, K)


@pytest.mark.parametrize("bits", [32, 16, 8], ids=["q32", "q16", "q8"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_non_finite_rows_on_every_type_and_width(path, qtype, bits):
    """NaN / inf in one block of a row makes that row's outputs NaN, in every tile position
    (M = 9: both the 4-row tiles and the remainder; K = 96: a partial last group)."""
    blocks, _ = packed(7, 96, qtype, seed=3)
    x = np.random.default_rng(4).standard_normal((9, 96)).astype(np.float32)
    bad = {0: np.nan, 3: np.inf, 5: -np.inf, 8: np.nan}
    for m, v in bad.items():
        x[m, 70 + m] = v  # in the third block: the partial group
    y = qdot(x, blocks, qtype, 1, path, bits)
    for m in range(9):
        assert np.isnan(y[m]).all() if m in bad else np.isfinite(y[m]).all(), m
