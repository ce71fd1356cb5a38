"""Image benchmark: the DCGAN faces generator and the SD 1.5 VAE decode, genfuse vs torch.

    genfuse bench images [--only dcgan,vae] [--batches 1,64,256] [--dtype fp16] [--json out.json]
    python -m genfuse.bench.images ...            (the same)
    genfuse bench images --device cpu --smoke     (tiny random models on CPU: checks the code path)

In one process on one GPU, each case is timed for genfuse and for the paths a user would
otherwise take, and every output is checked against a float64 torch reference of the same
weights (a fast wrong answer is flagged ``MISMATCH`` and makes the exit status 1):

* ``dcgan``: the ``"dcgan-faces"`` generator (trained weights from ``gan-face-generate`` when
  installed, else random weights of the same shape; speed does not depend on them) at batch
  1, 64 and 256, as images/s and ms. genfuse: ``genfuse.accelerate`` (BatchNorm folded,
  activations in the conv epilogue). Baselines: torch eager on cuDNN in channels-last, as is
  and with BatchNorm folded into a torch copy (``genfuse.kernels.fold_batchnorm``); "torch
  eager (best)" is the faster of the two. And ``torch.compile`` of the eager module.
* ``vae``: diffusers ``AutoencoderKL`` with the SD 1.5 config (block_out_channels
  (128, 256, 512, 512), 2 layers per block, 4 latent channels, 32 norm groups), random weights,
  decoding a 1x4x64x64 latent to 1x3x512x512. genfuse: ``genfuse.accelerate(vae).decode(z)
  .sample``; when that is not available the case says "not available: <reason>" and still
  times the baselines. Baselines: diffusers eager (the faster of NCHW and channels-last) and
  ``torch.compile`` of the decode.

Times are ``triton.testing.do_bench`` medians with 20/80 % quantiles (L2 flushed between
repetitions, Python launch overhead included, as a user calls the module). Without a CUDA GPU
the benchmark says so and exits 2, unless ``--device cpu --smoke`` asks for the CPU check of
the code path (tiny models, wall-clock medians: no numbers to quote).

Napkin math (H100 SXM: ~3.0 TB/s copy, ~800 TFLOP/s dense fp16/bf16 measured; KERNELS.md):

* DCGAN faces generator: 3.58 M parameters (7.2 MB in fp16), 0.21 GFLOP per image (four
  stride-2 4x4 transposed convs of ~34 M MACs each, 512 -> 256 -> 128 -> 64 -> 3 channels).
  Each image writes and reads back ~135 k activations (0.27 MB in fp16).
  - batch 1: 7.2 MB of weights / 3 TB/s = 2.4 us and 0.2 GFLOP = 0.3 us: the floor is the
    five kernel launches (~3-5 us each from Python); latency-bound, not HBM- or FLOP-bound.
  - batch 256: 54 GFLOP / 800 TFLOP/s = 67 us; activations 256 x 0.54 MB = 138 MB / 3 TB/s
    = 46 us (less where a layer's output stays in the 50 MB L2). Both near: a good kernel
    lands at 0.1-0.2 ms, i.e. 1-2.5 M images/s.
* SD 1.5 VAE decode 64x64 -> 512x512: 49.5 M decoder parameters (99 MB fp16), 2.51 TFLOP
  (FlopCounterMode), almost all 3x3 convs: 512 channels at 128^2 and 256^2 and 256/128
  channels at 256^2 and 512^2; the mid-block attention (4096 tokens, one head of 512) is
  under 1 %. 2.51 TFLOP / 800 TFLOP/s = 3.1 ms. Activations: the largest tensors are 64 MB
  (512 x 256^2 and 128 x 512^2 in fp16); GroupNorm + SiLU, the convs and the residuals move
  roughly 2-3 GB in all, ~1 ms at 3 TB/s. Compute-bound: the floor is ~3 ms, and implicit-
  GEMM convs at 60 % of the matmul rate would give ~5 ms.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import harness

CASES = ("dcgan", "vae")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Relative error vs the float64 reference: fp32 leaves room for TF32 convs (cuDNN's default).
TOLERANCES = {"fp32": 5e-3, "fp16": 2e-2, "bf16": 5e-2}
FULL_BATCHES = (1, 64, 256)
SMOKE_BATCHES = (1, 3)
EAGER_BEST = "torch eager (best)"
COMPILE = "torch.compile"

# SD 1.5's VAE (runwayml/stable-diffusion-v1-5, vae/config.json) and a tiny one for the smoke run.
SD15_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32, "sample_size": 512}
TINY_VAE = {**SD15_VAE, "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2, "block_out_channels": (8, 16),
            "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 16}


class NotAvailable(Exception):
    """An implementation that cannot run here; the message says why."""


# --------------------------------------------------------------------------------------
# Timing and checking
# --------------------------------------------------------------------------------------
def make_timer(device: str, smoke: bool) -> Callable[[Callable[[], Any]], dict[str, float]]:
    """ms median and 20/80 % quantiles: do_bench on CUDA, a wall-clock loop on CPU."""
    if device.startswith("cuda"):
        from triton.testing import do_bench

        def cuda_timer(fn):
            q = do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])
            return {"ms": q[0], "ms_p20": q[1], "ms_p80": q[2]}
        return cuda_timer

    reps = 1 if smoke else 10  # smoke: the call checked before timing was the warm-up

    def cpu_timer(fn):
        if not smoke:
            fn()  # warm-up
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        ts.sort()
        return {"ms": statistics.median(ts), "ms_p20": ts[0], "ms_p80": ts[-1]}
    return cpu_timer


def measure(impls: dict[str, Callable[[], Any]], reference: torch.Tensor, tol: float,
            timer: Callable, items: int, flops: float) -> dict[str, Any]:
    """Check each implementation against ``reference`` once, then time it.

    Returns ``{"impls": {name: timings + rel_err + agrees, or {"error": why}}, "agrees"}``.
    ``items`` (images per call) gives images/s; ``flops`` the achieved TFLOP/s."""
    out: dict[str, Any] = {}
    for name, fn in impls.items():
        try:
            y = fn()
        except NotAvailable as e:
            out[name] = {"error": str(e)}
            continue
        except Exception as e:  # noqa: BLE001 - any failure (e.g. of torch.compile) is reported, not fatal
            out[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
            continue
        err = harness.rel_error(y, reference)
        t = timer(fn)
        t["images_per_s"] = items / (t["ms"] * 1e-3)
        t["TFLOPs"] = flops / (t["ms"] * 1e-3) / 1e12
        t["frac_matmul_ceiling"] = t["TFLOPs"] / harness.REFERENCE_CEILINGS["bf16_matmul_TFLOPs"]
        out[name] = {**t, "rel_err": err, "agrees": bool(err <= tol)}
    return {"impls": out, "agrees": all(v.get("agrees", True) for v in out.values())}


def add_best_and_speedups(result: dict[str, Any], eager_names: list[str]) -> None:
    """Add "torch eager (best)" (the fastest eager variant that agrees) and genfuse's speedups."""
    impls = result["impls"]
    eager = [impls[n] for n in eager_names if "ms" in impls.get(n, {}) and impls[n]["agrees"]]
    if eager:
        best = min(eager, key=lambda t: t["ms"])
        impls[EAGER_BEST] = {**best, "variant": next(n for n in eager_names if impls.get(n) is best)}
    g = impls.get("genfuse", {})
    result["speedup"] = {n: impls[n]["ms"] / g["ms"] for n in (EAGER_BEST, COMPILE)
                         if "ms" in g and "ms" in impls.get(n, {})}


