"""The public kernels as PyTorch operators: ``torch.ops.genfuse.<name>``.

``import genfuse.kernels.ops`` registers them (the package does not import this module:
``triton_op`` pulls in torch._dynamo and Inductor, about 3.3 s of import here, which a plain
kernel call does not need; `genfuse.accelerate` imports it for transformers models). What each
operator is made of:

* **One body for every device**, the same launcher the plain ``genfuse.kernels.<name>`` function
  runs: on CUDA tensors the Triton kernels, on CPU tensors the torch reference (or Triton's
  interpreter when ``TRITON_INTERPRET=1``, exactly as the plain function picks).
* ``torch.library.triton_op`` for every kernel; their launchers launch through
  ``_common.launch`` / ``_common.traceable`` (every launch is wrapped by ``wrap_triton`` while a
  tracer runs): ``torch.compile`` decomposes the operator during AOT dispatch and sees the
  Triton launches themselves (Inductor can then schedule them) on CUDA, and the torch
  reference ops on CPU (Inductor compiles those to C++). ``torch.export`` keeps the operator
  as one node, as PyTorch does for every triton_op.
* on CPU under a tracer, the three paged kernels (``paged_attention``, ``unified_attention``,
  ``write_kv_cache``) run twins of their references that never read the index tensors on the
  host (a tracer has no data), checked against the plain functions in tests/kernels/test_ops.py.
* A fake (meta) implementation for each, so shapes, dtypes and strides propagate without
  running anything (``torch.compile``, ``torch.export``, ``FakeTensorMode``).
* Schemas that say what is mutated: only ``write_kv_cache`` mutates (its two caches); every
  other output is a new tensor that aliases no input.

The differences from the plain functions, all because a schema is fixed:

* no ``backend=`` argument (the operator picks like ``backend=None``);
* the residual variants of the norms are their own operators, ``add_rms_norm`` and
  ``add_layer_norm``, returning ``(normed, x + residual)``;
* index validation (``validate=``, one host sync) runs in eager only: a tracer has no data to
  read, so under ``torch.compile`` / ``torch.export`` the indices are trusted.

Calling an operator costs the dispatcher's overhead on top of the function (measured by
``genfuse bench accelerate``); eager code that wants the cheapest route calls the plain
function, and `genfuse.runtime.accelerate_hf` switches to the operators only while compiling.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch.library import triton_op

from . import _common
# The launchers, aliased: each registered op below takes the plain function's name.
from ._attention import attention as _attention_fn
from ._conv2d import _strictly_channels_last, conv2d as _conv2d_fn
from ._conv_transpose2d import conv_transpose2d as _conv_transpose2d_fn
from ._decode_attention import paged_attention as _paged_attention_fn
from ._group_norm import group_norm as _group_norm_fn
from ._kv_cache import write_kv_cache as _write_kv_cache_fn
from ._linear import linear as _linear_fn
from ._norm import layer_norm as _layer_norm_fn, rms_norm as _rms_norm_fn
from ._rotary import rotary_embedding as _rotary_embedding_fn
from ._swiglu import swiglu as _swiglu_fn
from ._unified_attention import unified_attention as _unified_attention_fn

Tensor = torch.Tensor
NAMES = ("attention", "paged_attention", "linear", "rms_norm", "add_rms_norm", "layer_norm",
         "add_layer_norm", "rotary_embedding", "swiglu", "group_norm", "conv2d",
         "conv_transpose2d", "unified_attention", "write_kv_cache")


def _backend(*tensors: Optional[Tensor]) -> Optional[str]:
    """The plain function's ``backend`` for the operator's body.

    While a tracer runs on CPU (fake or functional tensors) the body must be the torch
    reference: the interpreter would try to read the tensors' data. Everything else is
    ``None``, the plain function's own choice.
    """
    t = tensors[0]
    if t.device.type != "cuda" and _common.tracing():
        return "torch"
    return None


def _validate() -> bool:
    return not _common.tracing()


# --------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------
@triton_op("genfuse::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
              scale: Optional[float] = None) -> Tensor:
    """``genfuse.kernels.attention`` (q ``(B, Hq, T, D)``, k/v ``(B, Hkv, S, D)``)."""
    return _attention_fn(q, k, v, causal=causal, scale=scale, backend=_backend(q))


@attention.register_fake
def _(q, k, v, causal=False, scale=None):
    return q.new_empty(q.shape)


@triton_op("genfuse::paged_attention", mutates_args=())
def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                    seq_lens: Tensor, scale: Optional[float] = None,
                    num_splits: Optional[int] = None) -> Tensor:
    """``genfuse.kernels.paged_attention`` (q ``(B, Hq, Tq, D)``, caches
    ``(num_blocks, block_size, Hkv, D)``, block_table ``(B, W)``, seq_lens ``(B,)``)."""
    if _backend(q) == "torch":  # tracing on CPU: the reference reads seq_lens on the host
        return _paged_attention_traced(q, k_cache, v_cache, block_table, seq_lens, scale)
    return _paged_attention_fn(q, k_cache, v_cache, block_table, seq_lens, scale=scale,
                               num_splits=num_splits, validate=_validate())


def _paged_attention_traced(q, k_cache, v_cache, block_table, seq_lens, scale):
    """``paged_attention_reference`` without host reads, for tracers: every table entry's block
    is gathered (``L = W * block_size`` keys; entries past a sequence are clamped into the pool
    and masked) and the bottom-right causal mask hides keys past each sequence's length."""
    B, Hq, Tq, D = q.shape
    num_blocks, block_size, Hkv = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    L = block_table.shape[1] * block_size
    scale = D ** -0.5 if scale is None else scale
    compute = torch.promote_types(q.dtype, torch.float32)
    blocks = block_table.long().clamp(0, num_blocks - 1)                       # (B, W)
    k = k_cache[blocks].reshape(B, L, Hkv, D).to(compute)                      # (B, L, Hkv, D)
    v = v_cache[blocks].reshape(B, L, Hkv, D).to(compute)
    past = torch.arange(L, device=q.device) >= seq_lens.view(B, 1)            # (B, L)
    v = v.masked_fill(past[:, :, None, None], 0)  # a NaN in an unused slot must not leak via 0 * NaN
    qg = q.to(compute).reshape(B, Hkv, (Hq // Hkv) * Tq, D)                     # head h = kv * G + g
    scores = (qg @ k.permute(0, 2, 3, 1)) * scale                              # (B, Hkv, G * Tq, L)
    t = torch.arange(Tq, device=q.device).view(1, Tq, 1)
    j = torch.arange(L, device=q.device).view(1, 1, L)
    hidden = j > seq_lens.view(B, 1, 1) - Tq + t                               # (B, Tq, L)
    scores = scores.view(B, Hkv, Hq // Hkv, Tq, L).masked_fill(hidden[:, None, None], float("-inf"))
    out = torch.softmax(scores, dim=-1).view(B, Hkv, -1, L) @ v.transpose(1, 2)
    return out.view(B, Hq, Tq, D).to(q.dtype)


@paged_attention.register_fake
def _(q, k_cache, v_cache, block_table, seq_lens, scale=None, num_splits=None):
    return q.new_empty(q.shape)


@triton_op("genfuse::unified_attention", mutates_args=())
def unified_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                      seq_lens: Tensor, query_start_loc: Tensor, scale: Optional[float] = None,
                      max_query_len: Optional[int] = None) -> Tensor:
    """``genfuse.kernels.unified_attention`` (q ``(N, Hq, D)``, paged caches, the engine's flat
    step of prefill chunks and decodes)."""
    if _backend(q) == "torch":  # tracing on CPU: the torch path reads the tables on the host
        return _unified_attention_traced(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, scale)
    return _unified_attention_fn(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, scale=scale,
                                 max_query_len=max_query_len, validate=_validate())


def _unified_attention_traced(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, scale):
    """``unified_attention_reference`` without host reads, for tracers: each query row finds its
    sequence by a search over ``query_start_loc``, gathers every table entry of it (``L = W *
    block_size`` keys; entries past the sequence clamped into the pool and masked) and hides the
    keys past its bottom-right causal limit. Memory ``O(N * L)``: a tracing path, not a fast one."""
    N, Hq, D = q.shape
    num_blocks, block_size, Hkv = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    L = block_table.shape[1] * block_size
    scale = D ** -0.5 if scale is None else scale
    compute = torch.promote_types(q.dtype, torch.float32)
    qsl, lens = query_start_loc.long(), seq_lens.long()
    rows = torch.arange(N, device=q.device)
    seq = torch.searchsorted(qsl[1:], rows, right=True)                        # (N,) each row's sequence
    t = rows - qsl[seq]                                                         # its index among the new tokens
    q_len = (qsl[1:] - qsl[:-1])[seq]
    blocks = block_table.long().clamp(0, num_blocks - 1)[seq]                   # (N, W)
    k = k_cache[blocks].reshape(N, L, Hkv, D).to(compute)
    v = v_cache[blocks].reshape(N, L, Hkv, D).to(compute)
    j = torch.arange(L, device=q.device)
    visible = j[None, :] <= (lens[seq] - q_len + t)[:, None]                    # (N, L)
    v = v.masked_fill(~visible[:, :, None, None], 0)  # a NaN in a hidden slot must not leak via 0 * NaN
    qg = q.to(compute).view(N, Hkv, Hq // Hkv, D)
    scores = torch.einsum("nhgd,nlhd->nhgl", qg, k) * scale
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    out = torch.einsum("nhgl,nlhd->nhgd", torch.softmax(scores, dim=-1), v)
    return out.reshape(N, Hq, D).to(q.dtype)


@unified_attention.register_fake
def _(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, scale=None, max_query_len=None):
    return q.new_empty(q.shape)


@triton_op("genfuse::write_kv_cache", mutates_args=("k_cache", "v_cache"))
def write_kv_cache(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                   slot_mapping: Tensor) -> None:
    """``genfuse.kernels.write_kv_cache``: stores k/v ``(N, Hkv, D)`` in the caches in place."""
    if _backend(k) == "torch":  # tracing on CPU: the torch path reads the slots on the host
        _write_kv_cache_traced(k, v, k_cache, v_cache, slot_mapping)
        return
    _write_kv_cache_fn(k, v, k_cache, v_cache, slot_mapping, validate=_validate())


def _write_kv_cache_traced(k, v, k_cache, v_cache, slot_mapping):
    """The write without host reads, for tracers: padding slots (< 0 or past the pool) go to one
    extra scratch row of a copy of the pool, which is copied back without that row."""
    num_blocks, block_size, hkv, d = k_cache.shape
    cap = num_blocks * block_size
    s = slot_mapping.long()
    s = torch.where((s >= 0) & (s < cap), s, cap)
    for x, cache in ((k, k_cache), (v, v_cache)):
        ext = torch.cat([cache.reshape(cap, hkv, d), cache.new_zeros(1, hkv, d)])
        ext.index_copy_(0, s, x)
        cache.copy_(ext[:cap].view(num_blocks, block_size, hkv, d))


@write_kv_cache.register_fake
def _(k, v, k_cache, v_cache, slot_mapping):
    return None


# --------------------------------------------------------------------------------------
# GEMM, norms, rotary, SwiGLU
# --------------------------------------------------------------------------------------
@triton_op("genfuse::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
           activation: Optional[str] = None, residual: Optional[Tensor] = None) -> Tensor:
    """``genfuse.kernels.linear``: ``act(x @ weight.T + bias) + residual``."""
    return _linear_fn(x, weight, bias, activation=activation, residual=residual,
                          backend=_backend(x))


@linear.register_fake
def _(x, weight, bias=None, activation=None, residual=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@triton_op("genfuse::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """``genfuse.kernels.rms_norm`` without a residual."""
    return _rms_norm_fn(x, weight, eps, backend=_backend(x))


@rms_norm.register_fake
def _(x, weight, eps=1e-6):
    return x.new_empty(x.shape)


@triton_op("genfuse::add_rms_norm", mutates_args=())
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor,
                 eps: float = 1e-6) -> Tuple[Tensor, Tensor]:
    """``genfuse.kernels.rms_norm(x, weight, eps, residual=residual)``: ``(normed, x + residual)``."""
    return _rms_norm_fn(x, weight, eps, residual=residual, backend=_backend(x))


@add_rms_norm.register_fake
def _(x, residual, weight, eps=1e-6):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@triton_op("genfuse::layer_norm", mutates_args=())
def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               eps: float = 1e-5) -> Tensor:
    """``genfuse.kernels.layer_norm`` without a residual."""
    return _layer_norm_fn(x, weight, bias, eps, backend=_backend(x))


@layer_norm.register_fake
def _(x, weight, bias, eps=1e-5):
    return x.new_empty(x.shape)


@triton_op("genfuse::add_layer_norm", mutates_args=())
def add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float = 1e-5) -> Tuple[Tensor, Tensor]:
    """``genfuse.kernels.layer_norm(..., residual=residual)``: ``(normed, x + residual)``."""
    return _layer_norm_fn(x, weight, bias, eps, residual=residual, backend=_backend(x))


@add_layer_norm.register_fake
def _(x, residual, weight, bias, eps=1e-5):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@triton_op("genfuse::rotary_embedding", mutates_args=())
def rotary_embedding(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                     positions: Tensor) -> Tuple[Tensor, Tensor]:
    """``genfuse.kernels.rotary_embedding``: rotated ``(q, k)``, new contiguous tensors."""
    return _rotary_embedding_fn(q, k, cos, sin, positions, validate=_validate(),
                                    backend=_backend(q))


@rotary_embedding.register_fake
def _(q, k, cos, sin, positions):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@triton_op("genfuse::swiglu", mutates_args=())
def swiglu(x: Tensor) -> Tensor:
    """``genfuse.kernels.swiglu``: ``silu(x[..., :N]) * x[..., N:]``."""
    return _swiglu_fn(x, backend=_backend(x))


@swiglu.register_fake
def _(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


# --------------------------------------------------------------------------------------
# Image kernels
# --------------------------------------------------------------------------------------
@triton_op("genfuse::group_norm", mutates_args=())
def group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5,
               activation: Optional[str] = None) -> Tensor:
    """``genfuse.kernels.group_norm`` over ``(N, C, *spatial)``, optional fused SiLU."""
    return _group_norm_fn(x, num_groups, weight, bias, eps, activation=activation,
                                  backend=_backend(x))


@group_norm.register_fake
def _(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None):
    return torch.empty_like(x)  # preserve_format: the kernel and the reference keep x's layout


def _conv_out(x: Tensor, weight: Tensor, shape: Tuple[int, ...]) -> Tensor:
    if _strictly_channels_last(x) or _strictly_channels_last(weight):
        n, k, ho, wo = shape
        return x.new_empty((n, ho, wo, k)).permute(0, 3, 1, 2)
    return x.new_empty(shape)


@triton_op("genfuse::conv2d", mutates_args=())
def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
           padding: List[int], upsample: int = 1, activation: Optional[str] = None,
           negative_slope: float = 0.2, residual: Optional[Tensor] = None) -> Tensor:
    """``genfuse.kernels.conv2d``: ``act(conv(up(x)) + bias) + residual``, NCHW or channels-last."""
    return _conv2d_fn(x, weight, bias, stride=tuple(stride), padding=tuple(padding),
                          upsample=upsample, activation=activation, negative_slope=negative_slope,
                          residual=residual, backend=_backend(x))


@conv2d.register_fake
def _(x, weight, bias, stride, padding, upsample=1, activation=None,
      negative_slope=0.2, residual=None):
    n, _, h, w = x.shape
    k, _, r, s = weight.shape
    ho = (h * upsample + 2 * padding[0] - r) // stride[0] + 1
    wo = (w * upsample + 2 * padding[1] - s) // stride[1] + 1
    return _conv_out(x, weight, (n, k, ho, wo))


@triton_op("genfuse::conv_transpose2d", mutates_args=())
def conv_transpose2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
                     padding: List[int], output_padding: List[int], activation: Optional[str] = None,
                     negative_slope: float = 0.2) -> Tensor:
    """``genfuse.kernels.conv_transpose2d``: ``act(conv_transpose(x) + bias)``; weight ``(C, K, R, S)``."""
    return _conv_transpose2d_fn(
        x, weight, bias, stride=tuple(stride), padding=tuple(padding),
        output_padding=tuple(output_padding), activation=activation,
        negative_slope=negative_slope, backend=_backend(x))


@conv_transpose2d.register_fake
def _(x, weight, bias, stride, padding, output_padding, activation=None,
      negative_slope=0.2):
    n, _, h, w = x.shape
    _, k, r, s = weight.shape
    ho = (h - 1) * stride[0] - 2 * padding[0] + r + output_padding[0]
    wo = (w - 1) * stride[1] - 2 * padding[1] + s + output_padding[1]
    return _conv_out(x, weight, (n, k, ho, wo))
