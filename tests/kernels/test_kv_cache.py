"""write_kv_cache (new K/V rows into the paged pool through a slot mapping) against its reference."""
import pytest
import torch

import helpers
from genfuse.kernels._kv_cache import write_kv_cache, write_kv_cache_reference


def make_pools(device, dtype, num_blocks=7, block_size=16, Hkv=3, D=64):
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, device=device, dtype=dtype)
    v_cache = torch.randn(num_blocks, block_size, Hkv, D, device=device, dtype=dtype)
    return k_cache, v_cache


def random_slots(n, num_blocks, block_size, *, padding=0, dtype=torch.int64, device="cpu"):
    """``n`` distinct slots anywhere in the pool, ``padding`` of them replaced by -1."""
    slots = torch.randperm(num_blocks * block_size)[:n]
    if padding:
        slots[torch.randperm(n)[:padding]] = -1
    return slots.to(dtype=dtype, device=device)


def check(k, v, k_cache, v_cache, slots, **kw):
    want_k, want_v = k_cache.clone(), v_cache.clone()
    write_kv_cache_reference(k, v, want_k, want_v, slots)
    write_kv_cache(k, v, k_cache, v_cache, slots, **kw)
    # A copy: exact, including the slots nobody wrote (left as they were).
    torch.testing.assert_close(k_cache, want_k, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, want_v, rtol=0, atol=0)


