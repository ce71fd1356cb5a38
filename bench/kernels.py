"""Kernel benchmark: every genfuse kernel against the path a user would otherwise take.

    python -m genfuse.bench.kernels [--only attention,linear] [--dtype bf16] [--json out.json]
    genfuse bench kernels ...          (the same)
    genfuse bench kernels --size headline --json out.json   (the GPU check's headline cases)

``--size headline`` runs only the cases the GPU check's targets are judged on (attention at
sequence 4k, linear 4096^3 and a decode shape, decode attention at 8k/32k context, rms_norm;
no torch.compile baselines), families ``HEADLINE_FAMILIES``. The JSON is rewritten after every
case, so a run cut off by a time limit keeps the cases it finished.

Needs a CUDA GPU: without one it says so and exits with status 2 (nothing is timed on CPU;
the CPU test-suite only checks that every case runs and agrees with its baseline).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

import torch

from . import harness

# One module per kernel family, each with cases(device, dtype, size) -> list[harness.Case].
FAMILIES = ("attention", "decode_attention", "unified_attention", "linear", "norm", "rotary", "swiglu",
            "group_norm", "conv2d", "conv_transpose2d")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Families with a "headline" size: the cases the GPU check's targets are judged on.
HEADLINE_FAMILIES = ("attention", "linear", "decode_attention", "norm")
SIZES = ("full", "headline")


def family_cases(family: str, device: str, dtype: torch.dtype, size: str) -> List[harness.Case]:
    module = importlib.import_module(f"{__package__}.{family}_bench")
    return module.cases(device, dtype, size)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="genfuse bench kernels", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None,
                   help=f"comma-separated kernel families to run (default: all of {', '.join(FAMILIES)}; "
                        f"with --size headline: {', '.join(HEADLINE_FAMILIES)})")
    p.add_argument("--size", choices=SIZES, default="full",
                   help="full: every case (default); headline: the GPU check's target cases only")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="input dtype (default bf16)")
    p.add_argument("--json", metavar="PATH", help="also write the results, with device facts, to PATH")
    p.add_argument("--skip-ceilings", action="store_true",
                   help="use the workplace's reference ceilings instead of measuring copy and matmul now")
    return p


def main(argv: Optional[List[str]] = None, args: Optional[argparse.Namespace] = None) -> int:
    if args is None:
        args = build_parser().parse_args(argv)
    size = getattr(args, "size", "full")
    allowed = HEADLINE_FAMILIES if size == "headline" else FAMILIES
    only = args.only if args.only is not None else ",".join(allowed)
    families = [f.strip() for f in only.split(",") if f.strip()]
    unknown = [f for f in families if f not in allowed]
    if unknown or not families:
        print(f"error: unknown kernel families {unknown or only!r} for --size {size}; choose from "
              f"{', '.join(allowed)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: the kernel benchmark needs a CUDA GPU and none is available here "
              "(torch.cuda.is_available() is False); nothing was timed.", file=sys.stderr)
        return 2

    dtype = DTYPES[args.dtype]
    info = harness.device_info()
    print(f"device: {info.get('torch_device_name')}  torch {info['torch']}  triton {info['triton']}", file=sys.stderr)
    if args.skip_ceilings:
        ceilings = dict(harness.REFERENCE_CEILINGS)
    else:
        print("measuring ceilings (1 GiB copy, 8192^3 matmul)...", file=sys.stderr)
        ceilings = harness.measure_ceilings(dtype if dtype != torch.float32 else torch.bfloat16)
    matmul_key = next(k for k in ceilings if k.endswith("_matmul_TFLOPs"))
    print("ceilings: " + ", ".join(f"{k}={v:.0f}" for k, v in ceilings.items()), file=sys.stderr)

    results, skipped, failed = [], [], []

    def save(done: bool) -> None:
        if args.json:  # after every case: a run cut off by a time limit keeps what it finished
            harness.write_json(args.json, {"device": info, "dtype": args.dtype, "size": size,
                                           "families": families, "complete": done, "ceilings": ceilings,
                                           "reference_ceilings": harness.REFERENCE_CEILINGS,
                                           "results": results, "skipped": skipped, "failed": failed})

    save(False)
    for family in families:
        try:
            cases = family_cases(family, "cuda", dtype, size)
        except Exception as exc:  # noqa: BLE001 - one family's inputs (e.g. out of memory): the others still run
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            print(f"[{family}] cases could not be built: {reason}", file=sys.stderr)
            failed.append({"kernel": family, "case": "(building the cases)", "error": reason})
            torch.cuda.empty_cache()
            save(False)
            continue
        total = len(cases)
        for i in range(1, total + 1):
            case = cases.pop(0)  # drop each case's inputs once timed: peak memory is one family
            print(f"[{family} {i}/{total}] {case.name}", file=sys.stderr, flush=True)
            try:
                results.append(harness.run_case(case, ceilings, matmul_key))
            except torch.cuda.OutOfMemoryError as exc:
                print(f"  skipped: out of memory ({exc})", file=sys.stderr)
                skipped.append({"kernel": family, "case": case.name, "reason": "out of memory"})
            except Exception as exc:  # noqa: BLE001 - e.g. a kernel that fails to compile: the other cases still run
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                print(f"  failed: {reason}", file=sys.stderr)
                failed.append({"kernel": family, "case": case.name, "error": reason})
            del case
            torch.cuda.empty_cache()
            save(False)
    print(harness.format_table(results))
    save(True)
    if args.json:
        print(f"wrote {args.json}", file=sys.stderr)
    if failed:
        print(f"FAILED: {len(failed)} case(s): " + "; ".join(f"{f['kernel']} {f['case']}" for f in failed),
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
