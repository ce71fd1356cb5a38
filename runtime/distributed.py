"""Tensor parallelism over `torch.distributed`: which slice of the model each rank holds, and the
two collectives a step needs.

The split (gpt-fast's ``tp.py``, vLLM's ``QKVParallelLinear`` / ``RowParallelLinear``):

* attention: the query heads are split evenly over the ``world`` ranks; the KV heads too when
  there are at least as many as ranks (``Hkv % world == 0``), else each KV head is replicated on
  ``world / Hkv`` consecutive ranks (``world % Hkv == 0``), so every rank's query heads find
  their group's KV head locally. q/k/v are column-parallel (rows of ``[Wq; Wk; Wv]``), ``o_proj``
  is row-parallel (columns of ``Wo``): each rank's product is a partial sum, reduced by ONE
  all-reduce, after which the bias and the residual are added once.
* MLP: gate/up (GPT-2's c_fc) column-parallel over the intermediate size, down (c_proj)
  row-parallel with ONE all-reduce. Two all-reduces per layer, no more.
* embedding and LM head vocabulary-parallel: rank r holds rows ``[r V/N, (r+1) V/N)``; a token
  outside them looks up zeros and one all-reduce assembles the embedding; each rank's logits
  are its vocabulary slice, gathered (all-gather) for sampling.
* norms, GPT-2's position table and the rotary tables are replicated.

`check_tensor_parallel(config, world)` refuses a sizing that cannot split, with the numbers,
before any process starts. `TPGroup` wraps the process group; with ``world == 1`` it is never
built (the model code takes ``tp=None`` and runs its fused single-device path).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def check_tensor_parallel(config, world: int) -> None:
    """ValueError naming the numbers unless ``config`` splits over ``world`` ranks."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {world!r}")
    if world == 1:
        return
    hq, hkv = config.num_heads, config.num_kv_heads
    problems = []
    if hq % world:
        problems.append(f"{hq} query heads are not divisible by {world}")
    if hkv >= world and hkv % world:
        problems.append(f"{hkv} KV heads are not divisible by {world}")
    if hkv < world and world % hkv:
        problems.append(f"{world} ranks are not a multiple of the {hkv} KV heads (needed to replicate them)")
    if config.intermediate_size % world:
        problems.append(f"intermediate size {config.intermediate_size} is not divisible by {world}")
    if config.vocab_size % world:
        problems.append(f"vocabulary size {config.vocab_size} is not divisible by {world}")
    if problems:
        raise ValueError(f"cannot split {config.model_type or config.arch} over tensor_parallel_size={world}: "
                         + "; ".join(problems))


@dataclass(frozen=True)
class TPPlan:
    """What rank ``rank`` of ``world`` holds (half-open index ranges into the full model)."""

    rank: int
    world: int
    q_heads: range
    kv_heads: range
    intermediate: range
    vocab: range

    @classmethod
    def make(cls, config, rank: int, world: int) -> TPPlan:
        check_tensor_parallel(config, world)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside [0, {world})")
        hq, hkv = config.num_heads, config.num_kv_heads
        nq = hq // world
        if hkv >= world:
            nkv = hkv // world
            kv = range(rank * nkv, (rank + 1) * nkv)
        else:  # replicated: ranks r with the same r // (world / hkv) share one KV head
            head = rank // (world // hkv)
            kv = range(head, head + 1)
        ni, nv = config.intermediate_size // world, config.vocab_size // world
        return cls(rank, world, range(rank * nq, (rank + 1) * nq), kv,
                   range(rank * ni, (rank + 1) * ni), range(rank * nv, (rank + 1) * nv))

    def head_rows(self, heads: range, head_dim: int) -> slice:
        return slice(heads.start * head_dim, heads.stop * head_dim)


class TPGroup:
    """A rank's view of its tensor-parallel process group: the plan and the two collectives."""

    def __init__(self, plan: TPPlan, group=None):
        self.plan, self.group = plan, group
        self.rank, self.world = plan.rank, plan.world

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place (row-parallel partial products, the vocab-parallel embedding)."""
        dist.all_reduce(x, group=self.group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` side by side along the last dimension (the vocab-parallel logits)."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def shard_rows(w, rows: slice):
    """Rows ``rows`` of a weight (out, in) or a bias: dense tensors and packed GGUF blocks."""
    from .quant import PackedRows, PackedWeight

    if isinstance(w, PackedWeight):
        return PackedWeight(w.data[rows], w.qtype, w.shape[1])
    if isinstance(w, PackedRows):
        raise ValueError("a weight packed in several formats cannot be split by rows yet")
    return w[rows].contiguous()


def shard_cols(w, cols: slice):
    """Columns ``cols`` of a weight (out, in): the input split of a row-parallel layer. Packed
    rows hold whole blocks of 32 values (256 for the K-quants), so the split must fall on block
    boundaries."""
    from .quant import BLOCK_BYTES, BLOCK_WEIGHTS, PackedWeight

    if isinstance(w, PackedWeight):
        block = BLOCK_WEIGHTS[w.qtype]
        if cols.start % block or cols.stop % block:
            raise ValueError(f"a {w.qtype} weight splits along its input only at multiples of {block} "
                             f"(asked for columns {cols.start}:{cols.stop})")
        per = BLOCK_BYTES[w.qtype]
        data = w.data[:, cols.start // block * per:cols.stop // block * per]
        return PackedWeight(data.contiguous(), w.qtype, cols.stop - cols.start)
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"cannot split a {type(w).__name__} by columns")
    return w[:, cols].contiguous()


# A family's `tp_split(name, config, plan)` says how a canonical tensor is cut: None (replicated),
# or (dim, [slices]): the slices of that dimension (0: rows, 1: columns), concatenated.
Split = tuple[int, list[slice]]


def shard_tensor(w, split: Split | None):
    """This rank's piece of one tensor (dense or packed) under ``split``."""
    if split is None:
        return w
    dim, slices = split
    if dim == 0:
        from .quant import cat_rows

        parts = [shard_rows(w, s) for s in slices]
        return parts[0] if len(parts) == 1 else cat_rows(parts)
    if len(slices) != 1:
        raise ValueError("a column split takes one range")
    return shard_cols(w, slices[0])


