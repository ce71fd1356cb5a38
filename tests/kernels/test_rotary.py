"""Rotary embedding (rotate-half, partial, GQA, per-sequence positions) and its tables."""
import math

import pytest
import torch

from genfuse.bench import rotary_bench
from genfuse.kernels import _common
from genfuse.kernels import _rotary as rotary
from helpers import DTYPES, assert_close, poisoned, to64

# (B, Hq, Hkv, T, D, r): MHA, GQA 9/3 (SmolLM2), MQA, head dims 64 and 80, partial rotary.
CONFIGS = [
    (2, 4, 4, 5, 64, 64),
    (1, 9, 3, 7, 64, 64),
    (2, 6, 1, 3, 80, 80),
    (3, 8, 2, 4, 80, 32),
    (1, 3, 3, 1, 64, 48),
    (2, 20, 4, 2, 64, 64),   # more q heads than one head block
]


def _make(cfg, dtype, device, layout, pos_dim, n_pos=37):
    B, hq, hkv, T, D, r = cfg
    if layout == "packed":  # views of one (B, T, Hq + 2*Hkv, D) QKV projection
        qkv = torch.randn(B, T, hq + 2 * hkv, D, device=device, dtype=dtype)
        q = qkv[:, :, :hq].transpose(1, 2)
        k = qkv[:, :, hq:hq + hkv].transpose(1, 2)
    else:
        q = torch.randn(B, hq, T, D, device=device, dtype=dtype)
        k = torch.randn(B, hkv, T, D, device=device, dtype=dtype)
    cos, sin = rotary.rope_cos_sin(n_pos, r, 10000.0, device=device)
    shape = (B, T) if pos_dim == 2 else (T,)
    positions = torch.randint(0, n_pos, shape, device=device)
    return q, k, cos, sin, positions


def _check(q, k, cos, sin, positions, dtype, **kw):
    q_out, k_out = poisoned(rotary.rotary_embedding, q, k, cos, sin, positions, **kw)
    q_ref, k_ref = rotary.rotary_embedding_reference(*to64(q, k, cos, sin), positions.cpu())
    assert q_out.shape == q.shape and k_out.shape == k.shape
    assert q_out.dtype == k_out.dtype == dtype
    assert_close(q_out, q_ref, dtype, name="q")
    assert_close(k_out, k_ref, dtype, name="k")
    return q_out, k_out


