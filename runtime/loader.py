"""Load a language model by name, folder or .gguf: config, weights on their device, tokenizer.

What `LLM` and `Engine` share: both call `load_model` and then only use the returned
`LoadedModel` (the model family object, its config, the tokenizer and the EOS ids).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from genfuse.kernels._common import resolve_backend

from .config import ModelConfig, load_config
from .distributed import TPGroup, TPPlan
from .models import FAMILIES
from .quant import can_pack
from .registry import DEFAULT_MODEL, resolve
from .resources import resolve_device
from .tokenizer import Tokenizer, TokenizerNotFoundError
from .weights import load_weights

_log = logging.getLogger("genfuse")
_tp_log = logging.getLogger("genfuse.tp")  # what each rank holds: `genfuse generate` shows these under TP

@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    model: object  # an instance of a FAMILIES entry's model class
    tokenizer: Tokenizer | None
    eos_token_ids: frozenset[int]
    device: torch.device
    dtype: torch.dtype
    backend: str | None
    keep_quantized: bool


def default_dtype(device: torch.device) -> torch.dtype:
    """The dtype a model loads in when none is given: bf16 on CUDA, float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(model: str | os.PathLike = DEFAULT_MODEL, *, device=None, dtype: torch.dtype | None = None,
               backend: str | None = None, keep_quantized: bool | None = None,
               tensor_parallel: tuple[int, int] | None = None) -> LoadedModel:
    """See `LLM` for the arguments; returns the loaded model and its tokenizer.

    ``tensor_parallel=(rank, world)``: keep rank ``rank``'s slice of the model
    (runtime/distributed.py) and run its collectives on torch.distributed's default group, which
    the caller has initialized; ``world == 1`` is the plain model."""
    resolved = resolve(model)
    dev = resolve_device(device)
    if dtype is None:
        dtype = default_dtype(dev)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype!r}")
    config = load_config(resolved.path)
    family = FAMILIES[config.arch]  # ModelConfig refuses an arch that has no family
    tp = None
    if tensor_parallel is not None and tensor_parallel[1] > 1:
        tp = TPGroup(TPPlan.make(config, *tensor_parallel))  # refuses a sizing that cannot split
    packable = can_pack(dev, dtype, resolve_backend(backend, torch.empty(0, device=dev)))
    if keep_quantized and not packable:
        raise ValueError("keep_quantized=True needs the CPU, float32 and the torch ops (backend='torch', "
                         f"or None without TRITON_INTERPRET); got {dev}, {dtype}, backend={backend!r}")
    keep = packable if keep_quantized is None else bool(keep_quantized)
    sd = load_weights(resolved.path, config, dtype=dtype, device=dev, packed=keep,
                      tp_plan=None if tp is None else tp.plan)
    if tp is not None:
        pl = tp.plan
        held = sum(getattr(t, "nbytes", 0) for t in sd.values())  # tensors and packed blocks
        _tp_log.info("tensor parallel rank %d/%d holds query heads %d-%d, KV heads %d-%d, intermediate %d-%d, "
                     "vocabulary %d-%d: %.1f MiB of weights", pl.rank, pl.world, pl.q_heads.start,
                     pl.q_heads.stop - 1, pl.kv_heads.start, pl.kv_heads.stop - 1, pl.intermediate.start,
                     pl.intermediate.stop - 1, pl.vocab.start, pl.vocab.stop - 1, held / 2**20)
    net = family.model.from_state_dict(config, sd, backend=backend, **({} if tp is None else {"tp": tp}))
    del sd
    try:
        tokenizer: Tokenizer | None = Tokenizer.load(resolved.path)
    except TokenizerNotFoundError:
        tokenizer = None  # token-id prompts still work
    eos = set(config.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return LoadedModel(resolved.name, config, net, tokenizer, frozenset(eos), dev, dtype, backend, keep)
