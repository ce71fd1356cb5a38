"""One HTTP request's generation: its engine requests (prompts x n choices) merged into one
stream of outputs, the OpenAI response bodies and SSE chunks built from them, the deadline of
``--request-timeout``, and the engine's refusals turned into 400s."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..sampling import SamplingParams
from . import protocol
from .errors import APIError, bad_request, server_error
from .state import ServerState

_log = logging.getLogger("genfuse.server")


@dataclass
class _Choice:
    index: int
    prompt_index: int
    text: str = ""
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # TokenLogprob
    finish_reason: str | None = None
    num_cached_tokens: int = 0


async def _refusals_as_400(agen: AsyncIterator, kind: str) -> AsyncIterator:
    """The engine refuses a request it could never run with a ValueError (the numbers in it):
    that is the client's 400, not a 500."""
    async with contextlib.aclosing(agen):
        while True:
            try:
                item = await agen.__anext__()
            except StopAsyncIteration:
                return
            except (ValueError, TypeError) as e:
                raise bad_request(str(e), "prompt" if kind == "completion" else "messages") from None
            yield item


class Generation:
    """One HTTP request's engine requests (prompts x n choices) and their accounting."""

    def __init__(self, state: ServerState, req: protocol.GenerationRequest, rid: str,
                 prompts: list[list[int]], params: list[SamplingParams]):
        self.state, self.req, self.rid = state, req, rid
        self.prompts, self.params = prompts, params
        self.t0 = time.perf_counter()
        self.choices = [_Choice(i, i // req.n) for i in range(len(prompts) * req.n)]
        self.engine_ids = [f"{rid}-{uuid.uuid4().hex[:8]}-{i}" for i in range(len(self.choices))]

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.token_ids) for c in self.choices)
        cached = sum(c.num_cached_tokens for c in self.choices if c.index % self.req.n == 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    async def _one(self, i: int) -> AsyncIterator:
        st, c = self.state, self.choices[i]
        eid = self.engine_ids[i]
        st.awaiting_first_token += 1
        st.active[eid] = True
        first, last = True, self.t0
        try:
            async for out in _refusals_as_400(st.engine.generate(self.prompts[c.prompt_index], self.params[i],
                                                                 request_id=eid), self.req.kind):
                now = time.perf_counter()
                if out.new_token_ids:
                    if first:
                        st.metrics.ttft.observe(now - self.t0)
                    else:
                        st.metrics.itl.observe(now - last)
                    last = now
                if first:
                    first = False
                    st.awaiting_first_token -= 1
                yield out
                if out.finished:
                    st.metrics.e2e.observe(now - self.t0)
        finally:
            if first:
                st.awaiting_first_token -= 1
            st.active.pop(eid, None)

    async def outputs(self) -> AsyncIterator:
        """(choice, RequestOutput) as the engine produces them, all choices merged."""
        if len(self.choices) == 1:
            async for out in self._one(0):
                yield self.choices[0], out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i):
            try:
                async for out in self._one(i):
                    queue.put_nowait((i, out, None))
                queue.put_nowait((i, None, None))
            except Exception as e:
                queue.put_nowait((i, None, e))

        tasks = [asyncio.ensure_future(pump(i)) for i in range(len(self.choices))]
        try:
            remaining = len(tasks)
            while remaining:
                i, out, err = await queue.get()
                if err is not None:
                    raise err
                if out is None:
                    remaining -= 1
                    continue
                yield self.choices[i], out
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def absorb(self, c: _Choice, out) -> None:
        c.token_ids.extend(out.new_token_ids)
        c.text += out.new_text
        if out.new_logprobs:
            c.logprobs.extend(out.new_logprobs)
        c.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            if out.finish_reason == "error":
                _log.error("request %s: %s", self.rid, out.error)
                raise server_error(f"the model failed on this request (request id {self.rid})", "model_error")
            if out.finish_reason == "abort":
                raise server_error("the request was aborted: the server is shutting down", "server_shutdown", 503)
            c.finish_reason = out.finish_reason


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _finite(x: float) -> float:
    return max(x, -9999.0) if math.isfinite(x) else -9999.0


