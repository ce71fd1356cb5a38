"""The engine API the server builds on, on a tiny random-weight Llama (CPU, torch references):
`Engine.stats` snapshots (running / waiting, KV usage, prefix hits, tokens, finished by reason),
per-token logprobs against transformers' own log-softmax, the presence / frequency penalties
against a step-by-step transformers oracle, and `AsyncEngine.stats` / `shutdown`."""
from __future__ import annotations

import asyncio
import functools
import tempfile

import pytest
import torch
from genfuse.runtime.engine import AsyncEngine, Engine, EngineDeadError
from genfuse.runtime.sampling import SamplingParams
from llm_helpers import one_thread, tiny_folder

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@functools.lru_cache(maxsize=None)
def tiny():
    model, folder = tiny_folder("llama", tempfile.mkdtemp(prefix="engine_api_"))
    return model, str(folder)


def engine(**kw) -> Engine:
    kw = {"num_kv_blocks": 32, "block_size": 4, **kw}
    return Engine(tiny()[1], device="cpu", backend="torch", **kw)


def run_all(e: Engine, max_steps: int = 2000) -> dict:
    done, outs = {}, {}
    for _ in range(max_steps):
        if not e.has_unfinished_requests():
            return done, outs
        for out in e.step():
            outs.setdefault(out.request_id, []).append(out)
            if out.finished:
                done[out.request_id] = out
    raise AssertionError("engine did not finish")


def hf_logits(ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return tiny()[0](torch.tensor([ids])).logits[0].double()  # (T, V)


def test_stats_snapshot_counts():
    e = engine(max_num_seqs=2)
    s0 = e.stats
    assert (s0.num_running, s0.num_waiting, s0.kv_cache_usage, s0.prefix_cache_hit_rate) == (0, 0, 0.0, 0.0)
    assert s0.num_free_kv_blocks == s0.num_kv_blocks == 32 and s0.finished == {}
    shared = list(range(10, 22))  # three full blocks
    e.add_request("a", shared + [5, 6], SamplingParams(max_tokens=5, **GREEDY))
    e.add_request("b", [7, 8, 9], SamplingParams(max_tokens=3, **GREEDY))
    e.add_request("c", [3, 4], SamplingParams(max_tokens=50, **GREEDY))
    assert (e.stats.num_running, e.stats.num_waiting) == (0, 3)
    e.step()
    st = e.stats
    assert (st.num_running, st.num_waiting) == (2, 1)  # max_num_seqs=2
    assert 0 < st.kv_cache_usage < 1 and st.num_steps == 1
    assert e.abort("c") and not e.abort("c")
    done, _ = run_all(e)
    e.add_request("d", shared + [1], SamplingParams(max_tokens=2, **GREEDY))  # hits a's 12 tokens
    done2, _ = run_all(e)
    st = e.stats
    assert st.finished == {"length": 3, "abort": 1}
    assert st.num_generation_tokens == 5 + 3 + 2
    assert st.num_prompt_tokens == 14 + 3 + 13  # c was aborted before it was admitted
    assert st.num_cached_prompt_tokens == 12
    assert st.prefix_cache_hit_rate == pytest.approx(12 / 30)
    assert (st.num_running, st.num_waiting, st.kv_cache_usage) == (0, 0, 0.0)
    with pytest.raises(AttributeError):
        st.num_running = 3  # a snapshot, not a live view


def test_logprobs_match_transformers():
    e = engine()
    prompt = [11, 12, 13, 14, 15]
    e.add_request("g", prompt, SamplingParams(max_tokens=6, logprobs=3, **GREEDY))
    e.add_request("s", prompt[:3], SamplingParams(max_tokens=6, logprobs=0, temperature=1.0, seed=3,
                                                  ignore_eos=True))
    e.add_request("n", prompt[:4], SamplingParams(max_tokens=2, **GREEDY))
    done, outs = run_all(e)
    assert all(o.new_logprobs is None for o in outs["n"])
    for rid, p, k in (("g", prompt, 3), ("s", prompt[:3], 0)):
        lps = [lp for o in outs[rid] for lp in o.new_logprobs]
        ids = done[rid].token_ids
        assert [lp.token_id for lp in lps] == ids
        ref = torch.log_softmax(hf_logits(p + ids)[len(p) - 1:-1], dim=-1)  # (n, V): each token's distribution
        for j, lp in enumerate(lps):
            assert lp.logprob == pytest.approx(ref[j, ids[j]].item(), abs=1e-4)
            assert len(lp.top) == k
            want = torch.topk(ref[j], k)
            assert [t for t, _ in lp.top] == want.indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(want.values.tolist(), abs=1e-4)
        if rid == "g":  # greedy: the chosen token is the best alternative
            assert all(lp.top[0] == (lp.token_id, lp.logprob) for lp in lps)


@pytest.mark.parametrize("presence,frequency", [(1.5, 0.0), (0.0, 0.7), (-0.5, 1.2)])
def test_presence_frequency_penalties_match_oracle(presence, frequency):
    """Greedy with OpenAI's penalties: at each step argmax(logits - presence * seen -
    frequency * count) over the generated tokens only (the prompt is not counted)."""
    prompt = [100, 101]  # this model's greedy continuation repeats 38, 89, 207 and 222 within 14 tokens
    n = 14
    e = engine()
    e.add_request("p", prompt, SamplingParams(max_tokens=n, presence_penalty=presence,
                                              frequency_penalty=frequency, **GREEDY))
    e.add_request("plain", prompt, SamplingParams(max_tokens=n, **GREEDY))  # batched beside it, unpenalized
    done, _ = run_all(e)
    out: list[int] = []
    for _ in range(n):
        logits = hf_logits(prompt + out)[-1].clone()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).double()
        logits -= presence * (counts > 0).double() + frequency * counts
        out.append(int(logits.argmax()))
    assert done["p"].token_ids == out
    plain = []
    for _ in range(n):
        plain.append(int(hf_logits(prompt + plain)[-1].argmax()))
    assert done["plain"].token_ids == plain
    assert out != plain  # the penalties changed something (else this test checked nothing)


