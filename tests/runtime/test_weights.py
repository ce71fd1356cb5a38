"""Weight loaders against transformers: the shipped SmolLM2 GGUF, random-weight Llama-3 / Qwen2 /
Mistral / GPT-2 / SmolLM2-shaped models saved by `save_pretrained` (single and sharded
safetensors) and converted to GGUF in every supported tensor type; malformed files."""
from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from genfuse.runtime.config import load_config
from genfuse.runtime.weights import (
    SAFETENSORS_INDEX, expected_shapes, gguf_to_canonical, load_weights, unpermute_rotary)
from loader_helpers import (
    assert_same_state_dict, canonical_reference, hf_gguf_dir, smollm_gguf, tiny_hf_model, write_gguf)

import transformers
gguf = pytest.importorskip("gguf", reason="gguf is in the test extra; the GPU image lacks it unless its wheel is carried (bench/gpu_check.sh)")
T = gguf.GGMLQuantizationType
SIX_TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1]


@pytest.fixture(autouse=True)
def _no_torch_load(monkeypatch):
    """Nothing in the loaders may unpickle."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called by a loader")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


# --------------------------------------------------------------------------- the shipped GGUF


@pytest.fixture(scope="module")
def smollm_hf_state_dict(tmp_path_factory):
    """transformers' own load of the SmolLM2 GGUF (gguf + accelerate), once per module (~15 s)."""
    import accelerate  # noqa: F401 - transformers needs it to load a GGUF
    path = smollm_gguf()
    folder, name = hf_gguf_dir(tmp_path_factory, path)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
    return canonical_reference(model)


def test_smollm_gguf_equals_transformers(smollm_hf_state_dict):
    path = smollm_gguf()
    sd = load_weights(path)
    # tensor by tensor, exactly: same dequantization, same q/k un-permutation
    assert_same_state_dict(sd, smollm_hf_state_dict, atol=0.0)
    assert "lm_head.weight" not in sd  # tied
    assert all(t.dtype == torch.float32 for t in sd.values())


def test_smollm_gguf_types_and_dtype():
    path = smollm_gguf()
    reader = gguf.GGUFReader(str(path))
    assert {t.tensor_type for t in reader.tensors} == {T.Q4_1, T.Q8_0, T.F32}
    sd = load_weights(path, dtype=torch.bfloat16)
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)


# --------------------------------------------------------------------------- safetensors folders

KINDS = ["llama", "qwen2", "mistral", "gpt2", "smol"]


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("kind", KINDS)
def test_safetensors_folder_equals_transformers(tmp_path, kind, sharded):
    model = tiny_hf_model(kind)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB" if sharded else "5GB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert (tmp_path / SAFETENSORS_INDEX).is_file() == sharded
    assert (len(shards) > 1) == sharded
    assert not (tmp_path / "tokenizer.json").exists()  # no tokenizer: weights and config still load
    sd = load_weights(tmp_path)
    assert_same_state_dict(sd, canonical_reference(model), atol=0.0)
    cfg = load_config(tmp_path)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(cfg)


def test_safetensors_keeps_dtype_or_casts(tmp_path):
    model = tiny_hf_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    ref = canonical_reference(model)
    sd = load_weights(tmp_path)
    assert sd["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert_same_state_dict(sd, ref)
    sd32 = load_weights(tmp_path, dtype=torch.float32)
    assert sd32["model.norm.weight"].dtype == torch.float32
    assert_same_state_dict(sd32, ref)


def test_gpt2_legacy_names_and_buffers(tmp_path):
    """The original GPT-2 checkpoints: bare GPT2Model keys (no `transformer.`), causal-mask buffers."""
    from safetensors.torch import save_file

    model = tiny_hf_model("gpt2")
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()
          if k != "lm_head.weight"}
    for i in range(model.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(sd, str(tmp_path / "model.safetensors"))
    model.config.to_json_file(tmp_path / "config.json")
    assert_same_state_dict(load_weights(tmp_path), canonical_reference(model))


def test_tied_checkpoint_with_lm_head_copy(tmp_path):
    from safetensors.torch import save_file

    model = tiny_hf_model("smol")
    sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()}  # lm_head.weight included
    save_file(sd, str(tmp_path / "model.safetensors"))
    model.config.to_json_file(tmp_path / "config.json")
    got = load_weights(tmp_path)
    assert "lm_head.weight" not in got
    assert_same_state_dict(got, canonical_reference(model))


