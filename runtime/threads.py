"""How many threads genfuse's CPU kernels use, and torch's intra-op threads beside them.

Why one setting: the packed matmuls (`runtime.quant` -> ``genfuse._C``) run on genfuse's own
thread pool (csrc/threads.h: chunks claimed from a shared counter, workers that spin a few tens
of microseconds and then sleep), while torch's small ops run on torch's OpenMP pool, whose idle
threads spin for a long while after every parallel region (libgomp's default). Two pools of N
threads on N cores take the cores from each other; on a busy machine a spinning thread that is
descheduled stalls the step (issue 13 measured 1 token/s at 2 threads under load, 40% of the
samples spinning in libgomp). So `set_threads(n)` gives genfuse's kernels n threads and, where
those kernels carry the model (packed GGUF weights on the CPU), sets torch's intra-op threads to
1: the per-token torch ops are too small to split, and nothing spins in OpenMP between them.

The default is the machine's physical cores available to this process (SMT siblings count once).
"""
from __future__ import annotations

import functools
import os

_threads: int | None = None  # None: default_threads()


@functools.lru_cache(maxsize=1)
def default_threads() -> int:
    """Physical cores in this process's CPU affinity (siblings of one core count once). Read
    once (sysfs files per CPU): every packed matmul asks for the thread count."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def kernel_threads() -> int:
    """Threads genfuse's CPU kernels use now: `set_threads`'s value, else `default_threads()`."""
    return _threads if _threads is not None else default_threads()


def threads_given() -> bool:
    """Whether `set_threads` has set a count (else `kernel_threads()` is the default)."""
    return _threads is not None


def check_threads(threads) -> int | None:
    """``threads`` as an int >= 1 (None passes); ValueError naming the value otherwise."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1 (or None for the {default_threads()} physical cores), "
                         f"got {threads!r}")
    return threads


def set_threads(threads: int | None, *, torch_threads: int | None = None) -> int:
    """Give genfuse's CPU kernels ``threads`` threads (None: the default) and set torch's intra-op
    threads to ``torch_threads`` when given. Process-wide (the pool is one per process). Returns
    the kernel thread count now in use."""
    global _threads
    _threads = check_threads(threads)
    if torch_threads is not None:
        import torch

        torch.set_num_threads(check_threads(torch_threads))
    return kernel_threads()
