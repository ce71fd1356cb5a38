"""Model configuration: one dataclass for every model family genfuse runs.

The families (`runtime.models.FAMILIES`, one file each) are today:

- ``arch="llama"``: Llama 2/3, SmolLM2, Mistral, Qwen2. RMSNorm, rotary embeddings (the config's
  theta, optional linear / Llama-3 scaling), SwiGLU MLP, grouped-query attention, tied or untied
  embeddings, optional q/k/v bias (Qwen2).
- ``arch="gpt2"``: learned positions, LayerNorm, gelu_tanh MLP, biases everywhere.

Built from a Hugging Face ``config.json`` dict with `ModelConfig.from_hf`, or from GGUF metadata
with `ModelConfig.from_gguf`; `load_config(path)` picks by path. The family of a config.json
``model_type`` / a GGUF ``general.architecture`` reads its own keys (its ``hf_config`` /
``gguf_config``); this file holds what every family shares. Anything the runtime would silently
compute wrong (an unknown rope type, a sliding window, GPT-2's per-layer attention scaling) raises
``ValueError`` instead.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# rope_scaling["rope_type"] values the model code must implement:
#   "linear":       positions divided by "factor"
#   "llama3":       Llama-3.1 frequency-dependent scaling ("factor", "low_freq_factor",
#                   "high_freq_factor", "original_max_position_embeddings")
#   "freq_factors": llama.cpp's form of the same thing, found in Llama-3 GGUF files: the
#                   per-frequency divisors are a tensor (state dict key `model.rope_freqs`,
#                   shape (head_dim // 2,)); inv_freq is divided by it.
ROPE_TYPES = ("linear", "llama3", "freq_factors")
_ROPE_FACTORS = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
                 "freq_factors": ()}

# Bounds on every size a config states: far past any real model (405B Llama: 126 layers, hidden
# 16384; Gemma: vocabulary 262144; Llama 4: 10M positions), and small enough that nothing sized
# from them (expected tensor lists, rotary tables, KV caches) can run away on a lying file.
LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 17,
    "num_layers": 4096,
    "num_heads": 4096,
    "num_kv_heads": 4096,
    "head_dim": 4096,
    "intermediate_size": 1 << 20,
    "max_position_embeddings": 1 << 24,
}

_REQUIRED = object()


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


class ConfigReader:
    """Typed reads from one config source (a config.json dict, GGUF metadata, a rope_scaling dict).

    Every bad value raises one ValueError naming the source, the key, the value and the type or
    range expected, e.g. ``x/config.json: rms_norm_eps = None is not a float`` -- never a bare
    ``float()``/``int()`` error. A missing key gives ``default``; a JSON null gives ``default``
    only with ``null_ok`` (configs write null for "unset" in some keys, never in others).
    ``label`` is what the source is called in "has no ..." messages; ``path`` prefixes key names
    in messages (``rope_scaling.factor``).
    """

    def __init__(self, d: dict, source: str, label: str = "config", *, path: str = "", context: str = ""):
        self.d, self.source, self.label, self.path, self.context = d, source, label, path, context

    def fail(self, key: str, value: Any, expected: str) -> ValueError:
        return ValueError(f"{self.source}: {self.path}{key} = {_short(value)} is not {expected}")

    def _value(self, key: str, default: Any, null_ok: bool, expected: str) -> tuple[Any, bool]:
        """(value, is_default)."""
        if key not in self.d or (self.d[key] is None and null_ok):
            if default is _REQUIRED:
                raise ValueError(f"{self.source}: {self.label} has no {self.path + key!r}{self.context}")
            return default, True
        v = self.d[key]
        if v is None:
            raise self.fail(key, v, expected)
        return v, False

    def int(self, key: str, default: Any = _REQUIRED, *, lo: int | None = None, hi: int | None = None,
            null_ok: bool = False) -> Any:
        what = "an int" if lo is None else f"an int in [{lo}, {hi}]" if hi is not None else f"an int >= {lo}"
        v, dflt = self._value(key, default, null_ok, what)
        if dflt:
            return v
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.fail(key, v, what)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise self.fail(key, v, what)
        return v

    def dim(self, key: str, field: str, default: Any = _REQUIRED, *, null_ok: bool = False) -> Any:
        """A size bounded by LIMITS[field]."""
        return self.int(key, default, lo=1, hi=LIMITS[field], null_ok=null_ok)

    def float(self, key: str, default: Any = _REQUIRED, *, positive: bool = False, null_ok: bool = False) -> Any:
        what = "a positive finite number" if positive else "a number"
        v, dflt = self._value(key, default, null_ok, what)
        if dflt:
            return v
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise self.fail(key, v, what)
        v = float(v)
        if positive and not (v > 0 and math.isfinite(v)):
            raise self.fail(key, v, what)
        return v

    def bool(self, key: str, default: Any = _REQUIRED, *, null_ok: bool = False) -> Any:
        v, dflt = self._value(key, default, null_ok, "true or false")
        if not dflt and not isinstance(v, bool):
            raise self.fail(key, v, "true or false")
        return v

    def str(self, key: str, default: Any = _REQUIRED, *, null_ok: bool = False) -> Any:
        v, dflt = self._value(key, default, null_ok, "a string")
        if not dflt and not isinstance(v, str):
            raise self.fail(key, v, "a string")
        return v

    def dict(self, key: str, default: Any = _REQUIRED, *, null_ok: bool = False) -> Any:
        v, dflt = self._value(key, default, null_ok, "an object")
        if not dflt and not isinstance(v, dict):
            raise self.fail(key, v, "an object (a JSON dict)")
        return v

    def list(self, key: str, item: type | tuple[type, ...], default: Any = _REQUIRED, *, what: str) -> Any:
        """A list whose items are all ``item`` (bools never count as numbers); ``what`` names them."""
        v, dflt = self._value(key, default, True, f"a list of {what}")
        if dflt:
            return v
        if not isinstance(v, list):
            raise self.fail(key, v, f"a list of {what}")
        allowed = item if isinstance(item, tuple) else (item,)
        if set(map(type, v)) <= set(allowed):  # one C-level pass (a GGUF vocabulary is ~50k items)
            return v
        for i, x in enumerate(v):
            if not isinstance(x, item) or (isinstance(x, bool) and item is not bool):
                raise ValueError(f"{self.source}: {self.path}{key}[{i}] = {_short(x)} is not one of {what}")
        return v

    def token_ids(self, key: str) -> tuple[int, ...]:
        """A token id or a list of them (HF eos_token_id); missing or null -> ()."""
        v, dflt = self._value(key, None, True, "a token id")
        if dflt:
            return ()
        items = v if isinstance(v, list) else [v]
        for x in items:
            if not isinstance(x, int) or isinstance(x, bool) or x < 0:
                raise self.fail(key, v, "a token id (an int >= 0) or a list of them")
        return tuple(items)


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # a key of runtime.models.FAMILIES: "llama" | "gpt2"
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
        from .models import family_for  # the families import this module

        family = family_for(self.arch)
        for name, hi in LIMITS.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= hi:
                raise ValueError(f"{name} must be an int in [1, {hi}], got {_short(v)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        family.check_config(self)
        # each of these divides or exponentiates something: 0, < 0, NaN or inf give garbage
        for name in ("norm_eps", "rope_theta"):
            _check_positive(name, getattr(self, name))
        sc = self.rope_scaling
        if sc is not None:
            if not isinstance(sc, dict) or sc.get("rope_type") not in ROPE_TYPES:
                kind = sc.get("rope_type") if isinstance(sc, dict) else sc
                raise ValueError(f"rope_scaling type {kind!r} is not supported "
                                 f"(supported: {', '.join(ROPE_TYPES)}, or none)")
            for key in _ROPE_FACTORS[sc["rope_type"]]:
                _check_positive(f"rope_scaling {key}", sc.get(key))
            if sc["rope_type"] == "llama3":
                orig = sc.get("original_max_position_embeddings")
                if not isinstance(orig, int) or isinstance(orig, bool) or orig < 1:
                    raise ValueError(f"rope_scaling original_max_position_embeddings must be a positive int, "
                                     f"got {_short(orig)}")
                if not sc["high_freq_factor"] > sc["low_freq_factor"]:  # the interpolation divides by the gap
                    raise ValueError(f"rope_scaling high_freq_factor ({sc['high_freq_factor']}) must exceed "
                                     f"low_freq_factor ({sc['low_freq_factor']})")

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
        families = _by_name("hf_model_types")
        if not isinstance(model_type, str) or model_type not in families:
            raise ValueError(f"{source}: model_type {_short(model_type)} is not supported "
                             f"(supported: {', '.join(families)})")
        r = ConfigReader(d, source, context=f" (needed for model_type {model_type!r})")
        return _named(source, lambda: cls(**families[model_type].hf_config(r, model_type)))

    # ------------------------------------------------------------------ GGUF metadata

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], tensor_names: tuple[str, ...] | list[str],
                  *, source: str = "<gguf>", embedding_rows: int | None = None) -> ModelConfig:
        """From GGUF metadata (plain values, see `gguf_io.GGUFFile.metadata`) and tensor names.

        ``embedding_rows``: token_embd.weight's row count, the vocabulary size of last resort: a
        file without tokenizer metadata (llama.cpp's converter writes no ``vocab_size`` for
        gpt2) still says it through its embedding. The block count must match the blocks the
        tensor names hold (checked before anything is sized by it)."""
        r = ConfigReader(metadata, source, "GGUF metadata")
        gguf_arch = r.str("general.architecture")
        families = _by_name("gguf_archs")
        if gguf_arch not in families:
            raise ValueError(f"{source}: GGUF architecture {gguf_arch!r} is not supported "
                             f"(supported: {', '.join(families)})")
        names = set(tensor_names)
        a = gguf_arch + "."

        hidden = r.dim(a + "embedding_length", "hidden_size")
        heads = r.dim(a + "attention.head_count", "num_heads")
        if isinstance(metadata.get(a + "attention.head_count_kv"), list):
            # per-layer counts (hybrid models): not a family we run
            raise ValueError(f"{source}: per-layer {a}attention.head_count_kv is not supported")
        kv_heads = r.dim(a + "attention.head_count_kv", "num_kv_heads", heads)
        layers = r.dim(a + "block_count", "num_layers")
        blocks = {int(m.group(1)) for n in names if (m := _GGUF_BLOCK_INDEX.match(n))}
        if blocks != set(range(layers)):
            held = f"blocks 0..{max(blocks)} ({len(blocks)} distinct)" if blocks else "no blocks"
            raise ValueError(f"{source}: {a}block_count = {layers}, but the file's tensors hold {held}")
        tokens = r.list("tokenizer.ggml.tokens", str, None, what="strings")
        vocab = r.dim(a + "vocab_size", "vocab_size", None) or (len(tokens) if tokens else None) or embedding_rows
        if vocab is None:
            raise ValueError(f"{source}: cannot tell the vocabulary size (no vocab_size, no tokenizer.ggml.tokens, "
                             "no token_embd.weight)")
        eos = r.token_ids("tokenizer.ggml.eos_token_id")
        # llama.cpp also stops on end-of-turn / end-of-message tokens (Llama 3's <|eot_id|>).
        for extra_key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            tid = one_id(r, extra_key)
            if tid is not None and tid not in eos:
                eos = eos + (tid,)
        common = dict(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            max_position_embeddings=r.dim(a + "context_length", "max_position_embeddings", 2048),
            tie_word_embeddings="output.weight" not in names,
            bos_token_id=one_id(r, "tokenizer.ggml.bos_token_id"),
            eos_token_ids=eos,
            model_type=gguf_arch,
            torch_dtype=None,
            extra={k: v for k, v in metadata.items() if not k.startswith("tokenizer.ggml.")},
        )
        own = families[gguf_arch].gguf_config(r, a, names, hidden, heads)
        return _named(source, lambda: cls(**own, **common))


_GGUF_BLOCK_INDEX = re.compile(r"^blk\.(\d+)\.")


def _by_name(attr: str) -> dict:
    """"hf_model_types" / "gguf_archs" -> {name: its family}, in `FAMILIES` order."""
    from .models import FAMILIES

    return {name: f for f in FAMILIES.values() for name in getattr(f, attr)}


def _named(source: str, build):
    """``build()``, with the source named in the dataclass's own checks (heads vs kv heads, ...)."""
    try:
        return build()
    except ValueError as e:
        if str(e).startswith(source + ":"):
            raise
        raise ValueError(f"{source}: {e}") from None


