"""attention(): the FlashAttention-2 Triton kernel against the float64 torch reference.

On CPU every Triton call runs in the interpreter, so shapes stay small; the awkward parts
(ragged blocks, bottom-right causal with T != S, padded head dims, GQA, strided views) are
what matters, not size. The gpu-marked cases at the end cover the multi-block CUDA tilings.
"""
import math

import pytest
import torch

from helpers import DTYPES, assert_close, poisoned, to64

from genfuse.kernels import _attention as attn_mod
from genfuse.kernels._attention import attention, attention_reference


def _qkv(b, hq, hkv, t, s, d, dtype, device):
    q = torch.randn(b, hq, t, d, device=device, dtype=dtype)
    k = torch.randn(b, hkv, s, d, device=device, dtype=dtype)
    v = torch.randn(b, hkv, s, d, device=device, dtype=dtype)
    return q, k, v


# (B, Hq, Hkv, T, S, D, causal)
SHAPES = [
    pytest.param((1, 1, 1, 1, 1, 64, False), id="T1-S1"),
    pytest.param((1, 1, 1, 1, 1, 64, True), id="T1-S1-causal"),
    pytest.param((2, 4, 2, 1, 37, 64, False), id="decode-S37"),
    pytest.param((2, 4, 2, 1, 37, 64, True), id="decode-S37-causal"),
    pytest.param((1, 2, 2, 217, 217, 64, True), id="T217-causal"),
    pytest.param((1, 1, 1, 217, 217, 64, False), id="T217"),
    pytest.param((1, 2, 1, 45, 19, 80, True), id="T>S-causal-D80"),
    pytest.param((1, 1, 1, 101, 67, 64, True), id="T>S-causal-multiblock"),
    pytest.param((1, 1, 1, 67, 131, 64, True), id="T<S-causal-multiblock"),
    pytest.param((1, 2, 2, 23, 70, 16, True), id="T<S-causal-D16"),
    pytest.param((1, 2, 1, 33, 40, 128, False), id="D128"),
    pytest.param((1, 2, 2, 40, 33, 96, True), id="D96-causal"),
    pytest.param((1, 1, 1, 20, 35, 160, False), id="D160"),
    pytest.param((1, 2, 1, 17, 29, 40, True), id="D40-causal"),
    pytest.param((1, 1, 1, 9, 17, 256, True), id="D256-causal"),
    pytest.param((2, 8, 2, 31, 31, 64, True), id="GQA4-causal"),
    pytest.param((1, 4, 1, 29, 53, 32, False), id="MQA"),
    pytest.param((1, 2, 1, 11, 13, 8, True), id="D8-padded-to-16"),
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
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_packed_qkv_views(causal, dtype, device):
    """q/k/v read in place from one (B, T, 3*H*D) projection: strides (3HD... , D, 3HD, 1)."""
    b, t, h, d = 2, 37, 2, 48
    qkv = torch.randn(b, t, 3 * h * d, device=device, dtype=dtype)
    q, k, v = qkv.view(b, t, 3, h, d).permute(2, 0, 3, 1, 4)       # each (B, H, T, D)
    assert not q.is_contiguous() and q.data_ptr() == qkv.data_ptr()
    out = poisoned(attention, q, k, v, causal=causal)
    assert_close(out, attention_reference(*to64(q, k, v), causal=causal), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_gqa_and_odd_strides(dtype, device):
    """GQA q/k/v split from one fused projection, k/v transposed views, a strided head dim."""
    b, t, hq, hkv, d = 1, 26, 4, 2, 32
    proj = torch.randn(b, t, (hq + 2 * hkv) * d, device=device, dtype=dtype)
    q = proj[..., : hq * d].view(b, t, hq, d).transpose(1, 2)                   # (B, Hq, T, D)
    k = proj[..., hq * d:(hq + hkv) * d].view(b, t, hkv, d).transpose(1, 2)     # (B, Hkv, T, D)
    v = proj[..., (hq + hkv) * d:].view(b, t, hkv, d).transpose(1, 2)
    out = poisoned(attention, q, k, v, causal=True)
    assert_close(out, attention_reference(*to64(q, k, v), causal=True), dtype)

    # every other element of the head dim, and k with T and D swapped in memory
    big = torch.randn(b, hq, t, 2 * d, device=device, dtype=dtype)
    q2 = big[..., ::2]                                                          # stride_d = 2
    k2 = torch.randn(b, hkv, d, t, device=device, dtype=dtype).transpose(2, 3)  # stride_d = T
    out = poisoned(attention, q2, k2, v, causal=False)
    assert_close(out, attention_reference(*to64(q2, k2, v)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t, s", [(45, 19), (19, 45), (33, 33)], ids=["T>S", "T<S", "T=S"])
def test_return_lse(t, s, dtype, device):
    q, k, v = _qkv(1, 2, 1, t, s, 80, dtype, device)
    out, lse = poisoned(attention, q, k, v, causal=True, return_lse=True)
    ref, ref_lse = attention_reference(*to64(q, k, v), causal=True, return_lse=True)
    assert lse.shape == (1, 2, t) and lse.dtype == torch.float32
    assert_close(out, ref, dtype)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse).cpu(), empty)
    assert empty.sum().item() == 2 * max(0, t - s)   # query i sees keys j <= i + S - T
    assert_close(lse.cpu()[~empty], ref_lse[~empty], dtype, name="lse")
    if t > s:  # rows that see no key output exactly 0, never NaN
        assert torch.equal(out[:, :, : t - s].float().cpu(), torch.zeros(1, 2, t - s, 80))


def test_lse_non_causal_and_scale(device):
    q, k, v = _qkv(1, 2, 2, 21, 34, 64, torch.float32, device)
    out, lse = poisoned(attention, q, k, v, scale=0.3, return_lse=True)
    ref, ref_lse = attention_reference(*to64(q, k, v), scale=0.3, return_lse=True)
    assert_close(out, ref, torch.float32)
    assert_close(lse, ref_lse, torch.float32, name="lse")
    # the default scale is 1/sqrt(D)
    assert_close(attention(q, k, v), attention_reference(*to64(q, k, v), scale=1 / math.sqrt(64)),
                 torch.float32)


def test_backends(device):
    q, k, v = _qkv(1, 2, 1, 13, 21, 64, torch.float32, device)
    ref = attention_reference(*to64(q, k, v), causal=True)
    torch_out = attention(q, k, v, causal=True, backend="torch")
    assert torch_out.device.type == device
    assert_close(torch_out, ref, torch.float32)
    # on CPU this is Triton's interpreter (conftest sets TRITON_INTERPRET=1)
    assert_close(poisoned(attention, q, k, v, causal=True, backend="triton"), ref, torch.float32)


def test_reference_runs_in_bf16_on_cpu():
    q, k, v = _qkv(1, 2, 1, 5, 7, 16, torch.bfloat16, "cpu")
    out = attention(q, k, v, causal=True, backend="torch")
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), attention_reference(*to64(q, k, v), causal=True),
                 tol=2e-2)


