"""The kernel benchmark harness: cases, timing, ceilings, device facts, table and JSON.

A *case* is one shape of one kernel: the genfuse call, the calls a user would otherwise make
(the baselines: cuBLAS, SDPA, torch composites, flash-attn when installed), and the FLOPs and
bytes the op must at least do. The harness times each with ``triton.testing.do_bench`` (median
and 20/80 % quantiles, L2 flushed between repetitions), checks once that genfuse and the first
baseline agree, and reports achieved TFLOP/s or GB/s, the fraction of the ceilings measured on
the same device in the same run, and the speedup of genfuse over every baseline.

Kernel families describe their cases in ``bench/<family>_bench.py`` with a function
``cases(device, dtype, size) -> list[Case]`` where ``size`` is ``"full"`` (the GPU benchmark)
or ``"smoke"`` (tiny shapes, used by the CPU test-suite to check that every case runs and that
genfuse and baseline compute the same thing).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

# The workplace's measured H100 numbers (KERNELS.md). Each run measures its own device too;
# fractions are reported against the numbers measured in the run.
REFERENCE_CEILINGS = {"copy_GBps": 3000.0, "bf16_matmul_TFLOPs": 800.0}
# genfuse vs the first baseline, relative error, when a case names no band of its own
# (bf16 rounding of both outputs dominates).
DEFAULT_CHECK_TOL = 2e-2


@dataclass
class Case:
    kernel: str                         # family, e.g. "attention"
    name: str                           # the shape, e.g. "B2 H16 S4096 D128 causal"
    genfuse: Callable[[], Any]          # the genfuse call, inputs bound
    baselines: Dict[str, Callable[[], Any]]  # name -> the call a user would otherwise make
    flops: float = 0.0                  # useful floating-point operations (0: memory-bound)
    bytes: float = 0.0                  # bytes that must cross HBM at least once (read + write)
    cuda_graph: bool = False            # tiny launches: time inside a CUDA graph
    check_tol: Optional[float] = None   # relative-error band for genfuse vs first baseline
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def bound(self) -> str:
        return "compute" if self.flops > 0 else "memory"


def flops_if_compute_bound(flops: float, nbytes: float) -> float:
    """``flops`` when the op is compute-bound at the reference ceilings, else 0.

    A layer whose bytes take longer at the copy ceiling than its FLOPs at the matmul ceiling
    (RGB in/out convs, a 100-channel latent) is reported as memory-bound: flops=0 makes the
    harness rate it in GB/s against the copy ceiling; callers keep the FLOP count in meta."""
    c = REFERENCE_CEILINGS
    return flops if flops / (c["bf16_matmul_TFLOPs"] * 1e12) >= nbytes / (c["copy_GBps"] * 1e9) else 0.0


def first_tensor(x: Any) -> torch.Tensor:
    """The main output of a call that may return a tuple."""
    if isinstance(x, (tuple, list)):
        return first_tensor(x[0])
    return x


def rel_error(a: Any, b: Any) -> float:
    a64, b64 = first_tensor(a).double(), first_tensor(b).double()
    if not torch.isfinite(a64).all():
        return float("inf")
    denom = b64.norm().item()
    return (a64 - b64).norm().item() / (denom if denom > 0 else 1.0)


# --------------------------------------------------------------------------------------
# Device facts and ceilings
# --------------------------------------------------------------------------------------
def device_info() -> Dict[str, Any]:
    """Versions, and the GPU's name, clocks, power and memory from NVML when there is one."""
    import triton

    info: Dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["torch_device_name"] = torch.cuda.get_device_name()
        info["cuda_runtime"] = torch.version.cuda
    info["nvml"] = nvml_info()
    return info


def nvml_info(index: int = 0) -> Dict[str, Any]:
    """GPU facts from NVML (nvidia-ml-py); {"error": ...} when NVML is not available."""
    try:
        import pynvml
    except ImportError:
        return {"error": "nvidia-ml-py is not installed"}
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # no driver on this machine
        return {"error": f"NVML unavailable: {exc}"}
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(h)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        out = {
            "name": name.decode() if isinstance(name, bytes) else name,
            "driver": _decode(pynvml.nvmlSystemGetDriverVersion()),
            "memory_total_GiB": round(mem.total / 2**30, 1),
            "memory_used_GiB": round(mem.used / 2**30, 1),
            "sm_clock_MHz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "sm_clock_max_MHz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_clock_MHz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "power_W": pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "power_limit_W": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0,
            "temperature_C": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
        }
        return out
    except Exception as exc:  # a field this driver does not report
        return {"error": f"NVML query failed: {exc}"}
    finally:
        pynvml.nvmlShutdown()


