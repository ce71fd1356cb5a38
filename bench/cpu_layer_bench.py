"""The fused CPU decoder layers (runtime/models/cpu_layer.py) against forward_step's torch layer
loop, on the real model (SmolLM2-135M GGUF, packed weights), A/B interleaved in one process.

    python -m bench.cpu_layer_bench [--only decode,batch,chunk,steps,calls] [--threads 1,2] [--reps 5]
                                    [--decode-tokens 128] [--json out.json]

``decode``: one greedy request, ``--decode-tokens`` tokens; ms a decode step (the engine's own
step timing: host + model), median over the request's steps, per rep; reported as the median
of the reps and their min..max.
``batch``: B sequences (32-token prompts) decoding together, B = 1, 8, 32, 64: the median step
time over 12 steps. (The fused path runs at every step size.)
``chunk``: one prompt chunk of N tokens (fresh random ids, no prefix hit): the prefill step's time.
``steps``: forward_step itself on B decode tokens (B = 1 .. 64) at context 128, the modes
alternating call by call.
``calls``: the C++ call itself on a decode token at context 100: one call for all layers
against one call per layer (the Python crossing it saves).

Modes alternate A B B A within every rep (the machine is shared and noisy); GENFUSE_FUSED_LAYERS
switches them (read every step).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time

import numpy as np
import torch

MODES = {"unfused": "0", "fused": "1"}


def _set_mode(mode: str) -> None:
    os.environ["GENFUSE_FUSED_LAYERS"] = MODES[mode]


def _orders(reps: int):
    for r in range(reps):
        yield ("unfused", "fused") if r % 2 == 0 else ("fused", "unfused")


def _stat(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _ab(per: dict, label: str, unit: str = " ms", digits: int = 1) -> dict:
    """The fused / unfused stats of one case, printed as one line with the speedup."""
    res = {m: _stat(v) for m, v in per.items()}
    u, f = res["unfused"], res["fused"]
    d = digits
    print(f"  {label}: unfused {u['median']:.{d}f}{unit} ({u['min']:.{d}f}..{u['max']:.{d}f}), "
          f"fused {f['median']:.{d}f} ({f['min']:.{d}f}..{f['max']:.{d}f}): {u['median'] / f['median']:.2f}x", flush=True)
    return res


def _run_steps(engine, keep):
    """Steps the engine to the end; the (num_tokens, num_seqs, seconds) of each step `keep` accepts."""
    out = []
    while engine.has_unfinished_requests():
        engine.step()
        st = engine.last_step
        if keep(st):
            out.append(st.host_s + st.model_s)
    return out


def decode(llm, args, rng):
    from genfuse.runtime.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True)
    res = {}
    for t in args.threads:
        llm.set_threads(t)
        per = {m: [] for m in MODES}
        for order in _orders(args.reps):
            for mode in order:
                _set_mode(mode)
                llm.engine.add_request(f"d{rng.random()}", "The capital of France is", params)
                steps = _run_steps(llm.engine, lambda st: st.num_tokens == 1)
                per[mode].append(statistics.median(steps) * 1e3)
        res[t] = _ab(per, f"decode, {t} thread(s)", " ms/token", 2)
    return res


def batch(llm, args, rng):
    from genfuse.runtime.models import cpu_layer
    from genfuse.runtime.sampling import SamplingParams

    V = llm.engine.config.vocab_size
    res = {}
    for t in args.threads:
        llm.set_threads(t)
        for B in (1, 8, 32, 64):
            per = {m: [] for m in MODES}
            for order in _orders(args.reps):
                for mode in order:
                    _set_mode(mode)
                    params = SamplingParams(max_tokens=13, temperature=0, ignore_eos=True)
                    for i in range(B):
                        llm.engine.add_request(f"b{rng.random()}", [rng.randrange(V) for _ in range(32)], params)
                    steps = _run_steps(llm.engine, lambda st, B=B: st.num_tokens == B and st.num_seqs == B)
                    per[mode].append(statistics.median(steps[1:]) * 1e3)
            res[f"{t}t_B{B}"] = _ab(per, f"{B:3d} sequences decoding, {t} thread(s), step")
    return res


def chunk(llm, args, rng):
    from genfuse.runtime.models import cpu_layer
    from genfuse.runtime.sampling import SamplingParams

    V = llm.engine.config.vocab_size
    res = {}
    for t in args.threads:
        llm.set_threads(t)
        for n in (8, 16, 32, 64, 128):
            per = {m: [] for m in MODES}
            for order in _orders(args.reps):
                for mode in order:
                    _set_mode(mode)
                    llm.engine.add_request(f"c{rng.random()}", [rng.randrange(V) for _ in range(n)],
                                           SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
                    steps = _run_steps(llm.engine, lambda st, n=n: st.num_tokens == n)
                    per[mode].append(steps[0] * 1e3)
            res[f"{t}t_N{n}"] = _ab(per, f"prefill chunk of {n:3d} tokens, {t} thread(s)")
    return res


def calls(llm, args, rng):
    from genfuse.runtime.models import cpu_layer
    from genfuse.runtime.quant import act_bits
    from genfuse.runtime.threads import kernel_threads

    model = llm.engine.model
    _set_mode("fused")
    dec = cpu_layer.decoder(model)
    c = model.config
    L, bs, ctx = c.num_layers, 16, 100
    k = torch.randn(L, 8, bs, model.num_kv_heads, c.head_dim)
    v = torch.randn_like(k)
    i32 = lambda x: np.array(x, dtype=np.int32)  # noqa: E731
    pos, slots, table, lens, qsl = i32([ctx - 1]), i32([ctx - 1]), i32([list(range(8))]), i32([ctx]), i32([0, 1])
    h0 = torch.randn(1, c.hidden_size)
    res = {}
    for t in args.threads:
        llm.set_threads(t)
        per = {"one call": [], "per layer": []}
        for r in range(args.reps * 4):
            for how in (("one call", "per layer") if r % 2 == 0 else ("per layer", "one call")):
                h, mlp = h0.clone(), torch.empty_like(h0)
                base = (h.numpy(), mlp.numpy(), pos, slots, table, lens, qsl, k.numpy(), v.numpy(),
                        model.cos.numpy(), model.sin.numpy(), kernel_threads(), None, act_bits())
                t0 = time.perf_counter()
                for _ in range(10):
                    if how == "one call":
                        dec.forward(*base)
                    else:
                        for i in range(L):
                            dec.forward(*base, i, i + 1, i > 0)
                per[how].append((time.perf_counter() - t0) / 10 * 1e3)
        res[t] = {m: _stat(x) for m, x in per.items()}
        a, b = res[t]["one call"], res[t]["per layer"]
        print(f"  {L} layers, one token at context {ctx}, {t} thread(s): one call {a['median']:.2f} ms "
              f"({a['min']:.2f}..{a['max']:.2f}), one call a layer {b['median']:.2f} ({b['min']:.2f}..{b['max']:.2f})",
              flush=True)
    return res


def steps(llm, args, rng):
    """forward_step itself on B decode tokens at context 128 each (hand-made StepInputs, fresh
    pools), fused and unfused alternating call by call: finer interleaving than whole requests."""
    from genfuse.runtime.engine.kv_cache import StepInputs
    from genfuse.runtime.models import cpu_layer

    model = llm.engine.model
    c = model.config
    ctx, bs = 128, 16
    res = {}
    for t in args.threads:
        llm.set_threads(t)
        for B in (1, 8, 16, 32, 48, 64):
            nb = ctx // bs
            k = torch.randn(c.num_layers, B * nb, bs, model.num_kv_heads, c.head_dim)
            v = torch.randn_like(k)
            i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
            table = [[b * nb + j for j in range(nb)] for b in range(B)]
            inp = StepInputs(input_ids=i32([rng.randrange(c.vocab_size) for _ in range(B)]),
                             positions=i32([ctx - 1] * B), slot_mapping=i32([row[-1] * bs + bs - 1 for row in table]),
                             block_table=i32(table), seq_lens=i32([ctx] * B), query_start_loc=i32(list(range(B + 1))),
                             logits_indices=i32(list(range(B))), max_query_len=1, max_seq_len=ctx)
            per = {m: [] for m in MODES}
            for r in range(args.reps * 4 + 1):
                for mode in (("unfused", "fused") if r % 2 == 0 else ("fused", "unfused")):
                    _set_mode(mode)
                    t0 = time.perf_counter()
                    model.forward_step(inp, k, v)
                    if r:  # the first round warms up
                        per[mode].append((time.perf_counter() - t0) * 1e3)
            res[f"{t}t_B{B}"] = _ab(per, f"forward_step, {B:2d} decode tokens at context {ctx}, {t} thread(s)")
    return res


PARTS = {"decode": decode, "batch": batch, "chunk": chunk, "calls": calls, "steps": steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--only", default="decode,steps,chunk,calls")
    p.add_argument("--threads", default="1,2", help="comma-separated kernel thread counts")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.threads = [int(x) for x in args.threads.split(",")]
    import genfuse
    from genfuse import _C

    llm = genfuse.LLM(args.model, threads=args.threads[0])
    rng = random.Random(args.seed)
    llm.generate(["warm up"], genfuse.SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg(),
               "cpu_path": _C.cpu_path(), "layer_isa": _C.cpu_layer_isa(), "torch": torch.__version__}
    print(f"cpu_layer_bench: {args.model}, {machine}", flush=True)
    results = {"machine": machine}
    for name in [x.strip() for x in args.only.split(",") if x.strip()]:
        print(f"[{name}]", flush=True)
        results[name] = PARTS[name](llm, args, rng)
    results["load_after"] = os.getloadavg()
    print(f"load average after: {results['load_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
