"""Tensor-parallel execution of the engine's steps: rank 0 runs the engine, the other ranks
serve its steps.

Who the other ranks are: worker processes this module starts (spawn, daemons, one process
group over 127.0.0.1), or, under ``torchrun`` (its environment: RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT; also multi-node), the processes torchrun started, which join one
``env://`` group: there rank 0 builds the engine and every other rank runs `run_worker`. The
backend is gloo on the CPU or NCCL with one GPU a rank (`distributed.choose_backend`; the
NCCL path has not run on GPUs yet).

The scheduler and the block manager live on rank 0 only. Each step rank 0 broadcasts the step's
inputs (the one int32 buffer `KVCacheManager.prepare` built, after a small header naming its
sizes), and every rank runs the family's `forward_step` on its slice of the model
(runtime/distributed.py) with its own K/V pools (its KV heads); the collectives inside the step
assemble the logits on every rank, rank 0 samples. Copy-on-write block copies are broadcast the
same way. Workers stop on a STOP command (rank 0's `close`, also run at exit), when rank 0's
process exits (spawned workers are daemons), or when a collective times out (a dead or hung
peer makes the others fail within ``timeout`` seconds). Workers ignore SIGINT: Ctrl-C reaches
rank 0, which stops them.
"""
from __future__ import annotations

import datetime
import logging
import os
import signal
import threading
import traceback
import weakref

import torch
import torch.distributed as dist

from .. import threads as _threads
from ..distributed import check_tensor_parallel, choose_backend, free_port, launch_env, reap
from .kv_cache import StepInputs

_log = logging.getLogger("genfuse.tp")
_STEP, _COPY, _STOP, _SETUP = 1, 2, 3, 4
# int64: command, payload length, N, B, W, S, max_query_len, max_seq_len, then rank 0's genfuse
# kernel threads and torch intra-op threads, which every worker takes on (`--threads` is per rank)
_HEADER = 10
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


class _SigintAfterStep:
    """Ctrl-C on rank 0 waits for the end of the step or command in flight: a step cut halfway
    would leave rank 0 and the workers in different collectives (then the STOP that ends them
    would wait out the timeout). Only where Python's own Ctrl-C handler is installed, in the
    main thread; re-entrant."""

    depth = 0
    pending = False

    def __enter__(self):
        cls = type(self)
        self.active = cls.depth > 0 or (threading.current_thread() is threading.main_thread()
                                        and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        if self.active:
            if cls.depth == 0:
                cls.pending = False
                signal.signal(signal.SIGINT, cls._later)
            cls.depth += 1

    @classmethod
    def _later(cls, sig, frame):
        cls.pending = True

    def __exit__(self, kind, value, tb):
        cls = type(self)
        if not self.active:
            return False
        cls.depth -= 1
        if cls.depth == 0:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if cls.pending and kind is None:
                cls.pending = False
                raise KeyboardInterrupt
        return False


class TensorParallelError(RuntimeError):
    """A tensor-parallel worker failed, died or stopped answering."""


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
                           inp.max_query_len, inp.max_seq_len, _threads.kernel_threads(), torch.get_num_threads()],
                          dtype=torch.int64)
    return header, flat


def _config(model):
    from ..config import load_config
    from ..registry import resolve

    return load_config(resolve(model).path)


def _external_world(world: int) -> int | None:
    """The rank of this process in the group someone else made (torchrun's environment or an
    initialized default group), checked against ``world``; None when there is none."""
    if dist.is_initialized():
        have, rank, who = dist.get_world_size(), dist.get_rank(), "the initialized process group has"
    else:
        env = launch_env()
        if env is None:
            return None
        have, rank, who = env.world, env.rank, "torchrun started"
    if have != world:
        raise ValueError(f"{who} {have} ranks but tensor_parallel_size={world}: they must be equal "
                         f"(under torchrun, --nproc-per-node x --nnodes is the tensor-parallel size)")
    return rank


def worker_rank(world: int) -> int | None:
    """This process's rank when it is one of the ranks other than 0 of torchrun's (or an existing)
    group of ``world`` ranks, which serve rank 0's steps (`run_worker`); else None."""
    rank = _external_world(world)
    return rank or None