def _decode(x: Any) -> Any:
    return x.decode() if isinstance(x, bytes) else x


def measure_ceilings(dtype: torch.dtype = torch.bfloat16) -> Dict[str, float]:
    """Copy bandwidth (1 GiB device-to-device) and an 8192^3 matmul, measured on this GPU now."""
    from triton.testing import do_bench

    n = 2**30 // 4
    src = torch.randn(n, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100)
    copy_GBps = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    ms = do_bench(lambda: a @ b, warmup=10, rep=100)
    tflops = 2 * 8192**3 / (ms * 1e-3) / 1e12
    return {"copy_GBps": copy_GBps, f"{str(dtype).replace('torch.', '')}_matmul_TFLOPs": tflops}


# --------------------------------------------------------------------------------------
# Timing and reporting
# --------------------------------------------------------------------------------------
def time_call(fn: Callable[[], Any], cuda_graph: bool = False) -> Dict[str, float]:
    """Median and 20/80 % quantiles in milliseconds."""
    from triton.testing import do_bench, do_bench_cudagraph

    if cuda_graph:
        fn()  # compile / autotune outside the graph capture
        torch.cuda.synchronize()
        q = do_bench_cudagraph(fn, rep=100, quantiles=[0.5, 0.2, 0.8])
    else:
        q = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return {"ms": q[0], "ms_p20": q[1], "ms_p80": q[2]}


def run_case(case: Case, ceilings: Dict[str, float], matmul_key: str) -> Dict[str, Any]:
    out = case.genfuse()
    result: Dict[str, Any] = {"kernel": case.kernel, "case": case.name, "bound": case.bound,
                              "flops": case.flops, "bytes": case.bytes, **case.meta}
    if case.baselines:
        first = next(iter(case.baselines.values()))
        err = rel_error(out, first())
        result["rel_err_vs_baseline"] = err
        # A fast wrong answer is not a result: the table flags a case whose output drifts.
        tol = case.check_tol if case.check_tol is not None else DEFAULT_CHECK_TOL
        result["agrees_with_baseline"] = bool(err <= tol)
    timings = {"genfuse": time_call(case.genfuse, case.cuda_graph)}
    for name, fn in case.baselines.items():
        timings[name] = time_call(fn, case.cuda_graph)
    for name, t in timings.items():
        s = t["ms"] * 1e-3
        if case.flops:
            t["TFLOPs"] = case.flops / s / 1e12
            t["frac_ceiling"] = t["TFLOPs"] / ceilings[matmul_key]
        else:
            t["GBps"] = case.bytes / s / 1e9
            t["frac_ceiling"] = t["GBps"] / ceilings["copy_GBps"]
    g = timings["genfuse"]["ms"]
    result["timings"] = timings
    result["speedup"] = {name: t["ms"] / g for name, t in timings.items() if name != "genfuse"}
    return result


def format_table(results: List[Dict[str, Any]]) -> str:
    rows = [("kernel", "case", "impl", "median ms", "rate", "of ceiling", "genfuse speedup")]
    for r in results:
        for impl, t in r["timings"].items():
            rate = f"{t['TFLOPs']:.1f} TFLOP/s" if "TFLOPs" in t else f"{t['GBps']:.0f} GB/s"
            speed = "" if impl == "genfuse" else f"{r['speedup'][impl]:.2f}x"
            case = r["case"] if r.get("agrees_with_baseline", True) else r["case"] + " [MISMATCH]"
            rows.append((r["kernel"], case, impl, f"{t['ms']:.4f}", rate,
                         f"{100 * t['frac_ceiling']:.0f}%", speed))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str, payload: Dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (a temporary file renamed over it): a run killed
    while writing leaves the previous complete file, never a truncated one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=float)
    os.replace(tmp, path)
