"""`accelerate()` for Hugging Face transformers causal LMs and diffusers pipelines.

What a transformers model gets (Llama, Mistral, Qwen2 and SmolLM2 through one path; GPT-2 through
another), for inference:

* **attention** through transformers' own registry: ``AttentionInterface.register("genfuse", ...)``
  (and the matching mask function, PyTorch SDPA's), so ``from_pretrained(...,
  attn_implementation="genfuse")`` works on its own once `register_attention` ran (importing
  ``genfuse.runtime.accelerate_hf`` or calling `accelerate` runs it). When transformers hands over
  no mask (no padding: the causal pattern is implied) attention is genfuse's causal kernel;
  a real mask (padded batches, a sliding window shorter than the keys), dropout, a soft cap or
  a position bias go to transformers' SDPA path, said once in a warning;
* Llama-family attention modules become `GenfuseLlamaAttention`: one fused QKV projection
  (``genfuse.kernels.linear``, with Qwen2's biases), genfuse rotary (on the cos/sin transformers
  computed, so every rope scaling it knows is kept), then the attention interface and the
  output projection. GPT-2 keeps its ``GPT2Attention`` with its ``Conv1D``s on genfuse linear;
* RMSNorm / LayerNorm -> ``genfuse.kernels.rms_norm`` / ``layer_norm``;
* the MLP: Llama's gate/up as one projection into ``swiglu``, GPT-2's ``c_fc`` with its GELU
  (tanh) in the GEMM epilogue; the LM head on genfuse linear.

Eager calls go to the plain ``genfuse.kernels`` functions (the cheapest route: no dispatcher);
under ``torch.compile`` the modules call ``torch.ops.genfuse.*``, which the compiler traces
without graph breaks. ``backend`` is passed to every kernel call (None: Triton on CUDA and under
``TRITON_INTERPRET=1``, the torch reference on CPU).

A diffusers pipeline gets its VAE's decoder accelerated (`genfuse.runtime.vae`); its other
components are left and named.
"""
from __future__ import annotations

import copy
import logging
import sys
import warnings
from typing import List, Optional

import torch
from torch import nn

from genfuse import kernels as gk

_log = logging.getLogger("genfuse")
G = torch.ops.genfuse

LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                "LlamaModel", "MistralModel", "Qwen2Model")
GPT2_FAMILY = ("GPT2LMHeadModel", "GPT2Model")
_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
_LLAMA_ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention")
_LLAMA_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                     "relu": "relu", "silu": "silu", "tanh": "tanh"}


def is_transformers_model(module: object) -> bool:
    if "transformers" not in sys.modules:  # no transformers model can exist yet
        return False
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


def is_diffusers_pipeline(obj: object) -> bool:
    if "diffusers" not in sys.modules:
        return False
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline)


def _eager(backend: Optional[str]) -> bool:
    """Call the plain function (True) or the operator (False, only while compiling)."""
    return backend is not None or not torch.compiler.is_compiling()


# --------------------------------------------------------------------------------------
# Attention through transformers' registry
# --------------------------------------------------------------------------------------
_warned_fallback = set()


