"""The serving engine under load: continuous batching, prefix caching, host overhead.

    genfuse bench engine [--model smollm2-135m-instruct | --shape llama-3.2-1b] [--dtype bf16]
                         [--only throughput,prefix,overhead] [--cuda-graphs auto|on|off]
                         [--num-requests 64] [--prompt-tokens 16:512] [--output-tokens 16:256]
                         [--prefix-requests 32] [--prefix-tokens 400] [--threads N] [--seed 0]
                         [--json results.json]

All requests are greedy with EOS ignored, on seeded random token ids (so lengths are exactly
what was drawn), after one warm-up request.

``throughput``: ``--num-requests`` requests with prompt and output lengths drawn uniformly
from the two ranges, run three ways, each timed end to end; tokens/s = generated tokens /
seconds.
  * engine: every request added at once, continuous batching (the default engine arguments);
  * one at a time: the same engine with ``max_num_seqs=1``, so each request runs alone;
  * static batch: how `LLM` batched before the engine (one batch of all requests: every
    sequence decodes until the longest one ends, finished ones keep computing): the same
    engine with every request's ``max_tokens`` raised to the longest, only each request's own
    tokens counted.
  Each run also splits its time between steps that only decode and steps that carry prompt
  tokens (the prefill work every mode shares). Goal: engine >= 2x one at a time.

``prefix``: ``--prefix-requests`` requests sharing a ``--prefix-tokens`` system prompt plus
16 tokens of their own, 8 new tokens each, submitted one after another; the median time to
first token of requests 2.. with prefix caching on and off. Goal: >= 5x lower with caching.

``overhead``: 64 sequences decoding together; host time per step (scheduler, block manager,
input preparation, output processing) as a fraction of the whole step, median over 20 steps.
Goal: < 5%.

``--shape NAME`` runs a transformers Llama with random weights at a public checkpoint's shape
(``genfuse bench generate``'s shapes: smollm2-135m, llama-3.2-1b, llama-3-8b), written to a
temporary folder and loaded from it as a user's checkpoint, instead of ``--model``; the
throughput on a GPU is judged at llama-3.2-1b in bf16.

Single-request decode speed is ``genfuse bench generate --only model`` (`LLM` runs on this
engine).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time

import torch

from genfuse.runtime.registry import DEFAULT_MODEL

from .generate_bench import DTYPES, SHAPES, random_checkpoint


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="genfuse bench engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help=f"registry name, HF folder or .gguf (default {DEFAULT_MODEL})")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES),
                   help="random weights at this checkpoint's shape instead of --model")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="the weights' dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--cuda-graphs", default="auto", choices=("auto", "on", "off"),
                   help="replay decode-only steps from CUDA graphs (EngineArgs cuda_graphs; auto: on for CUDA "
                        "with the Triton ops)")
    p.add_argument("--only", default="throughput,prefix,overhead",
                   help="comma-separated parts: throughput, prefix, overhead")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-tokens", default="16:512", help="MIN:MAX prompt length")
    p.add_argument("--output-tokens", default="16:256", help="MIN:MAX output length")
    p.add_argument("--prefix-requests", type=int, default=32)
    p.add_argument("--prefix-tokens", type=int, default=400)
    p.add_argument("--overhead-seqs", type=int, default=64)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads: genfuse's kernels (torch's intra-op threads 1 with packed GGUF weights, "
                        "as LLM(threads=) sets them) (default: the physical cores)")
    p.add_argument("--modes", default="engine,one_at_a_time,static_batch",
                   help="throughput part: which runs (default all three; the ratios need engine and the other)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="every engine's kv_cache_dtype (EngineArgs; default auto: the model's dtype)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    return p


def _range(text: str, name: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise SystemExit(f"genfuse bench engine: {name} must be MIN:MAX, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise SystemExit(f"genfuse bench engine: {name} needs 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def _run(engine, reqs, *, max_tokens_override=None) -> tuple[float, int, dict]:
    """Add every request, step to the end; (seconds, useful generated tokens, where the steps'
    time went: steps that only decode vs steps carrying prompt tokens)."""
    from genfuse.runtime.sampling import SamplingParams

    t0 = time.perf_counter()
    for i, (prompt, n) in enumerate(reqs):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=max_tokens_override or n, temperature=0,
                                                          ignore_eos=True))
    useful = 0
    want = {str(i): n for i, (_, n) in enumerate(reqs)}
    split = {k: {"steps": 0, "seconds": 0.0, "tokens": 0} for k in ("decode_only", "with_prompt")}
    while engine.has_unfinished_requests():
        ts = time.perf_counter()
        outs = engine.step()
        st = engine.last_step
        if st is not None and st.num_tokens:
            part = split["decode_only" if st.num_tokens == st.num_seqs else "with_prompt"]
            part["steps"] += 1
            part["seconds"] += time.perf_counter() - ts
            part["tokens"] += st.num_tokens
        for out in outs:
            if out.finished:
                useful += min(len(out.token_ids), want[out.request_id])
    return time.perf_counter() - t0, useful, split


MODES = ("engine", "one_at_a_time", "static_batch")


def _engine(loaded, args, **kw):
    from genfuse.runtime.engine import Engine

    graphs = {"auto": None, "on": True, "off": False}[args.cuda_graphs]
    return Engine(loaded, kv_cache_dtype=args.kv_cache_dtype, cuda_graphs=graphs, **kw)


def _load(args):
    """The model under test: ``--model``, or random weights at ``--shape`` loaded from a
    temporary checkpoint folder (removed once loaded)."""
    from genfuse.runtime.loader import default_dtype, load_model
    from genfuse.runtime.resources import resolve_device

    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.shape is None:
        return load_model(args.model or DEFAULT_MODEL, device=args.device, dtype=dtype)
    device = resolve_device(args.device)
    dtype = dtype or default_dtype(device)
    with random_checkpoint(args.shape, dtype, device) as folder:
        loaded = load_model(folder, device=device, dtype=dtype)
    loaded.name = args.shape
    return loaded


def _modes(args) -> list[str]:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise SystemExit(f"genfuse bench engine: unknown --modes {', '.join(bad) or repr(args.modes)} "
                         f"(modes: {', '.join(MODES)})")
    return modes


def throughput(loaded, args, rng) -> dict:
    plo, phi = _range(args.prompt_tokens, "--prompt-tokens")
    olo, ohi = _range(args.output_tokens, "--output-tokens")
    V = loaded.config.vocab_size
    reqs = [([rng.randrange(V) for _ in range(rng.randrange(plo, phi + 1))], rng.randrange(olo, ohi + 1))
            for _ in range(args.num_requests)]
    longest = max(n for _, n in reqs)
    res = {"num_requests": len(reqs), "prompt_tokens": sum(len(p) for p, _ in reqs),
           "output_tokens": sum(n for _, n in reqs)}
    runs = {"engine": ({}, None), "one_at_a_time": ({"max_num_seqs": 1}, None), "static_batch": ({}, longest)}
    for name in _modes(args):
        kw, override = runs[name]
        engine = _engine(loaded, args, **kw)
        _run(engine, [(reqs[0][0][:16], 4)])  # warm-up
        secs, useful, split = _run(engine, reqs, max_tokens_override=override)
        res[name] = {"seconds": secs, "tokens": useful, "tokens_per_s": useful / secs,
                     "preemptions": engine.stats.num_preemptions, "steps": split}
        d, p = split["decode_only"], split["with_prompt"]
        print(f"  {name:14s} {useful:6d} tokens in {secs:7.2f} s = {useful / secs:8.1f} tokens/s "
              f"({engine.stats.num_preemptions} preemptions; {d['steps']} decode-only steps {d['seconds']:.1f} s, "
              f"{p['steps']} with prompt tokens {p['seconds']:.1f} s)", flush=True)
    for other, goal in (("one_at_a_time", " (goal >= 2x)"), ("static_batch", "")):
        if "engine" in res and other in res:
            ratio = res[f"engine_vs_{other}"] = res["engine"]["tokens_per_s"] / res[other]["tokens_per_s"]
            print(f"  engine / {other.replace('_', ' ')} = {ratio:.2f}x{goal}")
    return res


def prefix(loaded, args, rng) -> dict:
    from genfuse.runtime.sampling import SamplingParams

    V = loaded.config.vocab_size
    system = [rng.randrange(V) for _ in range(args.prefix_tokens)]
    prompts = [system + [rng.randrange(V) for _ in range(16)] for _ in range(args.prefix_requests)]
    res = {"requests": len(prompts), "prefix_tokens": args.prefix_tokens}
    for caching in (True, False):
        engine = _engine(loaded, args, enable_prefix_caching=caching)
        ttfts = []
        for i, p in enumerate(prompts):
            t0 = time.perf_counter()
            engine.add_request(str(i), p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
            first = None
            while engine.has_unfinished_requests():
                outs = engine.step()
                if first is None and any(o.new_token_ids for o in outs):
                    first = time.perf_counter() - t0
            ttfts.append(first)
        later = ttfts[1:]
        key = "caching_on" if caching else "caching_off"
        res[key] = {"ttft_median_s": statistics.median(later), "ttft_min_s": min(later), "ttft_max_s": max(later),
                    "cached_prompt_tokens": engine.stats.num_cached_prompt_tokens}
        print(f"  prefix caching {'on ' if caching else 'off'}: TTFT median {statistics.median(later) * 1e3:8.1f} ms "
              f"(min {min(later) * 1e3:.1f}, max {max(later) * 1e3:.1f}); "
              f"{engine.stats.num_cached_prompt_tokens} prompt tokens from the cache", flush=True)
    res["ttft_ratio_off_over_on"] = res["caching_off"]["ttft_median_s"] / res["caching_on"]["ttft_median_s"]
    print(f"  TTFT off / on = {res['ttft_ratio_off_over_on']:.1f}x (goal >= 5x)")
    return res


def overhead(loaded, args, rng) -> dict:
    from genfuse.runtime.sampling import SamplingParams

    V = loaded.config.vocab_size
    engine = _engine(loaded, args, max_num_seqs=args.overhead_seqs)
    for i in range(args.overhead_seqs):
        engine.add_request(str(i), [rng.randrange(V) for _ in range(32)],
                           SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True))
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.requests.values()):
        engine.step()  # every prompt in
    engine.step()
    fractions, steps = [], []
    for _ in range(20):
        engine.step()
        st = engine.last_step
        assert st.num_seqs == args.overhead_seqs
        fractions.append(st.host_s / (st.host_s + st.model_s))
        steps.append(st.host_s + st.model_s)
    res = {"seqs": args.overhead_seqs, "host_fraction_median": statistics.median(fractions),
           "host_fraction_max": max(fractions), "step_median_s": statistics.median(steps)}
    print(f"  {args.overhead_seqs} sequences decoding: host {res['host_fraction_median'] * 100:.2f}% of a step "
          f"(max {res['host_fraction_max'] * 100:.2f}%), step {res['step_median_s'] * 1e3:.1f} ms (goal < 5%)")
    return res


PARTS = {"throughput": throughput, "prefix": prefix, "overhead": overhead}


def main(argv=None, args=None) -> int:
    args = args or build_parser().parse_args(argv)
    parts = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        print(f"genfuse bench engine: unknown part(s) {', '.join(bad)} (parts: {', '.join(PARTS)})", file=sys.stderr)
        return 2
    _modes(args)  # before the model loads
    if args.shape is not None and args.model is not None:
        print("genfuse bench engine: --shape and --model name two models; give one", file=sys.stderr)
        return 2
    from genfuse.runtime.threads import kernel_threads, set_threads

    loaded = _load(args)
    if loaded.device.type == "cpu":
        # as LLM(threads=) does: with packed weights genfuse's kernels get the threads and torch's
        # intra-op pool one (two pools of N threads on N cores take the cores from each other)
        n = args.threads or kernel_threads()
        set_threads(n, torch_threads=1 if loaded.keep_quantized else n)
    machine = {"platform": platform.platform(), "processor": platform.processor(), "device": str(loaded.device),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": str(loaded.dtype),
               "kernel_threads": kernel_threads(), "kv_cache_dtype": args.kv_cache_dtype,
               "keep_quantized": loaded.keep_quantized, "cuda_graphs": args.cuda_graphs}
    if loaded.device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(loaded.device)
    print(f"genfuse bench engine: {loaded.name} on {machine['device']} ({machine['dtype']}, genfuse kernels on "
          f"{machine['kernel_threads']} thread(s), torch on {machine['threads']}; kv_cache_dtype "
          f"{args.kv_cache_dtype})", flush=True)
    results = {"benchmark": "engine", "model": loaded.name, "machine": machine}
    for name in parts:
        print(f"[{name}]", flush=True)
        results[name] = PARTS[name](loaded, args, random.Random(args.seed))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
