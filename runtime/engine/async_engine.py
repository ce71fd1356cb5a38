"""`AsyncEngine`: the engine for asyncio programs (the server): many coroutines generate at once.

    engine = AsyncEngine(Engine("smollm2-135m-instruct"))
    async for out in engine.generate("Hello", SamplingParams(max_tokens=32), request_id="r1"):
        print(out.new_text, end="")

One background task drives `Engine.step` in a worker thread (so the event loop stays free for
the network while the model runs) and hands each `RequestOutput` to its request's queue.
The `Engine` is only ever touched from that worker thread, one call at a time: new requests
and aborts are queued and applied between steps. Cancelling a consumer (its task cancelled,
its client gone, the async generator closed) aborts its request, which frees its blocks
before the next step.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
from collections.abc import AsyncIterator, Sequence

from ..sampling import SamplingParams
from .engine import Engine, EngineStats, RequestOutput


class EngineDeadError(RuntimeError):
    """The background loop stopped on an error; the engine takes no more requests."""


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="genfuse-engine")
        self._lock = threading.Lock()  # guards the two lists below (filled from the event loop)
        self._adds: list[tuple[str, list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self._queues: dict[str, asyncio.Queue] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._dead: BaseException | None = None
        self._ids = itertools.count()
        self._stats = engine.stats

    # ------------------------------------------------------------------ public API

    async def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield this request's outputs as steps produce them; the last has ``finished``."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped: {self._dead!r}")
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already running")
        ids = self.engine.encode_prompt(prompt)  # bad prompts fail here, in the caller
        self.engine.scheduler.check_prompt(len(ids))
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        with self._lock:
            self._adds.append((request_id, ids, params))
        self._start()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request (applied before the next step; its blocks are freed then). A consumer
        still reading it gets a last output with finish_reason "abort"."""
        with self._lock:
            self._aborts.append(request_id)
        if self._wake is not None:
            self._wake.set()

    @property
    def num_running(self) -> int:
        """Requests whose consumers are still reading (queued, running or not yet collected)."""
        return len(self._queues)

    @property
    def dead(self) -> BaseException | None:
        """Why the engine stopped (a failed step, or `shutdown`); None while it runs."""
        return self._dead

    @property
    def stats(self) -> EngineStats:
        """The engine's `EngineStats` as of the end of the last loop turn (taken in the worker
        thread, so it never races a step; aborts and adds are applied before it is taken)."""
        return self._stats

    async def shutdown(self) -> None:
        """Stop the loop (after the step in flight) and end every consumer with EngineDeadError."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        self._pool.shutdown(wait=True)
        if self._dead is None:
            self._dead = RuntimeError("the engine was shut down")
        for q in self._queues.values():
            q.put_nowait(EngineDeadError("the engine was shut down"))

    # ------------------------------------------------------------------ the loop

    def _start(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def _apply_pending(self) -> tuple[list[tuple[str, BaseException]], list[RequestOutput]]:
        """In the worker thread: queued aborts, then queued requests. Returns the refused ones
        and the last output of each aborted request (a consumer still reading, as when the
        server aborts everything at shutdown, ends with finish_reason "abort")."""
        with self._lock:
            adds, self._adds = self._adds, []
            aborts, self._aborts = self._aborts, []
        refused, ended = [], []
        aborted = set(aborts)
        for rid in aborts:
            out = self.engine.abort_with_output(rid)
            if out is not None:
                ended.append(out)
        for rid, ids, params in adds:
            if rid in aborted:  # aborted before it reached the engine
                ended.append(RequestOutput(rid, [], "", [], "", True, "abort", list(ids)))
                continue
            try:
                self.engine.add_request(rid, ids, params)
            except (ValueError, TypeError) as e:
                refused.append((rid, e))
        return refused, ended

    def _work(self):
        refused, ended = self._apply_pending()
        outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
        self._stats = self.engine.stats
        return refused, ended + outputs, self.engine.has_unfinished_requests()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._wake.clear()
                refused, outputs, busy = await loop.run_in_executor(self._pool, self._work)
                for rid, err in refused:
                    q = self._queues.get(rid)
                    if q is not None:
                        q.put_nowait(err)
                for out in outputs:
                    q = self._queues.get(out.request_id)
                    if q is not None:
                        q.put_nowait(out)
                if not busy:
                    with self._lock:
                        pending = bool(self._adds or self._aborts)
                    if not pending:
                        await self._wake.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a failed step: every waiting consumer learns why
            self._dead = e
            for q in self._queues.values():
                q.put_nowait(EngineDeadError(f"the engine stopped: {e!r}"))
            raise
