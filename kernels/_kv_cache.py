"""Writing a step's new keys and values into the paged KV cache through a slot mapping.

The engine runs one flat batch per step: ``N`` tokens from many sequences, prefill chunks and
decodes mixed. After the K/V projections (and rotary) each token's ``(Hkv, D)`` key and value
rows go to one slot of the per-layer pools ``(num_blocks, block_size, Hkv, D)``; the host
builds ``slot_mapping[i] = block * block_size + offset`` (vLLM's convention, ``-1`` for
padding tokens, e.g. a CUDA-graph batch rounded up to its bucket).

The copy is memory-bound: ``2 * N * Hkv * D`` elements read and written once. One program
moves one token's rows for a tile of heads (a few KiB), so the writes of a token land in one
contiguous ``Hkv * D`` run of its slot when the pool is contiguous. The slot is checked
against the pool inside the kernel as well (a scalar compare, free): with ``validate=False``
an out-of-range slot is skipped like padding instead of writing past the pool.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common

_INDEX_DTYPES = (torch.int32, torch.int64)
# Elements of one program's tile (heads x padded head dim): 2k elements = 4 KiB of bf16 read
# and written per tensor, enough bytes in flight per program without a huge register tile.
_TILE_ELEMENTS = 2048


# --------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------
@triton.jit
def _write_kv_cache_kernel(
    # pointers
    K, V, KCache, VCache, SlotMapping,
    # sizes
    capacity,  # num_blocks * block_size: slots at or past it are skipped
    Hkv,
    # strides (elements)
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    stride_sm,
    # meta-parameters
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,   # a constexpr so // and % are shifts for power-of-two pages
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    h0 = tl.program_id(1) * BLOCK_H
    slot = tl.load(SlotMapping + tok * stride_sm).to(tl.int64)
    # Negative slots are padding; slots past the pool only reach here with validate=False.
    if (slot < 0) | (slot >= capacity):
        return
    blk = slot // PAGE_SIZE
    off = slot % PAGE_SIZE
    offs_h = h0 + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < Hkv)[:, None] & (offs_d < HEAD_DIM)[None, :]
    h = offs_h[:, None].to(tl.int64)
    d = offs_d[None, :].to(tl.int64)
    # int64 throughout: a pool easily holds more than 2**31 elements.
    k = tl.load(K + tok * stride_kn + h * stride_kh + d * stride_kd, mask=mask)
    v = tl.load(V + tok * stride_vn + h * stride_vh + d * stride_vd, mask=mask)
    tl.store(KCache + blk * stride_kcb + off * stride_kcs + h * stride_kch + d * stride_kcd,
             k, mask=mask)
    tl.store(VCache + blk * stride_vcb + off * stride_vcs + h * stride_vch + d * stride_vcd,
             v, mask=mask)


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
def _launch_settings(hkv: int, d: int):
    """(BLOCK_H, BLOCK_D, num_warps): one token's heads in tiles of about 2k elements."""
    block_d = _common.next_power_of_2(d)
    block_h = min(_common.next_power_of_2(hkv), max(1, _TILE_ELEMENTS // block_d))
    warps = 4 if block_h * block_d >= 1024 else (2 if block_h * block_d >= 256 else 1)
    return block_h, block_d, warps


def _check_inputs(k, v, k_cache, v_cache, slot_mapping):
    _common.check_tensor("k", k, ndim=3)
    _common.check_tensor("v", v, ndim=3)
    _common.check_tensor("k_cache", k_cache, ndim=4)
    _common.check_tensor("v_cache", v_cache, ndim=4)
    # Same dtype on purpose: a cast on write (e.g. fp8 caches) would need scales; not supported.
    _common.check_same("k", k, v=v, k_cache=k_cache, v_cache=v_cache)
    _common.check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=_INDEX_DTYPES)
    _common.check_device("k", k, slot_mapping=slot_mapping)
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}")
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)} but k_cache has {tuple(k_cache.shape)}")
    num_blocks, block_size, hkv, d = k_cache.shape
    if num_blocks < 1 or block_size < 1:
        raise ValueError(f"k_cache has shape {tuple(k_cache.shape)}: needs at least one block of at least one slot")
    if (hkv, d) != tuple(k.shape[1:]):
        raise ValueError(f"k has (heads, head dim) {tuple(k.shape[1:])} but k_cache has {(hkv, d)}")
    if hkv < 1 or d < 1:
        raise ValueError(f"k_cache has shape {tuple(k_cache.shape)}: needs at least one head of at least one dim")
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries but k has {k.shape[0]} tokens")