def one_id(r: ConfigReader, key: str) -> int | None:
    v, dflt = r._value(key, None, True, "a token id")
    if not dflt and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
        raise r.fail(key, v, "a token id (an int >= 0)")
    return v


def dtype_name(r: ConfigReader) -> str | None:
    return r.str("torch_dtype", None, null_ok=True) or r.str("dtype", None, null_ok=True)


def _check_positive(name: str, v: Any) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a positive finite number, got {_short(v)}")


def normalize_rope(rr: ConfigReader) -> dict | None:
    """HF rope_scaling / rope_parameters -> None (plain rotary) or a dict with "rope_type"."""
    kind = rr.str("rope_type", None, null_ok=True) or rr.str("type", None, null_ok=True) or "default"
    if kind == "default":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": rr.float("factor", positive=True)}
    if kind == "llama3":
        rr.context = " (llama3 rope scaling)"
        return {
            "rope_type": "llama3",
            "factor": rr.float("factor", positive=True),
            "low_freq_factor": rr.float("low_freq_factor", positive=True),
            "high_freq_factor": rr.float("high_freq_factor", positive=True),
            "original_max_position_embeddings": rr.int("original_max_position_embeddings", lo=1),
        }
    raise ValueError(f"{rr.source}: rope type {kind!r} is not supported (supported: default, linear, llama3)")


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
