"""End to end on GGUF files written here the way llama.cpp's converter lays them out (issue 4):
a tiny GPT-2 and a tiny grouped-query Llama with an untied output.weight, their matrices in
Q8_0 / Q4_0 / Q4_1 (an F16 one among them), and a Q4_K_M-like Llama (Q4_K / Q5_K / Q6_K), no
tokenizer in the file. `LLM` generates greedily
from token ids with the matrices kept packed (`runtime.quant`) and dequantized at load, and
transformers, loading the same file with ``gguf_file=`` (it dequantizes with gguf-py), is the
oracle: same tokens, logits within float32 summation-order error. Then GPT-2 through the Triton
interpreter, and files genfuse must refuse (a type it cannot read, a truncated file).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from genfuse.runtime.llm import LLM
from genfuse.runtime.quant import PackedWeight
from genfuse.runtime.sampling import SamplingParams
from gguf_writer_helpers import tiny_gpt2, tiny_llama_256, tiny_llama_gqa, write_model_gguf

import transformers
from engine_helpers import prompt_logits
gguf = pytest.importorskip("gguf", reason="gguf is in the test extra; the GPU image lacks it unless its wheel is carried (bench/gpu_check.sh)")
T = gguf.GGMLQuantizationType

PROMPT = [5, 17, 200, 33, 91, 7]
LONG_PROMPT = [(7 * i + 3) % 288 for i in range(40)]  # > 32 rows: packed weights are dequantized for its prefill
N_NEW = 16
GREEDY = SamplingParams(max_tokens=N_NEW, temperature=0, ignore_eos=True)


# --------------------------------------------------------------------------- tensor types


def gpt2_types(tied: bool):
    """blk.0 in Q8_0, blk.1 in Q4_0; F16 token embedding and norm scales, F32 positions and
    biases. ``tied``: no output.weight and a Q8_0 token embedding (packed lookup + packed head);
    else the converter's Q8_0 output.weight copy next to an F16 embedding."""
    def pick(name: str, arr: np.ndarray):
        if name == "token_embd.weight":
            return T.Q8_0 if tied else T.F16
        if name == "output.weight":
            return T.Q8_0
        if name == "position_embd.weight" or name.endswith(".bias"):
            return T.F32
        if arr.ndim == 1:
            return T.F16
        return T.Q8_0 if name.startswith("blk.0.") else T.Q4_0
    return pick


LLAMA_LAYER_TYPES = {0: T.Q4_0, 1: T.Q4_1, 2: T.Q8_0}
LLAMA_F16 = "blk.1.ffn_gate.weight"  # dense next to a packed ffn_up: [gate; up] is dequantized


def llama_types(name: str, arr: np.ndarray):
    """Layer i's matrices in LLAMA_LAYER_TYPES[i] (one F16 among them), a Q8_0 embedding, a Q4_1
    untied output.weight, F32 norms."""
    if arr.ndim == 1:
        return T.F32
    if name == "token_embd.weight":
        return T.Q8_0
    if name == "output.weight":
        return T.Q4_1
    if name == LLAMA_F16:
        return T.F16
    return LLAMA_LAYER_TYPES[int(name.split(".")[1])]


# --------------------------------------------------------------------------- files and oracle


def _write_pair(d: Path, model, arch: str, pick, **kw) -> Path:
    """m.gguf for genfuse (no tokenizer metadata at all) and hf/m.gguf for transformers, which
    reads a gpt2 file's vocabulary size only from tokenizer.ggml.tokens; both hold the same
    tensors, byte for byte."""
    path = write_model_gguf(d / "m.gguf", model, arch, pick, **kw)
    (d / "hf").mkdir()
    hf_path = write_model_gguf(d / "hf" / "m.gguf", model, arch, pick, vocab_tokens=True, **kw)
    ours, theirs = gguf.GGUFReader(str(path)).tensors, gguf.GGUFReader(str(hf_path)).tensors
    assert [(t.name, t.tensor_type) for t in ours] == [(t.name, t.tensor_type) for t in theirs]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ours, theirs))
    assert "tokenizer.ggml.tokens" not in gguf.GGUFReader(str(path)).fields
    return path


