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

from dataclasses import dataclass

import torch
from genfuse.kernels import layer_norm, unified_attention, write_kv_cache

from ..config import ModelConfig
from ..quant import (  # linear: genfuse.kernels.linear, or packed GGUF blocks
    embedding,
    linear,
)


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
                 ln_f: tuple[torch.Tensor, torch.Tensor], lm_head: torch.Tensor, *, backend: str | None = None):
        if config.arch != "gpt2":
            raise ValueError(f"GPT2 runs arch 'gpt2', not {config.arch!r}")
        self.config = config
        self.wte, self.wpe, self.blocks, self.ln_f, self.lm_head = wte, wpe, blocks, ln_f, lm_head
        self.backend = backend
        self.device, self.dtype = wte.device, wte.dtype

    @classmethod
    def from_state_dict(cls, config: ModelConfig, sd: dict[str, torch.Tensor], *,
                        backend: str | None = None) -> GPT2:
        blocks = []
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
                   (sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]), lm_head, backend=backend)

    # ------------------------------------------------------------------ the engine's step

    def setup_rope(self, max_len: int) -> None:
        """Learned positions: nothing to build; the engine's max_model_len is capped by wpe."""

    @torch.inference_mode()
    def forward_step(self, inp, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """One engine step over a flat batch; see `Llama.forward_step`. ``(S, vocab)`` float32."""
        c, be = self.config, self.backend
        N, H = inp.num_tokens, c.hidden_size
        h = embedding(self.wte, inp.input_ids) + embedding(self.wpe, inp.positions)  # (N, hidden)
        mlp_out = None
        for i, blk in enumerate(self.blocks):
            if mlp_out is None:
                x = layer_norm(h, *blk.ln_1, c.norm_eps, backend=be)
            else:
                x, h = layer_norm(mlp_out, *blk.ln_1, c.norm_eps, residual=h, backend=be)
            qkv = linear(x, blk.w_qkv, blk.b_qkv, backend=be)  # (N, 3 * hidden)
            q, k, v = (qkv[:, j * H:(j + 1) * H].view(N, c.num_heads, c.head_dim) for j in range(3))
            write_kv_cache(k, v, k_pool[i], v_pool[i], inp.slot_mapping, validate=False, backend=be)
            y = unified_attention(q, k_pool[i], v_pool[i], inp.block_table, inp.seq_lens, inp.query_start_loc,
                                  max_query_len=inp.max_query_len, validate=False, backend=be)  # (N, nh, hd)
            h = linear(y.reshape(N, H), blk.w_o, blk.b_o, residual=h, backend=be)
            x = layer_norm(h, *blk.ln_2, c.norm_eps, backend=be)
            x = linear(x, blk.w_fc, blk.b_fc, activation="gelu_tanh", backend=be)  # (N, inter)
            mlp_out = linear(x, blk.w_proj, blk.b_proj, backend=be)  # (N, hidden)
        idx = inp.logits_indices
        x, _ = layer_norm(mlp_out[idx], *self.ln_f, c.norm_eps, residual=h[idx], backend=be)
        return linear(x, self.lm_head, backend=be).float()  # (S, vocab)
