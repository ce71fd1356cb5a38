"""genfuse.accelerate on diffusers' AutoencoderKL: ``decode`` on the kernels vs diffusers.

Small configs with random weights (GroupNorm affine randomised too, so no norm is the
identity), fp32, through Triton's interpreter on CPU: each decode runs every kernel of the
path (conv2d with fused residual / folded upsample, group_norm + SiLU, one QKV linear,
attention, to_out with the residual in its epilogue). On the 2-core CI box one small decode
takes a few seconds in the interpreter, so each one also checks that no torch conv / norm /
linear / SDPA / interpolate op runs. Checks that are about diffusers' plumbing around the
decoder (return_dict, slicing, tiling, warnings) run on the torch reference ops
(``backend="torch"``), where the kernels' maths is not the question. The SD 1.5 config in
fp16 runs on the GPU only.
"""
import copy
import warnings

import diffusers  # a test dependency (pyproject's test extra): the reference
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import Attention
from diffusers.models.autoencoders.vae import DecoderOutput
from genfuse.kernels import _attention as attention_module
from genfuse.runtime import vae as vae_mod
from helpers import rel_error
from torch import nn

import genfuse

TOL = {"cpu": 1e-3, "cuda": 5e-3}  # the 1e-3 in fp32; tf32 dots on a GPU


def _vae(block_out_channels, *, layers_per_block=1, groups=4, latent_channels=4,
         use_post_quant_conv=True, attention=True, out_channels=3, seed=0) -> AutoencoderKL:
    """A random-weight AutoencoderKL of the given shape, in eval mode (fp32, CPU)."""
    torch.manual_seed(seed)
    n = len(block_out_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=out_channels, block_out_channels=block_out_channels,
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        layers_per_block=layers_per_block, norm_num_groups=groups,
                        latent_channels=latent_channels, use_post_quant_conv=use_post_quant_conv,
                        mid_block_add_attention=attention, sample_size=32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, nn.GroupNorm):  # not the identity affine of a fresh GroupNorm
                m.weight.copy_(torch.rand(m.num_channels, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_channels, generator=g) * 0.3)
    return vae.eval()


