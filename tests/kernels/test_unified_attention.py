"""unified_attention (prefill chunks and decodes of a flat batch over the paged cache) against
its float64 reference, and the reference against independent math."""

import pytest
import torch
import torch.nn.functional as F

import helpers
from genfuse.kernels import attention_reference
from genfuse.kernels._unified_attention import unified_attention, unified_attention_reference

from genfuse.kernels import _unified_attention as ua


def make_batch(device, dtype, seqs, *, Hq=6, Hkv=2, D=64, block_size=16, width_extra=1, garbage=-1,
               index_dtype=torch.int32):
    """``seqs`` = [(cached prefix, new queries), ...]. Sequence b owns cdiv(prefix + q_len,
    block_size) blocks at random places of a shuffled pool (a table wider than needed, holding
    ``garbage`` past each end); q holds the sequences' new tokens back to back."""
    lens = [c + t for c, t in seqs]
    n_blocks = [-(-L // block_size) for L in lens]
    pool = sum(n_blocks) + 2  # spare blocks nobody owns
    k = torch.randn(pool, block_size, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(pool, block_size, Hkv, D, device=device, dtype=dtype)
    perm = torch.randperm(pool).tolist()
    table = torch.full((len(seqs), max(n_blocks + [1]) + width_extra), garbage, dtype=index_dtype)
    for b, n in enumerate(n_blocks):
        table[b, :n] = torch.tensor(perm[:n], dtype=index_dtype)
        perm = perm[n:]
    q_lens = [t for _, t in seqs]
    q = torch.randn(sum(q_lens), Hq, D, device=device, dtype=dtype)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=index_dtype, device=device)
    return q, k, v, table.to(device), torch.tensor(lens, dtype=index_dtype, device=device), qsl


def check(q, k, v, table, seq_lens, qsl, dtype, **kw):
    out = helpers.poisoned(unified_attention, q, k, v, table, seq_lens, qsl, **kw)
    kw.pop("backend", None)
    ref = unified_attention_reference(*helpers.to64(q, k, v), table.cpu(), seq_lens.cpu(), qsl.cpu(), **kw)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    helpers.assert_close(out, ref, dtype)


CASES = {
    # name: (seqs [(prefix, q_len)], make_batch overrides)
    "decode_len1": ([(0, 1)], dict(Hq=4, Hkv=4, D=32)),
    "prefill_gqa3_bs16": ([(0, 37)], dict()),                      # several query tiles
    "chunk_after_prefix_gqa4_hd80_bs32": ([(45, 20)], dict(Hq=4, Hkv=1, D=80, block_size=32)),
    "decodes_gqa4_hd80": ([(30, 1), (0, 1), (63, 1)], dict(Hq=8, Hkv=2, D=80)),
    # all kinds in one batch: pure prefill, decode, chunk after a prefix, len-1 context,
    # a sequence with no query this step, decode at a block boundary.
    "mixed_gqa3_bs16": ([(0, 9), (33, 1), (20, 7), (0, 1), (17, 0), (47, 1)], dict()),
    "mixed_mha_bs32": ([(5, 12), (40, 1), (0, 33)], dict(Hq=2, Hkv=2, block_size=32)),
    "mixed_gqa3_bs24_hd48": ([(7, 5), (50, 1), (0, 3)], dict(Hq=3, Hkv=1, D=48, block_size=24)),
    "hd256_bs7": ([(10, 4), (3, 1)], dict(Hq=2, Hkv=1, D=256, block_size=7)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", helpers.DTYPES)
def test_matches_reference(device, dtype, case):
    seqs, kw = CASES[case]
    check(*make_batch(device, dtype, seqs, **kw), dtype)


def test_query_group_wider_than_a_tile(device):
    # 72 query heads on one KV head: two head tiles (64 + 8) per query tile.
    batch = make_batch(device, torch.float32, [(10, 2), (3, 1)], Hq=72, Hkv=1, D=16, block_size=8)
    check(*batch, torch.float32)


@pytest.mark.parametrize("max_query_len", [None, 1, 5])
def test_decode_only_tiles(device, max_query_len):
    # Decode-only: max_query_len=1 gives 16-row tiles; a loose bound (5) and none (N) stay exact.
    batch = make_batch(device, torch.float16, [(15, 1), (16, 1), (0, 1), (40, 1)], Hq=4, Hkv=1)
    check(*batch, torch.float16, max_query_len=max_query_len)
    check(*batch, torch.float16, max_query_len=max_query_len, validate=False)


def test_unvalidated_matches_validated(device):
    batch = make_batch(device, torch.float32, [(0, 9), (33, 1), (20, 7)], Hq=4, Hkv=4, D=32)
    a = unified_attention(*batch, validate=True)
    b = unified_attention(*batch, validate=False)
    c = unified_attention(*batch, validate=False, max_query_len=9)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_garbage_table_entries(device):
    # Entries past each sequence's blocks point far outside the pool: never dereferenced.
    q, k, v, table, seq_lens, qsl = make_batch(device, torch.float32, [(3, 2), (40, 1), (0, 20)],
                                               Hq=4, Hkv=2, D=32, garbage=2**30, width_extra=3)
    check(q, k, v, table, seq_lens, qsl, torch.float32)
    table[0, 1:] = -7
    check(q, k, v, table, seq_lens, qsl, torch.float32, validate=False)


@pytest.mark.parametrize("backend", [None, "torch"])
def test_unwritten_slots_hold_nan(device, backend):
    # A fresh pool is garbage (NaN here) wherever no token was written: past each sequence's
    # end in its last block, in spare blocks, behind garbage table entries. None of it may leak.
    seqs = [(3, 1), (40, 1), (0, 20), (5, 20), (17, 0)]  # two groups of unequal lengths
    q, k, v, table, seq_lens, qsl = make_batch(device, torch.float32, seqs, Hq=4, Hkv=2, D=32,
                                               garbage=0, width_extra=2)
    written = torch.zeros(k.shape[:2], dtype=torch.bool, device=device)
    for b, L in enumerate(seq_lens.tolist()):
        for j in range(L):
            written[table[b, j // 16], j % 16] = True
    ref = unified_attention_reference(*helpers.to64(q, k, v), table.cpu(), seq_lens.cpu(), qsl.cpu())
    k[~written] = float("nan")
    v[~written] = float("nan")
    out = helpers.poisoned(unified_attention, q, k, v, table, seq_lens, qsl, backend=backend)
    helpers.assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", helpers.DTYPES)
def test_strided_views(device, dtype):
    seqs = [(6, 5), (40, 1), (0, 11)]
    Hq, Hkv, D = 6, 2, 48
    _, k0, v0, table, seq_lens, qsl = make_batch(device, dtype, seqs, Hq=Hq, Hkv=Hkv, D=D,
                                                 index_dtype=torch.int64)
    N = sum(t for _, t in seqs)
    # q sliced from a packed (N, Hq + 2 Hkv, D) projection.
    qkv = torch.randn(N, Hq + 2 * Hkv, D, device=device, dtype=dtype)
    q = qkv[:, :Hq]
    # k and v interleaved in one (num_blocks, block_size, 2, Hkv, D) pool.
    kv = torch.stack([k0, v0], dim=2)
    k, v = kv[:, :, 0], kv[:, :, 1]
    # a table that is a column slice of a wider one; lengths and starts strided slices.
    wide = torch.full((len(seqs), table.shape[1] + 4), -1, dtype=torch.int64, device=device)
    wide[:, 2:2 + table.shape[1]] = table
    lens2 = torch.stack([seq_lens, torch.zeros_like(seq_lens)], 1).reshape(-1)[::2]
    qsl2 = torch.stack([qsl, torch.full_like(qsl, -5)], 1).reshape(-1)[::2]
    args = (q, k, v, wide[:, 2:2 + table.shape[1]], lens2, qsl2)
    assert not q.is_contiguous() and not k.is_contiguous() and lens2.stride(0) == 2
    check(*args, dtype)
    # q as a transposed (Hq, N, D) tensor, caches seen head-major through a permute.
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)
    kh = k0.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    vh = v0.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    check(qt, kh, vh, table, seq_lens, qsl, dtype, scale=0.3)


def test_empty(device):
    q, k, v, table, seq_lens, qsl = make_batch(device, torch.float32, [(4, 0), (0, 0)], D=16)
    assert q.shape[0] == 0
    for fn in (unified_attention, unified_attention_reference):
        out = fn(q, k, v, table, seq_lens, qsl)
        assert out.shape == (0, 6, 16)


def _gathered(cache, table, b, L, block_size):
    return torch.cat([cache[table[b, i]] for i in range(-(-L // block_size))])[:L]  # (L, Hkv, D)


def test_reference_matches_sdpa_on_gathered_cache():
    """The reference's grouping, paging and mask against independent math, one sequence at a
    time: SDPA on the sequence's contiguous K/V with an explicit bottom-right mask."""
    seqs = [(0, 9), (33, 1), (20, 7), (0, 1), (17, 0), (47, 1), (5, 7)]
    q, k, v, table, seq_lens, qsl = make_batch("cpu", torch.float64, seqs)
    ref = unified_attention_reference(q, k, v, table, seq_lens, qsl, scale=0.2)
    for b, (ctx, tq) in enumerate(seqs):
        if tq == 0:
            continue
        L = ctx + tq
        kb = _gathered(k, table, b, L, 16).transpose(0, 1).repeat_interleave(3, 0)  # (Hq, L, D)
        vb = _gathered(v, table, b, L, 16).transpose(0, 1).repeat_interleave(3, 0)
        qb = q[qsl[b]:qsl[b + 1]].transpose(0, 1)  # (Hq, tq, D)
        mask = torch.ones(tq, L, dtype=torch.bool).tril(diagonal=ctx)
        want = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=0.2).transpose(0, 1)
        torch.testing.assert_close(ref[qsl[b]:qsl[b + 1]], want)


@pytest.mark.parametrize("prefix", [0, 19])
def test_reference_matches_dense_attention(device, prefix):
    """Equal-length sequences paged into a shuffled pool give what kernels.attention gives on the
    dense (B, H, T, D) tensors with its bottom-right causal mask."""
    B, Hq, Hkv, D, T, bs = 3, 8, 2, 32, 6, 16
    S = prefix + T
    qd = torch.randn(B, Hq, T, D, dtype=torch.float64)
    kd = torch.randn(B, Hkv, S, D, dtype=torch.float64)
    vd = torch.randn(B, Hkv, S, D, dtype=torch.float64)
    want = attention_reference(qd, kd, vd, causal=True)
    nb = -(-S // bs)
    perm = torch.randperm(B * nb + 1)
    table = perm[:B * nb].view(B, nb).to(torch.int32)
    k = torch.randn(B * nb + 1, bs, Hkv, D, dtype=torch.float64)
    v = torch.randn(B * nb + 1, bs, Hkv, D, dtype=torch.float64)
    for b in range(B):
        for j in range(S):
            k[table[b, j // bs], j % bs] = kd[b, :, j]
            v[table[b, j // bs], j % bs] = vd[b, :, j]
    q = qd.transpose(1, 2).reshape(B * T, Hq, D)  # (N, Hq, D): the sequences back to back
    seq_lens = torch.full((B,), S, dtype=torch.int32)
    qsl = torch.arange(0, B * T + 1, T, dtype=torch.int32)
    ref = unified_attention_reference(q, k, v, table, seq_lens, qsl)
    torch.testing.assert_close(ref.view(B, T, Hq, D).transpose(1, 2), want)
    # and the kernel on the same pages (float32 / interpreter or GPU)
    args = [t.float().to(device) if t.is_floating_point() else t.to(device) for t in (q, k, v, table, seq_lens, qsl)]
    helpers.assert_close(unified_attention(*args).view(B, T, Hq, D).transpose(1, 2), want.float(), torch.float32)


# The torch backend (SDPA per group) on the groupings it treats apart: a lone sequence, groups of
# consecutive sequences (row views) and scattered ones (gathered rows), ragged lengths (masked,
# past-end slots zeroed), whole prompts (is_causal) and chunks after a prefix (explicit mask).
TORCH_CASES = dict(CASES, **{
    "ragged_chunks_one_group": ([(5, 4), (20, 4), (0, 4)], dict()),
    "scattered_decodes": ([(3, 1), (0, 5), (7, 1), (2, 5), (40, 1)], dict(Hq=4, Hkv=1, D=32)),
    "whole_prompts_two": ([(0, 6), (0, 6)], dict(Hq=2, Hkv=2, D=16, block_size=4)),
    "long_context_decode": ([(700, 1)], dict(Hq=9, Hkv=3, D=64)),
    # lengths 1..200: several length buckets, sorted longest first (rows gathered and scattered back)
    "decodes_in_buckets": ([(3 * i + (i % 5), 1) for i in range(40)][::-1] + [(0, 3)], dict(Hq=4, Hkv=2, D=16)),
    "equal_decodes_one_bucket": ([(33, 1)] * 5, dict(Hq=4, Hkv=2, D=16)),
})


def test_length_buckets_bound_the_padding():
    lens = [5, 400, 17, 390, 60, 61, 1, 200, 210, 205]
    buckets = ua._length_buckets(list(range(len(lens))), lens)
    assert sorted(b for bucket in buckets for b in bucket) == list(range(len(lens)))
    for bucket in buckets:
        ls = [lens[b] for b in bucket]
        assert ls == sorted(ls, reverse=True)
        assert len(ls) == 1 or len(ls) * ls[0] <= ua._TORCH_PAD_SLACK * sum(ls)
    assert len(buckets) < len(lens)  # similar lengths share a bucket


@pytest.mark.parametrize("case", list(TORCH_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_backend_matches_reference(case, dtype):
    seqs, kw = TORCH_CASES[case]
    q, k, v, table, seq_lens, qsl = make_batch("cpu", dtype, seqs, **kw)
    out = unified_attention(q, k, v, table, seq_lens, qsl, backend="torch", scale=0.4)
    ref = unified_attention_reference(*helpers.to64(q, k, v), table, seq_lens, qsl, scale=0.4)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    helpers.assert_close(out, ref, dtype, tol=2e-2 if dtype == torch.bfloat16 else None)


def test_torch_backend_scale_and_unvalidated():
    batch = make_batch("cpu", torch.float32, [(3, 4), (9, 1)], D=32)
    out = unified_attention(*batch, backend="torch", scale=0.4, validate=False)
    torch.testing.assert_close(out, unified_attention_reference(*batch, scale=0.4), rtol=1e-5, atol=1e-6)


def test_default_backend_runs_triton_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check: a CUDA machine runs compiled kernels instead")
    assert ua._common.INTERPRET
    batch = make_batch("cpu", torch.float16, [(3, 4), (9, 1)], D=32)
    check(*batch, torch.float16, backend="triton")


def test_bf16_triton_on_cpu_refused():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check: a CUDA machine runs compiled kernels instead")
    batch = make_batch("cpu", torch.bfloat16, [(3, 1)], D=16)
    with pytest.raises(TypeError, match="bfloat16"):
        unified_attention(*batch, backend="triton")


NAMES = ("q", "k_cache", "v_cache", "block_table", "seq_lens", "query_start_loc")


def _errors(device):
    # two sequences: 3 queries after 2 cached tokens, 1 decode after 8; 16-token blocks.
    q, k, v, table, seq_lens, qsl = make_batch(device, torch.float32, [(2, 3), (8, 1)], D=16)
    ok = dict(zip(NAMES, (q, k, v, table, seq_lens, qsl)))
    i32 = dict(dtype=torch.int32, device=device)
    cases = [
        (dict(q=q[0]), ValueError, "q must have 3"),
        (dict(k_cache=k[0]), ValueError, "k_cache must have 4"),
        (dict(q=q.long()), TypeError, "q has dtype int64"),
        (dict(q=q.double()), TypeError, "q has dtype float64"),
        (dict(k_cache=k.half()), TypeError, "k_cache has dtype float16 but q"),
        (dict(v_cache=v.half()), TypeError, "v_cache has dtype float16 but q"),
        (dict(v_cache=v[:, :, :1]), ValueError, "v_cache has shape"),
        (dict(q=torch.randn(4, 6, 32, device=device)), ValueError, "q has head dim 32 but k_cache has 16"),
        (dict(q=torch.randn(4, 5, 16, device=device)), ValueError, "q has 5 heads, not a multiple of k_cache's 2"),
        (dict(q=torch.randn(4, 2, 512, device=device), k_cache=torch.randn(3, 16, 2, 512, device=device),
              v_cache=torch.randn(3, 16, 2, 512, device=device)), ValueError, "head dim 512"),
        (dict(block_table=table.float()), TypeError, "block_table has dtype float32"),
        (dict(block_table=table[0]), ValueError, "block_table must have 2"),
        (dict(block_table=table[:1]), ValueError, r"block_table has shape \(1, 2\)"),
        (dict(seq_lens=seq_lens.float()), TypeError, "seq_lens has dtype float32"),
        (dict(query_start_loc=qsl[:2]), ValueError, "query_start_loc has 2 entries; expected 3"),
        (dict(query_start_loc=qsl.short()), TypeError, "query_start_loc has dtype int16"),
        (dict(seq_lens=seq_lens[:0], block_table=table[:0], query_start_loc=qsl[:1]), ValueError,
         "q has 4 tokens but seq_lens names no sequence"),
        (dict(max_query_len=2.0), TypeError, "max_query_len must be None or an int"),
        (dict(max_query_len=-1), ValueError, "max_query_len is -1"),
        (dict(scale=0.0), ValueError, "scale"),
        (dict(scale=float("nan")), ValueError, "scale"),
        (dict(scale="0.1"), TypeError, "scale"),
        (dict(backend="cuda"), ValueError, "backend must be"),
        # data-dependent (validate=True)
        (dict(query_start_loc=torch.tensor([1, 3, 4], **i32)), ValueError, r"query_start_loc\[0\] is 1"),
        (dict(query_start_loc=torch.tensor([0, 3, 5], **i32)), ValueError, r"query_start_loc\[-1\] is 5 but q has 4"),
        (dict(query_start_loc=torch.tensor([0, 5, 4], **i32)), ValueError,
         r"query_start_loc decreases: query_start_loc\[2\] = 4 < query_start_loc\[1\] = 5"),
        (dict(seq_lens=torch.tensor([-1, 9], **i32), query_start_loc=torch.tensor([0, 0, 4], **i32)),
         ValueError, r"seq_lens\[0\] is -1"),
        (dict(seq_lens=torch.tensor([2, 9], **i32)), ValueError,
         r"seq_lens\[0\] = 2 is less than sequence 0's 3 queries"),
        (dict(seq_lens=torch.tensor([5, 33], **i32)), ValueError,
         r"seq_lens\[1\] = 33 is past block_table's capacity 2 blocks x 16 = 32"),
        (dict(block_table=torch.tensor([[0, -1], [-1, 3]], **i32)), ValueError,
         r"block_table\[1, 0\] = -1 is outside the cache's 4 blocks"),
        (dict(block_table=torch.tensor([[4, 0], [1, 0]], **i32)), ValueError,
         r"block_table\[0, 0\] = 4 is outside the cache's 4 blocks"),
        (dict(max_query_len=2), ValueError, "sequence 0 has 3 queries, more than max_query_len = 2"),
    ]
    if device == "cpu":
        cases.append((dict(block_table=table.to("meta")), ValueError, "block_table is on meta"))
        cases.append((dict(query_start_loc=qsl.to("meta")), ValueError, "query_start_loc is on meta"))
        cases.append((dict(v_cache=v.to("meta")), ValueError, "v_cache is on meta"))
    else:
        cases.append((dict(seq_lens=seq_lens.cpu()), ValueError, "seq_lens is on cpu"))
    return ok, cases


@pytest.mark.parametrize("fn", [unified_attention, unified_attention_reference])
def test_errors(device, fn):
    ok, cases = _errors(device)
    assert ok["k_cache"].shape[0] == 4 and ok["block_table"].shape == (2, 2)  # the messages' numbers
    for bad, exc, match in cases:
        kw = {**ok, **bad}
        if fn is unified_attention_reference:
            if "backend" in kw:
                continue
            if match == "q has dtype float64":  # the reference takes the float64 oracle
                continue
        args = [kw.pop(n) for n in NAMES]
        with pytest.raises(exc, match=match):
            fn(*args, **kw)


def test_validate_false_skips_only_the_data_checks(device):
    ok, _ = _errors(device)
    args = [ok[n] for n in NAMES]
    # max_query_len only picks the query tile: a wrong bound, unchecked, still gives the result.
    out = unified_attention(*args, max_query_len=2, validate=False)
    torch.testing.assert_close(out, unified_attention(*args), rtol=0, atol=0)
    # ... but shapes and dtypes still are.
    with pytest.raises(ValueError, match="query_start_loc has 2 entries"):
        unified_attention(*args[:5], args[5][:2], validate=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["16bit", "fp32"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("host_block_m", [16, 64, None], ids=["rows16", "rows64", "prefill"])
def test_quick_autotune_configs_pass_the_full_pruning(monkeypatch, dtype, head_dim, host_block_m):
    # GENFUSE_AUTOTUNE=quick times a short list; every member must be a config the full mode
    # keeps for that shape class, so the quick mode never runs a tile the rules refuse.
    kw = {"BLOCK_D": head_dim, **({} if host_block_m is None else {"BLOCK_M": host_block_m})}
    space = ua._configs((64, 128)) if host_block_m is None else ua._configs()
    named = {"Q": torch.empty(0, dtype=dtype)}
    full = {ua._common.config_key(c) for c in ua._prune(space, named, **kw)}
    quick = ua._quick_configs(named["Q"].element_size(), head_dim, host_block_m)
    assert quick and set(quick) <= full
    monkeypatch.setattr(ua._common, "AUTOTUNE", "quick")
    assert [ua._common.config_key(c) for c in ua._prune(space, named, **kw)] == list(quick)
