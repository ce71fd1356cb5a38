"""`LLM`: load a model by name, folder or .gguf and generate with it (batch, stream, chat).

    llm = LLM()                                        # smollm2-135m-instruct
    [c] = llm.generate("The capital of France is", SamplingParams(max_tokens=16, temperature=0))
    for piece in llm.stream("Once upon a time", SamplingParams(max_tokens=64)):
        print(piece, end="", flush=True)
    c = llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=64))

The loop: each prompt is prefilled on its own (its own cache row, positions from 0: no padding,
no masks), then the batch decodes together, one token per sequence per step, each at its own
position. The host syncs once per step, to hand the new tokens out (stop checks, streaming).
A sequence that has finished keeps its slot until the batch ends; its tokens are discarded.
On CUDA the decode step is replayed from a CUDA graph per batch-size bucket
(`runtime.cuda_graphs`): the batch is padded to the bucket and the padded rows' logits dropped.

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

Memory: the KV cache a request needs is checked against the device's free memory before it is
allocated (`runtime.resources`), so ``max_tokens=10**9`` on a model claiming a huge context
fails with a ValueError naming the cache instead of attempting terabytes.
"""
from __future__ import annotations

import contextlib
import numbers
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from genfuse.kernels._common import resolve_backend

from .config import load_config
from .cuda_graphs import DecodeRunner
from .gpt2 import GPT2
from .llama import BLOCK_SIZE, Llama
from .quant import can_pack
from .registry import DEFAULT_MODEL, resolve
from .resources import check_memory, resolve_device
from .sampling import SamplingParams, sample
from .tokenizer import Tokenizer, TokenizerNotFoundError
from .weights import load_weights


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