def _no_warnings_accelerate(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return genfuse.accelerate(model, **kw)


def _forbid(*args, **kwargs):
    raise AssertionError("a torch op ran on the accelerated path")


_TORCH_OPS = [(F, "conv2d"), (F, "group_norm"), (F, "linear"), (F, "scaled_dot_product_attention"),
              (F, "interpolate"), (F, "layer_norm"), (torch, "conv2d"), (torch, "group_norm"),
              (torch, "layer_norm")]


# --------------------------------------------------------------------------------------
# decode on the kernels vs diffusers
# --------------------------------------------------------------------------------------
def _config_shortcut():
    """Two up blocks 16 -> 8 channels: a conv_shortcut, one Upsample2D, post_quant_conv.
    One resnet with a conv shortcut gets output_scale_factor 2 (folded into both convs)."""
    vae = _vae((8, 16))
    vae.decoder.up_blocks[1].resnets[0].output_scale_factor = 2.0
    return vae, (1, 4, 5, 7)


def _config_no_pqc():
    """No post_quant_conv, no channel change (identity shortcuts), 3 latent channels, batch 2;
    the attention's rescale_output_factor and a resnet's output_scale_factor are 2 (diffusers
    reads both at call time), so the folded factors and the scaled skip paths are exercised."""
    vae = _vae((16, 16), groups=8, latent_channels=3, use_post_quant_conv=False)
    vae.decoder.mid_block.attentions[0].rescale_output_factor = 2.0
    vae.decoder.mid_block.resnets[1].output_scale_factor = 2.0
    return vae, (2, 3, 3, 5)


@pytest.mark.parametrize("make", [_config_shortcut, _config_no_pqc], ids=["shortcut-pqc", "no-pqc-batch2"])
def test_decode_matches_diffusers_on_kernels_only(monkeypatch, device, make):
    vae, shape = make()
    vae = vae.to(device)
    fast = _no_warnings_accelerate(vae)
    z = torch.randn(*shape, device=device)
    with torch.no_grad():
        ref = vae.decode(z).sample
    for mod, name in _TORCH_OPS:
        monkeypatch.setattr(mod, name, _forbid)
    with torch.no_grad():
        with pytest.raises(AssertionError, match="torch op ran"):
            vae.decode(z)  # the patch bites: diffusers' decoder does call them
        out = fast.decode(z)
    assert isinstance(out, DecoderOutput)
    assert out.sample.shape == (shape[0], 3, 2 * shape[2], 2 * shape[3])
    assert out.sample.is_contiguous()
    assert rel_error(out.sample, ref) < TOL[device]


def test_decode_fp16_is_as_close_as_diffusers_fp16(device):
    """fp16 kernels (accumulating in fp32) against diffusers in fp32: no worse than diffusers'
    own fp16 decode, within fp16 rounding (measured on CPU: 1.8e-3 vs diffusers' 2.2e-3)."""
    vae, shape = _config_shortcut()
    vae = vae.to(device)
    z = torch.randn(*shape, device=device)
    with torch.no_grad():
        ref = vae.decode(z).sample
        fast = _no_warnings_accelerate(vae).half()
        out = fast.decode(z.half()).sample
        theirs = copy.deepcopy(vae).half().decode(z.half()).sample
    assert out.dtype == torch.float16
    err, err_diffusers = rel_error(out, ref), rel_error(theirs, ref)
    assert err < 5e-3 and err <= 2 * err_diffusers + 1e-3, (err, err_diffusers)


def test_sd_size_mid_block_attention(device):
    """The SD VAE's mid-block attention alone: 512 channels, one head of D = 512 (few tokens, for
    the interpreter). Below a kernel limit of 512 it must be refused, not mis-computed."""
    attn = Attention(512, heads=1, dim_head=512, rescale_output_factor=1.0, eps=1e-6, norm_num_groups=32,
                     residual_connection=True, bias=True, upcast_softmax=True,
                     _from_deprecated_attn_block=True)
    with torch.no_grad():
        attn.group_norm.weight.uniform_(0.5, 1.5)
        attn.group_norm.bias.normal_(0, 0.3)
    attn = attn.eval().to(device)
    if getattr(attention_module, "MAX_HEAD_DIM", 0) < 512:
        with pytest.raises(vae_mod._Unsupported, match="head dim 512 is above"):
            vae_mod.AttentionBlock(attn)
        return
    block = vae_mod.AttentionBlock(attn)
    x = torch.randn(2, 512, 3, 5, device=device)
    with torch.no_grad():
        ref, out = attn(x), block(x)
    # the residual x dominates the output: compare what the attention adds to it
    assert rel_error(out - x, ref - x) < TOL[device]


def test_the_rewrite_fuses_what_it_should():
    vae, _ = _config_shortcut()
    fast = _no_warnings_accelerate(vae)
    assert type(fast) is AutoencoderKL and isinstance(fast.decoder, vae_mod.Decoder)
    assert isinstance(fast.post_quant_conv, vae_mod.Conv)
    up0, up1 = fast.decoder.up_blocks
    assert up0.upsample.upsample == 2 and up1.upsample is None  # nearest 2x folded into the conv
    assert up1.resnets[0].shortcut is not None and up1.resnets[1].shortcut is None
    assert [r.norm1.activation for r in up0.resnets] == ["silu", "silu"]
    attn = fast.decoder.mid_block.attentions[0]
    assert attn.heads == 1 and attn.head_dim == 16
    assert attn.qkv_weight.shape == (48, 16) and attn.norm.activation is None
    assert fast.decoder.norm_out.activation == "silu"
    # every decoder weight lives in a genfuse module: nothing of diffusers' decoder is left
    assert not [m for m in fast.decoder.modules() if type(m).__module__.startswith("diffusers")]


def test_decode_without_mid_block_attention(device):
    """mid_block_add_attention=False, two resnets per up block, one up block (no upsampler)."""
    vae = _vae((8,), layers_per_block=2, groups=2, attention=False).to(device)
    fast = _no_warnings_accelerate(vae)
    assert all(isinstance(a, nn.Identity) for a in fast.decoder.mid_block.attentions)
    z = torch.randn(1, 4, 6, 5, device=device)
    with torch.no_grad():
        assert rel_error(fast.decode(z).sample, vae.decode(z).sample) < TOL[device]


# --------------------------------------------------------------------------------------
# diffusers' interface around the decoder (torch reference ops: fast, same plumbing)
# --------------------------------------------------------------------------------------
def test_return_dict_slicing_tiling_and_encode():
    vae, _ = _config_shortcut()
    fast = _no_warnings_accelerate(vae, backend="torch")
    z = torch.randn(3, 4, 5, 7)
    with torch.no_grad():
        ref = vae.decode(z).sample
        out = fast.decode(z, return_dict=False)
        assert isinstance(out, tuple) and len(out) == 1
        assert rel_error(out[0], ref) < 1e-5
        assert rel_error(fast.decode(z, return_dict=True).sample, ref) < 1e-5
        assert rel_error(fast.decode(z, False)[0], ref) < 1e-5  # positional, as diffusers allows
        fast.enable_slicing()
        assert rel_error(fast.decode(z).sample, ref) < 1e-5
        fast.disable_slicing()
        # tiled decode goes through post_quant_conv and the decoder tile by tile
        big = torch.randn(1, 4, 24, 20)
        vae.enable_tiling()
        fast.enable_tiling()
        assert rel_error(fast.decode(big).sample, vae.decode(big).sample) < 1e-5
        # the encoder is diffusers' own and untouched
        x = torch.randn(1, 3, 16, 16)
        assert torch.equal(fast.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean)


def test_original_module_is_untouched_and_shares_no_storage():
    vae, _ = _config_shortcut()
    before = copy.deepcopy(vae.state_dict())
    types = [type(m) for m in vae.modules()]
    fast = genfuse.accelerate(vae)
    assert [type(m) for m in vae.modules()] == types
    after = vae.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    ours = {t.data_ptr() for t in list(fast.parameters()) + list(fast.buffers())}
    theirs = {t.data_ptr() for t in list(vae.parameters()) + list(vae.buffers())}
    assert not ours & theirs
    # the copy moves and casts like any module (its weights are buffers)
    half = fast.half()
    assert half.decoder.conv_in.weight.dtype == torch.float16
    assert vae.decoder.conv_in.weight.dtype == torch.float32


# --------------------------------------------------------------------------------------
# What the rewrite cannot take stays torch, named in one warning
# --------------------------------------------------------------------------------------
def test_unsupported_parts_stay_torch_and_are_named_once(monkeypatch):
    vae = _vae((8, 16), groups=4)
    vae.decoder.up_blocks[0].resnets[1].nonlinearity = nn.GELU()  # not fusable into group_norm
    vae.decoder.up_blocks[0].resnets[0].conv1 = nn.Conv2d(16, 16, 3, padding=1, groups=2)
    # an attention whose head dim is above the kernel's limit (SD sizes before D = 512 landed)
    monkeypatch.setattr(attention_module, "MAX_HEAD_DIM", 8)
    with pytest.warns(UserWarning) as record:
        fast = genfuse.accelerate(vae, backend="torch")
    assert len(record) == 1 and record[0].filename == __file__  # points at the caller
    msg = str(record[0].message)
    assert "3 part(s) of the AutoencoderKL decoder left on torch" in msg
    assert "decoder.up_blocks.0.resnets.1 (ResnetBlock2D: activation GELU" in msg
    assert "decoder.up_blocks.0.resnets.0 (ResnetBlock2D: groups=2)" in msg
    assert "decoder.mid_block.attentions.0 (Attention: head dim 16 is above the attention kernel's 8)" in msg
    kept = fast.decoder.up_blocks[0].resnets[1]
    assert type(kept).__name__ == "ResnetBlock2D" and kept is not vae.decoder.up_blocks[0].resnets[1]
    z = torch.randn(2, 4, 4, 3)
    with torch.no_grad():
        assert rel_error(fast.decode(z).sample, vae.decode(z).sample) < 1e-5


def test_unknown_up_block_type_stays_torch():
    vae = _vae((8, 16))
    vae.decoder.up_blocks[1] = diffusers.models.unets.unet_2d_blocks.AttnUpDecoderBlock2D(
        in_channels=16, out_channels=8, num_layers=2, resnet_groups=4, attention_head_dim=8,
        add_upsample=False, temb_channels=None).eval()
    with pytest.warns(UserWarning, match=r"decoder.up_blocks.1 \(AttnUpDecoderBlock2D: only "
                                         r"UpDecoderBlock2D is rewritten\)"):
        fast = genfuse.accelerate(vae, backend="torch")
    z = torch.randn(1, 4, 3, 4)
    with torch.no_grad():
        assert rel_error(fast.decode(z).sample, vae.decode(z).sample) < 1e-5


def test_spatial_norm_latent_embeds_is_refused():
    fast = _no_warnings_accelerate(_vae((8,), groups=2), backend="torch")
    with pytest.raises(ValueError, match="latent_embeds"):
        fast.decoder(torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2))


