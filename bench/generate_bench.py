"""End-to-end generation speed: genfuse `LLM.generate` against transformers' `generate`, side by side.

    genfuse bench generate [--only model,shapes] [--model smollm2-135m-instruct] [--tokens 64]
                           [--repeats 3] [--shapes smollm2-135m,llama-3.2-1b,llama-3-8b]
                           [--batches 1,8,32] [--prompt-tokens 128] [--json results.json]
    python -m genfuse.bench.generate_bench ...      (the same)

Two parts, both greedy with EOS ignored, after one warm-up run of each implementation; runs
alternate (genfuse, transformers, genfuse, ...) so that a noisy neighbour hits both alike.

``model`` (any device): a real model (default the SmolLM2-135M GGUF; a .gguf or a Hugging Face
folder also works) loaded by both genfuse and transformers (for a .gguf, transformers uses its
own GGUF loader), one prompt, ``--tokens`` new tokens: the median tokens/s over ``--repeats``
runs (time to first token included, as a user sees it), the spread, and whether both produced
the same tokens. On CPU this is the SmolLM2-135M fp32 batch-1 comparison of issue 4; with a
.gguf, llama.cpp (llama-cpp-python, `--llama-python`) runs beside them on the same file.
``--prefill-tokens L`` adds a long prompt: each implementation's time to first token on an
L-token prompt of random ids (a new prompt every run, so no prefix cache hits) and the prefill
tokens/s it implies.

``shapes`` (CUDA only; on CPU it is skipped with a message): random weights at the shapes of
SmolLM2-135M, Llama-3.2-1B and Llama-3-8B in bf16, built in memory by transformers from a config
(nothing is downloaded) and written with ``save_pretrained`` to a temporary folder that genfuse's
`LLM` loads, as it would a user's checkpoint. For each batch (1, 8, 32; ``--prompt-tokens``
random prompt ids per sequence, ``--tokens`` new tokens), each implementation is timed at 1 and
at N new tokens: time to first token = the 1-token call, inter-token latency = (T(N) - T(1)) /
(N - 1), tokens/s = batch x N / T(N). Implementations: genfuse, transformers eager (dynamic
cache, compile disabled) and transformers with a static cache, which transformers compiles
(torch.compile of the decode step, CUDA graphs) on CUDA by itself; a failure of that one is
reported, not fatal. With random weights the greedy tokens of two bf16 implementations part
at near-ties, so token agreement is reported, not required.

Napkin math. Batch-1 decode reads every weight once per token (the embedding table only for
one row unless it is tied to the LM head) plus the KV cache so far; the floor of one decode
step is those bytes over the copy bandwidth measured in the same run (~3.0 TB/s on an H100):

* SmolLM2-135M bf16: 0.27 GB (tied 49152 x 576 head: 57 MB) -> 0.09 ms/token; at 30 layers x
  ~8 kernels the step is launch-bound unless it runs as one CUDA graph.
* Llama-3.2-1B bf16: 2.47 GB (tied 128256 x 2048 head: 0.53 GB) -> 0.82 ms/token.
* Llama-3-8B bf16: 15.0 GB (the untied 1.05 GB embedding table not read) -> 5.0 ms/token; its
  KV cache (32 layers x 8 heads x 128 x 2 x 2 B = 128 KiB/token) adds 33 MB at 256 tokens.

The report gives each shape's batch-1 floor and the fraction of it achieved (floor / measured
inter-token latency; the issue's target is within 1.25x, i.e. >= 80 %). On CPU, SmolLM2-135M
dequantized to fp32 is 135M x 4 B = 0.54 GB per token: at the ~12 GB/s one core streams here
that is ~45 ms per token (~22 tokens/s), which is where transformers sits. genfuse keeps the
GGUF's Q4_1/Q8_0 blocks (0.10 GB; `runtime.quant`, fp32 sums) so its floor is ~8 ms and its
decode is bound by decoding the blocks in registers (~12 ms/token on one core) plus the
Python of 30 layers (~12 ms).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import harness

PROMPT = "Once upon a time, in a small village by the sea,"
PARTS = ("model", "shapes")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Hugging Face LlamaConfig fields of the public checkpoints (their config.json), weights random.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
                     "tie_word_embeddings": True},
    "llama-3.2-1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                     "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                     "max_position_embeddings": 131072, "tie_word_embeddings": True},
    "llama-3-8b": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
                   "tie_word_embeddings": False},
}
GPU_BATCHES = (1, 8, 32)
GENFUSE, HF_EAGER, HF_STATIC = "genfuse", "transformers eager", "transformers static cache + compile"


# --------------------------------------------------------------------------------------
# Part 1: a real model, genfuse vs transformers (the CPU comparison of issue 4)
# --------------------------------------------------------------------------------------
def _hf_model(path: Path, dtype, device):
    import transformers

    if path.is_dir():
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    else:
        folder = Path(tempfile.mkdtemp(prefix="gguf_link_"))
        (folder / path.name).symlink_to(path.resolve())
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=path.name, dtype=dtype)
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None  # run to max_new_tokens, like ignore_eos
    model.generation_config.pad_token_id = 0
    return model


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# llama.cpp runs in a child process (its Python may be another environment: llama-cpp-python
# builds from source, so it often lives in a venv of its own). The child loads the GGUF once per
# thread count and answers one JSON line per request, so its runs interleave with the others.
LLAMA_CHILD = r"""
import json, sys, time
from llama_cpp import Llama
path, flash_attn = sys.argv[1], sys.argv[2] == "1"
models = {}
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    t = req["threads"]
    if t not in models:
        t0 = time.perf_counter()
        models[t] = Llama(model_path=path, n_threads=t, n_threads_batch=t, n_ctx=req["n_ctx"],
                          flash_attn=flash_attn, verbose=False)
        load_s = time.perf_counter() - t0
    else:
        load_s = None
    llm, out = models[t], []
    t0 = time.perf_counter()
    if req["n"] > 0:
        for tok in llm.generate(req["ids"], temp=0.0, reset=True):
            out.append(tok)
            if len(out) == req["n"]:
                break
    print(json.dumps({"s": time.perf_counter() - t0, "tokens": out, "load_s": load_s}), flush=True)