def _check_slots(slot_mapping, num_blocks, block_size):
    """Data-dependent checks (one host sync): every slot < capacity, no slot written twice."""
    if slot_mapping.is_cuda and torch.cuda.is_current_stream_capturing():
        raise ValueError("validate=True reads slot_mapping on the host, which a CUDA graph "
                         "capture cannot do; pass validate=False for a trusted mapping")
    capacity = num_blocks * block_size
    s = slot_mapping.long()
    live = s[s >= 0]
    if live.numel() == 0:
        return
    top = int(live.max())
    if top >= capacity:
        i = int((s >= capacity).nonzero()[0, 0])
        raise ValueError(f"slot_mapping[{i}] = {int(s[i])} is past the cache's {capacity} slots "
                         f"({num_blocks} blocks x {block_size})")
    sorted_live = live.sort().values
    dup = (sorted_live[1:] == sorted_live[:-1]).nonzero()
    if dup.numel():
        value = int(sorted_live[dup[0, 0]])
        first, second = (s == value).nonzero()[:2, 0].tolist()
        raise ValueError(f"slot_mapping[{first}] and slot_mapping[{second}] are both slot {value}; "
                         f"each slot takes one token per step")


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, *, validate: bool = True,
                   backend: Optional[str] = None) -> None:
    """Store each new token's keys and values in its cache slot, in place.

    ``k_cache[s // block_size, s % block_size] = k[i]`` (and the same for ``v``) for every
    token ``i`` with ``s = slot_mapping[i] >= 0``; tokens with a negative slot are padding and
    are skipped.

    Args:
        k, v: ``(N, Hkv, D)``, the step's new tokens, any strides (e.g. column slices of a
            packed QKV projection).
        k_cache, v_cache: ``(num_blocks, block_size, Hkv, D)``, written in place, any strides
            (k and v may be interleaved in one pool). Same dtype and device as ``k``: the cache
            stores the activations' dtype, there is no cast or quantization on write.
        slot_mapping: ``(N,)`` int32/int64, ``block * block_size + offset`` or ``< 0`` for
            padding.
        validate: check the slots (one host sync): a slot ``>= num_blocks * block_size`` or a
            slot given to two tokens raises ``ValueError``. ``False`` trusts the caller (the
            engine builds the mapping); out-of-range slots are then skipped, never written.
        backend: ``None``, ``"triton"`` or ``"torch"`` (see ``_common.resolve_backend``).

    Returns ``None``; ``N = 0`` returns at once.
    """
    _check_inputs(k, v, k_cache, v_cache, slot_mapping)
    use_torch = _common.resolve_backend(backend, k, v, k_cache, v_cache) == "torch"
    n = k.shape[0]
    if n == 0:
        return
    num_blocks, block_size, hkv, d = k_cache.shape
    if validate:
        _check_slots(slot_mapping, num_blocks, block_size)
    if use_torch:
        _write_torch(k, v, k_cache, v_cache, slot_mapping)
        return
    block_h, block_d, warps = _launch_settings(hkv, d)
    grid = (n, triton.cdiv(hkv, block_h))
    _common.traceable(_write_kv_cache_kernel)[grid](
        k, v, k_cache, v_cache, slot_mapping,
        num_blocks * block_size, hkv,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(), slot_mapping.stride(0),
        HEAD_DIM=d, PAGE_SIZE=block_size, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=warps)


# --------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------
def _write_torch(k, v, k_cache, v_cache, slot_mapping):
    num_blocks, block_size = k_cache.shape[:2]
    s = slot_mapping.long()
    keep = (s >= 0) & (s < num_blocks * block_size)
    if not bool(keep.all()):
        s, k, v = s[keep], k[keep], v[keep]
    for x, cache in ((k, k_cache), (v, v_cache)):
        if cache.stride(0) == block_size * cache.stride(1):  # (blocks, slots) merge: one index
            cache.view(num_blocks * block_size, *cache.shape[2:]).index_copy_(0, s, x)
        else:  # index_put_ on the 4-D view writes through any strides
            cache.index_put_((s // block_size, s % block_size), x)


def write_kv_cache_reference(k, v, k_cache, v_cache, slot_mapping, *, validate=True):
    """Plain torch: ``index_put_`` of the kept tokens at ``(slot // block_size, slot % block_size)``.

    Same arguments and checks as :func:`write_kv_cache`.
    """
    _check_inputs(k, v, k_cache, v_cache, slot_mapping)
    if k.shape[0] == 0:
        return
    if validate:
        _check_slots(slot_mapping, *k_cache.shape[:2])
    _write_torch(k, v, k_cache, v_cache, slot_mapping)
