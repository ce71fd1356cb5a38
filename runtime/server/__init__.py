"""genfuse's OpenAI-compatible HTTP server (FastAPI + uvicorn over `AsyncEngine`).

    genfuse serve [MODEL] --host 127.0.0.1 --port 8000

``/v1/completions``, ``/v1/chat/completions`` (streamed or not), ``/v1/models``, ``/health``,
``/metrics``. `app.build_app` is the ASGI app, `launch.serve` runs it; `protocol` checks request
bodies, `metrics` holds the Prometheus metrics. Needs ``pip install 'genfuse[serve]'``.
"""
try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as e:  # one line for the CLI, not a traceback
    raise ImportError(f"the genfuse server needs fastapi, uvicorn and prometheus_client ({e}): "
                      "pip install 'genfuse[serve]'") from e

from .app import ServerState, build_app
from .launch import ServerConfig, serve

__all__ = ["ServerConfig", "ServerState", "build_app", "serve"]
