"""A real `genfuse serve` in a subprocess on 127.0.0.1 (port 0: the server picks a free port
and prints it), started and stopped by the tests with bounded waits.

The server process runs torch single-threaded (OMP_NUM_THREADS=1: the 2-core CI box is
shared) and without TRITON_INTERPRET (which the suite's conftest sets for the kernel tests;
the server is the CPU production path: the torch ops and the C++ quantized matmul).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))  # llm_helpers, loader_helpers


class ServerProcess:
    def __init__(self, *args: str, api_key: str | None = None, env: dict | None = None):
        self.args = ["--port", "0", *args]
        self.api_key = api_key
        self.extra_env = env or {}
        self.url: str | None = None
        self.lines: list[str] = []
        self.health_while_loading: list[int] = []
        self.proc: subprocess.Popen | None = None
        self._ready = threading.Event()
        self._listening = threading.Event()
        self.stderr = tempfile.NamedTemporaryFile("w+", prefix="genfuse-serve-", suffix=".log", delete=False)

    # ------------------------------------------------------------------ lifecycle

    def start(self, listen_timeout: float = 90, ready_timeout: float = 180, wait_ready: bool = True) -> "ServerProcess":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **self.extra_env)
        self.proc = subprocess.Popen([sys.executable, "-m", "genfuse", "serve", *self.args], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        if not self._listening.wait(listen_timeout):
            self.fail(f"did not listen within {listen_timeout} s")
        if not wait_ready:
            return self
        deadline = time.monotonic() + ready_timeout
        with httpx.Client(timeout=5) as c:
            while not self._ready.is_set():  # /health while the model loads
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.fail(f"not ready within {ready_timeout} s")
                try:
                    self.health_while_loading.append(c.get(self.url + "/health").status_code)
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
            self.health_after_ready = c.get(self.url + "/health").status_code
        return self

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                self._listening.set()
            if " ready at " in line:
                self._ready.set()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait (bounded); the exit code. Killed (and an error) past the timeout."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            self.fail(f"did not exit within {timeout} s of SIGTERM")

    def fail(self, why: str):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        raise AssertionError(f"genfuse serve {' '.join(self.args)}: {why}\nstdout: {self.lines}\n"
                             f"stderr tail:\n{self.log()[-4000:]}")

    def log(self) -> str:
        self.stderr.flush()
        return Path(self.stderr.name).read_text()

    # ------------------------------------------------------------------ clients

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=kw.pop("timeout", 120), **kw)

    def async_client(self, **kw) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=self.headers(), timeout=kw.pop("timeout", 120), **kw)

    def openai(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", self.api_key or "none"),
                             max_retries=0, timeout=120, **kw)

    def metrics(self) -> dict[str, float]:
        """The /metrics samples as {'name{labels}': value}."""
        with self.client() as c:
            r = c.get("/metrics")
        r.raise_for_status()
        return parse_metrics(r.text)


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def sse_events(lines) -> list:
    """The ``data:`` payloads of an SSE body (JSON decoded, "[DONE]" kept as is); checks framing:
    every non-empty line is a data line and events are separated by blank lines."""
    events, blank_before = [], True
    for line in lines:
        if not line:
            blank_before = True
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        assert blank_before, "two data lines without the blank line between events"
        blank_before = False
        payload = line[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def wait_until(pred, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
