"""What every kernel family shares: backend choice, input validation, output allocation.

Three ways to run each op (DESIGN.md, "Execution backends"):

* CUDA tensors                                 -> compiled Triton kernels
* CPU tensors with ``TRITON_INTERPRET=1``        -> the same kernels through Triton's interpreter
* CPU tensors otherwise (the default on CPU)   -> the torch reference op

Triton decides between compiling and interpreting when a kernel is *decorated*, i.e. when
``genfuse.kernels`` is imported, so the interpreter flag is read once, here, at import.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Optional, Sequence

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
