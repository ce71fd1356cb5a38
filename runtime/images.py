"""Images out of generators: sampling a registry GAN on genfuse kernels, grids, PNG files.

`sample_gan` is what ``genfuse image <name>`` runs: latents from a seeded CPU generator (so a
seed gives the same faces on every device), the generator from `genfuse.runtime.dcgan`,
rewritten by `genfuse.accelerate`. `image_grid` lays images out as torchvision's
``make_grid`` does (rows of ``nrow``, ``padding`` pixels of black between and around them).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

PNG_SUFFIXES = (".png",)


@torch.no_grad()
def sample_gan(name: str = "dcgan-faces", n: int = 16, *, seed: int = 0,
               device: Optional[str] = None, backend: Optional[str] = None) -> torch.Tensor:
    """``n`` images in [-1, 1] from a registry GAN on genfuse kernels: ``(n, C, H, W)`` fp32 CPU."""
    from genfuse.runtime.accelerate import accelerate
    from genfuse.runtime.dcgan import load_generator

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_generator(name, device=device)
    fast = accelerate(model, backend=backend)
    # seeded on the CPU: the same latents, hence the same images, on every device
    z = torch.randn(n, model.config.nz, 1, 1, generator=torch.Generator().manual_seed(seed))
    return fast(z.to(device)).float().cpu()


def image_grid(images: torch.Tensor, nrow: Optional[int] = None, padding: int = 2) -> np.ndarray:
    """``(N, C, H, W)`` in [-1, 1] -> one ``(rows*(H+p)+p, nrow*(W+p)+p, C)`` uint8 array.

    ``nrow`` images per row (default: a square-ish ``ceil(sqrt(N))``); C is 1 or 3.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    # [-1, 1] -> [0, 255], rounded (torchvision's save_image adds 0.5 before truncating)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), np.uint8)
    for i in range(n):
        y, x = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[y:y + h, x:x + w] = pixels[i].permute(1, 2, 0).numpy()  # (H, W, C)
    return grid


def save_png(grid: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an ``(H, W, 1 or 3)`` uint8 array as a PNG (Pillow); the folder must exist."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() not in PNG_SUFFIXES:
        raise ValueError(f"{path} must end in .png")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist (for {path})")
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid, "L" if grid.shape[-1] == 1 else "RGB")
    img.save(path, format="PNG")
    return path