def _oracle(path: Path, prompt: list[int] = PROMPT, n_new: int = N_NEW, n_logits: int | None = None):
    """transformers' greedy ``n_new`` tokens from ``prompt`` and its last-position logits over
    prompt + them (prompt + the first ``n_logits`` of them, when given)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent / "hf"), gguf_file=path.name,
                                                           dtype=torch.float32)
    hf.generation_config.bos_token_id = hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False, pad_token_id=0)
        tokens = out[0, len(prompt):].tolist()
        logits = hf(torch.tensor([prompt + tokens[:n_logits]])).logits[0, -1]
    return tokens, logits


def _last_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """genfuse's last-position logits over ``ids`` (a prefill of at most 32 rows: packed
    weights go through the C++ matmul, not the dequantize-then-GEMM path of long prompts)."""
    assert len(ids) <= 32
    return prompt_logits(llm, ids)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()  # ~1e-6 here: summation order only


@pytest.fixture(scope="module", params=[False, True], ids=["converter", "tied"])
def gpt2_file(request, tmp_path_factory):
    tied = request.param
    path = _write_pair(tmp_path_factory.mktemp("gpt2"), tiny_gpt2(), "gpt2", gpt2_types(tied),
                       gpt2_output=not tied)
    return path, tied, _oracle(path)


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    path = _write_pair(tmp_path_factory.mktemp("llama"), tiny_llama_gqa(), "llama", llama_types)
    return path, _oracle(path), _oracle(path, LONG_PROMPT)[0]


def _both_ways(path: Path) -> dict[bool, LLM]:
    return {kq: LLM(path, device="cpu", backend="torch", keep_quantized=kq) for kq in (True, False)}


# --------------------------------------------------------------------------- 1. GPT-2


def test_gpt2_gguf_generates_like_transformers(gpt2_file):
    path, tied, (hf_tokens, hf_logits) = gpt2_file
    assert len(set(hf_tokens)) > 4, hf_tokens  # the check means something only if decoding wanders
    llms = _both_ways(path)
    for kq, llm in llms.items():
        assert llm.tokenizer is None and llm.config.arch == "gpt2"
        assert llm.config.vocab_size == 288  # from token_embd.weight: a gpt2 file has no vocab_size key
        assert llm.config.tie_word_embeddings == tied
        got = llm.generate(PROMPT, GREEDY)[0]
        assert got.token_ids == hf_tokens, f"keep_quantized={kq}"
    packed, dense = llms[True].model, llms[False].model
    for blk in packed.blocks:  # the packed run really multiplied with blocks, the other never
        assert all(isinstance(w, PackedWeight) for w in (blk.w_qkv, blk.w_o, blk.w_fc, blk.w_proj))
    assert [b.w_qkv.qtype for b in packed.blocks] == ["Q8_0", "Q4_0"]
    assert isinstance(packed.lm_head, PackedWeight) and isinstance(packed.wte, PackedWeight) == tied
    assert not any(isinstance(v, PackedWeight) for b in dense.blocks for v in vars(b).values())
    ids = PROMPT + hf_tokens
    lp, ld = _last_logits(llms[True], ids), _last_logits(llms[False], ids)
    assert _rel(lp, ld) < 1e-4
    assert _rel(ld, hf_logits) < 1e-4


def test_gguf_without_tokenizer_takes_only_token_ids(gpt2_file):
    llm = LLM(gpt2_file[0], device="cpu", backend="torch")
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello", GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([5, 288], GREEDY)


def test_packed_gpt2_refuses_a_float16_kv_cache(gpt2_file):
    """Packed GPT-2 weights on CPU still run the torch layers (the fused ones are the Llama
    family's): float16 K/V is refused by name, not attempted."""
    from genfuse.runtime.engine import Engine

    loaded = LLM(gpt2_file[0], device="cpu", backend="torch", keep_quantized=True).engine.loaded
    with pytest.raises(ValueError, match=r"kv_cache_dtype='float16' differs from the model's float32: only the fused"):
        Engine(loaded, kv_cache_dtype="float16", num_kv_blocks=8)


# --------------------------------------------------------------------------- 2. Llama, GQA


def test_llama_gqa_gguf_generates_like_transformers(llama_file):
    path, (hf_tokens, hf_logits), hf_long = llama_file
    assert len(set(hf_tokens)) > 4, hf_tokens
    llms = _both_ways(path)
    for kq, llm in llms.items():
        c = llm.config
        assert (c.num_heads, c.num_kv_heads, c.tie_word_embeddings) == (4, 2, False)
        # a batch of two: decode steps of 2 rows, and a prompt long enough for the GEMM prefill
        got = [c.token_ids for c in llm.generate([PROMPT, LONG_PROMPT], GREEDY)]
        assert got == [hf_tokens, hf_long], f"keep_quantized={kq}"
    packed, dense = llms[True].model, llms[False].model
    assert [lw.w_qkv.qtype for lw in packed.layers] == ["Q4_0", "Q4_1", "Q8_0"]
    assert [isinstance(lw.w_gate_up, PackedWeight) for lw in packed.layers] == [True, False, True]
    assert (packed.lm_head.qtype, packed.embed.qtype) == ("Q4_1", "Q8_0")
    for lp, ld in zip(packed.layers, dense.layers):
        # the packed q/k rows were un-permuted as rows of blocks: decoding them gives exactly the
        # dequantize-then-unpermute weight (which transformers' tokens and logits vouch for)
        assert torch.equal(lp.w_qkv.dequantize(), ld.w_qkv)
    ids = PROMPT + hf_tokens
    lp, ld = _last_logits(llms[True], ids), _last_logits(llms[False], ids)
    assert _rel(lp, ld) < 1e-4
    assert _rel(ld, hf_logits) < 1e-4


def test_llama_qkv_in_mixed_quant_types(tmp_path):
    """llama.cpp's quantizer often gives attn_v a bigger type than attn_q / attn_k."""
    def pick(name, arr):
        return T.Q8_0 if ".attn_v." in name else llama_types(name, arr)
    path = _write_pair(tmp_path, tiny_llama_gqa(), "llama", pick)
    hf_tokens, _ = _oracle(path)
    assert LLM(path, device="cpu", backend="torch", keep_quantized=False).generate(PROMPT, GREEDY)[0].token_ids \
        == hf_tokens
    packed = LLM(path, device="cpu", backend="torch", keep_quantized=True)
    from genfuse.runtime.quant import PackedRows

    w_qkv = packed.model.layers[0].w_qkv
    assert isinstance(w_qkv, PackedRows) and [p.qtype for p in w_qkv.parts][-1] == "Q8_0"
    assert packed.generate(PROMPT, GREEDY)[0].token_ids == hf_tokens


# --------------------------------------------------------------------------- 3. the interpreter


# gelu_tanh is a sigmoid in the linear epilogue: exp(-2u) overflows to inf for very negative
# pre-activations (numpy warns under the interpreter) and the sigmoid is then exactly 0, as it should be
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_gpt2_gguf_through_triton_interpreter(gpt2_file):
    """backend=None under TRITON_INTERPRET runs the Triton kernels, so nothing stays packed."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("checks the interpreter's default (the CPU test session sets TRITON_INTERPRET=1)")
    path, _, (hf_tokens, _) = gpt2_file
    llm = LLM(path, device="cpu")
    assert llm.keep_quantized is False
    assert not any(isinstance(w, PackedWeight) for w in (llm.model.lm_head, llm.model.wte))
    assert llm.generate(PROMPT, GREEDY)[0].token_ids == hf_tokens
    with pytest.raises(ValueError, match="keep_quantized=True"):
        LLM(path, device="cpu", keep_quantized=True)


# --------------------------------------------------------------------------- 4. K-quants


def q4_k_m_types(name: str, arr: np.ndarray):
    """llama.cpp's Q4_K_M mix on two layers: Q4_K matrices (the embedding too), a Q6_K output
    head, Q6_K attn_v and ffn_down where its use_more_bits picks them (layer 0 here), and a Q5_K
    ffn_down in layer 1 (Q5_K_M's type, so all three are run); F32 norms. Hidden 256 and
    intermediate 512: every row is whole 256-weight blocks."""
    if arr.ndim == 1:
        return T.F32
    if name in ("output.weight", "blk.0.attn_v.weight", "blk.0.ffn_down.weight"):
        return T.Q6_K
    if name == "blk.1.ffn_down.weight":
        return T.Q5_K
    return T.Q4_K


K_NEW = 32
K_LOGITS = 24  # logits over PROMPT + 24 tokens: 30 rows, a prefill on the packed kernel


@pytest.fixture(scope="module")
def kquant_file(tmp_path_factory):
    path = _write_pair(tmp_path_factory.mktemp("kquant"), tiny_llama_256(), "llama", q4_k_m_types)
    return path, _oracle(path, n_new=K_NEW, n_logits=K_LOGITS)


def test_k_quant_llama_gguf_generates_like_transformers(kquant_file):
    """A Q4_K_M-like file, packed (the K-quant integer-dot kernel, 32-bit activations) and
    dequantized at load (genfuse's C++ dequantizer): transformers' 32 greedy tokens, and logits
    within float32 rounding of them (kquant.h: float32-exact at 32 bits)."""
    from genfuse.runtime.quant import PackedRows

    path, (hf_tokens, hf_logits) = kquant_file
    assert len(set(hf_tokens)) > 4, hf_tokens
    llms = _both_ways(path)
    params = SamplingParams(max_tokens=K_NEW, temperature=0, ignore_eos=True)
    for kq, llm in llms.items():
        assert llm.generate(PROMPT, params)[0].token_ids == hf_tokens, f"keep_quantized={kq}"
    packed, dense = llms[True].model, llms[False].model
    l0, l1 = packed.layers
    assert isinstance(l0.w_qkv, PackedRows) and [p.qtype for p in l0.w_qkv.parts] == ["Q4_K", "Q4_K", "Q6_K"]
    assert (l1.w_qkv.qtype, l0.w_down.qtype, l1.w_down.qtype, l0.w_gate_up.qtype) == ("Q4_K", "Q6_K", "Q5_K", "Q4_K")
    assert (packed.lm_head.qtype, packed.embed.qtype) == ("Q6_K", "Q4_K")
    assert not any(isinstance(v, (PackedWeight, PackedRows)) for lw in dense.layers for v in vars(lw).values())
    for lp, ld in zip(packed.layers, dense.layers):
        assert torch.equal(lp.w_qkv.dequantize(), ld.w_qkv)  # un-permuted q/k rows of blocks
    ids = PROMPT + hf_tokens[:K_LOGITS]
    lp, ld = _last_logits(llms[True], ids), _last_logits(llms[False], ids)
    assert _rel(lp, ld) < 1e-4
    assert _rel(ld, hf_logits) < 1e-4
    assert _rel(lp, hf_logits) < 1e-4


# --------------------------------------------------------------------------- 5. files to refuse


@pytest.mark.parametrize("keep_quantized", [True, False])
@pytest.mark.parametrize("kind,tensor,qtype", [
    ("gpt2", "blk.1.ffn_down.weight", T.Q2_K),  # a K-quant genfuse does not read: 256-wide blocks, K = 256
    ("gpt2", "blk.1.ffn_down.weight", T.IQ2_XXS),  # an i-quant
    ("llama", "blk.2.attn_q.weight", T.Q5_0),  # a q row block llama.cpp permutes
])
def test_unsupported_tensor_type_names_file_and_tensor(tmp_path, kind, tensor, qtype, keep_quantized):
    model, pick = (tiny_gpt2(), gpt2_types(False)) if kind == "gpt2" else (tiny_llama_gqa(), llama_types)
    path = write_model_gguf(tmp_path / "m.gguf", model, kind, pick, raw={tensor: qtype})
    with pytest.raises(ValueError) as e:
        LLM(path, device="cpu", backend="torch", keep_quantized=keep_quantized)
    msg = str(e.value)
    assert str(path) in msg and tensor in msg and qtype.name in msg, msg
    assert "\n" not in msg and "supported GGUF tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K" in msg, msg


def test_truncated_gguf_is_refused(tmp_path, gpt2_file):
    data = gpt2_file[0].read_bytes()
    for cut in (3, 40, 2000, len(data) // 2, len(data) - 5):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError) as e:
            LLM(bad, device="cpu", backend="torch")
        assert str(bad) in str(e.value), str(e.value)
