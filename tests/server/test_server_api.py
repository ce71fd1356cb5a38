"""`genfuse serve` on the real default model (SmolLM2-135M, CPU), one server for the module:
the official `openai` client against `LLM.generate` / `LLM.chat` (greedy equal, streamed equal
to non-streamed, exact usage), the raw protocol with httpx (SSE framing and chunk order, error
bodies for malformed requests, request ids, logprobs, echo, n), /metrics counters, 32
concurrent streams each equal to its solo result, and 8 clients disconnecting mid-stream."""
from __future__ import annotations

import asyncio
import json
import random
import re
import shlex
import uuid
from pathlib import Path

import httpx
import pytest
from server_helpers import ServerProcess, sse_events, wait_until

from genfuse.runtime.sampling import SamplingParams

NUM_KV_BLOCKS = 512
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--num-kv-blocks", str(NUM_KV_BLOCKS), "--max-num-seqs", "64").start()
    yield s
    code = s.stop()
    assert code == 0, s.log()[-3000:]


@pytest.fixture(scope="module")
def llm():
    from llm_helpers import one_thread, smollm_llm

    with one_thread():
        yield smollm_llm()


def greedy(n=8, **kw):
    return SamplingParams(max_tokens=n, temperature=0, **kw)


def metric(m: dict, name: str) -> float:
    return m.get(name, 0.0)


# --------------------------------------------------------------------------- the openai client


def test_completion_greedy_equals_llm_with_exact_usage(server, llm):
    prompt = "The capital of France is"
    [want] = llm.generate([prompt], greedy(12))
    r = server.openai().completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.object == "text_completion" and r.model == MODEL
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_greedy_equals_llm_chat(server, llm):
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a color."}]
    want = llm.chat(messages, greedy(10))
    r = server.openai().chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(llm.chat_prompt(messages))
    assert r.usage.completion_tokens == len(want.token_ids)


