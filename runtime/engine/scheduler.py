"""The scheduler: which tokens of which requests run in the next model step.

No tensors here, only token ids, counts and block ids (docs/architecture.md, "Engine").
The shape follows vLLM v1's ``core/sched/scheduler.py``: there is no "prefill phase" and
"decode phase"; every request simply has ``num_tokens`` (prompt + generated so far) of which
``num_computed_tokens`` already have their K/V in the cache, and each step gives some
requests some of their missing tokens.

The spec
--------
* **One token budget per step**: at most ``max_num_batched_tokens`` tokens, at most
  ``max_num_seqs`` requests running.
* **Running requests first**, oldest first. A request that is decoding has one missing
  token (the one sampled last step); one still prefilling has the rest of its prompt, cut
  to the budget left (``enable_chunked_prefill``; without it a prompt that does not fit the
  budget whole waits for a later step, and a prompt longer than the budget is refused at
  ``add_request``).
* Their blocks are extended in the block manager before the step. When the pool runs out,
  the **newest** running request is preempted: its blocks are freed, its computed count goes
  back to 0 and it goes to the front of the waiting queue, to be recomputed later (its full
  blocks stay cached, so the recomputation mostly hits the prefix cache). If the request
  being scheduled is itself the newest, it is the one preempted. No new request is admitted
  in a step that preempted.
* **Then waiting requests, first come first served**, while budget and seats last: each
  first takes its prefix-cache hits (``cached_prefix_length``: whole blocks, never the last
  token), then as many of its remaining tokens as the budget allows. A request whose first
  chunk does not fit in the free blocks stops admission (FCFS: nothing overtakes it).
* A block is only registered for prefix hits once its tokens are scheduled, and scheduled
  tokens are always computed in that step (the model writes every layer's K/V before it
  reads any), so a prefix hit never reads a block that was not written.
* **After the step** (`update`): each scheduled request's computed count advances by its
  scheduled tokens; a request whose computed count reaches ``num_tokens`` had its last
  token's logits sampled, and the new token is appended to it. Stopping is decided by the
  engine (stop strings need text) and reported back with `finish`.

Every request ends exactly once (finished, aborted), and then its blocks are free. Requests
are identified by the engine's string ids; the block manager sees small integer ids.
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One request's token state (the engine keeps its text and sampling state beside it)."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    arrival: int = 0  # admission order, for FCFS
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    num_cached_tokens: int = 0  # prefix-cache hits at its (last) admission
    num_preemptions: int = 0
    seq_id: int = -1  # the block manager's id while it holds blocks
    data: Any = None  # the engine's per-request state, opaque here

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token(self, i: int) -> int:
        p = self.prompt_token_ids
        return p[i] if i < len(p) else self.output_token_ids[i - len(p)]

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids ``start:end`` of prompt + output."""
        p, n = self.prompt_token_ids, len(self.prompt_token_ids)
        if end <= n:
            return p[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return p[start:] + self.output_token_ids[:end - n]


@dataclass
class ScheduledRequest:
    request: Request
    start: int  # position of the first scheduled token (= num_computed_tokens before the step)
    num_tokens: int  # tokens scheduled this step

    @property
    def samples(self) -> bool:
        """Does this step compute the request's last token, so its logits are sampled?"""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # in batch order: running first, then newly admitted
    num_batched_tokens: int
    preempted: list[Request]
    copies: list[tuple[int, int]]  # copy-on-write block copies to do before the step

    @property
    def is_decode_only(self) -> bool:
        return all(s.num_tokens == 1 and s.samples for s in self.scheduled)


@dataclass
class SchedulerStats:
    num_steps: int = 0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0  # prompt tokens admitted
    num_cached_prompt_tokens: int = 0  # of which prefix-cache hits


class Scheduler:
    """Continuous batching over a block manager (``genfuse._C.BlockManager`` or its twin)."""

    def __init__(self, block_manager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, enable_chunked_prefill: bool = True):
        self.bm = block_manager
        self.block_size = block_manager.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerStats()
        self._arrivals = 0
        self._next_seq_id = 0

    # ------------------------------------------------------------------ requests in and out

    def check_prompt(self, n: int) -> None:
        """Refuse, with the numbers, a prompt of ``n`` tokens that could never run."""
        if n < 1:
            raise ValueError("the prompt is empty (no tokens)")
        if n >= self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens but max_model_len={self.max_model_len} leaves "
                             f"room for at most {self.max_model_len - 1} (one token must be generated)")
        blocks = -(-(n + 1) // self.block_size)
        if blocks > self.bm.num_blocks:
            raise ValueError(f"the prompt needs {blocks} KV blocks of {self.block_size} tokens but the "
                             f"whole cache holds {self.bm.num_blocks}")
        if not self.enable_chunked_prefill and n > self.max_num_batched_tokens:
            raise ValueError(f"the prompt has {n} tokens, more than max_num_batched_tokens="
                             f"{self.max_num_batched_tokens}, and chunked prefill is off")

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.check_prompt(len(request.prompt_token_ids))
        # A request never grows past max_model_len (it finishes with "length" there).
        request.max_tokens = min(request.max_tokens, self.max_model_len - len(request.prompt_token_ids))
        request.arrival = self._arrivals
        self._arrivals += 1
        request.status = Status.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish(self, request_id: str, reason: str) -> Request | None:
        """End a request (stop, length, abort, error): free its blocks at once. None if unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req.status is Status.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._free(req)
        req.status, req.finish_reason = Status.FINISHED, reason
        return req

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ one step

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        copies: list[tuple[int, int]] = []

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            start = req.num_computed_tokens
            n = min(req.num_tokens - start, budget)
            if not self.enable_chunked_prefill and n < req.num_tokens - start:
                i += 1  # the rest of its prompt does not fit this step
                continue
            new = req.tokens(self.bm.num_tokens(req.seq_id), start + n)  # tokens not yet in blocks
            while True:
                try:
                    copies += self.bm.extend(req.seq_id, new)
                    break
                except MemoryError:
                    victim = self.running[-1]
                    self._preempt(victim)
                    preempted.append(victim)
                    if victim is req:
                        break
            if req.status is not Status.RUNNING:
                break  # it preempted itself: everything after it is gone too
            scheduled.append(ScheduledRequest(req, start, n))
            budget -= n
            i += 1

        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            tokens = req.tokens(0, req.num_tokens)
            hits = self.bm.cached_prefix_length(tokens)
            n = min(req.num_tokens - hits, budget)
            if not self.enable_chunked_prefill and n < req.num_tokens - hits:
                break
            seq_id = self._next_seq_id
            try:
                got = self.bm.allocate(seq_id, tokens[:hits + n])
            except MemoryError:
                break
            if got != hits:  # cannot happen: nothing changed the cache in between
                raise RuntimeError(f"block manager returned {got} cached tokens, expected {hits}")
            self._next_seq_id += 1
            self.waiting.popleft()
            req.seq_id, req.num_computed_tokens, req.num_cached_tokens = seq_id, hits, hits
            req.status = Status.RUNNING
            self.running.append(req)
            if req.num_preemptions == 0:
                self.stats.num_prompt_tokens += len(req.prompt_token_ids)
                self.stats.num_cached_prompt_tokens += hits
            scheduled.append(ScheduledRequest(req, hits, n))
            budget -= n

        self.stats.num_steps += 1
        return SchedulerOutput(scheduled, self.max_num_batched_tokens - budget, preempted, copies)

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> None:
        """After the step: advance computed counts; append each sampled token to its request."""
        for s in output.scheduled:
            req = s.request
            if req.status is not Status.RUNNING:
                continue  # finished (aborted) while the step ran
            req.num_computed_tokens = s.start + s.num_tokens
            if s.samples:
                req.output_token_ids.append(sampled[req.request_id])

    # ------------------------------------------------------------------ internals

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.stats.num_preemptions += 1

    def _free(self, req: Request) -> None:
        if req.seq_id >= 0:
            self.bm.free(req.seq_id)
            req.seq_id = -1
