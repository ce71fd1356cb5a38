"""GroupNorm(32 groups, eps 1e-6) + SiLU on the Stable Diffusion VAE decoder's feature maps.

Memory-bound: the floor is reading x once and writing y once (plus the affine parameters);
genfuse reads x twice (statistics, then normalisation), so on maps larger than L2 (50 MB on
an H100: the 128x128 and larger cases in bf16) its best case is 2/3 of the copy ceiling.
Baselines are what a diffusers user runs: ``F.silu(F.group_norm(...))`` in eager mode, on the
same memory layout, and the same two ops under ``torch.compile`` (CUDA only: inductor on CPU
needs a C++ toolchain and minutes of compiling, which the smoke test does not want).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from genfuse.kernels._group_norm import group_norm

from .harness import Case

GROUPS, EPS = 32, 1e-6
# (N, C, H, W) at the four resolutions of the SD VAE decoder's up blocks.
FULL_SHAPES = [(1, 512, 64, 64), (1, 512, 128, 128), (1, 256, 256, 256), (1, 128, 512, 512)]
SMOKE_SHAPES = [((2, 32, 8, 8), 8), ((1, 16, 12, 20), 4)]
CHECK_TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _torch_group_norm_silu(x, weight, bias, groups: int, eps: float):
    return F.silu(F.group_norm(x, groups, weight, bias, eps))


def cases(device: str, dtype: torch.dtype, size: str) -> List[Case]:
    shapes = [(s, GROUPS) for s in FULL_SHAPES] if size == "full" else SMOKE_SHAPES
    compiled = None
    if device == "cuda":
        compiled = torch.compile(_torch_group_norm_silu, dynamic=False)
    out: List[Case] = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for shape, groups in shapes:
        C = shape[1]
        x_nchw = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        weight = (1 + 0.1 * torch.randn(C, generator=gen)).to(device=device, dtype=dtype)
        bias = (0.1 * torch.randn(C, generator=gen)).to(device=device, dtype=dtype)
        nbytes = 2 * x_nchw.numel() * x_nchw.element_size() + 2 * C * x_nchw.element_size()
        # Default arguments bind this iteration's tensors (closures would see the last ones).
        for layout in ("nchw", "channels_last"):
            x = x_nchw if layout == "nchw" else x_nchw.contiguous(memory_format=torch.channels_last)
            baselines = {"torch F.silu(F.group_norm)":
                         (lambda x=x, w=weight, b=bias, g=groups: _torch_group_norm_silu(x, w, b, g, EPS))}
            if compiled is not None:
                baselines["torch.compile"] = (
                    lambda x=x, w=weight, b=bias, g=groups: compiled(x, w, b, g, EPS))
            out.append(Case(
                kernel="group_norm",
                name=f"{'x'.join(map(str, shape))} G{groups} silu {layout}",
                genfuse=lambda x=x, w=weight, b=bias, g=groups: group_norm(x, g, w, b, EPS, activation="silu"),
                baselines=baselines,
                flops=0.0,
                bytes=float(nbytes),
                check_tol=CHECK_TOL[dtype],
                meta={"shape": list(shape), "groups": groups, "layout": layout, "activation": "silu"},
            ))
    return out
