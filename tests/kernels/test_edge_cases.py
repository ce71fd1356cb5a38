"""Inputs at the edges, the same on every backend (issue 10, items 9 and 12).

* NaN in must be NaN out, where torch puts it: no epilogue (relu's ``tl.maximum`` returns the
  non-NaN operand) and no reference (attention's "empty row" guard) may turn it into a number.
  Rows of attention that see no key still give 0: that is masking, not NaN input.
* Zero-size inputs give the same empty result (or the same error) on both paths.

``backend=None`` runs the kernels (the interpreter on CPU, compiled on CUDA); ``"torch"`` the
reference ops.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import genfuse.kernels as K

# numpy, under the interpreter, warns about the NaN these tests feed in on purpose
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:All-NaN slice encountered:RuntimeWarning")
NAN = float("nan")
BACKENDS = [pytest.param(None, id="kernel"), pytest.param("torch", id="torch")]


def _same(out, ref, tol=1e-4):
    """Equal NaN positions (and some NaN at all), other values close."""
    assert torch.isnan(ref).any(), "the case must produce NaN on the torch side"
    torch.testing.assert_close(out.double(), ref.double(), equal_nan=True, rtol=tol, atol=tol)


def _attention_nan_cases(device):
    q = torch.randn(2, 4, 30, 16, device=device)
    k = torch.randn(2, 2, 37, 16, device=device)
    v = torch.randn(2, 2, 37, 16, device=device)
    q_nan = q.clone()
    q_nan[0, 1, 5, 3] = NAN             # one row
    k_nan = k.clone()
    k_nan[1, 0, 20, 7] = NAN            # every row of query heads 0, 1 that sees key 20
    k_inf = k.clone()
    k_inf[0, 1, 2, 0] = float("inf")    # +inf scores where q[..., 0] > 0: inf - inf = NaN
    return {"q_nan": (q_nan, k, v), "k_nan": (q, k_nan, v), "k_inf": (q, k_inf, v)}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", ["q_nan", "k_nan", "k_inf"])
def test_attention_nan_rows_match_torch(device, case, causal):
    q, k, v = _attention_nan_cases(device)[case]
    out = K.attention(q, k, v, causal=causal)
    ref = K.attention(q, k, v, causal=causal, backend="torch")
    _same(out, ref)
    # torch's own softmax puts NaN in the same rows (bottom-right mask as in the kernels)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = q.double() @ kk.double().transpose(-1, -2) / math.sqrt(16)
    if causal:
        t, s = q.shape[2], k.shape[2]
        hidden = torch.ones(t, s, dtype=torch.bool, device=device).triu(s - t + 1)
        scores = scores.masked_fill(hidden, float("-inf"))
    want = torch.softmax(scores, -1) @ vv.double()
    assert torch.equal(torch.isnan(ref).cpu(), torch.isnan(want).cpu())


def test_attention_rows_without_keys_stay_zero(device):
    # causal with T > S: the first T - S rows see no key and give 0 (lse -inf) on both paths,
    # while a NaN elsewhere still comes out NaN.
    q = torch.randn(1, 2, 9, 16, device=device)
    k, v = torch.randn(1, 2, 4, 16, device=device), torch.randn(1, 2, 4, 16, device=device)
    q[0, 0, 8, 0] = NAN
    for backend in (None, "torch"):
        out, lse = K.attention(q, k, v, causal=True, return_lse=True, backend=backend)
        assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
        assert torch.isneginf(lse[:, :, :5]).all()
        assert torch.isnan(out[0, 0, 8]).all() and not torch.isnan(out[0, 0, :8]).any()
        assert torch.isnan(lse[0, 0, 8]) and torch.isfinite(lse[0, 0, 5:8]).all()


def test_paged_attention_nan_matches_torch(device):
    pool, bs = 6, 16
    k = torch.randn(pool, bs, 1, 32, device=device)
    v = torch.randn(pool, bs, 1, 32, device=device)
    table = torch.tensor([[3, 1, 0], [5, 2, 4]], dtype=torch.int32, device=device)
    lens = torch.tensor([20, 40], dtype=torch.int32, device=device)
    q = torch.randn(2, 3, 2, 32, device=device)
    q[0, 2, 1, 4] = NAN
    k[2, 3, 0, 1] = NAN            # sequence 1's position 19: every row of it sees it
    for splits in (1, 3):
        out = K.paged_attention(q, k, v, table, lens, num_splits=splits)
        _same(out, K.paged_attention(q, k, v, table, lens, backend="torch"))


@pytest.mark.parametrize("m", [3, 40], ids=["decode_kernel", "gemm_kernel"])
@pytest.mark.parametrize("activation", K.ACTIVATIONS)
def test_linear_nan_matches_torch(device, activation, m):
    x = torch.randn(m, 24, device=device)
    w = torch.randn(20, 24, device=device) / 5
    b = torch.randn(20, device=device)
    x[1, 3] = NAN        # row 1
    b[7] = NAN           # column 7
    out = K.linear(x, w, b, activation=activation)
    _same(out, K.linear(x, w, b, activation=activation, backend="torch"))


@pytest.mark.parametrize("activation", [None, "relu", "silu", "tanh", "sigmoid", "leaky_relu"])
def test_conv_nan_matches_torch(device, activation):
    x = torch.randn(2, 3, 6, 6, device=device)
    x[1, 2, 3, 4] = NAN
    w = torch.randn(4, 3, 3, 3, device=device) / 3
    out = K.conv2d(x, w, padding=1, activation=activation)
    _same(out, K.conv2d(x, w, padding=1, activation=activation, backend="torch"))
    wt = torch.randn(3, 4, 4, 4, device=device) / 3
    out = K.conv_transpose2d(x, wt, stride=2, padding=1, activation=activation)
    _same(out, K.conv_transpose2d(x, wt, stride=2, padding=1, activation=activation, backend="torch"))


def _pointwise_nan_cases(device):
    x = torch.randn(5, 16, device=device)
    x[2, 7] = NAN                                  # row 2
    w, b = torch.randn(16, device=device), torch.randn(16, device=device)
    cos, sin = K.rope_cos_sin(8, 16, device=device)
    q = torch.randn(1, 2, 3, 16, device=device)
    q[0, 1, 2, 9] = NAN
    pos = torch.arange(3, device=device)
    xg = torch.randn(2, 8, 4, 4, device=device)
    xg[1, 5, 0, 0] = NAN                           # group 2 of sample 1
    return {
        "rms_norm": lambda be: K.rms_norm(x, w, backend=be),
        "layer_norm_residual": lambda be: K.layer_norm(x, w, b, residual=x.flip(0), backend=be)[0],
        "swiglu": lambda be: K.swiglu(x, backend=be),
        "rotary": lambda be: K.rotary_embedding(q, q[:, :1], cos, sin, pos, backend=be)[0],
        "group_norm_silu": lambda be: K.group_norm(xg, 4, activation="silu", backend=be),
    }


@pytest.mark.parametrize("case", list(_pointwise_nan_cases("cpu")))
def test_norms_and_pointwise_nan_match_torch(device, case):
    fn = _pointwise_nan_cases(device)[case]
    _same(fn(None), fn("torch"))


# --------------------------------------------------------------------------------------
# Zero-size inputs
# --------------------------------------------------------------------------------------
def _empty_cases(device):
    def r(*shape):
        return torch.randn(*shape, device=device)

    def idx(*values, shape=None):
        t = torch.tensor(values, dtype=torch.int32, device=device)
        return t.view(shape) if shape is not None else t

    cos, sin = K.rope_cos_sin(8, 16, device=device)
    no_table, no_lens = idx(shape=(0, 2)), idx()
    return {
        "attention_B0": lambda be: K.attention(r(0, 2, 3, 16), r(0, 2, 4, 16), r(0, 2, 4, 16), backend=be),
        "attention_T0_lse": lambda be: K.attention(r(1, 2, 0, 16), r(1, 2, 4, 16), r(1, 2, 4, 16),
                                                   return_lse=True, backend=be)[1],
        "paged_attention_B0": lambda be: K.paged_attention(r(0, 2, 1, 16), r(3, 4, 1, 16), r(3, 4, 1, 16),
                                                           no_table, no_lens, backend=be),
        "paged_attention_Tq0": lambda be: K.paged_attention(r(1, 2, 0, 16), r(3, 4, 1, 16), r(3, 4, 1, 16),
                                                            idx(0, 1, shape=(1, 2)), idx(1), backend=be),
        "linear_M0": lambda be: K.linear(r(2, 0, 8), r(5, 8), r(5), residual=r(2, 0, 5), backend=be),
        "linear_N0": lambda be: K.linear(r(3, 8), r(0, 8), backend=be),
        "rms_norm_M0": lambda be: K.rms_norm(r(0, 8), r(8), residual=r(0, 8), backend=be)[1],
        "layer_norm_M0": lambda be: K.layer_norm(r(2, 0, 8), None, None, backend=be),
        "rotary_B0": lambda be: K.rotary_embedding(r(0, 2, 3, 16), r(0, 1, 3, 16), cos, sin,
                                                   idx(0, 1, 2), backend=be)[0],
        "rotary_T0": lambda be: K.rotary_embedding(r(2, 2, 0, 16), r(2, 1, 0, 16), cos, sin,
                                                   idx(shape=(2, 0)), backend=be)[1],
        "swiglu_M0": lambda be: K.swiglu(r(2, 0, 8), backend=be),
        "group_norm_N0": lambda be: K.group_norm(r(0, 4, 3, 3), 2, r(4), r(4), backend=be),
        "group_norm_N0_2d": lambda be: K.group_norm(r(0, 4), 2, activation="silu", backend=be),
        "group_norm_S0": lambda be: K.group_norm(r(2, 4, 0, 3), 2, backend=be),
        "conv2d_N0": lambda be: K.conv2d(r(0, 3, 4, 4), r(2, 3, 3, 3), r(2), upsample=2, padding=1,
                                         residual=r(0, 2, 8, 8), activation="relu", backend=be),
        "conv_transpose2d_N0": lambda be: K.conv_transpose2d(r(0, 3, 4, 4), r(3, 2, 4, 4), stride=2,
                                                             padding=1, backend=be),
    }


EMPTY_CASES = list(_empty_cases("cpu"))


@pytest.mark.parametrize("case", EMPTY_CASES)
def test_zero_size_inputs_same_on_both_paths(device, case):
    fn = _empty_cases(device)[case]
    out, ref = fn(None), fn("torch")
    assert out.numel() == 0 and out.shape == ref.shape and out.dtype == ref.dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size_conv_channels_refused_on_both_paths(device, backend):
    # empty channels or images are refused by name on both paths (empty batches are not)
    with pytest.raises(ValueError, match="empty conv"):
        K.conv2d(torch.randn(1, 0, 4, 4, device=device), torch.randn(2, 0, 3, 3, device=device),
                 backend=backend)
    with pytest.raises(ValueError, match="empty transposed conv"):
        K.conv_transpose2d(torch.randn(1, 3, 0, 4, device=device), torch.randn(3, 2, 3, 3, device=device),
                           backend=backend)


def test_reference_softmax_semantics_unchanged_for_finite_rows():
    # the NaN fix must not change finite rows: attention_reference vs SDPA on plain inputs
    q, k, v = (torch.randn(1, 2, 7, 16, dtype=torch.float64) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(K.attention_reference(q, k, v), want)