def test_empty_query(device):
    q, k, v = _qkv(2, 2, 1, 0, 5, 32, torch.float32, device)
    out, lse = attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == (2, 2, 0, 32) and lse.shape == (2, 2, 0)


def _bad(**over):
    shapes = dict(q=(1, 4, 8, 32), k=(1, 2, 9, 32), v=(1, 2, 9, 32))
    dtypes = dict(q=torch.float32, k=torch.float32, v=torch.float32)
    for name, val in over.items():
        if isinstance(val, torch.dtype):
            dtypes[name] = val
        else:
            shapes[name] = val
    return [torch.randn(shapes[n]).to(dtypes[n]) for n in ("q", "k", "v")]


@pytest.mark.parametrize("over, exc, match", [
    (dict(q=(4, 8, 32)), ValueError, r"q must have 4 dimensions"),
    (dict(k=(2, 9, 32)), ValueError, r"k must have 4 dimensions"),
    (dict(v=(1, 1, 2, 9, 32)), ValueError, r"v must have 4 dimensions"),
    (dict(k=(2, 2, 9, 32), v=(2, 2, 9, 32)), ValueError, r"k has batch 2 but q has batch 1"),
    (dict(k=(1, 2, 9, 64), v=(1, 2, 9, 64)), ValueError, r"k has head dim 64 but q has head dim 32"),
    (dict(v=(1, 2, 10, 32)), ValueError, r"v has shape \(1, 2, 10, 32\) but k"),
    (dict(v=(1, 2, 9, 16)), ValueError, r"v has shape"),
    (dict(k=(1, 3, 9, 32), v=(1, 3, 9, 32)), ValueError, r"q has 4 heads, not a multiple of k's 3"),
    (dict(k=(1, 0, 9, 32), v=(1, 0, 9, 32)), ValueError, r"not a multiple of k's 0"),
    (dict(k=(1, 2, 0, 32), v=(1, 2, 0, 32)), ValueError, r"k and v have 0 keys"),
    (dict(q=(1, 4, 8, 640), k=(1, 2, 9, 640), v=(1, 2, 9, 640)), ValueError, r"head dim 640"),
    (dict(k=torch.float16), TypeError, r"k has dtype float16 but q has float32"),
    (dict(v=torch.float16), TypeError, r"v has dtype float16 but q has float32"),
    (dict(q=torch.float64, k=torch.float64, v=torch.float64), TypeError, r"q has dtype float64"),
    (dict(q=torch.int32, k=torch.int32, v=torch.int32), TypeError, r"q has dtype int32"),
])
def test_errors(over, exc, match):
    q, k, v = _bad(**over)
    with pytest.raises(exc, match=match):
        attention(q, k, v)


