"""runtime/cuda_graphs.py: decode steps padded to batch-size buckets and replayed from CUDA graphs.

On CPU the runner pads without capturing: a padded batch must give exactly the unpadded tokens
(torch references and the Triton interpreter), the padded rows may touch only position 0 of
the cache's spare rows, and the cache must hold a row for every row of the bucket. On a GPU
(``gpu`` marker) the graphs themselves: the eager tokens for batches 1, 3 (padded to 4) and 8
in bf16 and fp32, recapture after a reallocated cache, a memory pool that does not grow over
repeated calls, and a decode step with no host sync.
"""
from __future__ import annotations

import pytest
import torch
from genfuse.runtime.cuda_graphs import DecodeRunner, bucket
from genfuse.runtime.llm import LLM
from genfuse.runtime.sampling import SamplingParams
from llm_helpers import one_thread, tiny_folder

# prompts of different lengths (each row decodes at its own position)
PROMPTS = [[1, 17, 33, 250, 8], [5, 6, 7, 100, 101, 102, 200, 9, 11, 12, 13], [40, 41], [7] * 9,
           [3, 99, 98, 97], [250, 251, 252, 253, 254, 255, 256], [60], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny random-weight Llama (GQA, untied) and GPT-2 folders, written once per module."""
    root = tmp_path_factory.mktemp("graph_models")
    return {kind: tiny_folder(kind, root / kind)[1] for kind in ("llama", "gpt2")}


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def tokens(llm: LLM, runner: DecodeRunner, prompts, n: int) -> list[list[int]]:
    llm.runner = runner
    return [c.token_ids for c in llm.generate(prompts, greedy(n))]


# --------------------------------------------------------------------------- CPU


def test_buckets_are_the_next_power_of_two():
    got = [bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 17, 32, 33)]
    assert got == [1, 2, 4, 4, 8, 8, 16, 32, 32, 64]
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="positive int"):
            bucket(bad)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_padded_decode_gives_the_unpadded_tokens(folders, kind):
    """Batches of 3 (padded to 4) and 5 (padded to 8), then a longer request that reallocates
    the cache: the padded runner's greedy tokens are the unpadded ones, token for token."""
    llm = LLM(folders[kind], device="cpu", backend="torch")
    for prompts, n in ((PROMPTS[:3], 12), (PROMPTS[:5], 12), (PROMPTS[:3], 40)):
        want = tokens(llm, DecodeRunner(llm.model, graphs=False), prompts, n)
        padded = DecodeRunner(llm.model, graphs=False, pad=True)
        assert tokens(llm, padded, prompts, n) == want
        assert llm.model.cache.max_batch >= bucket(len(prompts))  # a row for every padded row
        assert padded.captured_buckets() == [] and padded.captures == 0  # no graphs off CUDA


def test_padded_decode_on_the_triton_interpreter(folders):
    """The same through genfuse's Triton kernels (the interpreter): padded rows with seq_len 1
    go through paged_attention next to the real ones."""
    llm = LLM(folders["llama"], device="cpu", backend="triton")
    want = tokens(llm, DecodeRunner(llm.model, graphs=False), PROMPTS[:3], 4)
    assert tokens(llm, DecodeRunner(llm.model, graphs=False, pad=True), PROMPTS[:3], 4) == want


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_padded_rows_touch_only_position_0_of_spare_rows(folders, kind):
    """One decode step of 3 sequences padded to 4: the real rows' logits and cache are the
    unpadded step's; spare row 3 changes at position 0 only."""
    llm = LLM(folders[kind], device="cpu", backend="torch")
    model, runner = llm.model, DecodeRunner(llm.model, graphs=False, pad=True)
    cache = runner.setup_cache(3, 32)
    assert cache.max_batch == 4
    prompts = PROMPTS[:3]
    for row, p in enumerate(prompts):
        model.prefill(torch.tensor(p), row=row)
    for c in (cache.k, cache.v):
        cache.slab(c[0])[3] = 7.0  # spare row: a marker that must survive past position 0
        cache.slab(c[1])[3] = 7.0
    before = cache.k.clone(), cache.v.clone()
    tok = torch.tensor([11, 22, 33])
    pos = torch.tensor([len(p) for p in prompts])
    got = runner.decode(tok, pos).clone()  # (3, vocab)
    after_padded = cache.k.clone(), cache.v.clone()
    cache.k.copy_(before[0])
    cache.v.copy_(before[1])
    want = model.decode_one_token(tok, pos)  # unpadded, on the same cache contents
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for padded, unpadded, old in zip(after_padded, (cache.k, cache.v), before):
        for layer in range(padded.shape[0]):
            p, u, o = (cache.slab(t[layer]) for t in (padded, unpadded, old))  # (4, max_len, Hkv, D)
            torch.testing.assert_close(p[:3], u[:3], rtol=1e-5, atol=1e-5)
            assert torch.equal(p[3, 1:], o[3, 1:])
            assert not torch.equal(p[3, 0], o[3, 0])  # the padded row did write there


class _ReplayAgain:
    """Stands in for a CUDA graph on CPU: replay re-runs the step on the tensors it was
    "captured" with and writes the result into the captured output, as a graph would."""

    def __init__(self, model, tok, pos, out):
        self.model, self.tok, self.pos, self.out = model, tok, pos, out

    def replay(self):
        self.out.copy_(self.model.decode_one_token(self.tok, self.pos))


class _CPUGraphRunner(DecodeRunner):
    """DecodeRunner's graph bookkeeping (buckets, static buffers, recapture) without CUDA."""

    def __init__(self, model):
        super().__init__(model, graphs=False, pad=True)
        self.graphs = True

    def _capture(self, tok, pos):
        out = torch.full((tok.shape[0], self.model.config.vocab_size), float("nan"))
        return _ReplayAgain(self.model, tok, pos, out), out


def test_graph_bookkeeping_on_cpu(folders):
    """With a stand-in graph: one capture per bucket per cache, recapture after the cache is
    reallocated (longer request, bigger batch), inputs through the static buffers; tokens stay
    the unpadded ones. The GPU twin is test_recapture_after_the_cache_is_reallocated."""
    llm = LLM(folders["llama"], device="cpu", backend="torch")
    runner = _CPUGraphRunner(llm.model)
    steps = [(PROMPTS[:3], 6, 1), (PROMPTS[:3], 6, 1),  # same bucket, same cache: no capture
             (PROMPTS[:3], 40, 2),  # longer: new cache, bucket 4 again
             (PROMPTS[:8], 6, 3),  # more rows: new cache, bucket 8
             (PROMPTS[:3], 6, 4),  # bucket 4 on the new cache
             (PROMPTS[:1], 6, 5)]
    for prompts, n, captures in steps:
        want = tokens(llm, DecodeRunner(llm.model, graphs=False), prompts, n)
        cache_before = llm.model.cache
        assert tokens(llm, runner, prompts, n) == want
        assert runner.captures == captures, (len(prompts), n)
        if llm.model.cache is not cache_before:
            assert runner.captured_buckets() == [bucket(len(prompts))]
    assert runner.captured_buckets() == [1, 4, 8]


def test_decode_needs_a_cache_row_for_every_padded_row(folders):
    llm = LLM(folders["llama"], device="cpu", backend="torch")
    runner = DecodeRunner(llm.model, graphs=False, pad=True)
    with pytest.raises(ValueError, match="the KV cache has 0"):
        runner.decode(torch.tensor([1, 2, 3]), torch.tensor([0, 0, 0]))
    llm.model.setup_cache(3, 16)  # bypassing runner.setup_cache: 3 rows, the bucket needs 4
    with pytest.raises(ValueError, match="pads to 4 rows but the KV cache has 3"):
        runner.decode(torch.tensor([1, 2, 3]), torch.tensor([0, 0, 0]))


def test_cuda_graphs_switch(folders):
    """None: on for CUDA with the Triton kernels, off elsewhere; True where it cannot run: an error."""
    llm = LLM(folders["gpt2"], device="cpu", backend="torch")
    assert not llm.runner.graphs and not llm.runner.pad
    assert not LLM(folders["gpt2"], device="cpu", backend="torch", cuda_graphs=False).runner.graphs
    with pytest.raises(ValueError, match="need a CUDA device"):
        LLM(folders["gpt2"], device="cpu", backend="torch", cuda_graphs=True)
    with pytest.raises(ValueError, match="need a CUDA device"):
        DecodeRunner(llm.model, graphs=True)


# --------------------------------------------------------------------------- GPU

DTYPES = [torch.bfloat16, torch.float32]


@pytest.fixture(scope="module")
def gpu_pairs(folders):
    """(eager, graphs) LLMs per (kind, dtype), loaded on first use."""
    cache = {}

    def get(kind, dtype):
        if (kind, dtype) not in cache:
            cache[kind, dtype] = tuple(LLM(folders[kind], device="cuda", dtype=dtype, cuda_graphs=g)
                                       for g in (False, True))
        return cache[kind, dtype]
    return get


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_graph_decode_gives_the_eager_tokens(gpu_pairs, kind, dtype, batch):
    eager, graphs = gpu_pairs(kind, dtype)
    assert graphs.runner.graphs and not eager.runner.graphs
    prompts = PROMPTS[:batch]
    want = [c.token_ids for c in eager.generate(prompts, greedy(16))]
    got = [c.token_ids for c in graphs.generate(prompts, greedy(16))]
    assert got == want
    assert bucket(batch) in graphs.runner.captured_buckets()
    assert graphs.model.cache.max_batch >= bucket(batch)


@pytest.mark.gpu
def test_graphs_are_on_by_default_on_cuda(folders):
    assert LLM(folders["gpt2"], device="cuda").runner.graphs
    assert not LLM(folders["gpt2"], device="cuda", backend="torch").runner.graphs
    with pytest.raises(ValueError, match="need the Triton kernels"):
        LLM(folders["gpt2"], device="cuda", backend="torch", cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_recapture_after_the_cache_is_reallocated(folders, kind):
    """A longer request and a bigger batch reallocate the cache: every bucket is captured again
    on the new cache and the tokens stay the eager ones."""
    eager = LLM(folders[kind], device="cuda", cuda_graphs=False)
    llm = LLM(folders[kind], device="cuda", cuda_graphs=True)
    steps = [(PROMPTS[:3], 8, 1), (PROMPTS[:3], 8, 1),  # same bucket, same cache: no capture
             (PROMPTS[:3], 200, 2),  # longer: new cache, bucket 4 again
             (PROMPTS[:8], 8, 3),  # more rows: new cache, bucket 8
             (PROMPTS[:3], 8, 4),  # bucket 4 on the new cache
             (PROMPTS[:1], 8, 5)]
    for prompts, n, captures in steps:
        cache_before = llm.model.cache
        want = [c.token_ids for c in eager.generate(prompts, greedy(n))]
        assert [c.token_ids for c in llm.generate(prompts, greedy(n))] == want
        assert llm.runner.captures == captures, (len(prompts), n)
        if llm.model.cache is not cache_before:
            assert llm.runner.captured_buckets() == [bucket(len(prompts))]


@pytest.mark.gpu
def test_memory_pool_does_not_grow_over_repeated_calls(folders):
    llm = LLM(folders["llama"], device="cuda", cuda_graphs=True)
    mixed = [(PROMPTS[:3], 12), (PROMPTS[:1], 12), (PROMPTS[:2], 6)]
    for prompts, n in mixed:  # capture buckets 4, 1 and 2 on one cache
        llm.generate(prompts, greedy(n))
    torch.cuda.synchronize()
    allocated, reserved, captures = torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), llm.runner.captures
    assert captures == 3
    for _ in range(3):
        for prompts, n in mixed:
            llm.generate(prompts, greedy(n))
    torch.cuda.synchronize()
    assert llm.runner.captures == captures
    assert torch.cuda.memory_allocated() == allocated
    assert torch.cuda.memory_reserved() <= reserved


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_decode_step_never_syncs_the_host(folders, kind):
    """The eager decode step (what the graphs capture) under torch's sync debug mode "error"."""
    llm = LLM(folders[kind], device="cuda", cuda_graphs=False)
    model = llm.model
    model.setup_cache(4, 64)
    tok = torch.tensor([1, 2, 3, 4], device="cuda")
    pos = torch.tensor([0, 5, 9, 30], device="cuda")
    model.decode_one_token(tok, pos)  # compile and autotune (those may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.decode_one_token(tok, pos)
    finally:
        torch.cuda.set_sync_debug_mode("default")