def test_streamed_equals_non_streamed(server):
    client = server.openai()
    kw = dict(model=MODEL, max_tokens=14, temperature=0.9, seed=1234)
    full = client.completions.create(prompt="Write a list of fruits:", **kw)
    chunks = list(client.completions.create(prompt="Write a list of fruits:", stream=True,
                                            stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    full = client.chat.completions.create(messages=messages, **kw)
    chunks = list(client.chat.completions.create(messages=messages, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_models_and_health(server):
    assert server.health_while_loading and server.health_while_loading[0] == 503
    assert server.health_after_ready == 200
    [m] = server.openai().models.list().data
    assert m.id == MODEL and m.owned_by == "genfuse"
    with server.client() as c:
        assert c.get(f"/v1/models/{MODEL}").json()["max_model_len"] > 0
        r = c.get("/v1/models/nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# --------------------------------------------------------------------------- the raw protocol


def _stream_lines(c: httpx.Client, path: str, body: dict) -> tuple[httpx.Response, list[str]]:
    with c.stream("POST", path, json=body) as r:
        return r, list(r.iter_lines())


def test_sse_framing_and_chunk_order(server):
    with server.client() as c:
        r, lines = _stream_lines(c, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0, "n": 2,
            "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(lines)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = events[:-1]
    assert len({e["id"] for e in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(e["object"] == "chat.completion.chunk" for e in chunks)
    *body, usage = chunks
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    assert all(e["usage"] is None and len(e["choices"]) == 1 for e in body)
    for index in (0, 1):
        mine = [e["choices"][0] for e in body if e["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}  # the role first
        assert all("role" not in ch["delta"] for ch in mine[1:])
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] in ("stop", "length")
        assert all(ch["finish_reason"] is None for ch in mine[:-1])
    comp = sum(1 for e in body if e["choices"][0]["delta"].get("content"))
    assert comp <= usage["usage"]["completion_tokens"]
    # completions: no usage chunk unless asked, and no "usage" key on the chunks then
    with server.client() as c:
        _, lines = _stream_lines(c, "/v1/completions", {"prompt": "Hello", "max_tokens": 3, "stream": True})
    events = sse_events(lines)
    assert events[-1] == "[DONE]" and all("usage" not in e and e["choices"] for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


BAD = [  # (body or raw bytes, endpoint, status, param)
    (b"{not json", "completions", 400, None),
    (b"[1, 2]", "completions", 400, None),
    ({}, "completions", 400, "prompt"),
    ({"prompt": 5}, "completions", 400, "prompt"),
    ({"prompt": []}, "completions", 400, "prompt"),
    ({"prompt": [1, "a"]}, "completions", 400, "prompt"),
    ({"prompt": [[1, 2], [3, 1.5]]}, "completions", 400, "prompt"),
    ({"prompt": [10**9]}, "completions", 400, "prompt"),
    ({"prompt": ""}, "completions", 400, "prompt"),
    ({"prompt": ["a"] * 300, "n": 4}, "completions", 400, "prompt"),
    ({"prompt": "x", "max_tokens": "16"}, "completions", 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "completions", 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "completions", 400, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "completions", 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, "completions", 400, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "completions", 400, "top_p"),
    ({"prompt": "x", "n": 0}, "completions", 400, "n"),
    ({"prompt": "x", "n": 1000}, "completions", 400, "n"),
    ({"prompt": "x", "stop": 3}, "completions", 400, "stop"),
    ({"prompt": "x", "stop": [""]}, "completions", 400, "stop"),
    ({"prompt": "x", "seed": "1"}, "completions", 400, "seed"),
    ({"prompt": "x", "stream": "yes"}, "completions", 400, "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "completions", 400, "stream_options"),
    ({"prompt": "x", "logprobs": 50}, "completions", 400, "logprobs"),
    ({"prompt": "x", "presence_penalty": 3}, "completions", 400, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": "a"}, "completions", 400, "frequency_penalty"),
    ({"prompt": "x", "top_k": -5}, "completions", 400, "top_k"),
    ({"prompt": "x", "min_p": 2}, "completions", 400, "min_p"),
    ({"prompt": "x", "repetition_penalty": 0}, "completions", 400, "repetition_penalty"),
    ({"prompt": "x", "ignore_eos": 1}, "completions", 400, "ignore_eos"),
    ({"prompt": "x", "stop_token_ids": [-1]}, "completions", 400, "stop_token_ids"),
    ({"prompt": "x", "best_of": 3}, "completions", 400, "best_of"),
    ({"prompt": "x", "suffix": "end"}, "completions", 400, "suffix"),
    ({"prompt": "x", "logit_bias": {"5": 10}}, "completions", 400, "logit_bias"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, "completions", 400, "echo"),
    ({"prompt": "x", "model": 7}, "completions", 400, "model"),
    ({"prompt": "x", "model": "gpt-4"}, "completions", 404, "model"),
    ({"messages": "hi"}, "chat/completions", 400, "messages"),
    ({"messages": []}, "chat/completions", 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "chat/completions", 400, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "chat/completions", 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "chat/completions", 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "chat/completions", 400, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "chat/completions", 400,
     "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "chat/completions", 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
     "chat/completions", 400, "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}, "chat/completions", 400,
     "max_completion_tokens"),
]


@pytest.mark.parametrize("body,endpoint,status,param", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_malformed_requests(server, body, endpoint, status, param):
    with server.client() as c:
        if isinstance(body, bytes):
            r = c.post(f"/v1/{endpoint}", content=body, headers={"content-type": "application/json"})
        else:
            r = c.post(f"/v1/{endpoint}", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err
    if param is not None and status == 400:
        assert param.split(".")[0].split("[")[0] in err["message"], err["message"]  # the message names the field
    assert "Traceback" not in r.text


def test_too_long_prompts_get_the_numbers(server):
    with server.client() as c:
        max_len = c.get(f"/v1/models/{MODEL}").json()["max_model_len"]
        r = c.post("/v1/completions", json={"prompt": [5] * (max_len - 4), "max_tokens": 10})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
        assert str(max_len) in err["message"] and str(max_len - 4) in err["message"]
        assert str(max_len + 6) in err["message"]
        r = c.post("/v1/completions", json={"prompt": [5] * max_len})
        assert r.status_code == 400 and str(max_len) in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "prompt"


def test_unknown_routes_and_methods_use_the_error_body(server):
    with server.client() as c:
        r = c.post("/v1/completions", content=b"x" * ((32 << 20) + 1), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        r = c.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = c.get("/v1/completions")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_request_id_and_cached_tokens(server):
    nonce = uuid.uuid4().hex
    prompt = f"{nonce} is a code word. Remember it and repeat it twice, then count to ten, please, slowly:"
    with server.client() as c:
        r1 = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}, headers={"X-Request-Id": "abc-123"})
        r2 = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
        r3 = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"X-Request-Id": "bad id!"})
    assert r1.headers["x-request-id"] == "abc-123" and r1.json()["id"] == "cmpl-abc-123"
    assert re.fullmatch(r"[0-9a-f]{32}", r3.headers["x-request-id"])  # an unusable id is replaced
    assert r2.headers["x-request-id"] != "abc-123"
    u1, u2 = r1.json()["usage"], r2.json()["usage"]
    n = u1["prompt_tokens"]
    assert n > 16
    assert u1["prompt_tokens_details"]["cached_tokens"] == 0
    assert u2["prompt_tokens_details"]["cached_tokens"] == (n - 1) // 16 * 16  # whole blocks, never the last token
    assert "abc-123" in server.log()  # the access log line carries the id


def test_logprobs_echo_n_penalties(server, llm):
    prompt = "One, two, three,"
    [want] = llm.generate([prompt], greedy(5))
    with server.client() as c:
        r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0, "logprobs": 3}).json()
        lp = r["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == r["usage"]["completion_tokens"] == 5
        assert "".join(lp["tokens"]) == r["choices"][0]["text"] == want.text
        for tok, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
            assert len(top) == 3 and v <= 0 and max(top.values()) == pytest.approx(v)  # greedy: the best
        assert lp["text_offset"][0] == 0 and lp["text_offset"][1] == len(lp["tokens"][0])
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                                 "logprobs": True, "top_logprobs": 2, "temperature": 0}).json()
        content = r["choices"][0]["logprobs"]["content"]
        assert len(content) == 3 and all(len(e["top_logprobs"]) == 2 and e["bytes"] is not None for e in content)
        r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0, "echo": True}).json()
        assert r["choices"][0]["text"] == prompt + want.text
        body = {"prompt": ["Red, green,", prompt], "max_tokens": 6, "temperature": 1.0, "seed": 7, "n": 2}
        r = c.post("/v1/completions", json=body).json()
        assert [ch["index"] for ch in r["choices"]] == [0, 1, 2, 3]
        solo = c.post("/v1/completions", json={**body, "prompt": prompt, "n": 1}).json()
        assert r["choices"][2]["text"] == solo["choices"][0]["text"]  # choice j of a prompt draws with seed + j
        assert r["usage"]["prompt_tokens"] == 2 * 0 + sum(  # each prompt counted once, not per choice
            c.post("/v1/completions", json={"prompt": p, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
            for p in body["prompt"])
        plain = c.post("/v1/completions", json={"prompt": "la la la la la", "max_tokens": 12, "temperature": 0}).json()
        pen = c.post("/v1/completions", json={"prompt": "la la la la la", "max_tokens": 12, "temperature": 0,
                                              "frequency_penalty": 2.0, "presence_penalty": 2.0}).json()
    assert pen["choices"][0]["text"] != plain["choices"][0]["text"]
    [want_pen] = llm.generate(["la la la la la"], greedy(12, frequency_penalty=2.0, presence_penalty=2.0))
    assert pen["choices"][0]["text"] == want_pen.text


def test_sampling_fields_reach_the_engine(server, llm):
    """stop strings, stop_token_ids and the vLLM extras give what LLM.generate gives with the
    same SamplingParams (seeded sampling, so every field matters to the draw)."""
    cases = [
        ({"stop": ["\n"], "temperature": 0}, dict(stop=("\n",), temperature=0)),
        ({"temperature": 0.9, "seed": 5, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.3},
         dict(temperature=0.9, seed=5, top_k=20, min_p=0.05, repetition_penalty=1.3)),
        ({"temperature": 0, "ignore_eos": True, "stop_token_ids": [198]}, dict(temperature=0, ignore_eos=True,
                                                                                stop_token_ids=(198,))),
    ]
    prompt = "List three animals:\n1."
    reasons = []
    with server.client() as c:
        for body, kw in cases:
            r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 16, **body}).json()
            [want] = llm.generate([prompt], SamplingParams(max_tokens=16, **kw))
            assert (r["choices"][0]["text"], r["choices"][0]["finish_reason"]) == (want.text, want.finish_reason), body
            assert r["usage"]["completion_tokens"] == len(want.token_ids)
            reasons.append(want.finish_reason)
    assert reasons == ["stop", "length", "stop"]  # the stop string and the stop id (198 = "\\n") did end them


def test_metrics_counters_move(server):
    before = server.metrics()
    with server.client() as c:
        r = c.post("/v1/completions", json={"prompt": "Metrics are", "max_tokens": 4, "temperature": 0,
                                            "ignore_eos": True}).json()
        assert c.post("/v1/completions", json={"prompt": 1}).status_code == 400
    after = server.metrics()
    u = r["usage"]
    prompt_tokens = metric(after, "genfuse:prompt_tokens_total") - metric(before, "genfuse:prompt_tokens_total")
    assert prompt_tokens == u["prompt_tokens"]
    assert (metric(after, "genfuse:generation_tokens_total") - metric(before, "genfuse:generation_tokens_total")
            == u["completion_tokens"] == 4)
    key = 'genfuse:requests_finished_total{finished_reason="length"}'
    assert metric(after, key) - metric(before, key) == 1
    assert metric(after, "genfuse:time_to_first_token_seconds_count") - metric(
        before, "genfuse:time_to_first_token_seconds_count") == 1
    assert metric(after, "genfuse:inter_token_latency_seconds_count") - metric(
        before, "genfuse:inter_token_latency_seconds_count") == 3
    key = 'genfuse:http_responses_total{status="400"}'
    assert metric(after, key) - metric(before, key) == 1
    assert after["genfuse:num_requests_running"] == 0 and after["genfuse:kv_cache_usage_perc"] == 0
    assert after["genfuse:num_kv_blocks"] == NUM_KV_BLOCKS
    assert 0 <= after["genfuse:prefix_cache_hit_rate"] <= 1 and "genfuse:num_preemptions_total" in after


# --------------------------------------------------------------------------- concurrency


async def _stream_text(c: httpx.AsyncClient, body: dict) -> tuple[str, str | None, int]:
    text, finish, ntok = "", None, None
    async with c.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                         "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        lines = [line async for line in r.aiter_lines()]
    events = sse_events(lines)
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        if e["choices"]:
            text += e["choices"][0]["text"]
            finish = e["choices"][0]["finish_reason"] or finish
        else:
            ntok = e["usage"]["completion_tokens"]
    return text, finish, ntok


def test_32_concurrent_streams_each_equal_its_solo_result(server, llm):
    rng = random.Random(12)
    words = "river stone light garden window paper engine winter music silver forest ocean".split()
    bodies = []
    for i in range(32):
        prompt = f"Request {i}: " + " ".join(rng.choice(words) for _ in range(rng.randrange(2, 9)))
        temp = 0 if i % 3 == 0 else 0.8
        bodies.append({"prompt": prompt, "max_tokens": 8, "temperature": temp, "seed": 1000 + i, "top_p": 0.95})
    solo = [llm.generate([b["prompt"]], SamplingParams(max_tokens=8, temperature=b["temperature"], seed=b["seed"],
                                                       top_p=0.95), use_tqdm=False)[0] for b in bodies]

    async def main():
        async with server.async_client() as c:
            return await asyncio.wait_for(asyncio.gather(*(_stream_text(c, b) for b in bodies)), 240)

    results = asyncio.run(main())
    for i, ((text, finish, ntok), want) in enumerate(zip(results, solo)):
        assert (text, finish, ntok) == (want.text, want.finish_reason, len(want.token_ids)), i


def test_disconnecting_clients_are_aborted_and_free_their_blocks(server):
    before = server.metrics()

    async def leave_after_two_chunks(c, i):
        async with c.stream("POST", "/v1/completions", json={
                "prompt": f"Client {i} tells a very long story:", "max_tokens": 400, "ignore_eos": True,
                "stream": True}) as r:
            got = 0
            async for line in r.aiter_lines():
                got += line.startswith("data: ")
                if got == 2:
                    return  # closes the connection mid-stream

    async def main():
        async with server.async_client() as c:
            await asyncio.wait_for(asyncio.gather(*(leave_after_two_chunks(c, i) for i in range(8))), 120)

    asyncio.run(main())

    def all_free():
        m = server.metrics()
        return m if m["genfuse:num_requests_running"] == 0 and m["genfuse:kv_cache_usage_perc"] == 0 else None

    after = wait_until(all_free, 30, "the engine to drop the 8 disconnected requests")
    key = 'genfuse:requests_finished_total{finished_reason="abort"}'
    assert metric(after, key) - metric(before, key) == 8
    assert after["genfuse:num_kv_blocks_free"] == NUM_KV_BLOCKS
    gen = metric(after, "genfuse:generation_tokens_total") - metric(before, "genfuse:generation_tokens_total")
    assert gen < 8 * 100  # stopped long before their 400 tokens each
    # a non-streamed request whose client gives up is aborted as well
    with pytest.raises(httpx.ReadTimeout):
        with server.client(timeout=httpx.Timeout(30, read=1.5)) as c:
            c.post("/v1/completions", json={"prompt": "Wait for me", "max_tokens": 2000, "ignore_eos": True})
    wait_until(lambda: metric(server.metrics(), key) - metric(after, key) == 1, 30, "the abort of the gone client")
    assert server.metrics()["genfuse:kv_cache_usage_perc"] == 0


# --------------------------------------------------------------------------- the README's examples


def _readme_block(marker: str) -> str:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = text.index(marker)
    return text[text.index("\n", start) + 1:text.index("```", start + len(marker))]


def test_readme_examples(server):
    # the curl line: its URL, headers and body sent as written (to this server's port)
    cmd = shlex.split(_readme_block("```bash  # serve-curl").replace("\\\n", " "))
    assert cmd[0] == "curl"
    url = next(a for a in cmd if a.startswith("http://127.0.0.1:8000"))
    body = cmd[cmd.index("-d") + 1]
    headers = dict(cmd[i + 1].split(": ", 1) for i, a in enumerate(cmd) if a == "-H")
    with server.client() as c:
        r = c.post(url.replace("http://127.0.0.1:8000", ""), content=body, headers=headers)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    # the python block, run as written with the base_url pointed at this server
    code = _readme_block("```python  # serve-openai").replace("http://127.0.0.1:8000", server.url)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["reply"].choices[0].message.content
    assert "".join(namespace["pieces"])


def test_bench_serve_against_this_server(server, tmp_path):
    from genfuse.bench import serve_bench

    out = tmp_path / "serve.json"
    code = serve_bench.main(["--url", server.url, "--model", MODEL, "--concurrency", "1,3", "--requests-per-level",
                             "3", "--output-tokens", "3:5", "--prompt-words", "3:6", "--json", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    [s] = res["servers"]
    assert [lv["concurrency"] for lv in s["levels"]] == [1, 3]
    for lv in s["levels"]:
        assert lv["completed"] == 3 and lv["num_errors"] == 0
        assert 9 <= lv["output_tokens"] <= 15  # max_tokens 3..5 each, EOS ignored: exactly what was asked
        assert lv["ttft_s"]["n"] == 3 and lv["ttft_s"]["p50"] <= lv["ttft_s"]["p99"]
        assert 0 < lv["itl_s"]["n"] <= lv["output_tokens"] - 3  # gaps between content chunks
    code = serve_bench.main(["--url", server.url, "--model", MODEL, "--rate", "20", "--requests-per-level", "3",
                             "--output-tokens", "2:2", "--prompt-words", "3:4", "--json", str(out)])
    [lv] = json.loads(out.read_text())["servers"][0]["levels"]
    assert code == 0 and lv["rate"] == 20 and lv["completed"] == 3 and lv["output_tokens"] == 6
    assert serve_bench.request_mix(4, 1, (3, 6), (3, 5)) == serve_bench.request_mix(4, 1, (3, 6), (3, 5))
    assert serve_bench.percentiles([3.0, 1.0, 2.0])["p50"] == 2.0
