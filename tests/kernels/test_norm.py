"""RMSNorm / LayerNorm (+ fused residual add) against their float64 references."""
import pytest
import torch

from genfuse.kernels import _common
from genfuse.kernels import _norm as norm
from helpers import DTYPES, assert_close, poisoned, to64

# Awkward sizes: 1, odd, SmolLM2's hidden 576, not a power of two, past one 4096 block.
SHAPES = [(1, 1), (3, 7), (5, 576), (2, 3, 1000), (2, 1, 2, 4099), (33, 96)]


def _inputs(shape, dtype, device, residual):
    n = shape[-1]
    x = torch.randn(shape, device=device, dtype=dtype)
    w = (1.0 + 0.5 * torch.randn(n, device=device)).to(dtype)
    b = (0.5 * torch.randn(n, device=device)).to(dtype)
    r = torch.randn(shape, device=device, dtype=dtype) if residual else None
    return x, w, b, r


def _check(out, ref, dtype, residual):
    if residual:
        assert isinstance(out, tuple) and len(out) == 2
        assert_close(out[0], ref[0], dtype, name="y")
        assert_close(out[1], ref[1], dtype, name="h")
        assert out[1].dtype == dtype and out[1].shape == ref[1].shape
        out = out[0]
    else:
        assert_close(out, ref, dtype)
    assert out.dtype == dtype


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(shape, dtype, residual, device):
    x, w, _, r = _inputs(shape, dtype, device, residual)
    out = poisoned(norm.rms_norm, x, w, 1e-6, residual=r)
    x64, w64, r64 = to64(x, w, r)
    _check(out, norm.rms_norm_reference(x64, w64, 1e-6, residual=r64), dtype, residual)


