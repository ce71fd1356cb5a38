"""linear: act(x @ W.T + b) + r, both kernels (M <= 16 decode, M > 16 tiled GEMM), against a
float64 reference; on CPU through Triton's interpreter."""
import itertools

import pytest
import torch

from helpers import DTYPES, assert_close, poisoned, rel_error, to64

from genfuse.kernels._linear import ACTIVATIONS, SMALL_M, linear, linear_reference


def _make(m, n, k, dtype, device, *, bias=True, residual=True, lead=None):
    """x (*lead, k) or (m, k), weight (n, k) scaled so outputs are O(1), bias (n,), residual."""
    xshape = (*lead, k) if lead else (m, k)
    x = torch.randn(xshape, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    r = torch.randn((*xshape[:-1], n), device=device).to(dtype) if residual else None
    return x, w, b, r


def _check(x, w, b=None, r=None, activation=None, dtype=None, **kw):
    out = poisoned(linear, x, w, b, activation=activation, residual=r, backend=kw.get("backend"))
    x64, w64, b64, r64 = to64(x, w, b, r)
    ref = linear_reference(x64, w64, b64, activation=activation, residual=r64)
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert_close(out, ref, dtype or x.dtype)
    return out


# --------------------------------------------------------------------------------------
# shapes x dtypes (each shape runs one epilogue from a rotating sample)
# --------------------------------------------------------------------------------------
SHAPES = [(1, 1, 1), (1, 37, 53), (5, 123, 123), (16, 64, 80), (17, 65, 33), (130, 97, 200)]
_SAMPLE = [(None, False, False), ("gelu_tanh", True, True), ("relu", True, False),
           ("silu", False, True), ("gelu", True, True), ("tanh", True, True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mnk", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes(mnk, dtype, device):
    m, n, k = mnk
    act, has_b, has_r = _SAMPLE[SHAPES.index(mnk) % len(_SAMPLE)]
    x, w, b, r = _make(m, n, k, dtype, device, bias=has_b, residual=has_r)
    _check(x, w, b, r, act)
    _check(x, w)  # and plain, on every shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_3d_input(dtype, device):
    x, w, b, r = _make(None, 48, 48, dtype, device, lead=(2, 7))  # M = 14: decode kernel
    out = _check(x, w, b, r, "silu")
    assert out.shape == (2, 7, 48)
    x, w, b, r = _make(None, 40, 24, dtype, device, lead=(3, 7))  # M = 21: tiled GEMM
    _check(x, w, b, r, "gelu_tanh")


# --------------------------------------------------------------------------------------
# every activation x bias x residual, on one shape per kernel
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mnk", [(3, 40, 72), (40, 36, 48)], ids=["decode", "gemm"])
@pytest.mark.parametrize("dtype", DTYPES[:2])
def test_epilogue_cross(mnk, dtype, device):
    m, n, k = mnk
    x, w, b, r = _make(m, n, k, dtype, device)
    for act, has_b, has_r in itertools.product(ACTIVATIONS, (False, True), (False, True)):
        _check(x, w, b if has_b else None, r if has_r else None, act)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy, in the interpreter
@pytest.mark.parametrize("act", ["tanh", "gelu_tanh", "silu", "gelu"])
def test_activation_saturation(act, device):
    """Large pre-activations (|y| up to ~100) must saturate, not overflow into NaN."""
    x, w, b, _ = _make(20, 33, 40, torch.float32, device, residual=False)
    _check(x * 30, w, b, None, act)
    _check(x[:2] * 30, w, b, None, act)


# --------------------------------------------------------------------------------------
# strided operands: no hidden copies needed for any of these
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [4, 33], ids=["decode", "gemm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_views(m, dtype, device):
    n, k = 40, 56
    x, _, b, r = _make(m, n, k, dtype, device)
    qkv = (torch.randn(3 * n, k, device=device) / k**0.5).to(dtype)
    _check(x, qkv[n:2 * n], b, r, "gelu")                        # the k rows of a fused QKV weight
    wt = (torch.randn(n, k, device=device) / k**0.5).to(dtype).t().contiguous().t()
    assert wt.stride() == (1, n)
    _check(x, wt, b, r, "relu")                                   # column-major weight
    wide = (torch.randn(n, 2 * k, device=device) / k**0.5).to(dtype)
    _check(x, wide[:, ::2], None, r, None)                        # stride 2 along K


@pytest.mark.parametrize("m", [6, 45], ids=["decode", "gemm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_input_views(m, dtype, device):
    n, k = 36, 50
    _, w, _, _ = _make(m, n, k, dtype, device)
    packed = torch.randn(m, 3 * k, device=device).to(dtype)
    x = packed[:, k:2 * k]                                           # a slice of a packed projection
    xt = torch.randn(k, m, device=device).to(dtype).t()              # transposed view, stride (1, m)
    rt = torch.randn(n, m, device=device).to(dtype).t()              # transposed residual
    b = torch.randn(2 * n, device=device).to(dtype)[::2]             # strided bias
    _check(x, w, b, rt, "silu")
    _check(xt, w, b, rt, "tanh")
    _check(x[::2], w, None, None, "gelu_tanh")                       # every other row


@pytest.mark.parametrize("dtype", DTYPES[:2])
def test_3d_views(dtype, device):
    n, k = 24, 32
    _, w, b, _ = _make(1, n, k, dtype, device)
    big = torch.randn(2, 9, 2 * k, device=device).to(dtype)
    _check(big[:, :, :k], w, b, None, "relu")                        # collapsible: a view, no copy
    _check(big[:, :7, :k], w, b, torch.randn(2, 7, n, device=device).to(dtype), "gelu")  # copy path
    _check(big[:1, :5, :k].expand(4, 5, k), w, None, None, None)    # broadcast batch: copy path
    r = torch.randn(n, 5, 4, device=device).to(dtype).permute(2, 1, 0)  # (4, 5, n), non-collapsible
    _check(big[:1, :5, :k].expand(4, 5, k), w, b, r, "silu")


def test_one_dim_and_empty(device):
    x, w, b, _ = _make(1, 20, 16, torch.float32, device, residual=False)
    out = _check(x[0], w, b, None, "relu")
    assert out.shape == (20,)
    for xshape in [(0, 16), (2, 0, 16)]:
        out = linear(torch.randn(xshape, device=device), w, b, activation="gelu")
        assert out.shape == (*xshape[:-1], 20)
    out = linear(torch.randn(5, 16, device=device), torch.randn(0, 16, device=device))
    assert out.shape == (5, 0)


def test_boundary_between_kernels(device):
    """M = 16 is the last decode row count, M = 17 the first GEMM one: both exact."""
    for m in (SMALL_M, SMALL_M + 1):
        x, w, b, r = _make(m, 30, 70, torch.float32, device)
        _check(x, w, b, r, "gelu_tanh")


# --------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backend_torch_is_reference(dtype):
    x, w, b, r = _make(6, 20, 12, dtype, "cpu")
    out = linear(x, w, b, activation="silu", residual=r, backend="torch")
    assert torch.equal(out, linear_reference(x, w, b, activation="silu", residual=r))
    assert out.dtype == dtype


def test_backend_triton_explicit(device):
    x, w, b, r = _make(19, 20, 12, torch.float32, device)
    out = poisoned(linear, x, w, b, activation="tanh", residual=r, backend="triton")
    ref = linear(x, w, b, activation="tanh", residual=r, backend="torch")
    tol = 1e-5 if device == "cpu" else 5e-3  # tf32 dots on the GPU
    assert rel_error(out, ref) < tol


# --------------------------------------------------------------------------------------
# errors name the argument and carry the numbers
# --------------------------------------------------------------------------------------
def test_errors():
    x, w, b, r = _make(4, 6, 8, torch.float32, "cpu")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        linear([[1.0]], w)
    with pytest.raises(ValueError, match="x must have at least 1"):
        linear(torch.tensor(1.0), w)
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        linear(x, w[0])
    with pytest.raises(ValueError, match=r"x has 7 input features.*K=8"):
        linear(x[:, :7], w)
    with pytest.raises(ValueError, match="K=0"):
        linear(torch.randn(4, 0), torch.randn(6, 0))
    with pytest.raises(ValueError, match=r"bias must have 1 dimensions"):
        linear(x, w, b[None])
    with pytest.raises(ValueError, match=r"bias has shape \(5,\), expected \(6,\)"):
        linear(x, w, b[:5])
    with pytest.raises(ValueError, match=r"residual has shape \(4, 5\), expected the output's \(4, 6\)"):
        linear(x, w, residual=r[:, :5])
    with pytest.raises(ValueError, match=r"residual has shape \(6, 4\)"):
        linear(x, w, residual=r.t())  # broadcastable is not enough: exactly the output's shape
    with pytest.raises(ValueError, match=r"activation must be one of .*'gelu_tanh'.*got 'swish'"):
        linear(x, w, activation="swish")
    with pytest.raises(TypeError, match="weight has dtype float16 but x has float32"):
        linear(x, w.half())
    with pytest.raises(TypeError, match="bias has dtype float64"):
        linear(x, w, b.double())
    with pytest.raises(TypeError, match="residual has dtype float16"):
        linear(x, w, residual=r.half())
    with pytest.raises(TypeError, match="x has dtype int32"):
        linear(x.int(), w.int())
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        linear(x, w.to("meta"))
    with pytest.raises(ValueError, match="backend must be"):
        linear(x, w, backend="cuda")


def test_bf16_on_cpu_triton_refuses():
    x, w, _, _ = _make(4, 6, 8, torch.bfloat16, "cpu", bias=False, residual=False)
    from genfuse.kernels import _common
    if _common.INTERPRET:
        with pytest.raises(TypeError, match="bfloat16"):
            linear(x, w, backend="triton")


# --------------------------------------------------------------------------------------
# the CUDA tuning space, checked on any machine (limits: the device's, or H100 numbers)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tuning_space(dtype, device):
    from genfuse.kernels import _linear as mod

    x = torch.empty(1, dtype=dtype, device=device)
    smem, sms = mod._device_limits(x.device.index or 0)
    e = x.element_size()
    for m_bucket, n, k in [(32, 17, 1), (64, 65, 33), (4096, 4096, 4096), (8192, 14336, 4096)]:
        keep = mod._prune_gemm(mod._gemm_configs(), {"x_ptr": x, "M_BUCKET": m_bucket, "N": n, "K": k})
        assert keep
        for c in keep:
            kw = c.kwargs
            assert c.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * e <= smem
            assert kw["BLOCK_M"] * kw["BLOCK_N"] <= 4096 * c.num_warps  # accumulator registers
    for n, k in [(1, 1), (100, 64), (4096, 4096), (14336, 4096), (4096, 14336)]:
        keep = mod._prune_small_m(mod._small_m_configs(), {"x_ptr": x, "N": n, "K": k})
        assert keep
        for c in keep:
            grid = -(-n // c.kwargs["BLOCK_N"])
            assert grid * 4 >= sms * 3 or c.kwargs["BLOCK_N"] == 16  # fills the SMs, or cannot
            assert c.num_stages * (SMALL_M + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * e <= smem


# --------------------------------------------------------------------------------------
# GPU: sizes big enough to exercise the tuned tiles (skipped on CPU)
# --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mnk", [(1, 4096, 4096), (16, 4104, 1000), (333, 1030, 517), (1024, 2048, 768)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_tuned(mnk, dtype, device):
    m, n, k = mnk
    x, w, b, r = _make(m, n, k, dtype, device)
    _check(x, w, b, r, "gelu_tanh")
    _check(x, w)


# --------------------------------------------------------------------------------------
