"""The Llama family's decoder layers on the CPU in one C++ call a step (``genfuse._C.CpuDecoder``,
csrc/cpu_layer.h), instead of ~15 torch ops a layer.

Why: with packed GGUF weights a SmolLM2-135M decode token spent ~13 ms (of 29) in the small
per-layer torch ops around the C++ matmuls (norms, rotary, the K/V write, the attention's paged
gathers and SDPA, SwiGLU, adds) and the Python between them (issue 13). The fused call runs the
same layer (`Llama.forward_step`'s loop, formula in csrc/cpu_layer.h) over the whole step's N
tokens, prefill chunks and decodes mixed: the same qdot_matmul on the packed weights, the paged
attention read in place from the pools (no gathers), no allocation once warm.

When it runs (`fused_layers` returns None otherwise and forward_step takes its torch path):
the model is on the CPU in float32 with the torch kernels (no Triton interpreter), not tensor
parallel, its rotary tables built, every layer matrix packed (`PackedWeight`, or `PackedRows`
for mixed-type rows), at any step size. Its matmuls are those of `runtime.quant.linear`: the
integer-dot kernel up to `QDOT_MAX_ROWS` tokens, the float32 GEMM over dequantized panels past
it (csrc/gemm.h), both on the kernels' thread pool. Dense float32 weights are supported by the
C++ class (dot-product rows up to QDOT_MAX_ROWS tokens, the same GEMM past it) but taken only
with ``GENFUSE_FUSED_LAYERS=all``: not yet measured against torch's GEMM on its own threads.

Turning it off for A/B: ``GENFUSE_FUSED_LAYERS=0`` in the environment (read every step), or
``model.fused_layers = False`` on one model. The kernels' code path follows the packed matmul's
(GENFUSE_CPU_PATH, `genfuse._C.cpu_layer_isa()` names the layer kernels' instruction set) and
activation width (GENFUSE_ACT_BITS).
"""
from __future__ import annotations

import os

import torch
from genfuse.kernels._common import resolve_backend

from ..quant import QTYPES, PackedRows, PackedWeight, act_bits
from ..threads import kernel_threads

ENV = "GENFUSE_FUSED_LAYERS"  # "0": off; "all": dense float32 weights too; else packed weights only

def _weight(w):
    """What CpuDecoder takes for a matrix: the float32 array, or [(blocks, type), ...]."""
    if isinstance(w, PackedWeight):
        return [(w._data_np, QTYPES[w.qtype])]
    if isinstance(w, PackedRows):
        return [(p._data_np, QTYPES[p.qtype]) for p in w.parts]
    return w.contiguous().numpy()


def _i32(t: torch.Tensor):
    """An index tensor as the int32 C-ordered array the C++ reads (the engine's already are)."""
    if t.dtype != torch.int32 or not t.is_contiguous():
        t = t.to(torch.int32).contiguous()
    return t.numpy()


def _vec(t):
    return None if t is None else t.contiguous().numpy()


def _eligible(model, mode: str) -> bool:
    from .llama import Llama  # here: llama.py imports this module

    if not isinstance(model, Llama) or model.tp is not None:
        return False
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return False
    if resolve_backend(model.backend, model.norm) != "torch":
        return False
    mats = [m for lw in model.layers for m in (lw.w_qkv, lw.w_o, lw.w_gate_up, lw.w_down)]
    if mode != "all" and not all(isinstance(m, (PackedWeight, PackedRows)) for m in mats):
        return False
    return all(isinstance(m, (PackedWeight, PackedRows)) or (isinstance(m, torch.Tensor) and m.dtype == torch.float32)
               for m in mats)


def decoder(model):
    """The model's `genfuse._C.CpuDecoder` (built once and kept on the model), or None where
    the fused path does not apply."""
    mode = os.environ.get(ENV, "1")
    if mode == "0" or getattr(model, "fused_layers", True) is False:
        return None
    key = "_cpu_decoder_all" if mode == "all" else "_cpu_decoder"
    cached = getattr(model, key, None)
    if cached is None:
        if _eligible(model, mode):
            from genfuse import _C

            c = model.config
            layers = [dict(input_norm=_vec(lw.input_norm), qkv=_weight(lw.w_qkv), b_qkv=_vec(lw.b_qkv),
                           o=_weight(lw.w_o), b_o=_vec(lw.b_o), post_norm=_vec(lw.post_norm),
                           gate_up=_weight(lw.w_gate_up), b_gate_up=_vec(lw.b_gate_up),
                           down=_weight(lw.w_down), b_down=_vec(lw.b_down)) for lw in model.layers]
            cached = _C.CpuDecoder(c.hidden_size, model.num_heads, model.num_kv_heads, c.head_dim,
                                   c.intermediate_size, c.norm_eps, layers)
        else:
            cached = False  # decided once per model
        setattr(model, key, cached)
    return cached or None


def fused_layers(model, inp, k_pool: torch.Tensor, v_pool: torch.Tensor, h: torch.Tensor):
    """Every decoder layer of ``model`` over the step ``inp`` in one C++ call: ``(h, mlp_out)``,
    each ``(N, hidden)``, as `Llama.forward_step`'s layer loop leaves them; the layers' K/V
    written into the pools. None where the fused path does not apply (the caller runs its own
    loop). ``h``: the step's embeddings, overwritten."""
    N = inp.num_tokens
    if N <= 0 or model.cos is None:
        return None
    dec = decoder(model)
    if dec is None:
        return None
    if not h.is_contiguous() or h.dtype != torch.float32:
        h = h.contiguous().float()
    mlp_out = torch.empty_like(h)
    cos, sin = model.cos, model.sin
    if not (cos.is_contiguous() and sin.is_contiguous()):
        cos, sin = cos.contiguous(), sin.contiguous()
    dec.forward(h.numpy(), mlp_out.numpy(), _i32(inp.positions), _i32(inp.slot_mapping), _i32(inp.block_table),
                _i32(inp.seq_lens), _i32(inp.query_start_loc), k_pool.numpy(), v_pool.numpy(), cos.numpy(),
                sin.numpy(), kernel_threads(), None, act_bits())
    return h, mlp_out