@pytest.mark.parametrize("pos_dim", [1, 2], ids=["pos(T)", "pos(B,T)"])
@pytest.mark.parametrize("layout", ["contiguous", "packed"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "B{}-Hq{}-Hkv{}-T{}-D{}-r{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary(cfg, dtype, layout, pos_dim, device):
    q, k, cos, sin, positions = _make(cfg, dtype, device, layout, pos_dim)
    q_out, k_out = _check(q, k, cos, sin, positions, dtype)
    r = cfg[-1]
    # partial rotary: the tail is copied bit for bit
    assert torch.equal(q_out[..., r:], q[..., r:]) and torch.equal(k_out[..., r:], k[..., r:])


def test_odd_strides_int32_positions_and_strided_tables(device):
    """k transposed in its last two dims (head-dim stride != 1), strided positions and tables."""
    q = torch.randn(2, 3, 64, 5, device=device).transpose(2, 3)         # (2, 3, 5, 64), d-stride 5
    k = torch.randn(2, 5, 64, 1, device=device).permute(0, 3, 1, 2)     # (2, 1, 5, 64)
    cos_full, sin_full = rotary.rope_cos_sin(40, 128, device=device)
    cos, sin = cos_full[::2, :24], sin_full[::2, :24]                    # (20, 24) non-contiguous
    positions = torch.randint(0, 20, (2, 10), device=device, dtype=torch.int32)[:, ::2]
    _check(q, k, cos, sin, positions, torch.float32)


def test_matches_hf_rotate_half_composite(device):
    """Full rotary with rope_cos_sin tables equals transformers' apply_rotary_pos_emb."""
    q, k, cos, sin, positions = _make((2, 4, 2, 6, 64, 64), torch.float32, device, "packed", 2)
    q_hf, k_hf = rotary_bench.hf_rope(q, k, cos, sin, positions)
    q_out, k_out = rotary.rotary_embedding(q, k, cos, sin, positions)
    assert_close(q_out, q_hf, torch.float32)
    assert_close(k_out, k_hf, torch.float32)


def test_position_zero_is_identity(device):
    q, k, cos, sin, _ = _make((1, 2, 2, 3, 64, 64), torch.float32, device, "contiguous", 1)
    q_out, k_out = rotary.rotary_embedding(q, k, cos, sin, torch.zeros(3, dtype=torch.long, device=device))
    assert torch.equal(q_out, q) and torch.equal(k_out, k)


def test_empty_batch(device):
    q = torch.randn(0, 2, 3, 64, device=device)
    cos, sin = rotary.rope_cos_sin(8, 64, device=device)
    q_out, k_out = rotary.rotary_embedding(q, q, cos, sin, torch.zeros(0, 3, dtype=torch.long, device=device))
    assert q_out.shape == k_out.shape == q.shape


def test_backend_torch_is_the_reference(device):
    q, k, cos, sin, positions = _make((2, 4, 2, 3, 64, 32), torch.float32, device, "packed", 2)
    q_out, k_out = rotary.rotary_embedding(q, k, cos, sin, positions, backend="torch")
    q_ref, k_ref = rotary.rotary_embedding_reference(q, k, cos, sin, positions)
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)


@pytest.mark.skipif(not _common.INTERPRET, reason="CPU interpreter path")
def test_triton_backend_on_cpu():
    q, k, cos, sin, positions = _make((2, 4, 2, 3, 80, 64), torch.float16, "cpu", "packed", 2)
    _check(q, k, cos, sin, positions, torch.float16, backend="triton")


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------
def _freqs_by_hand(rotary_dim, theta, scaling=None):
    """A straightforward float64 re-derivation of (Llama-3 scaled) RoPE frequencies."""
    freqs = []
    for i in range(rotary_dim // 2):
        f = theta ** (-2.0 * i / rotary_dim)
        if scaling is not None:
            old = scaling["original_max_position_embeddings"]
            lo, hi, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
            wavelen = 2 * math.pi / f
            if wavelen < old / hi:                 # high frequency: untouched
                pass
            elif wavelen > old / lo:               # low frequency: stretched by factor
                f = f / factor
            else:                                  # in between: interpolate
                s = (old / wavelen - lo) / (hi - lo)
                f = (1 - s) * f / factor + s * f
        freqs.append(f)
    return torch.tensor(freqs, dtype=torch.float64)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["plain", "llama3"])
@pytest.mark.parametrize("rotary_dim,theta", [(64, 10000.0), (128, 500000.0), (32, 1e5)])
def test_rope_cos_sin(rotary_dim, theta, scaling):
    n = 3000
    cos, sin = rotary.rope_cos_sin(n, rotary_dim, theta, scaling=scaling)
    assert cos.shape == sin.shape == (n, rotary_dim // 2)
    assert cos.dtype == sin.dtype == torch.float32
    angles = torch.arange(n, dtype=torch.float64)[:, None] * _freqs_by_hand(rotary_dim, theta, scaling)
    # fp32 angles p * f carry ~p * 6e-8 rad of rounding, as in transformers.
    torch.testing.assert_close(cos.double(), angles.cos(), atol=3e-4, rtol=0)
    torch.testing.assert_close(sin.double(), angles.sin(), atol=3e-4, rtol=0)


def test_llama3_scaling_touches_all_three_bands():
    f = _freqs_by_hand(128, 500000.0)
    scaled = rotary._llama3_inv_freq(f.float(), LLAMA3).double()
    wavelen = 2 * math.pi / f
    high, low = wavelen < 8192 / 4, wavelen > 8192 / 1
    mid = ~high & ~low
    assert high.any() and low.any() and mid.any()
    torch.testing.assert_close(scaled[high], f[high], rtol=1e-6, atol=0)
    torch.testing.assert_close(scaled[low], f[low] / 8, rtol=1e-6, atol=0)
    assert ((scaled[mid] < f[mid]) & (scaled[mid] > f[mid] / 8)).all()
    torch.testing.assert_close(scaled, _freqs_by_hand(128, 500000.0, LLAMA3), rtol=1e-5, atol=0)
    # the "type" key of older HF configs is accepted too
    legacy = dict(LLAMA3, type="llama3")
    del legacy["rope_type"]
    assert torch.equal(rotary.rope_cos_sin(4, 16, scaling=legacy)[0], rotary.rope_cos_sin(4, 16, scaling=LLAMA3)[0])


def test_rope_cos_sin_errors():
    with pytest.raises(ValueError, match="max_positions must be a positive int, got 0"):
        rotary.rope_cos_sin(0, 64)
    with pytest.raises(ValueError, match="rotary_dim must be a positive even int, got 63"):
        rotary.rope_cos_sin(8, 63)
    with pytest.raises(ValueError, match="theta must be > 0, got -1"):
        rotary.rope_cos_sin(8, 64, -1.0)
    with pytest.raises(TypeError, match="scaling must be None or a dict"):
        rotary.rope_cos_sin(8, 64, scaling=8.0)
    with pytest.raises(ValueError, match="scaling has rope_type 'yarn'"):
        rotary.rope_cos_sin(8, 64, scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="scaling .llama3. is missing low_freq_factor"):
        rotary.rope_cos_sin(8, 64, scaling={k: v for k, v in LLAMA3.items() if k != "low_freq_factor"})
    with pytest.raises(ValueError, match="high_freq_factor .1.0. must exceed low_freq_factor .1.0."):
        rotary.rope_cos_sin(8, 64, scaling=dict(LLAMA3, high_freq_factor=1.0))


def test_errors(device):
    q, k, cos, sin, positions = _make((2, 4, 2, 3, 64, 32), torch.float32, device, "contiguous", 2)
    call = rotary.rotary_embedding
    with pytest.raises(ValueError, match=r"q must have 4 dimensions, got shape \(4, 3, 64\)"):
        call(q[0], k, cos, sin, positions)
    with pytest.raises(ValueError, match="k must have 4 dimensions"):
        call(q, k[0], cos, sin, positions)
    with pytest.raises(TypeError, match="k has dtype float16 but q has float32"):
        call(q, k.half(), cos, sin, positions)
    with pytest.raises(TypeError, match="q has dtype int64"):
        call(q.long(), k.long(), cos, sin, positions)
    with pytest.raises(ValueError, match="k has batch 1 but q has 2"):
        call(q, k[:1], cos, sin, positions)
    with pytest.raises(ValueError, match="k has 2 tokens .dim 2. but q has 3"):
        call(q, k[:, :, :2], cos, sin, positions)
    with pytest.raises(ValueError, match="k has head dim 48 but q has 64"):
        call(q, k[..., :48], cos, sin, positions)
    with pytest.raises(TypeError, match="cos has dtype float16"):
        call(q, k, cos.half(), sin, positions)
    with pytest.raises(ValueError, match="sin must have 2 dimensions"):
        call(q, k, cos, sin[0], positions)
    with pytest.raises(ValueError, match=r"sin has shape \(37, 8\) but cos has \(37, 16\)"):
        call(q, k, cos, sin[:, :8], positions)
    big_cos, big_sin = rotary.rope_cos_sin(8, 80, device=device)
    with pytest.raises(ValueError, match="cos has 40 columns, so the rotary dim is 80, more than q's head dim 64"):
        call(q, k, big_cos, big_sin, positions)
    with pytest.raises(ValueError, match="cos must be .max_positions, rotary_dim / 2."):
        call(q, k, cos[:, :0], sin[:, :0], positions)
    with pytest.raises(TypeError, match="positions has dtype float32"):
        call(q, k, cos, sin, positions.float())
    with pytest.raises(ValueError, match="positions must have 1 or 2 dimensions"):
        call(q, k, cos, sin, positions[None])
    with pytest.raises(ValueError, match=r"positions has shape \(2, 2\); expected \(T,\) = \(3,\) or \(B, T\) = \(2, 3\)"):
        call(q, k, cos, sin, positions[:, :2])
    with pytest.raises(ValueError, match="positions is on meta"):
        call(q, k, cos, sin, torch.zeros(3, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="backend"):
        call(q, k, cos, sin, positions, backend="gpu")


# Partial rotary widths that are not powers of two, with more heads than 2048 // width: the
# head block used to be 2048 // width itself (21 for head 80 / rotary 32) and failed to launch.
WIDE_PARTIAL = [
    (1, 32, 32, 3, 80, 32),    # Phi-2: 32 heads, head dim 80, rotary 32 (block width 96)
    (1, 16, 4, 2, 256, 32),    # head 256 / rotary 32 (width 288: cap 7)
    (1, 64, 8, 2, 41, 40),     # head 41 / rotary 40 (width 65: cap 31)
]


@pytest.mark.parametrize("cfg", WIDE_PARTIAL, ids=lambda c: "Hq{}-D{}-r{}".format(*c[1:2], *c[4:]))
@pytest.mark.parametrize("dtype", DTYPES)
def test_partial_rotary_many_heads(cfg, dtype, device):
    q, k, cos, sin, positions = _make(cfg, dtype, device, "packed", 2)
    q_out, k_out = _check(q, k, cos, sin, positions, dtype)
    r = cfg[-1]
    assert torch.equal(q_out[..., r:], q[..., r:]) and torch.equal(k_out[..., r:], k[..., r:])


@pytest.mark.parametrize("d", [16, 41, 64, 80, 96, 100, 128, 160, 256])
def test_launch_settings_blocks_are_powers_of_two(d):
    for r in range(2, d + 1, 2):
        for heads in (1, 7, 32, 64, 128):
            block_h, block_half, block_tail, _ = rotary._launch_settings(heads, 1, r // 2, d)
            for b in (block_h, block_half, block_tail):
                assert b & (b - 1) == 0, (d, r, heads, block_h, block_half, block_tail)
            width = 2 * block_half + (block_tail if d > r else 0)
            assert block_h == 1 or block_h * width <= 2048  # still about 2k elements a program


@pytest.mark.parametrize("backend", [None, "torch"], ids=["kernel", "torch"])
@pytest.mark.parametrize("pos_dim", [1, 2])
@pytest.mark.parametrize("bad", [-1, 37, 10**9])
def test_positions_outside_the_tables(device, backend, pos_dim, bad):
    # -1 used to wrap to the last row on the torch path; the kernel read outside the tables
    q, k, cos, sin, positions = _make((2, 4, 2, 3, 64, 32), torch.float32, device, "contiguous", pos_dim)
    positions[(..., 1)] = bad
    where = r"positions\[1\]" if pos_dim == 1 else r"positions\[0, 1\]"
    with pytest.raises(ValueError, match=rf"{where} = {bad} is outside \[0, 36\] \(the cos/sin tables have 37 rows\)"):
        rotary.rotary_embedding(q, k, cos, sin, positions, backend=backend)


def test_validate_false_skips_the_check(device, monkeypatch):
    q, k, cos, sin, positions = _make((2, 4, 2, 3, 64, 32), torch.float32, device, "contiguous", 2)
    want = rotary.rotary_embedding(q, k, cos, sin, positions)

    def no_sync(*tensors):
        raise AssertionError("validate=False must not reduce the positions")

    monkeypatch.setattr(_common, "min_max", no_sync)
    for backend in (None, "torch"):
        got = rotary.rotary_embedding(q, k, cos, sin, positions, validate=False, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError, match="must not reduce"):
        rotary.rotary_embedding(q, k, cos, sin, positions)


def test_rope_float_arguments_checked():
    for theta in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="theta must be"):
            rotary.rope_cos_sin(8, 16, theta)
    with pytest.raises(TypeError, match="theta must be a real number, got str"):
        rotary.rope_cos_sin(8, 16, "1e4")
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    for key, value in (("factor", 0.0), ("factor", float("inf")), ("low_freq_factor", float("nan")),
                       ("original_max_position_embeddings", -1)):
        with pytest.raises(ValueError, match=f"scaling {key} must be"):
            rotary.rope_cos_sin(8, 16, scaling=dict(llama3, **{key: value}))
