"""Tensor parallelism on real gloo ranks (tests/runtime/tp_helpers.py): each rank loads its
slice of the model and runs the engine's forward step; greedy tokens equal the single-process
run and the logits agree within 1e-5 (fp32; the partial sums are added in another order)."""
import pytest
import torch

from genfuse.runtime.config import ModelConfig
from genfuse.runtime.distributed import TPPlan, check_tensor_parallel, shard_state_dict
from genfuse.runtime.loader import load_model
from genfuse.runtime.weights import load_weights
from llm_helpers import tiny_folder
from tp_helpers import run_ranks, single_sequence_steps, tp_rank_run

PROMPT = [5, 17, 99, 3, 250, 42, 7, 180, 64, 11, 200, 33, 1]
N_NEW = 6


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):  # GQA 4/2, untied, llama3 rope: splits over 2 and 4 ranks
    return tiny_folder("llama", tmp_path_factory.mktemp("tp_llama") / "m")[1]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    return tiny_folder("gpt2", tmp_path_factory.mktemp("tp_gpt2") / "m")[1]


def single(path):
    loaded = load_model(path, device="cpu", backend="torch")
    return single_sequence_steps(loaded.model, loaded.config, PROMPT, N_NEW)


def check_against_single(path, world):
    want_prefill, want_decode, want_tokens = single(path)
    results = run_ranks(tp_rank_run, world, str(path), PROMPT, N_NEW)
    for rank, ((prefill, decode, tokens), held, is_tp) in enumerate(results):
        assert is_tp
        assert tokens == want_tokens, f"rank {rank}"
        torch.testing.assert_close(torch.from_numpy(prefill), want_prefill, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(decode), want_decode, rtol=1e-5, atol=1e-5)
    return [held for _, held, _ in results]


def test_llama_gqa_heads_split_over_2(tiny_llama):
    held = check_against_single(tiny_llama, 2)
    assert [h["kv_heads"] for h in held] == [[0], [1]]


def test_llama_kv_heads_replicated_over_4(tiny_llama):
    held = check_against_single(tiny_llama, 4)
    assert [h["kv_heads"] for h in held] == [[0], [0], [1], [1]]  # 2 KV heads, 4 ranks


def test_gpt2_over_2(tiny_gpt2):
    check_against_single(tiny_gpt2, 2)


def test_shards_are_slices_of_the_full_weights(tiny_llama):
    from genfuse.runtime.config import load_config

    config = load_config(tiny_llama)
    full = load_weights(tiny_llama, config)
    D = config.head_dim
    for rank in range(2):
        plan = TPPlan.make(config, rank, 2)
        sd = shard_state_dict(config, full, plan)
        p = "model.layers.1."
        assert torch.equal(sd[p + "self_attn.q_proj.weight"], full[p + "self_attn.q_proj.weight"][rank * 2 * D:(rank + 1) * 2 * D])
        assert torch.equal(sd[p + "self_attn.k_proj.weight"], full[p + "self_attn.k_proj.weight"][rank * D:(rank + 1) * D])
        assert torch.equal(sd[p + "self_attn.o_proj.weight"], full[p + "self_attn.o_proj.weight"][:, rank * 2 * D:(rank + 1) * 2 * D])
        assert torch.equal(sd[p + "mlp.down_proj.weight"], full[p + "mlp.down_proj.weight"][:, rank * 48:(rank + 1) * 48])
        assert torch.equal(sd["lm_head.weight"], full["lm_head.weight"][rank * 144:(rank + 1) * 144])
        assert torch.equal(sd[p + "input_layernorm.weight"], full[p + "input_layernorm.weight"])  # replicated
        held = sum(t.numel() for t in sd.values())
        assert held < 0.6 * sum(t.numel() for t in full.values())  # about half, plus the replicated norms
        # the loader cuts each tensor as it reads it: the same slice, never the full dict
        loaded = load_weights(tiny_llama, config, tp_plan=plan)
        assert sorted(loaded) == sorted(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)


def _cfg(**kw):
    base = dict(arch="llama", vocab_size=288, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, intermediate_size=96, norm_eps=1e-5, max_position_embeddings=64,
                tie_word_embeddings=True, model_type="llama")
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("kw,world,message", [
    (dict(), 3, r"4 query heads are not divisible by 3"),
    (dict(num_heads=6, num_kv_heads=3, head_dim=16, hidden_size=96), 2,
     r"3 KV heads are not divisible by 2"),
    (dict(num_heads=12, num_kv_heads=3), 4, r"4 ranks are not a multiple of the 3 KV heads"),
    (dict(intermediate_size=90), 4, r"intermediate size 90 is not divisible by 4"),
    (dict(vocab_size=290), 4, r"vocabulary size 290 is not divisible by 4"),
    (dict(), 0, r"tensor_parallel_size must be an int >= 1, got 0"),
])
def test_sizings_that_cannot_split_are_refused(kw, world, message):
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel(_cfg(**kw), world)


def test_refused_before_loading_weights(tiny_llama):
    with pytest.raises(ValueError, match=r"cannot split llama over tensor_parallel_size=3: 4 query heads"):
        load_model(tiny_llama, device="cpu", tensor_parallel=(0, 3))


def test_smollm2_gguf_over_3():
    # the real default model: 9 query / 3 KV heads, packed Q4_1/Q8_0 blocks split on block bounds
    want_prefill, want_decode, want_tokens = single("smollm2-135m-instruct")
    results = run_ranks(tp_rank_run, 3, "smollm2-135m-instruct", PROMPT, N_NEW)
    for rank, ((prefill, decode, tokens), held, _) in enumerate(results):
        assert held["kv_heads"] == [rank]
        assert tokens == want_tokens, f"rank {rank}"
        torch.testing.assert_close(torch.from_numpy(prefill), want_prefill, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(torch.from_numpy(decode), want_decode, rtol=1e-5, atol=1e-4)
