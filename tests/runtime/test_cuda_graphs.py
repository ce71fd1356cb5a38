"""runtime/engine/cuda_graphs.py: decode-only engine steps padded to batch-size buckets and
replayed from CUDA graphs.

On CPU the runner pads without capturing: a padded step must give exactly the unpadded tokens
(torch references and the Triton interpreter), padded rows must write no K/V, and a stand-in
graph checks the bookkeeping (one capture per bucket, inputs through the static buffers). On
a GPU (``gpu`` marker) the graphs themselves: the eager tokens for batches 1, 3 (padded to 4)
and 8 in bf16 and fp32, a memory pool that does not grow over repeated calls, and a decode
step with no host sync.
"""
from __future__ import annotations

import pytest
import torch
from genfuse.runtime.engine.cuda_graphs import StepRunner, bucket
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


def runner(llm: LLM, cls=StepRunner, **kw) -> StepRunner:
    e = llm.engine
    return cls(e.model, e.kv.k, e.kv.v, max_num_seqs=e.args.max_num_seqs,
               max_blocks_per_seq=-(-e.max_model_len // e.args.block_size), **kw)


def tokens(llm: LLM, step_runner: StepRunner, prompts, n: int) -> list[list[int]]:
    llm.engine.runner = step_runner
    return [c.token_ids for c in llm.generate(prompts, greedy(n), use_tqdm=False)]


# --------------------------------------------------------------------------- CPU


def test_buckets_are_the_next_power_of_two():
    got = [bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 17, 32, 33)]
    assert got == [1, 2, 4, 4, 8, 8, 16, 32, 32, 64]
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="positive int"):
            bucket(bad)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_padded_decode_gives_the_unpadded_tokens(folders, kind):
    """Batches of 3 (padded to 4), 5 (padded to 8) and 8: the padded runner's greedy tokens are
    the unpadded ones, token for token, with the pools full of NaN where nothing was written."""
    llm = LLM(folders[kind], device="cpu", backend="torch", num_kv_blocks=64)
    llm.engine.kv.k.fill_(float("nan"))
    llm.engine.kv.v.fill_(float("nan"))
    for prompts, n in ((PROMPTS[:3], 12), (PROMPTS[:5], 12), (PROMPTS, 6)):
        want = tokens(llm, runner(llm, graphs=False), prompts, n)
        padded = runner(llm, graphs=False, pad=True)
        assert tokens(llm, padded, prompts, n) == want
        assert padded.captured_buckets() == [] and padded.captures == 0  # no graphs off CUDA


def test_padded_decode_on_the_triton_interpreter(folders):
    """The same through genfuse's Triton kernels (the interpreter): padded rows with one key go
    through unified_attention next to the real ones."""
    llm = LLM(folders["llama"], device="cpu", backend="triton", num_kv_blocks=32)
    want = tokens(llm, runner(llm, graphs=False), PROMPTS[:3], 4)
    assert tokens(llm, runner(llm, graphs=False, pad=True), PROMPTS[:3], 4) == want


def test_padded_rows_write_no_kv(folders):
    """One decode-only step of 3 sequences padded to 4: the same logits and the same pools as
    the unpadded step (bitwise, NaN included: a padded row wrote nowhere)."""
    from genfuse.runtime.engine.engine import Engine

    llm = LLM(folders["llama"], device="cpu", backend="torch", num_kv_blocks=32)
    e: Engine = llm.engine
    e.kv.k.fill_(float("nan"))
    e.kv.v.fill_(float("nan"))
    for i, p in enumerate(PROMPTS[:3]):
        e.add_request(str(i), p, greedy(8))
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in e.scheduler.requests.values()):
        e.step()  # the prompts in, then one decode-only step to check
    out = e.scheduler.schedule()
    assert out.is_decode_only and len(out.scheduled) == 3
    inp = e.kv.prepare(out)
    before = e.kv.k.clone(), e.kv.v.clone()
    got = runner(llm, graphs=False, pad=True).run(inp, True).clone()
    padded = e.kv.k.clone(), e.kv.v.clone()
    e.kv.k.copy_(before[0])
    e.kv.v.copy_(before[1])
    want = e.model.forward_step(inp, e.kv.k, e.kv.v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(padded, (e.kv.k, e.kv.v)):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), rtol=1e-5, atol=1e-5)


