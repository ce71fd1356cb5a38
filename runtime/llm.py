"""`LLM`: load a model by name, folder or .gguf and generate with it (batch, stream, chat).

    llm = LLM()                                        # smollm2-135m-instruct
    [c] = llm.generate("The capital of France is", SamplingParams(max_tokens=16, temperature=0))
    for piece in llm.stream("Once upon a time", SamplingParams(max_tokens=64)):
        print(piece, end="", flush=True)
    c = llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=64))

The loop is the serving engine's (`runtime.engine.Engine`, docs/architecture.md): every prompt
becomes a request; the engine batches them continuously over its paged KV cache (prefix
caching, chunked prefill, preemption when the cache is full), so any number of prompts runs in
bounded memory, and each completion comes back in input order. ``LLM(..., **engine_args)``
passes `EngineArgs` through (``block_size``, ``num_kv_blocks``/``kv_cache_memory``,
``max_num_seqs``, ``max_num_batched_tokens``, ``max_model_len``, ``kv_cache_dtype``,
``enable_prefix_caching``, ``enable_chunked_prefill``). A request runs to ``max_tokens`` or to
``max_model_len`` (then "length").

Ending: EOS ids (the config's and the tokenizer's, unless ``ignore_eos``) and ``stop_token_ids``
end a sequence with finish_reason "stop"; the id is in ``token_ids`` but not in ``text``. A stop
string ends it too and is cut from ``text`` (with whatever followed it in the same token).
``max_tokens`` ends it with "length". Text is decoded with special tokens skipped.

Failure: when a sequence's logits turn non-finite (NaN or inf: broken weights, a config that
makes the rotary tables NaN...) that sequence ends with finish_reason "error" and a message in
``Completion.error``; the other prompts of the batch go on. `LLM.stream` raises RuntimeError
instead, after the text decoded so far. The check rides on the step's one host sync: the
finiteness flags travel with the tokens.

Seeds: every prompt draws from its own generator (`SamplingParams.make_generator`), so a seeded
prompt gives the same tokens alone or batched with others (vLLM's per-request seed).

Threads: an `LLM` runs one request at a time (the KV cache, CUDA graphs and buffers are
shared); `generate`, `chat` and `stream` from several threads wait for each other. A stream
holds the LLM from its first piece until it is exhausted, closed or garbage-collected; calling
the LLM from the thread that holds an open stream raises RuntimeError (waiting would deadlock).

Memory: the engine's KV pool is sized once (EngineArgs) and checked against the device's free
memory before it is allocated (`runtime.resources`); ``max_model_len`` never exceeds the pool, so
``max_tokens=10**9`` on a model claiming a huge context ends with "length" at the pool's size
instead of attempting terabytes.
"""
from __future__ import annotations

import contextlib
import itertools
import numbers
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .engine import Engine, RequestOutput
from .loader import load_model
from .registry import DEFAULT_MODEL
from .sampling import SamplingParams
from .threads import check_threads, kernel_threads, set_threads
from .tokenizer import Tokenizer