@pytest.mark.parametrize("block_size,Hkv,D", [(16, 3, 64), (32, 1, 80), (16, 8, 128), (5, 2, 8)])
@pytest.mark.parametrize("dtype", helpers.DTYPES)
def test_matches_reference(device, dtype, block_size, Hkv, D):
    k_cache, v_cache = make_pools(device, dtype, block_size=block_size, Hkv=Hkv, D=D)
    n = 23
    k = torch.randn(n, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(n, Hkv, D, device=device, dtype=dtype)
    check(k, v, k_cache, v_cache, random_slots(n, 7, block_size, padding=4, device=device))


@pytest.mark.parametrize("backend", [None, "torch"])
def test_writes_the_named_slots(device, backend):
    # Exact placement, not just agreement with the reference: token i lands at (s // bs, s % bs).
    # The torch path writes a contiguous pool through one flat index (index_copy_).
    k_cache, v_cache = make_pools(device, torch.float32, num_blocks=4, block_size=16, Hkv=2, D=8)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    k = torch.randn(4, 2, 8, device=device)
    v = torch.randn(4, 2, 8, device=device)
    slots = torch.tensor([17, -1, 0, 63], dtype=torch.int32, device=device)
    write_kv_cache(k, v, k_cache, v_cache, slots, backend=backend)
    for i, (blk, off) in {0: (1, 1), 2: (0, 0), 3: (3, 15)}.items():
        assert torch.equal(k_cache[blk, off], k[i]) and torch.equal(v_cache[blk, off], v[i])
    touched = torch.zeros(4, 16, dtype=torch.bool)
    touched[1, 1] = touched[0, 0] = touched[3, 15] = True
    assert torch.equal(k_cache[~touched], before_k[~touched])  # the padding token wrote nothing
    assert torch.equal(v_cache[~touched], before_v[~touched])


@pytest.mark.parametrize("dtype", helpers.DTYPES)
def test_strided_views(device, dtype):
    # k and v are column slices of a packed (N, Hq + 2 Hkv, D) projection; the pools are
    # interleaved in one (num_blocks, block_size, 2, Hkv, D) tensor and seen head-major.
    N, Hq, Hkv, D, bs = 9, 6, 2, 48, 16
    qkv = torch.randn(N, Hq + 2 * Hkv, D, device=device, dtype=dtype)
    k, v = qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]
    pool = torch.randn(5, 2, Hkv, bs, D, device=device, dtype=dtype)  # head-major storage
    k_cache, v_cache = pool[:, 0].transpose(1, 2), pool[:, 1].transpose(1, 2)  # (5, bs, Hkv, D)
    assert not k.is_contiguous() and not k_cache.is_contiguous()
    slots = random_slots(N, 5, bs, padding=2, dtype=torch.int32, device=device)
    wide = torch.stack([slots, torch.full_like(slots, 10**6)], 1).reshape(-1)[::2]  # stride 2
    check(k, v, k_cache, v_cache, wide)
    # the torch path on pools whose (blocks, slots) cannot merge: index_put_, exact placement
    k_cache.fill_(0.0)
    write_kv_cache(k, v, k_cache, v_cache, wide, backend="torch")
    for i, s in enumerate(wide.tolist()):
        if s >= 0:
            assert torch.equal(k_cache[s // bs, s % bs], k[i]) and torch.equal(v_cache[s // bs, s % bs], v[i])


def test_all_padding_and_empty(device):
    k_cache, v_cache = make_pools(device, torch.float16)
    before = k_cache.clone()
    k = torch.randn(3, 3, 64, device=device, dtype=torch.float16)
    write_kv_cache(k, k, k_cache, v_cache, torch.full((3,), -1, device=device))
    assert torch.equal(k_cache, before)
    assert write_kv_cache(k[:0], k[:0], k_cache, v_cache, torch.zeros(0, dtype=torch.int32, device=device)) is None
    assert torch.equal(k_cache, before)


def test_unvalidated_out_of_range_slots_are_skipped(device):
    # validate=False trusts the caller, but a slot past the pool is still never written.
    k_cache, v_cache = make_pools(device, torch.float32, num_blocks=2, block_size=16, Hkv=1, D=16)
    guard_k = torch.zeros(3, 16, 1, 16, device=device)
    big_k = torch.cat([k_cache, guard_k])  # the pool is a view of the first 2 blocks
    pool_k, pool_v = big_k[:2], v_cache
    k = torch.randn(3, 1, 16, device=device)
    slots = torch.tensor([3, 32, 40], device=device)  # 32 and 40 lie in the guard blocks
    write_kv_cache(k, k, pool_k, pool_v, slots, validate=False)
    assert torch.equal(pool_k[0, 3], k[0])
    assert torch.equal(big_k[2:], guard_k)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv_cache_reference(k, k, ref_k, ref_v, slots, validate=False)
    assert torch.equal(ref_k[0, 3], k[0])


def test_backend_torch_is_reference(device):
    k_cache, v_cache = make_pools(device, torch.float32)
    k = torch.randn(5, 3, 64, device=device)
    slots = random_slots(5, 7, 16, padding=1, device=device)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    write_kv_cache_reference(k, -k, want_k, want_v, slots)
    write_kv_cache(k, -k, k_cache, v_cache, slots, backend="torch")
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def _errors(device):
    k_cache, v_cache = make_pools(device, torch.float32, num_blocks=3, block_size=16, Hkv=2, D=8)
    k = torch.randn(4, 2, 8, device=device)
    slots = torch.tensor([0, 5, 17, -1], device=device)
    ok = dict(k=k, v=k.clone(), k_cache=k_cache, v_cache=v_cache, slot_mapping=slots)
    cases = [
        (dict(k=k[0]), ValueError, "k must have 3"),
        (dict(k_cache=k_cache[0]), ValueError, "k_cache must have 4"),
        (dict(k=k.half()), TypeError, "v has dtype float32 but k has float16"),
        (dict(k_cache=k_cache.half()), TypeError, "k_cache has dtype float16 but k"),
        (dict(k=k.long(), v=k.long()), TypeError, "k has dtype int64"),
        (dict(v=k[:, :1]), ValueError, r"v has shape \(4, 1, 8\)"),
        (dict(v_cache=v_cache[:2]), ValueError, "v_cache has shape"),
        (dict(k=torch.randn(4, 3, 8, device=device), v=torch.randn(4, 3, 8, device=device)),
         ValueError, r"k has \(heads, head dim\) \(3, 8\) but k_cache has \(2, 8\)"),
        (dict(k_cache=k_cache[:0], v_cache=v_cache[:0]), ValueError, "at least one block"),
        (dict(slot_mapping=slots.float()), TypeError, "slot_mapping has dtype float32"),
        (dict(slot_mapping=slots[None]), ValueError, "slot_mapping must have 1"),
        (dict(slot_mapping=slots[:3]), ValueError, "slot_mapping has 3 entries but k has 4 tokens"),
        (dict(slot_mapping=torch.tensor([0, 48, 1, -1], device=device)), ValueError,
         r"slot_mapping\[1\] = 48 is past the cache's 48 slots \(3 blocks x 16\)"),
        (dict(slot_mapping=torch.tensor([7, 3, -1, 7], device=device)), ValueError,
         r"slot_mapping\[0\] and slot_mapping\[3\] are both slot 7"),
        (dict(backend="cuda"), ValueError, "backend must be"),
    ]
    if device == "cpu":
        cases.append((dict(slot_mapping=slots.to("meta")), ValueError, "slot_mapping is on meta"))
    else:
        cases.append((dict(slot_mapping=slots.cpu()), ValueError, "slot_mapping is on cpu"))
    return ok, cases


@pytest.mark.parametrize("fn", [write_kv_cache, write_kv_cache_reference])
def test_errors(device, fn):
    ok, cases = _errors(device)
    for bad, exc, match in cases:
        kw = {**ok, **bad}
        if fn is write_kv_cache_reference and "backend" in kw:
            continue
        args = [kw.pop(n) for n in ("k", "v", "k_cache", "v_cache", "slot_mapping")]
        before = args[2].clone() if args[2].device.type != "meta" else None
        with pytest.raises(exc, match=match):
            fn(*args, **kw)
        if before is not None and before.shape == args[2].shape:
            assert torch.equal(args[2], before), f"{match}: the cache was written before the error"