def _init_group(backend: str, device: str, timeout_s: float, **kw) -> None:
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)


def _serve_steps(model, load_kwargs: dict, rank: int, world: int, device: str) -> None:
    """A worker rank on an initialized group: load its slice, then serve commands until STOP."""
    from ..loader import load_model

    loaded = load_model(model, **load_kwargs, device=device, tensor_parallel=(rank, world))
    net, c = loaded.model, loaded.config
    k = v = None
    header = torch.empty(_HEADER, dtype=torch.int64, device=device)
    while True:
        dist.broadcast(header, src=0)
        cmd, n = int(header[0]), int(header[1])
        payload = torch.empty(n, dtype=torch.int32, device=device)
        if n:
            dist.broadcast(payload, src=0)
        if cmd == _STOP:
            break
        if cmd == _SETUP:  # pools: num_blocks, block_size; rotary up to max_len
            num_blocks, block_size, max_len = (int(x) for x in payload)
            shape = (c.num_layers, num_blocks, block_size, net.num_kv_heads, c.head_dim)
            k = torch.empty(shape, dtype=loaded.dtype, device=device)
            v = torch.empty(shape, dtype=loaded.dtype, device=device)
            net.setup_rope(max_len)
        elif cmd == _COPY:
            src, dst = payload.view(2, -1).long()
            k[:, dst] = k[:, src]
            v[:, dst] = v[:, src]
        elif cmd == _STEP:
            _follow_threads(rank, int(header[8]), int(header[9]))
            net.forward_step(_unpack(header, payload), k, v)


def _follow_threads(rank: int, kernel: int, torch_threads: int) -> None:
    """Take on rank 0's thread counts when they differ from this rank's (LLM.set_threads,
    `--threads`): a step's cost is the slowest rank's, so all run alike."""
    if kernel == _threads.kernel_threads() and torch_threads == torch.get_num_threads():
        return
    _threads.set_threads(kernel, torch_threads=torch_threads)
    _log.info("rank %d: genfuse kernels on %d thread(s), torch on %d", rank, kernel, torch_threads)


def _ignore_sigint() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches rank 0, which stops us


def _log_setup() -> tuple[int, str | None]:
    """Rank 0's level and format for the "genfuse.tp" lines, for the workers to log alike."""
    lg = _log
    while lg is not None:
        for h in lg.handlers:
            return _log.getEffectiveLevel(), getattr(h.formatter, "_fmt", None)
        lg = lg.parent if lg.propagate else None
    return _log.getEffectiveLevel(), None


def _worker(rank: int, world: int, init_method: str, model, load_kwargs: dict, backend: str, timeout_s: float,
            log: tuple[int, str | None]) -> None:
    """A worker process genfuse started: rank ``rank`` on ``cuda:rank`` (NCCL) or the CPU."""
    _ignore_sigint()
    torch.set_num_threads(1)
    level, fmt = log
    if level < logging.WARNING:  # rank 0 shows these info lines: so do the workers (what each rank holds)
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter(fmt))
        _log.addHandler(h)
        _log.setLevel(level)
        _log.propagate = False
    device = "cpu" if backend == "gloo" else f"cuda:{rank}"
    try:
        _init_group(backend, device, timeout_s, init_method=init_method, rank=rank, world_size=world)
        try:
            _serve_steps(model, load_kwargs, rank, world, device)
        finally:
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the traceback is the worker's only report
        traceback.print_exc()
        raise SystemExit(1)


def run_worker(model, world: int, load_kwargs: dict, *, device=None, backend: str | None = None,
               timeout_s: float | None = None) -> None:
    """Be one of the ranks other than 0 of torchrun's group (or of the initialized default
    group): load this rank's slice and serve rank 0's steps until rank 0 stops (its engine's
    `close`, or its exit). ``load_kwargs``: dtype, backend, keep_quantized, as rank 0's."""
    rank = _external_world(world)
    if not rank:
        raise ValueError("run_worker runs on the ranks other than 0 of a torchrun (or existing) process group")
    check_tensor_parallel(_config(model), world)
    timeout_s = collective_timeout_s() if timeout_s is None else timeout_s
    env = launch_env()
    made = not dist.is_initialized()
    local = env.local_rank if env is not None else rank
    backend, dev = choose_backend(backend, device, world, local_rank=local)
    _ignore_sigint()
    if made:
        _init_group(backend, dev, timeout_s, init_method="env://")
    try:
        _serve_steps(model, load_kwargs, rank, world, dev)
    finally:
        if made:
            dist.destroy_process_group()


