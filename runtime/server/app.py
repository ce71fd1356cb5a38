"""The FastAPI app: OpenAI's endpoints over `AsyncEngine` (the engine's public API only).

    POST /v1/completions       POST /v1/chat/completions      GET /v1/models
    GET /health (503 while loading, 200 after)               GET /metrics (Prometheus)

A request: the ASGI middleware gives it an id (``X-Request-Id`` when the client sends a sane
one), checks the API key on /v1 paths, and writes one access-log line when the response is
done (status, latency, token counts). The handler checks the body (`protocol`), tokenizes,
refuses a prompt that does not fit ``max_model_len`` (400 with the numbers) and, over
``max_waiting`` requests still awaiting their first token, answers 503 with Retry-After. Each
choice is one engine request. The generation runs in a task beside a watcher of the
connection: a client that disconnects, or ``request_timeout`` running out, cancels it, which
aborts its engine requests (their KV blocks are freed before the next step).

Errors are OpenAI's error body with the right status; anything unexpected is logged with the
request id and answered 500 without internals.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..sampling import SamplingParams
from . import generation, protocol
from .errors import APIError, bad_request, server_error
from .metrics import CONTENT_TYPE
from .state import ServerState

_log = logging.getLogger("genfuse.server")
_access = logging.getLogger("genfuse.server.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions
MAX_BODY_BYTES = 32 << 20  # a max_model_len prompt as text or token ids is far below this

__all__ = ["ServerState", "SSEResponse", "build_app"]


class _ClientGone(Exception):
    pass


# --------------------------------------------------------------------------- middleware


class _RequestContext:
    """Request id, API key, access log, response counter: one raw ASGI layer (not
    BaseHTTPMiddleware, which would buffer streams and hide disconnects)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        rid = headers.get("x-request-id", "")
        if not _REQUEST_ID.match(rid):
            rid = uuid.uuid4().hex
        info = {"request_id": rid, "usage": None}
        scope.setdefault("state", {})["gf"] = info
        status = [0]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            err = self._auth(scope["path"], headers)
            if err is not None:
                await _send_error(send_with_id, err)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            self.state.metrics.http.labels(str(status[0])).inc()
            u = info["usage"] or {}
            client = scope.get("client") or ("-", 0)
            _access.info('%s:%s "%s %s" %d %.1fms id=%s prompt_tokens=%s completion_tokens=%s cached_tokens=%s',
                         client[0], client[1], scope["method"], scope["path"], status[0],
                         (time.perf_counter() - t0) * 1000, rid, u.get("prompt_tokens", "-"),
                         u.get("completion_tokens", "-"), u.get("cached_tokens", "-"))

    def _auth(self, path: str, headers: dict) -> APIError | None:
        key = self.state.api_key
        if key is None or not path.startswith("/v1"):
            return None
        got = headers.get("authorization", "")
        if not got:
            return APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            return APIError(401, "incorrect API key provided", code="invalid_api_key",
                            headers={"WWW-Authenticate": "Bearer"})
        return None


async def _send_error(send, err: APIError):
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 past `MAX_BODY_BYTES` (before reading it all when the client
    says its length)."""
    too_big = APIError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        parts.append(chunk)
    return b"".join(parts)


# --------------------------------------------------------------------------- streaming


class SSEResponse(Response):
    """Server-sent events from an async iterator of ``data:`` payloads. The stream runs in a
    task beside a watcher of the connection; a disconnect cancels it (and so aborts its
    engine requests), and the iterator is always closed."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], headers: dict | None = None):
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def __call__(self, scope, receive, send):
        async def pump():
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for data in self.events:
                await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await _until_disconnect(receive, pump())
        except (_ClientGone, OSError):
            pass  # the client left; its requests were aborted when the stream was cancelled
        finally:
            await self.events.aclose()


