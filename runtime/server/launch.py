"""`serve(ServerConfig)`: uvicorn on the app, the model loading beside it, a clean exit.

The socket is bound first and the model loads in a background thread, so ``GET /health``
answers 503 while loading and 200 once the engine runs; the URL is printed to stdout when both
are done (``genfuse serve: ready at http://HOST:PORT/v1``; port 0 picks a free port, printed).
SIGTERM or SIGINT: stop accepting, let running requests finish for ``shutdown_timeout``
seconds, then abort the rest (their streams end with an error event, non-streamed requests get
503), stop the engine, exit 0 (130 after SIGINT). uvicorn re-raises the signal after its
graceful shutdown, which would make a clean SIGTERM exit look like a kill: `_Server` does not.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import sys
import threading
from dataclasses import dataclass, field

import uvicorn

from .app import ServerState, build_app

_log = logging.getLogger("genfuse.server")
EXIT_INTERRUPTED = 130


@dataclass
class ServerConfig:
    """How `serve` runs: the model and its engine keywords (`Engine`), where to listen, and
    the server's own limits."""

    model: str = "smollm2-135m-instruct"
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # default: ``model`` as given
    api_key: str | None = None
    max_waiting: int | None = None
    request_timeout: float | None = None
    shutdown_timeout: float = 5.0
    log_level: str = "info"
    threads: int | None = None  # CPU threads for genfuse's kernels (None: the physical cores), as LLM(threads=)
    engine_kwargs: dict = field(default_factory=dict)  # device, backend, EngineArgs...

    def __post_init__(self):
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an int in [0, 65535], got {self.port!r}")
        if self.max_waiting is not None and self.max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {self.max_waiting}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {self.request_timeout}")
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        from ..threads import check_threads

        check_threads(self.threads)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, grace: float):
        super().__init__(config)
        self.gf_state, self.grace = state, grace
        self.signals: list[int] = []
        self.on_started = None

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig, frame):
        self.signals.append(sig)
        self.handle_exit(sig, frame)
        self._captured_signals.clear()  # no re-raise after the graceful shutdown

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    async def shutdown(self, sockets=None):
        st = self.gf_state
        st.draining = True
        loop = asyncio.get_running_loop()
        if st.active:
            _log.info("shutting down: %d request(s) running, %g s to finish", len(st.active), self.grace)
        handle = loop.call_later(self.grace, lambda: st.active and _log.warning(
            "shutdown: aborting %d request(s) still running", st.abort_all()))
        try:
            await super().shutdown(sockets)
        finally:
            handle.cancel()
        if st.engine is not None:
            await st.engine.shutdown()


def _setup_logging(level: str) -> None:
    lvl = getattr(logging, level.upper(), None)
    if not isinstance(lvl, int):
        raise ValueError(f"unknown log level {level!r} (debug, info, warning, error, critical)")
    root = logging.getLogger("genfuse")
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(h)
        root.propagate = False
    root.setLevel(lvl)


def set_engine_threads(engine, threads: int | None) -> None:
    """CPU threads as `LLM` sets them (runtime/threads.py): genfuse's kernels get ``threads``
    (default the physical cores); torch's intra-op pool 1 thread when packed GGUF weights carry
    the model (its spinning threads would take the cores from the kernels' pool), else ``threads``."""
    if engine.device.type != "cpu":
        return
    from ..threads import kernel_threads, set_threads

    import torch

    n = threads if threads is not None else kernel_threads()
    set_threads(n, torch_threads=1 if engine.loaded.keep_quantized else threads)
    _log.info("CPU threads: %d for genfuse's kernels, %d for torch", kernel_threads(), torch.get_num_threads())


def serve(cfg: ServerConfig, *, engine_factory=None) -> int:
    """Run the server until SIGTERM / SIGINT; the exit code (0, 130 after SIGINT, 1 when the
    model failed to load). ``engine_factory``: builds the `Engine` (default
    ``Engine(cfg.model, **cfg.engine_kwargs)``), called in the loading thread."""
    from ..engine import AsyncEngine, Engine

    _setup_logging(cfg.log_level)
    state = ServerState(model_name=cfg.served_model_name or cfg.model, api_key=cfg.api_key,
                        max_waiting=cfg.max_waiting, request_timeout=cfg.request_timeout)
    app = build_app(state)
    ucfg = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level.lower(), access_log=False,
                          timeout_graceful_shutdown=cfg.shutdown_timeout + 5.0, lifespan="off")
    server = _Server(ucfg, state, cfg.shutdown_timeout)
    outcome = {"error": None, "url": None}
    loop_box: dict = {}

    def ready_if_both():
        if outcome["url"] is not None and state.engine is not None:
            print(f"genfuse serve: {state.model_name} ready at {outcome['url']}/v1", flush=True)

    def on_started():
        loop_box["loop"] = asyncio.get_running_loop()
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        outcome["url"] = f"http://{shown}:{port}"
        print(f"genfuse serve: listening on {outcome['url']} (loading {cfg.model})", flush=True)
        loader.start()

    def loaded(engine):
        state.engine = AsyncEngine(engine)
        ready_if_both()

    def failed(e):
        outcome["error"] = e
        server.should_exit = True

    def load():
        try:
            engine = engine_factory() if engine_factory is not None else Engine(cfg.model, **cfg.engine_kwargs)
            set_engine_threads(engine, cfg.threads)
        except BaseException as e:  # noqa: BLE001 - reported, and the server stops
            done = functools.partial(failed, e)
        else:
            done = functools.partial(loaded, engine)
        try:
            loop_box["loop"].call_soon_threadsafe(done)
        except RuntimeError:  # the loop is closed: stopped (SIGTERM) while loading, nothing to hand over
            pass

    # Not left running at exit: a daemon thread still loading (and logging) while the interpreter
    # finalizes can abort the process; a stop during loading waits for the load to end instead.
    loader = threading.Thread(target=load, name="genfuse-load", daemon=True)
    server.on_started = on_started
    server.run()
    if loader.is_alive():
        loader.join()
    if outcome["error"] is not None:
        raise outcome["error"]
    if server.started is False and not server.signals:
        raise OSError(f"could not listen on {cfg.host}:{cfg.port} (see the log above)")
    return EXIT_INTERRUPTED if signal.SIGINT in server.signals else 0
