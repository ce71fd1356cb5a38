"""SwiGLU gating against its float64 reference."""

import pytest
import torch
import torch.nn.functional as F

from genfuse.kernels import _common
from helpers import DTYPES, assert_close, poisoned, to64

from genfuse.kernels import _swiglu as swiglu

# Last dim 2N with N = 1, 7, 576 (SmolLM2 hidden), 1000, 1536 (SmolLM2 MLP), 4099 (past a
# 1024 block, prime-ish); 3-D and 4-D leading dims.
SHAPES = [(1, 2), (3, 14), (5, 1152), (2, 3, 2000), (4, 3072), (2, 2, 1, 8198), (17, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(shape, dtype, device):
    x = 3 * torch.randn(shape, device=device, dtype=dtype)   # reach silu's saturated tails
    y = poisoned(swiglu.swiglu, x)
    assert y.shape == (*shape[:-1], shape[-1] // 2) and y.dtype == dtype
    assert_close(y, swiglu.swiglu_reference(to64(x)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views(dtype, device):
    big = torch.randn(12, 3 * 100, device=device, dtype=dtype)
    views = {
        "column slice of a wider projection": big[:, 50:250],           # row stride 300
        "every other row": big[::2, :200],
        "transposed": torch.randn(64, 9, device=device, dtype=dtype).t(),   # (9, 64), col stride 9
        "permuted 3-D (copied)": torch.randn(3, 40, 5, device=device, dtype=dtype).permute(0, 2, 1),
    }
    for name, x in views.items():
        y = poisoned(swiglu.swiglu, x)
        assert_close(y, swiglu.swiglu_reference(to64(x)), dtype, name=name)


def test_matches_torch_composite(device):
    x = torch.randn(6, 256, device=device)
    assert_close(swiglu.swiglu(x), F.silu(x[:, :128]) * x[:, 128:], torch.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, in the interpreter
def test_extreme_gates_stay_finite(device):
    g = torch.tensor([[-1e4, -100.0, 0.0, 100.0, 1e4]], device=device)
    x = torch.cat([g, torch.ones_like(g)], dim=-1)
    y = swiglu.swiglu(x)
    assert torch.isfinite(y).all()
    assert_close(y, swiglu.swiglu_reference(to64(x)), torch.float32)


def test_empty_rows(device):
    assert swiglu.swiglu(torch.randn(0, 4, 16, device=device)).shape == (0, 4, 8)


def test_backend_torch_is_the_reference(device):
    x = torch.randn(3, 5, 40, device=device)
    assert torch.equal(swiglu.swiglu(x, backend="torch"), swiglu.swiglu_reference(x))


@pytest.mark.skipif(not _common.INTERPRET, reason="CPU interpreter path")
def test_triton_backend_on_cpu():
    x = torch.randn(7, 300, dtype=torch.float16)
    y = poisoned(swiglu.swiglu, x, backend="triton")
    assert_close(y, swiglu.swiglu_reference(to64(x)), torch.float16)


def test_errors(device):
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        swiglu.swiglu([1.0, 2.0])
    with pytest.raises(TypeError, match="x has dtype int32"):
        swiglu.swiglu(torch.ones(2, 4, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"x's last dimension must be even and > 0 .* got shape \(2, 7\)"):
        swiglu.swiglu(torch.randn(2, 7, device=device))
    with pytest.raises(ValueError, match=r"x's last dimension must be even .* got shape \(3, 0\)"):
        swiglu.swiglu(torch.randn(3, 0, device=device))
    with pytest.raises(ValueError, match=r"got shape \(\)"):
        swiglu.swiglu(torch.tensor(1.0, device=device))
    with pytest.raises(ValueError, match="backend"):
        swiglu.swiglu(torch.randn(2, 4, device=device), backend="cuda")