class _Seq:
    """Host-side state of one sequence in a batch."""

    def __init__(self, prompt_ids: list[int], detok, stops: tuple[str, ...]):
        self.prompt_ids = prompt_ids
        self.token_ids: list[int] = []
        self.detok = detok
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1  # chars a stop could still claim
        self.text = ""
        self.emitted = 0  # chars of text already handed out by stream
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.t_first = self.t_end = 0.0

    def add_text(self, piece: str) -> None:
        """Append decoded text; finish with "stop" at the first stop string, cutting it off."""
        if not piece:
            return
        start = max(0, len(self.text) - self.hold)  # a stop may straddle the old/new boundary
        self.text += piece
        cut = min((i for i in (self.text.find(s, start) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.finish_reason = "stop"

    def ready_text(self) -> str:
        """Text that can be shown now: all of it once finished, else minus a possible stop prefix."""
        end = len(self.text) if self.finish_reason else max(self.emitted, len(self.text) - self.hold)
        piece = self.text[self.emitted:end]
        self.emitted = end
        return piece


class LLM:
    """A language model on genfuse kernels with its tokenizer.

    ``model``: a registry name (default ``"smollm2-135m-instruct"``), a Hugging Face model
    folder or a ``.gguf`` file. ``device``: default CUDA when available, else CPU. ``dtype``:
    default bfloat16 on CUDA, float32 on CPU. ``backend``: the kernels' backend (None picks
    Triton on CUDA / under TRITON_INTERPRET, torch otherwise; "torch" forces the references).
    ``cuda_graphs``: replay decode steps from CUDA graphs (`runtime.cuda_graphs`); None turns
    them on for CUDA with the Triton kernels, False turns them off, True insists (an error
    elsewhere). ``self.runner`` runs the decode steps. ``keep_quantized``: for a GGUF file,
    keep its Q4_0 / Q4_1 / Q8_0 matrices in their blocks and multiply with genfuse's C++ CPU
    kernels (`runtime.quant`: ~5x fewer bytes read per decoded token, float32 sums); None
    turns it on where it applies (CPU, float32, the torch ops rather than the Triton
    interpreter), False dequantizes everything to ``dtype`` at load, True insists (an error
    where it does not apply).
    """

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, backend: str | None = None, cuda_graphs: bool | None = None,
                 keep_quantized: bool | None = None):
        resolved = resolve(model)
        self.name = resolved.name
        self.device = resolve_device(device)
        self.dtype = dtype if dtype is not None else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.config = load_config(resolved.path)
        packable = can_pack(self.device, self.dtype, resolve_backend(backend, torch.empty(0, device=self.device)))
        if keep_quantized and not packable:
            raise ValueError("keep_quantized=True needs the CPU, float32 and the torch ops (backend='torch', "
                             f"or None without TRITON_INTERPRET); got {self.device}, {self.dtype}, backend={backend!r}")
        self.keep_quantized = packable if keep_quantized is None else keep_quantized
        sd = load_weights(resolved.path, self.config, dtype=self.dtype, device=self.device,
                          packed=self.keep_quantized)
        family = GPT2 if self.config.arch == "gpt2" else Llama
        self.model = family.from_state_dict(self.config, sd, backend=backend)
        del sd
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and backend != "torch"
        self.runner = DecodeRunner(self.model, graphs=bool(cuda_graphs))
        try:
            self.tokenizer: Tokenizer | None = Tokenizer.load(resolved.path)
        except TokenizerNotFoundError:
            self.tokenizer = None  # token-id prompts still work
        eos = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.last_completion: Completion | None = None  # set by `stream` when it ends
        self._lock = _RequestLock()

    # ------------------------------------------------------------------ public API

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 params: SamplingParams | None = None) -> list[Completion]:
        """Complete each prompt (a str or a list of token ids) as one batch; one Completion each.

        A prompt whose logits turn non-finite ends with finish_reason "error" (see ``error``)."""
        params = _check_params(params)
        batch = self._encode_prompts(prompts)
        with self._lock.hold("generate"):
            seqs = None
            for seqs in self._run(batch, params):
                pass
        return [self._completion(s) for s in seqs]

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
            run = self._run(batch, params)
            try:
                for seqs in run:
                    piece = seqs[0].ready_text()
                    if piece:
                        yield piece
            finally:
                run.close()  # a stream closed or dropped mid-way ends its loop before the lock goes
            self.last_completion = c = self._completion(seqs[0])
        if c.finish_reason == "error":
            raise RuntimeError(c.error)

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

    def _check_cache_memory(self, batch: int, max_len: int, penalize: bool) -> None:
        """ValueError when the KV cache (plus rotary tables and penalty ids) for this request would
        not fit in the device's free memory; checked before anything is allocated."""
        c = self.config
        if max_len > c.max_position_embeddings:
            return  # the model's setup_cache refuses it, naming max_position_embeddings
        rows = self.runner.cache_rows(batch)
        cache = getattr(self.model, "cache", None)
        need = batch * max_len * 8 if penalize else 0  # the (B, width) int64 seen-ids tensor
        freed = 0
        if cache is None or cache.max_batch < rows or cache.max_len < max_len:
            # the layout of runtime.llama.KVCache: K and V per layer, max_len rounded up to blocks
            padded = -(-max_len // BLOCK_SIZE) * BLOCK_SIZE
            itemsize = torch.empty(0, dtype=self.dtype).element_size()
            need += 2 * c.num_layers * rows * padded * c.num_kv_heads * c.head_dim * itemsize
            if c.arch == "llama":
                need += 2 * padded * (c.head_dim // 2) * 4  # fp32 cos/sin tables
            if cache is not None:  # setup_cache frees the old cache first
                freed = cache.k.nbytes + cache.v.nbytes
        check_memory(f"the KV cache for {batch} sequence(s) of up to {max_len} tokens (prompt + max_tokens)",
                     need, self.device, freed=freed, hint="lower max_tokens or the number of prompts")

    def _run(self, batch: list[list[int]], params: SamplingParams) -> Iterator[list[_Seq]]:
        """The generation loop; yields the sequences after every step (streaming reads them)."""
        t0 = time.perf_counter()
        B, dev, model = len(batch), self.device, self.model
        penalize = params.repetition_penalty != 1.0
        max_len = max(len(p) for p in batch) + params.max_tokens
        self._check_cache_memory(B, max_len, penalize)
        self.runner.setup_cache(B, max_len)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        seqs = [_Seq(p, self.tokenizer.detokenizer(skip_special_tokens=True) if self.tokenizer else None,
                     params.stop) for p in batch]
        # one generator per sequence: a seed belongs to its request, whatever it is batched with
        generators = None if params.seed is None else [params.make_generator(dev) for _ in batch]
        if penalize:  # prompt + output ids, -1 padded: the repetition penalty's "seen" set
            prev = torch.full((B, max_len), -1, dtype=torch.int64, device=dev)
            for b, p in enumerate(batch):
                prev[b, :len(p)] = torch.tensor(p)
            prev_len = [len(p) for p in batch]

        logits = torch.cat([model.prefill(torch.tensor(p, device=dev), row=b) for b, p in enumerate(batch)])
        positions = torch.tensor([len(p) for p in batch], device=dev)  # where each next token goes
        for step in range(params.max_tokens):
            tokens = sample(logits, params, generators, prev if penalize else None)  # (B,)
            # -1 marks a row whose logits are not finite (sampling them would give token 0 forever);
            # computed on the device so that it crosses with the tokens, in the same sync
            flagged = torch.where(torch.isfinite(logits).all(dim=-1), tokens, -1)
            host = flagged.tolist()  # the one sync per step: hand the tokens out
            now = time.perf_counter()
            for b, (s, t) in enumerate(zip(seqs, host)):
                if s.finish_reason:
                    continue
                if step == 0:
                    s.t_first = now - t0
                if t < 0:
                    s.finish_reason = "error"
                    s.error = (f"prompt {b}: the model's logits turned non-finite (NaN or inf) at output token "
                               f"{step}; generation of this prompt stopped (broken weights or config?)")
                    s.t_end = now - t0
                    continue
                s.token_ids.append(t)
                if penalize:
                    prev[b, prev_len[b]] = t
                    prev_len[b] += 1
                if t in stop_ids:
                    s.finish_reason = "stop"
                    if s.detok is not None:  # text held back for an incomplete character
                        s.add_text(s.detok.flush())
                elif s.detok is not None:
                    s.add_text(s.detok.push(t))
                if not s.finish_reason and step == params.max_tokens - 1:
                    if s.detok is not None:
                        s.add_text(s.detok.flush())
                    if not s.finish_reason:
                        s.finish_reason = "length"
                if s.finish_reason:
                    s.t_end = now - t0
            yield seqs
            if all(s.finish_reason for s in seqs):
                return
            logits = self.runner.decode(tokens, positions)  # (B, vocab)
            positions += 1

    def _completion(self, s: _Seq) -> Completion:
        n = len(s.token_ids)
        return Completion(text=s.text, token_ids=list(s.token_ids), finish_reason=s.finish_reason or "length",
                          ttft_s=s.t_first, tokens_per_s=n / s.t_end if s.t_end > 0 else 0.0,
                          prompt_token_ids=list(s.prompt_ids), error=s.error)


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
