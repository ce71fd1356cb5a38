"""genfuse.kernels: hand-written Triton kernels, each with its torch reference.

Every public op takes ``backend=None | "triton" | "torch"`` (see ``_common.resolve_backend``);
``<op>_reference`` is the torch op with the same signature that tests compare against.

``import genfuse.kernels.ops`` registers them as ``torch.ops.genfuse.*`` (see that module). It is
not imported here: ``torch.library.triton_op`` pulls in torch._dynamo and Inductor (3.3 s of
import on this 2-core CPU), which a plain kernel call or the CLI does not need.
"""
from ._common import poison_outputs
from ._attention import attention, attention_reference
from ._linear import ACTIVATIONS, linear, linear_reference
from ._norm import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from ._rotary import rope_cos_sin, rotary_embedding, rotary_embedding_reference
from ._swiglu import swiglu, swiglu_reference
from ._conv2d import conv2d, conv2d_reference, fold_batchnorm
from ._conv_transpose2d import conv_transpose2d, conv_transpose2d_reference
from ._group_norm import group_norm, group_norm_reference
from ._decode_attention import num_splits_heuristic, paged_attention, paged_attention_reference
from ._kv_cache import write_kv_cache, write_kv_cache_reference
from ._unified_attention import unified_attention, unified_attention_reference

__all__ = [
    "poison_outputs",
    "attention", "attention_reference",
    "linear", "linear_reference", "ACTIVATIONS",
    "rms_norm", "rms_norm_reference", "layer_norm", "layer_norm_reference",
    "rotary_embedding", "rotary_embedding_reference", "rope_cos_sin",
    "swiglu", "swiglu_reference",
    "conv2d", "conv2d_reference", "fold_batchnorm",
    "conv_transpose2d", "conv_transpose2d_reference",
    "group_norm", "group_norm_reference",
    "paged_attention", "paged_attention_reference", "num_splits_heuristic",
    "write_kv_cache", "write_kv_cache_reference",
    "unified_attention", "unified_attention_reference",
]
