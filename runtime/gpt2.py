"""GPT-2 on genfuse kernels, the same shape as `runtime.llama` (read that first).

Differences from the Llama family: learned absolute positions (``wpe``) instead of rotary,
LayerNorm with bias, full multi-head attention (Hkv = Hq), biases on every projection, and a
``gelu_tanh`` MLP whose activation runs in the c_fc `linear` epilogue. The weights arrive in
``nn.Linear`` (out, in) layout (`runtime.weights` transposes GPT-2's Conv1D), q/k/v already
stacked in ``c_attn``.

Fusions: q/k/v are one `linear` (c_attn) read through strided views; the attention residual
is the c_proj epilogue (``linear(..., residual=h)``); the MLP residual is fused into the next
LayerNorm (``layer_norm(mlp_out, w, b, residual=h)``), the last one into ``ln_f``. The KV cache
is `llama.KVCache`; prefill uses causal `attention`, decode `paged_attention`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from genfuse.kernels import attention, layer_norm, paged_attention, unified_attention, write_kv_cache

from .config import ModelConfig
from .llama import KVCache
from .quant import (  # linear: genfuse.kernels.linear, or packed GGUF blocks
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
        self.cache: KVCache | None = None

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

    def setup_cache(self, max_batch: int, max_len: int) -> KVCache:
        c = self.config
        if max_len > c.max_position_embeddings:
            raise ValueError(f"{max_len} tokens (prompt + max_tokens) exceed the model's "
                             f"max_position_embeddings={c.max_position_embeddings}")
        if self.cache is None or self.cache.max_batch < max_batch or self.cache.max_len < max_len:
            self.cache = None
            self.cache = KVCache(c, max_batch, max_len, dtype=self.dtype, device=self.device)
        return self.cache

    def _attention(self, i: int, blk: Block, x: torch.Tensor, h: torch.Tensor,
                   positions: torch.Tensor, row: int | None) -> torch.Tensor:
        """h + c_proj(attn(x)): x the normed input (B, T, hidden), h the residual stream."""
        c, be = self.config, self.backend
        B, T, H = x.shape
        qkv = linear(x, blk.w_qkv, blk.b_qkv, backend=be)  # (B, T, 3 * hidden)
        q, k, v = (qkv[..., j * H:(j + 1) * H].view(B, T, c.num_heads, c.head_dim).transpose(1, 2)
                   for j in range(3))  # each (B, nh, T, hd), strided views
        cache = self.cache
        if row is not None:
            cache.write_prefill(i, row, k, v)
            y = attention(q, k, v, causal=True, backend=be)  # (1, nh, T, hd)
        else:
            pos = positions[:, 0]
            cache.write_decode(i, pos, k, v)
            y = paged_attention(q, cache.k[i], cache.v[i], cache.block_table[:B], pos + 1,
                                validate=False, backend=be)
        y = y.transpose(1, 2).reshape(B, T, H)  # (B, T, nh * hd)
        return linear(y, blk.w_o, blk.b_o, residual=h, backend=be)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, row: int | None = None) -> torch.Tensor:
        """Logits of the last position of each sequence ``(B, vocab)`` float32; see `Llama.forward`."""
        c, be = self.config, self.backend
        h = embedding(self.wte, tokens) + embedding(self.wpe, positions)  # (B, T, hidden)
        mlp_out = None
        for i, blk in enumerate(self.blocks):
            if mlp_out is None:
                x = layer_norm(h, *blk.ln_1, c.norm_eps, backend=be)
            else:  # the previous MLP's residual add, fused into this norm
                x, h = layer_norm(mlp_out, *blk.ln_1, c.norm_eps, residual=h, backend=be)
            h = self._attention(i, blk, x, h, positions, row)
            x = layer_norm(h, *blk.ln_2, c.norm_eps, backend=be)
            x = linear(x, blk.w_fc, blk.b_fc, activation="gelu_tanh", backend=be)  # (B, T, inter)
            mlp_out = linear(x, blk.w_proj, blk.b_proj, backend=be)  # (B, T, hidden)
        x, _ = layer_norm(mlp_out[:, -1:], *self.ln_f, c.norm_eps, residual=h[:, -1:], backend=be)
        return linear(x[:, 0], self.lm_head, backend=be).float()  # (B, vocab)

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, row: int) -> torch.Tensor:
        T = tokens.shape[-1]
        positions = torch.arange(T, device=self.device).view(1, T)
        return self.forward(tokens.view(1, T), positions, row=row)

    @torch.inference_mode()
    def decode_one_token(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.forward(tokens.view(-1, 1), positions.view(-1, 1), row=None)

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
