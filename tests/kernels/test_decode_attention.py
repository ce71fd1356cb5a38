"""paged_attention (flash-decoding over a paged KV cache) against its float64 reference."""

import pytest
import torch

import helpers
from genfuse.kernels import _decode_attention as da
from genfuse.kernels._decode_attention import paged_attention, paged_attention_reference


def make_inputs(device, dtype, *, B=3, Hq=9, Hkv=3, Tq=1, D=64, lens=(1, 37, 150), block_size=16,
                width_extra=2, garbage=-1, index_dtype=torch.int32):
    """A shuffled pool: sequence b owns cdiv(lens[b], block_size) random physical blocks; the
    table is wider than needed and holds ``garbage`` past each sequence's end."""
    n_blocks = [-(-n // block_size) for n in lens]
    pool = sum(n_blocks) + 3  # spare blocks nobody owns
    k = torch.randn(pool, block_size, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(pool, block_size, Hkv, D, device=device, dtype=dtype)
    perm = torch.randperm(pool).tolist()
    table = torch.full((B, max(n_blocks) + width_extra), garbage, dtype=index_dtype)
    for b, n in enumerate(n_blocks):
        table[b, :n] = torch.tensor(perm[:n])
        perm = perm[n:]
    q = torch.randn(B, Hq, Tq, D, device=device, dtype=dtype)
    seq_lens = torch.tensor(lens, dtype=index_dtype, device=device)
    return q, k, v, table.to(device), seq_lens


def check(q, k, v, table, seq_lens, dtype, **kw):
    out = helpers.poisoned(paged_attention, q, k, v, table, seq_lens, **kw)
    kw.pop("backend", None)
    ref = paged_attention_reference(*helpers.to64(q, k, v), table.cpu(), seq_lens.cpu(), **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    helpers.assert_close(out, ref, dtype)


CASES = {
    # name: make_inputs overrides
    "b1_len1": dict(B=1, Hq=4, Hkv=4, D=32, lens=(1,)),
    "b3_gqa3_bs16": dict(),  # SmolLM2: 9 query / 3 KV heads, D=64; lengths 1, 37, 150
    "b3_gqa3_bs32_tq3": dict(Tq=3, lens=(3, 37, 150), block_size=32),
    "mqa_hd80_bs24": dict(B=2, Hq=4, Hkv=1, D=80, lens=(53, 24), block_size=24),
    "gqa4_hd128_tq2": dict(B=2, Hq=8, Hkv=2, D=128, Tq=2, lens=(70, 2)),
    "mqa_72rows": dict(B=1, Hq=24, Hkv=1, Tq=3, D=16, lens=(41,), block_size=8),  # 2 row tiles
    "hd256_bs7": dict(B=1, Hq=2, Hkv=1, D=256, lens=(29,), block_size=7),
}


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", helpers.DTYPES)
def test_matches_reference(device, dtype, case, num_splits):
    check(*make_inputs(device, dtype, **CASES[case]), dtype, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
@pytest.mark.parametrize("dtype", helpers.DTYPES)
def test_num_splits(device, dtype, num_splits):
    # lengths 3 and 37 have fewer tiles than 7 splits: their trailing splits are empty.
    q, k, v, table, seq_lens = make_inputs(device, dtype, Tq=3, lens=(3, 37, 150))
    check(q, k, v, table, seq_lens, dtype, num_splits=num_splits)


def test_more_splits_than_blocks(device):
    q, k, v, table, seq_lens = make_inputs(device, torch.float32, B=2, lens=(5, 20), Hq=2, Hkv=1, D=16)
    check(q, k, v, table, seq_lens, torch.float32, num_splits=40)


def test_garbage_table_entries(device):
    # Entries past the end point far outside the pool: they must never be dereferenced.
    q, k, v, table, seq_lens = make_inputs(device, torch.float32, garbage=2**30, width_extra=5)
    check(q, k, v, table, seq_lens, torch.float32, num_splits=3)
    table[1, 3:] = -7
    check(q, k, v, table, seq_lens, torch.float32, num_splits=2)


@pytest.mark.parametrize("dtype", helpers.DTYPES)
def test_strided_views(device, dtype):
    B, Tq, Hq, Hkv, D, bs = 2, 3, 6, 2, 48, 16
    lens = (40, 19)
    _, k0, v0, table, seq_lens = make_inputs(device, dtype, B=B, Hq=Hq, Hkv=Hkv, D=D, Tq=Tq,
                                             lens=lens, block_size=bs, index_dtype=torch.int64)
    # q sliced from a packed (B, Tq, Hq + 2 Hkv, D) projection, (B, Hq, Tq, D) by transpose.
    qkv = torch.randn(B, Tq, Hq + 2 * Hkv, D, device=device, dtype=dtype)
    q = qkv[:, :, :Hq].transpose(1, 2)
    # k and v interleaved in one (num_blocks, block_size, 2, Hkv, D) pool.
    kv = torch.stack([k0, v0], dim=2)
    k, v = kv[:, :, 0], kv[:, :, 1]
    # a table that is a column slice of a wider one, lengths a strided slice.
    wide = torch.full((B, table.shape[1] + 4), -1, dtype=torch.int64, device=device)
    wide[:, 2:2 + table.shape[1]] = table
    lens_wide = torch.stack([seq_lens, torch.zeros_like(seq_lens)], dim=1).reshape(-1)
    args = (q, k, v, wide[:, 2:2 + table.shape[1]], lens_wide[::2])
    assert not q.is_contiguous() and not k.is_contiguous() and args[4].stride(0) == 2
    check(*args, dtype, num_splits=2)
    check(*args, dtype, num_splits=1)


def test_head_major_cache_layout(device):
    # A (num_blocks, Hkv, block_size, D) pool seen through a permute: slot and head strides swap.
    q, k, v, table, seq_lens = make_inputs(device, torch.float16, D=32)
    kh = k.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    vh = v.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    check(q, kh, vh, table, seq_lens, torch.float16, num_splits=2, scale=0.3)


def test_heuristic_splits_on_wide_table(device):
    # A 40-block table x 16 = 640 keys lets the heuristic pick 2 splits; the lengths are short.
    q, k, v, table, seq_lens = make_inputs(device, torch.float32, B=2, Hq=2, Hkv=1, D=16,
                                           lens=(45, 3), width_extra=37)
    assert da.num_splits_heuristic(2, table.shape[1] * 16) == 2
    check(q, k, v, table, seq_lens, torch.float32)


def test_num_splits_heuristic():
    h = da.num_splits_heuristic
    assert h(8, 4096, 132) == 16          # B=1, Hkv=8, 4k: capped by 256 keys per split
    assert h(8, 32768, 132) == 64         # long context: capped at 64
    assert h(64, 4096, 132) == 9          # B=8: fill ~4 programs per SM
    assert h(256, 32768, 132) == 3        # B=32
    assert h(1024, 32768, 132) == 1       # enough programs already
    assert h(1, 100, 132) == 1            # shorter than one split


def test_reference_matches_sdpa_on_gathered_cache():
    """The reference's paging + mask against independent math: SDPA on contiguous K/V."""
    q, k, v, table, seq_lens = make_inputs("cpu", torch.float64, Tq=3, lens=(3, 37, 150))
    ref = paged_attention_reference(q, k, v, table, seq_lens)
    for b, L in enumerate(seq_lens.tolist()):
        kb = torch.cat([k[table[b, i]] for i in range(-(-L // 16))])[:L].transpose(0, 1)  # (Hkv, L, D)
        vb = torch.cat([v[table[b, i]] for i in range(-(-L // 16))])[:L].transpose(0, 1)
        mask = torch.ones(3, L, dtype=torch.bool).tril(diagonal=L - 3)
        want = torch.nn.functional.scaled_dot_product_attention(
            q[b], kb.repeat_interleave(3, 0), vb.repeat_interleave(3, 0), attn_mask=mask)
        torch.testing.assert_close(ref[b], want)


def test_backend_torch_is_reference(device):
    q, k, v, table, seq_lens = make_inputs(device, torch.float32, D=32)
    out = paged_attention(q, k, v, table, seq_lens, backend="torch", scale=0.2)
    torch.testing.assert_close(out, paged_attention_reference(q, k, v, table, seq_lens, scale=0.2),
                               rtol=0, atol=0)


def test_default_backend_runs_triton_on_cpu():
    # conftest set TRITON_INTERPRET=1 on CPU machines: backend=None runs the kernels.
    if torch.cuda.is_available():
        pytest.skip("CPU-only check: a CUDA machine runs compiled kernels instead")
    assert da._common.INTERPRET
    q, k, v, table, seq_lens = make_inputs("cpu", torch.float16, B=1, lens=(33,), D=32)
    check(q, k, v, table, seq_lens, torch.float16, num_splits=2, backend="triton")
    check(q, k, v, table, seq_lens, torch.float16)


def test_empty_batch(device):
    q, k, v, table, seq_lens = make_inputs(device, torch.float32, B=1, lens=(4,), D=16)
    out = paged_attention(q[:0], k, v, table[:0], seq_lens[:0])
    assert out.shape == (0, 9, 1, 16)


def _errors(device):
    q, k, v, table, seq_lens = make_inputs(device, torch.float32, B=2, lens=(5, 9), D=16)
    ok = dict(q=q, k_cache=k, v_cache=v, block_table=table, seq_lens=seq_lens)
    cases = [
        (dict(q=q[0]), ValueError, "q must have 4"),
        (dict(k_cache=k[0]), ValueError, "k_cache must have 4"),
        (dict(v_cache=v[..., None]), ValueError, "v_cache must have 4"),
        (dict(q=q.long()), TypeError, "q has dtype int64"),
        (dict(k_cache=k.half()), TypeError, "k_cache has dtype float16 but q"),
        (dict(v_cache=v.double()), TypeError, "v_cache has dtype float64"),
        (dict(v_cache=v.half()), TypeError, "v_cache has dtype float16 but q"),
        (dict(v_cache=v[:, :, :2]), ValueError, "v_cache has shape"),
        (dict(q=torch.randn(2, 9, 1, 32, device=device)), ValueError, "q has head dim 32 but k_cache has 16"),
        (dict(q=torch.randn(2, 8, 1, 16, device=device)), ValueError, "q has 8 heads, not a multiple of k_cache's 3"),
        (dict(q=torch.randn(2, 1, 1, 512, device=device), k_cache=torch.randn(4, 16, 1, 512, device=device),
              v_cache=torch.randn(4, 16, 1, 512, device=device)), ValueError, "head dim 512"),
        (dict(block_table=table.float()), TypeError, "block_table has dtype float32"),
        (dict(block_table=table.short()), TypeError, "block_table has dtype int16"),
        (dict(block_table=table[0]), ValueError, "block_table must have 2"),
        (dict(block_table=table[:1]), ValueError, r"block_table has shape \(1, 3\)"),
        (dict(block_table=table[:, :0]), ValueError, "block_table has shape"),
        (dict(seq_lens=seq_lens.float()), TypeError, "seq_lens has dtype float32"),
        (dict(seq_lens=seq_lens[None]), ValueError, "seq_lens must have 1"),
        (dict(seq_lens=seq_lens[:1]), ValueError, r"seq_lens has shape \(1,\)"),
        (dict(num_splits=0), ValueError, "num_splits is 0"),
        (dict(num_splits=1000), ValueError, "num_splits is 1000"),
        (dict(num_splits=2.0), TypeError, "num_splits must be"),
        (dict(backend="cuda"), ValueError, "backend must be"),
    ]
    if device == "cpu":
        cases.append((dict(block_table=table.to("meta")), ValueError, "block_table is on meta"))
        cases.append((dict(seq_lens=seq_lens.to("meta")), ValueError, "seq_lens is on meta"))
        cases.append((dict(k_cache=k.to("meta")), ValueError, "k_cache is on meta"))
    else:
        cases.append((dict(seq_lens=seq_lens.cpu()), ValueError, "seq_lens is on cpu"))
        cases.append((dict(v_cache=v.cpu()), ValueError, "v_cache is on cpu"))
    return ok, cases


def test_errors(device):
    ok, cases = _errors(device)
    for bad, exc, match in cases:
        kw = {**ok, **bad}
        args = [kw.pop(n) for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens")]
        with pytest.raises(exc, match=match):
            paged_attention(*args, **kw)


def test_bf16_triton_on_cpu_refused():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check: a CUDA machine runs compiled kernels instead")
    q, k, v, table, seq_lens = make_inputs("cpu", torch.bfloat16, B=1, lens=(4,), D=16)
    with pytest.raises(TypeError, match="bfloat16"):
        paged_attention(q, k, v, table, seq_lens, backend="triton")


# --------------------------------------------------------------------------------------
# Bad indices, scales and sizes (issue 10): refused by name before any load, on both paths
# --------------------------------------------------------------------------------------
BACKENDS = [pytest.param(None, id="kernel"), pytest.param("torch", id="torch")]


def _small(device, index_dtype=torch.int64):
    # pool of 6 blocks of 16; sequence 0 uses block 0 (5 tokens), sequence 1 blocks 5, 2 (20)
    q, k, v, table, seq_lens = make_inputs(device, torch.float32, B=2, lens=(5, 20), Hq=2, Hkv=1,
                                           D=16, index_dtype=index_dtype)
    assert k.shape[0] == 6 and table.shape == (2, 4)
    return q, k, v, table, seq_lens


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry, value", [((0, 0), -1), ((1, 1), 6), ((1, 0), 10**8), ((0, 0), 2**40)])
def test_block_table_entry_out_of_range(device, backend, entry, value):
    q, k, v, table, seq_lens = _small(device)
    table[entry] = value
    with pytest.raises(ValueError, match=rf"block_table\[{entry[0]}, {entry[1]}\] = {value} is outside "
                                         r"\[0, 5\] \(k_cache has 6 blocks\)"):
        paged_attention(q, k, v, table, seq_lens, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [0, -1, 65, 10**6])
def test_seq_lens_out_of_range(device, backend, value):
    q, k, v, table, seq_lens = _small(device, torch.int32)
    seq_lens[1] = value  # the table holds 4 blocks x 16 = 64 tokens
    with pytest.raises(ValueError, match=rf"seq_lens\[1\] = {value} is outside \[1, 64\] "
                                         r"\(a sequence holds at least its 1 new token"):
        paged_attention(q, k, v, table, seq_lens, backend=backend)


def test_seq_lens_shorter_than_new_tokens(device):
    q, k, v, table, seq_lens = make_inputs(device, torch.float32, B=2, Tq=3, lens=(3, 20), Hq=2, Hkv=1, D=16)
    seq_lens[0] = 2
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = 2 is outside \[3, "):
        paged_attention(q, k, v, table, seq_lens)
    # the reference reads the lengths on the host anyway: it raises too (it used to assert)
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = 2 is outside \[3, "):
        paged_attention_reference(q, k, v, table, seq_lens)


def test_only_used_table_entries_are_checked(device):
    # entries past a sequence's end may hold anything (the engine's tables do): no error, and
    # the entry of the block a length ends in is checked, the one after it is not.
    q, k, v, table, seq_lens = _small(device)
    table[0, 1:] = -(2**40)
    table[1, 2:] = 2**40
    check(q, k, v, table, seq_lens, torch.float32)
    seq_lens[0] = 17  # now sequence 0 reads entry 1
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = -1099511627776"):
        paged_attention(q, k, v, table, seq_lens)


def test_validate_false_skips_the_check(device, monkeypatch):
    # the engine's decode step (and a CUDA graph capture) must not sync the host
    q, k, v, table, seq_lens = _small(device)
    ref = paged_attention(q, k, v, table, seq_lens)

    def no_sync(*tensors):
        raise AssertionError("validate=False must not reduce the indices")

    monkeypatch.setattr(da._common, "min_max", no_sync)
    for backend in (None, "torch"):
        out = paged_attention(q, k, v, table, seq_lens, validate=False, backend=backend)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError, match="must not reduce"):
        paged_attention(q, k, v, table, seq_lens)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale, exc, match", [
    (float("nan"), ValueError, "scale must be finite, got nan"), (float("inf"), ValueError, "finite"),
    (-1.0, ValueError, "scale must be > 0, got -1"), (0, ValueError, "scale must be > 0, got 0"),
    ("abc", TypeError, "scale must be a real number, got str 'abc'"), (True, TypeError, "got bool"),
    (torch.tensor(0.5), TypeError, "got Tensor")])
def test_scale_checked_like_attention(device, backend, scale, exc, match):
    q, k, v, table, seq_lens = _small(device)
    with pytest.raises(exc, match=match):
        paged_attention(q, k, v, table, seq_lens, scale=scale, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_both_paths(device, backend):
    q, k, v, table, seq_lens = _small(device)
    out = paged_attention(q[:0], k, v, table[:0], seq_lens[:0], backend=backend)
    assert out.shape == (0, 2, 1, 16) and out.dtype == q.dtype
    assert paged_attention_reference(q[:0], k, v, table[:0], seq_lens[:0]).shape == (0, 2, 1, 16)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_nan_in_unused_cache_slots_never_leaks(device, num_splits):
    # Slots past a sequence's end (in its last block, and the blocks it does not own) may hold
    # anything, NaN included: neither path may read them (the reference used to, 0 * NaN).
    q, k, v, table, seq_lens = make_inputs(device, torch.float32, B=3, Hq=4, Hkv=2, D=16, Tq=2,
                                           lens=(2, 21, 40), width_extra=0)
    used = torch.zeros(k.shape[:2], dtype=torch.bool, device=device)
    for b, n in enumerate(seq_lens.tolist()):
        for pos in range(n):
            used[table[b, pos // 16], pos % 16] = True
    k[~used] = float("nan")
    v[~used] = float("nan")
    for backend in (None, "torch"):
        out = paged_attention(q, k, v, table, seq_lens, num_splits=num_splits, backend=backend)
        assert torch.isfinite(out).all(), backend
    ref = paged_attention_reference(*helpers.to64(q, k.nan_to_num(), v.nan_to_num()), table.cpu(), seq_lens.cpu())
    helpers.assert_close(paged_attention(q, k, v, table, seq_lens, num_splits=num_splits), ref, torch.float32)
