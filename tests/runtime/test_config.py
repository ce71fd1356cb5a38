"""ModelConfig from Hugging Face config.json dicts and from GGUF metadata, against transformers."""
from __future__ import annotations

import json

import pytest

from genfuse.runtime.config import ModelConfig, load_config
from loader_helpers import LLAMA3_ROPE, hf_gguf_dir, smollm_gguf, tiny_hf_model, write_gguf

import transformers


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "smol"])
def test_llama_family_from_saved_config(tmp_path, kind):
    model = tiny_hf_model(kind)
    model.save_pretrained(tmp_path)
    hf = model.config
    c = load_config(tmp_path)
    assert c.arch == "llama" and c.model_type == hf.model_type
    assert (c.vocab_size, c.hidden_size, c.num_layers) == (hf.vocab_size, hf.hidden_size, hf.num_hidden_layers)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (4, 2, 16)
    assert c.intermediate_size == hf.intermediate_size
    assert c.norm_eps == hf.rms_norm_eps
    assert c.max_position_embeddings == hf.max_position_embeddings
    assert c.tie_word_embeddings == hf.tie_word_embeddings
    theta = getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"]
    assert c.rope_theta == theta
    assert c.attention_bias == (kind == "qwen2")
    assert not c.attention_out_bias and not c.mlp_bias
    assert c.hidden_act == "silu"
    assert c.bos_token_id == 1
    assert c.eos_token_ids == ((2, 3) if kind == "llama" else (2,))
    assert c.eos_token_id == 2
    assert c.rope_scaling == (LLAMA3_ROPE if kind == "llama" else None)


def test_gpt2_from_saved_config(tmp_path):
    model = tiny_hf_model("gpt2")
    model.save_pretrained(tmp_path)
    c = load_config(tmp_path)
    assert c.arch == "gpt2" and c.model_type == "gpt2"
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (64, 2, 4, 4, 16)
    assert c.intermediate_size == 256 and c.max_position_embeddings == 1024
    assert c.tie_word_embeddings and c.attention_bias and c.attention_out_bias and c.mlp_bias
    assert c.hidden_act == "gelu_tanh" and c.norm_eps == 1e-5
    assert c.eos_token_ids == (0,)


def test_older_config_layout():
    """transformers < 5 writes rope_theta and rope_scaling (with "type" in older files)."""
    d = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 128,
         "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "rope_theta": 500000.0,
         "rope_scaling": {**LLAMA3_ROPE, "rope_type": None, "type": "llama3"}, "eos_token_id": [7, 8],
         "torch_dtype": "bfloat16"}
    c = ModelConfig.from_hf(d)
    assert c.rope_theta == 500000.0 and c.rope_scaling == LLAMA3_ROPE
    assert c.num_kv_heads == 1 and c.eos_token_ids == (7, 8) and c.torch_dtype == "bfloat16"
    lin = ModelConfig.from_hf({**d, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert lin.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert ModelConfig.from_hf({**d, "rope_scaling": None}).rope_scaling is None
    # no num_key_value_heads: multi-head attention; no head_dim: hidden / heads
    mha = ModelConfig.from_hf({k: v for k, v in d.items() if k != "num_key_value_heads"})
    assert mha.num_kv_heads == 4 and mha.head_dim == 16


BASE = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128}


@pytest.mark.parametrize("change,match", [
    ({"model_type": "falcon"}, "falcon"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"num_key_value_heads": 3}, "multiple"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"intermediate_size": None}, "intermediate_size"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "sliding"),
])
def test_hf_config_errors(change, match):
    d = {**BASE, **change}
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(d, source="x/config.json")


def test_gpt2_unsupported_variants():
    d = {"model_type": "gpt2", "vocab_size": 10, "n_embd": 8, "n_layer": 1, "n_head": 2}
    assert ModelConfig.from_hf(d).intermediate_size == 32
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        ModelConfig.from_hf({**d, "scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(ValueError, match="relu"):
        ModelConfig.from_hf({**d, "activation_function": "relu"})


def test_load_config_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="JSON object"):
        load_config(tmp_path)


def test_smollm_gguf_config_matches_transformers(tmp_path_factory):
    path = smollm_gguf()
    c = load_config(path)
    # the numbers DESIGN.md states for the shipped model
    assert (c.arch, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert (c.vocab_size, c.tie_word_embeddings, c.rope_theta, c.head_dim) == (49152, True, 100000.0, 64)
    folder, name = hf_gguf_dir(tmp_path_factory, path)
    hf = transformers.AutoConfig.from_pretrained(str(folder), gguf_file=name)
    assert c.intermediate_size == hf.intermediate_size
    assert c.norm_eps == hf.rms_norm_eps
    assert c.max_position_embeddings == hf.max_position_embeddings
    assert (c.bos_token_id, c.eos_token_ids) == (hf.bos_token_id, (hf.eos_token_id,))
    assert c.rope_scaling is None and not c.attention_bias


@pytest.mark.parametrize("kind,arch", [("llama", "llama"), ("qwen2", "qwen2"), ("gpt2", "gpt2")])
def test_gguf_config_matches_source(tmp_path, kind, arch):
    model = tiny_hf_model(kind)
    c = load_config(write_gguf(tmp_path / "m.gguf", model, arch))
    ref = ModelConfig.from_hf(model.config.to_dict())
    same = ["arch", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "intermediate_size", "max_position_embeddings", "tie_word_embeddings", "attention_bias",
            "attention_out_bias", "mlp_bias", "hidden_act"]
    assert {k: getattr(c, k) for k in same} == {k: getattr(ref, k) for k in same}
    assert c.norm_eps == pytest.approx(ref.norm_eps, rel=1e-6)  # stored as float32
    if arch != "gpt2":
        assert c.rope_theta == ref.rope_theta


def test_gguf_config_unsupported_arch():
    with pytest.raises(ValueError, match="mamba"):
        ModelConfig.from_gguf({"general.architecture": "mamba"}, [], source="m.gguf")
    with pytest.raises(ValueError, match="llama.block_count"):
        ModelConfig.from_gguf({"general.architecture": "llama", "llama.embedding_length": 64,
                               "llama.attention.head_count": 4, "llama.vocab_size": 10}, [], source="m.gguf")


def test_config_is_frozen_and_validated():
    c = ModelConfig.from_hf(BASE)
    with pytest.raises(Exception):
        c.hidden_size = 3  # frozen
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig(arch="llama", vocab_size=1, hidden_size=0, num_layers=1, num_heads=1, num_kv_heads=1,
                    head_dim=2, intermediate_size=1, norm_eps=1e-5, max_position_embeddings=1,
                    tie_word_embeddings=True)
