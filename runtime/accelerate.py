"""`accelerate(module)`: the same model with its forward on genfuse kernels.

A diffusers ``AutoencoderKL`` is handed to `genfuse.runtime.vae` (its ``decode`` on the
kernels). Everything else goes through the rewrite below, written for DCGAN-style
generators, i.e. stacks of ``ConvTranspose2d`` / ``Conv2d`` / ``BatchNorm2d`` / ``ReLU`` /
``LeakyReLU`` / ``Tanh`` / ``Sigmoid`` in an ``nn.Sequential`` or in modules holding one
(the PyTorch tutorial's ``Generator`` keeps ``self.main``).

How a stack is rewritten, at build time, once:

* conv -> ``genfuse.kernels.conv2d`` / ``conv_transpose2d``;
* a ``BatchNorm2d`` right after a conv is folded into that conv's weight and bias
  (``fold_batchnorm``, eval semantics: the running statistics, whatever ``module.training``
  says) - one pass over the activations saved per layer;
* the activation right after that (ReLU, LeakyReLU with its slope, Tanh, Sigmoid) runs in the
  conv's epilogue - another pass saved;
* a nearest ``Upsample`` by an integer factor right before a ``Conv2d`` is folded into that
  conv's input indexing (``conv2d(upsample=)``: the upsampled tensor never exists);
* a BatchNorm that follows no conv becomes a per-channel ``x * scale + shift`` (elementwise
  torch, no ``F.batch_norm``); a lone activation stays the torch module it was.

Anything else (dilated or grouped convs, non-zero padding modes, BatchNorm without running
statistics, modules of other types) is left as it is and named in one warning, so the model
still runs, partly on torch. The original module is never modified: the result is a deep copy
whose ``nn.Sequential`` stacks are swapped for `FusedSequential` stacks, so it keeps the
original's call signature and ``forward``.
"""
from __future__ import annotations

import copy
import sys
import warnings
from typing import List, Optional, Tuple

import torch
from torch import nn

from genfuse import kernels as gk

# Activation modules -> (epilogue name, negative_slope).
_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid)


def _epilogue(m: nn.Module) -> Tuple[str, float]:
    if isinstance(m, nn.ReLU):
        return "relu", 0.0
    if isinstance(m, nn.LeakyReLU):
        return "leaky_relu", float(m.negative_slope)
    if isinstance(m, nn.Tanh):
        return "tanh", 0.0
    return "sigmoid", 0.0