class _ReplayAgain:
    """Stands in for a CUDA graph on CPU: replay re-runs the step on the static inputs it was
    "captured" with and writes the result into the captured output, as a graph would."""

    def __init__(self, runner, static, out):
        self.runner, self.static, self.out = runner, static, out

    def replay(self):
        self.out.copy_(self.runner.model.forward_step(self.static, self.runner.k, self.runner.v))


class _CPUGraphRunner(StepRunner):
    """StepRunner's graph bookkeeping (buckets, static buffers) without CUDA."""

    def __init__(self, *a, **kw):
        super().__init__(*a, graphs=False, pad=True, **kw)
        self.graphs = True

    def _capture(self, static):
        out = torch.full((static.input_ids.shape[0], self.model.config.vocab_size), float("nan"))
        return _ReplayAgain(self, static, out), out


def test_graph_bookkeeping_on_cpu(folders):
    """With a stand-in graph: one capture per bucket, inputs through the static buffers, never
    recaptured (the pools are allocated once); tokens stay the unpadded ones."""
    llm = LLM(folders["llama"], device="cpu", backend="torch", num_kv_blocks=64)
    graphs = runner(llm, _CPUGraphRunner)
    steps = [(PROMPTS[:3], 6, [4]), (PROMPTS[:3], 6, [4]), (PROMPTS[:8], 6, [4, 8]),
             (PROMPTS[:1], 40, [1, 4, 8])]
    for prompts, n, buckets in steps:
        want = tokens(llm, runner(llm, graphs=False), prompts, n)
        assert tokens(llm, graphs, prompts, n) == want
        assert graphs.captured_buckets() == buckets and graphs.captures == len(buckets)


def test_cuda_graphs_switch(folders):
    """None: on for CUDA with the Triton kernels, off elsewhere; True where it cannot run: an error."""
    llm = LLM(folders["gpt2"], device="cpu", backend="torch", num_kv_blocks=16)
    assert not llm.runner.graphs and not llm.runner.pad
    assert not LLM(folders["gpt2"], device="cpu", backend="torch", cuda_graphs=False, num_kv_blocks=16).runner.graphs
    with pytest.raises(ValueError, match="need a CUDA device"):
        LLM(folders["gpt2"], device="cpu", backend="torch", cuda_graphs=True, num_kv_blocks=16)


# --------------------------------------------------------------------------- GPU

DTYPES = [torch.bfloat16, torch.float32]


@pytest.fixture(scope="module")
def gpu_pairs(folders):
    """(eager, graphs) LLMs per (kind, dtype), loaded on first use."""
    cache = {}

    def get(kind, dtype):
        if (kind, dtype) not in cache:
            cache[kind, dtype] = tuple(LLM(folders[kind], device="cuda", dtype=dtype, cuda_graphs=g,
                                           num_kv_blocks=256) for g in (False, True))
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


@pytest.mark.gpu
def test_graphs_are_on_by_default_on_cuda(folders):
    assert LLM(folders["gpt2"], device="cuda", num_kv_blocks=64).runner.graphs
    assert not LLM(folders["gpt2"], device="cuda", backend="torch", num_kv_blocks=64).runner.graphs
    with pytest.raises(ValueError, match="need the Triton kernels"):
        LLM(folders["gpt2"], device="cuda", backend="torch", cuda_graphs=True, num_kv_blocks=64)


@pytest.mark.gpu
def test_memory_pool_does_not_grow_over_repeated_calls(folders):
    llm = LLM(folders["llama"], device="cuda", cuda_graphs=True, num_kv_blocks=256)
    mixed = [(PROMPTS[:3], 12), (PROMPTS[:1], 12), (PROMPTS[:2], 6)]
    for prompts, n in mixed:  # capture buckets 1, 2 and 4 on the one pool
        llm.generate(prompts, greedy(n))
    torch.cuda.synchronize()
    allocated, reserved, captures = torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), llm.runner.captures
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
    """The eager decode-only step (what the graphs capture) under torch's sync debug mode "error"."""
    llm = LLM(folders[kind], device="cuda", cuda_graphs=False, num_kv_blocks=64)
    e = llm.engine
    for i, p in enumerate(PROMPTS[:4]):
        e.add_request(str(i), p, greedy(8))
    e.step()
    e.step()  # compile and autotune (those may sync)
    out = e.scheduler.schedule()
    assert out.is_decode_only
    inp = e.kv.prepare(out)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        e.model.forward_step(inp, e.kv.k, e.kv.v)
    finally:
        torch.cuda.set_sync_debug_mode("default")