# --------------------------------------------------------------------------------------
# The SD 1.5 VAE on the GPU, fp16
# --------------------------------------------------------------------------------------
SD15 = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "groups": 32, "latent_channels": 4}


@pytest.mark.gpu
def test_sd15_config_fp16_on_gpu():
    """A 64x64x4 latent to a 512x512 image with the SD 1.5 VAE shapes (random weights) in fp16.

    The reference is diffusers in fp32 (TF32 off); genfuse fp16 must be as close to it as
    diffusers' own fp16 decode is (within 2x, plus fp16 rounding)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    vae = _vae(**SD15).cuda()
    z = torch.randn(1, 4, 64, 64, device="cuda")
    with torch.no_grad():
        ref = vae.decode(z).sample
        half = copy.deepcopy(vae).half()
        theirs = half.decode(z.half()).sample
    limit = getattr(attention_module, "MAX_HEAD_DIM", 0)
    with warnings.catch_warnings():
        if limit >= 512:  # the mid-block attention (one head, D = 512) runs on the kernel too
            warnings.simplefilter("error")
        fast = genfuse.accelerate(vae).half()
    with torch.no_grad():
        out = fast.decode(z.half()).sample
    assert out.shape == (1, 3, 512, 512) and out.dtype == torch.float16
    err, err_diffusers = rel_error(out, ref), rel_error(theirs, ref)
    assert err < 1e-2 and err <= 2 * err_diffusers + 1e-3, (err, err_diffusers)
