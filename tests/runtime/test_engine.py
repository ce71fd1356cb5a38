"""The engine end to end on tiny random-weight models (CPU, torch references): each request's
greedy tokens equal transformers' `generate` of that prompt alone, whatever runs beside it,
the chunk size, preemption, prefix-cache hits and arrival order; aborts free blocks; seeded
sampling reproduces per request; bad requests are refused with the numbers."""
from __future__ import annotations

import asyncio
import functools
import random
import tempfile

import pytest
import torch
from genfuse.runtime.engine import AsyncEngine, Engine
from genfuse.runtime.sampling import SamplingParams
from llm_helpers import hf_greedy, one_thread, tiny_folder

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@functools.lru_cache(maxsize=None)
def tiny(kind: str):
    model, folder = tiny_folder(kind, tempfile.mkdtemp(prefix=f"engine_{kind}_"))
    return model, str(folder)


@functools.lru_cache(maxsize=None)
def oracle(kind: str, prompt: tuple, n: int) -> list[int]:
    return hf_greedy(tiny(kind)[0], list(prompt), n)


def prompts(seed: int, count: int, lo=1, hi=40, shared: int = 0):
    rng = random.Random(seed)
    system = [rng.randrange(3, 288) for _ in range(shared)]
    return [tuple(system + [rng.randrange(3, 288) for _ in range(rng.randrange(lo, hi))]) for _ in range(count)]


def run_all(engine: Engine, reqs: dict, max_steps: int = 5000) -> dict:
    done = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return done
        for out in engine.step():
            if out.finished:
                assert out.request_id not in done
                done[out.request_id] = out
    raise AssertionError("engine did not finish")


@pytest.mark.parametrize("kind", ["llama", "smol", "gpt2"])
def test_batched_equals_alone_and_transformers(kind):
    ps = prompts(0, 6, shared=20)
    n = 8
    engine = Engine(tiny(kind)[1], device="cpu", backend="torch", max_num_batched_tokens=32, block_size=16)
    for i, p in enumerate(ps):
        engine.add_request(str(i), list(p), SamplingParams(max_tokens=n, **GREEDY))
    done = run_all(engine, ps)
    for i, p in enumerate(ps):
        assert done[str(i)].token_ids == oracle(kind, p, n), i
        assert done[str(i)].finish_reason == "length"
    assert engine.stats.num_cached_prompt_tokens > 0  # the shared 20-token prefix hit
    assert engine.kv.block_manager.num_free_blocks == engine.kv.num_blocks


@pytest.mark.parametrize("setting", [
    dict(num_kv_blocks=12, block_size=4, max_num_batched_tokens=16),  # preemption
    dict(num_kv_blocks=64, block_size=32, max_num_batched_tokens=5),   # tiny chunks
    dict(num_kv_blocks=200, block_size=16, enable_prefix_caching=False, enable_chunked_prefill=False),
], ids=["preempt", "chunks", "plain"])
def test_schedules_do_not_change_tokens(setting):
    kind = "llama"
    ps = prompts(1, 5, lo=3, hi=30, shared=9)
    n = 10
    engine = Engine(tiny(kind)[1], device="cpu", backend="torch", max_model_len=48, **setting)
    engine.kv.k.fill_(float("nan"))  # a slot read before it is written turns the logits NaN
    engine.kv.v.fill_(float("nan"))
    rng = random.Random(3)
    order = list(range(len(ps)))
    rng.shuffle(order)
    done = {}
    for step in range(5000):  # arrivals staggered over the first steps
        if step < len(order):
            i = order[step]
            engine.add_request(str(i), list(ps[i]), SamplingParams(max_tokens=n, **GREEDY))
        elif not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    for i, p in enumerate(ps):
        assert done[str(i)].token_ids == oracle(kind, p, n), (i, setting)
    if setting.get("num_kv_blocks") == 12:
        assert engine.stats.num_preemptions > 0
    assert engine.kv.block_manager.num_free_blocks == engine.kv.num_blocks


def test_abort_frees_blocks_and_others_go_on():
    engine = Engine(tiny("smol")[1], device="cpu", backend="torch", num_kv_blocks=40, block_size=4)
    ps = prompts(2, 3)
    for i, p in enumerate(ps):
        engine.add_request(str(i), list(p), SamplingParams(max_tokens=12, **GREEDY))
    engine.step()
    engine.step()
    assert engine.abort("1") and not engine.abort("1") and not engine.abort("nope")
    done = run_all(engine, ps)
    assert set(done) == {"0", "2"}
    assert done["0"].token_ids == oracle("smol", ps[0], 12)
    assert engine.kv.block_manager.num_free_blocks == 40


