"""Benchmark cases for conv_transpose2d (sub-pixel implicit GEMM + fused bias / activation).

``flops = 2 * N * H * W * C_in * C_out * R * S`` (every input pixel meets every tap once);
``bytes`` counts x, weight, bias read and the output written once. The 1x1 latent projection
and the RGB layer move more bytes than their FLOPs take: reported as memory-bound (flops=0,
``meta["conv_flops"]``).

Full shapes are the PyTorch-tutorial DCGAN generator at batch 256 (nz=100, ngf=64): the
latent projection 100 -> 512 (k4 s1 p0, 1x1 -> 4x4), the k4 s2 p1 doublings 512 -> 256 ->
128 -> 64, each followed by BatchNorm + ReLU (eval-mode BN folded into weight and bias, so
the fused epilogue is bias + relu), and the 64 -> 3 RGB layer with tanh and no bias.

genfuse runs on channels-last activations. Baselines: ``F.conv_transpose2d`` (cuDNN) followed
by the separate activation, on NCHW and on channels-last tensors, and the same composite
under ``torch.compile`` on CUDA.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from genfuse.kernels._conv_transpose2d import conv_transpose2d

from .harness import Case, flops_if_compute_bound


_TOL = {torch.float32: 5e-3, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _composite(x, w, b, stride: int, padding: int, activation):
    """What a user writes: cuDNN transposed conv (+ bias), then the activation."""
    y = F.conv_transpose2d(x, w, b, stride=stride, padding=padding)
    if activation == "relu":
        y = F.relu(y)
    elif activation == "tanh":
        y = torch.tanh(y)
    return y


def cases(device: str, dtype: torch.dtype, size: str) -> List[Case]:
    # (name, N, C_in, H, W, C_out, kernel, stride, padding, bias, activation)
    if size == "full":
        shapes = [
            ("dcgan latent 1x1->4x4", 256, 100, 1, 1, 512, 4, 1, 0, True, "relu"),
            ("dcgan 4x4->8x8", 256, 512, 4, 4, 256, 4, 2, 1, True, "relu"),
            ("dcgan 8x8->16x16", 256, 256, 8, 8, 128, 4, 2, 1, True, "relu"),
            ("dcgan 16x16->32x32", 256, 128, 16, 16, 64, 4, 2, 1, True, "relu"),
            ("dcgan rgb 32x32->64x64", 256, 64, 32, 32, 3, 4, 2, 1, False, "tanh"),
        ]
    else:
        shapes = [
            ("smoke latent 1x1->4x4", 3, 10, 1, 1, 12, 4, 1, 0, True, "relu"),
            ("smoke 4x4->8x8", 2, 12, 4, 4, 6, 4, 2, 1, True, "relu"),
            ("smoke rgb", 2, 6, 8, 8, 3, 4, 2, 1, False, "tanh"),
        ]
    compiled = torch.compile(_composite, dynamic=False) if device == "cuda" else None

    out: List[Case] = []
    for name, n, ci, h, w, co, k, st, pad, has_bias, act in shapes:
        x = torch.randn(n, ci, h, w, device=device, dtype=dtype)
        wt = (torch.randn(ci, co, k, k, device=device) / (ci * k * k / st**2) ** 0.5).to(dtype)
        b = (0.1 * torch.randn(co, device=device)).to(dtype) if has_bias else None
        ho, wo = (h - 1) * st - 2 * pad + k, (w - 1) * st - 2 * pad + k
        cl = torch.channels_last
        x_cl, w_cl = x.to(memory_format=cl), wt.to(memory_format=cl)
        nbytes = (x.numel() + wt.numel() + co * has_bias + n * co * ho * wo) * x.element_size()
        conv_flops = 2.0 * n * h * w * ci * co * k * k
        baselines = {
            "F.conv_transpose2d NCHW":
                lambda x=x, w=wt, b=b, s=st, p=pad, a=act: _composite(x, w, b, s, p, a),
            "F.conv_transpose2d channels_last":
                lambda x=x_cl, w=w_cl, b=b, s=st, p=pad, a=act: _composite(x, w, b, s, p, a),
        }
        if compiled is not None:
            baselines["torch.compile"] = \
                lambda x=x_cl, w=w_cl, b=b, s=st, p=pad, a=act: compiled(x, w, b, s, p, a)
        out.append(Case(
            kernel="conv_transpose2d",
            name=f"{name} N{n} {ci}->{co} k{k} s{st} p{pad}" + (f" +{act}" if act else ""),
            genfuse=lambda x=x_cl, w=w_cl, b=b, s=st, p=pad, a=act:
                conv_transpose2d(x, w, b, stride=s, padding=p, activation=a),
            baselines=baselines,
            flops=flops_if_compute_bound(conv_flops, nbytes),
            bytes=float(nbytes),
            check_tol=_TOL[dtype],
            meta={"conv_flops": conv_flops, "N": n, "C_in": ci, "H": h, "W": w, "C_out": co, "kernel": k,
                  "stride": st, "padding": pad, "layout": "channels_last",
                  "dtype": str(dtype).replace("torch.", "")},
        ))
    return out
