"""runtime/llm.py under hostile or careless use (issue 10): several threads on one LLM, seeds in
a batch, logits that turn non-finite, token ids that are not ints, requests too big for memory,
devices that do not exist. A tiny random-weight Llama with a character-level tokenizer (every
token is one stream piece; untied, so one embedding row can be poisoned without touching the
output head), CPU, torch backend: milliseconds a token."""
from __future__ import annotations

import gc
import json
import threading

import pytest
import torch
from genfuse.runtime.llm import LLM
from genfuse.runtime.sampling import SamplingParams
from llm_helpers import one_thread, tiny_chat_folder

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
PROMPTS = [[1, 2, 3], [10, 20, 30, 40, 50, 60, 70], [5], [100, 101, 102, 103]]
WAIT = 60  # seconds: bounds every join, far above what any of these takes


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_chat_folder(tmp_path_factory.mktemp("tiny") / "m", tied=False)


@pytest.fixture(scope="module")
def llm(folder):
    return LLM(folder, device="cpu", backend="torch")


def _ids(completions):
    return [c.token_ids for c in completions]


# --------------------------------------------------------------------------- item 8: threads


def _run_threads(targets):
    """Start every target at once (a barrier) and join them with a bound; re-raise their errors."""
    barrier = threading.Barrier(len(targets))
    errors = []

    def wrap(fn):
        def run():
            barrier.wait(timeout=WAIT)
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=WAIT)
        assert not t.is_alive(), "a thread did not finish: deadlock?"
    if errors:
        raise errors[0]


def test_threads_generate_and_stream_as_if_serial(llm):
    """Threads with different batch sizes and streams on one LLM get exactly the serial greedy
    tokens (before: shared KV cache, wrong text or AttributeError on a dropped cache)."""
    jobs = [PROMPTS[:1], PROMPTS[1:3], PROMPTS, PROMPTS[3:]]
    serial = [_ids(llm.generate(j, GREEDY)) for j in jobs]
    stream_ref = llm.generate(PROMPTS[1], GREEDY)[0].text
    results: dict = {}

    def generate(k, rounds=3):
        def fn():
            results[k] = [_ids(llm.generate(jobs[k], GREEDY)) for _ in range(rounds)]
        return fn

    def stream(k):
        def fn():
            results[k] = [list(llm.stream(PROMPTS[1], GREEDY)) for _ in range(2)]
        return fn

    _run_threads([generate(k) for k in range(len(jobs))] + [stream("s")])
    for k in range(len(jobs)):
        assert results[k] == [serial[k]] * 3, k
    for pieces in results["s"]:
        assert len(pieces) > 5 and "".join(pieces) == stream_ref


def test_an_open_stream_makes_other_threads_wait(llm):
    """A stream holds the LLM from its first piece: another thread's generate waits (it does not
    fail, nor interleave), and goes on once the stream is closed."""
    ref = _ids(llm.generate(PROMPTS[:2], GREEDY))
    it = llm.stream(PROMPTS[0], GREEDY)
    next(it)
    done = threading.Event()
    out = []
    t = threading.Thread(target=lambda: (out.append(_ids(llm.generate(PROMPTS[:2], GREEDY))), done.set()),
                         daemon=True)
    t.start()
    assert not done.wait(0.5)  # waiting on the open stream
    it.close()
    assert done.wait(WAIT) and out == [ref]
    t.join(WAIT)


def test_same_thread_reentry_raises_and_dropped_streams_release(llm):
    it = llm.stream(PROMPTS[0], GREEDY)
    next(it)
    with pytest.raises(RuntimeError, match="stream open"):
        llm.generate(PROMPTS[0], GREEDY)  # would wait on itself forever
    with pytest.raises(RuntimeError, match="stream open"):
        next(llm.stream(PROMPTS[1], GREEDY))
    del it  # dropped mid-way: finalized at once, the LLM is free again
    assert len(llm.generate(PROMPTS[0], GREEDY)[0].token_ids) == 24

    # left open by a thread that then ends, dropped in another: the lock still goes
    holder = {}
    t = threading.Thread(target=lambda: next(holder.setdefault("it", llm.stream(PROMPTS[0], GREEDY))),
                         daemon=True)
    t.start()
    t.join(WAIT)
    assert "it" in holder and not t.is_alive()
    holder.clear()
    gc.collect()
    assert len(llm.generate(PROMPTS[0], GREEDY)[0].token_ids) == 24


# --------------------------------------------------------------------------- item 13: seeds


def test_seed_belongs_to_the_request_not_the_batch(llm):
    p = SamplingParams(max_tokens=16, temperature=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], p)[0].token_ids
    first = llm.generate([PROMPTS[0], PROMPTS[1]], p)[0].token_ids
    second = llm.generate([PROMPTS[1], PROMPTS[2], PROMPTS[0]], p)[2].token_ids
    twins = llm.generate([PROMPTS[0], PROMPTS[0]], p)
    assert alone == first == second == twins[0].token_ids == twins[1].token_ids
    other_seed = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=16, temperature=0.9, top_k=50, seed=99,
                                                           ignore_eos=True))[0].token_ids
    assert other_seed != alone  # the draw is random, not greedy


# --------------------------------------------------------------------------- item 10: non-finite


def test_tiny_temperature_is_greedy(llm):
    greedy = llm.generate(PROMPTS[0], GREEDY)[0].token_ids
    tiny = llm.generate(PROMPTS[0], SamplingParams(max_tokens=24, temperature=1e-45, ignore_eos=True))[0]
    assert tiny.token_ids == greedy and set(greedy) != {0}


