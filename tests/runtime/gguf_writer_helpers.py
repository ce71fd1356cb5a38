"""Tiny GGUF files for the end-to-end model tests (test_gguf_models.py): a random-weight
transformers model written the way llama.cpp's convert_hf_to_gguf.py lays it out, each tensor in
a chosen GGML type, WITHOUT a tokenizer (genfuse must run such a file on token-id prompts).

The tensor layout (names, q/k row permutation for arch "llama", GPT-2's Conv1D weights stored as
(out, in)) comes from `loader_helpers.gguf_tensors`; the metadata keys are those the converter's
`set_gguf_parameters` writes for each architecture. Every tensor name is checked against gguf-py's
own table (`gguf.MODEL_TENSORS` / `gguf.TENSOR_NAMES`) so a typo cannot pass as a "real" file.

`raw_gguf` and the ``kv_*`` helpers build GGUF bytes by hand instead, for headers that lie
(counts and lengths past the end of the file, impossible configs) and which gguf-py cannot write.
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from loader_helpers import gguf_tensors


def tiny_gpt2():
    """GPT-2, 2 layers, hidden 64, 4 heads, vocab 288. n_positions stays 1024: transformers reads
    a gpt2 GGUF's context_length into n_ctx, not n_positions (see loader_helpers.tiny_hf_model)."""
    import transformers
    cfg = transformers.GPT2Config(vocab_size=288, n_positions=1024, n_embd=64, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    return _randomized(transformers.GPT2LMHeadModel(cfg))


def tiny_llama_gqa():
    """Llama, 3 layers, hidden 64, 4 query heads over 2 KV heads (head_dim 16), untied lm_head,
    plain rotary (no scaling: transformers' GGUF loader would not read llama.cpp's rope_freqs)."""
    return _tiny_llama(hidden_size=64, intermediate_size=96, num_hidden_layers=3)


def tiny_llama_256():
    """Llama, 2 layers, hidden 256 (one K-quant block a row), 4 query heads over 2 KV heads
    (head_dim 64), intermediate 512, untied lm_head: every matrix can be a K-quant."""
    return _tiny_llama(hidden_size=256, intermediate_size=512, num_hidden_layers=2)


def _tiny_llama(**dims):
    """A random untied Llama with 4 query heads over 2 KV heads and the given sizes."""
    import transformers
    cfg = transformers.LlamaConfig(
        vocab_size=288, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, **dims)
    return _randomized(transformers.LlamaForCausalLM(cfg))


def _randomized(model):
    """Every parameter random (norms and biases too), so a mixed-up mapping cannot hide. Norm
    weights scatter around 1 rather than 0: greedy decoding then wanders over many tokens instead
    of repeating one, and a wrong row anywhere shows in the tokens."""
    torch.manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = p.dim() == 1 and name.endswith(".weight")  # LayerNorm / RMSNorm scales
            p.normal_(1.0 if is_norm else 0.0, 0.5)
    return model.eval()


def _check_names(arch: str, names, n_layers: int) -> None:
    import gguf

    model_arch = {"llama": gguf.MODEL_ARCH.LLAMA, "gpt2": gguf.MODEL_ARCH.GPT2}[arch]
    known = set()
    for t in gguf.MODEL_TENSORS[model_arch]:
        base = gguf.TENSOR_NAMES[t]
        for bid in range(n_layers) if "{bid}" in base else [None]:
            stem = base.format(bid=bid)
            known |= {stem + ".weight", stem + ".bias"}
    unknown = sorted(set(names) - known)
    assert not unknown, f"not {arch} tensor names in gguf-py: {unknown}"


def write_model_gguf(path: Path, model, arch: str, qtype_for: Callable[[str, np.ndarray], object], *,
                     vocab_tokens: bool = False, raw: dict | None = None, gpt2_output: bool = True) -> Path:
    """Write ``model`` (GPT2LMHeadModel or LlamaForCausalLM) to ``path`` as a GGUF of ``arch``.

    ``qtype_for(gguf_name, float32 array) -> GGMLQuantizationType`` picks every tensor's type
    (1-D ones too); the bytes are `gguf.quants.quantize`'s. ``raw``: {name: GGML type} tensors
    written as that type with arbitrary bytes (types gguf-py cannot quantize, e.g. Q6_K).
    ``vocab_tokens``: add ``tokenizer.ggml.tokens`` (placeholder strings, no tokenizer model):
    transformers takes a gpt2 GGUF's vocabulary size from that list and nowhere else.
    ``gpt2_output``: the converter's GPT2Model writes wte twice, as token_embd.weight and as
    output.weight ("GPT2 output is tied to (same as) wte"); False leaves the copy out (tied).
    """
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    if arch == "gpt2":  # convert_hf_to_gguf GPT2Model.set_gguf_parameters
        w.add_block_count(c.n_layer)
        w.add_context_length(c.n_positions)
        w.add_embedding_length(c.n_embd)
        w.add_feed_forward_length(4 * c.n_embd)
        w.add_head_count(c.n_head)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
        n_layers = c.n_layer
    else:  # TextModel.set_gguf_parameters + LlamaModel's vocab size and rope dimensions
        w.add_vocab_size(c.vocab_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_rope_freq_base(float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]))
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
        n_layers = c.num_hidden_layers
    if vocab_tokens:
        w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])

    tensors = gguf_tensors(model, arch)
    if arch == "gpt2" and gpt2_output:
        tensors["output.weight"] = tensors["token_embd.weight"]
    _check_names(arch, list(tensors) + list(raw or {}), n_layers)
    for name, arr in tensors.items():
        if name in (raw or {}):
            continue
        qtype = qtype_for(name, arr)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        data = quantize_k(arr, qtype) if qtype.name in K_QUANTS else gguf.quants.quantize(arr, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
    for name, qtype in (raw or {}).items():
        rows, cols = tensors[name].shape
        block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
        data = np.random.default_rng(0).integers(0, 256, (rows, cols // block * type_bytes), dtype=np.uint8)
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --------------------------------------------------------------------------- K-quant blocks
# gguf-py (0.19) dequantizes the K-quants but cannot quantize them. These write the block layouts
# of llama.cpp's ggml-quants.c (csrc/kquant.h lists them) with its plain first-guess scales (no
# iterative refinement: make_qkx2_quants' search only lowers the error, the layout is the same).

K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")


def _f16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 bytes (n, 2), the fp16 values as float32) of float32 ``v`` (n,)."""
    h = v.astype(np.float16)
    return h.view(np.uint8).reshape(-1, 2), h.astype(np.float32)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), 0)


def quantize_k(arr: np.ndarray, qtype) -> np.ndarray:
    """float32 (rows, K), K a multiple of 256 -> uint8 (rows, K / 256 * block bytes) in Q4_K,
    Q5_K or Q6_K, the bytes `gguf.quants.dequantize` reads."""
    name = qtype.name
    rows, K = arr.shape
    assert K % 256 == 0, K
    x = arr.reshape(-1, 256).astype(np.float32)
    n = x.shape[0]
    if name == "Q6_K":
        sub = x.reshape(n, 16, 16)
        step = np.abs(sub).max(-1) / 31  # q - 32 in [-31, 31]
        d_bytes, d = _f16(step.max(-1) / 127)
        sc = np.clip(np.round(_safe_div(step, d[:, None])), -128, 127).astype(np.int8)
        eff = d[:, None] * sc.astype(np.float32)
        q = (np.clip(np.round(_safe_div(sub, eff[..., None])), -32, 31) + 32).astype(np.uint8)
        q = q.reshape(n, 2, 4, 32)  # [half h, chunk t, weight l]: weight 128 h + 32 t + l
        ql = (q[:, :, :2] & 15) | ((q[:, :, 2:] & 15) << 4)  # ql[64 h + 32 k + l], k = t % 2
        qh = sum(((q[:, :, t] >> 4) & 3) << (2 * t) for t in range(4))
        blocks = np.concatenate([ql.reshape(n, 128), qh.astype(np.uint8).reshape(n, 64), sc.view(np.uint8), d_bytes], axis=1)
    else:
        nmax = 15 if name == "Q4_K" else 31
        sub = x.reshape(n, 8, 32)
        lo = np.minimum(sub.min(-1), 0)
        step, neg_min = (sub.max(-1) - lo) / nmax, -lo
        d_bytes, d = _f16(step.max(-1) / 63)
        m_bytes, dmin = _f16(neg_min.max(-1) / 63)
        sc = np.clip(np.round(_safe_div(step, d[:, None])), 0, 63).astype(np.uint8)
        mn = np.clip(np.round(_safe_div(neg_min, dmin[:, None])), 0, 63).astype(np.uint8)
        eff, off = d[:, None] * sc.astype(np.float32), dmin[:, None] * mn.astype(np.float32)
        q = np.clip(np.round(_safe_div(sub + off[..., None], eff[..., None])), 0, nmax).astype(np.uint8)
        scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                                 (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=1)
        qs = ((q[:, 0::2] & 15) | ((q[:, 1::2] & 15) << 4)).reshape(n, 128)  # qs[32 g + l]: sub-blocks 2g, 2g + 1
        parts = [d_bytes, m_bytes, scales]
        if name == "Q5_K":
            parts.append(sum(((q[:, s] >> 4) & 1) << s for s in range(8)).astype(np.uint8))
        blocks = np.concatenate(parts + [qs], axis=1)
    return np.ascontiguousarray(blocks.astype(np.uint8)).reshape(rows, -1)


# --------------------------------------------------------------------------- hand-made (lying) GGUF bytes
# gguf-py's writer cannot write a header that lies about its counts; these build one byte by byte
# (GGUF v3 layout: gguf_guard's docstring).

GGUF_UINT32, GGUF_FLOAT32, GGUF_STRING, GGUF_ARRAY, GGUF_UINT64 = 4, 6, 8, 9, 10


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    """One key/value: ``payload`` is the value's bytes as written (see the kv_* helpers)."""
    return gstr(key) + struct.pack("<I", vtype) + payload


def kv_str(key: str, value: str) -> bytes:
    return kv(key, GGUF_STRING, gstr(value))


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, GGUF_UINT32, struct.pack("<I", value))


def kv_f32(key: str, value: float) -> bytes:
    return kv(key, GGUF_FLOAT32, struct.pack("<f", value))


def kv_array(key: str, item_type: int, count: int, items: bytes = b"") -> bytes:
    """An array claiming ``count`` items, followed by whatever ``items`` holds."""
    return kv(key, GGUF_ARRAY, struct.pack("<IQ", item_type, count) + items)


def tensor_info(name: str, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    """ggml lists dims fastest first; type 0 is F32."""
    return gstr(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + \
        struct.pack("<IQ", ggml_type, offset)


def raw_gguf(kvs: list[bytes], tensors: list[bytes] = (), data: bytes = b"", *, n_kv: int | None = None,
             n_tensors: int | None = None, version: int = 3, pad_to: int | None = None) -> bytes:
    """A GGUF file's bytes: header (counts default to the true ones), key/values, tensor infos,
    padding to 32 and ``data``; ``pad_to`` pads the whole file with zeros to that size."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    if tensors:
        body += b"\0" * (-len(body) % 32) + data
    if pad_to is not None:
        body += b"\0" * (pad_to - len(body))
    return body


def tiny_llama_metadata(arch: str = "llama", **overrides) -> list[bytes]:
    """The key/values of a 1-layer, hidden-8 llama GGUF; ``overrides``: {suffix: kv bytes or None}
    (None drops the key), suffixes like "block_count"."""
    base = {
        "block_count": kv_u32(f"{arch}.block_count", 1),
        "embedding_length": kv_u32(f"{arch}.embedding_length", 8),
        "feed_forward_length": kv_u32(f"{arch}.feed_forward_length", 16),
        "attention.head_count": kv_u32(f"{arch}.attention.head_count", 2),
        "vocab_size": kv_u32(f"{arch}.vocab_size", 4),
    }
    base.update(overrides)
    return [kv_str("general.architecture", arch)] + [v for v in base.values() if v is not None]