def _fallback(why: str, *args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if why not in _warned_fallback:
        _warned_fallback.add(why)
        _log.warning("genfuse attention: %s; this call (and others like it) runs transformers' "
                     "SDPA attention", why)
    return sdpa_attention_forward(*args, **kwargs)


def genfuse_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                              dropout: float = 0.0, scaling: Optional[float] = None,
                              is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention-function contract: query ``(B, Hq, T, D)``, key/value
    ``(B, Hkv, S, D)`` (not repeated for GQA); returns ``((B, T, Hq, D), None)``.

    Without a mask the pattern is SDPA's ``is_causal`` one (transformers drops the mask only
    when ``T == 1``, ``S == T``, or a static cache's unwritten tail follows the prompt, which
    is sliced off as SDPA's path does), so genfuse's bottom-right causal kernel is exact.
    """
    why = None
    if attention_mask is not None:
        why = "an explicit attention mask (padding, or a sliding window shorter than the keys)"
    elif dropout:
        why = "attention dropout (training)"
    elif kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        why = "a soft cap or a position bias"
    elif kwargs.get("output_attentions"):
        why = "output_attentions=True"
    if why is not None:
        return _fallback(why, module, query, key, value, attention_mask, dropout=dropout,
                         scaling=scaling, is_causal=is_causal, **kwargs)
    t, s = query.shape[2], key.shape[2]
    causal = (is_causal if is_causal is not None else getattr(module, "is_causal", True)) and t > 1
    if causal and s > t:  # a static cache's unwritten slots after a prompt at offset 0
        key, value = key[:, :, :t], value[:, :, :t]
    backend = getattr(module, "genfuse_backend", None)
    if _eager(backend):
        out = gk.attention(query, key, value, causal=causal, scale=scaling, backend=backend)
    else:
        out = G.attention(query, key, value, causal, scaling)
    return out.transpose(1, 2), None  # (B, T, Hq, D)


_registered = False


def register_attention() -> None:
    """Register ``"genfuse"`` in transformers' attention and attention-mask registries."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("genfuse", genfuse_attention_forward)
    # SDPA's mask function: None when the causal pattern is implied (then the kernel runs),
    # a boolean mask otherwise (then the SDPA fallback uses it)
    AttentionMaskInterface.register("genfuse", sdpa_mask)
    _registered = True


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------
class GenfuseLinear(nn.Module):
    """``act(x @ weight.T + bias)`` on ``genfuse.kernels.linear``; ``weight`` ``(N, K)`` may be a
    view (a GPT-2 ``Conv1D``'s transposed weight) and may be a shared Parameter (tied heads)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 activation: Optional[str] = None, backend: Optional[str] = None):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.activation, self.backend = activation, backend

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if _eager(self.backend):
            return gk.linear(x, self.weight, self.bias, activation=self.activation,
                             residual=residual, backend=self.backend)
        return G.linear(x, self.weight, self.bias, self.activation, residual)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, bias={self.bias is not None}, activation={self.activation}"


def _linear_from(m: nn.Module, activation=None, backend=None) -> GenfuseLinear:
    if isinstance(m, nn.Linear):
        return GenfuseLinear(m.weight, m.bias, activation, backend)
    return GenfuseLinear(m.weight.t(), m.bias, activation, backend)  # transformers' Conv1D (K, N)


class GenfuseRMSNorm(nn.Module):
    def __init__(self, weight: nn.Parameter, eps: float, backend: Optional[str] = None):
        super().__init__()
        self.weight, self.eps, self.backend = weight, float(eps), backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _eager(self.backend):
            return gk.rms_norm(x, self.weight, self.eps, backend=self.backend)
        return G.rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class GenfuseLayerNorm(nn.Module):
    def __init__(self, weight, bias, eps: float, backend: Optional[str] = None):
        super().__init__()
        self.weight, self.bias, self.eps, self.backend = weight, bias, float(eps), backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _eager(self.backend):
            return gk.layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)
        return G.layer_norm(x, self.weight, self.bias, self.eps)


class GenfuseSwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` as one gate|up GEMM, ``swiglu`` and the down GEMM."""

    def __init__(self, mlp: nn.Module, backend: Optional[str] = None):
        super().__init__()
        g, u = mlp.gate_proj, mlp.up_proj
        self.gate_up = GenfuseLinear(
            nn.Parameter(torch.cat([g.weight, u.weight]).detach(), requires_grad=False),
            None if g.bias is None else nn.Parameter(torch.cat([g.bias, u.bias]).detach(),
                                                     requires_grad=False), None, backend)
        self.down = _linear_from(mlp.down_proj, None, backend)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up(x)                                           # (..., 2 * I)
        h = gk.swiglu(h, backend=self.backend) if _eager(self.backend) else G.swiglu(h)
        return self.down(h)


class GenfuseMLP(nn.Module):
    """GPT-2's MLP: ``c_proj(act(c_fc(x)))`` with the activation in ``c_fc``'s epilogue."""

    def __init__(self, mlp: nn.Module, activation: str, backend: Optional[str] = None):
        super().__init__()
        self.c_fc = _linear_from(mlp.c_fc, activation, backend)
        self.c_proj = _linear_from(mlp.c_proj, None, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.c_fc(x))


class GenfuseLlamaAttention(nn.Module):
    """Llama / Mistral / Qwen2 attention: fused QKV, genfuse rotary, the attention interface."""

    def __init__(self, attn: nn.Module, backend: Optional[str] = None):
        super().__init__()
        self.config, self.layer_idx = attn.config, attn.layer_idx
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.num_key_value_groups = attn.num_key_value_groups
        self.is_causal = attn.is_causal
        self.attention_dropout = attn.attention_dropout
        self.sliding_window = getattr(attn, "sliding_window", None)
        self.hkv = attn.k_proj.weight.shape[0] // self.head_dim
        self.hq = attn.q_proj.weight.shape[0] // self.head_dim
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        weight = torch.cat([p.weight for p in projs]).detach()       # ((Hq + 2 Hkv) D, hidden)
        bias = None
        if any(p.bias is not None for p in projs):
            bias = torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.weight.shape[0])
                              for p in projs]).detach()
        self.qkv = GenfuseLinear(nn.Parameter(weight, requires_grad=False),
                                 None if bias is None else nn.Parameter(bias, requires_grad=False),
                                 None, backend)
        self.o_proj = _linear_from(attn.o_proj, None, backend)
        self.genfuse_backend = backend

    def _rotary(self, q, k, cos, sin):
        # transformers' tables are (B, T, r) with both halves equal (rotate-half layout), already
        # scaled by its attention factor: their first halves, one row per token, are genfuse's
        # (positions, r/2) tables, indexed by the token's own row.
        b, t, r = cos.shape
        cos2 = cos.reshape(b * t, r)[:, : r // 2].float()
        sin2 = sin.reshape(b * t, r)[:, : r // 2].float()
        rows = torch.arange(b * t, device=q.device)
        rows = rows if b == 1 else rows.view(b, t)  # (T,) shared by the batch, or (B, T)
        if _eager(self.genfuse_backend):
            return gk.rotary_embedding(q, k, cos2, sin2, rows, validate=False,
                                       backend=self.genfuse_backend)
        return G.rotary_embedding(q, k, cos2, sin2, rows)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None,
                attention_mask: Optional[torch.Tensor] = None, cache=None, past_key_values=None,
                **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        cache = cache if cache is not None else past_key_values
        b, t, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).view(b, t, self.hq + 2 * self.hkv, self.head_dim)
        q, k, v = qkv.transpose(1, 2).split([self.hq, self.hkv, self.hkv], dim=1)  # (B, H, T, D)
        cos, sin = position_embeddings
        q, k = self._rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, genfuse_attention_forward)
        out, weights = attention_interface(
            self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling, sliding_window=self.sliding_window, **kwargs)
        out = out.reshape(b, t, -1)                                   # (B, T, Hq * D)
        return self.o_proj(out), weights