def test_async_stats_and_shutdown_end_consumers():
    async def main():
        a = AsyncEngine(engine())
        assert a.stats.num_running == 0
        got = []

        async def long():
            async for out in a.generate([5, 6, 7], SamplingParams(max_tokens=25, **GREEDY), request_id="x"):
                got.append(out)

        task = asyncio.create_task(long())
        for _ in range(2000):  # bounded: until the first token is out
            await asyncio.sleep(0.005)
            if got:
                break
        assert got and a.stats.num_running == 1 and a.stats.kv_cache_usage > 0
        await a.shutdown()
        with pytest.raises(EngineDeadError, match="shut down"):
            await asyncio.wait_for(task, 30)
        with pytest.raises(EngineDeadError):
            async for _ in a.generate([5], SamplingParams(max_tokens=1)):
                pass

    asyncio.run(main())


def test_abort_with_output_and_external_async_aborts():
    e = engine()
    e.add_request("a", [5, 6, 7], SamplingParams(max_tokens=20, **GREEDY))
    got = []
    for _ in range(3):
        got += [o.new_token_ids for o in e.step()]
    last = e.abort_with_output("a")
    assert last.finished and last.finish_reason == "abort" and last.new_token_ids == []
    assert last.token_ids == [t for ids in got for t in ids] and len(last.token_ids) == 3
    assert e.abort_with_output("a") is None and e.stats.finished == {"abort": 1}

    async def main():
        a = AsyncEngine(engine())
        outs = []

        async def consume(rid):
            async for out in a.generate([5, 6, 7], SamplingParams(max_tokens=200, **GREEDY), request_id=rid):
                outs.append(out)
            return outs[-1]

        task = asyncio.create_task(consume("x"))
        for _ in range(2000):
            await asyncio.sleep(0.005)
            if len(outs) >= 2:
                break
        a.abort("x")  # from outside: the consumer still reading gets a last "abort" output
        final = await asyncio.wait_for(task, 30)
        assert final.finish_reason == "abort" and final.finished
        assert "".join(o.new_text for o in outs) == final.text
        # aborted right after generate() queued it (usually before the worker added it to the
        # engine, when add and abort are applied together): still one last "abort" output
        early = asyncio.create_task(consume("y"))
        await asyncio.sleep(0)
        a.abort("y")
        final = await asyncio.wait_for(early, 30)
        assert final.request_id == "y" and final.finish_reason == "abort"
        await a.shutdown()
        return a.stats

    st = asyncio.run(main())
    assert st.num_running == 0 and st.kv_cache_usage == 0.0
