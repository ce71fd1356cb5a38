"""conv_transpose2d (sub-pixel implicit GEMM + fused bias/activation) against
F.conv_transpose2d in float64; fold_batchnorm against eval-mode BatchNorm."""
import pytest
import torch
import torch.nn.functional as F

from helpers import DTYPES, assert_close, poisoned, to64
from genfuse.kernels._conv_transpose2d import (conv_transpose2d, conv_transpose2d_reference,
                                              fold_batchnorm)


def _inputs(n, ci, h, w, co, r, s, dtype, device, *, bias=True):
    x = torch.randn(n, ci, h, w, device=device).to(dtype)
    weight = (torch.randn(ci, co, r, s, device=device) / (ci * r * s) ** 0.5).to(dtype)
    b = torch.randn(co, device=device).to(dtype) if bias else None
    return x, weight, b


def _check(x, weight, b, dtype, **kw):
    out = poisoned(conv_transpose2d, x, weight, b, **kw)
    ref = conv_transpose2d_reference(*to64(x, weight), to64(b), **kw)
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert_close(out, ref, dtype)
    return out


# (N, C_in, H, W, C_out, R, S, stride, padding, output_padding, bias, activation)
SHAPES = [
    (3, 10, 1, 1, 12, 4, 4, 1, 0, 0, True, "relu"),             # DCGAN latent 1x1 -> 4x4
    (2, 12, 4, 4, 6, 4, 4, 2, 1, 0, True, "relu"),              # DCGAN doubling 4 -> 8
    (2, 6, 9, 9, 3, 4, 4, 2, 1, 0, False, "tanh"),              # DCGAN RGB layer (18x18)
    (1, 5, 5, 6, 7, 3, 3, 3, 1, 2, True, "silu"),               # stride 3, output_padding 2
    (2, 4, 5, 5, 5, 1, 1, 2, 0, 1, False, None),                # 1x1 kernel: 3 of 4 phases tap-less
    (2, 3, 4, 5, 4, 2, 2, 3, 0, 0, True, "sigmoid"),            # stride > kernel: empty phases
    (1, 3, 6, 5, 4, 5, 5, 2, 2, 1, True, None),                 # 5x5, padding 2, output_padding
    (2, 7, 3, 4, 9, 3, 3, 4, 2, 3, True, "leaky_relu"),         # stride 4
    (3, 19, 7, 7, 17, 3, 3, 1, 1, 0, True, None),               # stride 1 = conv with flipped taps
    (1, 5, 4, 3, 33, 3, 2, (2, 1), (1, 0), (1, 0), True, "relu"),  # per-axis stride/padding
    (1, 2, 11, 13, 3, 3, 3, 2, 1, 1, True, None),               # big phases: (n, i, j) pixel order
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}Ci{}H{}W{}Co{}_{}x{}_s{}p{}op{}".format(*s[:10]))
def test_conv_transpose2d_matches_reference(shape, dtype, device):
    n, ci, h, w, co, r, s, stride, padding, op, bias, act = shape
    x, weight, b = _inputs(n, ci, h, w, co, r, s, dtype, device, bias=bias)
    _check(x, weight, b, dtype, stride=stride, padding=padding, output_padding=op, activation=act)


