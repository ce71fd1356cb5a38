"""The paged KV-cache block manager with prefix caching, in plain Python.

``PyBlockManager`` is the readable specification of ``genfuse._C.BlockManager`` (csrc/
block_manager.{h,cpp}): the same API, the same block ids, the same exceptions. The C++ class
is what the engine uses; this one is what it is checked against (tests/runtime/
test_block_manager.py drives both with the same random operations and compares everything).
It holds no tensors and no GPU code: only block ids, reference counts and token ids.

The model (after vLLM's ``v1/core/block_pool.py``)
--------------------------------------------------
* The KV cache is a pool of ``num_blocks`` blocks of ``block_size`` token slots, ids
  ``0 .. num_blocks-1``. Slot ``block * block_size + offset`` holds one token's K and V, so
  ``num_blocks * block_size`` must fit in int32.
* Each live sequence owns a *block table* (its blocks in token order), its token count, and
  the token ids of its last, partially filled block (the only ones still needed: a full block
  is immutable and its ids live in the block's content node).
* Every block has a *reference count*: the number of live tables that hold it. A block is
  shared when several tables hold it (a prefix cache hit, or ``fork``).
* The *free queue* holds the blocks with no reference, in eviction order: new blocks are taken
  from its front, freed blocks join its back (least recently freed is evicted first). Blocks
  freed by one call join in reverse table order, so a sequence's tail is evicted before its
  head, which other prompts are more likely to share. A pool starts with every block in the
  queue in id order; blocks never used yet are not materialised (a pool of 2**31-1 blocks
  costs nothing until used), they just sit at the front.
* A free block may still be *cached*: it holds a full block whose content is registered, so a
  later prompt with the same prefix takes it back out of the queue instead of recomputing it.
  Taking a cached block from the front of the queue for new use *evicts* it.

Prefix caching: content nodes and the chained hash
--------------------------------------------------
The identity of a full block is its whole prefix: all tokens from the start of the sequence to
the block's end. It is interned as a *content node* ``(parent node, the block's tokens)``;
two full blocks have the same node exactly when their whole prefixes are equal, so equal
prefixes share and different prefixes never do, whatever the hash does. Each node records the
*registered* block that holds its content (the one a prefix hit returns, or none); the map
"hash -> nodes" is the hash -> block map of vLLM, with the exact tokens compared on lookup.

The hash of a node is a 64-bit chain, defined identically in C++ (``hash_block_tokens``):
FNV-1a over the block's token ids starting from the parent's hash (``ROOT_HASH`` for a first
block), then the splitmix64 finaliser, then masked to ``hash_bits`` bits. ``hash_bits`` only
exists so tests can force collisions and check that the exact comparison catches them.

Nodes are reference counted: one reference per block that bears the node (live, or free but
not yet evicted) and one per child node. A node with no reference left is dropped, and its
parent loses one reference.

The rules this module pins down
-------------------------------
* Arguments: an integer argument is anything ``operator.index`` takes (ints, bools, numpy
  integers) that fits in int64; anything else (a float, a str, None, an int beyond int64)
  raises ``TypeError``. A list argument is a list, tuple, range or 1-D numpy array of such
  integers, else ``TypeError`` (no sets, dicts, generators, strs). ``enable_prefix_caching``
  must be a bool. Sequence ids are any int64, negative ones included. Token ids are in
  ``[0, 2**31-1]`` (stored as int32), else ``ValueError``. ``num_blocks >= 1``,
  ``block_size >= 1`` and ``num_blocks * block_size <= 2**31`` (slots are int32), else
  ``ValueError``. Values are checked before state: a call with a bad token and a live id
  raises ``ValueError`` for the token.
* ``allocate(seq_id, token_ids)``: ``ValueError`` if ``seq_id`` is live. An empty token list
  is allowed (a sequence with 0 tokens and no block; its first ``append`` takes a block).
  Prefix hits: whole blocks, matched from the start, only among the first ``len - 1`` tokens,
  so at least the last token is always computed (the engine needs its logits) and it is
  written into a block of the sequence's own. The return value is ``hits * block_size``.
  Every full block of the prompt is registered at once, so a later ``allocate`` of the same
  prefix hits it even in the same engine step (the engine must write the KV of a prompt
  before another sequence reads it). ``MemoryError`` (with the numbers) when the pool cannot
  hold the new blocks; a hit on a free cached block takes it out of the queue, so it does not
  count as free for this check. A failing call changes nothing.
* ``append(seq_id, token_id)``: the last block full (or no block): a new block, returns
  ``None``. The last block partial and shared (after ``fork``): the sequence gets a new
  private block, returns ``(src, dst)``, the copy the engine must do before writing. A block
  filled by the append is registered as above. ``KeyError`` for an unknown id,
  ``MemoryError`` when a block is needed and none is free (nothing changed).
* When a freshly filled block's content is already registered under another block, the
  existing one stays registered and the new one is a private duplicate (no deduplication of
  live blocks); it still bears the content node, so the blocks after it are registered too.
  When a registered block is evicted its node keeps no registered block (a duplicate is not
  promoted): prompts stop hitting there until a block is filled with that content again.
* ``append_batch(seq_ids, token_ids)``: equivalent to ``append`` for each pair in order, but
  all or nothing. Checks, in this order: ``ValueError`` if the lengths differ; for each pair
  in order ``ValueError`` for a bad token, then ``KeyError`` for an unknown id; ``ValueError``
  for the first id that repeats; ``MemoryError`` if the whole batch does not fit. A failing
  call applies nothing. Returns the copy-on-write pairs in batch order.
* ``cached_prefix_length(token_ids)``: what ``allocate`` of these tokens would return now
  (the same whole-block rule, among the first ``len - 1`` tokens), changing nothing. The
  engine asks it before admitting a prompt so that it allocates only the blocks of the first
  chunk it schedules: a block is registered only once its tokens are computed in that step.
* ``extend(seq_id, token_ids)``: ``append`` of each token in order, all or nothing (the next
  chunk of a prompt). ``ValueError`` for a bad token, ``KeyError`` for an unknown id,
  ``MemoryError`` if the blocks do not fit (nothing changed). Returns the copy-on-write pairs.
* ``fork(src_id, dst_id)``: ``KeyError`` if ``src_id`` is unknown (checked first),
  ``ValueError`` if ``dst_id`` is live (also for ``src_id == dst_id``). Takes no block.
* ``free(seq_id)``: ``KeyError`` if unknown. The blocks left with no reference join the free
  queue, tail first; full registered ones stay cached until evicted.
* ``block_table_array(seq_ids, width)``: int32 ``(len(seq_ids), width)`` padded with 0 (0 is
  also a real block id: the engine masks by length). ``ValueError`` if ``width`` is negative,
  above ``num_blocks`` or narrower than a table; ``KeyError`` for an unknown id. Ids may repeat.
* ``slot_mapping(seq_ids)``: int32, the slot of each sequence's last token; ``ValueError``
  for a sequence with 0 tokens, ``KeyError`` for an unknown id.
* ``enable_prefix_caching=False``: no node, no hash, ``allocate`` always returns 0.
* Beyond the issue's API, for tests and metrics: ``num_cached_blocks`` (registered blocks,
  live or free), ``block_hash(block_id)`` (``ValueError`` outside the pool), the properties
  ``num_blocks``, ``block_size``, ``enable_prefix_caching``, and the keyword ``hash_bits``.
"""
from __future__ import annotations

