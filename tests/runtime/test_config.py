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
    # the shipped model's real shape (30 layers, hidden 576, 9 query / 3 KV heads, vocab 49152)
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


# --------------------------------------------------------------------------- bad values (issue 10: items 5, 10, 11)


@pytest.mark.parametrize("change,needle", [
    ({"rms_norm_eps": None}, "rms_norm_eps = None is not a positive finite number"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps = 0.0"),
    ({"rms_norm_eps": -1e-5}, "rms_norm_eps = -1e-05"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps = nan"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps = '1e-5'"),
    ({"eos_token_id": "two"}, "eos_token_id = 'two' is not a token id"),
    ({"eos_token_id": [2, -1]}, "eos_token_id = [2, -1]"),
    ({"bos_token_id": 1.5}, "bos_token_id = 1.5"),
    ({"hidden_size": "sixty-four"}, "hidden_size = 'sixty-four' is not an int"),
    ({"hidden_size": 64.0}, "hidden_size = 64.0"),
    ({"num_hidden_layers": 10**9}, "num_hidden_layers = 1000000000 is not an int in [1, 4096]"),
    ({"num_hidden_layers": True}, "num_hidden_layers = True"),
    ({"num_attention_heads": 0}, "num_attention_heads = 0"),
    ({"num_key_value_heads": 0}, "num_key_value_heads = 0"),
    ({"vocab_size": 2**40}, "vocab_size = 1099511627776"),
    ({"max_position_embeddings": 2**40}, "max_position_embeddings = 1099511627776"),
    ({"intermediate_size": -5}, "intermediate_size = -5"),
    ({"head_dim": "16"}, "head_dim = '16'"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings = 'false' is not true or false"),
    ({"rope_theta": 0}, "rope_theta = 0.0"),
    ({"rope_theta": -10000.0}, "rope_theta = -10000.0"),
    ({"rope_theta": float("inf")}, "rope_theta = inf"),
    ({"rope_scaling": {"type": "linear", "factor": 0}}, "rope_scaling.factor = 0.0"),
    ({"rope_scaling": {"type": "linear", "factor": -2.0}}, "rope_scaling.factor = -2.0"),
    ({"rope_scaling": {"type": "linear", "factor": float("nan")}}, "rope_scaling.factor = nan"),
    ({"rope_scaling": {"type": "linear"}}, "rope_scaling.factor"),
    ({"rope_scaling": {**LLAMA3_ROPE, "factor": 0.0}}, "rope_scaling.factor = 0.0"),
    ({"rope_scaling": {**LLAMA3_ROPE, "low_freq_factor": float("inf")}}, "rope_scaling.low_freq_factor = inf"),
    ({"rope_scaling": {**LLAMA3_ROPE, "high_freq_factor": 1.0}}, "must exceed low_freq_factor"),
    ({"rope_scaling": {**LLAMA3_ROPE, "original_max_position_embeddings": "64"}},
     "rope_scaling.original_max_position_embeddings = '64'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0.0}}, "rope_parameters.rope_theta = 0.0"),
    ({"rope_scaling": "linear"}, "rope_scaling = 'linear' is not an object"),
    ({"model_type": ["llama"]}, "model_type ['llama'] is not supported"),
    ({"num_attention_heads": 5}, "num_heads=5 is not a multiple of num_kv_heads=2"),
])
def test_bad_config_values_name_key_and_value(tmp_path, change, needle):
    """Every key goes through one reader: a ValueError naming the file, the key and the value --
    not a bare float()/int() error, a ZeroDivisionError, or a model that silently computes garbage
    (a rope factor of 0 generated token 0 for ever). JSON's NaN/Infinity are read by json too."""
    d = {**BASE, "num_key_value_heads": 2, **change}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError) as e:
        load_config(tmp_path)
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "config.json") + ":") and needle in msg and "\n" not in msg, msg


def test_null_means_default_only_where_configs_write_it():
    d = {**BASE, "num_key_value_heads": None, "head_dim": None, "rope_scaling": None, "eos_token_id": None,
         "bos_token_id": None, "torch_dtype": None}
    c = ModelConfig.from_hf(d)
    assert (c.num_kv_heads, c.head_dim, c.rope_scaling, c.eos_token_ids, c.bos_token_id) == (4, 16, None, (), None)
    gpt2 = {"model_type": "gpt2", "vocab_size": 10, "n_embd": 8, "n_layer": 1, "n_head": 2, "n_inner": None}
    assert ModelConfig.from_hf(gpt2).intermediate_size == 32
    with pytest.raises(ValueError, match="layer_norm_epsilon = None"):
        ModelConfig.from_hf({**gpt2, "layer_norm_epsilon": None})


