"""A 4,000-token prompt on CPU: memory linear in the prompt, the same greedy tokens as transformers.

Issue 13: the old torch attention built the whole (T, S) score matrix per layer, so a prompt of
a few thousand tokens took minutes and gigabytes. The prefill runs in a child process that
reports its peak RSS growth (ru_maxrss) over the prompt alone; with the tiny model below a
quadratic path would need 4 heads x 4000 x 4000 x 4 B = 256 MB for one layer's scores, the
linear one a few MB (KV pool pages, activations of one 512-token chunk).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llm_helpers import tiny_chat_folder

PROMPT_TOKENS = 4000
# Growth of the peak RSS the prompt may cause. The quadratic score matrix alone is 256 MB;
# what the linear path touches (KV pool pages, one chunk's activations and SDPA's blocks,
# allocator slack) stays well below this.
RSS_BUDGET_MB = 96

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    import genfuse
    torch.set_num_threads(1)
    folder, n, batched = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    llm = genfuse.LLM(folder, threads=1, max_num_batched_tokens=batched, kv_cache_memory=64 << 20)
    ids = [3 + (7 * i) % 280 for i in range(n)]
    params = genfuse.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    llm.generate([ids[:64]], params, use_tqdm=False)  # warm-up: every op's first-call allocations
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    [c] = llm.generate([ids], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"tokens": c.token_ids, "rss_growth_mb": (after - before) / 1024, "s": seconds}))
""")


@pytest.fixture(scope="module")
def long_folder(tmp_path_factory):
    return tiny_chat_folder(tmp_path_factory.mktemp("long"), max_positions=8192)


def _run(folder, batched: int) -> dict:
    # the CPU runtime's own path (torch ops), not the Triton interpreter the suite's conftest sets
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(PROMPT_TOKENS), str(batched)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def hf_tokens(long_folder):
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(str(long_folder), attn_implementation="sdpa").eval()
    ids = [3 + (7 * i) % 280 for i in range(PROMPT_TOKENS)]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    return out[0, PROMPT_TOKENS:].tolist()


@pytest.mark.parametrize("batched", [512, 4096], ids=["chunked-512", "one-step"])
def test_4000_token_prompt_is_memory_linear_and_matches_transformers(long_folder, hf_tokens, batched):
    r = _run(long_folder, batched)
    assert r["rss_growth_mb"] < RSS_BUDGET_MB, f"a {PROMPT_TOKENS}-token prompt grew the peak RSS by {r}"
    assert r["tokens"] == hf_tokens
