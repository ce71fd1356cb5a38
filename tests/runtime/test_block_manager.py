"""The KV-cache block manager: genfuse._C.BlockManager against its Python twin PyBlockManager.

Unit tests assert exact block ids (as vLLM's block-pool tests do) on both implementations;
the hypothesis state machine drives random operation sequences through both at once and checks
that every observable result agrees (tables, token counts, free and cached counts, hashes, cache
hits, copy-on-write pairs, exceptions) and that the invariants hold after every step.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from genfuse._C import BlockManager
from genfuse.runtime.block_manager import ROOT_HASH, PyBlockManager, hash_block_tokens

# hash_block_tokens(ROOT_HASH, [5, 6, 7]): changing the hash definition must be deliberate.
PINNED_H0 = 0x02A6EB4D99067B6F

IMPLS = [pytest.param(PyBlockManager, id="py"), pytest.param(BlockManager, id="cpp")]


@pytest.fixture(params=IMPLS)
def BM(request):
    return request.param


def state(bm, seq_ids):
    """Everything observable about a manager, for before/after comparisons."""
    return (bm.num_free_blocks, bm.num_cached_blocks,
            {s: (bm.block_table(s), bm.num_tokens(s)) for s in seq_ids},
            [bm.block_hash(b) for b in range(bm.num_blocks)])


# ---- exact block ids ------------------------------------------------------------------------

def test_fresh_pool_hands_out_blocks_in_id_order(BM):
    bm = BM(10, 4)
    assert bm.num_free_blocks == 10 and bm.num_cached_blocks == 0
    assert bm.allocate(0, list(range(10))) == 0
    assert bm.block_table(0) == [0, 1, 2]
    assert bm.num_tokens(0) == 10
    assert bm.num_free_blocks == 7
    assert bm.num_cached_blocks == 2            # the two full blocks; the partial one is not
    assert bm.allocate(1, [7]) == 0
    assert bm.block_table(1) == [3]


def test_prefix_hit_shares_whole_blocks(BM):
    bm = BM(10, 4)
    bm.allocate(0, list(range(10)))             # [0, 1, 2]
    assert bm.allocate(1, list(range(8)) + [99, 98, 97]) == 8
    assert bm.block_table(1) == [0, 1, 3]
    assert bm.num_free_blocks == 6              # shared blocks count once
    assert bm.allocate(2, [0, 1, 2, 3, 9, 9, 9, 9, 9]) == 4   # diverges in the second block
    assert bm.block_table(2) == [0, 4, 5]


def test_hit_leaves_the_last_token_to_compute(BM):
    bm = BM(10, 4)
    bm.allocate(0, list(range(8)))              # [0, 1], both full and registered
    # Same 8 tokens: only the blocks within the first 7 tokens can hit, so the last token is
    # recomputed into a private block 2, a duplicate of block 1 (which stays registered).
    assert bm.allocate(1, list(range(8))) == 4
    assert bm.block_table(1) == [0, 2]
    assert bm.num_cached_blocks == 2
    assert bm.block_hash(2) == bm.block_hash(1)
    # The duplicate bears the content, so what seq 1 writes after it is registered...
    for t in range(8, 12):
        assert bm.append(1, t) is None
    assert bm.block_table(1) == [0, 2, 3] and bm.num_cached_blocks == 3
    # ...and a longer prompt walks block 0, block 1 (the registered one) then seq 1's block 3.
    assert bm.allocate(2, list(range(12)) + [50]) == 12
    assert bm.block_table(2) == [0, 1, 3, 4]
    assert bm.allocate(3, []) == 0 and bm.block_table(3) == []
    assert bm.allocate(4, [5]) == 0              # one token: nothing may hit


def test_different_prefixes_never_share(BM):
    bm = BM(10, 2)
    bm.allocate(0, [1, 2, 3, 4, 5])             # [0, 1, 2]
    # Block two holds [3, 4] in both prompts, but the prefixes differ.
    assert bm.allocate(1, [9, 9, 3, 4, 5]) == 0
    assert bm.block_table(1) == [3, 4, 5]
    assert bm.block_hash(4) != bm.block_hash(1)


@pytest.mark.parametrize("hash_bits", [1, 2, 64])
def test_hash_collisions_are_caught_by_the_token_comparison(BM, hash_bits):
    bm = BM(64, 2, hash_bits=hash_bits)
    prompts = [[a, b, c, d, 7] for a in range(2) for b in range(2) for c in range(2) for d in range(2)]
    for i, p in enumerate(prompts):             # the first block hits when a prompt had it before
        assert bm.allocate(i, p) == (2 if i % 4 else 0)
    assert len({tuple(bm.block_table(i)[:2]) for i in range(16)}) == 16
    for i, p in enumerate(prompts):
        assert bm.allocate(100 + i, p) == 4     # and each finds exactly its own two blocks
        assert bm.block_table(100 + i)[:2] == bm.block_table(i)[:2]


def test_chained_hash_is_the_documented_one(BM):
    bm = BM(8, 3)
    bm.allocate(0, [5, 6, 7, 8, 9, 10, 11])
    h0 = hash_block_tokens(ROOT_HASH, [5, 6, 7])
    h1 = hash_block_tokens(h0, [8, 9, 10])
    assert [bm.block_hash(b) for b in range(4)] == [h0, h1, None, None]
    assert h0 == PINNED_H0                      # the definition is part of the contract
    assert hash_block_tokens(ROOT_HASH, [5, 6, 7], hash_bits=4) == h0 & 0xF


def test_free_queue_is_lru_tail_first(BM):
    bm = BM(4, 2)
    bm.allocate(0, [1, 2, 3, 4])                # [0, 1]
    bm.allocate(1, [5, 6, 7, 8])                # [2, 3]
    bm.free(0)                                  # queue: 1, 0 (tail first)
    bm.free(1)                                  # queue: 1, 0, 3, 2
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 4
    assert bm.allocate(2, [9, 9]) == 0
    assert bm.block_table(2) == [1]             # evicts seq 0's tail, registers [9, 9] there
    assert bm.num_cached_blocks == 4 and bm.block_hash(1) == hash_block_tokens(ROOT_HASH, [9, 9])
    assert bm.allocate(3, [1, 2, 3]) == 2       # seq 0's head is still cached
    assert bm.block_table(3) == [0, 3]          # the hit leaves the queue; 3 is next
    assert bm.num_free_blocks == 1 and bm.num_cached_blocks == 3   # blocks 0, 1 and 2
    assert bm.block_hash(3) is None             # evicted, now partial
    bm.free(3)                                  # queue: 2, 3, 0
    bm.free(2)                                  # queue: 2, 3, 0, 1
    assert bm.allocate(4, [7, 7, 7, 7, 7, 7]) == 0
    assert bm.block_table(4) == [2, 3, 0]       # least recently freed first


def test_memory_error_names_the_numbers_and_changes_nothing(BM):
    bm = BM(4, 2)
    bm.allocate(0, [1, 2, 3, 4])
    bm.allocate(1, [5, 6, 7, 8])
    bm.free(0)
    bm.free(1)
    bm.allocate(2, [9, 9])
    bm.allocate(3, [1, 2, 3])                   # [0, 3]; free queue: 2 (cached [5, 6])
    before = state(bm, [2, 3])
    with pytest.raises(MemoryError, match="needs 1 new blocks .1 cached. but 0 are free"):
        bm.allocate(4, [5, 6, 7])               # the hit on block 2 would use the last free block
    assert state(bm, [2, 3]) == before
    assert bm.allocate(4, [5, 6]) == 0          # evicts block 2
    assert bm.block_table(4) == [2]
    before = state(bm, [2, 3, 4])
    with pytest.raises(MemoryError):
        bm.append(2, 1)                         # block 1 is full
    with pytest.raises(MemoryError):
        bm.append_batch([3, 2], [1, 1])         # seq 3 fits, seq 2 does not: neither applies
    assert state(bm, [2, 3, 4]) == before
    assert bm.append_batch([3], [4]) == []
    assert bm.block_table(3) == [0, 3] and bm.num_tokens(3) == 4


def test_fork_and_copy_on_write(BM):
    bm = BM(8, 4)
    bm.allocate(0, list(range(6)))              # [0, 1], block 1 holds 2 tokens
    bm.fork(0, 1)
    bm.fork(0, 2)
    assert bm.block_table(1) == [0, 1] and bm.num_tokens(2) == 6
    assert bm.num_free_blocks == 6
    assert bm.append(1, 6) == (1, 2)            # shared partial block: copy 1 -> 2 first
    assert bm.block_table(1) == [0, 2]
    # seq 0 and seq 2 still share block 1: the batch copies for seq 0, then seq 2 owns block 1.
    assert bm.append_batch([0, 2, 1], [7, 7, 7]) == [(1, 3)]
    assert bm.block_table(0) == [0, 3] and bm.block_table(2) == [0, 1]
    assert bm.append(1, 8) is None              # block 2 is full now: a new block, no copy
    assert bm.block_table(1) == [0, 2, 4]
    assert bm.slot_mapping([0, 1, 2]).tolist() == [3 * 4 + 2, 4 * 4 + 0, 1 * 4 + 2]


def test_fork_of_a_full_last_block_copies_nothing(BM):
    bm = BM(8, 2)
    bm.allocate(0, [1, 2, 3, 4])
    bm.fork(0, 1)
    assert bm.append_batch([0, 1], [5, 6]) == []
    assert bm.block_table(0) == [0, 1, 2] and bm.block_table(1) == [0, 1, 3]


def test_append_registers_a_block_when_it_fills(BM):
    bm = BM(8, 3)
    bm.allocate(0, [1, 2])
    assert bm.num_cached_blocks == 0
    assert bm.append(0, 3) is None
    assert bm.num_cached_blocks == 1
    bm.free(0)
    assert bm.allocate(1, [1, 2, 3, 4]) == 3
    assert bm.block_table(1) == [0, 1]


def test_duplicate_fill_keeps_the_registered_block(BM):
    bm = BM(8, 2)
    bm.allocate(0, [1])
    bm.allocate(1, [1])                         # nothing to hit: [1]
    bm.append_batch([0, 1], [2, 2])             # both fill [1, 2]; block 0 registered first
    assert bm.num_cached_blocks == 1
    bm.free(0)
    assert bm.allocate(2, [1, 2, 3]) == 2
    assert bm.block_table(2) == [0, 2]


def test_empty_sequence(BM):
    bm = BM(4, 2)
    assert bm.allocate(0, []) == 0
    assert bm.block_table(0) == [] and bm.num_tokens(0) == 0
    with pytest.raises(ValueError, match="no token"):
        bm.slot_mapping([0])
    assert bm.block_table_array([0], 0).shape == (1, 0)
    bm.fork(0, 1)
    assert bm.append(1, 3) is None and bm.block_table(1) == [0]
    assert bm.slot_mapping([1]).tolist() == [0]
    bm.free(0)
    assert bm.num_free_blocks == 3


def test_batch_views(BM):
    bm = BM(16, 4)
    bm.allocate(10, list(range(9)))             # [0, 1, 2]
    bm.allocate(-3, [1])                        # [3]; ids are any int64
    arr = bm.block_table_array([10, -3, 10], 4)
    assert arr.dtype == np.int32 and arr.shape == (3, 4)
    assert arr.tolist() == [[0, 1, 2, 0], [3, 0, 0, 0], [0, 1, 2, 0]]
    slots = bm.slot_mapping([-3, 10])
    assert slots.dtype == np.int32 and slots.tolist() == [12, 8]
    assert bm.block_table_array([], 5).shape == (0, 5)
    # Id lists may be lists, tuples, ranges or 1-D integer arrays of any integer dtype.
    for seqs in ((10, -3), np.array([10, -3]), np.array([10, -3], np.int32), np.array([10, -3], np.int16)):
        assert bm.slot_mapping(seqs).tolist() == [8, 12]
    bm.allocate(11, range(5))
    assert bm.append_batch(np.array([11], np.uint8), range(7, 8)) == []
    assert bm.block_table_array(range(11, 12), 3).tolist() == [[0, 4, 0]]
    assert bm.slot_mapping([]).shape == (0,)
    with pytest.raises(ValueError, match="more than width=2"):
        bm.block_table_array([10], 2)
    with pytest.raises(ValueError):
        bm.block_table_array([10], -1)
    with pytest.raises(ValueError):
        bm.block_table_array([10], 17)          # wider than the pool
    with pytest.raises(KeyError):
        bm.block_table_array([10, 12], 4)


def test_prefix_caching_disabled(BM):
    bm = BM(8, 2, enable_prefix_caching=False)
    bm.allocate(0, [1, 2, 3, 4, 5])
    assert bm.num_cached_blocks == 0 and bm.block_hash(0) is None
    assert bm.allocate(1, [1, 2, 3, 4, 5]) == 0
    assert bm.block_table(1) == [3, 4, 5]
    bm.free(0)
    assert bm.allocate(2, [1, 2, 3]) == 0
    assert bm.block_table(2) == [6, 7]


def test_huge_pools_cost_nothing_until_used(BM):
    bm = BM(2**31 - 1, 1)
    assert bm.num_free_blocks == 2**31 - 1
    bm.allocate(0, [1, 2, 3])
    assert bm.block_table(0) == [0, 1, 2]
    assert bm.block_hash(2**31 - 2) is None
    wide = bm.block_table_array([0, 0], 2**21)  # past 4 Mi entries: a calloc'ed array
    assert wide.shape == (2, 2**21) and wide[:, :4].tolist() == [[0, 1, 2, 0]] * 2
    assert not wide[:, 3:].any()
    BM(2**31, 1)                                # exactly 2**31 slots: the last is 2**31 - 1
    BM(2**28, 8)
    for n, bs in [(2**31 + 1, 1), (2**30, 4), (2**62, 2**62), (2**63 - 1, 2**63 - 1), (1, 2**40)]:
        with pytest.raises(ValueError, match="exceeds 2..31"):
            BM(n, bs)


# ---- bad arguments: both raise the same exception, nothing crashes ----------------------------

def _bad_calls():
    return [
        ("ctor negative blocks", lambda B: B(-1, 4), ValueError),
        ("ctor zero block_size", lambda B: B(4, 0), ValueError),
        ("ctor negative block_size", lambda B: B(4, -16), ValueError),
        ("ctor float", lambda B: B(4.0, 4), TypeError),
        ("ctor str", lambda B: B("4", 4), TypeError),
        ("ctor beyond int64", lambda B: B(2**64, 4), TypeError),
        ("ctor hash_bits 0", lambda B: B(4, 4, hash_bits=0), ValueError),
        ("ctor hash_bits 65", lambda B: B(4, 4, hash_bits=65), ValueError),
        ("ctor hash_bits huge", lambda B: B(4, 4, hash_bits=2**40), ValueError),
        ("ctor flag str", lambda B: B(4, 4, "yes"), TypeError),
        ("allocate str id", lambda B: B(4, 4).allocate("a", [1]), TypeError),
        ("allocate None id", lambda B: B(4, 4).allocate(None, [1]), TypeError),
        ("allocate float id", lambda B: B(4, 4).allocate(1.0, [1]), TypeError),
        ("allocate id beyond int64", lambda B: B(4, 4).allocate(2**63, [1]), TypeError),
        ("allocate tokens None", lambda B: B(4, 4).allocate(1, None), TypeError),
        ("allocate tokens str", lambda B: B(4, 4).allocate(1, "abc"), TypeError),
        ("allocate tokens dict", lambda B: B(4, 4).allocate(1, {1: 2}), TypeError),
        ("allocate tokens set", lambda B: B(4, 4).allocate(1, {1, 2}), TypeError),
        ("allocate tokens generator", lambda B: B(4, 4).allocate(1, (t for t in [1])), TypeError),
        ("allocate float tokens", lambda B: B(4, 4).allocate(1, [1.5, 2.0]), TypeError),
        ("allocate numpy float tokens", lambda B: B(4, 4).allocate(1, np.array([1.0])), TypeError),
        ("allocate nested tokens", lambda B: B(4, 4).allocate(1, [[1]]), TypeError),
        ("allocate bytes tokens", lambda B: B(4, 4).allocate(1, b"ab"), TypeError),
        ("allocate 2-D tokens", lambda B: B(4, 4).allocate(1, np.zeros((1, 2), np.int64)), TypeError),
        ("allocate bool array tokens", lambda B: B(4, 4).allocate(1, np.ones(2, bool)), TypeError),
        ("allocate uint64 tokens", lambda B: B(4, 4).allocate(1, np.array([2**64 - 1], np.uint64)), TypeError),
        ("allocate int8 negative", lambda B: B(4, 4).allocate(1, np.array([-1], np.int8)), ValueError),
        ("allocate int32 negative", lambda B: B(4, 4).allocate(1, np.array([0, -1], np.int32)), ValueError),
        ("ctor flag int", lambda B: B(4, 4, 1), TypeError),
        ("ctor flag None", lambda B: B(4, 4, None), TypeError),
        ("allocate negative token", lambda B: B(4, 4).allocate(1, [1, -1]), ValueError),
        ("allocate int32-overflowing token", lambda B: B(4, 4).allocate(1, [2**31]), ValueError),
        ("allocate int64-overflowing token", lambda B: B(4, 4).allocate(1, [2**64]), TypeError),
        ("allocate too long", lambda B: B(4, 4).allocate(1, [0] * 17), MemoryError),
        ("append unknown", lambda B: B(4, 4).append(1, 1), KeyError),
        ("append negative token", lambda B: B(4, 4).append(1, -1), ValueError),
        ("append float token", lambda B: B(4, 4).append(1, 0.5), TypeError),
        ("append_batch length mismatch", lambda B: B(4, 4).append_batch([1, 2], [1]), ValueError),
        ("append_batch unknown", lambda B: B(4, 4).append_batch([1], [1]), KeyError),
        ("append_batch not a list", lambda B: B(4, 4).append_batch(1, 1), TypeError),
        ("fork unknown src", lambda B: B(4, 4).fork(1, 2), KeyError),
        ("free unknown", lambda B: B(4, 4).free(0), KeyError),
        ("free str", lambda B: B(4, 4).free("0"), TypeError),
        ("block_table unknown", lambda B: B(4, 4).block_table(-5), KeyError),
        ("num_tokens unknown", lambda B: B(4, 4).num_tokens(2**63 - 1), KeyError),
        ("block_hash negative", lambda B: B(4, 4).block_hash(-1), ValueError),
        ("block_hash beyond pool", lambda B: B(4, 4).block_hash(4), ValueError),
        ("block_table_array huge width", lambda B: B(4, 4).block_table_array([], 2**62), ValueError),
        ("block_table_array width float", lambda B: B(4, 4).block_table_array([], 1.0), TypeError),
        ("slot_mapping unknown", lambda B: B(4, 4).slot_mapping([3]), KeyError),
    ]


@pytest.mark.parametrize("call,exc", [pytest.param(c, e, id=n) for n, c, e in _bad_calls()])
def test_bad_arguments_raise_the_same_exception(call, exc):
    for B in (PyBlockManager, BlockManager):
        with pytest.raises(exc):
            call(B)


def test_live_id_errors_and_check_order(BM):
    bm = BM(4, 4)
    bm.allocate(1, [1])
    with pytest.raises(ValueError, match="already live"):
        bm.allocate(1, [2])
    with pytest.raises(ValueError, match="token"):          # values before state
        bm.allocate(1, [-2])
    with pytest.raises(ValueError, match="already live"):
        bm.fork(1, 1)
    bm.allocate(2, [])
    with pytest.raises(ValueError, match="already live"):
        bm.fork(1, 2)
    with pytest.raises(KeyError):                            # src checked before dst
        bm.fork(3, 2)
    with pytest.raises(ValueError, match="twice"):
        bm.append_batch([1, 2, 1], [0, 0, 0])
    with pytest.raises(KeyError):                            # pairs checked before duplicates
        bm.append_batch([1, 1, 5], [0, 0, 0])
    assert bm.num_tokens(1) == 1 and bm.num_tokens(2) == 0
    with pytest.raises(KeyError) as err:
        bm.free(7)
    assert err.value.args == (7,)
    assert bm.allocate(np.int64(3), np.array([1, 2], dtype=np.int32)) == 0
    with pytest.raises(ValueError, match="already live"):   # bools are ints: True is id 1
        bm.allocate(True, ())


# ---- hypothesis: both implementations, random operations, same results, invariants ----------

def outcome(fn):
    """A call's result made comparable: numpy arrays as (dtype, shape, values), or the exception type."""
    try:
        r = fn()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return ("raised", type(e))
    if isinstance(r, np.ndarray):
        return ("array", str(r.dtype), r.shape, r.tolist())
    return ("ok", r)