import operator
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TOKEN_MAX = 2**31 - 1        # token ids are stored as int32
MAX_SLOTS = 2**31            # num_blocks * block_size: every slot index fits in int32

_M64 = 2**64 - 1
ROOT_HASH = 0xCBF29CE484222325   # FNV-1a offset basis: the "parent hash" of a first block
_FNV_PRIME = 0x100000001B3


def hash_block_tokens(parent_hash: int, tokens: Sequence[int], hash_bits: int = 64) -> int:
    """The chained 64-bit hash of a full block (identical to the C++ ``hash_block_tokens``).

    FNV-1a over the token ids (each xor-ed whole, as an unsigned value below 2**31) starting
    from ``parent_hash``, then the splitmix64 finaliser so that every bit depends on every
    token, then the low ``hash_bits`` bits. Equal hashes do not mean equal prefixes: lookups
    compare the tokens and the parent node too.
    """
    h = parent_hash
    for t in tokens:
        h = ((h ^ t) * _FNV_PRIME) & _M64
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & _M64
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & _M64
    h ^= h >> 31
    return h & ((1 << hash_bits) - 1)


# ---- argument checks: the same exceptions as the pybind11 bindings of the C++ class -----------

def _int64(x, name: str) -> int:
    """An integer argument: what operator.index() takes (ints, bools, numpy integers) within int64."""
    try:
        v = operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(x).__name__}") from None
    if not INT64_MIN <= v <= INT64_MAX:
        raise TypeError(f"{name} does not fit in int64")
    return v


