"""Model families behind one table (docs/architecture.md, "Adding a model family").

Each family file defines its model class (weights only: ``from_state_dict(config, sd,
backend=)``, ``setup_rope(max_len)``, ``forward_step(inputs, k_pool, v_pool) -> logits``) and
ends with a `Family` record: the config.json / GGUF names it runs, its config parsing, its
tensor names and shapes. config.py, weights.py and loader.py read only this table.
"""
from .family import Family
from .gpt2 import GPT2
from .gpt2 import FAMILY as _GPT2
from .llama import FAMILY as _LLAMA
from .llama import Llama

# config.arch -> the family
FAMILIES: dict[str, Family] = {f.arch: f for f in (_LLAMA, _GPT2)}


def family_for(arch: str) -> Family:
    """The family of ``config.arch``; ValueError naming the supported ones."""
    try:
        return FAMILIES[arch]
    except (KeyError, TypeError):
        raise ValueError(f"architecture {arch!r} is not supported (supported: {', '.join(FAMILIES)})") from None


__all__ = ["FAMILIES", "Family", "GPT2", "Llama", "family_for"]
