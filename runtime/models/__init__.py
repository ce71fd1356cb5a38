"""Model families behind one table (docs/architecture.md, "Adding a model family").

Each family class holds weights only and has ``from_state_dict(config, sd, backend=)``,
``setup_rope(max_len)`` and ``forward_step(inputs, k_pool, v_pool) -> logits``.
"""
from .gpt2 import GPT2
from .llama import Llama

# config.arch -> family class
FAMILIES = {"llama": Llama, "gpt2": GPT2}

__all__ = ["FAMILIES", "GPT2", "Llama"]
