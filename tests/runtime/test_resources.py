"""runtime/resources.py: devices genfuse can run on, and the free-memory check done before big
allocations (KV caches, decoded images)."""
from __future__ import annotations

import pytest
import torch
from genfuse.runtime import resources
from genfuse.runtime.resources import check_memory, format_bytes, parse_device, resolve_device


@pytest.mark.parametrize("device, error, match", [
    ("foo", ValueError, r"device 'foo' is not a torch device name \(expected 'cpu', 'cuda' or 'cuda:N'\)"),
    ("cuda:x", ValueError, "not a torch device name"),
    ("meta", ValueError, "device 'meta' is not supported: genfuse runs on 'cpu' or 'cuda'"),
    ("mps", ValueError, "'mps' is not supported"),
    (torch.device("meta"), ValueError, "not supported"),
    (0, TypeError, "device must be a str or torch.device, got int"),
])
def test_parse_device_refuses(device, error, match):
    with pytest.raises(error, match=match):
        parse_device(device)
    with pytest.raises(error, match=match):
        resolve_device(device)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(torch.device("cpu"))
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert parse_device("cuda:3") == torch.device("cuda", 3)  # well-formed: parse does not look for it
    with pytest.raises(ValueError, match="device 'cuda:99': "):  # no CUDA build, or fewer GPUs
        resolve_device("cuda:99")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda': "):
            resolve_device("cuda")


def test_check_memory(monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda device: 3 * 2**30)
    check_memory("a cache", 3 * 2**30, "cpu")
    with pytest.raises(ValueError, match=r"^a cache needs 4\.0 GiB but only 3\.0 GiB is available on cpu; "
                                         r"lower max_tokens$"):
        check_memory("a cache", 4 * 2**30, "cpu", hint="lower max_tokens")
    check_memory("a cache", 4 * 2**30, "cpu", freed=2**30)  # what the caller frees first counts
    monkeypatch.setattr(resources, "available_memory", lambda device: None)
    check_memory("unknown availability passes", 2**80, "cpu")


def test_available_memory_on_this_machine():
    free = resources.available_memory("cpu")
    assert isinstance(free, int) and 0 < free
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    assert free <= total


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 1023, 1536, 5 * 2**20, 2**49, 2**60)] == [
        "0 B", "1023 B", "1.5 KiB", "5.0 MiB", "512.0 TiB", "1048576.0 TiB"]
