"""What a request may use: the device it names and the memory it would allocate.

`resolve_device` turns a user's ``device`` (None, "cpu", "cuda", "cuda:1", a torch.device) into
a `torch.device` genfuse can run on, or raises ValueError saying why not ("foo" is no device,
"meta" holds no data, CUDA is not built in or no GPU is visible). `check_memory` refuses an
allocation larger than the memory free on its device before it is attempted: a tiny file or a
flag can claim terabytes (a KV cache for a 2**40-token context, an expanded latent tensor), and
trying to allocate them either fails deep inside torch or, with overcommit, pushes the machine
into swap and the OOM killer.
"""
from __future__ import annotations

import os

import torch

SUPPORTED_DEVICE_TYPES = ("cpu", "cuda")


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device of a type genfuse runs on; ValueError otherwise. Does not
    check that the device exists (see `resolve_device`)."""
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):  # torch: "Expected one of cpu, cuda, ... at start of ..."
            raise ValueError(f"device {device!r} is not a torch device name (expected 'cpu', 'cuda' "
                             "or 'cuda:N')") from None
    else:
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    if dev.type not in SUPPORTED_DEVICE_TYPES:
        raise ValueError(f"device {str(dev)!r} is not supported: genfuse runs on 'cpu' or 'cuda'")
    return dev


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``device`` checked (type and existence), or CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = parse_device(device)
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"device {str(dev)!r}: this torch {torch.__version__} is built without CUDA")
        n = torch.cuda.device_count()
        if n == 0:
            raise ValueError(f"device {str(dev)!r}: no CUDA GPU is visible (torch.cuda.device_count() == 0)")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {str(dev)!r}: only {n} CUDA GPU(s) are visible (cuda:0..cuda:{n - 1})")
    return dev


def available_memory(device: str | torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``, or None when unknown.

    CUDA: the driver's free memory (`torch.cuda.mem_get_info`). CPU: the kernel's MemAvailable
    (free plus reclaimable page cache; ``SC_AVPHYS_PAGES`` counts free pages only), capped by a
    cgroup v2 memory limit when the process runs under one (a container's limit is invisible
    to /proc/meminfo).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    if dev.type != "cpu":
        return None
    avail = _meminfo_available()
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not POSIX
            return None
    limit = _cgroup_headroom()
    return avail if limit is None else min(avail, limit)


def check_memory(what: str, nbytes: int, device: str | torch.device, *, freed: int = 0, hint: str = "") -> None:
    """ValueError naming ``what`` when ``nbytes`` exceed the memory available on ``device``
    (plus ``freed``: bytes the caller releases before allocating). Unknown availability passes."""
    avail = available_memory(device)
    if avail is not None and nbytes > avail + freed:
        raise ValueError(f"{what} needs {format_bytes(nbytes)} but only {format_bytes(avail + freed)} "
                         f"is available on {device}{'; ' + hint if hint else ''}")


def format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom() -> int | None:
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            return max(0, int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        return None
