"""Decode-only engine steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step is a few hundred small launches (per layer: norm, QKV linear, rotary, the K/V
write, unified attention, o_proj, norm, gate/up, swiglu, down), each a few microseconds of
host time, so at small batch the GPU waits on the host; captured once in a CUDA graph, the
whole step is one launch. A graph replays fixed shapes at fixed addresses, hence:

* **Buckets.** A decode-only step of B sequences runs the graph of ``bucket(B)`` rows (1, 2,
  4, ... up to ``max_num_seqs`` rounded up). Steps with a prefill chunk run eagerly.
* **Static inputs.** `StepInputs` are copied into buffers the graphs read: token ids,
  positions, slot mapping, block tables ``(rows, blocks for max_model_len)``, lengths, query
  offsets (``arange``) and sampled rows (``arange``). A padded row has slot -1 (its K/V write is
  skipped), length 1 and an all-zero block table: it reads one slot of block 0, whatever that
  holds, and its logits are dropped; no real row reads anything of it.
* **Fixed work per bucket.** Nothing in ``forward_step`` syncs the host or takes a shape from
  a per-step value: every kernel is called with ``validate=False``, `unified_attention`'s grid
  follows the row and sequence counts only, `linear` picks its path from the row count.
  Triton compiles and autotunes in the warm-up runs before the capture, never inside it.

The graphs point at the KV pools and rotary tables, which the engine allocates once, so they
are never recaptured. All graphs share one memory pool (replays never overlap).

``pad=True`` without graphs runs the same padded buffers eagerly: that is how the CPU tests
check that padding changes no token (graphs themselves need CUDA and the Triton kernels).
"""
from __future__ import annotations

import torch

from .kv_cache import StepInputs

WARMUP_RUNS = 2  # the first compiles and autotunes, the second runs the cached kernels


def bucket(batch: int) -> int:
    """Rows of the graph a decode step of ``batch`` sequences runs: the next power of two."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    return 1 << (batch - 1).bit_length()


class StepRunner:
    """Runs the model's ``forward_step``: eagerly, or decode-only steps padded to a bucket and
    (``graphs=True``: CUDA, Triton kernels) replayed from a CUDA graph per bucket."""

    def __init__(self, model, k_pool: torch.Tensor, v_pool: torch.Tensor, *, max_num_seqs: int,
                 max_blocks_per_seq: int, graphs: bool, pad: bool | None = None):
        if graphs and k_pool.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {k_pool.device}")
        if graphs and model.backend == "torch":
            raise ValueError("CUDA graphs need the Triton kernels: backend='torch' runs the reference "
                             "attention, which reads sequence lengths on the host")
        self.model, self.k, self.v = model, k_pool, v_pool
        self.graphs = graphs
        self.pad = graphs if pad is None else pad
        if graphs and not self.pad:
            raise ValueError("CUDA graphs replay fixed shapes: graphs=True needs pad=True")
        self.max_rows = bucket(max_num_seqs)
        self.captures = 0
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = self._stream = None
        if self.pad:
            R, dev = self.max_rows, k_pool.device
            i32 = dict(dtype=torch.int32, device=dev)
            self._ids = torch.zeros(R, **i32)
            self._pos = torch.zeros(R, **i32)
            self._slots = torch.full((R,), -1, **i32)
            self._table = torch.zeros(R, max_blocks_per_seq, **i32)
            self._lens = torch.ones(R, **i32)
            self._qsl = torch.arange(R + 1, **i32)
            self._rows = torch.arange(R, **i32)

    def captured_buckets(self) -> list[int]:
        return sorted(self._graphs)

    def run(self, inp: StepInputs, decode_only: bool) -> torch.Tensor:
        """The logits ``(S, vocab)`` of the step's sampled rows."""
        B = inp.seq_lens.shape[0]
        if not (self.pad and decode_only and B <= self.max_rows):
            return self.model.forward_step(inp, self.k, self.v)
        n = bucket(B)
        W = inp.block_table.shape[1]
        self._ids[:B].copy_(inp.input_ids)
        self._pos[:B].copy_(inp.positions)
        self._slots[:B].copy_(inp.slot_mapping)
        self._table[:B, :W].copy_(inp.block_table)
        self._table[:B, W:].zero_()
        self._lens[:B].copy_(inp.seq_lens)
        # padded rows: no K/V write, one key, block 0
        self._ids[B:n].zero_()
        self._pos[B:n].zero_()
        self._slots[B:n].fill_(-1)
        self._table[B:n].zero_()
        self._lens[B:n].fill_(1)
        static = StepInputs(input_ids=self._ids[:n], positions=self._pos[:n], slot_mapping=self._slots[:n],
                            block_table=self._table[:n], seq_lens=self._lens[:n], query_start_loc=self._qsl[:n + 1],
                            logits_indices=self._rows[:n], max_query_len=1,
                            max_seq_len=self._table.shape[1] * self.k.shape[2])
        if not self.graphs:
            return self.model.forward_step(static, self.k, self.v)[:B]
        if n not in self._graphs:
            self._graphs[n] = self._capture(static)
            self.captures += 1
        graph, logits = self._graphs[n]
        graph.replay()
        return logits[:B]

    def _capture(self, static: StepInputs) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up (compile, autotune) on a side stream, then capture one step into the shared pool.

        The warm-up runs write the step's real K/V at its real slots, the same values the replay
        that follows writes again, so they are harmless."""
        dev = self.k.device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=dev)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side, main = self._stream, torch.cuda.current_stream(dev)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.model.forward_step(static, self.k, self.v)
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=side):
                logits = self.model.forward_step(static, self.k, self.v)  # (rows, vocab): the static output
        except RuntimeError as e:
            raise RuntimeError(f"capturing the decode step of {static.input_ids.shape[0]} rows in a CUDA graph "
                               f"failed: {e}. cuda_graphs=False runs it eagerly") from e
        return graph, logits
