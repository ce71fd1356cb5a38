"""Shared by the loading-layer tests: the shipped SmolLM2 GGUF, tiny random-weight Hugging Face
models, and a GGUF writer that converts them the way llama.cpp's convert_hf_to_gguf.py does
(q/k rows permuted for arch "llama", GPT-2's Conv1D weights stored as (out, in)).

The writer is written from llama.cpp's converter, independently of genfuse's loader, so a file
it writes checks the loader against the source weights and against transformers' GGUF loader.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from genfuse.runtime.registry import ModelNotInstalledError, registry_path


def smollm_gguf() -> Path:
    try:
        return registry_path("smollm2-135m-instruct")
    except ModelNotInstalledError as e:
        # The README's test command installs it; a missing model is a broken setup, not a skip.
        pytest.fail(f"SmolLM2 GGUF not installed: {e}")


def hf_gguf_dir(tmp_path_factory, gguf_path: Path) -> tuple[Path, str]:
    """transformers wants (folder, file name): a folder holding a link to the GGUF."""
    d = tmp_path_factory.mktemp("gguf_link")
    (d / gguf_path.name).symlink_to(gguf_path)
    return d, gguf_path.name


# --------------------------------------------------------------------------- tiny HF models

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def tiny_hf_model(kind: str):
    """A random-weight transformers model; every parameter (norms and biases too) is random so a
    mixed-up mapping cannot hide behind ones and zeros."""
    import transformers
    if kind == "llama":  # Llama-3 shape: GQA, untied, llama3 rope scaling
        cfg = transformers.LlamaConfig(
            vocab_size=288, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
            max_position_embeddings=256, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE),
            bos_token_id=1, eos_token_id=[2, 3])
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "smol":  # SmolLM2 shape, tied
        cfg = transformers.LlamaConfig(
            vocab_size=288, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
            max_position_embeddings=256, rope_theta=100000.0, bos_token_id=1, eos_token_id=2)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":  # q/k/v bias, none on o_proj, untied
        cfg = transformers.Qwen2Config(
            vocab_size=288, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
            max_position_embeddings=256, rope_theta=1000000.0, bos_token_id=1, eos_token_id=2)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(
            vocab_size=288, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            sliding_window=None, bos_token_id=1, eos_token_id=2)
        model = transformers.MistralForCausalLM(cfg)
    elif kind == "gpt2":
        # n_positions stays GPT-2's 1024: transformers reads a gpt2 GGUF's context_length into
        # n_ctx, not n_positions, so any other value breaks its (oracle) load of our GGUF
        cfg = transformers.GPT2Config(vocab_size=288, n_positions=1024, n_embd=64, n_layer=2, n_head=4,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    torch.manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


def canonical_reference(model) -> dict[str, torch.Tensor]:
    """transformers' state dict in genfuse's canonical form: no tied lm_head, GPT-2 Conv1D
    weights transposed to (out, in), no non-persistent buffers."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    if model.config.model_type == "gpt2":
        for k in list(sd):
            if re.search(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$", k):
                sd[k] = sd[k].t().contiguous()
            if re.search(r"\.attn\.(bias|masked_bias)$", k):
                del sd[k]
    return sd


def assert_same_state_dict(got: dict, ref: dict, atol: float = 0.0):
    assert sorted(got) == sorted(ref), (sorted(set(got) ^ set(ref)))[:10]
    for k in ref:
        assert got[k].shape == ref[k].shape, (k, got[k].shape, ref[k].shape)
        diff = (got[k].float() - ref[k].float()).abs().max().item()
        assert diff <= atol, f"{k}: max abs diff {diff} > {atol}"


# --------------------------------------------------------------------------- a tiny byte-level vocab


def byte_level_vocab(vocab_size: int):
    """(tokens, token_types, merges): <|endoftext|>, the 256 byte symbols, then merged pieces."""
    from genfuse.runtime.tokenizer import bytes_to_unicode

    symbols = [bytes_to_unicode()[b] for b in range(256)]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + symbols
    merges = []
    for a, b in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"),
                 ("Ġ", "w"), ("r", "e"), ("Ġ", "s"), ("i", "s"), ("Ġw", "o"), ("Ġwo", "r")]:
        if len(tokens) >= vocab_size:
            break
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    while len(tokens) < vocab_size:
        tokens.append(f"<|pad_{len(tokens)}|>")
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens, types, merges


