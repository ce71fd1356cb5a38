"""GPT-2 on genfuse kernels, the same shape as `runtime.models.llama` (read that first).

Differences from the Llama family: learned absolute positions (``wpe``) instead of rotary,
LayerNorm with bias, full multi-head attention (Hkv = Hq), biases on every projection, and a
``gelu_tanh`` MLP whose activation runs in the c_fc `linear` epilogue. The weights arrive in
``nn.Linear`` (out, in) layout (`runtime.weights` transposes GPT-2's Conv1D), q/k/v already
stacked in ``c_attn``.

Fusions: q/k/v are one `linear` (c_attn) read through strided views; the attention residual
is the c_proj epilogue (``linear(..., residual=h)``); the MLP residual is fused into the next
LayerNorm (``layer_norm(mlp_out, w, b, residual=h)``), the last one into ``ln_f``. The engine's
step runs it like Llama's (`Llama.forward_step`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from genfuse.kernels import layer_norm

from ..config import ConfigReader, ModelConfig, dtype_name, one_id
from ..quant import (  # linear: genfuse.kernels.linear, or packed GGUF blocks
    embedding,
    linear,
)
from ..distributed import TPGroup, TPPlan, vocab_parallel_embedding
from .family import Family, add_terms, attend


@dataclass
class Block:
    ln_1: tuple[torch.Tensor, torch.Tensor]  # (weight, bias), (hidden,)
    w_qkv: torch.Tensor  # (3 * hidden, hidden)
    b_qkv: torch.Tensor
    w_o: torch.Tensor  # (hidden, hidden)
    b_o: torch.Tensor
    ln_2: tuple[torch.Tensor, torch.Tensor]
    w_fc: torch.Tensor  # (intermediate, hidden)
    b_fc: torch.Tensor
    w_proj: torch.Tensor  # (hidden, intermediate)
    b_proj: torch.Tensor


class GPT2:
    """Weights plus the forward passes (inference only)."""

    def __init__(self, config: ModelConfig, wte: torch.Tensor, wpe: torch.Tensor, blocks: list[Block],
                 ln_f: tuple[torch.Tensor, torch.Tensor], lm_head: torch.Tensor, *, backend: str | None = None,
                 tp: TPGroup | None = None):
        if config.arch != "gpt2":
            raise ValueError(f"GPT2 runs arch 'gpt2', not {config.arch!r}")
        self.config = config
        self.wte, self.wpe, self.blocks, self.ln_f, self.lm_head = wte, wpe, blocks, ln_f, lm_head
        self.backend = backend
        self.device, self.dtype = wte.device, wte.dtype
        self.tp = tp  # this rank's heads (all of them without tensor parallelism)
        self.num_heads = self.num_kv_heads = config.num_heads if tp is None else len(tp.plan.q_heads)

    @classmethod
    def from_state_dict(cls, config: ModelConfig, sd: dict[str, torch.Tensor], *,
                        backend: str | None = None, tp: TPGroup | None = None) -> GPT2:
        blocks = []  # with tp, sd is this rank's slice (see Llama.from_state_dict)
        for i in range(config.num_layers):
            p = f"transformer.h.{i}."
            blocks.append(Block(
                ln_1=(sd[p + "ln_1.weight"], sd[p + "ln_1.bias"]),
                w_qkv=sd[p + "attn.c_attn.weight"], b_qkv=sd[p + "attn.c_attn.bias"],
                w_o=sd[p + "attn.c_proj.weight"], b_o=sd[p + "attn.c_proj.bias"],
                ln_2=(sd[p + "ln_2.weight"], sd[p + "ln_2.bias"]),
                w_fc=sd[p + "mlp.c_fc.weight"], b_fc=sd[p + "mlp.c_fc.bias"],
                w_proj=sd[p + "mlp.c_proj.weight"], b_proj=sd[p + "mlp.c_proj.bias"],
            ))
        wte = sd["transformer.wte.weight"]
        lm_head = wte if config.tie_word_embeddings else sd["lm_head.weight"]
        return cls(config, wte, sd["transformer.wpe.weight"], blocks,
                   (sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]), lm_head, backend=backend, tp=tp)

    # ------------------------------------------------------------------ the engine's step

    def setup_rope(self, max_len: int) -> None:
        """Learned positions: nothing to build; the engine's max_model_len is capped by wpe."""

    @torch.inference_mode()
    def forward_step(self, inp, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """One engine step over a flat batch; see `Llama.forward_step`. ``(S, vocab)`` float32."""
        c, be, tp = self.config, self.backend, self.tp
        N, H = inp.num_tokens, self.num_heads * c.head_dim  # H: this rank's q (= k = v) width
        if tp is None:
            h = embedding(self.wte, inp.input_ids)
        else:
            h = vocab_parallel_embedding(self.wte, inp.input_ids, tp)
        h = h + embedding(self.wpe, inp.positions)  # (N, hidden)
        mlp_out = None
        for i, blk in enumerate(self.blocks):
            if mlp_out is None:
                x = layer_norm(h, *blk.ln_1, c.norm_eps, backend=be)
            else:
                x, h = layer_norm(mlp_out, *blk.ln_1, c.norm_eps, residual=h, backend=be)
            qkv = linear(x, blk.w_qkv, blk.b_qkv, backend=be)  # (N, 3 H)
            q, k, v = (qkv[:, j * H:(j + 1) * H].view(N, self.num_heads, c.head_dim) for j in range(3))
            y = attend(q, k, v, i, inp, k_pool, v_pool, be)  # (N, nh, hd)
            if tp is None:
                h = linear(y.reshape(N, H), blk.w_o, blk.b_o, residual=h, backend=be)
            else:  # row-parallel: reduce, then the bias and the residual once
                h = add_terms(tp.all_reduce(linear(y.reshape(N, H), blk.w_o, backend=be)), blk.b_o, h)
            x = layer_norm(h, *blk.ln_2, c.norm_eps, backend=be)
            x = linear(x, blk.w_fc, blk.b_fc, activation="gelu_tanh", backend=be)  # (N, inter)
            if tp is None:
                mlp_out = linear(x, blk.w_proj, blk.b_proj, backend=be)  # (N, hidden)
            else:
                mlp_out = add_terms(tp.all_reduce(linear(x, blk.w_proj, backend=be)), blk.b_proj)
        idx = inp.logits_indices
        x, _ = layer_norm(mlp_out[idx], *self.ln_f, c.norm_eps, residual=h[idx], backend=be)
        logits = linear(x, self.lm_head, backend=be).float()  # (S, vocab), or this rank's vocab slice
        return logits if tp is None else tp.gather_last_dim(logits)


def tp_split(name: str, config: ModelConfig, plan: TPPlan):
    """How rank ``plan.rank`` cuts a tensor (runtime/distributed.py): c_attn's q, k and v rows by
    heads, attn c_proj columns by heads, mlp c_fc rows and c_proj columns by the intermediate
    size, wte (and an untied head) rows by vocabulary; None (replicated) for the rest."""
    H, rows = config.hidden_size, plan.head_rows(plan.q_heads, config.head_dim)
    if ".attn.c_attn." in name:  # [Wq; Wk; Wv] stacked: this rank's heads of each
        return 0, [slice(j * H + rows.start, j * H + rows.stop) for j in range(3)]
    if name.endswith(".attn.c_proj.weight"):
        return 1, [rows]
    inter = slice(plan.intermediate.start, plan.intermediate.stop)
    if ".mlp.c_fc." in name:
        return 0, [inter]
    if name.endswith(".mlp.c_proj.weight"):
        return 1, [inter]
    if name in ("transformer.wte.weight", "lm_head.weight"):
        return 0, [slice(plan.vocab.start, plan.vocab.stop)]
    return None


# --------------------------------------------------------------------------- loading
# What runtime/config.py and runtime/weights.py ask of the family (`family.Family`).


def hf_config(r: ConfigReader, model_type: str) -> dict:
    """config.json (gpt2) -> ModelConfig keyword arguments."""
    hidden = r.dim("n_embd", "hidden_size")
    heads = r.dim("n_head", "num_heads")
    act = r.str("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{r.source}: gpt2 activation_function {act!r} is not supported (gelu_new)")
    if (r.bool("scale_attn_by_inverse_layer_idx", False, null_ok=True)
            or r.bool("reorder_and_upcast_attn", False, null_ok=True)):
        raise ValueError(f"{r.source}: gpt2 scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn "
                         "are not supported")
    if r.bool("scale_attn_weights", True, null_ok=True) is False:
        raise ValueError(f"{r.source}: gpt2 scale_attn_weights=false is not supported")
    return dict(
        arch="gpt2",
        vocab_size=r.dim("vocab_size", "vocab_size"),
        hidden_size=hidden,
        num_layers=r.dim("n_layer", "num_layers"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=r.dim("n_inner", "intermediate_size", 4 * hidden, null_ok=True),
        norm_eps=r.float("layer_norm_epsilon", 1e-5, positive=True),
        max_position_embeddings=r.dim("n_positions", "max_position_embeddings", 1024),
        tie_word_embeddings=r.bool("tie_word_embeddings", True),
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
        hidden_act="gelu_tanh",
        bos_token_id=one_id(r, "bos_token_id"),
        eos_token_ids=r.token_ids("eos_token_id"),
        model_type="gpt2",
        torch_dtype=dtype_name(r),
        extra=r.d,
    )


def gguf_config(r: ConfigReader, a: str, names: set, hidden: int, heads: int) -> dict:
    return dict(
        arch="gpt2", head_dim=hidden // heads,
        intermediate_size=r.dim(a + "feed_forward_length", "intermediate_size", 4 * hidden),
        norm_eps=r.float(a + "attention.layer_norm_epsilon", 1e-5, positive=True),
        attention_bias=True, attention_out_bias=True, mlp_bias=True, hidden_act="gelu_tanh")


def check_config(c: ModelConfig) -> None:
    if c.num_heads * c.head_dim != c.hidden_size:
        raise ValueError(f"gpt2: num_heads={c.num_heads} x head_dim={c.head_dim} != hidden_size={c.hidden_size}")


def top_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    h = c.hidden_size
    return {"transformer.wte.weight": (c.vocab_size, h), "transformer.wpe.weight": (c.max_position_embeddings, h),
            "transformer.ln_f.weight": (h,), "transformer.ln_f.bias": (h,)}


def layer_shapes(c: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    h, inter = c.hidden_size, c.intermediate_size
    p = f"transformer.h.{i}."
    shapes = {p + f"{ln}.{x}": (h,) for ln in ("ln_1", "ln_2") for x in ("weight", "bias")}
    for name, shape in (("attn.c_attn", (3 * h, h)), ("attn.c_proj", (h, h)),
                        ("mlp.c_fc", (inter, h)), ("mlp.c_proj", (h, inter))):
        shapes[p + f"{name}.weight"] = shape
        shapes[p + f"{name}.bias"] = shape[:1]
    return shapes


_BUFFER = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")
_CONV1D = re.compile(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")


def hf_name(name: str) -> str | None:
    if _BUFFER.match(name):  # the causal-mask buffers older checkpoints carry
        return None
    if not name.startswith(("transformer.", "lm_head.")):  # saved from the bare GPT2Model
        return "transformer." + name
    return name


def hf_tensor(canon: str, t: torch.Tensor, source: str) -> torch.Tensor:
    """GPT-2's Conv1D stores (in, out): transposed to nn.Linear's (out, in). (llama.cpp writes
    the GGUF matrices already transposed: no hook for GGUF.)"""
    if not _CONV1D.search(canon):
        return t
    if t.dim() != 2:
        raise ValueError(f"{source}: {canon} should be a 2-D Conv1D weight, has shape {tuple(t.shape)}")
    return t.t()


FAMILY = Family(
    arch="gpt2", model=GPT2, hf_model_types=("gpt2",), gguf_archs=("gpt2",),
    hf_config=hf_config, gguf_config=gguf_config, check_config=check_config,
    top_shapes=top_shapes, layer_shapes=layer_shapes, hf_name=hf_name, hf_tensor=hf_tensor,
    gguf_top={"token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
              "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
              "output.weight": "lm_head.weight"},
    gguf_block={"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
                "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
    layer_prefix="transformer.h",
    tp_split=tp_split,
)
