"""The GPU check's bookkeeping: phase records in, one results.json and one summary.md out.

    python bench/gpu_summary.py record WORK PHASE STATUS [--rc N] [--seconds S] [--slice S] [--note TEXT]
    python bench/gpu_summary.py merge WORK OUT [--budget S] [--start EPOCH] [--dry]

``bench/gpu_check.sh`` runs each phase with its output in the work folder WORK (pytest logs
``*.jsonl`` from ``bench/gpu_pytest.py``, benchmark JSON ``*.json``), records how the phase
ended (``record``), then merges everything into ``OUT/results.json`` and ``OUT/summary.md``
(``merge``), after every phase, so a run cut off later still returns what was done.

``summary.md`` holds the table of the targets (measured value, target, ratio, pass / short;
"not run" with the reason where no result came), the correctness counts (failures by test
id and first line), the phases (status, seconds, slice) and the wider sweeps, if any ran.
Targets (issue 16, bench/README.md): attention >= 1.0x SDPA; linear >= 0.9x cuBLAS, and
>= 1.2x the unfused torch sequence with bias + activation + residual; decode attention >= 70 %
of the copy bandwidth measured in the run; norms >= 80 % of it; batch-1 decode within 1.25x of
its bandwidth floor and >= 5x transformers eager; DCGAN >= 2x cuDNN eager; VAE decode >= 1.5x
diffusers eager.

Standard library only, run by path: it works before (and whether or not) genfuse installs.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

PHASES_FILE = "phases.jsonl"
NOT_RUN = "not run"

# The headline cases (bench/*_bench.py, size "headline"; tests/test_gpu_check.py keeps the two
# lists equal) and the phase that produces each kind of row.
ATTENTION = [(4, 16, 4096, 64, False), (4, 16, 4096, 64, True), (4, 16, 4096, 128, False),
             (4, 16, 4096, 128, True)]                         # (B, H, T, D, causal)
LINEAR_LARGE = [(4096, 4096, 4096)]                            # (M, N, K)
LINEAR_DECODE = [(1, 4096, 4096)]
DECODE_CONTEXTS = [(8, 8192), (8, 32768)]                      # (B, context)
NORM_SHAPES = [(4096, 4096), (16384, 8192)]                    # (M, N)
GENERATE_SHAPE = "llama-3.2-1b"
DCGAN_BATCH = 256
EAGER_BEST = "torch eager (best)"
KERNEL_PHASE, DECODE_PHASE, DCGAN_PHASE, VAE_PHASE = ("headline-kernels", "headline-decode",
                                                      "headline-dcgan", "sweep-vae")
ENGINE_PHASE = "headline-engine"  # genfuse bench engine --shape GENERATE_SHAPE, bf16


# --------------------------------------------------------------------------------------
# Reading the work folder
# --------------------------------------------------------------------------------------
def read_jsonl(path: str) -> List[Dict[str, Any]]:
    """Every complete JSON line of ``path`` (a line cut off by a kill is dropped)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def pytest_summary(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Counts of one gpu_pytest log: outcomes, tests collected but never reached, failures."""
    collected = sum(r.get("count", 0) for r in records if r.get("event") == "collected")
    sampled_out = sum(r.get("sampled_out", 0) for r in records if r.get("event") == "collected")
    results: Dict[str, Dict[str, Any]] = {}
    for r in records:
        if r.get("event") == "result":
            results[r["nodeid"]] = r  # a teardown error after a pass replaces the pass
    counts = {k: 0 for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")}
    for r in results.values():
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    finished = [r for r in records if r.get("event") == "finished"]
    failures = [{"nodeid": r["nodeid"], "outcome": r["outcome"], "message": r.get("message", "")}
                for r in results.values() if r["outcome"] in ("failed", "error", "xpassed")]
    return {"collected": collected, "sampled_out": sampled_out, **counts,
            "not_reached": max(0, collected - len(results)), "finished": bool(finished),
            "exitstatus": finished[-1]["exitstatus"] if finished else None,
            "seconds": round(sum(r.get("seconds", 0.0) for r in results.values()), 1),
            "failures": failures}


def load_work(work: str) -> Dict[str, Any]:
    """Phase records, pytest logs (summarised) and JSON outputs of the work folder."""
    phases: List[Dict[str, Any]] = []
    tests: Dict[str, Any] = {}
    outputs: Dict[str, Any] = {}
    for name in sorted(os.listdir(work)):
        path = os.path.join(work, name)
        stem = name.rsplit(".", 1)[0]
        try:
            if name == PHASES_FILE:
                phases = read_jsonl(path)
            elif name.endswith(".jsonl"):
                tests[stem] = pytest_summary(read_jsonl(path))
            elif name.endswith(".json"):
                with open(path) as f:
                    outputs[stem] = json.load(f)
            elif name.endswith(".csv") or name.endswith(".txt"):
                with open(path) as f:
                    outputs[stem] = {"text": f.read()[:20000]}
        except (OSError, ValueError) as exc:  # a file cut off mid-write: say so, keep the rest
            outputs[stem] = {"unreadable": f"{type(exc).__name__}: {exc}"}
    return {"phases": phases, "tests": tests, "outputs": outputs}


def last_record(phases: List[Dict[str, Any]], name: str) -> Optional[Dict[str, Any]]:
    found = [p for p in phases if p.get("phase") == name]
    return found[-1] if found else None


def why_not(phases: List[Dict[str, Any]], name: str) -> str:
    """Why a phase left no result: its record's status and note, or that it never started."""
    rec = last_record(phases, name)
    if rec is None:
        return f"{name} not reached"
    note = f": {rec['note']}" if rec.get("note") else ""
    return f"{name} {rec['status']}{note}"


# --------------------------------------------------------------------------------------
# Target rows
# --------------------------------------------------------------------------------------
def _kernel_results(outputs: Dict[str, Any]) -> Iterable[Tuple[str, Dict[str, Any], Dict[str, Any]]]:
    """(file, result, file payload) of every kernel-benchmark result, headline files first."""
    names = sorted((n for n, o in outputs.items() if isinstance(o, dict) and "results" in o
                    and "benchmark" not in o), key=lambda n: (not n.startswith("headline"), n))
    for n in names:
        for r in outputs[n]["results"]:
            yield n, r, outputs[n]


def _kernel_failure(outputs: Dict[str, Any], kernel: str) -> Optional[str]:
    for n, o in outputs.items():
        for f in (o.get("failed", []) if isinstance(o, dict) and "benchmark" not in o else []):
            if f.get("kernel") == kernel:
                return f"{n}: {f.get('case')}: {f.get('error')}"
    return None


def find_kernel(outputs, kernel: str, **meta) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    for n, r, _ in _kernel_results(outputs):
        if r.get("kernel") == kernel and all(r.get(k) == v for k, v in meta.items()):
            return n, r
    return None, None


def _rate(t: Dict[str, Any]) -> str:
    rate = f"{t['TFLOPs']:.1f} TFLOP/s" if "TFLOPs" in t else f"{t.get('GBps', 0):.0f} GB/s"
    return f"{rate} ({t['ms']:.4f} ms)"


def _row(area, case, measured, target, ratio, status, source="", note="") -> Dict[str, Any]:
    return {"area": area, "case": case, "measured": measured, "target": target, "ratio": ratio,
            "status": status, "source": source, "note": note}


def _not_run(area, case, target, reason) -> Dict[str, Any]:
    return _row(area, case, "", target, "", NOT_RUN, note=reason)


def _judge(ok: bool, agrees: bool = True) -> str:
    if not agrees:
        return "MISMATCH"
    return "pass" if ok else "short"


def vs_baseline_row(area: str, case: str, source: Optional[str], r: Optional[Dict[str, Any]],
                    pick: Callable[[str], bool], want: float, what: str, reason: str) -> Dict[str, Any]:
    """genfuse against the fastest baseline ``pick`` accepts: ratio = baseline ms / genfuse ms."""
    target = f">= {want:g}x {what}"
    if r is None:
        return _not_run(area, case, target, reason)
    speed = {n: s for n, s in r.get("speedup", {}).items() if pick(n)}
    if not speed:
        return _not_run(area, case, target, f"no {what} baseline in {source}")
    best = min(speed, key=speed.get)  # the fastest baseline gives genfuse its smallest speedup
    ratio = speed[best]
    return _row(area, case, _rate(r["timings"]["genfuse"]), target, f"{ratio:.2f}x vs {best}",
                _judge(ratio >= want, r.get("agrees_with_baseline", True)), source,
                f"rel err {r['rel_err_vs_baseline']:.1e}" if "rel_err_vs_baseline" in r else "")


def vs_copy_row(area: str, case: str, source: Optional[str], r: Optional[Dict[str, Any]], want: float,
                outputs: Dict[str, Any], reason: str) -> Dict[str, Any]:
    target = f">= {100 * want:.0f} % of copy"
    if r is None:
        return _not_run(area, case, target, reason)
    g = r["timings"]["genfuse"]
    copy = outputs[source].get("ceilings", {}).get("copy_GBps")
    speed = ", ".join(f"{s:.2f}x vs {n}" for n, s in r.get("speedup", {}).items())
    frac = f"{100 * g['frac_ceiling']:.0f} %"
    return _row(area, case, _rate(g), target, f"{frac} of {copy:.0f} GB/s" if copy else frac,
                _judge(g["frac_ceiling"] >= want, r.get("agrees_with_baseline", True)), source, speed)


def kernel_rows(outputs: Dict[str, Any], phases: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    def reason(kernel: str) -> str:
        failure = _kernel_failure(outputs, kernel)
        return failure or why_not(phases, KERNEL_PHASE)

    rows = []
    for b, h, t, d, causal in ATTENTION:
        src, r = find_kernel(outputs, "attention", B=b, Hq=h, Hkv=h, T=t, S=t, D=d, causal=causal)
        rows.append(vs_baseline_row("attention fwd", f"B{b} H{h} T{t} D{d}{' causal' if causal else ''}",
                                    src, r, lambda n: n.startswith("sdpa"), 1.0, "SDPA", reason("attention")))
    cublas = ("torch.matmul", "F.linear")
    for m, n, k in LINEAR_LARGE + LINEAR_DECODE:
        kind = "decode " if m <= 16 else ""
        src, r = find_kernel(outputs, "linear", M=m, N=n, K=k, epilogue="none")
        rows.append(vs_baseline_row("linear", f"{kind}M{m} N{n} K{k}", src, r, lambda x: x in cublas,
                                    0.9, "cuBLAS", reason("linear")))
        src, r = find_kernel(outputs, "linear", M=m, N=n, K=k, epilogue="bias+gelu_tanh+residual")
        rows.append(vs_baseline_row("linear", f"{kind}M{m} N{n} K{k} +bias gelu_tanh +res", src, r,
                                    lambda x: x == "torch unfused", 1.2, "unfused torch", reason("linear")))
    for b, ctx in DECODE_CONTEXTS:
        src, r = find_kernel(outputs, "decode_attention", B=b, seq_len=ctx, block_size=16, Tq=1)
        rows.append(vs_copy_row("decode attention", f"B{b} ctx {ctx // 1024}k page 16", src, r, 0.70, outputs,
                                reason("decode_attention")))
    for m, n in NORM_SHAPES:
        for op in ("rms_norm", "rms_norm+residual"):
            src, r = find_kernel(outputs, "norm", op=op, M=m, N=n)
            rows.append(vs_copy_row("norm", f"{op} M{m} N{n}", src, r, 0.80, outputs, reason("norm")))
    return rows


def _generate_batch1(outputs: Dict[str, Any]) -> Tuple[Optional[str], Optional[Dict], Optional[Dict]]:
    for n in sorted(outputs, key=lambda n: (n != DECODE_PHASE, n)):
        o = outputs[n]
        if not (isinstance(o, dict) and o.get("benchmark") == "generate" and isinstance(o.get("shapes"), list)):
            continue
        for shape in o["shapes"]:
            if shape.get("shape") != GENERATE_SHAPE:
                continue
            for b in shape.get("batches", []):
                if b.get("batch") == 1:
                    return n, shape, b
    return None, None, None


def generate_rows(outputs: Dict[str, Any], phases: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    area, case = "batch-1 decode", f"{GENERATE_SHAPE} bf16"
    floor_target, hf_target = "<= 1.25x floor", ">= 5x transformers eager"
    src, shape, b = _generate_batch1(outputs)
    if b is None:
        reason = why_not(phases, DECODE_PHASE)
        return [_not_run(area, case + " vs floor", floor_target, reason),
                _not_run(area, case + " vs transformers", hf_target, reason)]
    g = b["timings"].get("genfuse", {})
    if "itl_ms" not in g:
        reason = f"genfuse failed: {g.get('error', 'no timing')}"
        return [_not_run(area, case + " vs floor", floor_target, reason),
                _not_run(area, case + " vs transformers", hf_target, reason)]
    floor = shape["batch1_floor"]
    over = g["itl_ms"] / floor["ms"]
    agree = b.get("token_agreement_vs_eager")
    note = f"token agreement with eager {100 * agree:.0f} %" if agree is not None else ""
    rows = [_row(area, case + " vs floor", f"ITL {g['itl_ms']:.3f} ms ({g['tokens_per_s']:.0f} tokens/s)",
                 floor_target, f"{over:.2f}x floor ({floor['ms']:.3f} ms at {floor['copy_GBps']:.0f} GB/s)",
                 _judge(over <= 1.25), src, note)]
    speed = b.get("speedup_tokens_per_s", {}).get("transformers eager")
    if speed is None:
        hf = b["timings"].get("transformers eager", {})
        rows.append(_not_run(area, case + " vs transformers", hf_target,
                             f"transformers eager: {hf.get('error', 'no timing')}"))
    else:
        rows.append(_row(area, case + " vs transformers", f"{g['tokens_per_s']:.0f} tokens/s", hf_target,
                         f"{speed:.2f}x", _judge(speed >= 5.0), src, note))
    return rows


def engine_rows(outputs: Dict[str, Any], phases: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The serving engine's three goals (bench/engine_bench.py) at GENERATE_SHAPE."""
    area, case = "serving engine", f"{GENERATE_SHAPE} bf16"
    goals = (("throughput", "engine / one at a time", ">= 2x"), ("prefix", "prefix caching TTFT off / on", ">= 5x"),
             ("overhead", "host time of a 64-sequence step", "< 5%"))
    # the one run's phase first, then the named phase's (graphs on before off)
    found = [(n, o) for n, o in sorted(outputs.items(), key=lambda kv: (kv[0] != ENGINE_PHASE, "graphs-off" in kv[0],
                                                                          kv[0]))
             if isinstance(o, dict) and o.get("benchmark") == "engine" and o.get("model") == GENERATE_SHAPE]
    if not found:
        return [_not_run(area, f"{case}: {what}", target, why_not(phases, ENGINE_PHASE)) for _, what, target in goals]
    src, o = found[0]
    graphs = o.get("machine", {}).get("cuda_graphs", "auto")
    rows = []
    for part, what, target in goals:
        r = o.get(part)
        name = f"{case}: {what}"
        if not isinstance(r, dict):
            rows.append(_not_run(area, name, target, f"{src}: no {part} part"))
        elif part == "throughput" and "engine_vs_one_at_a_time" in r:
            ratio = r["engine_vs_one_at_a_time"]
            rows.append(_row(area, name, f"{r['engine']['tokens_per_s']:.0f} / {r['one_at_a_time']['tokens_per_s']:.0f}"
                             " tokens/s", target, f"{ratio:.2f}x", _judge(ratio >= 2.0), src, f"cuda graphs {graphs}"))
        elif part == "prefix" and "ttft_ratio_off_over_on" in r:
            ratio = r["ttft_ratio_off_over_on"]
            rows.append(_row(area, name, f"{1e3 * r['caching_off']['ttft_median_s']:.1f} / "
                             f"{1e3 * r['caching_on']['ttft_median_s']:.1f} ms", target, f"{ratio:.1f}x",
                             _judge(ratio >= 5.0), src))
        elif part == "overhead" and "host_fraction_median" in r:
            frac = r["host_fraction_median"]
            rows.append(_row(area, name, f"{100 * frac:.2f}% of {1e3 * r['step_median_s']:.1f} ms", target,
                             f"{100 * frac:.2f}%", _judge(frac < 0.05), src, f"cuda graphs {graphs}"))
        else:
            rows.append(_not_run(area, name, target, f"{src}: the {part} part has no ratio"))
    return rows


def _image_result(outputs: Dict[str, Any], model: str, batch: int, prefer: str):
    for n in sorted(outputs, key=lambda n: (n != prefer, n)):
        o = outputs[n]
        if isinstance(o, dict) and o.get("benchmark") == "images" and not o.get("smoke"):
            for r in o.get("results", []):
                if r.get("model") == model and r.get("batch") == batch:
                    return n, r
    return None, None


def image_rows(outputs: Dict[str, Any], phases: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for area, case, model, batch, want, what, phase in (
            ("DCGAN faces", f"batch {DCGAN_BATCH}", "dcgan-faces", DCGAN_BATCH, 2.0, "cuDNN eager", DCGAN_PHASE),
            ("VAE decode", "SD 1.5, 64x64 -> 512x512", "sd15-vae-decode", 1, 1.5, "diffusers eager", VAE_PHASE)):
        target = f">= {want:g}x {what}"
        src, r = _image_result(outputs, model, batch, phase)
        if r is None:
            rows.append(_not_run(area, case, target, why_not(phases, phase)))
            continue
        g = r.get("impls", {}).get("genfuse", {})
        if "ms" not in g or EAGER_BEST not in r.get("speedup", {}):
            reason = r.get("not_available") or g.get("error") or f"no {EAGER_BEST} timing"
            rows.append(_not_run(area, case, target, f"{src}: {reason}"))
            continue
        speed = r["speedup"][EAGER_BEST]
        variant = r["impls"][EAGER_BEST].get("variant", "")
        rows.append(_row(area, case, f"{g['ms']:.4f} ms ({g['images_per_s']:.0f} images/s)", target,
                         f"{speed:.2f}x vs {variant or EAGER_BEST}", _judge(speed >= want, g.get("agrees", True)),
                         src, f"rel err {g['rel_err']:.1e}" if "rel_err" in g else ""))
    return rows


def target_rows(work: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows = []
    for build in (kernel_rows, generate_rows, engine_rows, image_rows):
        try:
            rows += build(work["outputs"], work["phases"])
        except Exception as exc:  # noqa: BLE001 - an unexpected file layout must not cost the summary
            rows.append(_row(build.__name__.replace("_rows", ""), "(summary)", "", "", "", "error",
                             note=f"could not read the results: {type(exc).__name__}: {exc}"))
    return rows


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------
def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(header: List[str], rows: List[List[Any]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines


def _device_line(outputs: Dict[str, Any]) -> str:
    info = outputs.get("info", {})
    for o in outputs.values():  # the benchmarks' own device facts (NVML) when there are some
        dev = o.get("device") if isinstance(o, dict) else None
        if isinstance(dev, dict) and dev.get("torch_device_name"):
            nvml = dev.get("nvml", {})
            extra = (f", SM {nvml['sm_clock_MHz']}/{nvml['sm_clock_max_MHz']} MHz, "
                     f"{nvml['power_W']:.0f}/{nvml['power_limit_W']:.0f} W, driver {nvml['driver']}"
                     if "sm_clock_MHz" in nvml else "")
            return (f"{dev['torch_device_name']}{extra}; torch {dev.get('torch')}, triton {dev.get('triton')}, "
                    f"CUDA {dev.get('cuda_runtime')}")
    if info.get("cuda_device"):
        return f"{info['cuda_device']}; torch {info.get('torch')}, triton {info.get('triton')}"
    if info:
        return f"no CUDA device ({info.get('backend', 'unknown backend')}); torch {info.get('torch')}"
    return "unknown (no device facts recorded)"


def _ceilings_line(outputs: Dict[str, Any]) -> str:
    for _, _, payload in _kernel_results(outputs):
        c = payload.get("ceilings", {})
        if c:
            return "Ceilings measured in the run: " + ", ".join(
                f"{k.replace('_', ' ')} {v:.0f}" for k, v in c.items()) + "."
    return "Ceilings: not measured (no kernel benchmark ran)."


def summary_markdown(work: Dict[str, Any], rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    outputs, phases, tests = work["outputs"], work["phases"], work["tests"]
    title = "genfuse GPU check" + (" (dry run, no GPU)" if meta.get("dry") else "")
    lines = [f"# {title}", "",
             f"{meta['generated']}; device: {_device_line(outputs)}; autotune: {meta.get('autotune', '?')}; "
             f"{meta['elapsed_s']:.0f} s of the {meta['budget_s']:.0f} s budget used.", "",
             _ceilings_line(outputs), "", "## Targets", ""]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pass", "short", "MISMATCH", NOT_RUN)}
    lines += _table(["area", "case", "measured", "target", "ratio", "result", "note"],
                    [[r["area"], r["case"], r["measured"], r["target"], r["ratio"], r["status"], r["note"]]
                     for r in rows])
    lines += ["", ", ".join(f"{v} {k}" for k, v in counts.items()) + f" of {len(rows)} targets.", "",
              "## Correctness on CUDA", ""]
    if tests:
        trows = []
        for name, t in tests.items():
            bad = t["failed"] + t["error"] + t["xpassed"]
            ok = bad == 0 and t["not_reached"] == 0 and t["finished"]
            result = "pass" if ok else ("FAIL" if bad else "incomplete")
            trows.append([name, t["collected"], t["passed"], t["failed"], t["error"], t["skipped"],
                          t["xfailed"], t["not_reached"], t["sampled_out"], result])
        lines += _table(["tests", "collected", "passed", "failed", "errors", "skipped", "xfailed",
                         "not reached", "sampled out", "result"], trows)
        failures = [(name, f) for name, t in tests.items() for f in t["failures"]]
        if failures:
            lines += ["", f"Failures ({len(failures)}):", ""]
            lines += [f"- `{f['nodeid']}` ({name}, {f['outcome']}): {f['message']}" for name, f in failures[:40]]
            if len(failures) > 40:
                lines.append(f"- ... {len(failures) - 40} more in results.json")
    else:
        lines.append(f"{NOT_RUN}: " + "; ".join(why_not(phases, p) for p in ("tests-kernels", "tests-runtime")))
    lines += ["", "## Phases", ""]
    lines += _table(["phase", "status", "seconds", "slice s", "note"],
                    [[p["phase"], p["status"], p.get("seconds", ""), p.get("slice", ""), p.get("note", "")]
                     for p in phases])
    sweep = sweep_lines(outputs)
    if sweep:
        lines += ["", "## Sweeps", ""] + sweep
    return "\n".join(lines) + "\n"


def sweep_lines(outputs: Dict[str, Any]) -> List[str]:
    """Every case of the non-headline benchmark outputs, one line each."""
    rows = []
    for n, r, _ in _kernel_results(outputs):
        if n.startswith("headline"):
            continue
        g = r["timings"]["genfuse"]
        flag = "" if r.get("agrees_with_baseline", True) else " MISMATCH"
        rows.append([n, r["kernel"], r["case"] + flag, _rate(g), f"{100 * g['frac_ceiling']:.0f} %",
                     ", ".join(f"{s:.2f}x vs {b}" for b, s in r.get("speedup", {}).items())])
    for n, o in outputs.items():
        if isinstance(o, dict) and o.get("benchmark") == "images" and not n.startswith("headline"):
            for r in o.get("results", []):
                g = r.get("impls", {}).get("genfuse", {})
                rows.append([n, r.get("model"), r.get("case"), f"{g['ms']:.4f} ms" if "ms" in g else
                             r.get("not_available", g.get("error", "")), "",
                             ", ".join(f"{s:.2f}x vs {b}" for b, s in r.get("speedup", {}).items())])
        if isinstance(o, dict) and o.get("benchmark") == "generate" and not n.startswith("headline"):
            for shape in o.get("shapes", []) if isinstance(o.get("shapes"), list) else []:
                for b in shape.get("batches", []):
                    g = b["timings"].get("genfuse", {})
                    speed = b.get("speedup_tokens_per_s", {})
                    rows.append([n, shape["shape"], f"batch {b['batch']}",
                                 f"{g['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in g else g.get("error", ""),
                                 "", ", ".join(f"{s:.2f}x vs {x}" for x, s in speed.items())])
    if not rows:
        return []
    return _table(["file", "kernel / model", "case", "genfuse", "of ceiling", "genfuse speedup"], rows)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def merge(work_dir: str, out_dir: str, budget: float, start: Optional[float], dry: bool) -> Dict[str, Any]:
    work = load_work(work_dir)
    rows = target_rows(work)
    now = time.time()
    meta = {"generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": budget, "elapsed_s": (now - start) if start else 0.0, "dry": dry,
            "autotune": os.environ.get("GENFUSE_AUTOTUNE", "full")}
    results = {"check": meta, "targets": rows, "phases": work["phases"], "tests": work["tests"],
               "outputs": work["outputs"]}
    os.makedirs(out_dir, exist_ok=True)
    _write_atomic(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1, default=str) + "\n")
    _write_atomic(os.path.join(out_dir, "summary.md"), summary_markdown(work, rows, meta))
    return results


def record(work_dir: str, phase: str, status: str, rc: Optional[int], seconds: Optional[float],
           slice_s: Optional[float], note: str) -> None:
    entry = {"phase": phase, "status": status, "rc": rc, "seconds": seconds, "slice": slice_s,
             "note": note, "time": time.time()}
    with open(os.path.join(work_dir, PHASES_FILE), "a") as f:
        f.write(json.dumps(entry) + "\n")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="append how a phase ended to WORK/phases.jsonl")
    r.add_argument("work")
    r.add_argument("phase")
    r.add_argument("status", choices=("ok", "failed", "timed out", "skipped"))
    r.add_argument("--rc", type=int)
    r.add_argument("--seconds", type=float)
    r.add_argument("--slice", type=float)
    r.add_argument("--note", default="")
    m = sub.add_parser("merge", help="write OUT/results.json and OUT/summary.md from WORK")
    m.add_argument("work")
    m.add_argument("out")
    m.add_argument("--budget", type=float, default=0.0, help="the check's wall-time budget, seconds")
    m.add_argument("--start", type=float, default=None, help="the check's start, seconds since the epoch")
    m.add_argument("--dry", action="store_true", help="a dry run (no GPU): said in the summary's title")
    a = p.parse_args(argv)
    if not os.path.isdir(a.work):
        print(f"gpu_summary: work folder {a.work!r} does not exist", file=sys.stderr)
        return 2
    if a.cmd == "record":
        record(a.work, a.phase, a.status, a.rc, a.seconds, a.slice, a.note)
    else:
        merge(a.work, a.out, a.budget, a.start, a.dry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