def test_error_not_a_tensor_and_devices():
    q, k, v = _bad()
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        attention(q, k.numpy(), v)
    with pytest.raises(ValueError, match="v is on meta but q is on cpu"):
        attention(q, k, v.to("meta"))
    with pytest.raises(ValueError, match="backend must be"):
        attention(q, k, v, backend="cuda")


@pytest.mark.parametrize("scale, exc", [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                                        (float("inf"), ValueError), ("0.1", TypeError),
                                        (True, TypeError), (torch.tensor(0.1), TypeError)])
def test_error_scale(scale, exc):
    q, k, v = _bad()
    with pytest.raises(exc, match="scale must be"):
        attention(q, k, v, scale=scale)


@pytest.mark.parametrize("d", [16, 40, 64, 80, 96, 128, 160, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_autotune_pruning(d, dtype):
    """The CUDA autotune space keeps candidates for every head dim and drops the configs the
    sm_90 cubins showed to overflow shared memory or spill registers."""
    block_d = max(16, attn_mod._common.next_power_of_2(d))
    q = torch.empty(1, dtype=dtype)
    for t in (1, 64, 4096):
        kept = attn_mod._prune_configs(attn_mod._configs(), {"q_ptr": q, "T": t},
                                       HEAD_DIM=d, BLOCK_D=block_d)
        assert kept
        tiles = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}
        if d >= 64:
            assert (128, 128, 4, 3) not in tiles         # spills (D=64: 48 bytes of stack)
        if t <= 64:
            assert all(bm == 64 for bm, _, _, _ in tiles)
        if d == 256 and dtype == torch.float16:
            assert (64, 128, 8, 2) not in tiles          # 288 KiB of shared memory
            assert (64, 32, 8, 4) in tiles


# --------------------------------------------------------------------------------------
# CUDA only: shapes large enough for every autotuned tile (64/128 x 32/64/128) to see
# several full, diagonal and ragged key blocks.
# --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [
    (2, 8, 2, 1000, 1000, 128, True), (1, 4, 4, 777, 1031, 64, True), (1, 4, 1, 1031, 300, 96, True),
    (2, 16, 16, 513, 513, 64, False), (1, 2, 2, 300, 300, 256, True), (3, 2, 1, 1, 4099, 128, False),
], ids=str)
def test_gpu_large(shape, dtype):
    b, hq, hkv, t, s, d, causal = shape
    q, k, v = _qkv(b, hq, hkv, t, s, d, dtype, "cuda")
    out, lse = poisoned(attention, q, k, v, causal=causal, return_lse=True)
    ref, ref_lse = attention_reference(*to64(q, k, v), causal=causal, return_lse=True)
    assert_close(out, ref, dtype)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse).cpu(), fin)
    assert_close(lse.cpu()[fin], ref_lse[fin], dtype, name="lse")