def _int64_list(xs, name: str) -> List[int]:
    """A list, tuple, range or 1-D numpy array of integers (anything else: TypeError)."""
    if isinstance(xs, np.ndarray):
        if xs.ndim != 1:
            raise TypeError(f"{name} must be 1-D, not a {xs.ndim}-D array")
    elif not isinstance(xs, (list, tuple, range)):
        raise TypeError(f"{name} must be a list, tuple, range or 1-D array of ints, "
                        f"not {type(xs).__name__}")
    return [_int64(x, name) for x in xs]


def _flag(x, name: str) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, not {type(x).__name__}")
    return x


def _check_token(t: int) -> None:
    if not 0 <= t <= TOKEN_MAX:
        raise ValueError(f"token id {t} is outside [0, {TOKEN_MAX}]")


class _Node:
    """A content node: the identity of a full block's whole prefix (see the module docstring)."""
    __slots__ = ("parent", "tokens", "hash", "block", "refs")

    def __init__(self, parent: Optional["_Node"], tokens: Tuple[int, ...], h: int):
        self.parent = parent      # the node of the previous block, None for a first block
        self.tokens = tokens      # this block's token ids
        self.hash = h             # hash_block_tokens(parent.hash or ROOT_HASH, tokens)
        self.block = -1           # the registered block holding this content, or -1
        self.refs = 0             # blocks bearing it + child nodes


class _Seq:
    __slots__ = ("table", "num_tokens", "tail")

    def __init__(self, table: List[int], num_tokens: int, tail: List[int]):
        self.table = table            # block ids in token order
        self.num_tokens = num_tokens
        self.tail = tail              # token ids in the last block when it is partial, else []


