"""Tensor-parallel execution of the engine's steps: rank 0 is the engine's own process, ranks
1..N-1 are worker processes this module starts, on one gloo process group over 127.0.0.1.

(torchrun-made groups are not supported yet.) The scheduler and the block manager live on rank 0 only. Each step rank 0 broadcasts the step's
inputs (the one int32 buffer `KVCacheManager.prepare` built, after a small header naming its
sizes), and every rank runs the family's `forward_step` on its slice of the model
(runtime/distributed.py) with its own K/V pools (its KV heads); the collectives inside the step
assemble the logits on every rank, rank 0 samples. Copy-on-write block copies are broadcast the
same way. Workers stop on a STOP command, when rank 0's process exits (they are daemons) or when
a collective times out (a dead or hung peer makes the others fail within ``timeout`` seconds).
"""
from __future__ import annotations

import datetime
import os
import socket
import traceback
import weakref

import torch
import torch.distributed as dist

from .kv_cache import StepInputs

_STEP, _COPY, _STOP, _SETUP = 1, 2, 3, 4
_HEADER = 10  # int64: command, payload length, N, B, W, S, max_query_len, max_seq_len, spare x2
# how long a collective waits for a peer before failing (a dead or hung rank); the environment
# variable GENFUSE_TP_TIMEOUT_S overrides it
DEFAULT_TIMEOUT_S = 120.0


def collective_timeout_s() -> float:
    raw = os.environ.get("GENFUSE_TP_TIMEOUT_S")
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:
        raise ValueError(f"GENFUSE_TP_TIMEOUT_S must be a number of seconds > 0, got {raw!r}")
    return value