def sharded_shape(shape: tuple[int, ...], split: Split | None) -> tuple[int, ...]:
    if split is None:
        return tuple(shape)
    dim, slices = split
    out = list(shape)
    out[dim] = sum(len(range(*s.indices(shape[dim]))) for s in slices)
    return tuple(out)


def shard_state_dict(config, sd: dict, plan: TPPlan) -> dict:
    """Rank ``plan.rank``'s slice of a full canonical state dict, as its family splits it."""
    from .models import family_for

    split = family_for(config.arch).tp_split
    return {name: shard_tensor(w, split(name, config, plan)) for name, w in sd.items()}


def vocab_parallel_embedding(table, tokens: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """The embedding of ``tokens`` from this rank's vocabulary rows, summed over ranks."""
    from .quant import embedding

    lo, hi = tp.plan.vocab.start, tp.plan.vocab.stop
    mine = (tokens >= lo) & (tokens < hi)
    h = embedding(table, torch.where(mine, tokens - lo, 0))
    h = h * mine[:, None].to(h.dtype)
    return tp.all_reduce(h)


# ---------------------------------------------------------------------------- launching ranks

BACKENDS = ("gloo", "nccl")


@dataclass(frozen=True)
class LaunchEnv:
    """The ranks torchrun (or any ``env://`` launcher) started this process among."""

    rank: int
    world: int
    local_rank: int


def launch_env() -> LaunchEnv | None:
    """This process's place among the ranks torchrun started (its environment: RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or None when not started that way."""
    import os

    if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them), got "
                         f"{os.environ.get('RANK')!r}, {os.environ.get('WORLD_SIZE')!r}, "
                         f"{os.environ.get('LOCAL_RANK')!r}") from None
    if not 0 <= rank < world or local < 0:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world} (or LOCAL_RANK={local} < 0)")
    return LaunchEnv(rank, world, local)


def choose_backend(requested: str | None, device, world: int, *, local_rank: int | None = None) -> tuple[str, str]:
    """The process-group backend and this rank's device: ``(backend, device)``.

    The device decides: CUDA means NCCL with one GPU a rank (rank r on ``cuda:r`` when genfuse
    starts the ranks, ``cuda:LOCAL_RANK`` under torchrun), the CPU means gloo. ``requested``
    (``--distributed-backend``) picks the device when ``device`` is None, and must agree with it
    otherwise. Refused here, before any process starts: NCCL without enough CUDA devices, gloo
    with a CUDA device."""
    if requested is not None and requested not in BACKENDS:
        raise ValueError(f"distributed_backend must be one of {', '.join(BACKENDS)} or None, got {requested!r}")
    need = world if local_rank is None else local_rank + 1  # GPUs this machine must have
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    kind = None if device is None else torch.device(device).type
    if kind is None:
        kind = "cuda" if requested == "nccl" or (requested is None and have) else "cpu"
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"tensor parallelism runs on the CPU (gloo) or CUDA (nccl), not on {kind}")
    if kind == "cpu":
        if requested == "nccl":
            raise ValueError("distributed_backend='nccl' needs CUDA tensors, but the device is the CPU; "
                             "use distributed_backend='gloo' (or a CUDA device)")
        return "gloo", "cpu"
    if requested == "gloo":
        raise ValueError("distributed_backend='gloo' runs tensor parallelism on the CPU here; use 'nccl' "
                         "with CUDA devices (or device='cpu')")
    if have < need:
        raise ValueError(f"distributed_backend='nccl' needs a CUDA device for every rank: {world} ranks, "
                         f"{have} CUDA device(s) here; use distributed_backend='gloo' (CPU)")
    if device is not None and torch.device(device).index not in (None, 0 if local_rank is None else local_rank):
        raise ValueError(f"under tensor parallelism rank r runs on cuda:r (cuda:LOCAL_RANK under torchrun); "
                         f"device={device!r} names another GPU: pass device='cuda'")
    return "nccl", f"cuda:{0 if local_rank is None else local_rank}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank, world, port, fn, args, queue, timeout_s):
    import datetime
    import traceback

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            queue.put((rank, "ok", fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the traceback goes back to the caller
        queue.put((rank, "error", traceback.format_exc()))


def reap(procs, timeout: float = 10.0) -> None:
    """Join every process, killing one that has not exited within ``timeout`` seconds."""
    for p in procs:
        p.join(timeout=timeout)
        if p.is_alive():
            p.kill()
            p.join(timeout=timeout)


def run_ranks(fn, world: int, *args, timeout: float = 240.0, collective_timeout_s: float = 60.0) -> list:
    """``fn(rank, world, *args)`` on ``world`` fresh gloo ranks on 127.0.0.1 (spawned processes,
    one torch thread each; ``fn`` and the results must pickle); their results by rank. A rank
    that raises fails the call with its traceback (RuntimeError); every process is joined or
    killed before this returns. For tests and benchmarks: the engine starts its own workers."""
    import queue as queue_mod

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_entry, args=(r, world, port, fn, args, q, collective_timeout_s), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world):
            try:
                rank, status, value = q.get(timeout=timeout)
            except queue_mod.Empty:
                errors.append(f"no answer from every rank within {timeout:.0f} s")
                break
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    finally:
        reap(procs)
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world)]
