"""What every kernel family shares: backend choice, input validation, output allocation.

Three ways to run each op (README.md, "Execution backends"):

* CUDA tensors                                 -> compiled Triton kernels
* CPU tensors with ``TRITON_INTERPRET=1``        -> the same kernels through Triton's interpreter
* CPU tensors otherwise (the default on CPU)   -> the torch reference op

Triton decides between compiling and interpreting when a kernel is *decorated*, i.e. when
``genfuse.kernels`` is imported, so the interpreter flag is read once, here, at import.
"""
from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

try:  # triton >= 3.4 keeps its settings in knobs; older ones read the environment directly
    from triton import knobs as _knobs

    INTERPRET: bool = bool(_knobs.runtime.interpret)
except (ImportError, AttributeError):  # pragma: no cover - depends on the triton version
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_log = logging.getLogger("genfuse")
_warned_bf16_fallback = False
BACKENDS = (None, "triton", "torch")


def resolve_backend(backend: Optional[str], *tensors: torch.Tensor) -> str:
    """Pick ``"triton"`` or ``"torch"`` for inputs living on ``tensors[0].device``.

    ``None`` picks Triton for CUDA tensors and for CPU tensors under the interpreter, torch
    otherwise. Asking for Triton on CPU tensors without the interpreter is an error, not a
    silent fallback.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")
    device = tensors[0].device
    if backend == "torch":
        return "torch"
    if device.type == "cuda":
        return "triton"
    if INTERPRET:
        if any(t.dtype == torch.bfloat16 for t in tensors if t is not None):
            if backend is None:
                # The interpreter stores bf16 as raw uint16 and computes garbage with it;
                # the reference op is the honest answer on CPU. Said once, not per call.
                global _warned_bf16_fallback
                if not _warned_bf16_fallback:
                    _warned_bf16_fallback = True
                    _log.warning("bfloat16 on CPU: Triton's interpreter cannot compute in bf16, "
                                 "using the torch reference ops instead")
                return "torch"
            raise TypeError(
                "backend='triton' on CPU runs Triton's interpreter, which cannot compute in "
                "bfloat16; use float16/float32 on CPU, a CUDA device, or backend='torch'"
            )
        return "triton"
    if backend == "triton":
        raise ValueError(
            f"backend='triton' needs CUDA tensors or Triton's interpreter, but the inputs are on "
            f"{device} and TRITON_INTERPRET was not set to 1 when genfuse.kernels was imported"
        )
    return "torch"


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: Optional[int | Sequence[int]] = None,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
) -> torch.Tensor:
    """Validate one argument; errors name it and carry the numbers."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if dtypes and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; supported: {names}")
    return t