@pytest.mark.parametrize("affine", ["wb", "w", "b", "none"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm(shape, dtype, residual, affine, device):
    x, w, b, r = _inputs(shape, dtype, device, residual)
    w = w if "w" in affine else None
    b = b if "b" in affine else None
    out = poisoned(norm.layer_norm, x, w, b, 1e-5, residual=r)
    x64, w64, b64, r64 = to64(x, w, b, r)
    _check(out, norm.layer_norm_reference(x64, w64, b64, 1e-5, residual=r64), dtype, residual)


def test_layer_norm_matches_torch(device):
    x, w, b, _ = _inputs((4, 300), torch.float32, device, False)
    ref = torch.nn.functional.layer_norm(x, (300,), w, b, 1e-5)
    assert_close(norm.layer_norm(x, w, b, 1e-5), ref, torch.float32)
    if hasattr(torch.nn.functional, "rms_norm"):
        ref = torch.nn.functional.rms_norm(x, (300,), w, 1e-6)
        assert_close(norm.rms_norm(x, w, 1e-6), ref, torch.float32)


def _strided_views(device, dtype):
    """(name, x, residual): 2-D views with row strides, column strides, and a >2-D permute."""
    big = torch.randn(10, 2 * 130, device=device, dtype=dtype)
    yield "column slice", big[:, 5:135], big[:, 130:260]                 # row stride 260
    yield "every other row", big[::2, :130], big[1::2, :130]            # row stride 520
    t = torch.randn(70, 11, device=device, dtype=dtype)
    yield "transposed", t.t(), torch.randn(70, 11, device=device, dtype=dtype).t()  # col stride 11
    p = torch.randn(3, 130, 4, device=device, dtype=dtype)
    yield "permuted 3-D (copied)", p.permute(0, 2, 1), torch.randn(4, 130, 3, device=device, dtype=dtype).permute(2, 0, 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs(dtype, device):
    for name, x, r in _strided_views(device, dtype):
        n = x.shape[-1]
        wbig = torch.randn(2 * n, device=device, dtype=dtype)
        w, b = wbig[::2], wbig[1::2]                                    # strided parameters
        x64, r64, w64, b64 = to64(x, r, w, b)
        y, h = poisoned(norm.rms_norm, x, w, residual=r)
        y_ref, h_ref = norm.rms_norm_reference(x64, w64, residual=r64)
        assert_close(y, y_ref, dtype, name=f"rms y ({name})")
        assert_close(h, h_ref, dtype, name=f"rms h ({name})")
        y = poisoned(norm.layer_norm, x, w, b)
        assert_close(y, norm.layer_norm_reference(x64, w64, b64), dtype, name=f"ln ({name})")


def test_residual_sum_is_rounded_but_norm_uses_fp32_sum(device):
    """h comes back in x's dtype; y normalizes the fp32 sum (module docstring)."""
    x, w, _, r = _inputs((4, 64), torch.float16, device, True)
    y, h = norm.rms_norm(x, w, residual=r)
    assert torch.equal(h, (x.float() + r.float()).half())
    y_ref, _ = norm.rms_norm_reference(x, w, residual=r)
    assert_close(y, y_ref.to(y.device), torch.float16, tol=1e-3)


def test_empty_rows(device):
    x = torch.randn(0, 3, 16, device=device)
    w = torch.randn(16, device=device)
    assert norm.rms_norm(x, w).shape == (0, 3, 16)
    y, h = norm.layer_norm(x, w, None, residual=x)
    assert y.shape == h.shape == (0, 3, 16)


def test_backend_torch_is_the_reference(device):
    x, w, b, r = _inputs((3, 40), torch.float32, device, True)
    y, h = norm.rms_norm(x, w, residual=r, backend="torch")
    y_ref, h_ref = norm.rms_norm_reference(x, w, residual=r)
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)
    assert torch.equal(norm.layer_norm(x, w, b, backend="torch"), norm.layer_norm_reference(x, w, b))


@pytest.mark.skipif(not _common.INTERPRET, reason="CPU interpreter path")
def test_triton_backend_on_cpu():
    x, w, b, r = _inputs((6, 50), torch.float16, "cpu", True)
    y, h = poisoned(norm.rms_norm, x, w, residual=r, backend="triton")
    y_ref, h_ref = norm.rms_norm_reference(*to64(x, w), residual=to64(r))
    assert_close(y, y_ref, torch.float16)
    assert_close(h, h_ref, torch.float16)
    y = poisoned(norm.layer_norm, x, w, b, backend="triton")
    assert_close(y, norm.layer_norm_reference(*to64(x, w, b)), torch.float16)


def test_errors(device):
    x = torch.randn(4, 8, device=device)
    w = torch.randn(8, device=device)
    with pytest.raises(TypeError, match="x"):
        norm.rms_norm(x.numpy() if device == "cpu" else x.cpu().numpy(), w)
    with pytest.raises(TypeError, match="x has dtype int64"):
        norm.rms_norm(torch.ones(4, 8, dtype=torch.int64, device=device), w)
    with pytest.raises(ValueError, match="x must have a non-empty last dimension"):
        norm.rms_norm(torch.randn(4, 0, device=device), torch.randn(0, device=device))
    with pytest.raises(ValueError, match=r"weight has shape \(7,\) but x's last dimension is 8"):
        norm.rms_norm(x, torch.randn(7, device=device))
    with pytest.raises(ValueError, match="weight must have 1 dimensions"):
        norm.rms_norm(x, torch.randn(1, 8, device=device))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        norm.rms_norm(x, None)
    with pytest.raises(TypeError, match="weight has dtype float16 but x has float32"):
        norm.rms_norm(x, w.half())
    with pytest.raises(ValueError, match=r"bias has shape \(9,\)"):
        norm.layer_norm(x, w, torch.randn(9, device=device))
    with pytest.raises(TypeError, match="bias has dtype float16"):
        norm.layer_norm(x, None, torch.randn(8, device=device, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"residual has shape \(4, 9\) but x has \(4, 8\)"):
        norm.rms_norm(x, w, residual=torch.randn(4, 9, device=device))
    with pytest.raises(TypeError, match="residual has dtype float16"):
        norm.layer_norm(x, w, None, residual=x.half())
    with pytest.raises(ValueError, match="residual is on meta"):
        norm.rms_norm(x, w, residual=torch.empty(4, 8, device="meta"))
    with pytest.raises(ValueError, match="eps must be >= 0, got -1"):
        norm.rms_norm(x, w, -1e-6)
    with pytest.raises(TypeError, match="eps must be a real number, got Tensor"):
        norm.layer_norm(x, w, None, torch.tensor(1e-5))
    with pytest.raises(ValueError, match="backend"):
        norm.rms_norm(x, w, backend="cuda")


@pytest.mark.skipif(not (_common.INTERPRET or torch.cuda.is_available()), reason="needs Triton")
def test_too_wide_rows_are_refused_by_triton(device):
    n = norm.MAX_N + 1
    x = torch.randn(1, n, device=device)
    w = torch.ones(n, device=device)
    with pytest.raises(ValueError, match=f"x has {n} columns"):
        norm.rms_norm(x, w, backend="triton")
    assert norm.rms_norm(x, w, backend="torch").shape == (1, n)
