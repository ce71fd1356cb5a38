"""genfuse.kernels: hand-written Triton kernels, each with its torch reference.

Every public op takes ``backend=None | "triton" | "torch"`` (see ``_common.resolve_backend``).
"""
from ._common import poison_outputs

__all__ = ["poison_outputs"]