# --------------------------------------------------------------------------------------
# The rewrite
# --------------------------------------------------------------------------------------
def _swap_llama(model: nn.Module, backend, left: List[str]) -> None:
    act = getattr(model.config, "hidden_act", None)
    for name, m in list(model.named_modules()):
        for cname, child in list(m.named_children()):
            path = f"{name}.{cname}" if name else cname
            kind = type(child).__name__
            if kind in _RMS_NORMS:
                setattr(m, cname, GenfuseRMSNorm(child.weight, child.variance_epsilon, backend))
            elif kind in _LLAMA_ATTENTIONS:
                setattr(m, cname, GenfuseLlamaAttention(child, backend))
            elif kind in _LLAMA_MLPS:
                if act == "silu":
                    setattr(m, cname, GenfuseSwiGLUMLP(child, backend))
                else:
                    left.append(f"{path} ({kind}: hidden_act={act!r}, genfuse fuses SiLU only)")
            elif isinstance(child, nn.Linear) and cname == "lm_head":
                setattr(m, cname, _linear_from(child, None, backend))


def _swap_gpt2(model: nn.Module, backend, left: List[str]) -> None:
    act = getattr(model.config, "activation_function", None)
    for name, m in list(model.named_modules()):
        for cname, child in list(m.named_children()):
            path = f"{name}.{cname}" if name else cname
            kind = type(child).__name__
            if isinstance(child, nn.LayerNorm):
                setattr(m, cname, GenfuseLayerNorm(child.weight, child.bias, child.eps, backend))
            elif kind == "GPT2Attention":
                if child.is_cross_attention or child.reorder_and_upcast_attn:
                    left.append(f"{path} (GPT2Attention: cross attention or reorder_and_upcast_attn)")
                    continue
                child.c_attn = _linear_from(child.c_attn, None, backend)
                child.c_proj = _linear_from(child.c_proj, None, backend)
                child.genfuse_backend = backend
            elif kind == "GPT2MLP":
                if act in _GPT2_ACTIVATIONS:
                    setattr(m, cname, GenfuseMLP(child, _GPT2_ACTIVATIONS[act], backend))
                else:
                    left.append(f"{path} (GPT2MLP: activation_function={act!r})")
            elif isinstance(child, nn.Linear) and cname == "lm_head":
                setattr(m, cname, _linear_from(child, None, backend))