# --------------------------------------------------------------------------- GGUF written from HF models

GGUF_KINDS = [("llama", "llama"), ("smol", "llama"), ("qwen2", "qwen2"), ("gpt2", "gpt2")]


def _cycle_types():
    i = [0]

    def pick(name, arr):
        i[0] += 1
        return SIX_TYPES[i[0] % len(SIX_TYPES)]
    return pick


@pytest.mark.parametrize("kind,arch", GGUF_KINDS)
def test_gguf_f32_equals_source_weights(tmp_path, kind, arch):
    """An F32 GGUF holds the exact source weights: the un-permutation and the name map are exact."""
    model = tiny_hf_model(kind)
    path = write_gguf(tmp_path / "m.gguf", model, arch)
    assert_same_state_dict(load_weights(path), canonical_reference(model), atol=0.0)


@pytest.mark.parametrize("kind,arch", GGUF_KINDS)
def test_gguf_all_types_equal_transformers(tmp_path, kind, arch):
    """A GGUF mixing F32/F16/BF16/Q8_0/Q4_0/Q4_1 loads to transformers' state dict exactly, and
    within each type's quantization error of the source weights."""
    model = tiny_hf_model(kind)
    path = write_gguf(tmp_path / "m.gguf", model, arch, _cycle_types())
    assert {t.tensor_type for t in gguf.GGUFReader(str(path)).tensors} == set(SIX_TYPES)
    sd = load_weights(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    assert_same_state_dict(sd, canonical_reference(hf), atol=0.0)
    src = canonical_reference(model)
    for k in src:  # weights ~N(0, 0.5): Q4 steps are ~|max|/8 per block of 32
        assert (sd[k] - src[k]).abs().max() < 0.6, k


@pytest.mark.parametrize("qtype", SIX_TYPES, ids=lambda t: t.name)
def test_each_type_dequantizes_like_gguf(tmp_path, qtype):
    """Each type on its own: genfuse's tensor equals gguf.quants' dequantization of the same bytes."""
    model = tiny_hf_model("smol")
    path = write_gguf(tmp_path / "m.gguf", model, "llama", lambda n, a: qtype)
    sd = load_weights(path)
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name == "blk.1.ffn_down.weight":
            assert t.tensor_type == qtype
            ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(64, 96)
            np.testing.assert_array_equal(sd["model.layers.1.mlp.down_proj.weight"].numpy(), ref)


def test_gguf_rope_freqs_tensor(tmp_path):
    """Llama-3 GGUFs carry llama.cpp's rope frequency factors as a tensor: kept, and flagged in the config."""
    model = tiny_hf_model("smol")
    factors = np.linspace(1.0, 8.0, 8, dtype=np.float32)  # head_dim 16 -> 8 frequencies
    path = write_gguf(tmp_path / "m.gguf", model, "llama", extra_tensors={"rope_freqs.weight": factors})
    cfg = load_config(path)
    assert cfg.rope_scaling == {"rope_type": "freq_factors"}
    sd = load_weights(path)
    np.testing.assert_array_equal(sd["model.rope_freqs"].numpy(), factors)


def test_unpermute_inverts_llamacpp_permute():
    from loader_helpers import _llamacpp_permute

    w = torch.randn(6 * 8, 5)
    for heads in (1, 2, 6):
        permuted = torch.from_numpy(_llamacpp_permute(w.numpy(), heads))
        assert torch.equal(unpermute_rotary(permuted, heads), w)
    b = torch.randn(48)
    assert torch.equal(unpermute_rotary(torch.from_numpy(_llamacpp_permute(b.numpy(), 3)), 3), b)


def test_gguf_name_map():
    cfg = load_config_dict("llama")
    assert gguf_to_canonical("blk.3.attn_q.weight", cfg) == "model.layers.3.self_attn.q_proj.weight"
    assert gguf_to_canonical("blk.0.ffn_down.weight", cfg) == "model.layers.0.mlp.down_proj.weight"
    assert gguf_to_canonical("output.weight", cfg) == "lm_head.weight"
    assert gguf_to_canonical("blk.0.attn_qkv.weight", cfg) is None
    g = load_config_dict("gpt2")
    assert gguf_to_canonical("blk.1.attn_qkv.bias", g) == "transformer.h.1.attn.c_attn.bias"
    assert gguf_to_canonical("position_embd.weight", g) == "transformer.wpe.weight"


def load_config_dict(kind):
    from genfuse.runtime.config import ModelConfig

    return ModelConfig.from_hf(tiny_hf_model(kind).config.to_dict())


# --------------------------------------------------------------------------- malformed files


@pytest.fixture
def llama_folder(tmp_path):
    model = tiny_hf_model("llama")
    model.save_pretrained(tmp_path)
    return tmp_path


def _raises_naming(path, fn, *args, **kwargs):
    with pytest.raises(ValueError) as e:
        fn(*args, **kwargs)
    assert str(path) in str(e.value) or path.name in str(e.value), str(e.value)
    return str(e.value)


def test_truncated_safetensors(llama_folder):
    f = llama_folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _raises_naming(f, load_weights, llama_folder)


def test_random_bytes_safetensors(llama_folder):
    f = llama_folder / "model.safetensors"
    f.write_bytes(np.random.default_rng(0).bytes(4096))
    _raises_naming(f, load_weights, llama_folder)


def test_pickle_bin_only_is_refused(llama_folder):
    (llama_folder / "model.safetensors").unlink()
    f = llama_folder / "pytorch_model.bin"
    f.write_bytes(b"\x80\x04K\x01.")  # a valid pickle: it must not be opened at all
    msg = _raises_naming(f, load_weights, llama_folder)
    assert "pickle" in msg


def test_missing_and_misshapen_tensors(tmp_path):
    from safetensors.torch import save_file

    model = tiny_hf_model("llama")
    model.config.to_json_file(tmp_path / "config.json")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    f = tmp_path / "model.safetensors"
    save_file({k: v for k, v in sd.items() if k != "model.norm.weight"}, str(f))
    assert "missing" in _raises_naming(tmp_path, load_weights, tmp_path)
    save_file({**sd, "model.extra.weight": torch.zeros(2)}, str(f))
    assert "unexpected" in _raises_naming(tmp_path, load_weights, tmp_path)
    save_file({**sd, "model.norm.weight": torch.zeros(63)}, str(f))
    assert "shape" in _raises_naming(tmp_path, load_weights, tmp_path)


def test_bad_index(llama_folder):
    (llama_folder / SAFETENSORS_INDEX).write_text("{not json")
    _raises_naming(llama_folder / SAFETENSORS_INDEX, load_weights, llama_folder)
    (llama_folder / SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": {"a": "nope.safetensors"}}))
    _raises_naming(llama_folder / SAFETENSORS_INDEX, load_weights, llama_folder)


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_gguf(tmp_path / "m.gguf", tiny_hf_model("smol"), "llama")


def test_truncated_gguf(tiny_gguf):
    data = tiny_gguf.read_bytes()
    for cut in (10, 200, len(data) // 2, len(data) - 7):
        bad = tiny_gguf.with_name(f"cut{cut}.gguf")
        bad.write_bytes(data[:cut])
        _raises_naming(bad, load_weights, bad)


def test_random_and_wrong_magic_gguf(tmp_path):
    f = tmp_path / "random.gguf"
    f.write_bytes(np.random.default_rng(1).bytes(4096))
    _raises_naming(f, load_weights, f)
    g = tmp_path / "magic.gguf"
    g.write_bytes(b"GGUF" + struct.pack("<I", 3) + np.random.default_rng(2).bytes(4096))
    _raises_naming(g, load_weights, g)


def test_gguf_unsupported_type_and_unknown_tensor(tmp_path):
    model = tiny_hf_model("smol")
    p = write_gguf(tmp_path / "q5.gguf", model, "llama", lambda n, a: T.Q5_0)
    assert "Q5_0" in _raises_naming(p, load_weights, p)
    p = write_gguf(tmp_path / "extra.gguf", model, "llama",
                   extra_tensors={"blk.0.ssm_conv1d.weight": np.zeros((4, 32), np.float32)})
    assert "blk.0.ssm_conv1d.weight" in _raises_naming(p, load_weights, p)


def test_not_a_model_path(tmp_path):
    f = tmp_path / "weights.npz"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="weights.npz"):
        load_weights(f)


# --------------------------------------------------------------------------- lying configs and indexes (issue 10)


def test_tensor_count_is_compared_before_shapes_are_built(monkeypatch):
    """A config claiming far more layers than the file holds is refused from arithmetic alone:
    expected_shapes (one dict entry per tensor per claimed layer) is never built."""
    from genfuse.runtime import weights
    from genfuse.runtime.config import ModelConfig

    c = ModelConfig(arch="llama", vocab_size=4, hidden_size=8, num_layers=4096, num_heads=2, num_kv_heads=2,
                    head_dim=4, intermediate_size=8, norm_eps=1e-5, max_position_embeddings=16,
                    tie_word_embeddings=True)
    assert weights.expected_tensor_count(c) == len(weights.expected_shapes(c)) == 2 + 9 * 4096
    calls = []
    real = weights._layer_shapes
    monkeypatch.setattr(weights, "_layer_shapes", lambda cfg, i: calls.append(i) or real(cfg, i))
    sd = {"model.embed_tokens.weight": torch.zeros(4, 8), "model.norm.weight": torch.zeros(8)}
    with pytest.raises(ValueError, match=r"src: the llama config \(4096 layers\) implies 36866 tensors, the file holds 2"):
        weights.check_state_dict(sd, c, "src")
    assert calls == [0]


def test_hf_config_claiming_a_billion_layers(llama_folder):
    cfg = json.loads((llama_folder / "config.json").read_text())
    (llama_folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10**9}))
    with pytest.raises(ValueError, match="num_hidden_layers = 1000000000"):
        load_weights(llama_folder)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/abs.safetensors", "sub/../../x.safetensors",
                                  "..\\x.safetensors", "C:\\x.safetensors", ""])