@dataclass
class Completion:
    """One prompt's result: the generated text and ids, why it ended, and timings."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "error" (then `error` says why)
    ttft_s: float  # time to first token, from the start of the generate call
    tokens_per_s: float  # generated tokens / seconds from the call's start to this one's end
    prompt_token_ids: list[int] | None = None
    error: str | None = None  # with finish_reason "error": what went wrong


class LLM:
    """A language model on genfuse kernels with its tokenizer.

    ``model``: a registry name (default ``"smollm2-135m-instruct"``), a Hugging Face model
    folder or a ``.gguf`` file. ``device``: default CUDA when available, else CPU. ``dtype``:
    default bfloat16 on CUDA, float32 on CPU. ``backend``: the kernels' backend (None picks
    Triton on CUDA / under TRITON_INTERPRET, torch otherwise; "torch" forces the references).
    ``cuda_graphs``: replay decode steps from CUDA graphs (`runtime.engine.cuda_graphs`, decode-only steps); None turns
    them on for CUDA with the Triton kernels, False turns them off, True insists (an error
    elsewhere). ``self.runner`` runs the decode steps. ``keep_quantized``: for a GGUF file,
    keep its Q4_0 / Q4_1 / Q8_0 matrices in their blocks and multiply with genfuse's C++ CPU
    kernels (`runtime.quant`: ~5x fewer bytes read per decoded token, float32 sums); None
    turns it on where it applies (CPU, float32, the torch ops rather than the Triton
    interpreter), False dequantizes everything to ``dtype`` at load, True insists (an error
    where it does not apply).
    ``threads``: CPU threads for genfuse's kernels (`runtime.threads`; process-wide; None keeps
    the current setting, by default the physical cores). With packed weights on the CPU, torch's
    intra-op threads are set to 1 as well (the kernels do the heavy work on their own pool; the
    per-token torch ops are too small to split, and OpenMP's spinning threads would take the
    cores from the pool); for a dense CPU model torch gets ``threads`` when it is given. Under
    tensor parallelism the count is per rank (every worker takes rank 0's with each step), and
    for ranks started here on the CPU the default is the physical cores split among them.
    """

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, backend: str | None = None, cuda_graphs: bool | None = None,
                 keep_quantized: bool | None = None, threads: int | None = None, **engine_args):
        check_threads(threads)  # before the load: a bad value fails fast
        if engine_args.get("tensor_parallel_size", 1) not in (1, None):  # every rank loads its own slice
            self.engine = Engine(model, device=device, dtype=dtype, backend=backend, keep_quantized=keep_quantized,
                                 cuda_graphs=cuda_graphs, **engine_args)
            loaded = self.engine.loaded
        else:
            loaded = load_model(model, device=device, dtype=dtype, backend=backend, keep_quantized=keep_quantized)
            self.engine = Engine(loaded, cuda_graphs=cuda_graphs, **engine_args)
        self.runner = self.engine.runner
        self.name, self.device, self.dtype = loaded.name, loaded.device, loaded.dtype
        self.config, self.model = loaded.config, loaded.model
        self.keep_quantized = loaded.keep_quantized
        self.eos_token_ids = loaded.eos_token_ids
        self.last_completion: Completion | None = None  # set by `stream` when it ends
        self._lock = _RequestLock()
        self._ids = itertools.count()
        self.set_threads(threads)

    def set_threads(self, threads: int | None) -> None:
        """CPU threads for genfuse's kernels and torch's intra-op threads (see the class doc)."""
        if self.device.type != "cpu":
            check_threads(threads)
            return
        if self.keep_quantized:
            set_threads(threads if threads is not None else kernel_threads(), torch_threads=1)
        else:
            set_threads(threads if threads is not None else kernel_threads(), torch_threads=threads)

    @property
    def threads(self) -> int:
        """The CPU threads genfuse's kernels use now."""
        return kernel_threads()

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The model's tokenizer (None for a GGUF without one: prompts are then token ids)."""
        return self.engine.tokenizer

    @tokenizer.setter
    def tokenizer(self, tok: Tokenizer | None) -> None:
        self.engine.tokenizer = tok

    # ------------------------------------------------------------------ public API

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool | None = None) -> list[Completion]:
        """Complete each prompt (a str or a list of token ids); one Completion each, in order.

        ``params``: one `SamplingParams` for all, or one per prompt. ``use_tqdm``: a progress bar
        (default: on for more than one prompt, as vLLM). A prompt whose logits turn non-finite
        ends with finish_reason "error" (see ``error``); the others go on."""
        batch = self._encode_prompts(prompts)
        if isinstance(params, (list, tuple)):
            if len(params) != len(batch):
                raise ValueError(f"got {len(params)} SamplingParams for {len(batch)} prompts")
            per = [_check_params(p) for p in params]
        else:
            per = [_check_params(params)] * len(batch)
        with self._lock.hold("generate"):
            t0 = time.perf_counter()
            rids = self._add(batch, per)
            done: dict[str, Completion] = {}
            bar = tqdm(total=len(batch), desc="generate", unit="prompt",
                       disable=not (use_tqdm if use_tqdm is not None else len(batch) > 1))
            try:
                index = {rid: i for i, rid in enumerate(rids)}
                while self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        if out.finished:
                            done[out.request_id] = _completion(out, t0, f"prompt {index[out.request_id]}")
                            bar.update(1)
            finally:
                bar.close()
                self._abort_rest(rids, done)
        return [done[r] for r in rids]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion of one prompt as text pieces, as tokens are decoded.

        The prompt and params are checked at once; the LLM is held from the first piece until
        the iterator is exhausted, closed or dropped. Once exhausted, ``self.last_completion``
        holds its `Completion`. RuntimeError when the logits turn non-finite (after the pieces
        decoded before)."""
        params = _check_params(params)
        if not isinstance(prompt, (str, list, tuple, torch.Tensor)):
            raise TypeError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        batch = self._encode_prompts([prompt])
        return self._stream(batch, params)

    def chat(self, messages: Sequence[dict], params: SamplingParams | None = None) -> Completion:
        """Reply to ``messages`` ([{"role", "content"}, ...]) through the model's chat template."""
        return self.generate([self.chat_prompt(messages)], params)[0]

    def chat_prompt(self, messages: Sequence[dict]) -> list[int]:
        """The token ids of ``messages`` rendered with the chat template, ready to generate from."""
        tok = self._need_tokenizer("chat")
        return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)

    # ------------------------------------------------------------------ internals

    def _stream(self, batch: list[list[int]], params: SamplingParams) -> Iterator[str]:
        with self._lock.hold("stream"):
            t0 = time.perf_counter()
            [rid] = self._add(batch, [params])
            done: dict[str, Completion] = {}
            try:
                while rid not in done:
                    for out in self.engine.step():
                        if out.new_text:
                            yield out.new_text
                        if out.finished:
                            done[rid] = _completion(out, t0, "the prompt")
            finally:  # a stream closed or dropped mid-way frees its request before the lock goes
                self._abort_rest([rid], done)
            self.last_completion = c = done[rid]
        if c.finish_reason == "error":
            raise RuntimeError(c.error)

    def _add(self, batch: list[list[int]], params: list[SamplingParams]) -> list[str]:
        """Hand the prompts to the engine; on a refusal, take back the ones already added."""
        rids = []
        try:
            for i, (ids, p) in enumerate(zip(batch, params)):
                rid = f"{next(self._ids)}"
                try:
                    self.engine.add_request(rid, ids, p)
                except ValueError as e:
                    raise ValueError(f"prompt {i}: {e}") if len(batch) > 1 else e from None
                rids.append(rid)
        except BaseException:
            for rid in rids:
                self.engine.abort(rid)
            raise
        return rids

    def _abort_rest(self, rids: list[str], done: dict) -> None:
        for rid in rids:
            if rid not in done:
                self.engine.abort(rid)

    def _need_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"model {self.name!r} has no tokenizer (no tokenizer.json): {what} needs one; "
                             "pass prompts as lists of token ids instead")
        return self.tokenizer

    def _encode_prompts(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        elif isinstance(prompts, torch.Tensor):
            if prompts.dim() not in (1, 2):
                raise ValueError(f"a tensor of prompts must be (T,) or (B, T) token ids, got shape {tuple(prompts.shape)}")
            prompts = [prompts] if prompts.dim() == 1 else list(prompts)
        else:
            try:
                prompts = list(prompts)
            except TypeError:
                raise TypeError(f"prompts must be a str, a list of token ids or a list of those, "
                                f"got {type(prompts).__name__}") from None
            if prompts and not any(isinstance(p, (str, list, tuple, torch.Tensor)) for p in prompts):
                prompts = [prompts]  # one prompt given as token ids
        if not prompts:
            raise ValueError("no prompts given")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                ids = self._need_tokenizer("a text prompt").encode(p)
            elif isinstance(p, (list, tuple, torch.Tensor)):
                ids = self._token_ids(i, p)
            else:
                raise TypeError(f"prompt {i} must be a str or a list of token ids, got {type(p).__name__}")
            if not ids:
                raise ValueError(f"prompt {i} is empty (no tokens)")
            out.append(ids)
        return out

    def _token_ids(self, i: int, p) -> list[int]:
        """Prompt ``i``'s token ids, each an int in [0, vocab): 1.9, "2" or True are refused, not
        converted (int() would silently truncate and parse them)."""
        if isinstance(p, torch.Tensor):
            if p.dim() != 1:
                raise ValueError(f"prompt {i} must be a 1-D tensor of token ids, got shape {tuple(p.shape)}")
            if p.dtype == torch.bool or p.is_floating_point() or p.is_complex():
                raise TypeError(f"prompt {i}: token ids must be integers, got a {p.dtype} tensor")
            p = p.tolist()
        V = self.config.vocab_size
        ids = []
        for j, t in enumerate(p):
            if not isinstance(t, numbers.Integral) or isinstance(t, bool):
                raise TypeError(f"prompt {i}: token ids must be ints, got {t!r} ({type(t).__name__}) at index {j}")
            if not 0 <= t < V:
                raise ValueError(f"prompt {i} has token id {t} outside the vocabulary [0, {V})")
            ids.append(int(t))
        return ids


def _completion(out: RequestOutput, t0: float, name: str) -> Completion:
    """A finished request's `Completion`; times from the call's start ``t0``; ``name`` for errors."""
    m = out.metrics
    end = m["now"] - t0
    return Completion(text=out.text, token_ids=list(out.token_ids), finish_reason=out.finish_reason,
                      ttft_s=(m["first_token"] - t0) if m["first_token"] is not None else end,
                      tokens_per_s=len(out.token_ids) / end if end > 0 else 0.0,
                      prompt_token_ids=list(out.prompt_token_ids),
                      error=f"{name}: {out.error}" if out.error else None)


def _check_params(params) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    return params


class _RequestLock:
    """One request at a time on an LLM. A plain Lock, not an RLock: a stream dropped by one
    thread is finalized (and releases it) in whichever thread collects it. The owner's id turns
    a call from the thread already holding it, which would wait forever, into an error."""

    def __init__(self):
        self._lock = threading.Lock()
        self._owner: int | None = None  # threading.get_ident() of the holder

    @contextlib.contextmanager
    def hold(self, what: str):
        if self._owner == threading.get_ident():  # only this thread can have set its own id
            raise RuntimeError(f"LLM.{what} called while this thread has an LLM.stream open on the same "
                               "LLM (one request runs at a time): exhaust or close() the stream first")
        self._lock.acquire()
        self._owner = threading.get_ident()
        try:
            yield
        finally:
            self._owner = None
            self._lock.release()
