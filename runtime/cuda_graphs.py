"""The decode step replayed from CUDA graphs, one graph per batch-size bucket.

A decode step is a few hundred small launches (per layer: norm, QKV linear, rotary, two cache
writes, paged attention, o_proj, norm, gate/up, swiglu, down), each a few microseconds of
Python and driver time, so at small batch the GPU waits on the host. Captured once in a CUDA
graph, the whole step is one launch. A graph replays fixed shapes at fixed addresses, hence:

* **Buckets.** A batch of B runs the graph of ``bucket(B)`` rows (1, 2, 4, 8, 16, 32, ...).
  The extra rows decode token 0 at position 0 of cache rows ``B..bucket(B)-1``: with the
  trivial block tables every row owns its own slab, and those rows belong to no sequence of
  the batch (prefill fills rows ``0..B-1``), so they touch nothing real; their logits are
  dropped. `DecodeRunner.setup_cache` gives the cache a row for every row of the bucket.
* **Static buffers.** Tokens and positions are copied into buffers the graphs read; the logits
  come back in the graph's own output, valid until the next decode step.
* **Fixed work per bucket.** Nothing in ``decode_one_token`` syncs the host or takes a shape
  from a per-step host value, and every kernel choice depends on shapes only: `linear` takes
  its small-M or GEMM path from the row count and autotunes on (N, K) / (M bucket, N, K);
  `paged_attention` picks ``num_splits`` from the batch and the block table's width (the
  cache's ``max_len``), never from ``seq_lens``. Triton compiles and autotunes in the warm-up
  runs before capture, never inside it.
* **Recapture.** The graphs point at the KV cache and rotary tables; when the model
  reallocates its cache (a longer request, or a batch past the cache's rows) the graphs are
  dropped and each bucket is captured again the first time it runs.

Warm-up and capture happen at the first decode step of a bucket, with that step's real inputs
in the buffers: a warm-up run writes the same K/V at the same positions as the replay that
follows, so it is harmless. All graphs share one memory pool: a graph's scratch is dead once
its replay ends and replays never overlap (one stream), so the buckets reuse the same memory.

With graphs off the runner can still pad (``pad=True``): the CPU tests run the padded batches
through the same code and check that padding changes no token.
"""
from __future__ import annotations

import torch

WARMUP_RUNS = 2  # the first compiles and autotunes, the second runs the cached kernels


def bucket(batch: int) -> int:
    """Rows of the graph a batch of ``batch`` sequences runs: the next power of two."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    return 1 << (batch - 1).bit_length()


class DecodeRunner:
    """Runs ``model.decode_one_token`` for a batch: eagerly, padded to a bucket, or replayed
    from a CUDA graph per bucket (``graphs=True``, CUDA and the Triton backend only).

    ``pad`` defaults to ``graphs``. ``captures`` counts the graphs captured so far.
    """

    def __init__(self, model, *, graphs: bool, pad: bool | None = None):
        if graphs and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {model.device}")
        if graphs and model.backend == "torch":
            raise ValueError("CUDA graphs need the Triton kernels: backend='torch' runs the reference "
                             "paged attention, which reads seq_lens on the host")
        self.model = model
        self.graphs = graphs
        self.pad = graphs if pad is None else pad
        if graphs and not self.pad:
            raise ValueError("CUDA graphs replay fixed shapes: graphs=True needs pad=True")
        self.captures = 0
        self._cache = None  # the KVCache the buffers and graphs below were made for
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # rows -> (graph, logits)
        self._pool = self._stream = None

    def cache_rows(self, batch: int) -> int:
        """Rows of KV cache a batch of ``batch`` sequences needs: its bucket when padding."""
        return bucket(batch) if self.pad else batch

    def setup_cache(self, batch: int, max_len: int):
        """The model's KV cache for ``batch`` sequences of ``max_len`` tokens, with a row for every
        row of the batch's bucket when padding."""
        cache = self.model.setup_cache(self.cache_rows(batch), max_len)
        self._adopt(cache)
        return cache

    def captured_buckets(self) -> list[int]:
        """The buckets with a graph for the current cache."""
        return sorted(self._graphs)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions ``(B,)`` int64 on the model's device -> logits ``(B, vocab)`` float32.

        Padded, the logits are a view of a buffer that the next step overwrites."""
        if not self.pad:
            return self.model.decode_one_token(tokens, positions)
        B = tokens.shape[0]
        n = bucket(B)
        self._adopt(self.model.cache)
        if self._cache is None or n > self._cache.max_batch:
            rows = 0 if self._cache is None else self._cache.max_batch
            raise ValueError(f"a batch of {B} pads to {n} rows but the KV cache has {rows}: "
                             f"call setup_cache({B}, max_len) first")
        self._tokens[:B].copy_(tokens)
        self._tokens[B:n].zero_()  # padded rows: token 0 at position 0 of their own spare rows
        self._positions[:B].copy_(positions)
        self._positions[B:n].zero_()
        tok, pos = self._tokens[:n], self._positions[:n]
        if not self.graphs:
            return self.model.decode_one_token(tok, pos)[:B]
        if n not in self._graphs:
            self._graphs[n] = self._capture(tok, pos)
            self.captures += 1
        graph, logits = self._graphs[n]
        graph.replay()
        return logits[:B]

    # ------------------------------------------------------------------ internals

    def _adopt(self, cache) -> None:
        """Forget graphs and buffers made for another cache; make the buffers for this one."""
        if cache is self._cache:
            return
        self._graphs.clear()  # they read the old cache and rotary tables
        self._pool = None
        self._cache = cache
        if cache is not None:
            dev = self.model.device
            self._tokens = torch.zeros(cache.max_batch, dtype=torch.int64, device=dev)  # (max_batch,)
            self._positions = torch.zeros(cache.max_batch, dtype=torch.int64, device=dev)

    def _capture(self, tok: torch.Tensor, pos: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up (compile, autotune) on a side stream, then capture one step into the shared pool."""
        model, dev = self.model, self.model.device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=dev)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side, main = self._stream, torch.cuda.current_stream(dev)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                model.decode_one_token(tok, pos)
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=side):
                logits = model.decode_one_token(tok, pos)  # (rows, vocab): the static output
        except RuntimeError as e:  # e.g. an op that syncs the host: say how to run without graphs
            raise RuntimeError(f"capturing the decode step of {tok.shape[0]} rows in a CUDA graph failed: {e}. "
                               "LLM(..., cuda_graphs=False) runs it eagerly") from e
        return graph, logits
