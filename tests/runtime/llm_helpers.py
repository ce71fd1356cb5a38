"""Shared by the LLM tests: the SmolLM2 LLM and its transformers oracle, each loaded once per
process (both test modules use them), tiny random-weight model folders, and a one-thread CPU.

The CPU here has 2 cores shared with other jobs: torch's intra-op thread pool then spends most
of its time waiting for a descheduled thread (a decode step's tiny ops run 10x slower), so
these tests run torch single-threaded and restore the setting after.
"""
from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from pathlib import Path

import torch
from loader_helpers import smollm_gguf, tiny_hf_model


# A LlamaConfig small enough for a benchmark's --shape in a test (GQA: 4 query / 2 KV heads).
TINY_LLAMA_SHAPE = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
                    "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": True}


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=1)
def smollm_llm():
    """genfuse's LLM on the shipped SmolLM2 GGUF, CPU fp32, the torch references."""
    from genfuse.runtime.llm import LLM

    return LLM(str(smollm_gguf()), device="cpu", dtype=torch.float32, backend="torch")


@functools.lru_cache(maxsize=1)
def smollm_transformers():
    """transformers' LlamaForCausalLM from the same GGUF (its own loader), fp32, EOS disabled."""
    import transformers
    path = smollm_gguf()
    folder = Path(tempfile.mkdtemp(prefix="smollm_gguf_"))
    (folder / path.name).symlink_to(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    no_eos(model)
    return model


def no_eos(model):
    """Let transformers' generate run to max_new_tokens (compared with ignore_eos=True)."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def tiny_folder(kind: str, folder: os.PathLike):
    """A transformers random-weight model (see loader_helpers.tiny_hf_model) saved with
    save_pretrained (safetensors + config.json, no tokenizer); returns (model, folder)."""
    model = tiny_hf_model(kind)
    model.save_pretrained(str(folder))
    no_eos(model)
    return model, Path(folder)


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_chat_folder(folder: os.PathLike, *, max_positions: int = 256, tied: bool = True) -> Path:
    """A random-weight tiny Llama with a character-level tokenizer (printable ASCII and a
    newline, one token each, decoded by plain concatenation) and a ChatML template, so text
    prompts, `chat` and the CLI run on it in milliseconds a token. No EOS id anywhere: replies
    always run to max_tokens. Vocabulary 288, ids 0..2 <unk> / <|im_start|> / <|im_end|>.
    ``tied=False``: a separate output head, so an embedding row can be broken on its own."""
    import json

    import transformers
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as Backend

    folder = Path(folder)
    cfg = transformers.LlamaConfig(
        vocab_size=288, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied, max_position_embeddings=max_positions,
        rope_theta=10000.0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(1234)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.save_pretrained(str(folder))
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    fillers = [a + b for a in "abcdefghijklmnopqrstuvwxyz" for b in "abcdefghijklmnopqrstuvwxyz"]
    vocab = {t: i for i, t in enumerate((specials + chars + fillers)[:288])}  # fillers: decode-only ids
    backend = Backend(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True) for t in specials[1:]])
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return folder