ids = st.integers(-2, 7)         # raw ids: mostly not live (KeyError paths), some live
picks = st.integers(0, 2**16)    # an index into the live ids, mostly (see TwinMachine.id)
alphabet = st.integers(0, 3)     # few token values: many shared prefixes, many bucket hits


class TwinMachine(RuleBasedStateMachine):
    """Every rule runs on PyBlockManager and BlockManager; results must be equal."""

    @initialize(num_blocks=st.integers(1, 40), block_size=st.sampled_from([1, 2, 2, 3, 4, 5]),
                caching=st.sampled_from([True, True, False]), hash_bits=st.sampled_from([64, 64, 2, 1]))
    def setup(self, num_blocks, block_size, caching, hash_bits):
        self.py = PyBlockManager(num_blocks, block_size, caching, hash_bits=hash_bits)
        self.cpp = BlockManager(num_blocks, block_size, caching, hash_bits=hash_bits)
        self.bs = block_size
        self.tokens = {}          # live seq id -> its tokens (the test's own model)
        self.prompts = [[]]       # token lists seen, to draw shared prefixes from
        self.wrote = []           # (seq, first table index it wrote this step): must be private

    def id(self, pick, raw):
        """A live id four times in five (when there is one), else the raw one."""
        live = sorted(self.tokens)
        return live[pick % len(live)] if live and pick % 5 else raw

    def both(self, fn):
        a, b = outcome(lambda: fn(self.py)), outcome(lambda: fn(self.cpp))
        assert a == b, f"python {a} != c++ {b}"
        return a

    @rule(seq=ids, base=st.integers(0, 2**16), drop=st.integers(0, 6),
          extra=st.lists(alphabet, max_size=10))
    def allocate(self, seq, base, drop, extra):
        bases = self.prompts + list(self.tokens.values())   # a seen prefix, then new tokens
        prompt = bases[base % len(bases)]
        prompt = prompt[:max(len(prompt) - drop, 0)] + extra
        r = self.both(lambda bm: bm.allocate(seq, prompt))
        if r[0] == "ok":
            assert r[1] % self.bs == 0 and r[1] <= max(len(prompt) - 1, 0)
            self.tokens[seq] = list(prompt)
            self.prompts.append(list(prompt))
            self.wrote.append((seq, r[1] // self.bs))

    @rule(pick=picks, raw=ids, token=alphabet)
    def append(self, pick, raw, token):
        seq = self.id(pick, raw)
        r = self.both(lambda bm: bm.append(seq, token))
        if r[0] == "ok":
            self.tokens[seq].append(token)
            self.wrote.append((seq, (len(self.tokens[seq]) - 1) // self.bs))

    @rule(pairs=st.lists(st.tuples(picks, ids, alphabet), max_size=6))
    def append_batch(self, pairs):
        seqs = [self.id(p, raw) for p, raw, _ in pairs]
        toks = [t for _, _, t in pairs]
        r = self.both(lambda bm: bm.append_batch(seqs, toks))
        if r[0] == "ok":
            for s, t in zip(seqs, toks):
                self.tokens[s].append(t)
                self.wrote.append((s, (len(self.tokens[s]) - 1) // self.bs))

    @rule(pick=picks, raw=ids, dst=ids)
    def fork(self, pick, raw, dst):
        src = self.id(pick, raw)
        if self.both(lambda bm: bm.fork(src, dst))[0] == "ok":
            self.tokens[dst] = list(self.tokens[src])

    @rule(pick=picks, raw=ids)
    def free(self, pick, raw):
        seq = self.id(pick, raw)
        toks = self.tokens.get(seq)
        if self.both(lambda bm: bm.free(seq))[0] == "ok":
            self.prompts.append(toks)
            del self.tokens[seq]

    @rule(seqs=st.lists(st.tuples(picks, ids), max_size=5), width=st.integers(-1, 26))
    def views(self, seqs, width):
        seqs = [self.id(p, raw) for p, raw in seqs]
        self.both(lambda bm: bm.block_table_array(seqs, width))
        self.both(lambda bm: bm.slot_mapping(seqs))

    @rule(junk=st.sampled_from(["x", 1.5, None, 2**64, [1.5], [[0]], -(2**63) - 1, {0}, b"\x00"]))
    def bad_types(self, junk):
        self.both(lambda bm: bm.allocate(junk, [0]))
        self.both(lambda bm: bm.allocate(0, junk))
        self.both(lambda bm: bm.append(0, junk))
        self.both(lambda bm: bm.fork(junk, 0))
        self.both(lambda bm: bm.append_batch(junk, [0]))
        self.both(lambda bm: bm.block_table_array(junk, 2))

    @invariant()
    def same_observable_state(self):
        if not hasattr(self, "py"):
            return
        py, cpp = self.py, self.cpp
        assert py.num_free_blocks == cpp.num_free_blocks
        assert py.num_cached_blocks == cpp.num_cached_blocks
        tables = {}
        for s, toks in self.tokens.items():
            assert py.block_table(s) == cpp.block_table(s)
            assert py.num_tokens(s) == cpp.num_tokens(s) == len(toks)
            tables[s] = cpp.block_table(s)
            assert len(tables[s]) == -(-len(toks) // self.bs)
        assert [py.block_hash(b) for b in range(py.num_blocks)] == \
               [cpp.block_hash(b) for b in range(cpp.num_blocks)]
        # Live tables hold valid ids, never one block twice; the free count is the rest.
        live = set()
        for t in tables.values():
            assert all(0 <= b < py.num_blocks for b in t) and len(set(t)) == len(t)
            live.update(t)
        assert cpp.num_free_blocks == py.num_blocks - len(live)
        # A shared block sits at the same position in every table and under the same prefix:
        # different prefixes never share, whatever the hash width.
        where = {}
        for s, t in tables.items():
            for i, b in enumerate(t):
                end = min((i + 1) * self.bs, len(self.tokens[s]))
                here = (i, tuple(self.tokens[s][:end]))
                assert where.setdefault(b, here) == here, (b, where[b], here)
        # The blocks a sequence just wrote belong to it alone.
        for s, first in self.wrote:
            if s in tables:
                for b in tables[s][first:]:
                    assert all(b not in t for o, t in tables.items() if o != s), (s, b)
        self.wrote = []


TwinMachine.TestCase.settings = settings(
    max_examples=int(__import__("os").environ.get("GENFUSE_BM_EXAMPLES", 500)),
    stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_twin_state_machine = TwinMachine.TestCase