class PyBlockManager:
    """Paged KV-cache block manager with prefix caching: the reference for ``genfuse._C.BlockManager``.

    Args:
        num_blocks: blocks in the pool, ``>= 1``.
        block_size: token slots per block, ``>= 1``; ``num_blocks * block_size <= 2**31``.
        enable_prefix_caching: register full blocks and share them between equal prefixes.
        hash_bits: bits of the chained hash kept (1..64); lower it only to test collisions.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 *, hash_bits: int = 64):
        num_blocks = _int64(num_blocks, "num_blocks")
        block_size = _int64(block_size, "block_size")
        enable_prefix_caching = _flag(enable_prefix_caching, "enable_prefix_caching")
        hash_bits = _int64(hash_bits, "hash_bits")
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        if num_blocks * block_size > MAX_SLOTS:
            raise ValueError(f"num_blocks={num_blocks} * block_size={block_size} exceeds 2**31 "
                             f"slots (slot ids are int32)")
        if not 1 <= hash_bits <= 64:
            raise ValueError(f"hash_bits={hash_bits} is outside [1, 64]")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._hash_bits = hash_bits

        # Blocks [_fresh, num_blocks) were never used: the front of the free queue, in id order.
        self._fresh = 0
        # The rest of the free queue, in eviction order (front = next evicted): block -> None.
        self._free: "OrderedDict[int, None]" = OrderedDict()
        self._ref: List[int] = []                    # ref count of each used block
        self._node: List[Optional[_Node]] = []       # the content node a block bears, or None
        self._nodes: Dict[int, List[_Node]] = {}     # hash -> nodes (a list: hashes may collide)
        self._num_registered = 0
        self._seqs: Dict[int, _Seq] = {}

    # ---- observers --------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks held by no live sequence, cached ones (evictable) included."""
        return self.num_blocks - self._fresh + len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered for prefix hits (live or free): the size of the hash -> block map."""
        return self._num_registered

    def block_table(self, seq_id: int) -> List[int]:
        return list(self._seq(seq_id).table)

    def num_tokens(self, seq_id: int) -> int:
        return self._seq(seq_id).num_tokens

    def block_hash(self, block_id: int) -> Optional[int]:
        """The chained hash of the content a block bears (None for a partial or unused block)."""
        block_id = _int64(block_id, "block_id")
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} is outside [0, {self.num_blocks})")
        node = self._node[block_id] if block_id < self._fresh else None
        return None if node is None else node.hash

    # ---- the sequence API -------------------------------------------------------------------

    def allocate(self, seq_id: int, token_ids: Sequence[int]) -> int:
        """Register a new sequence holding ``token_ids``; return how many leading tokens were cached."""
        seq_id = _int64(seq_id, "seq_id")
        tokens = _int64_list(token_ids, "token_ids")
        for t in tokens:
            _check_token(t)
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} is already live")
        bs, n = self.block_size, len(tokens)

        # 1. Prefix hits (pure lookups): whole blocks among the first n - 1 tokens.
        hits: List[int] = []
        parent: Optional[_Node] = None
        if self.enable_prefix_caching:
            for i in range((n - 1) // bs if n else 0):
                node = self._find(parent, tokens[i * bs:(i + 1) * bs])
                if node is None or node.block < 0:
                    break
                hits.append(node.block)
                parent = node
        # 2. Capacity: hits on free cached blocks leave the queue, so they are not free for us.
        need = -(-n // bs) - len(hits)
        avail = self.num_free_blocks - sum(1 for b in hits if self._ref[b] == 0)
        if need > avail:
            raise MemoryError(f"allocate(seq {seq_id}, {n} tokens) needs {need} new blocks "
                              f"({len(hits)} cached) but {avail} are free")
        # 3. Mutate: take the hits, then the new blocks (which may evict cached ones).
        for b in hits:
            self._take(b)
        table = hits + [self._pop_free() for _ in range(need)]
        # 4. Register the new full blocks (their parents are bearing nodes by now).
        if self.enable_prefix_caching:
            for i in range(len(hits), n // bs):
                self._fill(table, i, tokens[i * bs:(i + 1) * bs])
        self._seqs[seq_id] = _Seq(table, n, tokens[n - n % bs:] if n % bs else [])
        return len(hits) * bs

    def cached_prefix_length(self, token_ids: Sequence[int]) -> int:
        """Tokens ``allocate(token_ids)`` would find cached now (whole blocks); changes nothing."""
        tokens = _int64_list(token_ids, "token_ids")
        for t in tokens:
            _check_token(t)
        if not self.enable_prefix_caching:
            return 0
        bs, n, hits = self.block_size, len(tokens), 0
        parent: Optional[_Node] = None
        for i in range((n - 1) // bs if n else 0):
            node = self._find(parent, tokens[i * bs:(i + 1) * bs])
            if node is None or node.block < 0:
                break
            hits += 1
            parent = node
        return hits * bs

    def extend(self, seq_id: int, token_ids: Sequence[int]) -> List[Tuple[int, int]]:
        """``append`` each token in order, all or nothing; return the copy-on-write pairs."""
        seq_id = _int64(seq_id, "seq_id")
        tokens = _int64_list(token_ids, "token_ids")
        for t in tokens:
            _check_token(t)
        seq = self._seq(seq_id)
        if not tokens:
            return []
        bs, n0 = self.block_size, seq.num_tokens
        # New blocks: one per block boundary crossed, plus a private copy of a shared partial tail.
        need = -(-(n0 + len(tokens)) // bs) - -(-n0 // bs)
        if n0 % bs and self._ref[seq.table[-1]] > 1:
            need += 1
        if need > self.num_free_blocks:
            raise MemoryError(f"extend(seq {seq_id}, {len(tokens)} tokens) needs {need} new blocks "
                              f"but {self.num_free_blocks} are free")
        cows = []
        for t in tokens:
            cow = self._append(seq, t)
            if cow is not None:
                cows.append(cow)
        return cows

    def append(self, seq_id: int, token_id: int) -> Optional[Tuple[int, int]]:
        """Add one token; return the ``(src, dst)`` block copy to do first when copy-on-write."""
        seq_id = _int64(seq_id, "seq_id")
        token = _int64(token_id, "token_id")
        _check_token(token)
        seq = self._seq(seq_id)
        if self._needs_block(seq) and self.num_free_blocks == 0:
            raise MemoryError(f"append(seq {seq_id}) needs a block and none of the "
                              f"{self.num_blocks} is free")
        return self._append(seq, token)

    def append_batch(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> List[Tuple[int, int]]:
        """``append`` for each pair in order, all or nothing; return the copy-on-write pairs."""
        ids = _int64_list(seq_ids, "seq_ids")
        tokens = _int64_list(token_ids, "token_ids")
        if len(ids) != len(tokens):
            raise ValueError(f"{len(ids)} seq_ids but {len(tokens)} token_ids")
        for sid, t in zip(ids, tokens):
            _check_token(t)
            self._seq(sid)
        seen = set()
        for sid in ids:
            if sid in seen:
                raise ValueError(f"sequence {sid} appears twice in one append_batch")
            seen.add(sid)
        # Blocks needed, in order: a copy-on-write by an earlier sequence leaves the shared
        # block with one reference less, which may make a later one's block private.
        need, released = 0, {}
        for sid in ids:
            seq = self._seqs[sid]
            if seq.num_tokens % self.block_size == 0:
                need += 1
            else:
                last = seq.table[-1]
                if self._ref[last] - released.get(last, 0) > 1:
                    need += 1
                    released[last] = released.get(last, 0) + 1
        if need > self.num_free_blocks:
            raise MemoryError(f"append_batch of {len(ids)} tokens needs {need} new blocks but "
                              f"{self.num_free_blocks} are free")
        cows = []
        for sid, t in zip(ids, tokens):
            cow = self._append(self._seqs[sid], t)
            if cow is not None:
                cows.append(cow)
        return cows

    def fork(self, src_id: int, dst_id: int) -> None:
        """``dst_id`` becomes a new sequence sharing all of ``src_id``'s blocks."""
        src_id = _int64(src_id, "src_id")
        dst_id = _int64(dst_id, "dst_id")
        src = self._seq(src_id)
        if dst_id in self._seqs:
            raise ValueError(f"sequence {dst_id} is already live")
        for b in src.table:
            self._ref[b] += 1
        self._seqs[dst_id] = _Seq(list(src.table), src.num_tokens, list(src.tail))

    def free(self, seq_id: int) -> None:
        """End a sequence: its unreferenced blocks join the free queue, tail first."""
        seq_id = _int64(seq_id, "seq_id")
        seq = self._seq(seq_id)
        del self._seqs[seq_id]
        for b in reversed(seq.table):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None

    # ---- batch views for the decode step ------------------------------------------------------

    def block_table_array(self, seq_ids: Sequence[int], width: int) -> np.ndarray:
        """The block tables as int32 ``(len(seq_ids), width)``, padded with 0."""
        ids = _int64_list(seq_ids, "seq_ids")
        width = _int64(width, "width")
        if not 0 <= width <= self.num_blocks:
            raise ValueError(f"width={width} is outside [0, num_blocks={self.num_blocks}]")
        out = np.zeros((len(ids), width), dtype=np.int32)
        for row, sid in enumerate(ids):
            table = self._seq(sid).table
            if len(table) > width:
                raise ValueError(f"sequence {sid} has {len(table)} blocks, more than width={width}")
            out[row, :len(table)] = table
        return out

    def slot_mapping(self, seq_ids: Sequence[int]) -> np.ndarray:
        """int32 ``(len(seq_ids),)``: the cache slot ``block * block_size + offset`` of each last token."""
        ids = _int64_list(seq_ids, "seq_ids")
        out = np.empty(len(ids), dtype=np.int32)
        bs = self.block_size
        for row, sid in enumerate(ids):
            seq = self._seq(sid)
            if seq.num_tokens == 0:
                raise ValueError(f"sequence {sid} has no token, so no last slot")
            last = seq.num_tokens - 1
            out[row] = seq.table[last // bs] * bs + last % bs
        return out

    # ---- internals ----------------------------------------------------------------------------

    def _seq(self, seq_id: int) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(seq_id) from None

    def _needs_block(self, seq: _Seq) -> bool:
        """Does the next append take a block: the last one is full, or partial and shared?"""
        return seq.num_tokens % self.block_size == 0 or self._ref[seq.table[-1]] > 1

    def _append(self, seq: _Seq, token: int) -> Optional[Tuple[int, int]]:
        """The mutation of one append, once the caller has checked that a block is there."""
        bs, cow = self.block_size, None
        if seq.num_tokens % bs == 0:
            seq.table.append(self._pop_free())
        elif self._ref[seq.table[-1]] > 1:
            src = seq.table[-1]
            self._ref[src] -= 1          # still > 0: src stays with its other holders
            dst = self._pop_free()
            seq.table[-1] = dst
            cow = (src, dst)
        seq.num_tokens += 1
        seq.tail.append(token)
        if len(seq.tail) == bs:
            if self.enable_prefix_caching:
                self._fill(seq.table, len(seq.table) - 1, seq.tail)
            seq.tail = []
        return cow

    def _find(self, parent: Optional[_Node], tokens: Sequence[int]) -> Optional[_Node]:
        """The node of ``parent`` + ``tokens``, compared exactly, or None."""
        h = hash_block_tokens(parent.hash if parent else ROOT_HASH, tokens, self._hash_bits)
        for node in self._nodes.get(h, ()):
            if node.parent is parent and node.tokens == tuple(tokens):
                return node
        return None

    def _fill(self, table: List[int], i: int, tokens: Sequence[int]) -> None:
        """Block ``table[i]`` is now full with ``tokens``: it bears their node, registered if new."""
        parent = self._node[table[i - 1]] if i else None
        node = self._find(parent, tokens)
        if node is None:
            h = hash_block_tokens(parent.hash if parent else ROOT_HASH, tokens, self._hash_bits)
            node = _Node(parent, tuple(tokens), h)
            if parent is not None:
                parent.refs += 1
            self._nodes.setdefault(h, []).append(node)
        block = table[i]
        node.refs += 1
        self._node[block] = node
        if node.block < 0:              # else another block holds it: keep that one registered
            node.block = block
            self._num_registered += 1

    def _take(self, block: int) -> None:
        """A prefix hit: one more reference; a free cached block leaves the queue."""
        if self._ref[block] == 0:
            del self._free[block]
        self._ref[block] += 1

    def _pop_free(self) -> int:
        """The front of the free queue, evicted if cached, with one reference."""
        if self._fresh < self.num_blocks:
            block = self._fresh
            self._fresh += 1
            self._ref.append(1)
            self._node.append(None)
            return block
        block, _ = self._free.popitem(last=False)
        node = self._node[block]
        if node is not None:
            self._node[block] = None
            if node.block == block:
                node.block = -1
                self._num_registered -= 1
            self._release(node)
        self._ref[block] = 1
        return block

    def _release(self, node: _Node) -> None:
        """Drop one reference to a node; a node with none left is removed, up the chain."""
        while node is not None:
            node.refs -= 1
            if node.refs > 0:
                return
            bucket = self._nodes[node.hash]
            bucket.remove(node)
            if not bucket:
                del self._nodes[node.hash]
            node = node.parent