def check_same(ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    """All named tensors share ``ref``'s device and dtype."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
        if t.dtype != ref.dtype:
            raise TypeError(
                f"{name} has dtype {str(t.dtype).replace('torch.', '')} but {ref_name} has "
                f"{str(ref.dtype).replace('torch.', '')}"
            )


def check_device(ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    """All named tensors live on ``ref``'s device (dtypes may differ, e.g. int index tensors)."""
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_real(name: str, value: object, *, positive: bool = False,
               nonnegative: bool = False) -> float:
    """A finite real-number argument (scale, eps, negative_slope, ...) as a float.

    bools, strings and tensors are refused with TypeError; NaN, +-inf and values on the wrong
    side of zero with ValueError, naming the argument and the value.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and not v >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return v


def check_scale(scale: object, head_dim: int) -> float:
    """The softmax scale of every attention op: None means ``1 / sqrt(head_dim)``, otherwise a
    positive finite real (0 would make every row uniform, a negative one inverts the softmax)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    return check_real("scale", scale, positive=True)


# --------------------------------------------------------------------------------------
# Index validation. Index tensors (block tables, lengths, positions) steer the kernels' loads,
# so an entry out of range reads outside a buffer. The public ops check them with one min/max
# reduction and one host sync; trusted callers (the engine, a CUDA graph) pass validate=False.
# --------------------------------------------------------------------------------------
def min_max(*tensors: torch.Tensor) -> List[Optional[Tuple[int, int]]]:
    """``(min, max)`` of each integer tensor (None for an empty one), with one host sync."""
    if any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing():
        raise ValueError("validate=True reads index ranges on the host, which a CUDA graph "
                         "capture cannot do; pass validate=False for trusted indices")
    stats = [s.to(torch.int64) for t in tensors if t.numel() for s in torch.aminmax(t)]
    values = torch.stack(stats).tolist() if stats else []
    out: List[Optional[Tuple[int, int]]] = []
    for t in tensors:
        if t.numel():
            out.append((values[0], values[1]))
            values = values[2:]
        else:
            out.append(None)
    return out


def raise_out_of_range(name: str, t: torch.Tensor, lo: int, hi: int, bound: str,
                       where: Optional[torch.Tensor] = None) -> None:
    """Raise ValueError naming the first element of ``t`` outside ``[lo, hi]`` (inclusive):
    ``block_table[1, 0] = -1 is outside [0, 7] (bound)``. Error path only (it syncs again)."""
    bad = (t < lo) | (t > hi)
    if where is not None:
        bad &= where
    idx = bad.nonzero()[0].tolist()
    value = t[tuple(idx)].item()
    raise ValueError(f"{name}[{', '.join(map(str, idx))}] = {value} is outside [{lo}, {hi}] ({bound})")


# --------------------------------------------------------------------------------------
# Output allocation. Tests switch on poisoning so that an element a kernel forgot to write
# reads as NaN and fails the comparison instead of passing by luck on recycled memory.
# --------------------------------------------------------------------------------------
_POISON = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Within this context every kernel output buffer starts filled with NaN."""
    global _POISON
    previous, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = previous


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs (NaN-filled while :func:`poison_outputs` is on)."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if _POISON and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def prev_power_of_2(n: int) -> int:
    """The largest power of two <= n (1 for n <= 1): a block size that must stay under a cap."""
    return 1 if n <= 1 else 1 << (int(n).bit_length() - 1)


# --------------------------------------------------------------------------------------
# Autotune spaces. By default every kernel times its whole pruned space once per autotune key,
# which is what users want (the best tile, tuned once). The GPU check has a few minutes for
# everything, so GENFUSE_AUTOTUNE=quick narrows each space to a short list per shape class
# (chosen from the sm_90 compile check's register / shared-memory data, see each kernel's
# ``_quick_configs``): compile and tuning then fit the check. Read once, at import, like
# TRITON_INTERPRET above.
# --------------------------------------------------------------------------------------
AUTOTUNE_MODES = ("full", "quick")


def _autotune_mode(value: Optional[str]) -> str:
    mode = (value or "full").strip().lower() or "full"
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"GENFUSE_AUTOTUNE must be one of {', '.join(AUTOTUNE_MODES)}, got {value!r}")
    return mode


AUTOTUNE: str = _autotune_mode(os.environ.get("GENFUSE_AUTOTUNE"))


def config_key(config) -> tuple:
    """A triton.Config's identity: its meta-parameters, warps and stages."""
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


def quick_key(kwargs: dict, num_warps: int, num_stages: int) -> tuple:
    """``config_key`` of the config written as (meta-parameters, warps, stages)."""
    return (tuple(sorted(kwargs.items())), num_warps, num_stages)


def select_quick(kept: list, quick: Sequence[tuple], mode: Optional[str] = None) -> list:
    """What an autotune prune returns: ``kept`` (the configs that passed its rules) in full
    mode; in quick mode the members of ``kept`` whose ``config_key`` is in ``quick`` (in
    ``quick``'s order of preference), or the first kept config when none of them survived.

    Selecting from ``kept`` means a quick config always passed the same rules as in full mode."""
    if (AUTOTUNE if mode is None else mode) != "quick" or not kept:
        return kept
    by_key = {config_key(c): c for c in kept}
    chosen = [by_key[k] for k in quick if k in by_key]
    return chosen or kept[:1]


# --------------------------------------------------------------------------------------
# Launches. Every launcher goes through `launch`: under the interpreter the plain jit kernel with
# fixed meta-parameters (autotuning a CPU emulation would only multiply its cost), compiled the
# autotuned twin. While a tracer runs (the AOT dispatch of torch.compile decomposing a
# ``torch.ops.genfuse.*`` triton_op, make_fx) the kernel is wrapped by
# ``torch.library.wrap_triton`` so the launch becomes a node of the graph; in eager it is launched
# as it is, because the wrapper's higher-order-op dispatch costs about a millisecond a call.
# --------------------------------------------------------------------------------------
_TRACING_KEYS = tuple(getattr(torch._C._TorchDispatchModeKey, k)
                      for k in ("FAKE", "PROXY", "FUNCTIONAL")
                      if hasattr(torch._C._TorchDispatchModeKey, k))


def tracing() -> bool:
    """True while FakeTensor, proxy (make_fx) or functionalization tracing is active."""
    return any(torch._C._get_dispatch_mode(k) is not None for k in _TRACING_KEYS)


def traceable(kernel):
    """``kernel`` for an eager launch, ``wrap_triton(kernel)`` while tracing (see above)."""
    if tracing():
        from torch.library import wrap_triton

        return wrap_triton(kernel)
    return kernel


def launch(kernel, tuned, grid, *args, interpret_meta: Optional[dict] = None, **kwargs) -> None:
    """The interpreter-or-autotuned launch choice every launcher makes, in one place.

    ``kernel`` is the ``@triton.jit`` function, ``tuned`` its ``triton.autotune`` wrapper (or
    None for kernels launched with deterministic settings); ``interpret_meta`` the fixed
    meta-parameters used instead of tuning under the interpreter. ``grid`` is a tuple or a
    ``meta -> tuple`` callable (called with ``interpret_meta`` under the interpreter).
    """
    if INTERPRET or tuned is None:
        meta = interpret_meta if INTERPRET and interpret_meta else {}
        traceable(kernel)[grid](*args, **kwargs, **meta)
    else:
        traceable(tuned)[grid](*args, **kwargs)


def rows(t: torch.Tensor, last: int) -> torch.Tensor:
    """``t`` (..., last) as a 2-D (rows, last) tensor, a view whenever the strides allow.

    2-D tensors pass through with any strides (the kernels take both strides); 1-D becomes one
    row. For >2-D, ``view`` works whenever the leading dims collapse into one stride (any
    contiguous tensor, slices along the last dim, ...). Otherwise (a slice along a middle dim,
    a broadcast ``expand`` of the batch) ``reshape`` makes one documented copy rather than
    teach the kernels an arbitrary number of batch strides.
    """
    if t.dim() == 2:
        return t
    if t.dim() == 1:
        return t.unsqueeze(0)
    try:
        return t.view(-1, last)
    except RuntimeError:
        return t.reshape(-1, last)  # copy: leading dims are not collapsible into one stride


# --------------------------------------------------------------------------------------
# Block-size settings of the row-wise kernels (norms, SwiGLU): rows of N columns in tiles of
# (BLOCK_M, BLOCK_N), BLOCK_N the row rounded up to a power of two (capped), short rows stacked
# until a program holds about ``elems`` elements, warps chosen by the tile's element count.
# --------------------------------------------------------------------------------------
def row_tile(m: int, n: int, *, elems: int = 4096, max_block_n: Optional[int] = None) -> Tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for an (m, n) row-wise launch."""
    block_n = next_power_of_2(n) if max_block_n is None else min(next_power_of_2(n), max_block_n)
    block_m = min(max(1, elems // block_n), next_power_of_2(m))
    return block_m, block_n


def warps_for(elems: int, steps: Sequence[Tuple[int, int]], last: int) -> int:
    """The warps of the first ``(limit, warps)`` step with ``elems <= limit``, else ``last``."""
    for limit, warps in steps:
        if elems <= limit:
            return warps
    return last


# --------------------------------------------------------------------------------------
# The activation epilogue of the GEMM-like kernels (linear, conv2d, conv_transpose2d): one
# table of names, one jit function, one torch twin. ``ACTIVATION`` is a string constexpr
# ("" for none), so every branch but the chosen one compiles away.
# --------------------------------------------------------------------------------------
import triton  # noqa: E402  (below: the module's torch-only helpers above need no triton)
import triton.language as tl  # noqa: E402

EPILOGUES = (None, "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "leaky_relu")


def check_activation(activation: Optional[str], allowed: Sequence[Optional[str]]) -> str:
    """``activation`` as the kernels' constexpr ("" for None); ValueError outside ``allowed``."""
    if activation not in allowed:
        raise ValueError(f"activation must be one of {tuple(allowed)}, got {activation!r}")
    return activation or ""


@triton.jit
def epilogue(x, ACTIVATION: tl.constexpr, negative_slope):
    """Apply the constexpr ACTIVATION (a name of ``EPILOGUES``, "" for none) to an fp32 tile."""
    if ACTIVATION == "relu":
        # not tl.maximum: it returns the non-NaN operand, and relu(NaN) must stay NaN (torch)
        x = tl.where(x < 0.0, 0.0, x)
    elif ACTIVATION == "gelu":  # exact: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))
        x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":  # 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)
        # 0.5 (1 + tanh(u)) == sigmoid(2u): one sigmoid, saturates cleanly for large |x|
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x * tl.sigmoid(2.0 * u)
    elif ACTIVATION == "silu":
        x = x * tl.sigmoid(x)
    elif ACTIVATION == "tanh":  # tanh(x) = 2 sigmoid(2x) - 1 (no tl.tanh in core; saturates to +-1)
        x = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    elif ACTIVATION == "sigmoid":
        x = tl.sigmoid(x)
    elif ACTIVATION == "leaky_relu":
        x = tl.where(x >= 0.0, x, x * negative_slope)
    return x


def epilogue_reference(y: torch.Tensor, activation: Optional[str], negative_slope: float = 0.0) -> torch.Tensor:
    """The torch twin of :func:`epilogue`."""
    F = torch.nn.functional
    if not activation:
        return y
    if activation == "relu":
        return torch.relu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "silu":
        return F.silu(y)
    if activation == "tanh":
        return torch.tanh(y)
    if activation == "sigmoid":
        return torch.sigmoid(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, negative_slope)
    raise ValueError(f"activation must be one of {EPILOGUES}, got {activation!r}")


def check_paged_cache(Hq: int, D: int, k_cache: torch.Tensor, v_cache: torch.Tensor, max_head_dim: int) -> None:
    """The shape checks every paged-cache kernel makes on its ``(num_blocks, block_size, Hkv, D)``
    K/V pools against queries of ``Hq`` heads of dim ``D`` (decode and unified attention)."""
    num_blocks, block_size, Hkv, Dk = k_cache.shape
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)} but k_cache has {tuple(k_cache.shape)}")
    if Dk != D:
        raise ValueError(f"q has head dim {D} but k_cache has {Dk}")
    if not 1 <= D <= max_head_dim:
        raise ValueError(f"q has head dim {D}; supported: 1..{max_head_dim}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"q has {Hq} heads, not a multiple of k_cache's {Hkv}")
    if num_blocks < 1 or block_size < 1:
        raise ValueError(f"k_cache has shape {tuple(k_cache.shape)}: needs at least one block of at least one slot")
