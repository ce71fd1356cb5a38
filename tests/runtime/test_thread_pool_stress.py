"""The one thread pool of genfuse's CPU kernels under stress, through `qdot_matmul` (what the
model runs): Python threads calling at once with thread counts 1..many, calls that raise in
between, and a fork in the middle. Every result must be bitwise the one-thread result (the
kernel's bits do not depend on the thread count), no call may hang, and an error must stay the
caller's (a one-line ValueError), never a crash or a stuck pool."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from genfuse import _C

BLOCK_BYTES = {2: 18, 3: 20, 8: 34, 12: 144, 14: 210}  # Q4_0, Q4_1, Q8_0, Q4_K, Q6_K
BLOCK_WEIGHTS = {2: 32, 3: 32, 8: 32, 12: 256, 14: 256}


def _weights(rng, n: int, k: int, qtype: int) -> np.ndarray:
    """Random blocks whose f16 scales are finite (byte 1 of each scale held below 0x7c)."""
    w = rng.integers(0, 256, (n, k // BLOCK_WEIGHTS[qtype] * BLOCK_BYTES[qtype]), dtype=np.uint8)
    blocks = w.reshape(n, -1, BLOCK_BYTES[qtype])
    scale_bytes = {2: [1], 3: [1, 3], 8: [1], 12: [1, 3], 14: [209]}[qtype]
    for b in scale_bytes:
        blocks[:, :, b] &= 0x3b  # |scale| < 1: finite, no overflow in the sums
    return w


@pytest.fixture(scope="module")
def cases():
    rng = np.random.default_rng(7)
    out = []
    for i, (qtype, k) in enumerate([(3, 576), (8, 576), (2, 1536), (12, 512), (14, 768)]):
        w = _weights(rng, 700 + 97 * i, k, qtype)
        x = rng.standard_normal((1 + i % 4, k)).astype(np.float32)
        ref = np.empty((x.shape[0], w.shape[0]), np.float32)
        _C.qdot_matmul(x, w, qtype, ref, 1)
        assert np.isfinite(ref).all()
        out.append((x, w, qtype, ref))
    return out


def test_concurrent_callers_many_thread_counts_and_errors(cases):
    bad, errors = [], []

    def call(seed):
        rng = np.random.default_rng(seed)
        for i in range(150):
            x, w, qtype, ref = cases[rng.integers(len(cases))]
            if i % 7 == 3:  # a bad call in between: its error is this caller's, the pool goes on
                try:
                    _C.qdot_matmul(x[:, :-32], w, qtype, np.empty_like(ref), int(rng.integers(1, 9)))
                except ValueError as e:
                    errors.append(str(e))
                continue
            y = np.empty_like(ref)
            _C.qdot_matmul(x, w, qtype, y, int(rng.integers(1, 65)))
            if not np.array_equal(y, ref):
                bad.append((seed, i))

    threads = [threading.Thread(target=call, args=(s,), daemon=True) for s in range(4)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert not any(t.is_alive() for t in threads), "a caller hung in the pool"
    assert not bad
    assert errors and all("\n" not in e for e in errors)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_while_the_pool_is_warm(cases):
    x, w, qtype, ref = cases[0]
    y = np.empty_like(ref)
    _C.qdot_matmul(x, w, qtype, y, 8)  # the parent's workers exist now
    pid = os.fork()
    if pid == 0:  # the child has none of the parent's workers: it must build its own, not wait on them
        ok = True
        for threads in (1, 2, 8):
            _C.qdot_matmul(x, w, qtype, y, threads)
            ok &= bool(np.array_equal(y, ref))
        os._exit(0 if ok else 1)
    for _ in range(600):  # bounded wait: 60 s
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        threading.Event().wait(0.1)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in the pool")
    assert os.waitstatus_to_exitcode(status) == 0
    _C.qdot_matmul(x, w, qtype, y, 8)  # and the parent's pool still works
    assert np.array_equal(y, ref)
