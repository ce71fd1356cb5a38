"""diffusers' ``AutoencoderKL`` decoder on genfuse kernels, and a loader for a user's VAE folder.

`accelerate_autoencoder_kl(vae)` (what ``genfuse.accelerate`` runs for an ``AutoencoderKL``)
returns a copy of ``vae`` whose ``post_quant_conv`` and ``decoder`` are rebuilt from
genfuse kernels; everything else (the class, ``decode`` / ``_decode`` / slicing / tiling, the
encoder, the config) is diffusers' own, so ``decode(z, return_dict=True)`` keeps its signature
and returns a ``DecoderOutput`` (a tuple with ``return_dict=False``).

The decoder, read top to bottom (SD 1.x sizes: ``block_out_channels = (128, 256, 512, 512)``,
a ``(B, 4, 64, 64)`` latent becomes a ``(B, 3, 512, 512)`` image):

    post_quant_conv   1x1 conv                                   (B, 4, h, w)
    conv_in           3x3 conv                                   (B, 512, h, w)
    mid_block         resnet, attention (one head, D = 512, h*w tokens), resnet
    up_blocks         (layers_per_block + 1) resnets each, then Upsample2D but the last
    conv_norm_out     GroupNorm + SiLU, then conv_out 3x3        (B, 3, 8h, 8w)

and on the kernels:

* ResnetBlock2D: ``group_norm(activation="silu")`` -> ``conv2d`` -> ``group_norm(silu)`` ->
  ``conv2d(residual=shortcut)``: the skip connection is added in the second conv's epilogue
  (the ``(shortcut + h) / output_scale_factor`` sum never makes its own pass over memory; the
  factor is folded into conv2's and the shortcut conv's weights). ``conv_shortcut`` (a 1x1
  conv where the channel count changes) is one more ``conv2d``.
* Upsample2D: nearest 2x + 3x3 conv is one ``conv2d(upsample=2)``; the 4x larger upsampled
  tensor never exists.
* Attention: ``group_norm``, then q, k and v from ONE ``linear`` over the concatenated
  ``to_q / to_k / to_v`` weights, ``attention`` on strided views of that output, and
  ``to_out`` as a ``linear`` with the residual added in its epilogue (``1 /
  rescale_output_factor`` folded into its weights).

Weights are cloned at build time into channels-last memory: the conv kernel's fast layout
(see kernels/_conv2d.py), and from the first conv on every activation is channels-last too, so
the attention's ``(B, C, H, W) -> (B, H*W, C)`` token view is free.

What it cannot rewrite (another up-block type, a resnet with a time embedding or its own
up/down sampling, an attention with spatial or q/k norms, a conv with groups or dilation, a
non-SiLU activation, a head dim above the attention kernel's limit) stays diffusers' torch
module, named in one warning, as the DCGAN path does. Inference only: weights are buffers and
dropout is dropped (diffusers' VAEs use p = 0).
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from genfuse import kernels as gk
from genfuse.kernels import _attention as attention_module

from .accelerate import _conv_problem


def is_autoencoder_kl(module: object) -> bool:
    """True for diffusers' ``AutoencoderKL`` (and subclasses), without importing diffusers."""
    return any(c.__name__ == "AutoencoderKL" and c.__module__.startswith("diffusers")
               for c in type(module).__mro__)


class _Unsupported(Exception):
    """Raised by a builder: this module stays on torch, for the reason in the message."""


def _buffer(t: torch.Tensor | None, scale: float = 1.0) -> torch.Tensor | None:
    """A detached copy (the original module stays untouched), times ``scale`` if not 1."""
    if t is None:
        return None
    t = t.detach()
    if scale != 1.0:
        return (t.double() * scale).to(t.dtype)
    return t.clone()


