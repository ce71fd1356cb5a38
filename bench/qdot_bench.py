"""Microbenchmark of genfuse._C.qdot_matmul (the integer-dot CPU matmul, csrc/qdot.cpp).

Prints GB/s of weight blocks streamed per call (weight bytes / call time) for each shape, M,
activation width, code path and thread count, warm (one matrix, in cache) and cold (rotating over
enough distinct copies that each call finds its matrix outside L2: 30 copies of a 3072x576 Q4_1
matrix, as a SmolLM2 decode step walks its 30 layers), with the median and the p10..p90 spread of
`--reps` timed batches. With --base PATH (a genfuse _C*.so built from another commit), each batch
runs both extensions back to back, interleaved, so machine noise hits both alike. With --gemm,
also times what the runtime does for M > quant.QDOT_MAX_ROWS: genfuse._C.gemm_matmul (float32
GEMM over dequantized panels, csrc/gemm.h), cold, in the same units, to find the crossover M;
with --torch, what a user would otherwise do: dequantize_rows + torch's fp32 matmul
(torch.set_num_threads(threads)).

    python bench/qdot_bench.py                           # the default shapes, best path
    python bench/qdot_bench.py --paths all --M 1,4,16,64 --bits 8,32
    python bench/qdot_bench.py --base /tmp/gf_base/genfuse/_C.cpython-311-x86_64-linux-gnu.so
    python bench/qdot_bench.py --shapes 3072x576:Q4_1 --M 1,8,16,32,64 --bits 32 --gemm --torch

--cpu-time times the calling thread's CPU time instead of wall time (threads=1 only), for a
machine other work is loading. Threads are pinned (sched_setaffinity to the first `threads` CPUs) so the pool does not migrate.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import os
import time

import numpy as np

from genfuse import _C

QTYPES = {"Q4_0": (2, 18), "Q4_1": (3, 20), "Q8_0": (8, 34)}
DEFAULT_SHAPES = ["3072x576:Q4_1", "960x576:Q4_1", "576x1536:Q4_1", "49152x576:Q8_0", "3072x576:Q4_0"]
COLD_BYTES = 30 * 3072 * 18 * 20  # 30 SmolLM2 gate_up matrices, ~33 MB


def load_ext(path: str):
    """A genfuse _C extension from another build, as its own module object."""
    loader = importlib.machinery.ExtensionFileLoader("_C", path)
    spec = importlib.util.spec_from_file_location("_C", path, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def blocks(N, K, qname, seed):
    """Random GGML blocks (N, bytes) with sane float16 scales (the values do not affect speed)."""
    _, bb = QTYPES[qname]
    rng = np.random.default_rng(seed)
    nb = K // 32
    w = rng.integers(0, 256, size=(N, nb, bb), dtype=np.uint8)
    d = (rng.uniform(0.001, 0.05, size=(N, nb)).astype(np.float16)).view(np.uint8).reshape(N, nb, 2)
    w[:, :, :2] = d
    if qname == "Q4_1":
        w[:, :, 2:4] = (-rng.uniform(0.0, 0.2, size=(N, nb)).astype(np.float16)).view(np.uint8).reshape(N, nb, 2)
    return w.reshape(N, nb * bb)


CLOCK = time.perf_counter


def time_batches(fn, calls, reps):
    """Seconds per call of `calls` calls, one sample per rep."""
    out = []
    for _ in range(reps):
        t0 = CLOCK()
        for _ in range(calls):
            fn()
        out.append((CLOCK() - t0) / calls)
    return np.array(out)


def stats(gbs):
    return f"{np.median(gbs):6.2f} [{np.percentile(gbs, 10):5.2f}..{np.percentile(gbs, 90):5.2f}]"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="NxK:TYPE,... (comma separated)")
    ap.add_argument("--M", default="1", help="activation rows, comma separated")
    ap.add_argument("--bits", default="32,8", help="activation widths, comma separated")
    ap.add_argument("--paths", default="best", help="best, all, or comma-separated names")
    ap.add_argument("--threads", default="1", help="comma separated")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--min-ms", type=float, default=20.0, help="time per batch")
    ap.add_argument("--base", default=None, help="another build's _C .so to interleave with")
    ap.add_argument("--gemm", action="store_true", help="also genfuse's float32 GEMM (gemm_matmul)")
    ap.add_argument("--torch", action="store_true", help="also dequantize + torch fp32 matmul")
    ap.add_argument("--no-cold", action="store_true")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the calling thread's CPU time (threads=1 only): on a shared, loaded "
                         "machine this leaves out the time the OS gave other processes")
    args = ap.parse_args()
    if args.cpu_time:
        if args.threads != "1":
            ap.error("--cpu-time measures one thread; use --threads 1")
        global CLOCK
        CLOCK = time.thread_time

    exts = [("new", _C)] + ([("base", load_ext(args.base))] if args.base else [])
    paths = {"best": [_C.cpu_path()], "all": list(_C.cpu_paths())}.get(args.paths, args.paths.split(","))
    Ms = [int(v) for v in args.M.split(",")]
    bits_list = [int(v) for v in args.bits.split(",")]
    threads_list = [int(v) for v in args.threads.split(",")]
    print(f"cpu: {_platform()}; paths {paths}; reps {args.reps}; {'CPU' if args.cpu_time else 'wall'} time; "
          f"load {os.getloadavg()[0]:.1f}; GB/s of weight blocks, median [p10..p90]")
    for spec in args.shapes.split(","):
        shape, qname = spec.split(":")
        N, K = (int(v) for v in shape.split("x"))
        qtype, bb = QTYPES[qname]
        wbytes = N * (K // 32) * bb
        copies = max(2, -(-COLD_BYTES // wbytes))
        ws = [blocks(N, K, qname, s) for s in range(1 if args.no_cold else copies)]
        for threads in threads_list:
            os.sched_setaffinity(0, set(range(min(threads, os.cpu_count()))))
            for M in Ms:
                x = np.random.default_rng(1).standard_normal((M, K)).astype(np.float32)
                y = np.empty((M, N), np.float32)
                for bits in bits_list:
                    for path in paths:
                        res = {}
                        for mode in ["warm"] + ([] if args.no_cold else ["cold"]):
                            fns = {}
                            for name, ext in exts:
                                if mode == "warm":
                                    fns[name] = lambda ext=ext: ext.qdot_matmul(x, ws[0], qtype, y, threads, path, bits)
                                else:
                                    it = iter(range(1 << 62))
                                    fns[name] = lambda ext=ext, it=it: ext.qdot_matmul(
                                        x, ws[next(it) % len(ws)], qtype, y, threads, path, bits)
                            for f in fns.values():
                                f()
                            t1 = time_batches(fns["new"], 1, 3).min()
                            calls = max(1, int(args.min_ms * 1e-3 / t1))
                            samples = {n: [] for n in fns}
                            for _ in range(args.reps):  # interleaved A/B
                                for n, f in fns.items():
                                    samples[n].append(time_batches(f, calls, 1)[0])
                            for n in fns:
                                res[(mode, n)] = wbytes / np.array(samples[n]) / 1e9
                        line = f"{qname} {N}x{K} M={M:<3d} act{bits:<2d} {path:11s} t{threads}:"
                        for (mode, n), g in res.items():
                            per_row_us = wbytes / np.median(g) / 1e3 / M
                            line += f"  {mode}/{n} {stats(g)} GB/s ({per_row_us:7.1f} us/act row)"
                        print(line, flush=True)
                def cold(fn, label):
                    fn()
                    calls = max(1, int(args.min_ms * 1e-3 / time_batches(fn, 1, 2).min()))
                    g = wbytes / time_batches(fn, calls, args.reps) / 1e9
                    print(f"{qname} {N}x{K} M={M:<3d} {label} t{threads}: cold {stats(g)} GB/s "
                          f"({wbytes / np.median(g) / 1e3 / M:7.1f} us/act row)", flush=True)

                it = iter(range(1 << 62))
                if args.gemm:
                    cold(lambda: _C.gemm_matmul(x, ws[next(it) % len(ws)], qtype, y, threads), "gemm fp32       ")
                if args.torch:
                    import torch
                    torch.set_num_threads(threads)
                    out = np.empty((N, K), np.float32)
                    xt = torch.from_numpy(x)

                    def deq():
                        _C.dequantize_rows(ws[next(it) % len(ws)], qtype, K, None, out, threads)
                        return xt @ torch.from_numpy(out).T

                    cold(deq, "dequant+torch fp32")


def _platform():
    try:
        with open("/proc/cpuinfo") as f:
            name = next(ln for ln in f if ln.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        name = "unknown"
    return f"{name}, {os.cpu_count()} CPUs"


if __name__ == "__main__":
    main()
