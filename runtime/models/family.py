"""What a model family declares, once, for every part of the runtime that depends on it, and the
step plumbing every family shares (`attend`: the paged KV write and attention of one layer).

`runtime/config.py`, `runtime/weights.py` and `runtime/loader.py` hold no architecture branches:
they ask the `Family` record of ``config.arch`` (``FAMILIES`` in ``runtime/models/__init__.py``).
A family file (``llama.py`` is the template) ends with one ``FAMILY = Family(...)``; adding a
family is that file and one line in ``FAMILIES`` (docs/architecture.md, "Adding a model family").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from genfuse.kernels import unified_attention, write_kv_cache

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Family:
    arch: str  # ModelConfig.arch
    model: type  # from_state_dict(config, sd, backend=), setup_rope(max_len), forward_step(inp, k, v)
    hf_model_types: tuple[str, ...]  # config.json "model_type" values this family runs
    gguf_archs: tuple[str, ...]  # GGUF "general.architecture" values this family runs
    # config.json (a `config.ConfigReader`, its model_type) -> ModelConfig keyword arguments
    hf_config: Callable[[Any, str], dict]
    # GGUF metadata (a ConfigReader, the "<arch>." key prefix, the tensor names, hidden size and
    # heads already read) -> the family's own ModelConfig keyword arguments
    gguf_config: Callable[[Any, str, set, int, int], dict]
    check_config: Callable[[Any], None]  # the family's own ModelConfig checks (ValueError)
    top_shapes: Callable[[Any], Shapes]  # canonical non-layer tensors and their shapes
    layer_shapes: Callable[[Any, int], Shapes]  # layer i's canonical tensors
    hf_name: Callable[[str], str | None]  # a safetensors key -> canonical name (None: drop it)
    gguf_top: dict[str, str]  # GGUF name -> canonical name, outside the blocks
    gguf_block: dict[str, str]  # "attn_q" -> "self_attn.q_proj" (inside layer_prefix.{i}.)
    layer_prefix: str  # "model.layers"
    # a loaded safetensors tensor, by canonical name -> the tensor the model reads
    hf_tensor: Callable[[str, torch.Tensor, str], torch.Tensor] = lambda canon, t, source: t
    # GGUF rows to un-permute (llama.cpp's rotary layout): canonical name, config, GGUF arch ->
    # the number of heads to un-permute over, or None
    gguf_permuted_heads: Callable[[str, Any, str], int | None] = lambda canon, config, gguf_arch: None
    # tensor parallelism (runtime/distributed.py): canonical name, config, TPPlan -> how this
    # rank's piece is cut, (dim, [slices]), or None for a replicated tensor
    tp_split: Callable[[str, Any, Any], tuple | None] = lambda name, config, plan: None


# --------------------------------------------------------------------------- shared step plumbing


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, inp, k_pool: torch.Tensor,
           v_pool: torch.Tensor, backend: str | None) -> torch.Tensor:
    """Layer ``layer``'s paged attention in an engine step, the same for every family: the step's
    new K/V ``(N, Hkv, D)`` go into the pools through the slot mapping, then every query
    ``(N, Hq, D)`` attends to its sequence's cached prefix and itself (causal, bottom-right).
    The engine built the tables (`engine.kv_cache.StepInputs`), so the data checks are skipped.
    Returns ``(N, Hq, D)``."""
    if k_pool.dtype != k.dtype:  # kv_cache_dtype="float16": only the fused CPU layers write such pools
        raise RuntimeError(f"the KV cache is {str(k_pool.dtype).removeprefix('torch.')} but this step runs the "
                           f"{str(k.dtype).removeprefix('torch.')} torch layers (GENFUSE_FUSED_LAYERS=0 after the "
                           "engine started?); restart with kv_cache_dtype='auto'")
    write_kv_cache(k, v, k_pool[layer], v_pool[layer], inp.slot_mapping, validate=False, backend=backend)
    return unified_attention(q, k_pool[layer], v_pool[layer], inp.block_table, inp.seq_lens, inp.query_start_loc,
                             max_query_len=inp.max_query_len, validate=False, backend=backend)


def add_terms(x: torch.Tensor, *terms) -> torch.Tensor:
    """``x`` plus every term that is not None, in place: a row-parallel layer's bias and
    residual, added once after its all-reduce (runtime/distributed.py)."""
    for t in terms:
        if t is not None:
            x += t
    return x