def accelerate_transformers(model: nn.Module, *, backend: Optional[str] = None,
                            inplace: bool = False) -> nn.Module:
    """A transformers causal LM with its norms, rotary, MLP, attention and LM head on genfuse.

    ``model`` is untouched unless ``inplace=True`` (then it is patched and returned). The result
    is an inference model: ``model.generate(...)`` and ``transformers.pipeline(...)`` work as
    before; fused projections hold new (concatenated) weights, everything else shares the
    original's parameters.
    """
    name = type(model).__name__
    if name not in LLAMA_FAMILY + GPT2_FAMILY:
        raise ValueError(f"genfuse.accelerate supports transformers' {', '.join(LLAMA_FAMILY + GPT2_FAMILY)}; "
                         f"got {name}")
    register_attention()
    if not inplace:
        model = copy.deepcopy(model)
    left: List[str] = []
    with torch.no_grad():
        (_swap_gpt2 if name in GPT2_FAMILY else _swap_llama)(model, backend, left)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("genfuse")
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = "genfuse"
    model.eval()
    if left:
        warnings.warn(f"genfuse.accelerate: {len(left)} module(s) left on torch (not supported by "
                      f"the genfuse rewrite): {', '.join(left)}", stacklevel=3)
    return model


def accelerate_pipeline(pipe, *, backend: Optional[str] = None, inplace: bool = False):
    """A diffusers pipeline whose VAE decodes on genfuse kernels (`genfuse.runtime.vae`).

    The pipeline is copied shallowly (every other component is shared with ``pipe``, which is
    untouched) unless ``inplace=True``; the components left as they are are named in one warning.
    """
    from genfuse.runtime import vae as _vae

    vae = getattr(pipe, "vae", None)
    if vae is None or not _vae.is_autoencoder_kl(vae):
        raise ValueError(f"genfuse.accelerate: {type(pipe).__name__} has no AutoencoderKL 'vae' "
                         f"to accelerate (got {type(vae).__name__})")
    out = pipe if inplace else copy.copy(pipe)
    out.vae = _vae.accelerate_autoencoder_kl(vae, backend=backend)  # warns about its own leftovers
    left = [k for k, v in pipe.components.items() if k != "vae" and isinstance(v, nn.Module)]
    if left:
        warnings.warn(f"genfuse.accelerate: the pipeline's vae decoder runs on genfuse; left on "
                      f"torch: {', '.join(left)}", stacklevel=3)
    return out


# Importing this module registers "genfuse" with transformers (from_pretrained(
# attn_implementation="genfuse")) and torch.ops.genfuse.* (what the modules and the attention
# function call while compiling). genfuse.accelerate imports it only for transformers / diffusers
# objects, so a DCGAN's accelerate pays for neither.
from genfuse.kernels import ops as _ops  # noqa: E402,F401

try:
    register_attention()
except ImportError:  # pragma: no cover - transformers not installed: accelerate() says so when asked
    pass
