"""Host-side cost of KV-cache bookkeeping: genfuse._C.BlockManager against PyBlockManager.

Run: ``python -m pytest bench/bench_block_manager.py`` (pytest's testpaths is tests/, so name the
file). Both implementations run the same workload side by side in one session; the last test
prints the C++ / Python speedups and the microseconds per operation, which are also recorded in
the C++ benchmarks' ``extra_info`` (kept by ``--benchmark-json`` / ``--benchmark-autosave``).

Cases:
* ``decode_step``: one engine decode step for 256 live sequences of 200 to 1000 tokens, block
  size 16: ``append_batch`` + ``block_table_array`` (width 64) + ``slot_mapping``. Between
  rounds (untimed), sequences that reached 1000 tokens are freed and replaced by fresh
  200-token prompts, so the lengths stay in range however many rounds run.
  Targets: C++ >= 20x the Python reference, and under 50 us per step.
* ``churn``: allocation churn with prefix hits: allocate a request (a 512-token system prompt
  shared by all, then one of 128 user turns of 100 tokens) and free the oldest of 64 live ones.
  Every allocate hits at least the 32 blocks of the system prompt.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from genfuse._C import BlockManager
from genfuse.runtime.block_manager import PyBlockManager

IMPLS = {"python": PyBlockManager, "cpp": BlockManager}
BLOCK_SIZE = 16
N_SEQS, MIN_LEN, MAX_LEN, WIDTH = 256, 200, 1000, 64
TARGET_SPEEDUP, TARGET_STEP_US = 20.0, 50.0

RESULTS: dict = {}   # (case, impl) -> median seconds


def _record(benchmark, case: str, impl: str, unit: str) -> None:
    if benchmark.stats is None:      # --benchmark-disable: ran once, nothing measured
        return
    RESULTS[(case, impl)] = benchmark.stats.stats.median
    if impl == "cpp" and (case, "python") in RESULTS:
        ratio = RESULTS[(case, "python")] / RESULTS[(case, "cpp")]
        benchmark.extra_info["speedup_vs_python"] = round(ratio, 1)
        benchmark.extra_info[f"us_per_{unit}"] = round(RESULTS[(case, "cpp")] * 1e6, 2)
        benchmark.extra_info[f"python_us_per_{unit}"] = round(RESULTS[(case, "python")] * 1e6, 2)


class DecodeWorkload:
    """256 live sequences kept between 200 and 1000 tokens; one decode step per round."""

    def __init__(self, cls, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.bm = cls(N_SEQS * (WIDTH + 2), BLOCK_SIZE)
        self.ids = list(range(N_SEQS))
        self.next_id = N_SEQS
        for sid in self.ids:
            self.bm.allocate(sid, self._prompt(int(self.rng.integers(MIN_LEN, MAX_LEN))))
        self.tokens = self._tokens()

    def _prompt(self, n: int) -> list:
        return self.rng.integers(0, 32000, n).tolist()

    def _tokens(self) -> list:
        return self.rng.integers(0, 32000, N_SEQS).tolist()

    def recycle(self):
        """Untimed, before each round: replace finished sequences, draw the next tokens."""
        for row, sid in enumerate(self.ids):
            if self.bm.num_tokens(sid) >= MAX_LEN:
                self.bm.free(sid)
                self.ids[row] = sid = self.next_id
                self.next_id += 1
                self.bm.allocate(sid, self._prompt(MIN_LEN))
        self.tokens = self._tokens()
        return (), {}

    def step(self):
        bm, ids = self.bm, self.ids
        cows = bm.append_batch(ids, self.tokens)
        tables = bm.block_table_array(ids, WIDTH)
        slots = bm.slot_mapping(ids)
        return cows, tables, slots


@pytest.mark.parametrize("impl", list(IMPLS))   # python first: the cpp run reports the ratio
def test_decode_step(benchmark, impl):
    w = DecodeWorkload(IMPLS[impl])
    benchmark.group = "decode_step: 256 seqs x 200-1000 tokens"
    benchmark.extra_info["ops"] = "append_batch + block_table_array + slot_mapping"
    rounds = 300 if impl == "python" else 3000
    benchmark.pedantic(w.step, setup=w.recycle, rounds=rounds, warmup_rounds=20, iterations=1)
    _, tables, slots = w.step()
    assert tables.shape == (N_SEQS, WIDTH) and slots.shape == (N_SEQS,)
    _record(benchmark, "decode_step", impl, "step")


class ChurnWorkload:
    """Allocate a request sharing a system prompt, free the oldest; 64 live at any time."""

    LIVE, SYSTEM, TURN, TURNS = 64, 512, 100, 128

    def __init__(self, cls, seed: int = 1):
        rng = np.random.default_rng(seed)
        system = rng.integers(0, 32000, self.SYSTEM).tolist()
        self.prompts = [system + rng.integers(0, 32000, self.TURN).tolist() for _ in range(self.TURNS)]
        self.bm = cls(4096, BLOCK_SIZE)
        self.next_id = 0
        self.hits = 0
        for _ in range(self.LIVE):
            self.step()

    def step(self):
        sid = self.next_id
        self.next_id += 1
        self.hits = self.bm.allocate(sid, self.prompts[sid % self.TURNS])
        if sid >= self.LIVE:
            self.bm.free(sid - self.LIVE)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_churn(benchmark, impl):
    w = ChurnWorkload(IMPLS[impl])
    benchmark.group = "churn: allocate 612-token request (512 shared) + free"
    benchmark.extra_info["ops"] = "allocate + free"
    benchmark(w.step)
    assert w.hits >= ChurnWorkload.SYSTEM
    _record(benchmark, "churn", impl, "allocate_free")


def test_report(capsys):
    """Print the side-by-side numbers; check the decode-step targets (unless measuring is off)."""
    if ("decode_step", "cpp") not in RESULTS:
        pytest.skip("benchmarks were not measured (--benchmark-disable or deselected)")
    lines = ["", f"block manager, {os.cpu_count()} CPUs (shared with other processes: medians)"]
    for case, unit in (("decode_step", "step"), ("churn", "allocate+free")):
        if (case, "python") in RESULTS and (case, "cpp") in RESULTS:
            py_s, cpp_s = RESULTS[(case, "python")], RESULTS[(case, "cpp")]
            lines.append(f"  {case:12s} C++ {cpp_s * 1e6:8.2f} us/{unit}   Python {py_s * 1e6:9.2f} us/{unit}"
                         f"   speedup {py_s / cpp_s:6.1f}x")
    with capsys.disabled():
        print("\n".join(lines))
    cpp_us = RESULTS[("decode_step", "cpp")] * 1e6
    ratio = RESULTS[("decode_step", "python")] / RESULTS[("decode_step", "cpp")]
    assert ratio >= TARGET_SPEEDUP, f"decode step: C++ only {ratio:.1f}x the Python reference"
    assert cpp_us < TARGET_STEP_US, f"decode step: {cpp_us:.1f} us, target {TARGET_STEP_US} us"
