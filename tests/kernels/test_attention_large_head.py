"""attention() for head dims 257..512 (the VAE mid-block's single 512-wide head).

Above 256 the kernel splits the output columns over programs, each recomputing the
full-width scores (genfuse.kernels.attention). On CPU the interpreter runs 128-wide chunks,
so D=512 has four chunk programs per query tile and D=300 three, the last one ragged; query
and key lengths of 37 leave a ragged 5-row tile next to a full 32-row one.
"""

import pytest
import torch
from genfuse.kernels._attention import MAX_HEAD_DIM, attention, attention_reference
from helpers import DTYPES, assert_close, poisoned, to64

from genfuse.kernels import _attention as attn_mod


def _qkv(b, hq, hkv, t, s, d, dtype, device):
    q = torch.randn(b, hq, t, d, device=device, dtype=dtype)
    k = torch.randn(b, hkv, s, d, device=device, dtype=dtype)
    v = torch.randn(b, hkv, s, d, device=device, dtype=dtype)
    return q, k, v


# (B, Hq, Hkv, T, S, D, causal)
SHAPES = [
    pytest.param((1, 1, 1, 37, 37, 512, False), id="vae-like-D512"),
    pytest.param((2, 2, 2, 37, 37, 512, True), id="D512-causal-B2-H2"),
    pytest.param((1, 2, 1, 37, 37, 300, False), id="D300-GQA"),
    pytest.param((2, 1, 1, 37, 37, 300, True), id="D300-causal"),
    pytest.param((1, 2, 2, 37, 37, 288, True), id="D288-causal"),
    pytest.param((1, 1, 1, 37, 37, 320, False), id="D320"),
    pytest.param((1, 2, 1, 37, 37, 384, True), id="D384-causal-GQA"),
    pytest.param((1, 1, 1, 19, 45, 257, True), id="D257-T<S-causal"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, device):
    b, hq, hkv, t, s, d, causal = shape
    q, k, v = _qkv(b, hq, hkv, t, s, d, dtype, device)
    out = poisoned(attention, q, k, v, causal=causal)
    ref = attention_reference(*to64(q, k, v), causal=causal)
    assert out.shape == (b, hq, t, d) and out.dtype == dtype and out.is_contiguous()
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_return_lse_rows_without_keys(dtype, device):
    """T > S causal: the first T - S rows see no key (out 0, lse -inf); only one chunk
    program writes the lse, the others must not leave the poisoned NaN or a wrong value."""
    t, s, d = 37, 21, 320
    q, k, v = _qkv(1, 2, 1, t, s, d, dtype, device)
    out, lse = poisoned(attention, q, k, v, causal=True, return_lse=True)
    ref, ref_lse = attention_reference(*to64(q, k, v), causal=True, return_lse=True)
    assert lse.shape == (1, 2, t) and lse.dtype == torch.float32
    assert_close(out, ref, dtype)
    empty = torch.isneginf(ref_lse)
    assert empty.sum().item() == 2 * (t - s)
    assert torch.equal(torch.isneginf(lse).cpu(), empty)
    assert_close(lse.cpu()[~empty], ref_lse[~empty], dtype, name="lse")
    assert torch.equal(out[:, :, : t - s].float().cpu(), torch.zeros(1, 2, t - s, d))


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views_and_scale(dtype, device):
    """q/k/v read in place from one packed (B, T, 3 * H * D) projection, D = 384, a custom
    scale; v also as a view with T and D swapped in memory."""
    b, t, h, d = 1, 29, 2, 384
    qkv = torch.randn(b, t, 3 * h * d, device=device, dtype=dtype)
    q, k, v = qkv.view(b, t, 3, h, d).permute(2, 0, 3, 1, 4)       # each (B, H, T, D)
    assert not q.is_contiguous()
    out = poisoned(attention, q, k, v, scale=0.02)
    assert_close(out, attention_reference(*to64(q, k, v), scale=0.02), dtype)
    v2 = torch.randn(b, h, d, t, device=device, dtype=dtype).transpose(2, 3)   # stride_d = T
    out = poisoned(attention, q, k, v2, causal=True)
    assert_close(out, attention_reference(*to64(q, k, v2), causal=True), dtype)


def test_backends_agree(device):
    q, k, v = _qkv(1, 1, 1, 9, 13, 512, torch.float32, device)
    ref = attention_reference(*to64(q, k, v))
    assert_close(attention(q, k, v, backend="torch"), ref, torch.float32)
    assert_close(poisoned(attention, q, k, v, backend="triton"), ref, torch.float32)


@pytest.mark.parametrize("d", [513, 640, 1024])
def test_error_head_dim_too_large(d):
    assert MAX_HEAD_DIM == 512
    q, k, v = _qkv(1, 1, 1, 4, 4, d, torch.float32, "cpu")
    with pytest.raises(ValueError, match=rf"q has head dim {d}; supported head dims are 1\.\.512"):
        attention(q, k, v)
    with pytest.raises(ValueError, match=rf"head dim {d}"):
        attention(q, k, v, backend="torch")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("t", [1, 64, 4096])
def test_split_autotune_pruning(t, dtype):
    """The D > 256 autotune space keeps split candidates that fit an H100's shared memory and
    drops the tiles the sm_90 cubins showed to spill (bench/compile_check.py)."""
    kept = attn_mod._prune_configs(attn_mod._split_configs(), {"q_ptr": torch.empty(1, dtype=dtype), "T": t},
                                   HEAD_DIM=512, BLOCK_D=512)
    assert kept
    elem = torch.empty(0, dtype=dtype).element_size()
    tiles = set()
    for c in kept:
        bm, bn, dv = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_DV"]
        assert dv in (128, 256)
        # q tile + num_stages K (BLOCK_N x 512) and V (BLOCK_N x BLOCK_DV) buffers, as measured
        assert elem * (bm * 512 + c.num_stages * bn * (512 + dv)) <= 227 * 1024
        tiles.add((bm, bn, dv, c.num_warps, c.num_stages))
    if dtype == torch.float16:
        assert not any(k[:4] in {(128, 16, 128, 4), (64, 32, 256, 4)} for k in tiles)   # spill
        assert (64, 16, 256, 8, 3) in tiles
    else:
        assert (64, 16, 128, 8, 2) in tiles     # also the fallback: 208 KiB, no spills
    if t <= 64:
        assert all(k[0] == 64 for k in tiles)


# --------------------------------------------------------------------------------------
# CUDA only: the VAE mid-block itself, and a ragged split with GQA and causal T < S.
# --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 4096, 4096, 512, False), (2, 4, 2, 300, 517, 300, True),
                                   (1, 2, 2, 1031, 1031, 384, True)], ids=str)
def test_gpu_large(shape, dtype):
    b, hq, hkv, t, s, d, causal = shape
    q, k, v = _qkv(b, hq, hkv, t, s, d, dtype, "cuda")
    out, lse = poisoned(attention, q, k, v, causal=causal, return_lse=True)
    ref, ref_lse = attention_reference(*to64(q, k, v), causal=causal, return_lse=True)
    assert_close(out, ref, dtype)
    assert_close(lse.cpu(), ref_lse, dtype, name="lse")