def test_dataclass_bounds_and_rope_checks():
    ok = dict(arch="llama", vocab_size=4, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4,
              intermediate_size=8, norm_eps=1e-5, max_position_embeddings=16, tie_word_embeddings=True)
    ModelConfig(**ok)
    for change, needle in [({"num_layers": 10**9}, "num_layers"), ({"rope_theta": float("nan")}, "rope_theta"),
                           ({"norm_eps": 0.0}, "norm_eps"),
                           ({"rope_scaling": {"rope_type": "linear", "factor": 0.0}}, "rope_scaling factor"),
                           ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling factor"),
                           ({"rope_scaling": {**LLAMA3_ROPE, "original_max_position_embeddings": 0}},
                            "original_max_position_embeddings")]:
        with pytest.raises(ValueError, match=needle):
            ModelConfig(**{**ok, **change})


def _gguf(tmp_path, name, *, blocks=1, **overrides):
    """A hand-made llama GGUF (1 layer, hidden 8, 2 heads) with one F32 tensor per block."""
    from gguf_writer_helpers import raw_gguf, tensor_info, tiny_llama_metadata

    tensors = [tensor_info(f"blk.{i}.attn_norm.weight", [8], offset=32 * i) for i in range(blocks)]
    f = tmp_path / name
    f.write_bytes(raw_gguf(tiny_llama_metadata(**overrides), tensors, b"\0" * 32 * blocks))
    return f


def test_gguf_bad_values_name_key_and_value(tmp_path):
    from gguf_writer_helpers import kv_f32, kv_str, kv_u32

    assert load_config(_gguf(tmp_path, "ok.gguf")).num_layers == 1
    cases = {
        "heads0": ({"attention.head_count": kv_u32("llama.attention.head_count", 0)},
                   "llama.attention.head_count = 0"),  # was a ZeroDivisionError
        "hidden_str": ({"embedding_length": kv_str("llama.embedding_length", "sixty-four")},
                       "llama.embedding_length = 'sixty-four' is not an int"),
        "theta0": ({"rope.freq_base": kv_f32("llama.rope.freq_base", 0.0)}, "llama.rope.freq_base = 0.0"),
        "theta_neg": ({"rope.freq_base": kv_f32("llama.rope.freq_base", -1.0)}, "llama.rope.freq_base = -1.0"),
        "eps_nan": ({"eps": kv_f32("llama.attention.layer_norm_rms_epsilon", float("nan"))},
                    "llama.attention.layer_norm_rms_epsilon = nan"),
        "eps0": ({"eps": kv_f32("llama.attention.layer_norm_rms_epsilon", 0.0)},
                 "llama.attention.layer_norm_rms_epsilon = 0.0"),
        "factor0": ({"t": kv_str("llama.rope.scaling.type", "linear"), "f": kv_f32("llama.rope.scaling.factor", 0.0)},
                    "llama.rope.scaling.factor = 0.0"),
        "factor_inf": ({"t": kv_str("llama.rope.scaling.type", "linear"),
                        "f": kv_f32("llama.rope.scaling.factor", float("inf"))}, "llama.rope.scaling.factor = inf"),
        "eos_str": ({"eos": kv_str("tokenizer.ggml.eos_token_id", "two")}, "tokenizer.ggml.eos_token_id = 'two'"),
        "ctx_huge": ({"ctx": kv_u32("llama.context_length", 2**31)}, "llama.context_length = 2147483648"),
    }
    for name, (overrides, needle) in cases.items():
        f = _gguf(tmp_path, name + ".gguf", **overrides)
        with pytest.raises(ValueError) as e:
            load_config(f)
        assert str(e.value).startswith(str(f) + ":") and needle in str(e.value), (name, str(e.value))
    from gguf_writer_helpers import raw_gguf, tiny_llama_metadata

    f = tmp_path / "arch.gguf"
    f.write_bytes(raw_gguf([kv_u32("general.architecture", 7)] + tiny_llama_metadata()[1:]))
    with pytest.raises(ValueError, match="general.architecture = 7 is not a string"):
        load_config(f)


def test_gguf_block_count_is_checked_against_the_tensors(tmp_path):
    """llama.block_count = 10**9 in a ~300-byte file made expected_shapes build 9 entries per
    claimed layer (9 GB, minutes); now the count is bounded and must match the file's blocks."""
    from gguf_writer_helpers import kv_u32

    f = _gguf(tmp_path, "billion.gguf", block_count=kv_u32("llama.block_count", 10**9))
    assert f.stat().st_size < 400
    with pytest.raises(ValueError, match=r"llama.block_count = 1000000000 is not an int in \[1, 4096\]"):
        load_config(f)
    f = _gguf(tmp_path, "more.gguf", block_count=kv_u32("llama.block_count", 4000))
    with pytest.raises(ValueError, match=r"llama.block_count = 4000, but the file's tensors hold blocks 0..0"):
        load_config(f)
    f = _gguf(tmp_path, "fewer.gguf", blocks=3)
    with pytest.raises(ValueError, match=r"block_count = 1, but the file's tensors hold blocks 0..2"):
        load_config(f)
