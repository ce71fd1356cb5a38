"""Tensor parallelism on CPU (gloo): what the collectives cost and what N ranks do to decode.

    python -m genfuse.bench.tp_bench [--model smollm2-135m-instruct] [--worlds 1,3] [--tokens 32]
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
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m genfuse.bench.tp_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="registry name, HF folder or .gguf")
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
    from genfuse.runtime.distributed import check_tensor_parallel, run_ranks
    from genfuse.runtime.engine import Engine
    from genfuse.runtime.registry import resolve
    from genfuse.runtime.sampling import SamplingParams

    torch.set_num_threads(1)
    worlds = [int(w) for w in args.worlds.split(",")]
    config = load_config(resolve(args.model).path)
    for w in worlds:
        check_tensor_parallel(config, w)
    res = {"model": args.model, "worlds": worlds, "tokens": args.tokens, "collectives": {}, "decode": {}}
    for w in worlds:
        if w > 1:
            res["collectives"][w] = run_ranks(_collective_rank, w, config.hidden_size, config.vocab_size // w, 200,
                                              timeout=300, collective_timeout_s=120)[0]
            print(f"  N={w} collectives (rank 0 medians, us): " + ", ".join(
                f"{k[:-3]} {v:.0f}" for k, v in res["collectives"][w].items()), flush=True)
    prompt = list(range(100, 113))
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    for w in worlds:
        engine = Engine(args.model, device="cpu", tensor_parallel_size=w)
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
