"""The KV cache manager: the block pool's bookkeeping (``genfuse._C.BlockManager``) and its
device side, the per-layer K/V pools, plus the per-step inputs built from a schedule.

Pools: ``k`` and ``v`` are ``(num_layers, num_blocks, block_size, Hkv, D)``; layer ``l``'s
``k[l]`` is exactly the paged layout `genfuse.kernels.unified_attention` and
`write_kv_cache` read and write. Slot ``block * block_size + offset`` holds one token.

Step inputs are built on the host with numpy (token ids, positions, slots, block tables,
lengths, where each sequence's queries start, which rows are sampled) into ONE int32 buffer
that is copied to the device in one transfer and sliced there (`StepInputs`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .scheduler import SchedulerOutput


@dataclass
class StepInputs:
    """One model step over a flat batch of ``N`` tokens from ``B`` sequences (device tensors).

    ``input_ids``/``positions``/``slot_mapping`` ``(N,)``; ``block_table`` ``(B, W)``;
    ``seq_lens`` ``(B,)`` (cached tokens including this step's); ``query_start_loc``
    ``(B + 1,)``: sequence b's tokens are rows ``query_start_loc[b]:query_start_loc[b + 1]``;
    ``logits_indices`` ``(S,)``: the rows whose logits are sampled (each sampling sequence's
    last token). ``max_query_len`` / ``max_seq_len`` are host ints for the kernels' grids.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    logits_indices: torch.Tensor
    max_query_len: int
    max_seq_len: int
    packed: torch.Tensor | None = None  # the one int32 buffer the tensors above are views of

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]


def kv_bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                       dtype: torch.dtype) -> int:
    """Bytes one block costs over all layers, K and V."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


class KVCacheManager:
    """Owns the block manager and the K/V pools; turns a schedule into `StepInputs`."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int, dtype: torch.dtype, device: torch.device,
                 enable_prefix_caching: bool = True, block_manager_cls=None):
        if block_manager_cls is None:
            from genfuse._C import BlockManager as block_manager_cls
        self.block_manager = block_manager_cls(num_blocks, block_size, enable_prefix_caching)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device, self.dtype = device, dtype
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        # empty, not zeros: the kernels read only slots below each sequence's length, which were
        # written first (tests fill the pools with NaN to hold them to it), and on CPU untouched
        # pages of a large pool cost no memory.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block ``src``'s K/V into ``dst`` in every layer."""
        if copies:
            src = torch.tensor([s for s, _ in copies], device=self.device)
            dst = torch.tensor([d for _, d in copies], device=self.device)
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        """The step's inputs, built on the host and moved to the device in one copy."""
        sched = out.scheduled
        B = len(sched)
        bs = self.block_size
        starts = np.fromiter((s.start for s in sched), dtype=np.int64, count=B)
        counts = np.fromiter((s.num_tokens for s in sched), dtype=np.int64, count=B)
        ends = starts + counts
        qsl = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(counts, out=qsl[1:])
        N = int(qsl[-1])
        ids = []
        for s in sched:
            ids += s.request.tokens(s.start, s.start + s.num_tokens)
        # positions: start_b + (row - qsl[b]) for each row of sequence b
        seq_of_row = np.repeat(np.arange(B), counts)
        positions = np.arange(N, dtype=np.int64) - qsl[:-1][seq_of_row] + starts[seq_of_row]
        width = int(-(-ends.max() // bs)) if B else 0
        table = self.block_manager.block_table_array([s.request.seq_id for s in sched], width)
        slots = table[seq_of_row, positions // bs].astype(np.int64) * bs + positions % bs
        logits_idx = np.array([qsl[b + 1] - 1 for b, s in enumerate(sched) if s.samples], dtype=np.int64)

        parts = [np.asarray(ids, dtype=np.int64), positions, slots, ends, qsl, logits_idx, table.reshape(-1)]
        flat = np.concatenate([p.astype(np.int32, copy=False) for p in parts])
        dev = torch.from_numpy(flat)
        if self.device.type == "cuda":
            dev = dev.pin_memory().to(self.device, non_blocking=True)
        views, o = [], 0
        for p in parts:
            views.append(dev[o:o + p.size])
            o += p.size
        S = logits_idx.size
        return StepInputs(
            input_ids=views[0], positions=views[1], slot_mapping=views[2],
            block_table=views[6].view(B, width), seq_lens=views[3], query_start_loc=views[4],
            logits_indices=views[5][:S], max_query_len=int(counts.max()) if B else 0,
            max_seq_len=int(ends.max()) if B else 0, packed=dev,
        )
