"""Request bodies of /v1/completions and /v1/chat/completions, checked field by field.

Every check names its field (``param`` of the error body) and shows the value it got; JSON
``null`` means "the default" for every optional field, as in OpenAI's API. Fields genfuse does
not implement are refused when set to anything but their neutral value (``best_of`` > 1,
``suffix``, ``logit_bias``, ``tools``, a non-text ``response_format``...); fields nobody knows
are ignored with a warning in the log (as vLLM does), so clients that send extra keys work.

Sampling fields (both endpoints): ``max_tokens`` (chat also ``max_completion_tokens``),
``temperature``, ``top_p``, ``n``, ``stop``, ``seed``, ``presence_penalty``,
``frequency_penalty``, ``stream``, ``stream_options.include_usage``, and the genfuse / vLLM
extras ``top_k`` (-1 or 0 = off), ``min_p``, ``repetition_penalty``, ``ignore_eos``,
``stop_token_ids``. Completions: ``prompt`` (a string, a list of strings, a list of token ids,
a list of token-id lists), ``logprobs`` (0..20 alternatives per token), ``echo``. Chat:
``messages`` (roles system / developer / user / assistant / tool; content a string or a list of
``{"type": "text", "text": ...}`` parts), ``logprobs`` (bool) with ``top_logprobs`` (0..20).
"""
from __future__ import annotations

import json
import logging
import numbers
from dataclasses import dataclass, field

from ..sampling import MAX_LOGPROBS
from .errors import bad_request

_log = logging.getLogger("genfuse.server")

MAX_N = 16  # choices per prompt
MAX_CHOICES = 1024  # prompts x n per request: a bigger batch is many requests' worth of seats
ROLES = ("system", "developer", "user", "assistant", "tool")

_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
           "presence_penalty", "frequency_penalty", "top_k", "min_p", "repetition_penalty", "ignore_eos",
           "stop_token_ids", "user", "logit_bias", "best_of"}
_COMPLETION = _COMMON | {"prompt", "logprobs", "echo", "suffix"}
_CHAT = _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens", "response_format", "tools",
                   "tool_choice", "parallel_tool_calls", "functions", "function_call", "metadata", "store"}


@dataclass
class GenerationRequest:
    """A checked request: prompts (text or ids, not yet tokenized), choices and sampling."""

    kind: str  # "completion" | "chat"
    model: str | None
    prompts: list  # completion: str or list[int] each; chat: one list of message dicts
    n: int
    max_tokens: int | None  # None: the endpoint's default
    sampling: dict  # SamplingParams keywords other than max_tokens / seed / logprobs
    seed: int | None
    stream: bool
    include_usage: bool
    logprobs: int | None  # alternatives per token, None = off
    echo: bool = False
    ignored: list = field(default_factory=list)


def _type_name(v) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number" if isinstance(v, numbers.Number) else type(v).__name__)


def _show(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Fields:
    """Typed reads of one JSON object; every error names the field."""

    def __init__(self, body: dict):
        self.body = body

    def has(self, name: str) -> bool:
        return self.body.get(name) is not None

    def int(self, name, default=None, lo=None, hi=None):
        v = self.body.get(name)
        if v is None:
            return default
        if isinstance(v, float) and v.is_integer():
            v = int(v)  # 16.0 is JSON's 16 for some clients
        if not _is_int(v):
            raise bad_request(f"'{name}' must be an integer, got {_type_name(v)} ({_show(v)})", name)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise bad_request(f"'{name}' must be an integer {rng}, got {v}", name)
        return v

    def num(self, name, default=None, lo=None, hi=None, lo_open=False):
        v = self.body.get(name)
        if v is None:
            return default
        if not _is_num(v):
            raise bad_request(f"'{name}' must be a number, got {_type_name(v)} ({_show(v)})", name)
        v = float(v)
        if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
            left = "(" if lo_open else "["
            raise bad_request(f"'{name}' must be in {left}{lo}, {hi if hi is not None else 'inf'}], got {v:g}", name)
        return v

    def bool(self, name, default=False):
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise bad_request(f"'{name}' must be a boolean, got {_type_name(v)} ({_show(v)})", name)
        return v

    def str(self, name, default=None):
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, str):
            raise bad_request(f"'{name}' must be a string, got {_type_name(v)} ({_show(v)})", name)
        return v


def _stop(f: _Fields) -> tuple[str, ...]:
    v = f.body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad_request(f"'stop' must be a string or an array of strings, got {_show(v)}", "stop")
    if any(not s for s in v):
        raise bad_request("'stop' strings must not be empty", "stop")
    return tuple(v)


def _token_list(v, name: str) -> list[int]:
    if not all(_is_int(t) for t in v):
        bad = next(t for t in v if not _is_int(t))
        raise bad_request(f"'{name}' token ids must be integers, got {_show(bad)}", name)
    return list(v)


