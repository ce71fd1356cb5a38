"""End-to-end generation speed: genfuse `LLM.generate` against transformers' `generate`, side by side.

    python -m genfuse.bench.generate_bench [--model smollm2-135m-instruct] [--tokens 64] [--repeats 3]
                                           [--threads N] [--device cpu] [--out results.json]

Both load the same model (for a .gguf, transformers uses its own GGUF loader), run the same
prompt greedily for ``--tokens`` new tokens with EOS ignored, after one warm-up run each, and
report the median tokens/s over ``--repeats`` runs (time to first token included, as a user
sees it), the spread (min/max), and whether the two produced the same tokens. Runs alternate
(genfuse, transformers, genfuse, ...) so that a noisy neighbour hits both alike.

Napkin math for the CPU case: batch-1 decode reads every weight once per token. SmolLM2-135M
in fp32 is 135M x 4 B = 0.54 GB (the tied 49152 x 576 embedding / lm_head alone is 0.11 GB), so
at ~10 GB/s of achievable DRAM bandwidth the floor is ~50 ms/token (~20 tokens/s) whoever does
the matmuls; both implementations spend >80 % of decode time in those GEMVs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "Once upon a time, in a small village by the sea,"


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from genfuse.runtime.llm import LLM
    from genfuse.runtime.registry import resolve
    from genfuse.runtime.sampling import SamplingParams

    llm = LLM(args.model, device=args.device)
    hf = _hf_model(resolve(args.model).path, llm.dtype, llm.device)
    ids = llm.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    sync = torch.cuda.synchronize if llm.device.type == "cuda" else (lambda: None)

    def run_genfuse():
        return llm.generate([ids], params)[0].token_ids

    def run_hf():
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids], device=llm.device), max_new_tokens=args.tokens, do_sample=False)
        return out[0, len(ids):].tolist()

    times = {"genfuse": [], "transformers": []}
    tokens = {}
    for rep in range(args.repeats + 1):  # the first round is the warm-up
        for name, fn in (("genfuse", run_genfuse), ("transformers", run_hf)):
            sync()
            t0 = time.perf_counter()
            tokens[name] = fn()
            sync()
            if rep:
                times[name].append(time.perf_counter() - t0)

    def summary(ts):
        tps = sorted(args.tokens / t for t in ts)
        return {"tokens_per_s_median": statistics.median(tps), "min": tps[0], "max": tps[-1]}

    result = {
        "model": args.model, "device": str(llm.device), "dtype": str(llm.dtype).replace("torch.", ""),
        "backend": llm.model.backend or "auto", "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "prompt_tokens": len(ids), "new_tokens": args.tokens, "repeats": args.repeats,
        "genfuse": summary(times["genfuse"]), "transformers": summary(times["transformers"]),
        "same_tokens": tokens["genfuse"] == tokens["transformers"],
        "torch": torch.__version__,
    }
    result["speedup"] = result["genfuse"]["tokens_per_s_median"] / result["transformers"]["tokens_per_s_median"]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
