"""The scheduler on its own: no model, no tensors. A fake cache records which token each slot
holds, so every step can check that what attention would read is exactly the sequence's own
tokens (prefix hits, chunks, preemption and recomputation included)."""
import random

import numpy as np
import pytest

from genfuse._C import BlockManager
from genfuse.runtime.block_manager import PyBlockManager
from genfuse.runtime.engine.scheduler import Request, Scheduler, Status

V = 50


def next_token(tokens):
    """A deterministic 'model': the next token is a function of the whole prefix."""
    return (sum((i + 1) * t for i, t in enumerate(tokens)) * 2654435761) % V


class FakeCache:
    def __init__(self, bm):
        self.bm = bm
        self.slots = {}

    def run(self, out):
        """Write every scheduled token into its slot, then check each sequence's whole context."""
        bs = self.bm.block_size
        for s in out.scheduled:
            r = s.request
            table = self.bm.block_table(r.seq_id)
            assert self.bm.num_tokens(r.seq_id) == s.start + s.num_tokens
            for p in range(s.start, s.start + s.num_tokens):
                self.slots[table[p // bs] * bs + p % bs] = (r.token(p), p)
        sampled = {}
        for s in out.scheduled:
            r = s.request
            table = self.bm.block_table(r.seq_id)
            ctx = [self.slots.get(table[p // bs] * bs + p % bs) for p in range(s.start + s.num_tokens)]
            assert ctx == [(r.token(p), p) for p in range(s.start + s.num_tokens)], r.request_id
            if s.samples:
                sampled[r.request_id] = next_token(r.tokens(0, r.num_tokens))
        return sampled


def reference(prompt, max_tokens):
    toks = list(prompt)
    for _ in range(max_tokens):
        toks.append(next_token(toks))
    return toks[len(prompt):]


def drive(sched, cache, max_steps=10_000, on_step=None):
    finished = {}
    for step in range(max_steps):
        if not sched.has_unfinished():
            return finished, step
        if on_step is not None:
            on_step(step)
        one_step(sched, cache, finished)
    raise AssertionError("the schedule did not finish (hang)")


def one_step(sched, cache, finished):
    """Schedule, run on the fake cache, update; finish requests that reached max_tokens."""
    out = sched.schedule()
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_num_seqs
    sched.update(out, cache.run(out))
    for s in out.scheduled:
        r = s.request
        if r.status is Status.RUNNING and len(r.output_token_ids) >= r.max_tokens:
            assert r.request_id not in finished
            finished[r.request_id] = list(r.output_token_ids)
            sched.finish(r.request_id, "length")


@pytest.mark.parametrize("bm_cls", [BlockManager, PyBlockManager], ids=["cpp", "py"])
@pytest.mark.parametrize("seed", range(12))
def test_random_schedules(bm_cls, seed):
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4, 16])
    shared = [rng.randrange(V) for _ in range(rng.randrange(0, 40))]
    max_model_len = 96
    num_blocks = rng.randrange(-(-max_model_len // bs), 3 * max_model_len // bs + 2)
    bm = bm_cls(num_blocks, bs, rng.random() < 0.8)
    sched = Scheduler(bm, max_num_seqs=rng.randrange(1, 8), max_num_batched_tokens=rng.randrange(1, 64),
                      max_model_len=max_model_len, enable_chunked_prefill=True)
    cache = FakeCache(bm)
    refs, aborted = {}, set()
    pending = []
    for i in range(rng.randrange(5, 25)):
        prompt = (shared if rng.random() < 0.5 else [])[:rng.randrange(0, 41)]
        prompt = prompt + [rng.randrange(V) for _ in range(rng.randrange(1, 30))]
        prompt = prompt[:max_model_len - 2]
        mt = rng.randrange(1, max_model_len - len(prompt))
        pending.append((rng.randrange(0, 30), f"r{i}", prompt, mt))
        refs[f"r{i}"] = reference(prompt, mt)

    last_arrival = max(at for at, *_ in pending)
    finished = {}
    for step in range(20_000):
        for at, rid, prompt, mt in pending:
            if at == step:
                sched.add(Request(rid, prompt, mt))
        if rng.random() < 0.05 and sched.requests:
            rid = rng.choice(sorted(sched.requests))
            sched.finish(rid, "abort")
            aborted.add(rid)
        if step > last_arrival and not sched.has_unfinished():
            break
        one_step(sched, cache, finished)
    else:
        raise AssertionError("the schedule did not finish (hang)")
    for rid, ref in refs.items():
        if rid in aborted:
            assert rid not in finished or finished[rid] == ref
        else:
            assert finished[rid] == ref, rid
    assert bm.num_free_blocks == num_blocks
    assert not sched.running and not sched.waiting


def test_preemption_newest_first_and_recompute():
    bm = BlockManager(6, 4, True)  # 24 tokens
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=24)
    cache = FakeCache(bm)
    sched.add(Request("old", list(range(1, 9)), 12))
    sched.add(Request("new", list(range(20, 28)), 12))
    finished, _ = drive(sched, cache)
    assert finished["old"] == reference(list(range(1, 9)), 12)
    assert finished["new"] == reference(list(range(20, 28)), 12)
    assert sched.stats.num_preemptions >= 1
    assert sched.requests == {}
    assert bm.num_free_blocks == 6


def test_prefix_hits_counted_and_first_chunk_only_allocated():
    bm = BlockManager(64, 4, True)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8, max_model_len=64)
    cache = FakeCache(bm)
    system = list(range(1, 21))
    sched.add(Request("a", system + [30], 1))
    drive(sched, cache)
    sched.add(Request("b", system + [31, 32], 1))
    out = sched.schedule()
    [s] = out.scheduled
    assert s.start == 20 and s.num_tokens == 2 and s.request.num_cached_tokens == 20
    assert sched.stats.num_cached_prompt_tokens == 20


def test_refusals_carry_numbers():
    bm = BlockManager(4, 4, True)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=8, max_model_len=16)
    with pytest.raises(ValueError, match="16"):
        sched.add(Request("long", list(range(16)), 1))
    with pytest.raises(ValueError, match="empty"):
        sched.add(Request("empty", [], 1))
    sched.add(Request("x", [1], 1))
    with pytest.raises(ValueError, match="already in use"):
        sched.add(Request("x", [1], 1))
    nochunk = Scheduler(BlockManager(64, 4, True), max_num_seqs=2, max_num_batched_tokens=8,
                        max_model_len=64, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="chunked prefill is off"):
        nochunk.add(Request("y", list(range(9)), 1))


def test_no_chunking_waits_for_a_step_with_room():
    bm = BlockManager(64, 4, True)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8, max_model_len=64,
                      enable_chunked_prefill=False)
    cache = FakeCache(bm)
    sched.add(Request("a", list(range(1, 6)), 4))
    sched.add(Request("b", list(range(10, 17)), 4))  # 5 + 7 > 8: b waits a step, whole
    out = sched.schedule()
    assert [(s.request.request_id, s.num_tokens) for s in out.scheduled] == [("a", 5)]
    sched.update(out, cache.run(out))
    out = sched.schedule()
    assert [(s.request.request_id, s.num_tokens) for s in out.scheduled] == [("a", 1), ("b", 7)]


def test_abort_frees_blocks_at_once():
    bm = BlockManager(16, 4, False)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    cache = FakeCache(bm)
    sched.add(Request("a", list(range(1, 11)), 20))
    out = sched.schedule()
    sched.update(out, cache.run(out))
    assert bm.num_free_blocks < 16
    assert sched.finish("a", "abort").finish_reason == "abort"
    assert bm.num_free_blocks == 16 and not sched.has_unfinished()
    assert sched.finish("a", "abort") is None


@pytest.mark.parametrize("seed", range(4))
def test_cached_prefix_length_and_extend_twins_agree(seed):
    """The two calls the scheduler adds to the block manager, C++ against its Python twin:
    the same results, block tables, exceptions and free counts over random operations."""
    rng = random.Random(seed)
    bs = rng.choice([1, 3, 4])
    cpp, py = BlockManager(24, bs, True), PyBlockManager(24, bs, True)
    base = [rng.randrange(5) for _ in range(30)]
    live = []

    def both(name, *args):
        results = []
        for bm in (cpp, py):
            try:
                results.append(("ok", getattr(bm, name)(*args)))
            except (MemoryError, KeyError, ValueError, TypeError) as e:
                results.append((type(e).__name__, None))
        assert results[0] == results[1], (name, args, results)
        return results[0]

    for step in range(300):
        op = rng.random()
        toks = base[:rng.randrange(0, 30)] + [rng.randrange(5) for _ in range(rng.randrange(0, 4))]
        if op < 0.3:
            both("cached_prefix_length", toks)
        elif op < 0.55:
            sid = step
            if both("allocate", sid, toks)[0] == "ok":
                live.append(sid)
        elif op < 0.85 and live:
            both("extend", rng.choice(live), toks[:rng.randrange(0, 9)])
        elif live:
            sid = live.pop(rng.randrange(len(live)))
            both("free", sid)
        for sid in live:
            assert cpp.block_table(sid) == py.block_table(sid)
        assert cpp.num_free_blocks == py.num_free_blocks and cpp.num_cached_blocks == py.num_cached_blocks
    both("extend", 10**6, [1])  # unknown id: KeyError from both
    if live:
        both("extend", live[0], [2**31])  # bad token: ValueError from both
        both("extend", live[0], [1.5])  # not an int: TypeError from both