def test_conv_transpose2d_dcgan_latent_big_batch(device):
    # batch-fastest pixel order with whole tiles at one output position: each tile runs only
    # the single tap that lands on it
    x, weight, b = _inputs(40, 8, 1, 1, 5, 4, 4, torch.float32, device)
    out = _check(x, weight, b, torch.float32, activation="relu")
    assert out.shape == (40, 5, 4, 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_transpose2d_channels_last(dtype, device):
    x, weight, b = _inputs(2, 6, 5, 4, 5, 4, 4, dtype, device)
    x = x.to(memory_format=torch.channels_last)
    out = _check(x, weight, b, dtype, stride=2, padding=1, activation="relu")
    assert out.is_contiguous(memory_format=torch.channels_last)
    weight = weight.to(memory_format=torch.channels_last)
    _check(x, weight, b, dtype, stride=3, padding=1, output_padding=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_transpose2d_strided_views(dtype, device):
    big = torch.randn(2, 9, 10, 14, device=device).to(dtype)
    x = big[:, 1:7, 2:8, 1::3]                                       # (2, 6, 6, 5)
    weight = (torch.randn(4, 4, 3, 6, device=device) / 6).to(dtype).permute(3, 2, 0, 1)  # (6, 3, 4, 4)
    b = torch.randn(6, device=device).to(dtype)[::2]
    assert not x.is_contiguous() and not weight.is_contiguous()
    _check(x, weight, b, dtype, stride=2, padding=1, activation="silu")


def test_conv_transpose2d_nchw_output(device):
    x, weight, b = _inputs(2, 3, 4, 4, 5, 4, 4, torch.float32, device)
    assert poisoned(conv_transpose2d, x, weight, b, stride=2, padding=1).is_contiguous()


def test_conv_transpose2d_backends(device):
    x, weight, b = _inputs(2, 4, 3, 3, 5, 4, 4, torch.float32, device)
    kw = dict(stride=2, padding=1, activation="tanh")
    ref = conv_transpose2d_reference(*to64(x, weight, b), **kw)
    assert_close(conv_transpose2d(x, weight, b, backend="torch", **kw), ref, torch.float32)
    assert_close(poisoned(conv_transpose2d, x, weight, b, backend="triton", **kw), ref, torch.float32)


@pytest.mark.parametrize("conv_bias", [False, True])
def test_fold_batchnorm_transposed(conv_bias, device):
    # DCGAN block: ConvTranspose2d(bias=False) -> BatchNorm2d (eval) -> ReLU, as one kernel
    conv = torch.nn.ConvTranspose2d(6, 5, 4, stride=2, padding=1, bias=conv_bias).to(device)
    bn = torch.nn.BatchNorm2d(5).to(device).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 6, 4, 4, device=device)
    w, b = fold_batchnorm(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                          bn.eps, transposed=True)
    assert w.shape == conv.weight.shape and b.shape == (5,) and not w.requires_grad
    with torch.no_grad():
        expect = F.relu(bn(conv(x)))
    out = poisoned(conv_transpose2d, x, w, b, stride=2, padding=1, activation="relu")
    assert_close(out, expect, torch.float32)


def test_conv_transpose2d_errors(device):
    x, weight, b = _inputs(2, 3, 4, 4, 5, 4, 4, torch.float32, device)
    with pytest.raises(ValueError, match="x must have 4"):
        conv_transpose2d(x[0], weight)
    with pytest.raises(ValueError, match="weight must have 4"):
        conv_transpose2d(x, weight[0])
    with pytest.raises(ValueError, match="weight has 5 input channels but x has 3"):
        conv_transpose2d(x, torch.randn(5, 3, 4, 4, device=device))
    with pytest.raises(ValueError, match="bias has 3 elements but weight has 5"):
        conv_transpose2d(x, weight, torch.randn(3, device=device))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        conv_transpose2d(x, weight, stride=0)
    with pytest.raises(TypeError, match="stride must be an int or a pair"):
        conv_transpose2d(x, weight, stride="2")
    with pytest.raises(ValueError, match="padding must be >= 0"):
        conv_transpose2d(x, weight, padding=(1, -1))
    with pytest.raises(ValueError, match="output_padding .* must be smaller than stride"):
        conv_transpose2d(x, weight, stride=2, output_padding=2)
    with pytest.raises(ValueError, match="output_padding .* must be smaller than stride"):
        conv_transpose2d(x, weight, output_padding=1)
    with pytest.raises(ValueError, match="padding .* leaves no output"):
        conv_transpose2d(x[:, :, :1, :1], weight, padding=2)
    with pytest.raises(ValueError, match="activation must be one of"):
        conv_transpose2d(x, weight, activation="gelu")
    with pytest.raises(TypeError, match="x has dtype int32"):
        conv_transpose2d(x.int(), weight)
    with pytest.raises(TypeError, match="bias has dtype float16 but x has float32"):
        conv_transpose2d(x, weight, b.half())
    with pytest.raises(ValueError, match="weight is on meta"):
        conv_transpose2d(x, weight.to("meta"))
    with pytest.raises(ValueError, match="backend must be"):
        conv_transpose2d(x, weight, backend="cudnn")
