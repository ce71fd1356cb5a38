"""Review findings on genfuse._C.quant_matmul: Q8_0 keeps float32 accuracy for off-centre inputs,
big-endian and overlapping arrays are refused, and a large thread count is clamped."""
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="gguf is in the test extra; the GPU image lacks it unless its wheel is carried (bench/gpu_check.sh)")
from gguf import GGMLQuantizationType as T
from gguf import quants
from test_quant import (  # the shared random weights and float64 oracle
    TYPES,
    packed,
    ref_matmul,
)

from genfuse import _C


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_inputs_far_from_zero_mean(qtype):
    """x with a large mean (positive activations, outlier channels) against weights whose blocks
    hold one large value. Q8_0 is summed as d * sum(q x) and keeps float32 accuracy; the 4-bit
    formats' offset form d * sum(u x) + m * sum(x) cancels (m is about -8 d) and is held to a
    documented, looser bound."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((64, 1024)) * 0.02).astype(np.float32)
    w[:, ::32] = 1.0  # one large weight a block: the others quantize to small q
    blocks = quants.quantize(w, qtype)
    deq = quants.dequantize(blocks, qtype)
    x = (rng.standard_normal((3, 1024)) + 10).astype(np.float32)
    y = np.empty((3, 64), np.float32)
    _C.quant_matmul(x, blocks, int(qtype), y, 1)
    scale = np.abs(x).astype(np.float64) @ np.abs(deq).astype(np.float64).T
    err = np.max(np.abs(y - ref_matmul(x, deq)) / scale)
    assert err < (1e-6 if qtype == T.Q8_0 else 2e-5), err


def test_more_bad_arguments_raise():
    blocks, _ = packed(8, 64, T.Q4_1)
    x = np.zeros((2, 64), np.float32)
    with pytest.raises(TypeError, match="native byte order"):
        _C.quant_matmul(x.astype(">f4"), blocks, int(T.Q4_1), np.zeros((2, 8), np.float32))
    sq, _ = packed(64, 64, T.Q8_0)
    xy = np.ones((2, 64), np.float32)
    with pytest.raises(ValueError, match="share memory"):
        _C.quant_matmul(xy, sq, int(T.Q8_0), xy)  # y written while x is still being read
    with pytest.raises(ValueError, match="integer row indices"):
        _C.dequantize_rows(blocks, int(T.Q4_1), 64, np.array([1.7]), np.zeros((1, 64), np.float32))
    out = np.full((0, 64), np.nan, np.float32)
    _C.dequantize_rows(blocks, int(T.Q4_1), 64, np.zeros(0, np.int64), out)  # no rows: nothing written
    y0 = np.zeros((0, 8), np.float32)
    _C.quant_matmul(np.zeros((0, 64), np.float32), blocks, int(T.Q4_1), y0, 4)  # M = 0
    _C.quant_matmul(x, blocks[:0], int(T.Q4_1), np.zeros((2, 0), np.float32), 4)  # N = 0


def test_concurrent_callers_and_any_thread_count_agree():
    """Python threads calling at once (the GIL is released) with threads 1..4, and far more
    threads than cores: every result bitwise the single-threaded one, and the pool never grows
    past the machine's cores."""
    import threading

    cases = []
    for i, qt in enumerate(TYPES):
        blocks, _ = packed(1500, 256 * (i + 1), qt, seed=i)
        x = np.random.default_rng(i).standard_normal((1 + i, 256 * (i + 1))).astype(np.float32)
        ref = np.empty((x.shape[0], 1500), np.float32)
        _C.quant_matmul(x, blocks, int(qt), ref, 1)
        cases.append((x, blocks, int(qt), ref))
    bad = []

    def call(seed):
        rng = np.random.default_rng(seed)
        for _ in range(300):
            x, blocks, qt, ref = cases[rng.integers(len(cases))]
            y = np.empty_like(ref)
            _C.quant_matmul(x, blocks, qt, y, int(rng.integers(1, 5)))
            bad.extend([] if np.array_equal(y, ref) else [seed])

    threads = [threading.Thread(target=call, args=(s,)) for s in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not bad
    x, blocks, qt, ref = cases[0]
    y = np.empty_like(ref)
    task = "/proc/self/task"  # Linux: this process's threads
    before = len(os.listdir(task)) if os.path.isdir(task) else 0
    _C.quant_matmul(x, blocks, qt, y, 64 * (os.cpu_count() or 1))
    assert np.array_equal(y, ref)
    if os.path.isdir(task):  # the pool is clamped to the hardware threads
        assert len(os.listdir(task)) - before <= (os.cpu_count() or 1)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_a_pool_of_its_own():
    blocks, _ = packed(3000, 512, T.Q4_1)
    x = np.random.default_rng(0).standard_normal((2, 512)).astype(np.float32)
    ref, y = np.empty((2, 3000), np.float32), np.empty((2, 3000), np.float32)
    _C.quant_matmul(x, blocks, int(T.Q4_1), ref, 1)
    _C.quant_matmul(x, blocks, int(T.Q4_1), y, 4)  # the parent's workers exist now
    pid = os.fork()
    if pid == 0:  # the parent's workers are not in the child: a wait on them would hang
        _C.quant_matmul(x, blocks, int(T.Q4_1), y, 4)
        os._exit(0 if np.array_equal(y, ref) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
