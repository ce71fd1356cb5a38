"""What `genfuse info` reports: versions, the backend in use, and the GPU (through NVML)."""
from __future__ import annotations

import platform
from typing import Any, Dict

import torch


def collect() -> Dict[str, Any]:
    import numpy
    import triton

    import genfuse
    from genfuse.bench.harness import nvml_info
    from genfuse.kernels import _common

    facts: Dict[str, Any] = {
        "genfuse": genfuse.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "numpy": numpy.__version__,
    }
    try:
        from genfuse import _C

        facts["extension"] = {"version": _C.version(), **_C.build_info(), "quant_matmul": _cpu_path(_C)}
    except ImportError as exc:
        facts["extension"] = {"error": f"genfuse._C is not built: {exc}"}

    if torch.cuda.is_available():
        facts["backend"] = "triton (compiled for CUDA)"
        facts["cuda_device"] = torch.cuda.get_device_name()
        facts["cuda_runtime"] = torch.version.cuda
    elif _common.INTERPRET:
        facts["backend"] = "triton interpreter on CPU (TRITON_INTERPRET=1)"
    else:
        facts["backend"] = ("torch reference ops on CPU (no CUDA device; "
                            "TRITON_INTERPRET=1 runs the Triton kernels through the interpreter)")
    facts["gpu"] = nvml_info()
    facts["kv_cache_cpu"] = _kv_cache_cpu()
    return facts


def _cpu_path(_C) -> str:
    """The packed matmul's code path (GENFUSE_CPU_PATH or CPUID's best) and the others here."""
    if not hasattr(_C, "cpu_path"):  # an extension built before the integer-dot kernel
        return "avx+fma+f16c" if _C.quant_matmul_uses_avx() else "portable C++"
    try:
        path = _C.cpu_path()
    except ValueError as exc:  # a bad GENFUSE_CPU_PATH
        return f"error: {exc}"
    return f"integer dot, {path} (this CPU: {', '.join(_C.cpu_paths())}; GENFUSE_CPU_PATH forces one)"


def _kv_cache_cpu() -> Dict[str, Any]:
    """The engine's default CPU KV pool, and what it holds for the default model (if installed)."""
    from genfuse.runtime.engine.engine import CPU_KV_CACHE_MEMORY, kv_cache_summary

    out: Dict[str, Any] = {"kv_cache_memory": CPU_KV_CACHE_MEMORY}
    try:
        from genfuse.runtime.config import load_config
        from genfuse.runtime.registry import DEFAULT_MODEL, resolve

        config = load_config(resolve(DEFAULT_MODEL).path)
        summary = kv_cache_summary(config, torch.float32)
        out.update(model=DEFAULT_MODEL, tokens=summary["tokens"], bytes_per_token=summary["bytes_per_token"],
                   tokens_float16=kv_cache_summary(config, torch.float16)["tokens"])
    except Exception as exc:  # the default model's package may not be installed
        out["model_error"] = f"{type(exc).__name__}: {exc}"
    return out


def format_text(facts: Dict[str, Any]) -> str:
    ext = facts["extension"]
    ext_line = (f"genfuse._C {ext['version']} ({ext['compiler']}, C++ {ext['cxx_standard']}; "
                f"quantized CPU matmul: {ext['quant_matmul']})" if "version" in ext else ext["error"])
    gpu = facts["gpu"]
    if "error" in gpu:
        gpu_line = f"none ({gpu['error']})"
    else:
        gpu_line = (f"{gpu['name']}, {gpu['memory_total_GiB']} GiB, SM {gpu['sm_clock_MHz']}/"
                    f"{gpu['sm_clock_max_MHz']} MHz, {gpu['power_W']:.0f}/{gpu['power_limit_W']:.0f} W, "
                    f"driver {gpu['driver']}")
    return "\n".join([
        f"genfuse   {facts['genfuse']}",
        f"extension {ext_line}",
        f"python    {facts['python']} ({facts['platform']})",
        f"torch     {facts['torch']}",
        f"triton    {facts['triton']}",
        f"numpy     {facts['numpy']}",
        f"backend   {facts['backend']}",
        f"gpu       {gpu_line}",
        f"kv cache  {_kv_line(facts['kv_cache_cpu'])}",
    ])


def _kv_line(kv: Dict[str, Any]) -> str:
    line = f"CPU default {kv['kv_cache_memory'] / 2**30:.1f} GiB (LLM/Engine kv_cache_memory, num_kv_blocks)"
    if "tokens" in kv:
        line += (f": {kv['tokens']} tokens of {kv['model']} in fp32 ({kv['bytes_per_token']} B a token), "
                 f"{kv['tokens_float16']} with kv_cache_dtype=float16")
    return line
