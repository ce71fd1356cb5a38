"""Benchmark cases for conv2d (implicit GEMM + fused bias / activation / residual / upsample).

``flops = 2 * N * Ho * Wo * K * C * R * S`` (useful multiply-adds of the conv; the upsample
adds none); ``bytes`` counts x, weight, bias, residual read and the output written once.
Layers whose bytes outweigh their FLOPs at the two ceilings (conv_in from 4 latent channels,
conv_out to 3 RGB channels) are reported as memory-bound (flops=0, ``meta["conv_flops"]``).

Full shapes are the diffusers AutoencoderKL (SD VAE) decoder's 3x3 convs at batch 1: the mid
block at 512 channels 64x64, the up blocks at 256 channels 256x256 and 128 channels 512x512
(ResnetBlock2D's second conv carries the residual add), the Upsample2D conv at 512 channels
128 -> 256, conv_in (4 -> 512) and conv_out (128 -> 3 RGB).

genfuse runs on channels-last activations (its loads are then contiguous along the reduction
channels, and the output stays channels-last for the next conv). Baselines are what a user
writes: ``F.interpolate`` + ``F.conv2d`` + the epilogue ops, on NCHW and on channels-last
tensors (cuDNN picks its kernels per layout; take the better of the two), and the same
composite under ``torch.compile`` on CUDA.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from genfuse.kernels._conv2d import conv2d

from .harness import Case, flops_if_compute_bound


_TOL = {torch.float32: 5e-3, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _composite(x, w, b, residual, padding: int, upsample: int, activation):
    """What a user writes: upsample, cuDNN conv (+ bias), then separate epilogue ops."""
    if upsample != 1:
        x = F.interpolate(x, scale_factor=upsample, mode="nearest")
    y = F.conv2d(x, w, b, padding=padding)
    if activation == "silu":
        y = F.silu(y)
    elif activation == "relu":
        y = F.relu(y)
    if residual is not None:
        y = y + residual
    return y


def cases(device: str, dtype: torch.dtype, size: str) -> List[Case]:
    # (name, N, C, H, W, K, RxS, padding, upsample, activation, residual)
    if size == "full":
        shapes = [
            ("vae mid resnet conv2 +res", 1, 512, 64, 64, 512, 3, 1, 1, None, True),
            ("vae up resnet conv", 1, 256, 256, 256, 256, 3, 1, 1, None, False),
            ("vae up resnet conv2 +res", 1, 128, 512, 512, 128, 3, 1, 1, None, True),
            ("vae upsample2d+conv", 1, 512, 128, 128, 512, 3, 1, 2, None, False),
            ("vae conv_out", 1, 128, 512, 512, 3, 3, 1, 1, None, False),
            ("vae conv_in 4->512", 1, 4, 64, 64, 512, 3, 1, 1, None, False),
        ]
    else:
        shapes = [
            ("smoke conv+res", 2, 4, 6, 6, 5, 3, 1, 1, "silu", True),
            ("smoke upsample+conv", 1, 3, 4, 5, 4, 3, 1, 2, None, False),
            ("smoke 1x1 relu", 2, 6, 3, 5, 7, 1, 0, 1, "relu", False),
        ]
    compiled = torch.compile(_composite, dynamic=False) if device == "cuda" else None

    out: List[Case] = []
    for name, n, c, h, w, k, rs, pad, up, act, has_res in shapes:
        x = torch.randn(n, c, h, w, device=device, dtype=dtype)
        wt = (torch.randn(k, c, rs, rs, device=device) / (c * rs * rs) ** 0.5).to(dtype)
        b = (0.1 * torch.randn(k, device=device)).to(dtype)
        ho, wo = h * up + 2 * pad - rs + 1, w * up + 2 * pad - rs + 1
        res = torch.randn(n, k, ho, wo, device=device, dtype=dtype) if has_res else None
        cl = torch.channels_last
        x_cl, w_cl = x.to(memory_format=cl), wt.to(memory_format=cl)
        res_cl = res.to(memory_format=cl) if res is not None else None
        e = x.element_size()
        nbytes = (x.numel() + wt.numel() + b.numel() + n * k * ho * wo * (2 if has_res else 1)) * e
        conv_flops = 2.0 * n * ho * wo * k * c * rs * rs
        baselines = {
            "F.conv2d NCHW":
                lambda x=x, w=wt, b=b, r=res, p=pad, u=up, a=act: _composite(x, w, b, r, p, u, a),
            "F.conv2d channels_last":
                lambda x=x_cl, w=w_cl, b=b, r=res_cl, p=pad, u=up, a=act: _composite(x, w, b, r, p, u, a),
        }
        if compiled is not None:
            baselines["torch.compile"] = \
                lambda x=x_cl, w=w_cl, b=b, r=res_cl, p=pad, u=up, a=act: compiled(x, w, b, r, p, u, a)
        out.append(Case(
            kernel="conv2d",
            name=f"{name} N{n} C{c} {h}x{w} K{k} {rs}x{rs}" + (f" up{up}" if up > 1 else ""),
            genfuse=lambda x=x_cl, w=w_cl, b=b, r=res_cl, p=pad, u=up, a=act:
                conv2d(x, w, b, padding=p, upsample=u, activation=a, residual=r),
            baselines=baselines,
            flops=flops_if_compute_bound(conv_flops, nbytes),
            bytes=float(nbytes),
            check_tol=_TOL[dtype],
            meta={"conv_flops": conv_flops, "N": n, "C": c, "H": h, "W": w, "K": k, "R": rs, "S": rs,
                  "upsample": up, "residual": has_res, "layout": "channels_last",
                  "dtype": str(dtype).replace("torch.", "")},
        ))
    return out
