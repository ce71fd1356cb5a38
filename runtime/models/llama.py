"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2) on genfuse kernels, gpt-fast style.

One definition for the family: RMSNorm, rotary embeddings with the config's theta and scaling,
grouped-query attention, a SwiGLU MLP, tied or untied embeddings, optional q/k/v bias (Qwen2).
Every matmul, norm and attention is a `genfuse.kernels` op, so the same code runs the Triton
kernels on CUDA (or through the interpreter) and their torch references on CPU.

Fusions, built once at load (`Llama.from_state_dict`):

* q, k, v are ONE `linear` over the concatenated weight ``[Wq; Wk; Wv]`` (and bias): x is read
  once instead of three times, and q/k/v are strided views of the packed output.
* gate and up are ONE `linear` over ``[Wg; Wu]`` followed by `swiglu` over ``[gate | up]``.
* each block's two residual adds are fused, each exactly once: the attention residual into the
  o_proj epilogue (``linear(..., residual=h)``), the MLP residual into the next RMSNorm
  (``rms_norm(mlp_out, w, residual=h)`` returns the normed input *and* the new residual stream
  in one pass; the last layer's goes into the final norm).

The model holds weights only, no request state: the engine (`runtime.engine`) owns the paged
KV pools and passes them to `forward_step`, one step over a flat batch of prefill chunks and
decode tokens (docs/architecture.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from genfuse.kernels import (
    rms_norm,
    rope_cos_sin,
    rotary_embedding,
    swiglu,
)

from ..config import LIMITS, ConfigReader, ModelConfig, dtype_name, normalize_rope, one_id
from ..quant import (  # linear: genfuse.kernels.linear, or packed GGUF blocks
    cat_rows,
    embedding,
    linear,
)
from ..distributed import TPGroup, TPPlan, vocab_parallel_embedding
from .cpu_layer import fused_layers
from .family import Family, add_terms, attend

# --------------------------------------------------------------------------- rotary tables


def rope_tables(config: ModelConfig, max_positions: int, device, rope_freqs: torch.Tensor | None = None):
    """fp32 ``(cos, sin)``, each ``(max_positions, head_dim // 2)``, for the config's rotary.

    Plain and Llama-3 scaling come from `rope_cos_sin`; "linear" divides every frequency by
    ``factor`` and "freq_factors" (llama.cpp's Llama-3 form) by the per-frequency tensor,
    both as transformers does.
    """
    scaling = config.rope_scaling
    kind = None if scaling is None else scaling["rope_type"]
    if kind in (None, "llama3"):
        return rope_cos_sin(max_positions, config.head_dim, config.rope_theta, device=device, scaling=scaling)
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    else:  # "freq_factors"
        if rope_freqs is None:
            raise ValueError("rope_type 'freq_factors' needs the model.rope_freqs tensor")
        inv_freq = inv_freq / rope_freqs.to(device=device, dtype=torch.float32)
    pos = torch.arange(max_positions, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)  # (P, D/2)
    return angles.cos(), angles.sin()


# --------------------------------------------------------------------------- the model


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # (hidden,)
    w_qkv: torch.Tensor  # (q_size + 2 * kv_size, hidden): [Wq; Wk; Wv]
    b_qkv: torch.Tensor | None  # (q_size + 2 * kv_size,) with attention_bias
    w_o: torch.Tensor  # (hidden, q_size)
    b_o: torch.Tensor | None
    post_norm: torch.Tensor  # (hidden,)
    w_gate_up: torch.Tensor  # (2 * intermediate, hidden): [Wgate; Wup]
    b_gate_up: torch.Tensor | None
    w_down: torch.Tensor  # (hidden, intermediate)
    b_down: torch.Tensor | None


class Llama:
    """Weights plus the forward passes; no nn.Module (inference only, no autograd)."""

    def __init__(self, config: ModelConfig, embed: torch.Tensor, layers: list[LayerWeights],
                 norm: torch.Tensor, lm_head: torch.Tensor, rope_freqs: torch.Tensor | None = None,
                 *, backend: str | None = None, tp: TPGroup | None = None):
        if config.arch != "llama":
            raise ValueError(f"Llama runs arch 'llama', not {config.arch!r}")
        self.config = config
        self.embed, self.layers, self.norm, self.lm_head = embed, layers, norm, lm_head
        self.rope_freqs = rope_freqs
        self.backend = backend  # passed to every kernel: None | "triton" | "torch"
        self.device, self.dtype = embed.device, embed.dtype
        self.cos = self.sin = None  # rotary tables, built by setup_rope
        # this rank's heads (all of them without tensor parallelism, runtime/distributed.py)
        self.tp = tp
        self.num_heads = config.num_heads if tp is None else len(tp.plan.q_heads)
        self.num_kv_heads = config.num_kv_heads if tp is None else len(tp.plan.kv_heads)

    @classmethod
    def from_state_dict(cls, config: ModelConfig, sd: dict[str, torch.Tensor], *,
                        backend: str | None = None, tp: TPGroup | None = None) -> Llama:
        """From a canonical state dict (`runtime.weights`); concatenates QKV and gate/up. With
        ``tp``, ``sd`` is this rank's slice (`load_weights(..., tp_plan=)` or
        `distributed.shard_state_dict`)."""

        def cat_opt(*names):
            return torch.cat([sd[n] for n in names]) if names[0] in sd else None

        layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            layers.append(LayerWeights(
                input_norm=sd[p + "input_layernorm.weight"],
                w_qkv=cat_rows([sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"]]),
                b_qkv=cat_opt(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
                w_o=sd[a + "o_proj.weight"],
                b_o=sd.get(a + "o_proj.bias"),
                post_norm=sd[p + "post_attention_layernorm.weight"],
                w_gate_up=cat_rows([sd[m + "gate_proj.weight"], sd[m + "up_proj.weight"]]),
                b_gate_up=cat_opt(m + "gate_proj.bias", m + "up_proj.bias"),
                w_down=sd[m + "down_proj.weight"],
                b_down=sd.get(m + "down_proj.bias"),
            ))
        embed = sd["model.embed_tokens.weight"]
        lm_head = embed if config.tie_word_embeddings else sd["lm_head.weight"]
        return cls(config, embed, layers, sd["model.norm.weight"], lm_head, sd.get("model.rope_freqs"),
                   backend=backend, tp=tp)

    # ------------------------------------------------------------------ the engine's step

    def setup_rope(self, max_len: int) -> None:
        """Rotary tables for positions ``0 .. max_len - 1`` (the engine's ``max_model_len``)."""
        if self.cos is None or self.cos.shape[0] < max_len:
            self.cos, self.sin = rope_tables(self.config, max_len, self.device, self.rope_freqs)

    @torch.inference_mode()
    def forward_step(self, inp, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """One engine step over a flat batch (`runtime.engine.kv_cache.StepInputs`).

        ``N`` tokens of ``B`` sequences, prefill chunks and decodes mixed: every projection is
        one `linear` over the N tokens, each layer's new K/V go into the paged pools through
        the slot mapping, then `unified_attention` reads each sequence's cached prefix plus
        its new tokens (causal, bottom-right). Returns the logits of ``inp.logits_indices``,
        ``(S, vocab)`` float32. ``k_pool``/``v_pool``: ``(layers, blocks, block_size, Hkv, D)``.
        """
        c, be, tp = self.config, self.backend, self.tp
        N, D = inp.num_tokens, c.head_dim
        qs, kvs = self.num_heads * D, self.num_kv_heads * D  # this rank's q / kv widths
        if tp is None:
            h = embedding(self.embed, inp.input_ids)  # (N, hidden): the residual stream
        else:
            h = vocab_parallel_embedding(self.embed, inp.input_ids, tp)
        # CPU, packed weights, a small step: the whole layer loop below as one C++ call (cpu_layer.py)
        fused = fused_layers(self, inp, k_pool, v_pool, h)
        h, mlp_out = (h, None) if fused is None else fused
        for i, lw in enumerate(self.layers if fused is None else ()):
            if mlp_out is None:
                x = rms_norm(h, lw.input_norm, c.norm_eps, backend=be)
            else:
                x, h = rms_norm(mlp_out, lw.input_norm, c.norm_eps, residual=h, backend=be)
            qkv = linear(x, lw.w_qkv, lw.b_qkv, backend=be)  # (N, q + 2 kv)
            q = qkv[:, :qs].view(N, self.num_heads, D)
            k = qkv[:, qs:qs + kvs].view(N, self.num_kv_heads, D)
            v = qkv[:, qs + kvs:].view(N, self.num_kv_heads, D)
            q, k = rotary_embedding(q.transpose(0, 1)[None], k.transpose(0, 1)[None], self.cos, self.sin,
                                    inp.positions, validate=False, backend=be)  # (1, H, N, D)
            q, k = q[0].transpose(0, 1), k[0].transpose(0, 1)  # (N, H, D) views
            y = attend(q, k, v, i, inp, k_pool, v_pool, be)  # (N, Hq, D): write the pools, then attend
            if tp is None:
                h = linear(y.reshape(N, qs), lw.w_o, lw.b_o, residual=h, backend=be)
            else:  # row-parallel: reduce the partial products, then the bias and residual once
                h = add_terms(tp.all_reduce(linear(y.reshape(N, qs), lw.w_o, backend=be)), lw.b_o, h)
            x = rms_norm(h, lw.post_norm, c.norm_eps, backend=be)
            gu = linear(x, lw.w_gate_up, lw.b_gate_up, backend=be)  # (N, 2 * inter)
            if tp is None:
                mlp_out = linear(swiglu(gu, backend=be), lw.w_down, lw.b_down, backend=be)  # (N, hidden)
            else:
                mlp_out = add_terms(tp.all_reduce(linear(swiglu(gu, backend=be), lw.w_down, backend=be)), lw.b_down)
        idx = inp.logits_indices
        x, _ = rms_norm(mlp_out[idx], self.norm, c.norm_eps, residual=h[idx], backend=be)  # (S, hidden)
        logits = linear(x, self.lm_head, backend=be).float()  # (S, vocab), or this rank's vocab slice
        return logits if tp is None else tp.gather_last_dim(logits)


# --------------------------------------------------------------------------- tensor parallelism


def tp_split(name: str, config: ModelConfig, plan: TPPlan):
    """How rank ``plan.rank`` cuts a tensor (runtime/distributed.py): q/k/v rows by heads, o_proj
    columns by query heads, gate/up rows and down columns by the intermediate size, embedding and
    untied head rows by vocabulary; None (replicated) for the rest."""
    D = config.head_dim
    if ".self_attn.q_proj." in name:
        return 0, [plan.head_rows(plan.q_heads, D)]
    if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
        return 0, [plan.head_rows(plan.kv_heads, D)]
    if name.endswith(".self_attn.o_proj.weight"):
        return 1, [plan.head_rows(plan.q_heads, D)]
    inter = slice(plan.intermediate.start, plan.intermediate.stop)
    if ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
        return 0, [inter]
    if name.endswith(".mlp.down_proj.weight"):
        return 1, [inter]
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return 0, [slice(plan.vocab.start, plan.vocab.stop)]
    return None


# --------------------------------------------------------------------------- loading
# What runtime/config.py and runtime/weights.py ask of the family (`family.Family`).


def hf_config(r: ConfigReader, model_type: str) -> dict:
    """config.json (llama, mistral, qwen2) -> ModelConfig keyword arguments."""
    heads = r.dim("num_attention_heads", "num_heads")
    hidden = r.dim("hidden_size", "hidden_size")
    max_pos = r.dim("max_position_embeddings", "max_position_embeddings",
                    32768 if model_type == "mistral" else 2048)
    window = r.int("sliding_window", None, lo=1, null_ok=True) if model_type == "mistral" else None
    if window is not None:
        # Mistral v0.1 ships sliding_window=4096; attention is only identical to full
        # attention up to that length, so the runtime caps max positions there.
        max_pos = min(max_pos, window)
    if model_type == "qwen2" and r.bool("use_sliding_window", False, null_ok=True):
        raise ValueError(f"{r.source}: qwen2 with use_sliding_window=true is not supported")
    # transformers >= 5 folds theta and scaling into "rope_parameters"; older files use
    # "rope_theta" + "rope_scaling".
    rope_key = "rope_parameters" if r.d.get("rope_parameters") else "rope_scaling"
    rope = r.dict(rope_key, {}, null_ok=True)
    rr = ConfigReader(rope, r.source, path=rope_key + ".")
    theta = r.float("rope_theta", None, positive=True, null_ok=True)
    if theta is None:
        theta = rr.float("rope_theta", 10000.0, positive=True)
    if model_type == "qwen2":
        attn_bias, out_bias = True, False  # Qwen2 has q/k/v bias, none on o_proj
    else:
        attn_bias = out_bias = r.bool("attention_bias", False)
    act = r.str("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{r.source}: hidden_act {act!r} is not supported for {model_type} (only silu)")
    head_dim = r.int("head_dim", None, lo=0, hi=LIMITS["head_dim"], null_ok=True)
    return dict(
        arch="llama",
        vocab_size=r.dim("vocab_size", "vocab_size"),
        hidden_size=hidden,
        num_layers=r.dim("num_hidden_layers", "num_layers"),
        num_heads=heads,
        num_kv_heads=r.dim("num_key_value_heads", "num_kv_heads", heads, null_ok=True),
        head_dim=head_dim or hidden // heads,  # transformers: `head_dim or hidden // heads`
        intermediate_size=r.dim("intermediate_size", "intermediate_size"),
        norm_eps=r.float("rms_norm_eps", 1e-6, positive=True),
        max_position_embeddings=max_pos,
        tie_word_embeddings=r.bool("tie_word_embeddings", False),
        rope_theta=theta,
        rope_scaling=normalize_rope(rr),
        attention_bias=attn_bias,
        attention_out_bias=out_bias,
        mlp_bias=r.bool("mlp_bias", False),
        hidden_act="silu",
        bos_token_id=one_id(r, "bos_token_id"),
        eos_token_ids=r.token_ids("eos_token_id"),
        model_type=model_type,
        torch_dtype=dtype_name(r),
        extra=r.d,
    )


def gguf_config(r: ConfigReader, a: str, names: set, hidden: int, heads: int) -> dict:
    """GGUF metadata (llama, qwen2) -> the family's ModelConfig keyword arguments."""
    head_dim = (r.int(a + "attention.key_length", 0, lo=0, hi=LIMITS["head_dim"])
                or r.int(a + "rope.dimension_count", 0, lo=0, hi=LIMITS["head_dim"]) or hidden // heads)
    rope_scaling = None
    scaling_type = r.str(a + "rope.scaling.type", None)
    if "rope_freqs.weight" in names:
        rope_scaling = {"rope_type": "freq_factors"}
    elif scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": r.float(a + "rope.scaling.factor", positive=True)}
    elif scaling_type not in (None, "none"):
        raise ValueError(f"{r.source}: GGUF rope.scaling.type {scaling_type!r} is not supported")
    return dict(
        arch="llama", head_dim=head_dim,
        intermediate_size=r.dim(a + "feed_forward_length", "intermediate_size"),
        norm_eps=r.float(a + "attention.layer_norm_rms_epsilon", 1e-6, positive=True),
        rope_theta=r.float(a + "rope.freq_base", 10000.0, positive=True),
        rope_scaling=rope_scaling,
        attention_bias="blk.0.attn_q.bias" in names,
        attention_out_bias="blk.0.attn_output.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
        hidden_act="silu")


def check_config(c: ModelConfig) -> None:
    if c.head_dim % 2:
        raise ValueError(f"rotary needs an even head_dim, got {c.head_dim}")


def top_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    if c.rope_scaling is not None and c.rope_scaling["rope_type"] == "freq_factors":
        shapes["model.rope_freqs"] = (c.head_dim // 2,)
    return shapes


def layer_shapes(c: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    h, inter = c.hidden_size, c.intermediate_size
    p = f"model.layers.{i}."
    shapes = {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    for proj, rows in (("q", c.q_size), ("k", c.kv_size), ("v", c.kv_size)):
        shapes[p + f"self_attn.{proj}_proj.weight"] = (rows, h)
        if c.attention_bias:
            shapes[p + f"self_attn.{proj}_proj.bias"] = (rows,)
    shapes[p + "self_attn.o_proj.weight"] = (h, c.q_size)
    if c.attention_out_bias:
        shapes[p + "self_attn.o_proj.bias"] = (h,)
    for proj, shape in (("gate", (inter, h)), ("up", (inter, h)), ("down", (h, inter))):
        shapes[p + f"mlp.{proj}_proj.weight"] = shape
        if c.mlp_bias:
            shapes[p + f"mlp.{proj}_proj.bias"] = shape[:1]
    return shapes


def hf_name(name: str) -> str | None:
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name.startswith(("layers.", "embed_tokens.", "norm.")):  # saved from the bare LlamaModel
        return "model." + name
    return name


def gguf_permuted_heads(canon: str, c: ModelConfig, gguf_arch: str) -> int | None:
    """llama.cpp permutes q/k rows only for arch "llama" (Llama, Mistral, SmolLM2); qwen2 uses
    the NeoX rotary layout and is stored as in HF."""
    if gguf_arch != "llama":
        return None
    if ".self_attn.q_proj." in canon:
        return c.num_heads
    if ".self_attn.k_proj." in canon:
        return c.num_kv_heads
    return None


FAMILY = Family(
    arch="llama", model=Llama, hf_model_types=("llama", "mistral", "qwen2"), gguf_archs=("llama", "qwen2"),
    hf_config=hf_config, gguf_config=gguf_config, check_config=check_config,
    top_shapes=top_shapes, layer_shapes=layer_shapes, hf_name=hf_name,
    gguf_top={"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight", "rope_freqs.weight": "model.rope_freqs"},
    gguf_block={"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"},
    layer_prefix="model.layers",
    gguf_permuted_heads=gguf_permuted_heads,
    tp_split=tp_split,
)