# --------------------------------------------------------------------------------------
# Fused modules
# --------------------------------------------------------------------------------------
class Conv(nn.Module):
    """``conv2d(up(x), weight) + bias (+ residual)`` on the genfuse kernel."""

    def __init__(self, conv: nn.Conv2d, *, upsample: int = 1, scale: float = 1.0,
                 backend: str | None = None):
        super().__init__()
        why = _conv_problem(conv)
        if why is not None:
            raise _Unsupported(why)
        weight = _buffer(conv.weight, scale)                           # (K, C, R, S)
        self.register_buffer("weight", weight.contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", _buffer(conv.bias, scale))        # (K,) or None
        self.stride, self.padding = tuple(conv.stride), tuple(conv.padding)
        self.upsample, self.backend = upsample, backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return gk.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                         upsample=self.upsample, residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        up = f", upsample={self.upsample}" if self.upsample != 1 else ""
        return f"conv2d {tuple(self.weight.shape)}, padding={self.padding}{up}"


class GroupNormAct(nn.Module):
    """``group_norm`` with SiLU fused (``silu=True``) or none (the attention's norm)."""

    def __init__(self, norm: nn.Module, *, silu: bool, backend: str | None = None):
        super().__init__()
        if not isinstance(norm, nn.GroupNorm):
            raise _Unsupported(f"norm is {type(norm).__name__}, not GroupNorm")
        self.register_buffer("weight", _buffer(norm.weight))           # (C,) or None
        self.register_buffer("bias", _buffer(norm.bias))
        self.num_groups, self.eps = norm.num_groups, norm.eps
        self.activation, self.backend = "silu" if silu else None, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gk.group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                             activation=self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        return f"group_norm groups={self.num_groups}, eps={self.eps}, activation={self.activation}"


def _silu(act: nn.Module) -> None:
    if not isinstance(act, nn.SiLU):
        raise _Unsupported(f"activation {type(act).__name__}: only SiLU is fused into group_norm")


class ResnetBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` without a time embedding, in four (or five) kernels."""

    def __init__(self, block: nn.Module, backend: str | None = None):
        super().__init__()
        if type(block).__name__ != "ResnetBlock2D":
            raise _Unsupported("not a ResnetBlock2D")
        if getattr(block, "time_emb_proj", None) is not None:
            raise _Unsupported("time embedding (time_emb_proj)")
        if getattr(block, "upsample", None) is not None or getattr(block, "downsample", None) is not None:
            raise _Unsupported("up/down sampling inside the block")
        _silu(block.nonlinearity)
        inv = 1.0 / float(block.output_scale_factor)
        self.norm1 = GroupNormAct(block.norm1, silu=True, backend=backend)
        self.conv1 = Conv(block.conv1, backend=backend)
        self.norm2 = GroupNormAct(block.norm2, silu=True, backend=backend)
        self.conv2 = Conv(block.conv2, scale=inv, backend=backend)
        sc = block.conv_shortcut
        self.shortcut = None if sc is None else Conv(sc, scale=inv, backend=backend)
        # with an identity shortcut, 1 / output_scale_factor must still reach the skip path
        self.skip_scale = 1.0 if sc is not None else inv

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.norm1(x))                                  # (B, Cout, H, W)
        skip = x if self.shortcut is None else self.shortcut(x)        # (B, Cout, H, W)
        if self.skip_scale != 1.0:
            skip = skip * self.skip_scale  # elementwise; diffusers' VAEs have factor 1
        return self.conv2(self.norm2(h), residual=skip)                # (skip + conv2) / factor


class AttentionBlock(nn.Module):
    """diffusers' ``Attention`` over the pixels of a feature map (the VAE mid-block's)."""

    def __init__(self, attn: nn.Module, backend: str | None = None):
        super().__init__()
        if type(attn).__name__ != "Attention":
            raise _Unsupported("not a diffusers Attention")
        for name in ("spatial_norm", "norm_q", "norm_k", "norm_cross"):
            if getattr(attn, name, None) not in (None, False):
                raise _Unsupported(f"{name} is set")
        heads = int(attn.heads)
        lin = (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0])
        if not all(isinstance(m, nn.Linear) for m in lin):
            raise _Unsupported("to_q / to_k / to_v / to_out[0] are not all nn.Linear")
        inner, c = attn.to_q.weight.shape
        if inner % heads or attn.to_k.weight.shape != (inner, c) or attn.to_v.weight.shape != (inner, c):
            raise _Unsupported(f"q/k/v projections {[tuple(m.weight.shape) for m in lin[:3]]} "
                               f"with {heads} heads")
        head_dim = inner // heads
        # the kernel's head-dim limit, read when building (a later kernel may raise it)
        limit = getattr(attention_module, "MAX_HEAD_DIM", None)
        if limit is not None and head_dim > limit:
            raise _Unsupported(f"head dim {head_dim} is above the attention kernel's {limit}")
        self.norm = None if attn.group_norm is None else GroupNormAct(attn.group_norm, silu=False,
                                                                      backend=backend)
        # q, k, v from one GEMM: (3 * inner, C) weights, x read once instead of three times
        self.register_buffer("qkv_weight", torch.cat([_buffer(m.weight) for m in lin[:3]]))
        biases = [m.bias for m in lin[:3]]
        self.register_buffer("qkv_bias", None if all(b is None for b in biases) else torch.cat(
            [_buffer(b) if b is not None else attn.to_q.weight.new_zeros(inner) for b in biases]))
        inv = 1.0 / float(attn.rescale_output_factor)
        self.register_buffer("out_weight", _buffer(attn.to_out[0].weight, inv))   # (C, inner)
        self.register_buffer("out_bias", _buffer(attn.to_out[0].bias, inv))
        self.heads, self.head_dim, self.scale = heads, head_dim, float(attn.scale)
        self.residual, self.skip_scale = bool(attn.residual_connection), inv
        self.backend = backend

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        hs = x if self.norm is None else self.norm(x)
        tokens = hs.flatten(2).transpose(1, 2)              # (B, HW, C): a view when channels-last
        qkv = gk.linear(tokens, self.qkv_weight, self.qkv_bias, backend=self.backend)  # (B, HW, 3*inner)
        q, k, v = qkv.view(b, h * w, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, nh, HW, D) each
        o = gk.attention(q, k, v, scale=self.scale, backend=self.backend)        # (B, nh, HW, D)
        o = o.transpose(1, 2).reshape(b, h * w, self.heads * self.head_dim)       # (B, HW, inner)
        skip = None
        if self.residual:
            skip = x.flatten(2).transpose(1, 2)             # (B, HW, C)
            if self.skip_scale != 1.0:
                skip = skip * self.skip_scale  # elementwise; the VAE's factor is 1
        out = gk.linear(o, self.out_weight, self.out_bias, residual=skip, backend=self.backend)  # (B, HW, C)
        return out.transpose(1, 2).reshape(b, c, h, w)      # (B, C, H, W), channels-last memory


class MidBlock(nn.Module):
    """``UNetMidBlock2D``: resnet, then (attention or nothing, resnet) per layer."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module | None]):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList([a if a is not None else nn.Identity() for a in attentions])

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            if not isinstance(attn, nn.Identity):
                x = attn(x, temb=temb)
            x = resnet(x, temb)
        return x


class UpBlock(nn.Module):
    """``UpDecoderBlock2D``: resnets, then the upsample folded into its conv."""

    def __init__(self, resnets: list[nn.Module], upsample: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.upsample = upsample

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, temb)
        return x if self.upsample is None else self.upsample(x)


class Decoder(nn.Module):
    """diffusers' VAE ``Decoder`` on genfuse kernels; same ``forward(sample)`` signature."""

    def __init__(self, conv_in: nn.Module, mid_block: nn.Module, up_blocks: list[nn.Module],
                 norm_out: nn.Module, conv_out: nn.Module):
        super().__init__()
        self.conv_in, self.mid_block = conv_in, mid_block
        self.up_blocks = nn.ModuleList(up_blocks)
        self.norm_out, self.conv_out = norm_out, conv_out

    def forward(self, sample: torch.Tensor, latent_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if latent_embeds is not None:
            raise ValueError("latent_embeds (a spatial-norm decoder) is not supported by the genfuse decoder")
        x = self.conv_in(sample)                        # (B, C_last, h, w)
        x = self.mid_block(x, None)
        for block in self.up_blocks:
            x = block(x, None)                          # x2 per block but the last
        x = self.conv_out(self.norm_out(x))             # (B, out_channels, H, W)
        return x.contiguous()  # NCHW like diffusers' output (the kernels leave channels-last)


# --------------------------------------------------------------------------------------
# Building: each builder raises _Unsupported, and _or_torch keeps a copy of the torch module
# --------------------------------------------------------------------------------------
def _or_torch(build, module: nn.Module, path: str, left: list[str]) -> nn.Module:
    try:
        return build()
    except _Unsupported as e:
        left.append(f"{path} ({type(module).__name__}: {e})")
        return copy.deepcopy(module)  # never share a module with the caller's model


def _upsampler(up: nn.Module, backend: str | None) -> Conv:
    if type(up).__name__ != "Upsample2D":
        raise _Unsupported("not an Upsample2D")
    conv = getattr(up, "conv", None) if getattr(up, "name", "conv") == "conv" else getattr(up, "Conv2d_0", None)
    if getattr(up, "use_conv_transpose", False) or not getattr(up, "use_conv", False) \
            or not getattr(up, "interpolate", True) or getattr(up, "norm", None) is not None \
            or not isinstance(conv, nn.Conv2d):
        raise _Unsupported("only nearest 2x + Conv2d (use_conv=True, no norm) is folded")
    return Conv(conv, upsample=2, backend=backend)


def _up_block(block: nn.Module, path: str, backend: str | None, left: list[str]) -> nn.Module:
    if type(block).__name__ != "UpDecoderBlock2D":
        left.append(f"{path} ({type(block).__name__}: only UpDecoderBlock2D is rewritten)")
        return copy.deepcopy(block)
    resnets = [_or_torch(lambda r=r: ResnetBlock(r, backend), r, f"{path}.resnets.{i}", left)
               for i, r in enumerate(block.resnets)]
    ups = list(block.upsamplers) if block.upsamplers is not None else []
    if len(ups) > 1:
        left.append(f"{path}.upsamplers ({len(ups)} upsamplers, expected at most one)")
        return copy.deepcopy(block)
    upsample = _or_torch(lambda: _upsampler(ups[0], backend), ups[0], f"{path}.upsamplers.0", left) \
        if ups else None
    return UpBlock(resnets, upsample)


def _mid_block(block: nn.Module, path: str, backend: str | None, left: list[str]) -> nn.Module:
    if type(block).__name__ != "UNetMidBlock2D":
        left.append(f"{path} ({type(block).__name__}: only UNetMidBlock2D is rewritten)")
        return copy.deepcopy(block)
    resnets = [_or_torch(lambda r=r: ResnetBlock(r, backend), r, f"{path}.resnets.{i}", left)
               for i, r in enumerate(block.resnets)]
    attentions = [None if a is None else
                  _or_torch(lambda a=a: AttentionBlock(a, backend), a, f"{path}.attentions.{i}", left)
                  for i, a in enumerate(block.attentions)]
    return MidBlock(resnets, attentions)


def _norm_out(dec: nn.Module, backend: str | None) -> nn.Module:
    _silu(dec.conv_act)
    return GroupNormAct(dec.conv_norm_out, silu=True, backend=backend)


def build_decoder(dec: nn.Module, backend: str | None = None, left: list[str] | None = None,
                  prefix: str = "decoder") -> Decoder:
    """The genfuse twin of a diffusers VAE ``Decoder``; what stays torch is appended to ``left``."""
    left = [] if left is None else left
    missing = [n for n in ("conv_in", "mid_block", "up_blocks", "conv_norm_out", "conv_act", "conv_out")
               if not hasattr(dec, n)]
    if missing:
        raise TypeError(f"{prefix} ({type(dec).__name__}) is not a diffusers VAE Decoder: "
                        f"it has no {', '.join(missing)}")
    conv_in = _or_torch(lambda: Conv(dec.conv_in, backend=backend), dec.conv_in, f"{prefix}.conv_in", left)
    mid = _mid_block(dec.mid_block, f"{prefix}.mid_block", backend, left)
    ups = [_up_block(b, f"{prefix}.up_blocks.{i}", backend, left) for i, b in enumerate(dec.up_blocks)]
    try:
        norm_out = _norm_out(dec, backend)
    except _Unsupported as e:
        left.append(f"{prefix}.conv_norm_out + conv_act ({e})")
        norm_out = copy.deepcopy(nn.Sequential(dec.conv_norm_out, dec.conv_act))
    conv_out = _or_torch(lambda: Conv(dec.conv_out, backend=backend), dec.conv_out, f"{prefix}.conv_out", left)
    return Decoder(conv_in, mid, ups, norm_out, conv_out)


def accelerate_autoencoder_kl(vae: nn.Module, *, backend: str | None = None) -> nn.Module:
    """A copy of a diffusers ``AutoencoderKL`` whose ``decode`` runs on genfuse kernels.

    ``post_quant_conv`` and ``decoder`` are replaced by their genfuse twins; the encoder,
    ``quant_conv`` and diffusers' ``decode`` / ``tiled_decode`` / slicing logic are kept, so
    ``out.decode(z).sample`` is a drop-in for ``vae.decode(z).sample``. ``vae`` is untouched.
    Parts that cannot be rewritten stay torch and are named in one ``UserWarning``.
    """
    left: list[str] = []
    memo = {id(vae.decoder): build_decoder(vae.decoder, backend, left)}
    pqc = getattr(vae, "post_quant_conv", None)
    if pqc is not None:
        try:
            memo[id(pqc)] = Conv(pqc, backend=backend)
        except _Unsupported as e:
            left.append(f"post_quant_conv ({type(pqc).__name__}: {e})")
    # deepcopy with the rebuilt parts pre-seeded in the memo: the copy gets them in place of the
    # originals, and the decoder's weights are not copied twice on the way
    model = copy.deepcopy(vae, memo)
    if left:
        warnings.warn(f"genfuse.accelerate: {len(left)} part(s) of the AutoencoderKL decoder left "
                      f"on torch (not supported by the genfuse rewrite): {', '.join(left)}", stacklevel=3)
    return model


# --------------------------------------------------------------------------------------
# Loading a user's VAE
# --------------------------------------------------------------------------------------
class VAENotFoundError(ValueError):
    """The folder holds no diffusers AutoencoderKL (or its weights)."""


def _vae_folder(path: Path) -> Path:
    """``path`` itself (an AutoencoderKL folder) or its ``vae/`` subfolder (a pipeline folder)."""
    if not path.is_dir():
        raise FileNotFoundError(f"VAE folder {path} does not exist")
    for folder in (path, path / "vae"):
        config = folder / "config.json"
        if not config.is_file():
            continue
        try:
            name = json.loads(config.read_text()).get("_class_name")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise VAENotFoundError(f"{config} is not a JSON config: {e}") from None
        if name == "AutoencoderKL":
            return folder
        if folder == path and not (path / "vae").is_dir():
            raise VAENotFoundError(f"{config} describes a {name}, not an AutoencoderKL")
    raise VAENotFoundError(f"no VAE in {path}: expected a diffusers AutoencoderKL folder (config.json "
                           f"+ diffusion_pytorch_model.safetensors) or a pipeline folder with a vae/ subfolder")


def load_vae(path, *, device: str | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A diffusers ``AutoencoderKL`` from a local folder (or a pipeline folder's ``vae/``), eval mode.

    Raises FileNotFoundError for a missing folder, `VAENotFoundError` for a folder without a VAE
    or without its weights, ImportError (saying how to install) without diffusers.
    """
    folder = _vae_folder(Path(path))
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ImportError("decoding with a diffusers VAE needs diffusers: pip install 'genfuse[images]' "
                          "(or pip install diffusers)") from None
    try:
        vae = AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise VAENotFoundError(f"cannot load the AutoencoderKL in {folder}: {e}") from None
    return vae.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