class FusedConv(nn.Module):
    """One conv (or transposed conv) with folded BatchNorm and fused activation.

    Weight and bias are buffers, not parameters: this module is for inference, and
    ``.to(device, dtype)`` / ``.half()`` still move them.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], *, transposed: bool,
                 stride: Tuple[int, int], padding: Tuple[int, int],
                 output_padding: Tuple[int, int] = (0, 0), activation: Optional[str] = None,
                 negative_slope: float = 0.0, upsample: int = 1, backend: Optional[str] = None,
                 source: str = ""):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.transposed = transposed
        self.stride, self.padding, self.output_padding = stride, padding, output_padding
        self.activation, self.negative_slope = activation, negative_slope
        self.upsample = upsample
        self.backend = backend
        self.source = source  # the original modules, for repr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return gk.conv_transpose2d(x, self.weight, self.bias, stride=self.stride,
                                       padding=self.padding, output_padding=self.output_padding,
                                       activation=self.activation,
                                       negative_slope=self.negative_slope, backend=self.backend)
        return gk.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                         upsample=self.upsample, activation=self.activation, negative_slope=self.negative_slope,
                         backend=self.backend)

    def extra_repr(self) -> str:
        kind = "conv_transpose2d" if self.transposed else "conv2d"
        up = f"upsample={self.upsample}, " if self.upsample != 1 else ""
        return (f"{kind} {tuple(self.weight.shape)}, {up}stride={self.stride}, padding={self.padding}, "
                f"activation={self.activation}, from [{self.source}]")


class ChannelAffine(nn.Module):
    """Eval-mode BatchNorm2d with nothing to fold into: ``x * scale + shift`` per channel."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (C,) -> (C, 1, 1) broadcasts over (N, C, H, W)
        return torch.addcmul(self.shift[:, None, None], x, self.scale[:, None, None])


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` of fused stages; what `accelerate` puts where a stack was."""


# --------------------------------------------------------------------------------------
# Which modules can be rewritten
# --------------------------------------------------------------------------------------
def _conv_problem(m: nn.Module) -> Optional[str]:
    """Why this conv cannot run on genfuse kernels, or None when it can."""
    if m.groups != 1:
        return f"groups={m.groups}"
    if tuple(m.dilation) != (1, 1):
        return f"dilation={tuple(m.dilation)}"
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r}"
    if isinstance(m.padding, str):
        return f"padding={m.padding!r}"
    return None


def _nearest_factor(m: nn.Module) -> Optional[int]:
    """The integer factor of a nearest ``nn.Upsample`` (same on H and W), else None."""
    if not isinstance(m, nn.Upsample) or m.mode != "nearest" or m.size is not None:
        return None
    f = m.scale_factor
    f = tuple(f) if isinstance(f, (tuple, list)) else (f, f)
    if len(f) != 2 or f[0] != f[1] or float(f[0]) != int(f[0]) or int(f[0]) < 1:
        return None
    return int(f[0])


def _bn_problem(m: nn.BatchNorm2d, channels: Optional[int] = None) -> Optional[str]:
    if m.running_mean is None or m.running_var is None:
        return "no running statistics (track_running_stats=False)"
    if channels is not None and m.num_features != channels:
        return f"{m.num_features} features after a conv with {channels} output channels"
    return None


def _bn_fold(conv_weight, conv_bias, bn: nn.BatchNorm2d, transposed: bool):
    return gk.fold_batchnorm(conv_weight, conv_bias, bn.weight, bn.bias, bn.running_mean,
                             bn.running_var, bn.eps, transposed=transposed)


@torch.no_grad()
def _fuse_sequential(seq: nn.Sequential, prefix: str, backend: Optional[str],
                     left: List[str]) -> FusedSequential:
    items = list(seq.named_children())
    stages: List[nn.Module] = []
    i = 0
    while i < len(items):
        name, m = items[i]
        path = f"{prefix}{name}"
        upsample, used = 1, []
        if _nearest_factor(m) is not None and i + 1 < len(items) \
                and isinstance(items[i + 1][1], nn.Conv2d) and _conv_problem(items[i + 1][1]) is None:
            upsample, used = _nearest_factor(m), [path]
            i += 1
            name, m = items[i]
            path = f"{prefix}{name}"
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and _conv_problem(m) is None:
            transposed = isinstance(m, nn.ConvTranspose2d)
            weight, bias = m.weight, m.bias
            used.append(path)
            j = i + 1
            out_channels = m.out_channels
            if j < len(items) and isinstance(items[j][1], nn.BatchNorm2d) \
                    and _bn_problem(items[j][1], out_channels) is None:
                weight, bias = _bn_fold(weight, bias, items[j][1], transposed)
                used.append(f"{prefix}{items[j][0]}")
                j += 1
            activation, slope = None, 0.0
            if j < len(items) and isinstance(items[j][1], _ACTIVATIONS):
                activation, slope = _epilogue(items[j][1])
                used.append(f"{prefix}{items[j][0]}")
                j += 1
            stages.append(FusedConv(
                weight, bias, transposed=transposed, stride=tuple(m.stride), padding=tuple(m.padding),
                output_padding=tuple(m.output_padding) if transposed else (0, 0),
                activation=activation, negative_slope=slope, upsample=upsample, backend=backend,
                source=", ".join(used)))
            i = j
            continue
        if isinstance(m, nn.BatchNorm2d) and _bn_problem(m) is None:
            g = m.running_var.double().add(m.eps).rsqrt()
            if m.weight is not None:
                g = g * m.weight.double()
            shift = -m.running_mean.double() * g
            if m.bias is not None:
                shift = shift + m.bias.double()
            stages.append(ChannelAffine(g.to(m.running_var.dtype), shift.to(m.running_var.dtype)))
        elif isinstance(m, nn.Sequential):
            stages.append(_fuse_sequential(m, f"{path}.", backend, left))
        elif isinstance(m, _ACTIVATIONS):
            stages.append(m)  # elementwise torch, nothing to fuse into
        else:
            stages.append(m)
            left.append(_describe(path, m))
        i += 1
    return FusedSequential(*stages)


def _describe(path: str, m: nn.Module) -> str:
    why = ""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        why = f": {_conv_problem(m)}"
    elif isinstance(m, nn.BatchNorm2d):
        why = f": {_bn_problem(m)}"
    elif isinstance(m, nn.Upsample):
        why = (f": mode={m.mode!r}, scale_factor={m.scale_factor}" if _nearest_factor(m) is None
               else ": not followed by a Conv2d to fold into")
    return f"{path} ({type(m).__name__}{why})"


def _rewrite(parent: nn.Module, prefix: str, backend: Optional[str], left: List[str]) -> None:
    """Swap, in place on the copy, every Sequential / lone conv under ``parent``."""
    for name, child in list(parent.named_children()):
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            setattr(parent, name, _fuse_sequential(child, f"{path}.", backend, left))
        elif isinstance(child, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)):
            # a lone conv or BatchNorm: a one-item stack, unwrapped
            fused = _fuse_sequential(nn.Sequential(child), f"{prefix}", backend, [])
            if isinstance(fused[0], (FusedConv, ChannelAffine)):
                setattr(parent, name, fused[0])
            else:
                left.append(_describe(path, child))
        elif len(list(child.children())):
            _rewrite(child, f"{path}.", backend, left)
        elif not isinstance(child, _ACTIVATIONS):
            left.append(_describe(path, child))


def accelerate(module, *, backend: Optional[str] = None, inplace: bool = False):
    """A copy of ``module`` whose compute runs on genfuse kernels; ``module`` is untouched.

    Args:
        module: an ``nn.Sequential`` of ConvTranspose2d / Conv2d / BatchNorm2d / ReLU /
            LeakyReLU / Tanh / Sigmoid, or any module holding such stacks (e.g. a DCGAN
            ``Generator`` with ``self.main``). Any widths, with or without conv bias.
            A diffusers ``AutoencoderKL`` goes to `genfuse.runtime.vae`: its ``decode()``
            runs on the kernels (see that module). A transformers causal LM (Llama, Mistral,
            Qwen2, SmolLM2, GPT-2) or a diffusers pipeline goes to
            `genfuse.runtime.accelerate_hf` (attention through transformers'
            ``AttentionInterface``; a pipeline's VAE decoder).
        backend: passed to every kernel call (None: Triton on CUDA and under
            ``TRITON_INTERPRET=1``, the torch reference ops otherwise; see `genfuse.kernels`).
        inplace: transformers models and diffusers pipelines only: patch ``module`` itself
            and return it, instead of a patched copy (saves the copy's memory).

    Returns:
        A module with the same call signature. BatchNorm uses its running statistics (eval
        semantics) and is folded into the conv before it; the activation after is fused into
        the conv's epilogue. Modules that cannot be rewritten are kept as they are and named
        in a single ``UserWarning``. The copy is an inference module: its fused weights are
        buffers, not parameters.
    """
    from genfuse.runtime import vae  # here, not at the top: vae imports this module

    # A transformers model or diffusers pipeline can only exist once its library is imported;
    # only then is accelerate_hf (which imports transformers and torch.ops.genfuse) loaded.
    if "transformers" in sys.modules or "diffusers" in sys.modules:
        from genfuse.runtime import accelerate_hf

        if accelerate_hf.is_diffusers_pipeline(module):
            return accelerate_hf.accelerate_pipeline(module, backend=backend, inplace=inplace)
        if accelerate_hf.is_transformers_model(module):
            return accelerate_hf.accelerate_transformers(module, backend=backend, inplace=inplace)
    if not isinstance(module, nn.Module):
        raise TypeError(f"accelerate() takes an nn.Module or a diffusers pipeline, got {type(module).__name__}")
    if inplace:
        raise ValueError("accelerate(inplace=True) is for transformers models and diffusers "
                         "pipelines; a conv stack is always rebuilt as a copy")

    if vae.is_autoencoder_kl(module):
        return vae.accelerate_autoencoder_kl(module, backend=backend)
    left: List[str] = []
    model = copy.deepcopy(module)
    if isinstance(model, nn.Sequential):
        model = _fuse_sequential(model, "", backend, left)
    elif isinstance(model, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)):
        fused = _fuse_sequential(nn.Sequential(model), "", backend, left)
        model = fused[0] if not left else model
    elif not len(list(model.children())):
        left.append(f"the module itself ({type(model).__name__})")
    else:
        _rewrite(model, "", backend, left)
    if left:
        warnings.warn(f"genfuse.accelerate: {len(left)} module(s) left on torch "
                      f"(not supported by the genfuse rewrite): {', '.join(left)}", stacklevel=2)
    return model
