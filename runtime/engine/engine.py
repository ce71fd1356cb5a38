"""`Engine`: continuous batching over the paged KV cache (docs/architecture.md, "Engine").

    engine = Engine("smollm2-135m-instruct", max_num_seqs=64)
    engine.add_request("a", "The capital of France is", SamplingParams(max_tokens=16, temperature=0))
    while engine.has_unfinished_requests():
        for out in engine.step():
            print(out.request_id, out.new_text, out.finished and out.finish_reason)

One `step`: the scheduler picks tokens (`scheduler.Scheduler`), the KV cache manager turns
them into one flat batch (`kv_cache.KVCacheManager.prepare`, one host-to-device copy), the
model runs it (`forward_step`), the sampler draws one token for every request whose last
token was computed (each with its own parameters and generator), and the host syncs once to
hand the tokens out: stop ids, stop strings, max_tokens, max_model_len.

Ending: EOS ids (the config's and the tokenizer's, unless ``ignore_eos``) and
``stop_token_ids`` end a request with "stop" (the id is in ``token_ids``, not in ``text``); a
stop string ends it too and is cut from the text; ``max_tokens`` (or reaching
``max_model_len``) ends it with "length"; `abort` with "abort". Logits that turn non-finite
end that request with "error" and an ``error`` message; the others go on.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..loader import LoadedModel, load_model
from ..registry import DEFAULT_MODEL
from ..resources import check_memory
from ..sampling import SamplingParams, TokenLogprob, sample, token_logprobs
from .cuda_graphs import StepRunner
from .kv_cache import KVCacheManager, kv_bytes_per_block
from .scheduler import Request, Scheduler

_log = logging.getLogger("genfuse")

# CPU has no "free memory" to take a fraction of: a fixed pool (genfuse info prints it).
CPU_KV_CACHE_MEMORY = 1 << 30
GPU_MEMORY_UTILIZATION = 0.9  # of the memory free after the weights, as vLLM's default
KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class EngineArgs:
    """How the engine batches and how big its KV cache is (all validated here).

    - ``block_size``: tokens per KV block (16).
    - ``num_kv_blocks`` or ``kv_cache_memory`` (bytes): the pool; at most one. Default: on
      CUDA ``GPU_MEMORY_UTILIZATION`` of the free memory, on CPU ``CPU_KV_CACHE_MEMORY``.
    - ``max_num_seqs``: requests running at once (256).
    - ``max_num_batched_tokens``: tokens per step (2048 on CUDA, 512 on CPU).
    - ``max_model_len``: prompt + output tokens per request; default and upper bound: the
      model's context and the pool's capacity.
    - ``kv_cache_dtype``: the K/V pools' element type: "auto" (the model's dtype), or "float32",
      "float16", "bfloat16". One other than the model's dtype needs the fused CPU layers
      (`models.cpu_layer`: a Llama-family model with packed GGUF weights, float32, on CPU, one
      process), which store K/V as float16 and widen them back to float32 as attention reads
      them (as llama.cpp's default f16 cache): half the bytes a token, so twice the tokens in the
      same ``kv_cache_memory`` and half the memory traffic of attention, at float16 rounding of
      K and V (11 significant bits). Elsewhere the pools are the model's dtype.
    - ``enable_prefix_caching``: share the KV of equal prompt prefixes (on).
    - ``enable_chunked_prefill``: split long prompts over steps (on); off, a prompt must fit
      ``max_num_batched_tokens`` whole.
    - ``tensor_parallel_size``: ranks the model is split over (1); above 1 the engine starts
      N-1 worker processes (`engine.tp_executor`), or under torchrun uses the ranks torchrun
      started (WORLD_SIZE must equal N; on ranks other than 0 the constructor serves rank 0's
      steps and then raises ``SystemExit(0)``).
    - ``distributed_backend``: "gloo" (CPU) or "nccl" (one CUDA device a rank); None: nccl when
      the device is CUDA, else gloo (`distributed.choose_backend`).
    """

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    tensor_parallel_size: int = 1
    distributed_backend: str | None = None

    def __post_init__(self):
        def pos_int(name, lo=1, hi=None, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
                rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                raise ValueError(f"{name} must be an int {rng}, got {v!r}")

        pos_int("block_size", 1, 1024)
        pos_int("num_kv_blocks", optional=True)
        pos_int("kv_cache_memory", optional=True)
        pos_int("max_num_seqs", 1, 1 << 20)
        pos_int("max_num_batched_tokens", optional=True)
        pos_int("max_model_len", 2, optional=True)
        pos_int("tensor_parallel_size", 1, 64)
        if self.distributed_backend not in (None, "gloo", "nccl"):
            raise ValueError(f"distributed_backend must be 'gloo', 'nccl' or None, got {self.distributed_backend!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.num_kv_blocks is not None and self.kv_cache_memory is not None:
            raise ValueError("give num_kv_blocks or kv_cache_memory, not both")
        for name in ("enable_prefix_caching", "enable_chunked_prefill"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @staticmethod
    def names() -> tuple[str, ...]:
        return tuple(EngineArgs.__dataclass_fields__)


@dataclass
class RequestOutput:
    """What one step did for one request: its new tokens and text, and whether it ended."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    token_ids: list[int]  # every generated id so far
    text: str  # all generated text so far (stop strings cut once finished)
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    prompt_token_ids: list[int]
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    error: str | None = None
    metrics: dict = field(default_factory=dict)  # arrival/first_token/finished times (perf_counter)
    # with SamplingParams.logprobs: one TokenLogprob per id in new_token_ids; else None
    new_logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine (`Engine.stats`): what runs, what waits, the KV pool, and the
    counters since it started (the `/metrics` of the server read these)."""

    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_kv_blocks: int  # free or holding only evictable prefix-cache blocks
    num_steps: int
    num_preemptions: int
    num_prompt_tokens: int  # prompt tokens admitted (each request once, not per preemption)
    num_cached_prompt_tokens: int  # of which prefix-cache hits
    num_generation_tokens: int  # tokens sampled and handed out
    finished: dict  # finish reason ("stop", "length", "abort", "error") -> requests

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the KV blocks in use by requests, in [0, 1]."""
        return 1.0 - self.num_free_kv_blocks / self.num_kv_blocks if self.num_kv_blocks else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens served by the prefix cache / prompt tokens admitted (0 before any)."""
        return self.num_cached_prompt_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0


@dataclass
class StepTiming:
    """Where the last step's time went: host preparation (scheduler, block manager, inputs)
    versus the model and sampler up to the host sync."""

    host_s: float
    model_s: float
    num_seqs: int
    num_tokens: int


class _State:
    """The engine's per-request state beside the scheduler's `Request`: sampling and text."""

    def __init__(self, params: SamplingParams, generator, detok, stop_ids: frozenset[int]):
        self.params, self.generator, self.detok, self.stop_ids = params, generator, detok, stop_ids
        self.hold = max((len(s) for s in params.stop), default=1) - 1  # chars a stop could claim
        self.text = ""
        self.emitted = 0
        self.error: str | None = None
        self.t_arrival = time.perf_counter()
        self.t_first: float | None = None

    def add_text(self, piece: str) -> bool:
        """Append decoded text; True (and cut) at the first stop string."""
        if not piece:
            return False
        start = max(0, len(self.text) - self.hold)  # a stop may straddle old and new text
        self.text += piece
        cut = min((i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return True
        return False

    def take_text(self, finished: bool) -> str:
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.hold)
        piece = self.text[self.emitted:end]
        self.emitted = end
        return piece


class Engine:
    """The synchronous engine core: `add_request`, `step`, `abort`, `has_unfinished_requests`.

    ``model``: a registry name, a Hugging Face folder, a ``.gguf`` file, or a `LoadedModel`.
    ``device``/``dtype``/``backend``/``keep_quantized`` as in `LLM`; ``cuda_graphs``: replay
    decode-only steps from CUDA graphs (`engine.cuda_graphs`; None: on for CUDA with the Triton
    kernels); the rest are `EngineArgs`. Not thread-safe: one thread drives it (`AsyncEngine` does for asyncio).
    """

    def __init__(self, model: str | os.PathLike | LoadedModel = DEFAULT_MODEL, *, device=None,
                 dtype: torch.dtype | None = None, backend: str | None = None,
                 keep_quantized: bool | None = None, cuda_graphs: bool | None = None, block_manager_cls=None,
                 **engine_args):
        unknown = set(engine_args) - set(EngineArgs.names())
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(sorted(unknown))} "
                            f"(engine arguments: {', '.join(EngineArgs.names())})")
        args = EngineArgs(**engine_args)
        self.tp = None
        if args.tensor_parallel_size > 1:
            if isinstance(model, LoadedModel):
                raise ValueError("tensor_parallel_size > 1 needs a model name or path (every rank loads its slice)")
            if cuda_graphs:
                raise ValueError("cuda_graphs=True with tensor_parallel_size > 1: the collectives are not captured "
                                 "in CUDA graphs yet")
            cuda_graphs = False
            from .tp_executor import TPExecutor, run_worker, worker_rank

            load_kw = dict(dtype=dtype, backend=backend, keep_quantized=keep_quantized)
            if worker_rank(args.tensor_parallel_size) is not None:
                # a rank other than 0 of torchrun's group: serve rank 0's steps, then leave, so the
                # rest of the caller's script (the outputs) runs on rank 0 only
                run_worker(model, args.tensor_parallel_size, load_kw, device=device, backend=args.distributed_backend)
                raise SystemExit(0)
            self.tp = TPExecutor(model, args.tensor_parallel_size, load_kw, device=device,
                                 backend=args.distributed_backend)
            self.loaded = self.tp.loaded
        else:
            self.loaded = model if isinstance(model, LoadedModel) else load_model(
                model, device=device, dtype=dtype, backend=backend, keep_quantized=keep_quantized)
        lm = self.loaded
        self.model, self.config, self.tokenizer = lm.model, lm.config, lm.tokenizer
        if self.tp is not None:
            self.model = self.tp.model  # broadcasts each step to the workers first
        self.device = lm.device
        c = self.config
        kv_heads = getattr(self.model, "num_kv_heads", c.num_kv_heads)  # this rank's, under TP

        kv_dtype = _kv_dtype(args.kv_cache_dtype, self.model, lm.dtype, self.tp is not None)
        per_block = kv_bytes_per_block(c.num_layers, kv_heads, c.head_dim, args.block_size, kv_dtype)
        num_blocks = args.num_kv_blocks
        if num_blocks is None:
            memory = args.kv_cache_memory
            if memory is None:
                memory = (int(torch.cuda.mem_get_info(self.device)[0] * GPU_MEMORY_UTILIZATION)
                          if self.device.type == "cuda" else CPU_KV_CACHE_MEMORY)
            num_blocks = memory // per_block
            if num_blocks < 1:
                raise ValueError(f"kv_cache_memory={memory} bytes holds no KV block ({per_block} bytes each)")
        max_slots = 2**31 // args.block_size
        if num_blocks > max_slots:
            raise ValueError(f"num_kv_blocks={num_blocks} x block_size={args.block_size} exceeds 2**31 slots")
        check_memory(f"the KV cache ({num_blocks} blocks of {args.block_size} tokens)", num_blocks * per_block,
                     self.device, hint="lower num_kv_blocks / kv_cache_memory")
        capacity = num_blocks * args.block_size
        max_len = args.max_model_len
        limit = min(c.max_position_embeddings, capacity)
        if max_len is None:
            max_len = limit
        elif max_len > c.max_position_embeddings:
            raise ValueError(f"max_model_len={max_len} exceeds the model's context "
                             f"(max_position_embeddings={c.max_position_embeddings})")
        elif max_len > capacity:
            raise ValueError(f"max_model_len={max_len} tokens do not fit the KV cache of {capacity} tokens "
                             f"({num_blocks} blocks of {args.block_size}); raise num_kv_blocks/kv_cache_memory")
        batched = args.max_num_batched_tokens or (2048 if self.device.type == "cuda" else 512)
        self.args = args
        self.max_model_len = max_len
        self.model.setup_rope(max_len)
        if self.tp is not None:
            self.tp.setup(num_blocks, args.block_size, max_len)
        self.kv = KVCacheManager(num_layers=c.num_layers, num_kv_heads=kv_heads, head_dim=c.head_dim,
                                 num_blocks=num_blocks, block_size=args.block_size, dtype=kv_dtype,
                                 device=self.device, enable_prefix_caching=args.enable_prefix_caching,
                                 block_manager_cls=block_manager_cls)
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and lm.backend != "torch"
        self.runner = StepRunner(self.model, self.kv.k, self.kv.v, max_num_seqs=args.max_num_seqs,
                                 max_blocks_per_seq=-(-max_len // args.block_size), graphs=bool(cuda_graphs))
        self.last_step: StepTiming | None = None
        self._finished: dict[str, int] = {}
        self._num_generation_tokens = 0
        self.scheduler = Scheduler(self.kv.block_manager, max_num_seqs=args.max_num_seqs,
                                   max_num_batched_tokens=batched, max_model_len=max_len,
                                   enable_chunked_prefill=args.enable_chunked_prefill)
        _log.info("KV cache: %d blocks of %d tokens = %d tokens (%.1f MiB, %s); at max_model_len=%d that is "
                  "%.2fx concurrency", num_blocks, args.block_size, capacity, num_blocks * per_block / 2**20,
                  str(kv_dtype).removeprefix("torch."), max_len, capacity / max_len)

    # ------------------------------------------------------------------ public API

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv.capacity_tokens

    def encode_prompt(self, prompt: str | Sequence[int], what: str = "prompt") -> list[int]:
        """Token ids of a prompt (str through the tokenizer, or a list of ids, checked)."""
        V = self.config.vocab_size
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model {self.loaded.name!r} has no tokenizer: give {what} as token ids")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
                raise ValueError(f"{what} as a tensor must be 1-D integer token ids, got "
                                 f"{prompt.dtype} of shape {tuple(prompt.shape)}")
            ids = prompt.tolist()
        elif isinstance(prompt, (list, tuple)):
            for t in prompt:
                if not isinstance(t, int) or isinstance(t, bool):
                    raise ValueError(f"{what} has token id {t!r}: token ids must be ints")
            ids = list(prompt)
        else:
            raise TypeError(f"{what} must be a str or a list of token ids, got {type(prompt).__name__}")
        for t in ids:
            if not 0 <= t < V:
                raise ValueError(f"{what} has token id {t} outside the vocabulary [0, {V})")
        if not ids:
            raise ValueError(f"{what} is empty (no tokens)")
        return ids

    def check_length(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """ValueError, with the numbers, when prompt + max_tokens exceed ``max_model_len``
        (`add_request` itself cuts such a request at max_model_len with "length", as vLLM's LLM;
        front ends that would rather refuse it, the CLI and the server, call this first)."""
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise ValueError(f"the prompt's {num_prompt_tokens} tokens + max_tokens={max_tokens} = "
                             f"{num_prompt_tokens + max_tokens} exceed max_model_len={self.max_model_len}")

    def add_request(self, request_id: str, prompt: str | Sequence[int],
                    params: SamplingParams | None = None) -> None:
        """Queue a request; ``ValueError`` (with the numbers) for one that could never run."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
        ids = self.encode_prompt(prompt)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos
                                                       else self.loaded.eos_token_ids)
        detok = self.tokenizer.detokenizer(skip_special_tokens=True) if self.tokenizer else None
        state = _State(params, params.make_generator(self.device), detok, stop_ids)
        self.scheduler.add(Request(request_id, ids, params.max_tokens, data=state))

    def abort(self, request_id: str) -> bool:
        """End a request now and free its blocks; False if it is unknown or already over."""
        return self.abort_with_output(request_id) is not None

    def abort_with_output(self, request_id: str) -> RequestOutput | None:
        """`abort`, returning the request's last `RequestOutput` (finished, finish_reason
        "abort", the text so far); None if it is unknown or already over."""
        r = self.scheduler.finish(request_id, "abort")
        if r is None:
            return None
        self._count_finished("abort")
        return self._output(r, [], "abort", time.perf_counter())

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.scheduler.requests)

    @property
    def stats(self) -> EngineStats:
        """A snapshot: running / waiting counts, the KV pool, prefix hits, preemptions, tokens,
        finished requests by reason (`EngineStats`)."""
        sch, bm = self.scheduler, self.kv.block_manager
        st = sch.stats
        return EngineStats(
            num_running=len(sch.running), num_waiting=len(sch.waiting), num_kv_blocks=bm.num_blocks,
            num_free_kv_blocks=bm.num_free_blocks, num_steps=st.num_steps, num_preemptions=st.num_preemptions,
            num_prompt_tokens=st.num_prompt_tokens, num_cached_prompt_tokens=st.num_cached_prompt_tokens,
            num_generation_tokens=self._num_generation_tokens, finished=dict(self._finished))

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (also done at exit); idempotent."""
        if self.tp is not None:
            self.tp.close()

    def step(self) -> list[RequestOutput]:
        """Run one model step; the outputs of every request that produced a token."""
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        self.kv.copy_blocks(out.copies)
        if self.tp is not None:
            self.tp.copy_blocks(out.copies)
        inp = self.kv.prepare(out)
        t1 = time.perf_counter()
        try:
            logits = self.runner.run(inp, out.is_decode_only)  # (S, vocab)
        except Exception:
            # Blocks of this step were registered for prefix hits but may not hold their K/V.
            self._reset_after_failure()
            raise
        reqs = [s.request for s in out.scheduled if s.samples]
        if not reqs:
            self.scheduler.update(out, {})
            return []
        states = [r.data for r in reqs]
        penalize = any(st.params.repetition_penalty != 1.0 for st in states)
        prev = [r.tokens(0, r.num_tokens) for r in reqs] if penalize else None
        outs = [r.output_token_ids for r in reqs] if any(st.params.penalizes_output for st in states) else None
        gens = [st.generator for st in states]
        # all unseeded: one draw from the default generator, not a per-row loop
        tokens = sample(logits, [st.params for st in states], gens if any(g is not None for g in gens) else None,
                        prev, outs)
        # Non-finite logits give -1 on the same sync as the tokens (no extra host round trip). A
        # float32 row sum is finite iff every logit is (short of |sum| > 3e38): one pass and no
        # (S, vocab) temporaries, where isfinite().all() made three.
        tokens = torch.where(torch.isfinite(logits.sum(dim=-1, dtype=torch.float32)), tokens, -1)
        host = tokens.tolist()  # the one host sync of the step
        now = time.perf_counter()
        logprobs = self._logprobs(logits, tokens, reqs)
        sampled = {r.request_id: max(t, 0) for r, t in zip(reqs, host)}
        self.scheduler.update(out, sampled)
        results = []
        for r, t in zip(reqs, host):
            st = r.data
            if st.t_first is None:
                st.t_first = now
            reason = None
            if t < 0:
                r.output_token_ids.pop()
                reason, st.error = "error", (f"the model's logits turned non-finite (NaN or inf) at output "
                                             f"token {len(r.output_token_ids)}; generation of this request "
                                             "stopped (broken weights or config?)")
            elif t in st.stop_ids:
                reason = "stop"
                if st.detok is not None:
                    st.add_text(st.detok.flush())
            else:
                if st.detok is not None and st.add_text(st.detok.push(t)):
                    reason = "stop"
                if reason is None and (len(r.output_token_ids) >= r.max_tokens or r.num_tokens >= self.max_model_len):
                    if st.detok is not None and st.add_text(st.detok.flush()):
                        reason = "stop"
                    else:
                        reason = "length"
            if reason is not None:
                self.scheduler.finish(r.request_id, reason)
                self._count_finished(reason)
            res = self._output(r, [t] if t >= 0 else [], reason, now)
            if st.params.logprobs is not None:
                res.new_logprobs = [logprobs[r.request_id]] if t >= 0 else []
            self._num_generation_tokens += t >= 0
            results.append(res)
        # host work = scheduling + inputs before the model, output processing after the sync
        self.last_step = StepTiming(t1 - t0 + time.perf_counter() - now, now - t1, len(out.scheduled),
                                    out.num_batched_tokens)
        return results

    # ------------------------------------------------------------------ internals

    def _count_finished(self, reason: str) -> None:
        self._finished[reason] = self._finished.get(reason, 0) + 1

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, reqs: list[Request]) -> dict:
        """request id -> TokenLogprob of its sampled token, for the rows that asked (after the
        step's sync: one more small copy, none when nobody asked)."""
        rows = [i for i, r in enumerate(reqs) if r.data.params.logprobs is not None]
        if not rows:
            return {}
        k = max(reqs[i].data.params.logprobs for i in rows)
        idx = torch.tensor(rows, device=logits.device)
        got = token_logprobs(logits.index_select(0, idx), tokens.index_select(0, idx), k)
        return {reqs[i].request_id: TokenLogprob(g.token_id, g.logprob, g.top[:reqs[i].data.params.logprobs])
                for i, g in zip(rows, got)}

    def _output(self, r: Request, new_ids: list[int], reason: str | None, now: float) -> RequestOutput:
        st = r.data
        return RequestOutput(
            request_id=r.request_id, new_token_ids=new_ids, new_text=st.take_text(reason is not None),
            token_ids=list(r.output_token_ids), text=st.text, finished=reason is not None,
            finish_reason=reason, prompt_token_ids=r.prompt_token_ids, num_cached_tokens=r.num_cached_tokens,
            error=st.error,
            metrics={"arrival": st.t_arrival, "first_token": st.t_first, "now": now,
                     "num_preemptions": r.num_preemptions},
        )

    def _reset_after_failure(self) -> None:
        """After a failed model step: drop the prefix cache (it may name unwritten blocks) and
        put every request back to be recomputed from scratch."""
        sched = self.scheduler
        bm_cls = type(self.kv.block_manager)
        self.kv.block_manager = bm_cls(self.kv.num_blocks, self.kv.block_size, self.args.enable_prefix_caching)
        sched.bm = self.kv.block_manager
        for r in reversed(sched.running):
            r.seq_id, r.num_computed_tokens = -1, 0
            r.status = type(r.status).WAITING
            sched.waiting.appendleft(r)
        sched.running.clear()


def _kv_dtype(name: str, model, model_dtype: torch.dtype, tensor_parallel: bool) -> torch.dtype:
    """The pools' dtype for ``kv_cache_dtype=name`` (EngineArgs); ValueError where the model's
    layers cannot store K/V in it."""
    dtype = model_dtype if name == "auto" else getattr(torch, name)
    if dtype == model_dtype:
        return dtype
    from genfuse.runtime.models.cpu_layer import decoder

    if dtype == torch.float16 and model_dtype == torch.float32 and not tensor_parallel and decoder(model) is not None:
        return dtype
    raise ValueError(f"kv_cache_dtype={name!r} differs from the model's {str(model_dtype).removeprefix('torch.')}: "
                     "only the fused CPU layers (a Llama-family model with packed GGUF weights, float32, on CPU, "
                     "one process, GENFUSE_FUSED_LAYERS not 0) keep float16 K/V; use kv_cache_dtype='auto'")


def kv_cache_summary(config, dtype: torch.dtype, block_size: int = 16, memory: int = CPU_KV_CACHE_MEMORY) -> dict:
    """What the default CPU pool holds for a model (for `genfuse info`)."""
    per_block = kv_bytes_per_block(config.num_layers, config.num_kv_heads, config.head_dim, block_size, dtype)
    blocks = memory // per_block
    return {"kv_cache_memory": memory, "block_size": block_size, "num_kv_blocks": blocks,
            "tokens": blocks * block_size, "bytes_per_token": math.ceil(per_block / block_size)}