def test_non_finite_logits_stop_that_request_with_an_error(folder, llm):
    """Poison the embedding of a token that the greedy run of prompt 0 emits (a few tokens in,
    seen nowhere before it nor in prompt 1's run): the step after it, that row's logits are
    NaN. It ends with finish_reason "error" after its good tokens (before: token 0 forever);
    the other prompt of the batch is untouched; stream raises."""
    ref = llm.generate(PROMPTS[:2], GREEDY)
    a, b = ref[0].token_ids, PROMPTS[1] + ref[1].token_ids
    i = next(i for i in range(2, 20) if a[i] not in PROMPTS[0] + a[:i] + b)
    poisoned = LLM(folder, device="cpu", backend="torch")
    poisoned.model.embed[a[i]] = float("nan")
    out = poisoned.generate(PROMPTS[:2], GREEDY)
    assert out[0].finish_reason == "error" and out[0].token_ids == a[:i + 1]
    assert "NaN" in out[0].error and "0" in out[0].error  # says what, and which prompt
    assert out[1].finish_reason == "length" and out[1].token_ids == ref[1].token_ids and out[1].error is None
    with pytest.raises(RuntimeError, match="NaN"):
        list(poisoned.stream(PROMPTS[0], GREEDY))
    assert poisoned.last_completion.token_ids == a[:i + 1]
    # NaN from the first step on (prefill): no tokens at all
    poisoned.model.embed[PROMPTS[2][0]] = float("nan")
    [c] = poisoned.generate([PROMPTS[2]], SamplingParams(max_tokens=5, temperature=0.8, seed=0))
    assert c.finish_reason == "error" and c.token_ids == []


# --------------------------------------------------------------------------- item 12: token ids


@pytest.mark.parametrize("prompts, error, match", [
    ([1.9, 2], TypeError, r"ints, got 1\.9 \(float\) at index 0"),
    ([[1, "2"]], TypeError, r"got '2' \(str\)"),
    ([[3, True]], TypeError, r"got True \(bool\)"),
    ([1.9, "2"], TypeError, "prompt 0 must be a str or a list of token ids"),
    (torch.tensor([1.0, 2.0]), TypeError, "torch.float32 tensor"),
    (torch.tensor([[True, False]]), TypeError, "torch.bool tensor"),
    (torch.zeros(1, 1, 2, dtype=torch.int64), ValueError, r"\(T,\) or \(B, T\)"),
    ([[1, 288]], ValueError, r"token id 288 outside the vocabulary \[0, 288\)"),
    ([[1, -1]], ValueError, r"token id -1 outside"),
    ([[1, 2], []], ValueError, "prompt 1 is empty"),
    (5, TypeError, "prompts must be"),
])
def test_token_ids_are_refused_not_converted(llm, prompts, error, match):
    with pytest.raises(error, match=match):
        llm.generate(prompts, GREEDY)


def test_integer_like_ids_still_work(llm):
    import numpy as np

    ref = llm.generate([PROMPTS[0]], GREEDY)[0].token_ids
    assert llm.generate(list(np.array(PROMPTS[0])), GREEDY)[0].token_ids == ref
    assert llm.generate(torch.tensor(PROMPTS[0]), GREEDY)[0].token_ids == ref
    assert llm.generate([torch.tensor(PROMPTS[0], dtype=torch.int32)], GREEDY)[0].token_ids == ref
    with pytest.raises(TypeError, match="prompt must be"):
        llm.stream(7, GREEDY)
    with pytest.raises(TypeError, match="ints"):
        llm.stream([1.5], GREEDY)  # checked when the stream is made, not at its first piece


# --------------------------------------------------------------------------- item 7: memory


def test_a_cache_too_big_for_memory_is_refused_before_allocating(folder, tmp_path, monkeypatch):
    """A config claiming a huge context (2**24 tokens, the most config.json may claim) and a
    KV pool asked for beyond the machine's memory: refused by name before anything is allocated
    (before: torch tried, and failed with RuntimeError or pushed the machine into swap). With
    the default pool, max_model_len is the pool's size, not the claimed context, so a huge
    max_tokens ends with "length" there instead of allocating more."""
    import shutil

    from genfuse.runtime.engine import engine as engine_mod

    big = tmp_path / "big"
    shutil.copytree(folder, big)
    cfg = json.loads((big / "config.json").read_text())
    cfg["max_position_embeddings"] = 2**24
    cfg.pop("rope_scaling", None)  # llama3 scaling's original context stays as it is; plain rotary
    (big / "config.json").write_text(json.dumps(cfg))
    allocated = []
    monkeypatch.setattr(engine_mod, "KVCacheManager", lambda **kw: allocated.append(kw))
    with pytest.raises(ValueError, match=r"the KV cache \(67108864 blocks of 16 tokens\) needs 512\.0 GiB "
                                         r"but only .* is available on cpu"):
        LLM(big, device="cpu", backend="torch", num_kv_blocks=2**26)
    assert allocated == []  # nothing was allocated
    monkeypatch.undo()
    llm = LLM(big, device="cpu", backend="torch", num_kv_blocks=4, block_size=4)
    assert llm.engine.max_model_len == 16
    [c] = llm.generate([1, 2, 3], SamplingParams(max_tokens=2**24 - 3, temperature=0, ignore_eos=True))
    assert c.finish_reason == "length" and len(c.token_ids) == 13


# --------------------------------------------------------------------------- item 11: devices


@pytest.mark.parametrize("device, match", [
    ("foo", "not a torch device name"),
    ("meta", "'meta' is not supported"),
    ("cuda:99", "cuda:99"),
    (torch.device("meta"), "not supported"),
    (3, "device must be a str"),
])
def test_bad_devices_are_clear_errors(folder, device, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LLM(folder, device=device, backend="torch")
