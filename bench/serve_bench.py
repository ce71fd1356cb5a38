"""The HTTP server under load: throughput, time to first token and inter-token latency.

    genfuse bench serve [--url URL | --model M] [--concurrency 1,4,16,64] [--rate R]
                        [--requests-per-level N] [--prompt-words 8:96] [--output-tokens 16:64]
                        [--threads 1] [--llama-cpp PYTHON] [--in-process] [--seed 0] [--json results.json]

This process is the load generator only (asyncio + httpx); the servers run in their own
processes. Without ``--url`` it starts ``genfuse serve MODEL`` itself (port 0, torch and the C++
kernels on ``--threads`` threads) and, with ``--llama-cpp PYTHON`` (a Python that has
``llama-cpp-python[server]``), llama.cpp's OpenAI server (``python -m llama_cpp.server``) on
the same GGUF with the same threads, one after the other, and reports the ratios.
``--in-process`` then runs the same levels straight on `AsyncEngine` inside this process (no
HTTP, no JSON, the same engine defaults): the server's own cost is the ratio to that.

The request mix is seeded: each request's prompt is ``--prompt-words`` random English words
and its ``max_tokens`` is drawn from ``--output-tokens``; generation never stops early (EOS
suppressed: genfuse's ``ignore_eos``, llama.cpp's ``logit_bias`` on the EOS id) so both
servers do exactly the same work. Every request is streamed (``stream_options.include_usage``):
TTFT = request sent to the first content chunk, ITL = the gaps between content chunks, tokens
from the usage chunk. Per level: ``--concurrency C`` keeps C requests in flight (each worker
sends the next when one ends); ``--rate R`` instead sends requests as a Poisson process of R
requests/s. Throughput = generated tokens / wall seconds of the level. Percentiles are
p50/p90/p99 over all requests (TTFT) or all gaps (ITL). One warm-up request per server first.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force "
         "education").split()


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="genfuse bench serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running OpenAI-compatible server (default: start genfuse serve)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="what genfuse serve loads (default smollm2)")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels (default 1,4,16,64)")
    p.add_argument("--rate", type=float, default=None,
                   help="requests/s (Poisson) instead of fixed concurrency: one level at this rate")
    p.add_argument("--requests-per-level", type=int, default=None,
                   help="requests per level (default: max(8, concurrency))")
    p.add_argument("--prompt-words", default="8:96", help="MIN:MAX words per prompt (default 8:96)")
    p.add_argument("--output-tokens", default="16:64", help="MIN:MAX max_tokens (default 16:64)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for each server (genfuse serve --threads, llama.cpp --n_threads; default 1)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="genfuse serve --num-kv-blocks")
    p.add_argument("--llama-cpp", default=None, metavar="PYTHON",
                   help="also run llama.cpp's server with this Python (one with llama-cpp-python[server])")
    p.add_argument("--in-process", action="store_true",
                   help="also run the same levels straight on AsyncEngine in this process (no HTTP): what the "
                        "server costs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    return p


def _range(text: str, name: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+):(\d+)", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise SystemExit(f"genfuse bench serve: error: --{name} must be MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def request_mix(n: int, seed: int, words: tuple[int, int], out: tuple[int, int]) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))),
             "max_tokens": rng.randint(*out)} for _ in range(n)]


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "n": 0}
    s = sorted(xs)

    def q(f):  # nearest rank
        return s[min(len(s) - 1, max(0, int(round(f * len(s) + 0.5)) - 1))]

    return {"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "mean": statistics.fmean(s), "n": len(s)}


# --------------------------------------------------------------------------- the load


async def _one(client, model: str, req: dict, extra: dict) -> dict:
    """One streamed request on ``client`` (an httpx.AsyncClient): its TTFT, gaps, tokens."""
    body = {"model": model, "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    t0 = time.perf_counter()
    stamps, tokens, error = [], None, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            ev = json.loads(data)
            if "error" in ev:
                error = ev["error"].get("message")
            if ev.get("choices") and ev["choices"][0].get("text"):
                stamps.append(time.perf_counter())
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
    end = time.perf_counter()
    if error:
        return {"error": error}
    tokens = tokens if tokens is not None else len(stamps)
    if tokens != req["max_tokens"]:  # EOS is suppressed: anything shorter was cut (a server's fault)
        return {"error": f"{tokens} tokens instead of max_tokens={req['max_tokens']}"}
    return {"ttft": (stamps[0] - t0) if stamps else None, "itl": [b - a for a, b in zip(stamps, stamps[1:])],
            "e2e": end - t0, "tokens": tokens, "chunks": len(stamps)}


async def _drive(one, reqs: list[dict], *, concurrency: int | None, rate: float | None, seed: int) -> dict:
    """Send ``reqs`` through ``one(req)`` at fixed concurrency or a Poisson rate; the level's stats."""
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    if rate is None:
        queue = list(reversed(reqs))
        results = []

        async def worker():
            while queue:
                results.append(await one(queue.pop()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:
        rng = random.Random(seed + 1)
        tasks = []
        for req in reqs:
            tasks.append(asyncio.create_task(one(req)))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    tokens = sum(r["tokens"] for r in ok)
    return {"concurrency": concurrency, "rate": rate, "requests": len(reqs), "completed": len(ok),
            "errors": errors[:5], "num_errors": len(errors), "wall_s": wall, "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall, "requests_per_s": len(ok) / wall,
            "ttft_s": percentiles([r["ttft"] for r in ok if r["ttft"] is not None]),
            "itl_s": percentiles([g for r in ok for g in r["itl"]]),
            "e2e_s": percentiles([r["e2e"] for r in ok]), "loadavg_1min": [load0, os.getloadavg()[0]]}


async def run_level(url: str, model: str, reqs: list[dict], extra: dict, *, concurrency: int | None,
                    rate: float | None, seed: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=max(concurrency or 0, 256), max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600), limits=limits) as client:
        return await _drive(lambda req: _one(client, model, req, extra), reqs, concurrency=concurrency,
                            rate=rate, seed=seed)


async def run_level_in_process(aengine, reqs: list[dict], *, concurrency: int | None, rate: float | None,
                               seed: int) -> dict:
    """The same level straight on `AsyncEngine` in this process (no HTTP, no JSON): the
    baseline that shows what the server itself costs."""
    from genfuse.runtime.sampling import SamplingParams

    async def one(req):
        params = SamplingParams(max_tokens=req["max_tokens"], temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        stamps, tokens = [], 0
        async for out in aengine.generate(req["prompt"], params):
            if out.new_text:
                stamps.append(time.perf_counter())
            tokens = len(out.token_ids)
        if tokens != req["max_tokens"]:
            return {"error": f"{tokens} tokens instead of max_tokens={req['max_tokens']}"}
        return {"ttft": (stamps[0] - t0) if stamps else None, "itl": [b - a for a, b in zip(stamps, stamps[1:])],
                "e2e": time.perf_counter() - t0, "tokens": tokens}

    return await _drive(one, reqs, concurrency=concurrency, rate=rate, seed=seed)


# --------------------------------------------------------------------------- the servers


class _Launched:
    """A server subprocess on 127.0.0.1; ``url`` once it answers."""

    def __init__(self, cmd: list[str], env: dict, ready: "callable", name: str):
        self.name = name
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-serve-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        self.lines: list[str] = []
        self.url = None
        threading.Thread(target=self._read, daemon=True).start()
        self.url = ready(self)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _wait(pred, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the server exited with code {proc.returncode}")
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout} s: {what}")


def _env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return env


def start_genfuse(args) -> _Launched:
    cmd = [sys.executable, "-m", "genfuse", "serve", args.model, "--port", "0", "--log-level", "warning",
           "--threads", str(args.threads)]
    if args.num_kv_blocks:
        cmd += ["--num-kv-blocks", str(args.num_kv_blocks)]

    def ready(s):
        return _wait(lambda: next((re.search(r"ready at (http://\S+)/v1", ln).group(1) for ln in s.lines
                                   if "ready at" in ln), None), 300, "genfuse serve to load", s.proc)

    return _Launched(cmd, _env(args.threads), ready, "genfuse")


def start_llama_cpp(python: str, gguf: Path, threads: int) -> _Launched:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--n_ctx", "8192", "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--model_alias", "llama-cpp",
           # its default interrupts the running request whenever a new one arrives (they end after a
           # token or two): off, requests queue behind each other, each run to the end
           "--interrupt_requests", "False"]
    url = f"http://127.0.0.1:{port}"

    def ready(s):
        import httpx

        def up():
            try:
                return httpx.get(url + "/v1/models", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(up, 300, "llama.cpp's server to load", s.proc)
        return url

    return _Launched(cmd, _env(threads), ready, "llama.cpp")


def bench_server(name: str, url: str | None, model: str, extra: dict, args, levels) -> dict:
    """``url`` None: the in-process AsyncEngine baseline (``--in-process``)."""
    words, out = _range(args.prompt_words, "prompt-words"), _range(args.output_tokens, "output-tokens")
    if url is None:
        from genfuse.runtime.engine import AsyncEngine, Engine

        from genfuse.runtime.server.launch import set_engine_threads

        kw = {"num_kv_blocks": args.num_kv_blocks} if args.num_kv_blocks else {}
        eng = Engine(args.model, **kw)
        set_engine_threads(eng, args.threads)  # as genfuse serve --threads does
        aengine = AsyncEngine(eng)

        def level_fn(reqs, **kw2):
            return run_level_in_process(aengine, reqs, **kw2)
    else:
        def level_fn(reqs, **kw2):
            return run_level(url, model, reqs, extra, **kw2)

    async def run_all():
        await level_fn(request_mix(1, args.seed + 999, words, (8, 8)), concurrency=1, rate=None,
                       seed=args.seed)  # warm-up
        res = []
        for i, level in enumerate(levels):
            n = args.requests_per_level or max(8, level or 16)
            reqs = request_mix(n, args.seed + i, words, out)
            r = await level_fn(reqs, concurrency=None if args.rate else level, rate=args.rate, seed=args.seed + i)
            res.append(r)
            _print_level(name, args, level, r)
        return res

    return {"server": name, "levels": asyncio.run(run_all())}


def _print_level(name, args, level, r) -> None:
    what = f"rate {args.rate}/s" if args.rate else f"concurrency {level:>3}"
    errs = f", {r['num_errors']} errors" if r["num_errors"] else ""
    print(f"  {name:>10} {what}: {r['output_tokens_per_s']:7.1f} tok/s, TTFT p50 {_ms(r['ttft_s']['p50'])} "
          f"p99 {_ms(r['ttft_s']['p99'])}, ITL p50 {_ms(r['itl_s']['p50'])} p99 {_ms(r['itl_s']['p99'])}{errs}",
          flush=True)


def _ms(x):
    return "   -   " if x is None else f"{x * 1000:6.0f} ms"


def machine_facts(threads: int) -> dict:
    facts = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
             "server_threads": threads}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for key in ("Model name", "Flags"):
            m = re.search(rf"^{key}:\s*(.*)$", out, re.M)
            if m:
                facts[key.lower().replace(" ", "_")] = m.group(1) if key != "Flags" else " ".join(
                    f for f in m.group(1).split() if f.startswith(("avx", "fma", "f16c")))
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        facts["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return facts


def main(argv=None, args=None) -> int:
    args = args or build_parser().parse_args(argv)
    levels = [None] if args.rate else [int(x) for x in args.concurrency.split(",")]
    if not args.rate and any(c < 1 for c in levels):
        raise SystemExit("genfuse bench serve: error: concurrency levels must be >= 1")
    results = {"machine": machine_facts(args.threads), "model": args.model,
               "mix": {"prompt_words": args.prompt_words, "output_tokens": args.output_tokens, "seed": args.seed,
                       "temperature": 0, "eos": "suppressed"}, "servers": []}
    print(f"genfuse bench serve: {args.model}, levels {levels if not args.rate else f'rate {args.rate}/s'}, "
          f"{args.threads} server threads", flush=True)
    if args.url:
        results["servers"].append(bench_server("server", args.url.rstrip("/"), args.model, {"ignore_eos": True},
                                               args, levels))
    else:
        s = start_genfuse(args)
        try:
            results["servers"].append(bench_server("genfuse", s.url, args.model, {"ignore_eos": True}, args, levels))
        finally:
            s.stop()
        if args.llama_cpp:
            from genfuse.runtime.registry import resolve
            from genfuse.runtime.tokenizer import Tokenizer

            gguf = resolve(args.model).path
            eos = Tokenizer.from_gguf(gguf).eos_token_id
            s = start_llama_cpp(args.llama_cpp, gguf, args.threads)
            try:
                results["servers"].append(bench_server("llama.cpp", s.url, "llama-cpp",
                                                       {"logit_bias": {str(eos): -100.0}}, args, levels))
            finally:
                s.stop()
        else:
            results["llama_cpp"] = "not run: pass --llama-cpp PYTHON (a Python with llama-cpp-python[server])"
    if args.in_process:
        results["servers"].append(bench_server("in-process", None, args.model, {}, args, levels))
        g = results["servers"][0]["levels"]
        b = results["servers"][-1]["levels"]
        results["server_over_in_process"] = [
            {"concurrency": x["concurrency"], "throughput": x["output_tokens_per_s"] / y["output_tokens_per_s"],
             "ttft_p50": _ratio(x["ttft_s"]["p50"], y["ttft_s"]["p50"]),
             "itl_p50": _ratio(x["itl_s"]["p50"], y["itl_s"]["p50"])} for x, y in zip(g, b)]
        for r in results["server_over_in_process"]:
            print(f"  server / in-process at concurrency {r['concurrency']}: throughput {r['throughput']:.2f}x, "
                  f"TTFT p50 {r['ttft_p50']:.2f}x, ITL p50 {r['itl_p50']:.2f}x", flush=True)
    named = {s["server"]: s["levels"] for s in results["servers"]}
    if "genfuse" in named and "llama.cpp" in named:
        g, l = named["genfuse"], named["llama.cpp"]
        results["ratios_genfuse_over_llama_cpp"] = [
            {"concurrency": a["concurrency"], "throughput": a["output_tokens_per_s"] / b["output_tokens_per_s"],
             "ttft_p50": _ratio(a["ttft_s"]["p50"], b["ttft_s"]["p50"]),
             "itl_p50": _ratio(a["itl_s"]["p50"], b["itl_s"]["p50"])} for a, b in zip(g, l)]
        for r in results["ratios_genfuse_over_llama_cpp"]:
            print(f"  genfuse / llama.cpp at concurrency {r['concurrency']}: throughput {r['throughput']:.2f}x, "
                  f"TTFT p50 {r['ttft_p50']:.2f}x, ITL p50 {r['itl_p50']:.2f}x", flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(path)
        print(f"wrote {path}")
    bad = sum(lv["num_errors"] for s in results["servers"] for lv in s["levels"])
    return 1 if bad else 0


def _ratio(a, b):
    return a / b if a is not None and b else float("nan")


if __name__ == "__main__":
    sys.exit(main())