async def _until_disconnect(receive, coro):
    """Run ``coro``; if the client disconnects first, cancel it and raise `_ClientGone`."""
    task = asyncio.ensure_future(coro)

    async def watch():
        while True:
            if (await receive())["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise _ClientGone()


# --------------------------------------------------------------------------- the app


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="genfuse", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gf = state

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return _error_response(APIError(exc.status_code, msg, code=code, headers=dict(exc.headers or {})))

    @app.get("/health")
    async def health():
        if state.engine is None:
            return _error_response(server_error("the model is loading", "model_loading", 503, {"Retry-After": "1"}))
        if state.draining:
            return _error_response(server_error("the server is shutting down", "server_shutdown", 503))
        if state.engine.dead is not None:  # a failed step stopped it: this process cannot serve any more
            return _error_response(server_error("the engine stopped on an error (see the server log)",
                                                "engine_dead", 503))
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict:
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "genfuse"}
        if state.engine is not None:
            card["max_model_len"] = state.engine.engine.max_model_len
        return card

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != state.model_name:
            raise _unknown_model(model_id)
        return model_card()

    def _unknown_model(name) -> APIError:
        return APIError(404, f"the model '{name}' does not exist (this server serves '{state.model_name}')",
                        param="model", code="model_not_found")

    async def handle(request: Request, kind: str):
        info = request.scope["state"]["gf"]
        rid = info["request_id"]
        try:
            return await _handle(request, kind, rid, info)
        except APIError:
            raise
        except Exception:
            _log.exception("request %s failed", rid)
            raise server_error(f"internal server error (request id {rid})", "internal_error") from None

    async def _handle(request: Request, kind: str, rid: str, info: dict):
        if state.engine is None:
            raise server_error("the model is loading", "model_loading", 503, {"Retry-After": "1"})
        if state.draining:
            raise server_error("the server is shutting down", "server_shutdown", 503)
        if state.engine.dead is not None:
            raise server_error("the engine stopped on an error (see the server log)", "engine_dead", 503)
        raw = await _read_body(request)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_request(f"the request body is not valid JSON: {e}") from None
        req = protocol.parse_completion(body) if kind == "completion" else protocol.parse_chat(body)
        if req.model is not None and req.model != state.model_name:
            raise _unknown_model(req.model)
        prompts, texts = _tokenize(req)
        params = _params(req, prompts)
        if state.max_waiting is not None and state.awaiting_first_token >= state.max_waiting:
            raise server_error(f"the server is overloaded: {state.awaiting_first_token} requests are waiting "
                               f"(--max-waiting={state.max_waiting}); retry later", "server_overloaded", 503,
                               {"Retry-After": "1"})
        gen = generation.Generation(state, req, rid, prompts, params)
        if req.stream:
            return SSEResponse(generation.stream(state, gen, texts, info))
        try:
            result = await _until_disconnect(request.receive, generation.collect(state, gen, texts))
        except _ClientGone:
            return Response(status_code=499)  # never delivered: for the access log
        info["usage"] = {**result["usage"], "cached_tokens": result["usage"]["prompt_tokens_details"]["cached_tokens"]}
        return JSONResponse(result)

    def _tokenize(req: protocol.GenerationRequest) -> tuple[list[list[int]], list[str]]:
        eng = state.engine.engine
        tok = eng.tokenizer
        ids, texts = [], []
        for i, p in enumerate(req.prompts):
            param = "prompt" if req.kind == "completion" else "messages"
            if req.kind == "chat":
                if tok is None:
                    raise bad_request("this model has no tokenizer or chat template: use /v1/completions with "
                                      "token ids", "messages")
                try:
                    text = tok.apply_chat_template(p, add_generation_prompt=True)
                except ValueError as e:
                    raise bad_request(f"the chat template failed on these messages: {e}", "messages") from None
                p_ids = tok.encode(text, add_special_tokens=False)
            else:
                if isinstance(p, str) and tok is None:
                    raise bad_request("this model has no tokenizer: give 'prompt' as token ids", "prompt")
                try:
                    p_ids = eng.encode_prompt(p, "prompt")
                except ValueError as e:
                    raise bad_request(str(e), param) from None
                text = p if isinstance(p, str) else (tok.decode(p_ids) if tok is not None else "")
            if not p_ids:
                raise bad_request(f"{param} is empty (no tokens)", param)
            ids.append(p_ids)
            texts.append(text)
        return ids, texts

    def _params(req: protocol.GenerationRequest, prompts: list[list[int]]) -> list[SamplingParams]:
        limit = state.engine.engine.max_model_len
        param = "prompt" if req.kind == "completion" else "messages"
        out = []
        for ids in prompts:
            n = len(ids)
            if n >= limit:
                raise bad_request(f"this model's maximum context length is {limit} tokens, but the prompt has {n} "
                                  f"tokens (at least one token must be generated)", param, "context_length_exceeded")
            max_tokens = req.max_tokens
            if max_tokens is None:
                max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if req.kind == "completion" else limit - n
                max_tokens = min(max_tokens, limit - n)
            elif n + max_tokens > limit:
                raise bad_request(f"this model's maximum context length is {limit} tokens, but {n + max_tokens} were "
                                  f"requested ({n} in the prompt + max_tokens={max_tokens}); lower max_tokens or "
                                  "the prompt", "max_tokens", "context_length_exceeded")
            for j in range(req.n):
                seed = None if req.seed is None else (req.seed + j) % 2**64  # choice j: seed + j
                try:
                    out.append(SamplingParams(max_tokens=max_tokens, seed=seed, logprobs=req.logprobs,
                                              **req.sampling))
                except ValueError as e:
                    name = str(e).split(" ", 1)[0]
                    raise bad_request(str(e), name if name in req.sampling else None) from None
        return out

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "chat")

    return _RequestContext(app, state)