def reference_and_flops(fn: Callable[[torch.Tensor], Any], x: torch.Tensor):
    """(the float64 reference output, the FLOPs it took as torch counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        y = harness.first_tensor(fn(x))
    return y, float(fc.get_total_flops())


def compile_module(module: nn.Module, args) -> nn.Module:
    """The torch.compile baseline (inductor; dynamo alone in the smoke run, to stay fast)."""
    if args.smoke:
        return torch.compile(module, backend="eager")
    # dynamic=False: each batch size gets kernels specialised to it, as a user compiling for
    # one batch would (automatic dynamic shapes would switch to symbolic sizes at the second)
    return torch.compile(module, mode=args.compile_mode, dynamic=False)


# --------------------------------------------------------------------------------------
# DCGAN
# --------------------------------------------------------------------------------------
def fold_batchnorm_torch(module: nn.Module) -> nn.Module:
    """A torch copy of ``module`` with every BatchNorm2d that follows a conv in an
    ``nn.Sequential`` folded into that conv (``genfuse.kernels.fold_batchnorm``)."""
    from genfuse.kernels import fold_batchnorm

    def fold(seq: nn.Sequential) -> nn.Sequential:
        layers, items, i = [], list(seq), 0
        while i < len(items):
            m = items[i]
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and i + 1 < len(items) \
                    and isinstance(items[i + 1], nn.BatchNorm2d):
                bn = items[i + 1]
                w, b = fold_batchnorm(m.weight.data, None if m.bias is None else m.bias.data,
                                      bn.weight.data, bn.bias.data, bn.running_mean, bn.running_var,
                                      bn.eps, transposed=isinstance(m, nn.ConvTranspose2d))
                m = copy.deepcopy(m)
                m.weight, m.bias = nn.Parameter(w), nn.Parameter(b)
                i += 1
            elif isinstance(m, nn.Sequential):
                m = fold(m)
            layers.append(m)
            i += 1
        return nn.Sequential(*layers)

    def walk(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Sequential):
                setattr(parent, name, fold(child))
            else:
                walk(child)

    module = copy.deepcopy(module)
    if isinstance(module, nn.Sequential):
        return fold(module)
    walk(module)
    return module


def dcgan_generator(smoke: bool):
    """(generator in eval mode, latent size nz, description of its weights).

    The smoke generator is a two-layer DCGAN-style stack (16 -> 8 -> 3 channels, 1 -> 4 -> 8
    pixels): the full 64x64 one takes minutes through the Triton interpreter."""
    from genfuse.runtime.dcgan import DCGANConfig, Generator, load_generator
    from genfuse.runtime.registry import ModelNotInstalledError

    if smoke:
        nz, weights = 16, "random (smoke: 16 -> 8 -> 3 channels, 8x8 pixels)"
        gen = nn.Sequential(nn.ConvTranspose2d(nz, 8, 4, 1, 0, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.ConvTranspose2d(8, 3, 4, 2, 1, bias=False), nn.Tanh())
    else:
        nz = DCGANConfig().nz
        try:
            return load_generator("dcgan-faces").eval(), nz, "trained (dcgan-faces)"
        except ModelNotInstalledError as e:
            gen, weights = Generator(DCGANConfig()), f"random, dcgan-faces shape ({e})"
    with torch.no_grad():  # random BatchNorm statistics, so that folding them matters
        for m in gen.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return gen.eval(), nz, weights


def bench_dcgan(args, device: str, dtype: torch.dtype, timer, accelerate=None) -> list[dict[str, Any]]:
    import genfuse

    accelerate = accelerate or genfuse.accelerate
    gen, nz, weights = dcgan_generator(args.smoke)  # fp32 on the CPU, as loaded
    cl = torch.channels_last
    ref64 = copy.deepcopy(gen).to(device, torch.float64)
    # Folding and accelerating start from the fp32 weights, as a user would, then cast.
    folded = fold_batchnorm_torch(gen).to(device, dtype).to(memory_format=cl)
    fast = accelerate(gen).to(device, dtype)
    eager = copy.deepcopy(gen).to(device, dtype).to(memory_format=cl)
    compiled = None if getattr(args, "no_compile", False) else compile_module(eager, args)
    eager_names = ["torch eager channels-last", "torch eager channels-last, BN folded"]
    results = []
    for batch in args.batch_list:
        z = torch.randn(batch, nz, 1, 1, device=device, dtype=dtype)
        zcl = z.contiguous(memory_format=cl)
        reference, flops = reference_and_flops(ref64, z.double())
        impls = {"genfuse": lambda z=z: fast(z), eager_names[0]: lambda z=zcl: eager(z),
                 eager_names[1]: lambda z=zcl: folded(z)}
        if compiled is not None:
            impls[COMPILE] = lambda z=zcl: compiled(z)
        print(f"[dcgan] batch {batch}", file=sys.stderr, flush=True)
        r = {"model": "dcgan-faces", "case": f"batch {batch}", "batch": batch, "weights": weights,
             "flops": flops, "tolerance": args.tol,
             **measure(impls, reference, args.tol, timer, items=batch, flops=flops)}
        add_best_and_speedups(r, eager_names)
        results.append(r)
    return results


# --------------------------------------------------------------------------------------
# SD 1.5 VAE decode
# --------------------------------------------------------------------------------------
class _Decode(nn.Module):
    """``vae.decode(z).sample`` as a module, for torch.compile."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z).sample


