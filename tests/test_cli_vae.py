"""`genfuse image --vae FOLDER --latents FILE`: a user's diffusers VAE decodes saved latents to
a PNG, the latent scaling, and clear errors (no tracebacks) for bad folders, files and flags.

The VAE is a tiny random AutoencoderKL written with ``save_pretrained``, the way a user's folder
looks; the expected pixels come from diffusers' own ``decode`` of the same latents.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from genfuse.runtime import images
from PIL import Image

from genfuse.cli import main

SCALING = 2.5  # not 1: the default division by scaling_factor must show in the pixels


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A VAE folder, a pipeline folder holding the same VAE in vae/, and the module itself."""
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                        norm_num_groups=2, latent_channels=4, scaling_factor=SCALING).eval()
    root = tmp_path_factory.mktemp("vaes")
    vae.save_pretrained(root / "vae")
    vae.save_pretrained(root / "pipe" / "vae")
    (root / "pipe" / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]}))
    return root / "vae", root / "pipe", vae


def _png(path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        return np.asarray(img)


def _expected(vae, z, nrow=None) -> np.ndarray:
    with torch.no_grad():
        return images.image_grid(vae.decode(z).sample, nrow=nrow)


def _close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.02  # rounding at .5 may flip a level


def test_vae_decodes_a_batch_to_a_grid(tmp_path, capsys, folders):
    vae_dir, _, vae = folders
    z = torch.randn(3, 4, 5, 6)
    torch.save(z, tmp_path / "latents.pt")
    out = tmp_path / "out.png"
    # the torch reference ops keep this fast; the kernels run in the next test
    assert main(["image", "--vae", str(vae_dir), "--latents", str(tmp_path / "latents.pt"),
                 "--nrow", "2", "-o", str(out), "--backend", "torch"]) == 0
    assert f"wrote {out} (3 image(s) of 12x10" in capsys.readouterr().out
    grid = _png(out)
    assert grid.shape == (2 * 12 + 2, 2 * 14 + 2, 3)  # 2 x 2 cells of 10 x 12 px, 2 px padding
    _close(grid, _expected(vae, z / SCALING, nrow=2))  # divided by scaling_factor by default
    assert not np.array_equal(grid, _expected(vae, z, nrow=2))


def test_pipeline_folder_raw_latents_through_the_kernels(tmp_path, capsys, folders):
    _, pipe_dir, vae = folders
    z = torch.randn(4, 3, 5) * 0.5  # (C, h, w): one image
    torch.save(z, tmp_path / "z.pt")
    out = tmp_path / "one.png"
    assert main(["image", "--vae", str(pipe_dir), "--latents", str(tmp_path / "z.pt"), "--raw-latents",
                 "-o", str(out)]) == 0  # default backend: the Triton interpreter in tests
    img = _png(out)
    assert img.shape == (6 + 4, 10 + 4, 3)  # one 6 x 10 image inside the padding
    _close(img, _expected(vae, z[None]))


def _poke(z, values):
    """``z`` with its first len(values) elements set to ``values``."""
    z.view(-1)[:len(values)] = torch.tensor(values)
    return z


def _write(tmp_path, name, obj):
    path = tmp_path / name
    if isinstance(obj, bytes):
        path.write_bytes(obj)
    else:
        torch.save(obj, path)
    return path


@pytest.mark.parametrize("case, message", [
    ("missing-folder", "VAE folder {tmp}/nope does not exist"),
    ("empty-folder", "no VAE in {tmp}/empty"),
    ("other-model", "describes a UNet2DModel, not an AutoencoderKL"),
    ("no-weights", "cannot load the AutoencoderKL in {tmp}/noweights"),
    ("missing-latents", "latents file {tmp}/missing.pt does not exist"),
    ("dict-latents", "holds a dict, not a tensor"),
    ("junk-latents", "cannot read {tmp}/junk.pt with torch.load(weights_only=True)"),
    ("rank-2", "have shape (4, 5); expected (C, h, w) or (B, C, h, w)"),
    ("int-latents", "are torch.int64; expected a floating-point tensor"),
    ("3-channels", "latents have shape (1, 3, 4, 4); this VAE decodes (4, h, w) or (B, 4, h, w)"),
    # NaN used to decode to an all-black PNG and exit 0
    ("nan-latents", "latents in {tmp}/nan.pt hold 1 non-finite value(s) (NaN or inf) of 64"),
    ("inf-latents", "latents in {tmp}/inf.pt hold 2 non-finite value(s)"),
    # a few hundred bytes on disk (one stored value, stride 0), a petabyte to decode: the
    # torch reference's mid-block attention alone would hold (4000*4000)**2 scores
    ("expanded-latents", "decoding latents of shape (1, 4, 4000, 4000) needs"),
    ("expanded-huge", "latents in {tmp}/huge.pt of shape (1, 4, 1000000, 1000000) (4000000000000 values) "
                      "needs 14.6 TiB but only"),
])
def test_bad_folders_and_latents_exit_1_with_a_message(tmp_path, capsys, folders, case, message):
    vae_dir, _, _ = folders
    latents = _write(tmp_path, "ok.pt", torch.randn(1, 4, 4, 4))
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((vae_dir / "config.json").read_text())
    folder = {"missing-folder": tmp_path / "nope", "empty-folder": tmp_path / "empty",
              "other-model": tmp_path / "other", "no-weights": tmp_path / "noweights"}.get(case, vae_dir)
    latents = {"missing-latents": tmp_path / "missing.pt",
               "dict-latents": _write(tmp_path, "d.pt", {"latents": torch.randn(4, 4, 4)}),
               "junk-latents": _write(tmp_path, "junk.pt", b"not a torch file" * 8),
               "rank-2": _write(tmp_path, "r2.pt", torch.randn(4, 5)),
               "int-latents": _write(tmp_path, "i.pt", torch.ones(4, 4, 4, dtype=torch.long)),
               "3-channels": _write(tmp_path, "c3.pt", torch.randn(3, 4, 4)),
               "nan-latents": _write(tmp_path, "nan.pt", _poke(torch.randn(4, 4, 4), [float("nan")])),
               "inf-latents": _write(tmp_path, "inf.pt", _poke(torch.randn(1, 4, 4, 4), [float("inf"), -float("inf")])),
               "expanded-latents": _write(tmp_path, "exp.pt", torch.zeros(1, 4, 1, 1).expand(1, 4, 4000, 4000)),
               "expanded-huge": _write(tmp_path, "huge.pt", torch.zeros(1).expand(1, 4, 10**6, 10**6)),
               }.get(case, latents)
    out = tmp_path / "out.png"
    assert main(["image", "--vae", str(folder), "--latents", str(latents), "-o", str(out),
                 "--backend", "torch"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("genfuse image: error: ") and message.format(tmp=tmp_path) in err
    assert "Traceback" not in err and err.count("\n") == 1 and not out.exists()
    if case.startswith("expanded"):
        assert latents.stat().st_size < 2000  # the whole attack fits in a small file


def test_nan_out_of_the_decoder_is_refused(folders):
    """A VAE whose weights make NaN gives NaN images: refused, not written as black pixels."""
    _, _, vae = folders
    import copy

    broken = copy.deepcopy(vae)
    with torch.no_grad():
        broken.decoder.conv_out.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="the decoded images hold 180 non-finite value"):
        images.decode_latents(broken, torch.randn(1, 4, 3, 5), backend="torch")
    with pytest.raises(ValueError, match="images hold 1 non-finite"):
        images.image_grid(_poke(torch.zeros(1, 3, 2, 2), [float("nan")]))


def test_decode_memory_estimate(folders):
    """Grows with the output pixels (and, for the torch reference's attention, the square of
    the latent pixels); an SD-sized decode of 64 x 64 latents stays in the gigabytes."""
    _, _, vae = folders
    small = images.decode_memory(vae, (1, 4, 8, 8), dtype=torch.float32, torch_attention=False)
    assert images.decode_memory(vae, (2, 4, 8, 8), dtype=torch.float32, torch_attention=False) == 2 * small
    assert images.decode_memory(vae, (1, 4, 16, 16), dtype=torch.float32, torch_attention=False) == 4 * small
    with_attention = images.decode_memory(vae, (1, 4, 8, 8), dtype=torch.float32, torch_attention=True)
    assert with_attention == small + 2 * 64 ** 2 * 4

    class SD:  # the SD 1.5 VAE's decoder shape
        class config:
            block_out_channels, out_channels, mid_block_add_attention = (128, 256, 512, 512), 3, True
    need = images.decode_memory(SD, (1, 4, 64, 64), dtype=torch.float16, torch_attention=False)
    assert need == 4 * 256 * 512 * 512 * 2 + 3 * 512 * 512 * 4  # 4 x (256 ch x 512 x 512) fp16 + fp32 out


@pytest.mark.parametrize("args, message", [
    (["dcgan-faces", "--vae", "{vae}", "--latents", "{tmp}/z.pt"], "do not also name a GAN (got 'dcgan-faces')"),
    (["--vae", "{vae}"], "--vae needs --latents FILE"),
    (["--latents", "{tmp}/z.pt"], "--latents and --raw-latents go with --vae FOLDER"),
    (["--vae", "{vae}", "--latents", "{tmp}/z.pt", "-n", "4"], "-n and --seed sample a GAN"),
    (["--vae", "{vae}", "--latents", "{tmp}/z.pt", "-o", "{tmp}/x.jpg"], "must be a .png file"),
])
def test_flag_mistakes_are_argparse_errors(tmp_path, capsys, folders, args, message):
    vae_dir = folders[0]
    torch.save(torch.randn(4, 4, 4), tmp_path / "z.pt")
    with pytest.raises(SystemExit) as exc:
        main(["image", *[a.format(tmp=tmp_path, vae=vae_dir) for a in args]])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["z.pt"]


def test_help_documents_the_latent_scaling():
    r = subprocess.run([sys.executable, "-m", "genfuse", "image", "--help"], capture_output=True,
                       text=True, timeout=300, check=True)
    text = " ".join(r.stdout.split())
    assert "--vae FOLDER" in text and "--latents FILE" in text and "--raw-latents" in text
    assert "divided by vae.config.scaling_factor" in text and "weights_only=True" in text
