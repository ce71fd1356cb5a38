"""The app in-process on a real uvicorn (a thread, 127.0.0.1, port 0) over a tiny random-weight
Llama without a tokenizer: token-id prompts, the refusals of text and chat without one, and an
engine failure injected into the model step (500 without internals, the request id in the log,
/health 503 after)."""
from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
import time

import httpx
import pytest
import uvicorn

from genfuse.runtime.engine import AsyncEngine, Engine
from genfuse.runtime.server import ServerState, build_app


@pytest.fixture(scope="module")
def app_server():
    from llm_helpers import one_thread, tiny_folder

    _, folder = tiny_folder("llama", tempfile.mkdtemp(prefix="server_internal_"))
    with one_thread():
        engine = Engine(str(folder), device="cpu", backend="torch", num_kv_blocks=64, block_size=4)
        state = ServerState(model_name="tiny")
        server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=0, log_level="warning",
                                               lifespan="off"))
        loop_box = {}

        def run():
            async def main():
                loop_box["loop"] = asyncio.get_running_loop()
                state.engine = AsyncEngine(engine)
                await server.serve()
                await state.engine.shutdown()

            asyncio.run(main())

        t = threading.Thread(target=run, daemon=True)
        t.start()
        for _ in range(400):  # bounded: until it listens
            if server.started:
                break
            time.sleep(0.025)
        assert server.started
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", engine, state
        server.should_exit = True
        t.join(30)
        assert not t.is_alive()


def test_token_ids_without_a_tokenizer(app_server):
    url, engine, _ = app_server
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0,
                                            "ignore_eos": True})
        assert r.status_code == 200
        assert r.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                                     "prompt_tokens_details": {"cached_tokens": 0}}
        r = c.post("/v1/completions", json={"prompt": "text", "max_tokens": 4})
        assert r.status_code == 400 and "no tokenizer" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = c.post("/v1/completions", json={"prompt": [5] * 300})  # past the tiny model's 256 positions
        assert r.status_code == 400 and "256" in r.json()["error"]["message"]


def test_engine_failure_is_a_500_without_internals(app_server, monkeypatch, caplog):
    url, engine, state = app_server

    def broken(*a, **k):
        raise RuntimeError("secret-internal-detail")

    monkeypatch.setattr(engine.runner, "run", broken)
    with caplog.at_level(logging.ERROR, logger="genfuse.server"), httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 3}, headers={"X-Request-Id": "boom-1"})
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["code"] == "internal_error" and "boom-1" in err["message"]
        assert "secret" not in r.text and "Traceback" not in r.text
        assert any("boom-1" in rec.getMessage() and rec.exc_info for rec in caplog.records)
        h = c.get("/health")
        assert h.status_code == 503 and h.json()["error"]["code"] == "engine_dead"
        r = c.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 3, "stream": True})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
