"""Model configuration: one dataclass for both families genfuse runs.

- ``arch="llama"``: Llama 2/3, SmolLM2, Mistral, Qwen2. RMSNorm, rotary embeddings (the config's
  theta, optional linear / Llama-3 scaling), SwiGLU MLP, grouped-query attention, tied or untied
  embeddings, optional q/k/v bias (Qwen2).
- ``arch="gpt2"``: learned positions, LayerNorm, gelu_tanh MLP, biases everywhere.

Built from a Hugging Face ``config.json`` dict (model_type llama, mistral, qwen2, gpt2) with
`ModelConfig.from_hf`, or from GGUF metadata (general.architecture llama, qwen2, gpt2) with
`ModelConfig.from_gguf`; `load_config(path)` picks by path. Anything the runtime would silently
compute wrong (an unknown rope type, a sliding window, GPT-2's per-layer attention scaling) raises
``ValueError`` instead.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2"}
GGUF_ARCHS = {"llama": "llama", "qwen2": "llama", "gpt2": "gpt2"}

# rope_scaling["rope_type"] values the model code must implement:
#   "linear":       positions divided by "factor"
#   "llama3":       Llama-3.1 frequency-dependent scaling ("factor", "low_freq_factor",
#                   "high_freq_factor", "original_max_position_embeddings")
#   "freq_factors": llama.cpp's form of the same thing, found in Llama-3 GGUF files: the
#                   per-frequency divisors are a tensor (state dict key `model.rope_freqs`,
#                   shape (head_dim // 2,)); inv_freq is divided by it.
ROPE_TYPES = ("linear", "llama3", "freq_factors")


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" | "gpt2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float = 10000.0  # llama only
    rope_scaling: dict | None = None  # llama only; None = plain rotary, else see ROPE_TYPES
    attention_bias: bool = False  # bias on q/k/v (Qwen2; Llama with attention_bias=True; GPT-2)
    attention_out_bias: bool = False  # bias on the output projection (Llama attention_bias; GPT-2)
    mlp_bias: bool = False
    hidden_act: str = "silu"  # "silu" (SwiGLU gate) | "gelu_tanh" (GPT-2)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    model_type: str = ""  # the source's name: llama, mistral, qwen2, gpt2
    torch_dtype: str | None = None  # the checkpoint's dtype as its config states it, if it does
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # the raw source dict

    def __post_init__(self):
        if self.arch not in ("llama", "gpt2"):
            raise ValueError(f"arch must be 'llama' or 'gpt2', not {self.arch!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.arch == "gpt2" and self.num_heads * self.head_dim != self.hidden_size:
            raise ValueError(f"gpt2: num_heads={self.num_heads} x head_dim={self.head_dim} != hidden_size={self.hidden_size}")
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"rotary needs an even head_dim, got {self.head_dim}")
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {self.rope_scaling.get('rope_type')!r} is not supported "
                             f"(supported: {', '.join(ROPE_TYPES)}, or none)")

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    # ------------------------------------------------------------------ Hugging Face config.json

    @classmethod
    def from_hf(cls, d: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        """From a Hugging Face ``config.json`` dict; ``source`` names the file in errors."""
        model_type = d.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(HF_MODEL_TYPES)})")
        try:
            if HF_MODEL_TYPES[model_type] == "gpt2":
                return cls._from_hf_gpt2(d, source)
            return cls._from_hf_llama(d, source)
        except KeyError as e:
            raise ValueError(f"{source}: missing key {e.args[0]!r} for model_type {model_type!r}") from None

    @classmethod
    def _from_hf_llama(cls, d: dict, source: str) -> ModelConfig:
        model_type = d["model_type"]
        heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        if model_type == "mistral" and d.get("sliding_window") is not None:
            # Mistral v0.1 ships sliding_window=4096; attention is only identical to full
            # attention up to that length, so the runtime caps max positions there.
            max_pos = min(d.get("max_position_embeddings", 32768), d["sliding_window"])
        else:
            max_pos = d.get("max_position_embeddings", 2048)
        if model_type == "qwen2" and d.get("use_sliding_window"):
            raise ValueError(f"{source}: qwen2 with use_sliding_window=true is not supported")
        # transformers >= 5 folds theta and scaling into "rope_parameters"; older files use
        # "rope_theta" + "rope_scaling".
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        if model_type == "qwen2":
            attn_bias, out_bias = True, False  # Qwen2 has q/k/v bias, none on o_proj
        else:
            attn_bias = out_bias = bool(d.get("attention_bias", False))
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: hidden_act {act!r} is not supported for {model_type} (only silu)")
        return cls(
            arch="llama",
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or hidden // heads,
            intermediate_size=d["intermediate_size"],
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            rope_theta=float(theta),
            rope_scaling=_normalize_rope(rope, source),
            attention_bias=attn_bias,
            attention_out_bias=out_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            hidden_act="silu",
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_ids(d.get("eos_token_id")),
            model_type=model_type,
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            extra=d,
        )

    @classmethod
    def _from_hf_gpt2(cls, d: dict, source: str) -> ModelConfig:
        hidden = d["n_embd"]
        heads = d["n_head"]
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{source}: gpt2 activation_function {act!r} is not supported (gelu_new)")
        if d.get("scale_attn_by_inverse_layer_idx") or d.get("reorder_and_upcast_attn"):
            raise ValueError(f"{source}: gpt2 scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn "
                             "are not supported")
        if d.get("scale_attn_weights", True) is False:
            raise ValueError(f"{source}: gpt2 scale_attn_weights=false is not supported")
        return cls(
            arch="gpt2",
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            num_layers=d["n_layer"],
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            intermediate_size=d.get("n_inner") or 4 * hidden,
            norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
            max_position_embeddings=d.get("n_positions", 1024),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            attention_bias=True,
            attention_out_bias=True,
            mlp_bias=True,
            hidden_act="gelu_tanh",
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_ids(d.get("eos_token_id")),
            model_type="gpt2",
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            extra=d,
        )

    # ------------------------------------------------------------------ GGUF metadata

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], tensor_names: tuple[str, ...] | list[str],
                  *, source: str = "<gguf>", embedding_rows: int | None = None) -> ModelConfig:
        """From GGUF metadata (plain values, see `gguf_io.GGUFFile.metadata`) and tensor names.

        ``embedding_rows``: token_embd.weight's row count, the vocabulary size of last resort: a
        file without tokenizer metadata (llama.cpp's converter writes no ``vocab_size`` for
        gpt2) still says it through its embedding."""
        gguf_arch = metadata.get("general.architecture")
        if gguf_arch not in GGUF_ARCHS:
            raise ValueError(f"{source}: GGUF architecture {gguf_arch!r} is not supported "
                             f"(supported: {', '.join(GGUF_ARCHS)})")
        names = set(tensor_names)

        def key(suffix, default=KeyError):
            k = f"{gguf_arch}.{suffix}"
            if k in metadata:
                return metadata[k]
            if default is KeyError:
                raise ValueError(f"{source}: GGUF metadata has no {k!r}")
            return default

        hidden = int(key("embedding_length"))
        heads = int(key("attention.head_count"))
        kv_heads = key("attention.head_count_kv", heads)
        if isinstance(kv_heads, list):  # per-layer counts (hybrid models): not a family we run
            raise ValueError(f"{source}: per-layer attention.head_count_kv is not supported")
        tokens = metadata.get("tokenizer.ggml.tokens")
        vocab = key("vocab_size", None) or (len(tokens) if tokens else None) or embedding_rows
        if vocab is None:
            raise ValueError(f"{source}: cannot tell the vocabulary size (no vocab_size, no tokenizer.ggml.tokens, "
                             "no token_embd.weight)")
        eos = _ids(metadata.get("tokenizer.ggml.eos_token_id"))
        # llama.cpp also stops on end-of-turn / end-of-message tokens (Llama 3's <|eot_id|>).
        for extra_key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            tid = metadata.get(extra_key)
            if tid is not None and tid not in eos:
                eos = eos + (int(tid),)
        common = dict(
            vocab_size=int(vocab),
            hidden_size=hidden,
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            max_position_embeddings=int(key("context_length", 2048)),
            tie_word_embeddings="output.weight" not in names,
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=eos,
            model_type=gguf_arch,
            torch_dtype=None,
            extra={k: v for k, v in metadata.items() if not k.startswith("tokenizer.ggml.")},
        )
        if GGUF_ARCHS[gguf_arch] == "gpt2":
            return cls(arch="gpt2", head_dim=hidden // heads,
                       intermediate_size=int(key("feed_forward_length", 4 * hidden)),
                       norm_eps=float(key("attention.layer_norm_epsilon", 1e-5)),
                       attention_bias=True, attention_out_bias=True, mlp_bias=True,
                       hidden_act="gelu_tanh", **common)

        head_dim = int(key("attention.key_length", 0) or key("rope.dimension_count", 0) or hidden // heads)
        rope_scaling = None
        scaling_type = key("rope.scaling.type", None)
        if "rope_freqs.weight" in names:
            rope_scaling = {"rope_type": "freq_factors"}
        elif scaling_type == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
        elif scaling_type not in (None, "none"):
            raise ValueError(f"{source}: GGUF rope.scaling.type {scaling_type!r} is not supported")
        return cls(
            arch="llama", head_dim=head_dim,
            intermediate_size=int(key("feed_forward_length")),
            norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            attention_bias="blk.0.attn_q.bias" in names,
            attention_out_bias="blk.0.attn_output.bias" in names,
            mlp_bias="blk.0.ffn_up.bias" in names,
            hidden_act="silu", **common)


def _ids(v) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return (int(v),)


def _normalize_rope(rope: dict, source: str) -> dict | None:
    """HF rope_scaling / rope_parameters -> None (plain rotary) or a dict with "rope_type"."""
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(rope["factor"])}
    if kind == "llama3":
        try:
            return {
                "rope_type": "llama3",
                "factor": float(rope["factor"]),
                "low_freq_factor": float(rope["low_freq_factor"]),
                "high_freq_factor": float(rope["high_freq_factor"]),
                "original_max_position_embeddings": int(rope["original_max_position_embeddings"]),
            }
        except KeyError as e:
            raise ValueError(f"{source}: llama3 rope scaling lacks {e.args[0]!r}") from None
    raise ValueError(f"{source}: rope type {kind!r} is not supported (supported: default, linear, llama3)")


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The config of a model folder (its config.json) or of a .gguf file (its metadata)."""
    p = Path(path)
    if p.is_dir():
        cfg_path = p / "config.json"
        if not cfg_path.is_file():
            raise ValueError(f"{p}: no config.json in the model folder")
        try:
            d = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{cfg_path}: unreadable config ({e})") from e
        if not isinstance(d, dict):
            raise ValueError(f"{cfg_path}: config is not a JSON object")
        return ModelConfig.from_hf(d, source=str(cfg_path))
    if p.suffix == ".gguf" and p.is_file():
        from .gguf_io import open_gguf

        g = open_gguf(p)
        embd = [t for t in g.reader.tensors if t.name == "token_embd.weight" and len(t.shape) == 2]
        rows = int(embd[0].shape[1]) if embd else None  # ggml lists (hidden, vocab), fastest first
        return ModelConfig.from_gguf(g.metadata, g.tensor_names, source=str(p), embedding_rows=rows)
    raise ValueError(f"{p}: not a model folder (with config.json) or a .gguf file")