def accelerate_vae(vae, accelerate=None):
    """``genfuse.accelerate(vae)`` when genfuse can run an AutoencoderKL decode, else NotAvailable."""
    import genfuse

    if accelerate is None:
        if importlib.util.find_spec("genfuse.runtime.vae") is None:
            raise NotAvailable("genfuse.runtime.vae is not there yet: genfuse.accelerate cannot "
                               "run an AutoencoderKL decode in this version")
        accelerate = genfuse.accelerate
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = accelerate(vae)
    if not hasattr(fast, "decode"):
        raise NotAvailable(f"genfuse.accelerate returned a {type(fast).__name__} without .decode()")
    left = [str(w.message) for w in caught if "left on torch" in str(w.message)]
    return fast, left


def bench_vae(args, device: str, dtype: torch.dtype, timer, accelerate=None) -> list[dict[str, Any]]:
    cfg = TINY_VAE if args.smoke else SD15_VAE
    size = cfg["sample_size"] // 2 ** (len(cfg["block_out_channels"]) - 1)  # latent side: 64 for SD 1.5
    case = {"model": "sd15-vae-decode" if not args.smoke else "tiny-vae-decode",
            "case": f"1x{cfg['latent_channels']}x{size}x{size} -> {cfg['sample_size']}x{cfg['sample_size']}",
            "batch": 1, "weights": "random", "tolerance": args.tol}
    try:
        from diffusers import AutoencoderKL
        from diffusers.utils import logging as diffusers_logging
    except ImportError as e:
        print(f"[vae] not available: diffusers is not installed ({e}); pip install diffusers",
              file=sys.stderr)
        return [{**case, "not_available": f"diffusers is not installed: {e}"}]
    print(f"[vae] {case['case']}", file=sys.stderr, flush=True)
    diffusers_logging.set_verbosity_error()  # its note on casting a from_pretrained-less model
    vae = AutoencoderKL(**cfg).eval()
    ref64 = copy.deepcopy(vae).to(device, torch.float64)
    vae = vae.to(device, dtype)
    cl = torch.channels_last
    vae_cl = copy.deepcopy(vae).to(memory_format=cl)
    compiled = None if getattr(args, "no_compile", False) else compile_module(_Decode(vae), args)
    z = torch.randn(1, cfg["latent_channels"], size, size, device=device, dtype=dtype)
    zcl = z.contiguous(memory_format=cl)
    reference, flops = reference_and_flops(lambda x: ref64.decode(x).sample, z.double())
    state: dict[str, Any] = {"notes": []}

    def run_genfuse():  # accelerated on first use, so that NotAvailable lands in measure()
        if "fast" not in state:
            state["fast"], state["notes"] = accelerate_vae(vae, accelerate)
        return state["fast"].decode(z).sample

    eager_names = ["diffusers eager", "diffusers eager channels-last"]
    impls = {"genfuse": run_genfuse, eager_names[0]: lambda: vae.decode(z).sample,
             eager_names[1]: lambda: vae_cl.decode(zcl).sample}
    if compiled is not None:
        impls[COMPILE] = lambda: compiled(z)
    r = {**case, "flops": flops, **measure(impls, reference, args.tol, timer, items=1, flops=flops)}
    if state["notes"]:
        r["genfuse_warnings"] = state["notes"]
    if "error" in r["impls"]["genfuse"]:
        r["not_available"] = r["impls"]["genfuse"]["error"]
        print(f"[vae] genfuse: not available: {r['not_available']}", file=sys.stderr)
    add_best_and_speedups(r, eager_names)
    return [r]