def _completion_logprobs(state: ServerState, lps: list, offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for lp in lps:
        s = state.token_str(lp.token_id)
        tokens.append(s)
        token_lps.append(_finite(lp.logprob))
        top = {state.token_str(t): _finite(v) for t, v in lp.top}
        top.setdefault(s, _finite(lp.logprob))
        tops.append(top)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(state: ServerState, lps: list) -> dict:
    def entry(t, v):
        s = state.token_str(t)
        return {"token": s, "logprob": _finite(v), "bytes": list(s.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps], "refusal": None}


async def _timed(agen: AsyncIterator, deadline: float | None) -> AsyncIterator:
    """``agen``'s items until ``deadline`` (loop time; None = no limit), then TimeoutError; the
    cancelled wait ends ``agen`` (and so aborts its engine requests)."""
    loop = asyncio.get_running_loop()
    async with contextlib.aclosing(agen):
        while True:
            try:
                if deadline is None:
                    item = await agen.__anext__()
                else:
                    item = await asyncio.wait_for(agen.__anext__(), max(deadline - loop.time(), 0))
            except StopAsyncIteration:
                return
            yield item


def _timeout_error(state: ServerState) -> APIError:
    return APIError(408, f"the request took longer than the server's request timeout "
                         f"({state.request_timeout:g} s) and was aborted", type="server_error",
                    code="request_timeout")


def _deadline(state: ServerState, gen: Generation) -> float | None:
    if not state.request_timeout:
        return None
    return asyncio.get_running_loop().time() + state.request_timeout - (time.perf_counter() - gen.t0)


async def collect(state: ServerState, gen: Generation, texts: list[str]) -> dict:
    """Run a non-streamed request to its end: the response body (OpenAI's completion or chat
    completion object); `APIError` for a timeout, an engine refusal, an abort or a model error."""
    try:
        async with contextlib.aclosing(_timed(gen.outputs(), _deadline(state, gen))) as outs:
            async for c, out in outs:
                gen.absorb(c, out)
    except TimeoutError:
        raise _timeout_error(state) from None
    return _final_body(state, gen, texts)


def _final_body(state: ServerState, gen: Generation, texts: list[str]) -> dict:
    req = gen.req
    base = {"id": ("cmpl-" if req.kind == "completion" else "chatcmpl-") + gen.rid, "created": int(time.time()),
            "model": state.model_name, "system_fingerprint": None}
    choices = []
    for c in gen.choices:
        if req.kind == "completion":
            prefix = texts[c.prompt_index] if req.echo else ""
            lp = _completion_logprobs(state, c.logprobs, len(prefix)) if req.logprobs is not None else None
            choices.append({"index": c.index, "text": prefix + c.text, "logprobs": lp,
                            "finish_reason": c.finish_reason})
        else:
            lp = _chat_logprobs(state, c.logprobs) if req.logprobs is not None else None
            choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text,
                                                          "refusal": None, "tool_calls": []},
                            "logprobs": lp, "finish_reason": c.finish_reason})
    obj = "text_completion" if req.kind == "completion" else "chat.completion"
    return {**base, "object": obj, "choices": choices, "usage": gen.usage()}


async def stream(state: ServerState, gen: Generation, texts: list[str], info: dict) -> AsyncIterator[str]:
    """The SSE payloads of a streamed request, in OpenAI's order: per choice the role (chat) or
    the echoed prompt first, then its text chunks, then a chunk with its finish_reason (every
    chunk the same id); the usage chunk (empty choices) when asked; "[DONE]" last. An error
    after the headers went out is one ``{"error": ...}`` payload before "[DONE]"."""
    req = gen.req
    chat = req.kind == "chat"
    base = {"id": ("chatcmpl-" if chat else "cmpl-") + gen.rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": state.model_name, "system_fingerprint": None}
    extra = {"usage": None} if req.include_usage else {}
    offsets = [len(texts[c.prompt_index]) if req.echo else 0 for c in gen.choices]

    def chunk(choice: dict) -> str:
        return _dumps({**base, "choices": [choice], **extra})

    try:
        for c in gen.choices:  # the role first (chat) or the echoed prompt (completions)
            if chat:
                yield chunk({"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
            elif req.echo:
                yield chunk({"index": c.index, "text": texts[c.prompt_index], "logprobs": None,
                             "finish_reason": None})
        async with contextlib.aclosing(_timed(gen.outputs(), _deadline(state, gen))) as outs:
            async for c, out in outs:
                gen.absorb(c, out)
                lps = out.new_logprobs or []
                if out.new_text or lps:
                    if chat:
                        yield chunk({"index": c.index, "delta": {"content": out.new_text},
                                     "logprobs": _chat_logprobs(state, lps) if req.logprobs is not None else None,
                                     "finish_reason": None})
                    else:
                        lp = (_completion_logprobs(state, lps, offsets[c.index])
                              if req.logprobs is not None else None)
                        offsets[c.index] += sum(len(state.token_str(x.token_id)) for x in lps)
                        yield chunk({"index": c.index, "text": out.new_text, "logprobs": lp,
                                     "finish_reason": None})
                if out.finished:
                    if chat:
                        yield chunk({"index": c.index, "delta": {}, "logprobs": None,
                                     "finish_reason": c.finish_reason})
                    else:
                        yield chunk({"index": c.index, "text": "", "logprobs": None,
                                     "finish_reason": c.finish_reason})
        if req.include_usage:
            yield _dumps({**base, "choices": [], "usage": gen.usage()})
    except TimeoutError:
        yield _dumps(_timeout_error(state).body())
    except APIError as e:
        yield _dumps(e.body())
    except Exception:
        _log.exception("request %s failed mid-stream", gen.rid)
        yield _dumps(server_error(f"internal server error (request id {gen.rid})", "internal_error").body())
    finally:
        usage = gen.usage()  # what was generated, also when the stream was cut
        info["usage"] = {**usage, "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}
    yield "[DONE]"
