"""runtime/models/llama.py (and runtime/models/gpt2.py) against transformers: the shipped SmolLM2 GGUF (greedy tokens, logits) and
random-weight Llama-family folders (greedy tokens), on the torch references and, for a tiny
Llama, on genfuse's Triton kernels through the interpreter."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from genfuse.runtime.llm import LLM
from genfuse.runtime.sampling import SamplingParams
from engine_helpers import prompt_logits
from llm_helpers import (
    hf_greedy,
    one_thread,
    smollm_llm,
    smollm_transformers,
    tiny_folder,
)

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write a short poem about the sea."}],
    [{"role": "user", "content": "Explain gravity to a child in three sentences."}],
]
N_TOKENS = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


# --------------------------------------------------------------------------- SmolLM2 GGUF


@pytest.fixture(scope="module")
def smollm():
    return smollm_llm(), smollm_transformers()


@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_smollm_last_logits_match_transformers(smollm, chat):
    llm, hf = smollm
    ids = llm.chat_prompt(CHATS[chat])
    got = prompt_logits(llm, ids)  # (vocab,)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1].float()
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-4, f"last-position logits differ by {rel:.2e} relative"


def test_smollm_greedy_tokens_match_transformers(smollm):
    """Several chat prompts of different lengths as ONE batch (own positions, own cache rows)."""
    llm, hf = smollm
    prompts = [llm.chat_prompt(m) for m in CHATS]
    assert len({len(p) for p in prompts}) == len(prompts)
    got = llm.generate(prompts, greedy(N_TOKENS))
    for p, c in zip(prompts, got):
        assert len(c.token_ids) == N_TOKENS and c.finish_reason == "length"
        assert c.token_ids == hf_greedy(hf, p, N_TOKENS)


# --------------------------------------------------------------------------- random weights


@pytest.mark.parametrize("kind", ["llama", "qwen2", "smol", "mistral", "gpt2"])
def test_tiny_greedy_tokens_match_transformers(tmp_path, kind):
    """llama: GQA, untied, Llama-3 rope scaling; qwen2: q/k/v bias; smol: tied; mistral;
    gpt2 (runtime/models/gpt2.py): learned positions, LayerNorm, gelu_tanh, Conv1D weights."""
    hf, folder = tiny_folder(kind, tmp_path / kind)
    llm = LLM(folder, device="cpu", backend="torch")
    assert llm.tokenizer is None  # save_pretrained of a bare model writes no tokenizer
    prompts = [[1, 17, 33, 250, 8], [5, 6, 7, 100, 101, 102, 200, 9, 11, 12, 13]]
    got = llm.generate(prompts, greedy(24))
    for p, c in zip(prompts, got):
        assert c.token_ids == hf_greedy(hf, p, 24)
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0, -1]
        torch.testing.assert_close(prompt_logits(llm, p), ref, rtol=1e-5, atol=1e-4)


_TRITON_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.nn.functional as F

    def forbidden(*args, **kwargs):
        raise AssertionError("the Triton path must not call torch's linear / SDPA")

    F.linear = F.scaled_dot_product_attention = forbidden
    from genfuse.runtime.llm import LLM
    from genfuse.runtime.sampling import SamplingParams

    llm = LLM(sys.argv[1], device="cpu", backend="triton")
    out = llm.generate(json.loads(sys.argv[2]), SamplingParams(max_tokens=int(sys.argv[3]), temperature=0,
                                                              ignore_eos=True))
    print(json.dumps([c.token_ids for c in out]))
""")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_tiny_model_on_triton_interpreter_gives_the_same_tokens(tmp_path, kind):
    """The same tiny Llama (and GPT-2) through genfuse's Triton kernels (TRITON_INTERPRET=1, read at import,
    hence a subprocess); torch's F.linear and SDPA are replaced by a function that raises."""
    hf, folder = tiny_folder(kind, tmp_path / kind)
    prompts, n = [[1, 17, 33, 250, 8], [5, 6, 7, 100, 101, 102, 200]], 6
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, str(folder), json.dumps(prompts), str(n)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == [hf_greedy(hf, p, n) for p in prompts]