class TPExecutor:
    """Rank 0's side: starts the workers (or joins torchrun's group), holds rank 0's slice,
    broadcasts every step. ``load_kwargs``: dtype, backend, keep_quantized (every rank's);
    ``device`` and ``backend`` as `distributed.choose_backend` takes them."""

    def __init__(self, model, world: int, load_kwargs: dict, *, device=None, backend: str | None = None,
                 timeout_s: float | None = None):
        import torch.multiprocessing as mp

        from ..loader import load_model

        check_tensor_parallel(_config(model), world)  # before any process starts
        timeout_s = collective_timeout_s() if timeout_s is None else timeout_s
        self.world, self.timeout_s, self.procs = world, timeout_s, []
        rank = _external_world(world)
        if rank:
            raise ValueError(f"this process is rank {rank}: only rank 0 builds the engine "
                             "(run_worker serves the steps)")
        env = launch_env()
        local = None if rank is None else (env.local_rank if env is not None else 0)
        self.backend, self.device = choose_backend(backend, device, world, local_rank=local)
        self.made_group = not dist.is_initialized()
        if rank is None:  # no launcher: start the workers, one group over the loopback
            if self.backend == "gloo" and not _threads.threads_given():
                # the ranks share this machine's cores: by default each takes its share (the
                # workers take rank 0's count with every step)
                _threads.set_threads(max(1, _threads.default_threads() // world))
            init_method = f"tcp://127.0.0.1:{free_port()}"
            ctx = mp.get_context("spawn")
            log = _log_setup()
            self.procs = [ctx.Process(target=_worker, args=(r, world, init_method, model, load_kwargs, self.backend,
                                                            timeout_s, log),
                                      daemon=True, name=f"genfuse-tp-{r}") for r in range(1, world)]
            for p in self.procs:
                p.start()
            kw = dict(init_method=init_method, rank=0, world_size=world)
        else:  # torchrun's ranks (or the caller's group): the others run `run_worker`
            kw = dict(init_method="env://")
        if self.made_group:
            try:
                _init_group(self.backend, self.device, timeout_s, **kw)
            except Exception as e:
                self._kill()
                raise TensorParallelError(f"tensor-parallel ranks did not join within {timeout_s:.0f} s: {e}") from e
        _log.info("tensor parallel: %d ranks on %s (%s)", world, self.backend,
                  "workers started here" if self.procs else "torchrun's process group")
        self._finalizer = weakref.finalize(self, TPExecutor._shutdown, self.procs, self.made_group, self.device)
        try:
            self.loaded = load_model(model, **load_kwargs, device=self.device, tensor_parallel=(0, world))
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
            with _SigintAfterStep():
                dist.broadcast(header.to(self.device), src=0)
                if payload is not None and payload.numel():
                    dist.broadcast(payload.to(self.device), src=0)
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
    def _shutdown(procs, made_group: bool, device: str) -> None:
        if dist.is_initialized():
            try:
                header = torch.zeros(_HEADER, dtype=torch.int64, device=device)
                header[0] = _STOP
                dist.broadcast(header, src=0)
            except Exception:  # noqa: BLE001 - a dead worker: kill the rest below
                pass
        try:
            reap(procs)
        except KeyboardInterrupt:  # Ctrl-C while they stop: do not wait for them
            for p in procs:
                p.kill()
                p.join(timeout=5)
        if made_group and dist.is_initialized():
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
        try:
            with _SigintAfterStep():  # every rank runs the whole step, or none does
                self._ex.step(inp)
                return self._net.forward_step(inp, k_pool, v_pool)
        except dist.DistError as e:  # a collective inside the step: a peer died, hung or failed
            raise TensorParallelError(f"a tensor-parallel collective failed (a worker died, hung past "
                                      f"{self._ex.timeout_s:.0f} s, or failed): {e}") from e
