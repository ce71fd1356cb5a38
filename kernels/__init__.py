"""genfuse.kernels: hand-written Triton kernels, each with its torch reference.

Every public op takes ``backend=None | "triton" | "torch"`` (see ``_common.resolve_backend``);
``<op>_reference`` is the torch op with the same signature that tests compare against.
"""
from ._common import poison_outputs
from .linear import ACTIVATIONS, linear, linear_reference
from .decode_attention import num_splits_heuristic, paged_attention, paged_attention_reference

__all__ = [
    "poison_outputs",
    "linear", "linear_reference", "ACTIVATIONS",
    "paged_attention", "paged_attention_reference", "num_splits_heuristic",
]