class TensorParallelError(RuntimeError):
    """A tensor-parallel worker failed, died or stopped answering."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unpack(header: torch.Tensor, flat: torch.Tensor) -> StepInputs:
    N, B, W, S, max_q, max_seq = (int(x) for x in header[2:8])
    sizes = [N, N, N, B, B + 1, S, B * W]
    views, o = [], 0
    for n in sizes:
        views.append(flat[o:o + n])
        o += n
    return StepInputs(input_ids=views[0], positions=views[1], slot_mapping=views[2],
                      block_table=views[6].view(B, W), seq_lens=views[3], query_start_loc=views[4],
                      logits_indices=views[5], max_query_len=max_q, max_seq_len=max_seq)


def _pack(inp: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
    B, W = inp.block_table.shape
    flat = inp.packed  # KVCacheManager.prepare's buffer, in `_unpack`'s order
    if flat is None:
        parts = [inp.input_ids, inp.positions, inp.slot_mapping, inp.seq_lens, inp.query_start_loc,
                 inp.logits_indices, inp.block_table.reshape(-1)]
        flat = torch.cat([p.to(torch.int32) for p in parts])
    header = torch.tensor([_STEP, flat.numel(), inp.num_tokens, B, W, inp.logits_indices.numel(),
                           inp.max_query_len, inp.max_seq_len, 0, 0], dtype=torch.int64)
    return header, flat


def _worker(rank: int, world: int, init_method: str, model, load_kwargs: dict, timeout_s: float) -> None:
    """A worker rank: load its slice, then serve commands until STOP."""
    from ..loader import load_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        loaded = load_model(model, **load_kwargs, tensor_parallel=(rank, world))
        net, c = loaded.model, loaded.config
        k = v = None
        header = torch.empty(_HEADER, dtype=torch.int64)
        while True:
            dist.broadcast(header, src=0)
            cmd, n = int(header[0]), int(header[1])
            payload = torch.empty(n, dtype=torch.int32)
            if n:
                dist.broadcast(payload, src=0)
            if cmd == _STOP:
                break
            if cmd == _SETUP:  # pools: num_blocks, block_size; rotary up to max_len
                num_blocks, block_size, max_len = (int(x) for x in payload)
                shape = (c.num_layers, num_blocks, block_size, net.num_kv_heads, c.head_dim)
                k = torch.empty(shape, dtype=loaded.dtype)
                v = torch.empty(shape, dtype=loaded.dtype)
                net.setup_rope(max_len)
            elif cmd == _COPY:
                src, dst = payload.view(2, -1).long()
                k[:, dst] = k[:, src]
                v[:, dst] = v[:, src]
            elif cmd == _STEP:
                net.forward_step(_unpack(header, payload), k, v)
    except Exception:  # noqa: BLE001 - the traceback is the worker's only report
        traceback.print_exc()
        raise SystemExit(1)
    finally:
        dist.destroy_process_group()


class TPExecutor:
    """Rank 0's side: starts the workers, holds rank 0's slice, broadcasts every step."""

    def __init__(self, model, world: int, load_kwargs: dict, *, timeout_s: float | None = None):
        import torch.multiprocessing as mp

        from ..config import load_config
        from ..distributed import check_tensor_parallel
        from ..loader import load_model
        from ..registry import resolve

        check_tensor_parallel(load_config(resolve(model).path), world)  # before any process starts
        timeout_s = collective_timeout_s() if timeout_s is None else timeout_s
        self.world, self.timeout_s, self.procs = world, timeout_s, []
        self.owns_group = not dist.is_initialized()
        if self.owns_group:
            init_method = f"tcp://127.0.0.1:{_free_port()}"
            ctx = mp.get_context("spawn")
            self.procs = [ctx.Process(target=_worker, args=(r, world, init_method, model, load_kwargs, timeout_s),
                                      daemon=True, name=f"genfuse-tp-{r}") for r in range(1, world)]
            for p in self.procs:
                p.start()
            try:
                dist.init_process_group("gloo", init_method=init_method, rank=0, world_size=world,
                                        timeout=datetime.timedelta(seconds=timeout_s))
            except Exception as e:
                self._kill()
                raise TensorParallelError(f"tensor-parallel workers did not join within {timeout_s:.0f} s: {e}") from e
        else:  # torchrun made one: its other ranks would have to serve steps (not written yet)
            raise ValueError("tensor_parallel_size > 1 inside an existing torch.distributed process group "
                             "(torchrun) is not supported yet; run without torchrun and genfuse starts the workers")
        self._finalizer = weakref.finalize(self, TPExecutor._shutdown, self.procs, self.owns_group)
        try:
            self.loaded = load_model(model, **load_kwargs, tensor_parallel=(0, world))
        except Exception:
            self.close()
            raise
        self.model = _RankZeroModel(self)

    # ------------------------------------------------------------------ commands

    def _send(self, cmd: int, payload: torch.Tensor | None = None, header: torch.Tensor | None = None) -> None:
        if header is None:
            header = torch.zeros(_HEADER, dtype=torch.int64)
            header[0], header[1] = cmd, 0 if payload is None else payload.numel()
        try:
            dist.broadcast(header, src=0)
            if payload is not None and payload.numel():
                dist.broadcast(payload, src=0)
        except Exception as e:
            raise TensorParallelError(f"a tensor-parallel worker failed or stopped answering: {e}") from e
        dead = [p.name for p in self.procs if not p.is_alive()]
        if dead:
            raise TensorParallelError(f"tensor-parallel worker(s) {', '.join(dead)} died")

    def setup(self, num_blocks: int, block_size: int, max_len: int) -> None:
        self._send(_SETUP, torch.tensor([num_blocks, block_size, max_len], dtype=torch.int32))

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            self._send(_COPY, torch.tensor([[s for s, _ in copies], [d for _, d in copies]], dtype=torch.int32).view(-1))

    def step(self, inp: StepInputs) -> None:
        header, flat = _pack(inp)
        self._send(_STEP, flat, header)

    def close(self) -> None:
        """Stop the workers and release the process group (idempotent)."""
        self._finalizer()

    @staticmethod
    def _shutdown(procs, owns_group: bool) -> None:
        if owns_group and dist.is_initialized():
            try:
                header = torch.zeros(_HEADER, dtype=torch.int64)
                header[0] = _STOP
                dist.broadcast(header, src=0)
            except Exception:  # noqa: BLE001 - a dead worker: kill the rest below
                pass
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def _kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)


class _RankZeroModel:
    """Rank 0's model as the engine sees it: every step is broadcast to the workers first."""

    def __init__(self, executor: TPExecutor):
        self._ex, self._net = executor, executor.loaded.model
        self.num_kv_heads, self.backend = self._net.num_kv_heads, self._net.backend

    def setup_rope(self, max_len: int) -> None:
        self._net.setup_rope(max_len)

    def forward_step(self, inp: StepInputs, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        self._ex.step(inp)
        try:
            return self._net.forward_step(inp, k_pool, v_pool)
        except dist.DistError as e:  # a collective inside the step: a peer died, hung or failed
            raise TensorParallelError(f"a tensor-parallel collective failed (a worker died, hung past "
                                      f"{self._ex.timeout_s:.0f} s, or failed): {e}") from e
