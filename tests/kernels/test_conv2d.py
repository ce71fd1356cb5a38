"""conv2d (implicit GEMM + fused bias/activation/residual) against F.conv2d in float64."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from helpers import DTYPES, assert_close, poisoned, to64
from genfuse.kernels._conv2d import ACTIVATIONS, conv2d, conv2d_reference, fold_batchnorm


def _inputs(n, c, h, w, k, r, s, dtype, device, *, bias=True):
    x = torch.randn(n, c, h, w, device=device).to(dtype)
    weight = (torch.randn(k, c, r, s, device=device) / (c * r * s) ** 0.5).to(dtype)
    b = torch.randn(k, device=device).to(dtype) if bias else None
    return x, weight, b


def _out_hw(h, w, r, s, stride, padding, upsample):
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return (h * upsample + 2 * ph - r) // sh + 1, (w * upsample + 2 * pw - s) // sw + 1


def _check(x, weight, b, dtype, *, residual=None, **kw):
    out = poisoned(conv2d, x, weight, b, residual=residual, **kw)
    ref = conv2d_reference(*to64(x, weight), to64(b), residual=to64(residual), **kw)
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert_close(out, ref, dtype)
    return out


# (N, C, H, W, K, R, S, stride, padding, upsample, bias, activation, residual)
SHAPES = [
    (2, 3, 7, 9, 7, 3, 3, 1, 1, 1, True, None, False),          # RGB in, odd sizes
    (1, 5, 5, 5, 33, 1, 1, 1, 0, 1, True, "relu", False),       # 1x1 conv, K past a block
    (2, 19, 11, 6, 16, 3, 3, 2, 1, 1, False, "silu", True),     # stride 2, C=19
    (2, 4, 13, 13, 8, 3, 3, 2, 0, 1, True, "tanh", False),      # stride 2, no padding
    (1, 6, 5, 7, 9, 3, 3, 1, 1, 2, True, None, True),           # VAE Upsample2D + conv
    (2, 7, 4, 3, 3, 3, 3, 1, 1, 2, False, "relu", False),       # upsample, K=3 (RGB out)
    (2, 3, 6, 5, 5, 1, 3, 1, (0, 1), 1, True, "sigmoid", False),  # rectangular kernel + padding
    (1, 8, 9, 9, 12, 5, 5, 1, 2, 1, True, "leaky_relu", True),  # general 5x5
    (3, 17, 1, 1, 17, 1, 1, 1, 0, 1, True, "silu", False),      # 1x1 image
    (1, 3, 8, 8, 4, 2, 2, 2, 0, 1, False, None, False),         # patchify 2x2 s2
    (2, 6, 5, 6, 5, 3, 3, (2, 1), (1, 0), 1, True, "relu", True),  # per-axis stride/padding
    (1, 2, 3, 3, 37, 3, 3, 1, 1, 1, True, None, False),         # prime K, 3x3 image
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}C{}H{}W{}K{}_{}x{}_s{}p{}u{}".format(*s[:10]))
def test_conv2d_matches_reference(shape, dtype, device):
    n, c, h, w, k, r, s, stride, padding, up, bias, act, res = shape
    x, weight, b = _inputs(n, c, h, w, k, r, s, dtype, device, bias=bias)
    ho, wo = _out_hw(h, w, r, s, stride, padding, up)
    residual = torch.randn(n, k, ho, wo, device=device).to(dtype) if res else None
    _check(x, weight, b, dtype, residual=residual, stride=stride, padding=padding, upsample=up,
           activation=act)


@pytest.mark.parametrize("bias,activation,residual",
                         list(itertools.product([False, True], ACTIVATIONS, [False, True])))
def test_conv2d_every_epilogue(bias, activation, residual, device):
    dtype = torch.float32
    x, weight, b = _inputs(2, 3, 5, 6, 4, 3, 3, dtype, device, bias=bias)
    res = torch.randn(2, 4, 5, 6, device=device) if residual else None
    _check(x, weight, b, dtype, residual=res, padding=1, activation=activation)


def test_conv2d_negative_slope(device):
    x, weight, b = _inputs(1, 4, 5, 5, 6, 3, 3, torch.float32, device)
    _check(x, weight, b, torch.float32, padding=1, activation="leaky_relu", negative_slope=0.01)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_channels_last(dtype, device):
    x, weight, b = _inputs(2, 5, 7, 6, 9, 3, 3, dtype, device)
    x = x.to(memory_format=torch.channels_last)
    weight = weight.to(memory_format=torch.channels_last)
    res = torch.randn(2, 9, 7, 6, device=device).to(dtype).to(memory_format=torch.channels_last)
    out = _check(x, weight, b, dtype, residual=res, padding=1, activation="silu")
    # channels-last in, channels-last out (a chain of convs never converts)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # the upsample path reads channels-last too
    _check(x, weight, b, dtype, padding=1, upsample=2)


def test_conv2d_nchw_output_is_contiguous(device):
    x, weight, b = _inputs(1, 3, 5, 5, 4, 3, 3, torch.float32, device)
    assert poisoned(conv2d, x, weight, b, padding=1).is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_strided_views(dtype, device):
    # x: a channel and spatial slice of a bigger tensor; weight: a permuted (K, R, S, C) tensor;
    # bias: every other element; residual: a transposed view (H and W swapped in memory)
    big = torch.randn(2, 11, 15, 12, device=device).to(dtype)
    x = big[:, 2:9, 1:14:2, ::2]                                    # (2, 7, 7, 6)
    weight = (torch.randn(5, 3, 3, 7, device=device) / 8).to(dtype).permute(0, 3, 1, 2)  # (5, 7, 3, 3)
    b = torch.randn(10, device=device).to(dtype)[::2]
    res = torch.randn(2, 5, 6, 7, device=device).to(dtype).transpose(2, 3)   # (2, 5, 7, 6)
    assert not x.is_contiguous() and not weight.is_contiguous() and not res.is_contiguous()
    _check(x, weight, b, dtype, residual=res, padding=1, activation="relu")
    _check(x, weight, b, dtype, stride=2, padding=1)


def test_conv2d_backends(device):
    x, weight, b = _inputs(2, 3, 6, 6, 4, 3, 3, torch.float32, device)
    ref = conv2d_reference(*to64(x, weight, b), padding=1, activation="tanh")
    out_torch = conv2d(x, weight, b, padding=1, activation="tanh", backend="torch")
    out_triton = poisoned(conv2d, x, weight, b, padding=1, activation="tanh", backend="triton")
    assert_close(out_torch, ref, torch.float32)
    assert_close(out_triton, ref, torch.float32)


def test_conv2d_reference_matches_torch_upsample_modules():
    # the VAE's Upsample2D: interpolate(nearest, 2x) then a 3x3 pad-1 conv
    x = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    conv = torch.nn.Conv2d(3, 6, 3, padding=1).double()
    expect = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    got = conv2d_reference(x, conv.weight, conv.bias, padding=1, upsample=2)
    torch.testing.assert_close(got, expect)


def test_fold_batchnorm_conv(device):
    conv = torch.nn.Conv2d(5, 7, 3, padding=1).to(device)
    bn = torch.nn.BatchNorm2d(7).to(device).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 5, 6, 6, device=device)
    w, b = fold_batchnorm(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                          bn.eps, transposed=False)
    with torch.no_grad():
        expect = F.relu(bn(conv(x)))
    assert_close(poisoned(conv2d, x, w, b, padding=1, activation="relu"), expect, torch.float32)


def test_fold_batchnorm_errors():
    w = torch.randn(4, 3, 3, 3)
    stats = dict(bn_weight=torch.ones(4), bn_bias=torch.zeros(4), running_mean=torch.zeros(4),
                 running_var=torch.ones(4))
    with pytest.raises(ValueError, match="running_var has 5"):
        fold_batchnorm(w, None, **{**stats, "running_var": torch.ones(5)})
    with pytest.raises(ValueError, match="bias has 3"):
        fold_batchnorm(w, torch.zeros(3), **stats)
    with pytest.raises(ValueError, match="weight must have 4"):
        fold_batchnorm(w[0], None, **stats)
    with pytest.raises(ValueError, match="eps must be finite, got nan"):
        fold_batchnorm(w, None, **stats, eps=float("nan"))
    with pytest.raises(ValueError, match="eps must be >= 0, got -1"):
        fold_batchnorm(w, None, **stats, eps=-1)


def test_conv2d_errors(device):
    x, weight, b = _inputs(2, 3, 6, 6, 4, 3, 3, torch.float32, device)
    with pytest.raises(ValueError, match="x must have 4"):
        conv2d(x[0], weight)
    with pytest.raises(ValueError, match="weight must have 4"):
        conv2d(x, weight[..., 0])
    with pytest.raises(ValueError, match="weight has 4 input channels but x has 3"):
        conv2d(x, torch.randn(4, 4, 3, 3, device=device))
    with pytest.raises(ValueError, match="bias has 5 elements"):
        conv2d(x, weight, torch.randn(5, device=device))
    with pytest.raises(ValueError, match="bias must have 1"):
        conv2d(x, weight, b[None])
    with pytest.raises(ValueError, match="residual has shape"):
        conv2d(x, weight, residual=torch.randn(2, 4, 6, 6, device=device))      # output is 4x4
    with pytest.raises(ValueError, match="stride must be >= 1"):
        conv2d(x, weight, stride=0)
    with pytest.raises(TypeError, match="stride must be an int or a pair"):
        conv2d(x, weight, stride=(1, 2, 3))
    with pytest.raises(ValueError, match="padding must be >= 0"):
        conv2d(x, weight, padding=-1)
    with pytest.raises(TypeError, match="padding must be an int or a pair"):
        conv2d(x, weight, padding=1.5)
    with pytest.raises(ValueError, match="upsample must be a positive int"):
        conv2d(x, weight, upsample=0)
    with pytest.raises(ValueError, match="kernel 7x7 is larger"):
        conv2d(x, torch.randn(4, 3, 7, 7, device=device))
    with pytest.raises(ValueError, match="activation must be one of"):
        conv2d(x, weight, activation="gelu")
    with pytest.raises(TypeError, match="x has dtype int64"):
        conv2d(x.long(), weight)
    with pytest.raises(TypeError, match="weight has dtype float16 but x has float32"):
        conv2d(x, weight.half())
    with pytest.raises(TypeError, match="residual has dtype float16"):
        conv2d(x, weight, padding=1, residual=torch.randn(2, 4, 6, 6, device=device).half())
    with pytest.raises(ValueError, match="weight is on meta"):
        conv2d(x, weight.to("meta"))
    with pytest.raises(ValueError, match="bias is on meta"):
        conv2d(x, weight, b.to("meta"))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        conv2d(x.tolist(), weight)
    with pytest.raises(ValueError, match="backend must be"):
        conv2d(x, weight, backend="cudnn")


@pytest.mark.parametrize("backend", [None, "torch"], ids=["kernel", "torch"])
@pytest.mark.parametrize("slope, exc, match", [
    (float("nan"), ValueError, "negative_slope must be finite, got nan"),
    (float("-inf"), ValueError, "negative_slope must be finite, got -inf"),
    ("0.2", TypeError, "negative_slope must be a real number, got str"),
    (None, TypeError, "negative_slope must be a real number, got NoneType")])
def test_negative_slope_checked(device, backend, slope, exc, match):
    # checked on both convs and both paths, before the kernel turns it into garbage (NaN slope)
    # or float() fails on it with a message naming nothing
    from genfuse.kernels._conv_transpose2d import conv_transpose2d
    x, weight, _ = _inputs(1, 3, 4, 4, 4, 3, 3, torch.float32, device)
    with pytest.raises(exc, match=match):
        conv2d(x, weight, activation="leaky_relu", negative_slope=slope, backend=backend)
    with pytest.raises(exc, match=match):
        conv_transpose2d(x, weight.transpose(0, 1), negative_slope=slope, backend=backend)
    if backend is None:  # any finite slope is fine, negative or above 1 included (as torch's)
        for ok in (-0.5, 3, 0):
            _check(x, weight, None, torch.float32, activation="leaky_relu", negative_slope=ok)