"""


def find_llama_python(given: str | None) -> tuple[str | None, str]:
    """(a python that imports llama_cpp, or None; why) from --llama-python, GENFUSE_LLAMA_PYTHON
    or this interpreter."""
    import subprocess

    candidates = [c for c in (given, os.environ.get("GENFUSE_LLAMA_PYTHON"), sys.executable) if c]
    tried = []
    for py in candidates:
        try:
            r = subprocess.run([py, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True,
                               text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            tried.append(f"{py}: {e}")
            continue
        if r.returncode == 0:
            return py, f"llama-cpp-python {r.stdout.strip()} ({py})"
        tried.append(f"{py}: no llama_cpp")
    return None, ("llama.cpp not measured: llama-cpp-python is not importable (" + "; ".join(tried) +
                  "); pass --llama-python /path/to/python of an environment that has it")


class LlamaCpp:
    """The llama.cpp child process: `run(ids, n, threads)` -> (seconds, tokens)."""

    def __init__(self, python: str, gguf: Path, n_ctx: int, flash_attn: bool = False):
        import subprocess

        self.n_ctx = n_ctx
        self.proc = subprocess.Popen([python, "-c", LLAMA_CHILD, str(gguf), "1" if flash_attn else "0"],
                                     stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self._read()
        self.load_s: dict[int, float] = {}

    def _read(self) -> dict[str, Any]:
        import json

        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp child exited (status {self.proc.poll()})")
        return json.loads(line)

    def run(self, ids: list[int], n: int, threads: int) -> tuple[float, list[int]]:
        import json

        self.proc.stdin.write(json.dumps({"ids": ids, "n": n, "threads": threads, "n_ctx": self.n_ctx}) + "\n")
        self.proc.stdin.flush()
        r = self._read()
        if r["load_s"] is not None:
            self.load_s[threads] = r["load_s"]
        return r["s"], r["tokens"]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001 - a hung child is killed
            self.proc.kill()


def _spread(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "n": len(v)}


def compare_model(args) -> dict[str, Any]:
    """genfuse vs llama.cpp (when importable) vs transformers on one real model and prompt,
    batch 1, at each thread count: decode tokens/s and time to first token, interleaved."""
    from genfuse.runtime.llm import LLM
    from genfuse.runtime.registry import resolve
    from genfuse.runtime.sampling import SamplingParams

    thread_counts = args.thread_list or [torch.get_num_threads()]
    t0 = time.perf_counter()
    llm = LLM(args.model, device=args.device)
    genfuse_load_s = time.perf_counter() - t0
    path = resolve(args.model).path
    t0 = time.perf_counter()
    hf = None if args.no_transformers else _hf_model(path, llm.dtype, llm.device)
    hf_load_s = time.perf_counter() - t0
    # a folder without tokenizer files still runs: a fixed prompt of token ids
    ids = llm.tokenizer.encode(PROMPT) if llm.tokenizer else [(7 * i + 3) % llm.config.vocab_size for i in range(12)]
    sync = _sync(llm.device)
    llama_py, llama_note = (None, "llama.cpp not measured: the model is not a .gguf file") \
        if path.suffix != ".gguf" or llm.device.type != "cpu" else find_llama_python(args.llama_python)
    n_ctx = max(len(ids) + args.tokens, args.prefill_tokens + 1) + 8
    llama = LlamaCpp(llama_py, path, n_ctx=n_ctx, flash_attn=args.llama_flash_attn) if llama_py else None

    def run_genfuse(n, threads, prompt=ids):
        llm.set_threads(threads)  # genfuse's kernels on `threads`, torch's intra-op threads 1 (packed)
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        return llm.generate([prompt], params, use_tqdm=False)[0].token_ids

    def run_hf(n, threads, prompt=ids):
        torch.set_num_threads(threads)  # transformers: torch's intra-op threads
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt], device=llm.device), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False)
        return out[0, len(prompt):].tolist()

    impls = {"genfuse": run_genfuse}
    if llama:
        impls["llama.cpp"] = None  # timed in its own process: see below
    if hf is not None:
        impls["transformers"] = run_hf
    by_threads = []
    try:
        for threads in thread_counts:
            total = {k: [] for k in impls}
            first = {k: [] for k in impls}
            tokens: dict[str, list[int]] = {}
            for rep in range(args.repeats + 1):  # round 0 is the warm-up
                for name, fn in impls.items():
                    for n, store in ((1, first), (args.tokens, total)):
                        if name == "llama.cpp":
                            dt, out = llama.run(ids, n, threads)
                        else:
                            sync()
                            t0 = time.perf_counter()
                            out = fn(n, threads)
                            sync()
                            dt = time.perf_counter() - t0
                        if rep:
                            store[name].append(dt)
                    tokens[name] = out
            row: dict[str, Any] = {"threads": threads}
            for name in impls:
                # decode tokens/s of each repeat: (N - 1) tokens over T(N) minus the median T(1)
                # (a repeat that noise made no longer than T(1) says nothing and is left out)
                t1 = statistics.median(first[name])
                dec = [(args.tokens - 1) / (tn - t1) for tn in total[name] if tn > t1] or [float("nan")]
                row[name] = {"decode_tokens_per_s": _spread(dec), "ttft_ms": _spread([t * 1e3 for t in first[name]]),
                             "tokens_per_s_median": statistics.median(args.tokens / t for t in total[name])}
            ref = "transformers" if "transformers" in tokens else None
            row["same_tokens_as_transformers"] = {k: tokens[k] == tokens[ref] for k in tokens if ref and k != ref}
            for name in impls:
                if name != "genfuse":
                    row[f"genfuse_vs_{name}"] = (row["genfuse"]["decode_tokens_per_s"]["median"]
                                                 / row[name]["decode_tokens_per_s"]["median"])
            if args.prefill_tokens:
                row["prefill"] = _time_prefill(args, impls, llama, llm.config.vocab_size, threads)
            by_threads.append(row)
            print(f"[model] {threads} thread(s): " + ", ".join(
                f"{k} {row[k]['decode_tokens_per_s']['median']:.1f} tok/s" for k in impls), file=sys.stderr, flush=True)
    finally:
        if llama:
            llama.close()

    first_row = by_threads[0]
    result = {
        "model": args.model, "gguf": str(path), "device": str(llm.device), "dtype": str(llm.dtype).replace("torch.", ""),
        "backend": llm.model.backend or "auto", "threads": first_row["threads"],
        "keep_quantized": llm.keep_quantized,  # GGUF blocks multiplied packed (runtime.quant)
        "cpu": harness_cpu(), "cpu_count": os.cpu_count(), "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cpu_path": _cpu_path(), "act_bits": os.environ.get("GENFUSE_ACT_BITS", "32"),
        "prompt_tokens": len(ids), "new_tokens": args.tokens, "repeats": args.repeats,
        "load_s": {"genfuse": genfuse_load_s, **({"transformers": hf_load_s} if hf is not None else {}),
                   **({"llama.cpp": llama.load_s} if llama else {})},
        "llama_cpp": llama_note, "llama_flash_attn": args.llama_flash_attn, "by_threads": by_threads,
        "genfuse": {"tokens_per_s_median": first_row["genfuse"]["tokens_per_s_median"]},
        "torch": torch.__version__,
    }
    if hf is not None:
        result["transformers"] = {"tokens_per_s_median": first_row["transformers"]["tokens_per_s_median"]}
        result["same_tokens"] = first_row["same_tokens_as_transformers"].get("genfuse")
        result["speedup"] = result["genfuse"]["tokens_per_s_median"] / result["transformers"]["tokens_per_s_median"]
    return result


def _time_prefill(args, impls: dict[str, Any], llama, vocab: int, threads: int) -> dict[str, Any]:
    """Time to first token of a ``--prefill-tokens`` prompt for each implementation, interleaved:
    one new token, so the time is the prompt's prefill. Every run gets its own prompt (seeded
    random ids, a different seed a run and thread count) so that no prefix cache (genfuse's,
    llama.cpp's) hits."""
    L = args.prefill_tokens
    times: dict[str, list[float]] = {k: [] for k in impls}
    for rep in range(args.repeats + 1):  # round 0 is the warm-up
        prompt = torch.randint(0, vocab, (L,), generator=torch.Generator().manual_seed(1000 * threads + rep)).tolist()
        for name, fn in impls.items():
            if name == "llama.cpp":
                dt, _ = llama.run(prompt, 1, threads)
            else:
                t0 = time.perf_counter()
                fn(1, threads, prompt)
                dt = time.perf_counter() - t0
            if rep:
                times[name].append(dt)
    out: dict[str, Any] = {"prompt_tokens": L}
    for name, ts in times.items():
        out[name] = {"ttft_s": _spread(ts), "prefill_tokens_per_s": _spread([L / t for t in ts])}
    for name in times:
        if name != "genfuse":
            out[f"genfuse_vs_{name}"] = (out["genfuse"]["prefill_tokens_per_s"]["median"]
                                         / out[name]["prefill_tokens_per_s"]["median"])
    print(f"[prefill] {threads} thread(s), {L} tokens: " + ", ".join(
        f"{k} {out[k]['prefill_tokens_per_s']['median']:.0f} tok/s" for k in times), file=sys.stderr, flush=True)
    return out


def harness_cpu() -> dict[str, Any]:
    """The CPU model and its SIMD flags (Linux /proc/cpuinfo), as bench/README records them."""
    info: dict[str, Any] = {"processor": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name") and "model" not in info:
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                info["simd_flags"] = [f for f in flags if f.startswith(("avx", "fma", "f16c", "amx", "sse4"))]
                break
    except OSError:
        pass
    return info


def _cpu_path() -> str | None:
    try:
        from genfuse import _C

        return _C.cpu_path()
    except (ImportError, AttributeError, ValueError):
        return None


# --------------------------------------------------------------------------------------
# Part 2: random weights at real shapes (GPU)
# --------------------------------------------------------------------------------------
def random_hf_model(shape: dict[str, Any], dtype: torch.dtype, device: str | torch.device, seed: int = 0):
    """A transformers Llama with random weights (its own init, std 0.02) at ``shape``, in eval
    mode on ``device``; generation runs to max_new_tokens (no EOS)."""
    import transformers

    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: an 8B model never sits in host memory
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.LlamaConfig(**shape), dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@contextlib.contextmanager
def random_checkpoint(name: str, dtype: torch.dtype, device: str | torch.device):
    """A temporary checkpoint folder (config.json + safetensors, as a user's) holding
    `random_hf_model`'s weights at ``SHAPES[name]``; removed when the block ends."""
    folder = tempfile.mkdtemp(prefix=f"genfuse_bench_{name}_")
    try:
        print(f"[shape] {name}: random weights -> {folder}", file=sys.stderr, flush=True)
        random_hf_model(SHAPES[name], dtype, device).save_pretrained(folder)  # the model itself is dropped
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def random_weight_pair(shape: dict[str, Any], dtype: torch.dtype, device: str, folder: str | os.PathLike,
                       backend: str | None = None):
    """(transformers model, genfuse LLM) with the same random weights at ``shape``.

    The transformers model writes itself to ``folder`` (config.json + safetensors, as a user's
    checkpoint) and genfuse's public `LLM` loads that folder: the path users take."""
    from genfuse.runtime.llm import LLM

    hf = random_hf_model(shape, dtype, device)
    hf.save_pretrained(folder)
    return hf, LLM(str(folder), device=device, dtype=dtype, backend=backend)


def decode_bytes(shape: dict[str, Any], dtype_bytes: int, context: float) -> dict[str, float]:
    """Bytes one batch-1 decode step must read: every weight once (the embedding table only for
    a row, unless tied to the LM head, which reads all of it) and ``context`` tokens of K and V."""
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads, kv = shape["num_attention_heads"], shape.get("num_key_value_heads", shape["num_attention_heads"])
    d = shape.get("head_dim") or h // heads
    per_layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * inter + 2 * h  # qkv, o, MLP, norms
    params = layers * per_layer + h + shape["vocab_size"] * h  # + final norm + LM head
    return {"weight_params": params, "weight_bytes": params * dtype_bytes,
            "kv_bytes": 2 * layers * kv * d * context * dtype_bytes}


def time_generate(impls: dict[str, Callable[[int], list[list[int]]]], batch: int, tokens: int, repeats: int,
                  sync: Callable[[], None]) -> tuple[dict[str, dict[str, float]], dict[str, list[list[int]]]]:
    """Time each ``impl(n_new_tokens) -> token ids per sequence`` at 1 and ``tokens`` new tokens.

    Returns per impl the medians: ``ttft_ms`` (the 1-token call), ``itl_ms``, ``tokens_per_s``,
    ``total_ms``, and ``{"error": ...}`` for one that failed; and the tokens each produced."""
    if tokens < 2:
        raise ValueError(f"need at least 2 new tokens to measure inter-token latency, got {tokens}")
    t1: dict[str, list[float]] = {n: [] for n in impls}
    tn: dict[str, list[float]] = {n: [] for n in impls}
    errors: dict[str, str] = {}
    outputs: dict[str, list[list[int]]] = {}
    for rep in range(repeats + 1):  # round 0 is the warm-up (Triton autotune, torch.compile)
        for name, fn in impls.items():
            if name in errors:
                continue
            try:
                for n, store in ((1, t1), (tokens, tn)):
                    sync()
                    t0 = time.perf_counter()
                    out = fn(n)
                    sync()
                    if rep:
                        store[name].append(time.perf_counter() - t0)
                outputs[name] = out
            except Exception as e:  # noqa: BLE001 - e.g. a torch.compile failure: reported, the rest goes on
                errors[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
    result: dict[str, dict[str, float]] = {}
    for name in impls:
        if name in errors:
            result[name] = {"error": errors[name]}
            continue
        first, total = statistics.median(t1[name]), statistics.median(tn[name])
        result[name] = {"ttft_ms": first * 1e3, "itl_ms": (total - first) / (tokens - 1) * 1e3,
                        "tokens_per_s": batch * tokens / total, "total_ms": total * 1e3,
                        "total_ms_min": min(tn[name]) * 1e3, "total_ms_max": max(tn[name]) * 1e3}
    return result, outputs


def bench_shape(name: str, shape: dict[str, Any], *, dtype: torch.dtype, device: str, batches: list[int],
                prompt_tokens: int, tokens: int, repeats: int, copy_GBps: float, compile: bool = True,
                workdir: str | None = None, backend: str | None = None) -> dict[str, Any]:
    """One shape: every batch size for every implementation, and the batch-1 bandwidth floor."""
    from genfuse.runtime.sampling import SamplingParams

    folder = tempfile.mkdtemp(prefix=f"genfuse_bench_{name}_", dir=workdir)
    try:
        print(f"[shapes] {name}: random weights -> {folder}", file=sys.stderr, flush=True)
        hf, llm = random_weight_pair(shape, dtype, device, folder, backend=backend)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the weights are loaded; the files can go
    if compile:
        # transformers compiles LlamaForCausalLM.forward: one code object for every shape and
        # batch here, each a recompile; past dynamo's limit (8) it would silently run eager.
        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    sync = _sync(torch.device(device))
    gen = torch.Generator().manual_seed(0)
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    floor = decode_bytes(shape, dtype_bytes, context=prompt_tokens + tokens / 2)
    floor_ms = (floor["weight_bytes"] + floor["kv_bytes"]) / (copy_GBps * 1e9) * 1e3
    result: dict[str, Any] = {"shape": name, "config": shape, "dtype": str(dtype).replace("torch.", ""),
                              "prompt_tokens": prompt_tokens, "new_tokens": tokens, "repeats": repeats,
                              "batch1_floor": {**floor, "copy_GBps": copy_GBps, "ms": floor_ms},
                              "batches": []}
    for batch in batches:
        prompts = torch.randint(0, shape["vocab_size"], (batch, prompt_tokens), generator=gen)
        ids, host_ids = prompts.to(device), prompts.tolist()

        def run_genfuse(n, prompts=host_ids):
            params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
            return [c.token_ids for c in llm.generate(prompts, params)]

        def run_hf(n, ids=ids, **kw):
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, **kw)
            return out[:, prompt_tokens:].tolist()

        impls = {GENFUSE: run_genfuse, HF_EAGER: lambda n: run_hf(n, disable_compile=True)}
        if compile:
            impls[HF_STATIC] = lambda n: run_hf(n, cache_implementation="static")
        print(f"[shapes] {name} batch {batch}", file=sys.stderr, flush=True)
        timings, outputs = time_generate(impls, batch, tokens, repeats, sync)
        row: dict[str, Any] = {"batch": batch, "timings": timings}
        g = timings[GENFUSE]
        row["speedup_tokens_per_s"] = {n: g["tokens_per_s"] / t["tokens_per_s"] for n, t in timings.items()
                                       if n != GENFUSE and "tokens_per_s" in t and "tokens_per_s" in g}
        if GENFUSE in outputs and HF_EAGER in outputs:
            pairs = [(a, b) for x, y in zip(outputs[GENFUSE], outputs[HF_EAGER]) for a, b in zip(x, y)]
            row["token_agreement_vs_eager"] = sum(a == b for a, b in pairs) / len(pairs)
        if batch == 1 and "itl_ms" in g:
            result["batch1_floor"]["frac_of_floor"] = floor_ms / g["itl_ms"]
        result["batches"].append(row)
    return result  # the two models go with this frame


# --------------------------------------------------------------------------------------
# Report and command line
# --------------------------------------------------------------------------------------
def format_model(r: dict[str, Any]) -> str:
    cpu = r["cpu"].get("model", r["cpu"].get("processor")) if isinstance(r["cpu"], dict) else r["cpu"]
    lines = [f"{r['model']} on {r['device']} ({r['dtype']}; {cpu}; kernels {r.get('cpu_path')}, "
             f"act bits {r.get('act_bits')}), batch 1, {r['prompt_tokens']}-token prompt, {r['new_tokens']} "
             f"tokens, median of {r['repeats']} (min-max)"]
    for row in r["by_threads"]:
        parts = []
        for name in ("genfuse", "llama.cpp", "transformers"):
            if name in row:
                d = row[name]["decode_tokens_per_s"]
                parts.append(f"{name} {d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) tok/s, "
                             f"TTFT {row[name]['ttft_ms']['median']:.0f} ms")
        ratios = ", ".join(f"{k[len('genfuse_vs_'):]} {v:.2f}x" for k, v in row.items() if k.startswith("genfuse_vs_"))
        same = ", ".join(f"{k}: {v}" for k, v in row["same_tokens_as_transformers"].items())
        lines.append(f"  {row['threads']} thread(s), decode: " + "; ".join(parts) +
                     (f"  | genfuse vs {ratios}" if ratios else "") + (f"  | same tokens as transformers: {same}" if same else ""))
        if "prefill" in row:
            pf = row["prefill"]
            lines.append(f"  {row['threads']} thread(s), prefill of {pf['prompt_tokens']} tokens: " + "; ".join(
                f"{k} {pf[k]['prefill_tokens_per_s']['median']:.0f} tok/s (TTFT {pf[k]['ttft_s']['median']:.2f} s)"
                for k in ("genfuse", "llama.cpp", "transformers") if k in pf))
    lines.append("  load: " + ", ".join(f"{k} {v if isinstance(v, dict) else round(v, 3)}" for k, v in r["load_s"].items()))
    lines.append(f"  {r['llama_cpp']}" + (", flash_attn=True" if r.get("llama_flash_attn") else ""))
    return "\n".join(lines)


def format_shapes(results: list[dict[str, Any]]) -> str:
    rows = [("shape", "batch", "impl", "TTFT ms", "ITL ms", "tokens/s", "genfuse speedup")]
    notes = []
    for r in results:
        for b in r["batches"]:
            for impl, t in b["timings"].items():
                if "error" in t:
                    notes.append(f"{r['shape']} batch {b['batch']} {impl}: failed: {t['error']}")
                    continue
                s = b["speedup_tokens_per_s"].get(impl)
                rows.append((r["shape"], str(b["batch"]), impl, f"{t['ttft_ms']:.2f}", f"{t['itl_ms']:.3f}",
                             f"{t['tokens_per_s']:.1f}", "" if s is None else f"{s:.2f}x"))
        f = r["batch1_floor"]
        frac = f" ; genfuse at {100 * f['frac_of_floor']:.0f} % of it" if "frac_of_floor" in f else ""
        notes.append(f"{r['shape']}: batch-1 decode floor {f['ms']:.3f} ms "
                     f"({(f['weight_bytes'] + f['kv_bytes']) / 1e9:.2f} GB at {f['copy_GBps']:.0f} GB/s){frac}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + notes)


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what} must be integers >= 1, got {text!r}")
    return values


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="genfuse bench generate", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(PARTS),
                   help="comma-separated parts: model (a real model, any device), shapes (random "
                        "weights at real shapes, CUDA only) (default: both; shapes skipped on CPU)")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="model part: registry name, .gguf file or Hugging Face folder (default smollm2-135m-instruct)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per sequence (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (default 3)")
    p.add_argument("--threads", default=None,
                   help="model part: comma-separated thread counts, each measured for every implementation "
                        "(torch intra-op threads, genfuse's kernel threads, llama.cpp n_threads) (default: torch's)")
    p.add_argument("--llama-python", default=None,
                   help="model part: a python whose environment has llama-cpp-python (default: "
                        "$GENFUSE_LLAMA_PYTHON, else this one); llama.cpp is skipped, and the report says so, "
                        "when none imports it")
    p.add_argument("--llama-flash-attn", action="store_true",
                   help="model part: run llama.cpp with flash_attn=True (llama-cpp-python's default is off)")
    p.add_argument("--no-transformers", action="store_true", help="model part: skip transformers")
    p.add_argument("--prefill-tokens", type=int, default=0, metavar="L",
                   help="model part: also time the prefill of an L-token prompt (time to first token, a fresh "
                        "random prompt each run so no prefix cache hits), e.g. 4000 (default 0: skipped)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"shapes part: which (default {','.join(SHAPES)})")
    p.add_argument("--batches", default=",".join(map(str, GPU_BATCHES)),
                   help=f"shapes part: batch sizes (default {','.join(map(str, GPU_BATCHES))})")
    p.add_argument("--prompt-tokens", type=int, default=128, help="shapes part: prompt length (default 128)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="shapes part: dtype (default bf16)")
    p.add_argument("--no-compile", action="store_true",
                   help="shapes part: skip transformers' static cache + torch.compile baseline")
    p.add_argument("--workdir", default=None,
                   help="shapes part: where the random-weight folders are written (default: the temp dir)")
    p.add_argument("--skip-ceilings", action="store_true",
                   help="use the reference copy bandwidth (3.0 TB/s) instead of measuring it now")
    p.add_argument("--json", "--out", dest="json", metavar="PATH", help="write the results as JSON here")
    return p


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        args = build_parser().parse_args(argv)
    parts = [s.strip() for s in args.only.split(",") if s.strip()]
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [p for p in parts if p not in PARTS] + [s for s in shapes if s not in SHAPES]
    try:
        batches = _int_list(args.batches, "--batches")
        args.thread_list = _int_list(args.threads, "--threads") if args.threads else None
        if bad:
            raise ValueError(f"unknown parts or shapes {bad}; parts: {', '.join(PARTS)}; shapes: {', '.join(SHAPES)}")
        if args.tokens < 2 or args.repeats < 1 or args.prompt_tokens < 1 or args.prefill_tokens < 0:
            raise ValueError("--tokens must be >= 2, --repeats and --prompt-tokens >= 1, --prefill-tokens >= 0")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda") and torch.cuda.is_available()
    if device.startswith("cuda") and not on_gpu:
        print("error: --device cuda but no CUDA GPU is available here (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    if parts == ["shapes"] and not on_gpu:
        print("error: the shapes part needs a CUDA GPU and none is available here "
              "(torch.cuda.is_available() is False); nothing was timed.", file=sys.stderr)
        return 2
    if args.thread_list:
        torch.set_num_threads(args.thread_list[0])

    report: dict[str, Any] = {"benchmark": "generate", "device": harness.device_info()}
    if "model" in parts:
        args.device = device
        report["model"] = compare_model(args)
        print(format_model(report["model"]))
    if "shapes" in parts:
        if not on_gpu:
            reason = "needs a CUDA GPU (random weights at SmolLM2-135M / Llama-3.2-1B / Llama-3-8B shapes in bf16)"
            print(f"shapes part skipped: {reason}", file=sys.stderr)
            report["shapes"] = {"skipped": reason}
        else:
            copy_GBps = harness.REFERENCE_CEILINGS["copy_GBps"] if args.skip_ceilings else \
                harness.measure_ceilings(torch.bfloat16)["copy_GBps"]
            results = []
            for name in shapes:
                try:
                    results.append(bench_shape(name, SHAPES[name], dtype=DTYPES[args.dtype], device=device,
                                               batches=batches, prompt_tokens=args.prompt_tokens,
                                               tokens=args.tokens, repeats=args.repeats, copy_GBps=copy_GBps,
                                               compile=not args.no_compile, workdir=args.workdir))
                except torch.cuda.OutOfMemoryError as e:
                    print(f"[shapes] {name}: skipped, out of memory ({e})", file=sys.stderr)
                    results.append({"shape": name, "skipped": f"out of memory: {e}"})
                torch.cuda.empty_cache()  # the last shape's models are gone: free their memory
            report["shapes"] = results
            print(format_shapes([r for r in results if "batches" in r]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        harness.write_json(args.json, report)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
