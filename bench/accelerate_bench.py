"""genfuse.accelerate() on a transformers LM, and what a torch.ops.genfuse call costs.

    genfuse bench accelerate [--model smollm2-135m-instruct] [--only generate,overhead]
                             [--prompt-tokens 32] [--tokens 32] [--repeats 3] [--threads N]
                             [--no-compile] [--json results.json]

``generate``: transformers' ``generate`` (greedy, EOS ignored, seeded random prompt ids) three
ways, interleaved round by round so load drifts hit all three alike: the model as loaded
(``eager``, transformers' SDPA), ``genfuse.accelerate(model)`` (``accelerated``), and the
accelerated model with ``torch.compile``d forward (``compiled``: its modules call
``torch.ops.genfuse.*``; the compile happens in a warm-up before timing and is reported
apart). Time to first token = ``generate(max_new_tokens=1)``; decode tokens/s = the remaining
``tokens - 1`` over (full generate - TTFT). Medians over ``--repeats`` with min/max.
On CPU (the default here) the accelerated model runs genfuse's torch reference ops: this
measures the rewrite's cost or gain (fused QKV / gate-up GEMMs, one-pass norms), not Triton.

``overhead``: the median time of one call of each custom op against calling the plain
``genfuse.kernels`` function with the same (small, decode-shaped) inputs, both on the device's
default backend, 2000 calls after warm-up: the dispatcher's price per call.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

PARTS = ("generate", "overhead")


def _cpu() -> Dict[str, Any]:
    info: Dict[str, Any] = {"machine": platform.machine(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "Flags"):
                info[key.strip().lower().replace(" ", "_")] = value.strip()
        info["loadavg"] = os.getloadavg()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _load(model: str):
    import transformers
    from genfuse.runtime.registry import resolve

    path = Path(resolve(model).path)
    if path.is_dir():
        m = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    else:
        folder = Path(tempfile.mkdtemp(prefix="gguf_link_"))
        (folder / path.name).symlink_to(path.resolve())
        m = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=path.name,
                                                              dtype=torch.float32)
    m.generation_config.eos_token_id = None  # run to max_new_tokens
    m.generation_config.pad_token_id = 0
    return m.eval()


def _spread(xs: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def bench_generate(args) -> Dict[str, Any]:
    import genfuse

    model = _load(args.model)
    fast = genfuse.accelerate(model)
    variants: Dict[str, Any] = {"eager": model, "accelerated": fast}
    compile_s = None
    if not args.no_compile:
        compiled = genfuse.accelerate(model)
        compiled.forward = torch.compile(compiled.forward, dynamic=True, fullgraph=True)
        variants["compiled"] = compiled
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(10, model.config.vocab_size, (1, args.prompt_tokens), generator=g)
    mask = torch.ones_like(ids)

    def gen(m, n):
        with torch.no_grad():
            return m.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False)

    outs = {}
    for name, m in variants.items():  # warm-up (and the compile)
        t = time.perf_counter()
        outs[name] = gen(m, args.tokens)
        if name == "compiled":
            compile_s = time.perf_counter() - t
    same = {name: bool(torch.equal(o, outs["eager"])) for name, o in outs.items()}
    ttft: Dict[str, List[float]] = {k: [] for k in variants}
    total: Dict[str, List[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, m in variants.items():
            t = time.perf_counter()
            gen(m, 1)
            ttft[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            gen(m, args.tokens)
            total[name].append(time.perf_counter() - t)
    res: Dict[str, Any] = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.tokens,
                           "repeats": args.repeats, "same_tokens_as_eager": same,
                           "compile_warmup_s": compile_s, "variants": {}}
    for name in variants:
        decode = [(args.tokens - 1) / max(tt - t1, 1e-9) for tt, t1 in zip(total[name], ttft[name])]
        res["variants"][name] = {"ttft_s": _spread(ttft[name]), "decode_tokens_per_s": _spread(decode),
                                 "generate_s": _spread(total[name])}
    return res


def _op_cases(device) -> Dict[str, tuple]:
    from genfuse import kernels as gk
    from genfuse.kernels import ops  # noqa: F401  registers torch.ops.genfuse.*

    G = torch.ops.genfuse
    r = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    x, w = r(1, 576), r(576)
    q, k, v = r(1, 9, 1, 64), r(1, 3, 40, 64), r(1, 3, 40, 64)
    cos, sin = gk.rope_cos_sin(64, 64, device=device)
    pos = torch.tensor([7], device=device)
    wl = r(192, 576)
    return {
        "linear": (lambda: G.linear(x, wl, None, None, None), lambda: gk.linear(x, wl)),
        "rms_norm": (lambda: G.rms_norm(x, w, 1e-5), lambda: gk.rms_norm(x, w, 1e-5)),
        "add_rms_norm": (lambda: G.add_rms_norm(x, x, w, 1e-5), lambda: gk.rms_norm(x, w, 1e-5, residual=x)),
        "swiglu": (lambda: G.swiglu(x), lambda: gk.swiglu(x)),
        "rotary_embedding": (lambda: G.rotary_embedding(q, k[:, :, :1], cos, sin, pos),
                             lambda: gk.rotary_embedding(q, k[:, :, :1], cos, sin, pos)),
        "attention": (lambda: G.attention(q, k, v, False, None), lambda: gk.attention(q, k, v)),
    }


def bench_overhead(args, device) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name, (op, fn) in _op_cases(device).items():
        times = {"op": [], "function": []}
        for f in (op, fn):
            for _ in range(50):
                f()
        for _ in range(5):  # interleaved rounds of 400 calls
            for key, f in (("op", op), ("function", fn)):
                t = time.perf_counter()
                for _ in range(400):
                    f()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[key].append((time.perf_counter() - t) / 400 * 1e6)
        op_us, fn_us = statistics.median(times["op"]), statistics.median(times["function"])
        out[name] = {"op_us": op_us, "function_us": fn_us, "overhead_us": op_us - fn_us,
                     "op_spread_us": [min(times["op"]), max(times["op"])],
                     "function_spread_us": [min(times["function"]), max(times["function"])]}
    return out


def format_report(report: Dict[str, Any]) -> str:
    lines = []
    gen = report.get("generate")
    if gen:
        lines.append(f"generate: {gen['prompt_tokens']} prompt + {gen['new_tokens']} new tokens, "
                     f"median of {gen['repeats']} (min-max)")
        lines.append(f"{'variant':<12} {'TTFT ms':>18} {'decode tok/s':>20}  same tokens")
        for name, v in gen["variants"].items():
            t, d = v["ttft_s"], v["decode_tokens_per_s"]
            lines.append(f"{name:<12} {t['median'] * 1e3:8.1f} ({t['min'] * 1e3:.0f}-{t['max'] * 1e3:.0f}) "
                         f"{d['median']:9.2f} ({d['min']:.1f}-{d['max']:.1f})  {gen['same_tokens_as_eager'][name]}")
        if gen.get("compile_warmup_s") is not None:
            lines.append(f"compile warm-up: {gen['compile_warmup_s']:.1f} s")
    ov = report.get("overhead")
    if ov:
        lines.append(f"{'op':<18} {'op us':>8} {'function us':>12} {'overhead us':>12}")
        for name, v in ov.items():
            lines.append(f"{name:<18} {v['op_us']:8.1f} {v['function_us']:12.1f} {v['overhead_us']:12.1f}")
    return "\n".join(lines)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="genfuse bench accelerate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="registry name, HF folder or .gguf")
    p.add_argument("--only", default="generate,overhead", help="comma-separated parts: generate, overhead")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32, help="new tokens per generate (>= 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    return p


def main(argv: List[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        args = build_parser().parse_args(argv)
    parts = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in parts if s not in PARTS]
    if bad or not parts:
        print(f"error: unknown parts {bad}; parts: {', '.join(PARTS)}", file=sys.stderr)
        return 2
    if args.tokens < 2 or args.repeats < 1 or args.prompt_tokens < 1:
        print("error: --tokens must be >= 2, --repeats and --prompt-tokens >= 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: Dict[str, Any] = {"benchmark": "accelerate", "device": _device_info(), "cpu": _cpu(),
                              "torch_threads": torch.get_num_threads()}
    if "overhead" in parts:
        report["overhead"] = bench_overhead(args, device)
    if "generate" in parts:
        report["generate"] = bench_generate(args)
    report["loadavg_after"] = os.getloadavg()
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


def _device_info() -> Dict[str, Any]:
    from genfuse.bench import harness

    return harness.device_info()
