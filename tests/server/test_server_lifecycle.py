"""`genfuse serve` limits and lifecycle on a second real server: the API key (401), admission
control (--max-waiting: 503 + Retry-After), --request-timeout (streamed and not), SIGTERM while
requests run (they end cleanly, exit 0); and the CLI's refusals before anything loads."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import pytest
from server_helpers import ServerProcess, sse_events, wait_until

from genfuse import cli

KEY = "test-key-123"
LONG = {"prompt": "Tell me a long story about a lighthouse keeper:", "max_tokens": 2000, "ignore_eos": True}


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--api-key", KEY, "--threads", "1", "--max-waiting", "2", "--max-num-seqs", "1", "--request-timeout", "2.5",
                      "--shutdown-timeout", "1", "--num-kv-blocks", "128", "--served-model-name", "smol",
                      api_key=KEY, env={"GENFUSE_API_KEY": "env-key"}).start()  # the flag wins
    yield s
    if s.proc.poll() is None:
        s.stop()


def test_api_key(server):
    body = {"model": "smol", "prompt": "Hi", "max_tokens": 1}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": "Bearer env-key"}):
            r = c.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401, headers
            err = r.json()["error"]
            assert err["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/models").status_code == 401
        assert c.get("/health").status_code == 200  # health and metrics stay open
        assert c.get("/metrics").status_code == 200
        r = c.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
    import openai

    with pytest.raises(openai.AuthenticationError):
        server.openai(api_key="wrong").completions.create(model="smol", prompt="Hi", max_tokens=1)
    assert server.openai().models.list().data[0].id == "smol"  # --served-model-name
    assert "CPU threads: 1 for genfuse's kernels, 1 for torch" in server.log()  # --threads
    with server.client() as c:
        assert c.post("/v1/completions", json={**body, "model": "smollm2-135m-instruct"}).status_code == 404


def test_max_waiting_answers_503_with_retry_after(server):
    """max_num_seqs=1: one request runs, two wait for a seat (no token yet); a fourth is refused."""

    async def main():
        async with server.async_client() as c:
            first_token = asyncio.Event()

            async def stream(i, signal=None):
                async with c.stream("POST", "/v1/completions", json={**LONG, "stream": True, "max_tokens": 200}) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and signal is not None:
                            signal.set()

            tasks = [asyncio.create_task(stream(0, first_token))]
            await asyncio.wait_for(first_token.wait(), 60)
            tasks += [asyncio.create_task(stream(i)) for i in (1, 2)]
            for _ in range(200):  # until both wait (bounded)
                m = (await c.get("/metrics")).text
                if "genfuse:num_requests_awaiting_first_token 2.0" in m:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the two requests never waited")
            r = await c.post("/v1/completions", json={"prompt": "one more", "max_tokens": 1})
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return r

    r = asyncio.run(main())
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    err = r.json()["error"]
    assert err["code"] == "server_overloaded" and "--max-waiting=2" in err["message"]
    wait_until(lambda: "genfuse:num_requests_running 0.0" in server.client().get("/metrics").text, 30,
               "the cancelled streams to be aborted")


def test_request_timeout_aborts(server):
    t0 = time.monotonic()
    with server.client() as c:
        r = c.post("/v1/completions", json=LONG)
        assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
        assert 2.5 <= time.monotonic() - t0 < 30
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as s:
            events = sse_events(list(s.iter_lines()))
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "request_timeout"
    assert any(e.get("choices") for e in events[:-2])  # it streamed tokens before the limit
    m = wait_until(lambda: "genfuse:num_requests_running 0.0" in (t := server.client().get("/metrics").text) and t,
                   30, "the timed-out requests to be aborted")
    assert "genfuse:kv_cache_usage_perc 0.0" in m


def test_sigterm_while_requests_run_exits_0(server):
    """Two requests run (one streamed, one not) past the 1 s shutdown grace: both end cleanly
    (an error event + [DONE] for the stream, a 503 body for the other) and the exit code is 0."""
    results = {}

    async def main():
        async with server.async_client() as c:
            async def streamed():
                async with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
                    results["stream"] = sse_events([line async for line in r.aiter_lines()])

            async def plain():
                results["plain"] = await c.post("/v1/completions", json={**LONG, "prompt": "Another story:"})

            tasks = [asyncio.create_task(streamed()), asyncio.create_task(plain())]
            for _ in range(400):
                if "genfuse:num_requests_running 1.0" in (await c.get("/metrics")).text:
                    break
                await asyncio.sleep(0.02)
            server.proc.send_signal(__import__("signal").SIGTERM)
            await asyncio.wait_for(asyncio.gather(*tasks), 60)

    asyncio.run(main())
    assert server.proc.wait(60) == 0, server.log()[-3000:]
    events = results["stream"]
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "server_shutdown"
    assert results["plain"].status_code == 503
    assert results["plain"].json()["error"]["code"] == "server_shutdown"
    assert "Traceback" not in server.log()


def test_sigterm_while_loading_exits_0():
    s = ServerProcess(env={"GENFUSE_API_KEY": "env-key"}).start(wait_ready=False)
    with httpx.Client(base_url=s.url, timeout=10) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert c.post("/v1/completions", json={"prompt": "Hi"}).status_code == 401  # $GENFUSE_API_KEY holds
        r = c.post("/v1/completions", json={"prompt": "Hi"}, headers={"Authorization": "Bearer env-key"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert s.stop() == 0
    assert not any(" ready at " in line for line in s.lines)


# --------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("argv,match", [
    (["--port", "70000"], "port"),
    (["--max-waiting", "0"], "max_waiting"),
    (["--request-timeout", "-1"], "request_timeout"),
    (["--max-num-seqs", "0"], "max_num_seqs"),
    (["--log-level", "loud"], "log-level"),
    (["--threads", "0"], "threads"),
])
def test_cli_refuses_bad_flags(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", *argv])
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_cli_model_that_fails_to_load_exits_1(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf")
    p = subprocess.run([sys.executable, "-m", "genfuse", "serve", str(bad), "--port", "0"], capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 1, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("genfuse serve: error:") and "broken.gguf" in last
    assert "Traceback" not in p.stderr
    assert "listening on http://127.0.0.1:" in p.stdout
