"""The `genfuse` command line (also `python -m genfuse`)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _cmd_info(args: argparse.Namespace) -> int:
    from genfuse import info

    facts = info.collect()
    print(json.dumps(facts, indent=1) if args.json else info.format_text(facts))
    return 0


def _cmd_bench_kernels(args: argparse.Namespace) -> int:
    from genfuse.bench import kernels

    return kernels.main(args=args)


def build_parser() -> argparse.ArgumentParser:
    import genfuse

    parser = argparse.ArgumentParser(
        prog="genfuse",
        description="genfuse: a custom-kernel inference runtime for generative models "
                    "(Triton kernels, a C++ extension, KV-cache decoding).",
    )
    parser.add_argument("--version", action="version", version=f"genfuse {genfuse.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_info = sub.add_parser("info", help="versions, the backend in use and the GPU (via NVML)",
                            description="Print genfuse, torch, triton and extension versions, the "
                                        "execution backend in use, and the GPU as NVML sees it.")
    p_info.add_argument("--json", action="store_true", help="print the facts as JSON")
    p_info.set_defaults(func=_cmd_info)

    p_bench = sub.add_parser("bench", help="benchmarks (needs a CUDA GPU)",
                             description="Run genfuse's benchmarks against the PyTorch paths.")
    bench_sub = p_bench.add_subparsers(dest="suite", metavar="SUITE", required=True)
    from genfuse.bench import kernels as bench_kernels

    p_bk = bench_sub.add_parser("kernels", help="every kernel against torch / cuBLAS / SDPA / flash-attn",
                                description=bench_kernels.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_kernels.build_parser(p_bk)
    p_bk.set_defaults(func=_cmd_bench_kernels)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