def _common(f: _Fields, kind: str) -> dict:
    body = f.body
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise bad_request(f"'model' must be a string, got {_type_name(body['model'])}", "model")
    n = f.int("n", 1, 1, MAX_N)
    best_of = f.int("best_of", None, 1)
    if best_of is not None and best_of != n:
        raise bad_request("'best_of' is not supported (only best_of == n)", "best_of")
    if body.get("logit_bias"):
        raise bad_request("'logit_bias' is not supported", "logit_bias")
    stream = f.bool("stream")
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(so, dict):
            raise bad_request(f"'stream_options' must be an object, got {_type_name(so)}", "stream_options")
        include_usage = _Fields(so).bool("include_usage")
        if "continuous_usage_stats" in so and so["continuous_usage_stats"]:
            raise bad_request("'stream_options.continuous_usage_stats' is not supported", "stream_options")
    top_k = f.int("top_k", 0, -1)
    ids = body.get("stop_token_ids")
    if ids is not None and (not isinstance(ids, list) or not all(_is_int(i) and i >= 0 for i in ids)):
        raise bad_request(f"'stop_token_ids' must be an array of integers >= 0, got {_show(ids)}", "stop_token_ids")
    if kind == "chat" and f.has("max_completion_tokens"):
        max_tokens = f.int("max_completion_tokens", None, 1)
    else:
        max_tokens = f.int("max_tokens", None, 1)
    sampling = dict(
        temperature=f.num("temperature", 1.0, 0.0),
        top_p=f.num("top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=0 if top_k == -1 else top_k,
        min_p=f.num("min_p", 0.0, 0.0, 1.0),
        repetition_penalty=f.num("repetition_penalty", 1.0, 0.0, lo_open=True),
        presence_penalty=f.num("presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=f.num("frequency_penalty", 0.0, -2.0, 2.0),
        stop=_stop(f),
        stop_token_ids=tuple(ids or ()),
        ignore_eos=f.bool("ignore_eos"),
    )
    f.str("user")
    return dict(model=body.get("model"), n=n, max_tokens=max_tokens, sampling=sampling,
                seed=f.int("seed", None, -2**63, 2**64 - 1), stream=stream, include_usage=include_usage)


def _ignored(body: dict, known: set) -> list:
    extra = sorted(k for k in body if k not in known)
    if extra:
        _log.warning("ignored unknown request field(s): %s", ", ".join(extra))
    return extra


def parse_completion(body) -> GenerationRequest:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_type_name(body)}")
    f = _Fields(body)
    if "prompt" not in body or body["prompt"] is None:
        raise bad_request("'prompt' is required", "prompt")
    p = body["prompt"]
    if isinstance(p, str):
        prompts = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        prompts = list(p)
    elif isinstance(p, list) and p and all(_is_int(x) for x in p):
        prompts = [list(p)]
    elif isinstance(p, list) and p and all(isinstance(x, list) for x in p):
        prompts = [_token_list(x, "prompt") for x in p]
    elif isinstance(p, list) and not p:
        raise bad_request("'prompt' must not be an empty array", "prompt")
    else:
        raise bad_request("'prompt' must be a string, an array of strings, an array of token ids or an array "
                          f"of token-id arrays, got {_show(p)}", "prompt")
    if f.str("suffix"):
        raise bad_request("'suffix' is not supported", "suffix")
    c = _common(f, "completion")
    if len(prompts) * c["n"] > MAX_CHOICES:
        raise bad_request(f"{len(prompts)} prompts x n={c['n']} = {len(prompts) * c['n']} choices, more than "
                          f"{MAX_CHOICES} per request", "prompt")
    logprobs = f.int("logprobs", None, 0, MAX_LOGPROBS)
    echo = f.bool("echo")
    if echo and logprobs is not None:
        raise bad_request("'echo' with 'logprobs' is not supported (prompt logprobs are not computed)", "echo")
    return GenerationRequest("completion", prompts=prompts, logprobs=logprobs, echo=echo,
                             ignored=_ignored(body, _COMPLETION), **c)


def _messages(v) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise bad_request(f"'messages' must be a non-empty array of messages, got {_show(v)}", "messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"'{where}' must be an object, got {_type_name(m)}", where)
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"'{where}.role' must be one of {', '.join(ROLES)}, got {_show(role)}", f"{where}.role")
        content = m.get("content")
        if content is None:
            if role != "assistant":
                raise bad_request(f"'{where}.content' is required for role {role!r}", f"{where}.content")
            content = ""
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                pw = f"{where}.content[{j}]"
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else _type_name(part)
                    raise bad_request(f"'{pw}': only text content parts are supported, got {_show(kind)}",
                                      f"{pw}.type")
                if not isinstance(part.get("text"), str):
                    raise bad_request(f"'{pw}.text' must be a string", f"{pw}.text")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise bad_request(f"'{where}.content' must be a string or an array of text parts, got "
                              f"{_type_name(content)}", f"{where}.content")
        if m.get("tool_calls"):
            raise bad_request(f"'{where}.tool_calls' is not supported", f"{where}.tool_calls")
        msg = {"role": role, "content": content}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


def parse_chat(body) -> GenerationRequest:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_type_name(body)}")
    f = _Fields(body)
    if "messages" not in body:
        raise bad_request("'messages' is required", "messages")
    messages = _messages(body["messages"])
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad_request(f"'{name}' (tool calling) is not supported", name)
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise bad_request("'tool_choice' is not supported", "tool_choice")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise bad_request("'response_format' other than {\"type\": \"text\"} is not supported", "response_format")
    c = _common(f, "chat")
    want = f.bool("logprobs")
    top = f.int("top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return GenerationRequest("chat", prompts=[messages], logprobs=(top or 0) if want else None,
                             ignored=_ignored(body, _CHAT), **c)