def test_index_naming_shards_outside_the_folder(llama_folder, name):
    outside = llama_folder.parent / "outside.safetensors"
    (llama_folder / "model.safetensors").rename(outside)  # a real shard sits outside: still refused
    index = llama_folder / SAFETENSORS_INDEX
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": name}}))
    msg = _raises_naming(index, load_weights, llama_folder)
    assert "outside the model folder" in msg or "non-empty" in msg, msg


def test_symlinked_shard_escaping_the_folder(llama_folder, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "w.safetensors"
    (llama_folder / "model.safetensors").rename(elsewhere)
    (llama_folder / "model.safetensors").symlink_to(elsewhere)
    with pytest.raises(ValueError, match="outside the model folder"):
        load_weights(llama_folder)
    index = llama_folder / SAFETENSORS_INDEX
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "model.safetensors"}}))
    with pytest.raises(ValueError, match="outside the model folder"):
        load_weights(llama_folder)


def test_hub_cache_layout_links_are_followed(tmp_path):
    """huggingface_hub's cache: snapshots/<rev>/<file> links to ../../blobs/<hash>; it must load."""
    model = tiny_hf_model("llama")
    repo = tmp_path / "models--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    model.save_pretrained(snap)
    for f in list(snap.iterdir()):
        blob = blobs / f"hash-{f.name}"
        f.rename(blob)
        f.symlink_to(Path("../../blobs") / blob.name)
    sd = load_weights(snap)
    assert_same_state_dict(sd, canonical_reference(model))