# --------------------------------------------------------------------------- GGUF writer


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py, LlamaModel.permute
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_LLAMA_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}
_GPT2_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def gguf_tensors(model, arch: str) -> dict[str, np.ndarray]:
    """HF state dict -> {gguf name: float32 array} as llama.cpp's converter writes them."""
    c = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {}
    if arch in ("llama", "qwen2"):
        out["token_embd.weight"] = sd["model.embed_tokens.weight"]
        out["output_norm.weight"] = sd["model.norm.weight"]
        if not c.tie_word_embeddings:
            out["output.weight"] = sd["lm_head.weight"]
        for k, v in sd.items():
            m = re.match(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$", k)
            if not m:
                continue
            name = f"blk.{m[1]}.{_LLAMA_NAMES[m[2]]}.{m[3]}"
            if arch == "llama" and m[2] == "self_attn.q_proj":
                v = _llamacpp_permute(v, c.num_attention_heads)
            if arch == "llama" and m[2] == "self_attn.k_proj":
                v = _llamacpp_permute(v, c.num_key_value_heads)
            out[name] = v
    else:
        out["token_embd.weight"] = sd["transformer.wte.weight"]
        out["position_embd.weight"] = sd["transformer.wpe.weight"]
        out["output_norm.weight"] = sd["transformer.ln_f.weight"]
        out["output_norm.bias"] = sd["transformer.ln_f.bias"]
        for k, v in sd.items():
            m = re.match(r"transformer\.h\.(\d+)\.(.+)\.(weight|bias)$", k)
            if not m or m[2] not in _GPT2_NAMES:
                continue
            if m[3] == "weight" and m[2] in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                v = v.T  # Conv1D (in, out) -> (out, in)
            out[f"blk.{m[1]}.{_GPT2_NAMES[m[2]]}.{m[3]}"] = np.ascontiguousarray(v)
    return out


def write_gguf(path: Path, model, arch: str, qtype_for=None, *, tokenizer: dict | None = None,
               extra_tensors: dict | None = None) -> Path:
    """Write ``model`` as a GGUF. ``qtype_for(name, array) -> GGMLQuantizationType`` picks each
    tensor's type (default F32). ``tokenizer``: {"model", "tokens", "types", "merges"?, "scores"?,
    "pre"?, "bos"?, "eos"?, "add_bos"?, "chat_template"?}; default a byte-level toy vocabulary."""
    import gguf
    from gguf import GGMLQuantizationType as T

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-" + arch)
    if arch in ("llama", "qwen2"):
        w.add_block_count(c.num_hidden_layers)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_rope_freq_base(float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]))
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
        w.add_vocab_size(c.vocab_size)
    else:
        w.add_block_count(c.n_layer)
        w.add_context_length(c.n_positions)
        w.add_embedding_length(c.n_embd)
        w.add_feed_forward_length(4 * c.n_embd)
        w.add_head_count(c.n_head)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
    tok = tokenizer
    if tok is None:
        tokens, types, merges = byte_level_vocab(c.vocab_size)
        tok = {"model": "gpt2", "tokens": tokens, "types": types, "merges": merges, "bos": 0, "eos": 0}
    w.add_tokenizer_model(tok["model"])
    if "pre" in tok:
        w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if "scores" in tok:
        w.add_token_scores(tok["scores"])
    if tok.get("merges"):
        w.add_token_merges(tok["merges"])
    for key, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id)):
        if tok.get(key) is not None:
            fn(tok[key])
    if "add_bos" in tok:
        w.add_add_bos_token(tok["add_bos"])
    if "chat_template" in tok:
        w.add_chat_template(tok["chat_template"])

    tensors = gguf_tensors(model, arch)
    tensors.update(extra_tensors or {})
    for name, arr in tensors.items():
        qtype = T.F32 if qtype_for is None or arr.ndim == 1 else qtype_for(name, arr)
        data = gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