def test_seeded_sampling_belongs_to_the_request():
    folder = tiny("smol")[1]
    p = list(prompts(4, 1)[0])
    params = SamplingParams(max_tokens=10, temperature=1.0, top_k=50, seed=7, ignore_eos=True)
    alone = Engine(folder, device="cpu", backend="torch")
    alone.add_request("x", p, params)
    ref = run_all(alone, {})["x"].token_ids
    mixed = Engine(folder, device="cpu", backend="torch")
    mixed.add_request("other", list(prompts(5, 1)[0]), SamplingParams(max_tokens=4, temperature=1.0))
    mixed.step()
    mixed.add_request("x", p, params)
    mixed.add_request("y", p, SamplingParams(max_tokens=10, temperature=0.5, seed=1, ignore_eos=True))
    assert run_all(mixed, {})["x"].token_ids == ref


def test_stop_ids_strings_and_outputs():
    engine = Engine(tiny("smol")[1], device="cpu", backend="torch")
    p = list(prompts(6, 1)[0])
    ref = oracle("smol", tuple(p), 8)
    engine.add_request("a", p, SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[ref[3]]))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert [o.new_token_ids for o in outs] == [[t] for t in ref[:ref.index(ref[3]) + 1]]
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    assert outs[-1].token_ids == ref[:ref.index(ref[3]) + 1]


def test_refusals_with_numbers():
    engine = Engine(tiny("smol")[1], device="cpu", backend="torch", num_kv_blocks=4, block_size=4)
    assert engine.max_model_len == 16
    with pytest.raises(ValueError, match="max_model_len=16"):
        engine.add_request("a", list(range(3, 20)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("a", [5, 288])
    with pytest.raises(ValueError, match="token ids must be ints"):
        engine.add_request("a", [5, 2.0])
    with pytest.raises(TypeError, match="unknown engine argument"):
        Engine(tiny("smol")[1], device="cpu", blocksize=4)
    with pytest.raises(ValueError, match="block_size"):
        Engine(tiny("smol")[1], device="cpu", block_size=0)
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        Engine(tiny("smol")[1], device="cpu", num_kv_blocks=2, block_size=4, max_model_len=64)
    engine.add_request("ok", [5, 6])
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ok", [5, 6])


def test_async_engine_concurrent_and_cancel():
    folder = tiny("smol")[1]
    ps = prompts(7, 4)

    async def main():
        eng = AsyncEngine(Engine(folder, device="cpu", backend="torch", num_kv_blocks=64, block_size=4))

        async def one(i, p):
            ids = []
            async for out in eng.generate(list(p), SamplingParams(max_tokens=6, **GREEDY), request_id=str(i)):
                ids += out.new_token_ids
            return ids

        async def cancelled():
            async for _ in eng.generate(list(ps[0]), SamplingParams(max_tokens=200, **GREEDY), request_id="c"):
                raise asyncio.CancelledError

        task = asyncio.create_task(cancelled())
        results = await asyncio.wait_for(asyncio.gather(*(one(i, p) for i, p in enumerate(ps))), 120)
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # the abort is applied between steps
            if not eng.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        free = eng.engine.kv.block_manager.num_free_blocks
        await eng.shutdown()
        return results, free

    results, free = asyncio.run(main())
    for p, ids in zip(ps, results):
        assert ids == oracle("smol", p, 6)
    assert free == 64


# GPT-2's gelu_tanh computes a sigmoid whose exp overflows to inf for large inputs (harmlessly:
# the sigmoid is then exactly 0); numpy warns about it in the interpreter.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_interpreter_end_to_end(kind, monkeypatch):
    """The same engine on the Triton kernels (the interpreter here, compiled on a GPU), with
    torch's own linear and attention made to raise so nothing falls back to them."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter runs only without CUDA (the gpu run covers compiled kernels)")
    ps = prompts(8, 2, lo=3, hi=12, shared=5)
    engine = Engine(tiny(kind)[1], device="cpu", num_kv_blocks=16, block_size=4, max_num_batched_tokens=8)
    engine.kv.k.fill_(float("nan"))  # a slot read before it is written turns the logits NaN
    engine.kv.v.fill_(float("nan"))
    assert engine.loaded.backend is None

    def boom(*a, **k):
        raise AssertionError("torch fallback used")

    monkeypatch.setattr(torch.nn.functional, "linear", boom)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", boom)
    for i, p in enumerate(ps):
        engine.add_request(str(i), list(p), SamplingParams(max_tokens=3, **GREEDY))
    done = run_all(engine, ps)
    monkeypatch.undo()
    for i, p in enumerate(ps):
        assert done[str(i)].token_ids == oracle(kind, p, 3), i


def test_a_thousand_prompts_through_llm():
    """LLM.generate of 1,000 prompts: all come back, in input order, each the tokens of its
    prompt run alone (a few distinct prompts repeated, so most of them hit the prefix cache)."""
    from genfuse.runtime.llm import LLM

    llm = LLM(tiny("smol")[1], device="cpu", backend="torch", num_kv_blocks=512, block_size=4)
    distinct = prompts(9, 5, lo=2, hi=9)
    batch = [list(distinct[i % 5]) for i in range(1000)]
    out = llm.generate(batch, SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
    assert len(out) == 1000
    for i, c in enumerate(out):
        assert c.token_ids == oracle("smol", distinct[i % 5], 3), i
        assert c.prompt_token_ids == batch[i]
    assert llm.engine.kv.block_manager.num_free_blocks == 512