# --------------------------------------------------------------------------------------
# Report and command line
# --------------------------------------------------------------------------------------
def format_table(results: list[dict[str, Any]]) -> str:
    """The timings as a table; what could not run is listed under it with the reason."""
    rows = [("model", "case", "impl", "median ms", "p20-p80 ms", "images/s", "TFLOP/s", "rel err",
             "genfuse speedup")]
    missing = []
    for r in results:
        if "impls" not in r:
            missing.append(f"{r['model']} {r['case']}: not available: {r['not_available']}")
            continue
        for impl, t in r["impls"].items():
            if "error" in t:
                missing.append(f"{r['model']} {r['case']} {impl}: not available: {t['error']}")
                continue
            flag = "" if t["agrees"] else "  MISMATCH"
            speed = f"{r['speedup'][impl]:.2f}x" if impl in r.get("speedup", {}) else ""
            rows.append((r["model"], r["case"], impl, f"{t['ms']:.4f}", f"{t['ms_p20']:.4f}-{t['ms_p80']:.4f}",
                         f"{t['images_per_s']:.0f}", f"{t['TFLOPs']:.2f}", f"{t['rel_err']:.1e}{flag}", speed))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + missing)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="genfuse bench images", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(CASES), help="comma-separated: dcgan, vae (default: both)")
    p.add_argument("--batches", default=None,
                   help=f"DCGAN batch sizes (default {','.join(map(str, FULL_BATCHES))}; "
                        f"smoke {','.join(map(str, SMOKE_BATCHES))})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of every implementation (default fp16; fp32 with --smoke)")
    p.add_argument("--tol", type=float, default=None,
                   help="relative error vs the float64 reference that counts as agreeing "
                        f"(default per dtype: {TOLERANCES})")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode of the baseline (default: torch's default mode)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile baseline (its compile time does not fit the GPU check)")
    p.add_argument("--device", default=None, help="torch device (default cuda; cpu only with --smoke)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny random models and batches: checks the code path (CPU allowed), no numbers to quote")
    p.add_argument("--json", metavar="PATH", help="also write the results, with device facts, to PATH")
    return p


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None,
         accelerate=None) -> int:
    """Run the benchmark; 0 when every output agrees with the reference, 1 on a mismatch, 2 on
    bad arguments or no GPU. ``accelerate`` replaces ``genfuse.accelerate`` (tests)."""
    if args is None:
        args = build_parser().parse_args(argv)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in only if c not in CASES]
    if unknown or not only:
        print(f"error: unknown cases {unknown}; choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    try:
        args.batch_list = [int(b) for b in args.batches.split(",")] if args.batches else \
            list(SMOKE_BATCHES if args.smoke else FULL_BATCHES)
    except ValueError:
        print(f"error: --batches must be comma-separated integers, got {args.batches!r}", file=sys.stderr)
        return 2
    if not args.batch_list or min(args.batch_list) < 1:
        print(f"error: batch sizes must be at least 1, got {args.batches!r}", file=sys.stderr)
        return 2
    device = args.device or "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: the image benchmark needs a CUDA GPU and none is available here "
              "(torch.cuda.is_available() is False); nothing was timed. "
              "`--device cpu --smoke` checks the code path on CPU.", file=sys.stderr)
        return 2
    if not device.startswith("cuda") and not args.smoke:
        print(f"error: the image benchmark times on a CUDA GPU, not on {device!r}; "
              "add --smoke to check the code path on tiny models instead.", file=sys.stderr)
        return 2
    args.dtype = args.dtype or ("fp32" if args.smoke else "fp16")
    dtype = DTYPES[args.dtype]
    args.tol = args.tol if args.tol is not None else TOLERANCES[args.dtype]

    info = harness.device_info()
    print(f"device: {info.get('torch_device_name', device)}  torch {info['torch']}  "
          f"triton {info['triton']}  dtype {args.dtype}{'  (smoke)' if args.smoke else ''}", file=sys.stderr)
    torch.backends.cudnn.benchmark = True  # the eager baselines pick their fastest cuDNN algorithms
    timer = make_timer(device, args.smoke)
    results: list[dict[str, Any]] = []
    torch.manual_seed(0)
    with torch.inference_mode():
        if "dcgan" in only:
            results += bench_dcgan(args, device, dtype, timer, accelerate)
        if "vae" in only:
            results += bench_vae(args, device, dtype, timer, accelerate)
    print(format_table(results))
    mismatched = [f"{r['model']} {r['case']}" for r in results if not r.get("agrees", True)]
    if mismatched:
        print(f"MISMATCH: outputs disagree with the float64 reference beyond {args.tol:g} in: "
              + "; ".join(mismatched), file=sys.stderr)
    if args.json:
        compile_mode = ("not run (--no-compile)" if getattr(args, "no_compile", False)
                        else args.compile_mode or "default")
        harness.write_json(args.json, {"benchmark": "images", "device": info, "torch_device": device,
                                       "dtype": args.dtype, "smoke": args.smoke, "tolerance": args.tol,
                                       "compile_mode": compile_mode,
                                       "reference_ceilings": harness.REFERENCE_CEILINGS, "results": results})
        print(f"wrote {args.json}", file=sys.stderr)
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
