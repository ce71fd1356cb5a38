"""Images out of generators: sampling a registry GAN or decoding latents with a user's VAE on
genfuse kernels, grids, PNG files.

`sample_gan` is what ``genfuse image <name>`` runs: latents from a seeded CPU generator (so a
seed gives the same faces on every device), the generator from `genfuse.runtime.dcgan`,
rewritten by `genfuse.accelerate`. `load_latents` + `decode_latents` are what
``genfuse image --vae FOLDER --latents FILE`` runs: a saved latent tensor through a diffusers
``AutoencoderKL`` whose decoder `genfuse.accelerate` put on the kernels. `image_grid` lays
images out as torchvision's ``make_grid`` does (rows of ``nrow``, ``padding`` pixels of black
between and around them).

Sizes and values are checked before work starts: a 1.6 KB latents file can hold an expanded
``(1, 4, 4000, 4000)`` tensor whose decode needs a petabyte, so `decode_latents` estimates the
decoder's memory from the latent shape and refuses what the device cannot hold (`sample_gan`
does the same for ``n``); NaN/inf latents or images are refused rather than written as a black
PNG.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from .resources import check_memory, resolve_device

PNG_SUFFIXES = (".png",)


@torch.no_grad()
def sample_gan(name: str = "dcgan-faces", n: int = 16, *, seed: int = 0,
               device: str | None = None, backend: str | None = None) -> torch.Tensor:
    """``n`` images in [-1, 1] from a registry GAN on genfuse kernels: ``(n, C, H, W)`` fp32 CPU."""
    from genfuse.runtime.accelerate import accelerate
    from genfuse.runtime.dcgan import load_generator

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    device = resolve_device(device)
    model = load_generator(name, device=device)
    cfg = model.config
    # the widest activations per image: ngf*8 x 4x4 ... ngf x 32x32 and the nc x 64x64 output,
    # a few alive at once (conv out, batch norm, ReLU), all float32
    per_image = max(cfg.ngf * 8 * 16, cfg.ngf * 4 * 64, cfg.ngf * 2 * 256, cfg.ngf * 1024,
                    cfg.nc * cfg.image_size ** 2) * 4 * 4 + cfg.nz * 4
    check_memory(f"sampling {n} images from {name}", n * per_image, device, hint="lower -n")
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
    # a saved expanded tensor (stride 0) stores one value for all of its elements: check the
    # logical size before anything (isfinite, .float(), the decode) materializes it
    check_memory(f"latents in {path} of shape {tuple(obj.shape)} ({obj.numel()} values)", obj.numel() * 4, "cpu")
    bad = obj.numel() - int(torch.isfinite(obj).sum())
    if bad:
        raise ValueError(f"latents in {path} hold {bad} non-finite value(s) (NaN or inf) of {obj.numel()}")
    return obj if obj.ndim == 4 else obj[None]


def decode_memory(vae: torch.nn.Module, shape: tuple[int, ...], *, dtype: torch.dtype,
                  torch_attention: bool) -> int:
    """Bytes a diffusers-layout decoder needs for latents of ``shape`` (B, C, h, w), roughly:
    four of its widest activations alive at once (each up level runs at twice the previous
    resolution, with the wider of its own and the previous level's channels), the float32 output,
    and with ``torch_attention`` the mid-block's (hw x hw) float32 scores, which the torch
    reference attention materializes (the kernels never do)."""
    B, _, h, w = shape
    chans = list(reversed(vae.config.block_out_channels))
    itemsize = torch.empty(0, dtype=dtype).element_size()
    widest = max(B * max(c, chans[i - 1] if i else c) * (h << i) * (w << i) for i, c in enumerate(chans))
    scale = 1 << (len(chans) - 1)
    need = 4 * widest * itemsize + B * vae.config.out_channels * (h * scale) * (w * scale) * 4
    if torch_attention and getattr(vae.config, "mid_block_add_attention", True):
        need += 2 * B * (h * w) ** 2 * 4  # scores and their softmax
    return need


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
    weight = next(vae.decoder.parameters())
    from genfuse.kernels._common import resolve_backend

    resolved = resolve_backend(backend, weight)
    check_memory(f"decoding latents of shape {tuple(latents.shape)}",
                 decode_memory(vae, tuple(latents.shape), dtype=weight.dtype, torch_attention=resolved == "torch"),
                 weight.device, hint="decode fewer or smaller latents")
    z = latents.float()
    if unscale:
        z = z / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    fast = accelerate(vae, backend=backend)
    out = fast.decode(z.to(weight.device, weight.dtype)).sample.float().cpu()
    _check_finite(out, "the decoded images")
    return out


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """``(N, C, H, W)`` in [-1, 1] -> one ``(rows*(H+p)+p, nrow*(W+p)+p, C)`` uint8 array.

    ``nrow`` images per row (default: a square-ish ``ceil(sqrt(N))``); C is 1 or 3.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
    _check_finite(images, "images")  # NaN would clamp to black and pass for a picture
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


def _check_finite(x: torch.Tensor, what: str) -> None:
    bad = x.numel() - int(torch.isfinite(x).sum())
    if bad:
        raise ValueError(f"{what} hold {bad} non-finite value(s) (NaN or inf) of {x.numel()}: "
                         "refusing to write them as pixels")


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
