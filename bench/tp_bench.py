"""Tensor parallelism: what the collectives cost (CPU, gloo) and what N ranks do to decode.

    python -m genfuse.bench.tp_bench [--model smollm2-135m-instruct | --shape llama-3-8b]
                                     [--device cpu|cuda] [--dtype bf16] [--worlds 1,3] [--tokens 32]
                                     [--repeats 3] [--json results.json]

Two parts, on real gloo process groups over 127.0.0.1:

``collectives``: the two collectives a step makes, timed on their own at a decode step's sizes
(one token: an all-reduce of ``(1, hidden)`` float32, an all-gather of ``(1, vocab / N)``) and
at a 128-token prefill chunk, median over 200 calls per rank 0. Per layer a step runs two
all-reduces; per step one embedding all-reduce and one logits all-gather.

``decode``: one request through ``Engine(model, tensor_parallel_size=N)`` (greedy, EOS
ignored, a 13-token prompt, ``--tokens`` new tokens, one torch thread per rank), tokens/s as the
median of ``--repeats`` runs after a warm-up, for each N of ``--worlds``. The world sizes must
split the model (SmolLM2: 9 query / 3 KV heads, so 1 or 3). On a 2-core machine N > 1 cannot be
faster: the ranks share the cores and every layer adds two round trips through the loopback.

``--device cuda``: the decode part on GPUs (NCCL between ranks, one GPU a rank; N larger than
the GPUs there is refused before anything starts), the collectives part skipped (it times
gloo). ``--shape NAME`` decodes random weights at a public checkpoint's shape (`genfuse bench
generate`'s shapes), written once to a temporary checkpoint folder that every rank loads its
shard from; gpt-fast's TP scaling is quoted at llama-3-8b.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

from genfuse.runtime.registry import DEFAULT_MODEL

from .generate_bench import DTYPES, SHAPES, random_checkpoint


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m genfuse.bench.tp_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help=f"registry name, HF folder or .gguf (default {DEFAULT_MODEL})")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES),
                   help="random weights at this checkpoint's shape instead of --model")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="the weights' dtype (default: bf16 on CUDA, fp32 on CPU; gloo cannot all-reduce bf16)")
    p.add_argument("--worlds", default="1,3", help="comma-separated tensor_parallel_size values")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="write the results here")
    return p


def _collective_rank(rank, world, hidden, vocab_part, calls):
    import torch
    import torch.distributed as dist

    out = {}
    for name, rows in (("decode", 1), ("prefill128", 128)):
        x = torch.randn(rows, hidden)
        part = torch.randn(rows, vocab_part)
        gathered = [torch.empty_like(part) for _ in range(world)]
        for kind, fn in (("all_reduce", lambda: dist.all_reduce(x)),
                         ("all_gather", lambda: dist.all_gather(gathered, part))):
            fn()
            ts = []
            for _ in range(calls):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            out[f"{name}_{kind}_us"] = statistics.median(ts) * 1e6
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from genfuse.runtime.config import load_config
    from genfuse.runtime.distributed import check_tensor_parallel
    from genfuse.runtime.loader import default_dtype
    from genfuse.runtime.registry import resolve

    if args.shape is not None and args.model is not None:
        print("tp_bench: --shape and --model name two models; give one", file=sys.stderr)
        return 2
    try:
        worlds = [int(w) for w in args.worlds.split(",")]
    except ValueError:
        print(f"tp_bench: --worlds takes comma-separated integers, got {args.worlds!r}", file=sys.stderr)
        return 2
    if args.device == "cuda":
        have = torch.cuda.device_count()
        if max(worlds) > have:
            print(f"tp_bench: N={max(worlds)} needs {max(worlds)} CUDA devices, one a rank; this machine has {have}",
                  file=sys.stderr)
            return 2
    else:
        torch.set_num_threads(1)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(torch.device(args.device))
    with contextlib.ExitStack() as stack:  # the ranks load their shards from the checkpoint folder
        model = (stack.enter_context(random_checkpoint(args.shape, dtype, args.device)) if args.shape
                 else args.model or DEFAULT_MODEL)
        config = load_config(resolve(model).path)
        try:
            for w in worlds:
                check_tensor_parallel(config, w)
        except ValueError as e:
            print(f"tp_bench: {e}", file=sys.stderr)
            return 2
        return _bench(args, model, config, worlds, dtype)


def _bench(args, model, config, worlds, dtype) -> int:
    import torch

    from genfuse.runtime.distributed import run_ranks
    from genfuse.runtime.engine import Engine
    from genfuse.runtime.sampling import SamplingParams

    name = args.shape or args.model or DEFAULT_MODEL
    res = {"model": name, "device": args.device, "dtype": str(dtype).replace("torch.", ""), "worlds": worlds,
           "tokens": args.tokens, "collectives": {}, "decode": {}}
    if args.device == "cuda":
        res["gpu"] = torch.cuda.get_device_name(0)
        print("  collectives: timed on CPU (gloo) only; skipped on cuda", flush=True)
    for w in worlds:
        if w > 1 and args.device == "cpu":
            res["collectives"][w] = run_ranks(_collective_rank, w, config.hidden_size, config.vocab_size // w, 200,
                                              timeout=300, collective_timeout_s=120)[0]
            print(f"  N={w} collectives (rank 0 medians, us): " + ", ".join(
                f"{k[:-3]} {v:.0f}" for k, v in res["collectives"][w].items()), flush=True)
    prompt = [(100 + i) % config.vocab_size for i in range(13)]
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    for w in worlds:
        engine = Engine(model, device=args.device, dtype=dtype, tensor_parallel_size=w)
        try:
            runs = []
            for r in range(args.repeats + 1):
                engine.add_request(f"r{r}", prompt, params)
                first = None
                while engine.has_unfinished_requests():
                    engine.step()
                    first = first or time.perf_counter()
                if r:  # the first run warms up
                    runs.append((args.tokens - 1) / (time.perf_counter() - first))
        finally:
            engine.close()
        res["decode"][w] = {"tokens_per_s_median": statistics.median(runs), "runs": runs}
        print(f"  N={w}: decode {statistics.median(runs):.1f} tokens/s (runs {', '.join(f'{x:.1f}' for x in runs)})",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
