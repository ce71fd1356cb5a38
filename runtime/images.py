"""Images out of generators: sampling a registry GAN or decoding latents with a user's VAE on
genfuse kernels, grids, PNG files.

`sample_gan` is what ``genfuse image <name>`` runs: latents from a seeded CPU generator (so a
seed gives the same faces on every device), the generator from `genfuse.runtime.dcgan`,
rewritten by `genfuse.accelerate`. `load_latents` + `decode_latents` are what
``genfuse image --vae FOLDER --latents FILE`` runs: a saved latent tensor through a diffusers
``AutoencoderKL`` whose decoder `genfuse.accelerate` put on the kernels. `image_grid` lays
images out as torchvision's ``make_grid`` does (rows of ``nrow``, ``padding`` pixels of black
between and around them).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

PNG_SUFFIXES = (".png",)


@torch.no_grad()
def sample_gan(name: str = "dcgan-faces", n: int = 16, *, seed: int = 0,
               device: str | None = None, backend: str | None = None) -> torch.Tensor:
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


def load_latents(path: str | os.PathLike) -> torch.Tensor:
    """A latent tensor saved with ``torch.save``: ``(C, h, w)`` or ``(B, C, h, w)`` -> ``(B, C, h, w)``.

    Read with ``torch.load(weights_only=True)`` (no code runs from the file). Raises
    FileNotFoundError for a missing file, TypeError when it holds no tensor, ValueError for an
    unreadable file or a tensor that is not floating point of rank 3 or 4.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latents file {path} does not exist")
    # torch.load fails on a bad file with KeyError, EOFError, UnpicklingError, RuntimeError...
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every one of them means "not a readable latents file"
        raise ValueError(f"cannot read {path} with torch.load(weights_only=True): {e}") from None
    if not isinstance(obj, torch.Tensor):
        raise TypeError(f"{path} holds a {type(obj).__name__}, not a tensor: save the latents "
                        f"with torch.save(latents, path)")
    if obj.ndim not in (3, 4):
        raise ValueError(f"latents in {path} have shape {tuple(obj.shape)}; expected (C, h, w) or (B, C, h, w)")
    if not obj.is_floating_point():
        raise ValueError(f"latents in {path} are {obj.dtype}; expected a floating-point tensor")
    return obj if obj.ndim == 4 else obj[None]


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, latents: torch.Tensor, *, unscale: bool = True,
                   backend: str | None = None) -> torch.Tensor:
    """``(B, C, h, w)`` latents -> ``(B, out_channels, H, W)`` fp32 CPU images, roughly in [-1, 1].

    ``vae`` is a diffusers ``AutoencoderKL``; its decoder runs on genfuse kernels
    (`genfuse.accelerate`), on the VAE's device and dtype. With ``unscale`` (the default) the
    latents are taken as a diffusers pipeline hands them out (``output_type="latent"``, i.e. in
    the diffusion model's scale) and mapped back as the pipelines do before decoding:
    ``latents / scaling_factor + shift_factor`` (no shift when the config has none). Without
    it they go to ``decode`` unchanged (e.g. ``vae.encode(x).latent_dist.sample()``).
    """
    from genfuse.runtime.accelerate import accelerate

    channels = vae.config.latent_channels
    if latents.ndim != 4 or latents.shape[1] != channels:
        raise ValueError(f"latents have shape {tuple(latents.shape)}; this VAE decodes "
                         f"({channels}, h, w) or (B, {channels}, h, w)")
    z = latents.float()
    if unscale:
        z = z / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    weight = next(vae.decoder.parameters())
    fast = accelerate(vae, backend=backend)
    return fast.decode(z.to(weight.device, weight.dtype)).sample.float().cpu()


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
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
