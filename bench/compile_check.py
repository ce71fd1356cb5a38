"""Compile every genfuse Triton kernel for an H100 (sm_90) without a GPU.

    python -m genfuse.bench.compile_check [--only attention,linear] [--jobs 2] [--list]
    python -m genfuse.bench.compile_check --quick      (only what GENFUSE_AUTOTUNE=quick can pick)
    PYTHONPATH=. python bench/compile_check.py ...        (from a checkout, no install needed)

The CPU machines run the kernels through Triton's interpreter only, which never lowers them;
the GPU machine compiles them with whatever Triton it has (3.6 there, 3.9 here). This script
lowers each ``@triton.jit`` kernel all the way to a cubin for ``GPUTarget("cuda", 90, 32)``
with ``triton.compiler.ASTSource`` + ``triton.compile`` (no driver, no device needed: ptxas
ships inside the Triton wheel), for representative constexpr configurations: the
interpreter config, several of each kernel's autotune configs (after its own pruning rule for
a realistic problem), fp16 / bf16 / fp32 pointers and every mode flag.

Arguments are specialised the way a real launch specialises them (triton 3.6 and 3.9 agree):
pointers carry ``tt.divisibility=16``, an int equal to 1 (a unit stride) becomes the
constexpr 1, an int divisible by 16 carries ``tt.divisibility=16``, floats are fp32.

Prints one row per compile: kernel, config, OK or the first line of the error, registers per
thread, shared memory (bytes, Triton's dynamic allocation), spill stores and stack frame bytes
(from ptxas' verbose log; ``cuobjdump --dump-resource-usage`` when the log is missing). A cubin
that needs more shared memory than an H100 block may have is marked ``SMEM!``: it compiles but
cannot launch (the autotuner skips it; counted in the summary, not a failure). Exits 1 when
any compile fails or a ``*_kernel`` of a kernel module has no case here.

Last run (2026-11-24, CPU-only machine, default cases): triton 3.6.0 and 3.9.0 each compile
482/482, none over the shared memory limit. Register and shared memory figures differ between
the versions: attention under 3.6 takes up to two more K/V stage buffers of shared memory
(the pruning rule now allows for it) and reaches 255 registers with spills in 37 of its 46
cases (5 of 46 under 3.9). Run the script under the Triton you deploy with.
Attention alone after head dims 257..512 (44 split-D cases added): 90/90 under each version,
none over the limit; the split cases spill under neither (the spilling ones are the D <= 256
cases above, unchanged).

``--quick`` compiles the autotune configs that ``GENFUSE_AUTOTUNE=quick`` (the GPU check's
short lists, kernels/_common.py) can pick: each case problem's pruning rule run in quick mode,
every config it keeps, channels-last and NCHW for the convolutions; ``--tuned 100`` compiles
every config the full pruning keeps (the data the quick lists were read from).

``TRITON_INTERPRET`` must be unset (or 0): with it the kernels are interpreter functions
and cannot be compiled.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

# Before triton is imported: compiled (not interpreted) kernels, and ptxas' -v log printed.
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_check: unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled)")
os.environ.setdefault("TRITON_DUMP_PTXAS_LOG", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 = its default

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

FAMILIES = ("attention", "decode_attention", "linear", "norm", "rotary", "swiglu", "group_norm",
            "conv2d", "conv_transpose2d")
TARGET = GPUTarget("cuda", 90, 32)
# An H100's opt-in shared memory per block (227 KiB): a cubin allocating more compiles but
# cannot launch (OutOfResources; the autotuner skips such a config, a plain launch fails).
SMEM_LIMIT = 232448
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
EVERY = 10**6  # n_tuned that asks for every kept config (also NCHW convs, otherwise one each)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernel_module(family: str):
    """The module ``genfuse.kernels._<family>`` when installed (``python -m genfuse.bench...``),
    else the checkout's ``kernels._<family>`` with the repository root on ``sys.path``."""
    if __package__ and __package__.startswith("genfuse"):
        return importlib.import_module(f"genfuse.kernels._{family}")
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    # `python bench/compile_check.py` puts bench/ first on sys.path, where bench/kernels.py
    # (the benchmark) would shadow the kernels package: the root goes first, bench/ out.
    sys.path[:] = [root] + [d for d in sys.path if os.path.abspath(d or ".") not in (root, here)]
    return importlib.import_module(f"kernels._{family}")


# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------
class Ptr(str):
    """A pointer argument: its Triton type string, e.g. ``Ptr("fp16")`` -> ``*fp16``."""

    def __new__(cls, dtype: Any):
        name = DTYPES.get(dtype, dtype)
        return super().__new__(cls, f"*{name}")


@dataclass
class Case:
    family: str
    kernel: str                       # attribute name of the JITFunction in the module
    config: str                       # label for the table
    args: Dict[str, Any]              # runtime args: Ptr, int, float, bool
    constexprs: Dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    extra: Dict[str, Any] = field(default_factory=dict)
    tuned: bool = False               # an autotune config (not the interpreter's or a fixed launch)


def _cfg_label(meta: Dict[str, Any], warps: int, stages: int) -> str:
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K", "BLOCK_C": "C", "BLOCK_S": "S",
             "BLOCK_D": "D", "BLOCK_G": "G", "BLOCK_H": "H", "GROUP_M": "g", "BLOCK_HALF": "half",
             "BLOCK_TAIL": "tail"}
    tiles = " ".join(f"{short.get(k, k)}{v}" for k, v in meta.items())
    return f"{tiles} w{warps} s{stages}"


def _spread(configs: list, k: int) -> list:
    """Up to ``k`` configs spread over the list (first, last and evenly between)."""
    if len(configs) <= k:
        return list(configs)
    if k == 1:
        return [configs[len(configs) // 2]]
    idx = sorted({round(i * (len(configs) - 1) / (k - 1)) for i in range(k)})
    return [configs[i] for i in idx]


def _contig(shape) -> List[int]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return strides[::-1]


def _empty(dtype) -> torch.Tensor:
    return torch.empty(0, dtype=dtype)


def attention_cases(mod, n_tuned: int) -> List[Case]:
    cases = []
    B, Hq, Hkv, T, S = 2, 32, 8, 1024, 1024

    def case(dt, d, causal, lse, meta, warps, stages, tag):
        block_d = max(16, triton.next_power_of_2(d))
        const_dv = {} if "BLOCK_DV" in meta else {"BLOCK_DV": block_d}  # D <= 256: one chunk
        qs = _contig((B, Hq, T, d))
        ks = _contig((B, Hkv, S, d))
        args = dict(q_ptr=Ptr(dt), k_ptr=Ptr(dt), v_ptr=Ptr(dt), o_ptr=Ptr(dt),
                    lse_ptr=Ptr(torch.float32 if lse else dt),
                    Hq=Hq, T=T, S=S, GROUP=Hq // Hkv, qk_scale=0.127,
                    stride_qb=qs[0], stride_qh=qs[1], stride_qt=qs[2], stride_qd=qs[3],
                    stride_kb=ks[0], stride_kh=ks[1], stride_kn=ks[2], stride_kd=ks[3],
                    stride_vb=ks[0], stride_vh=ks[1], stride_vn=ks[2], stride_vd=ks[3],
                    stride_ob=qs[0], stride_oh=qs[1], stride_ot=qs[2],
                    T_BUCKET=mod._bucket(T), S_BUCKET=mod._bucket(S))
        const = dict(IS_CAUSAL=causal, RETURN_LSE=lse, HEAD_DIM=d, EVEN_D=d == block_d,
                     BLOCK_D=block_d, **const_dv, **meta)
        label = f"{DTYPES[dt]} D{d} causal={int(causal)} lse={int(lse)} {tag} {_cfg_label(meta, warps, stages)}"
        return Case("attention", "_attn_fwd_kernel", label, args, const, warps, stages, tuned=tag == "tuned")

    interp = dict(mod._INTERPRET_CONFIG)
    iw = interp.pop("num_warps", 4)
    for dt in FLOAT_DTYPES:                       # every mode, interpreter config
        for causal in (False, True):
            for lse in (False, True):
                cases.append(case(dt, 128, causal, lse, interp, iw, 3, "interp"))
    for dt in FLOAT_DTYPES:                       # autotune configs that survive pruning
        for d in (64, 128, 80, 256):
            block_d = max(16, triton.next_power_of_2(d))
            kept = mod._prune_configs(mod._configs(), {"q_ptr": _empty(dt), "T": T}, BLOCK_D=block_d)
            for c in _spread(kept, n_tuned):
                cases.append(case(dt, d, True, False, dict(c.kwargs), c.num_warps, c.num_stages, "tuned"))
    # D > 256 splits the output columns over programs (BLOCK_DV): every mode at the
    # interpreter's chunking, then the split configs the pruning keeps: all of them for the
    # VAE's D=512 in fp16 and fp32 (bf16 compiles like fp16), a spread for a padded D=320.
    split_interp = dict(mod._INTERPRET_SPLIT_CONFIG)
    sw = split_interp.pop("num_warps", 4)
    for dt in FLOAT_DTYPES:  # 2 stages: at 3, fp32 32x32 tiles of D=300 ask 233984 bytes (SMEM!)
        for causal, lse in ((False, False), (True, True)):
            cases.append(case(dt, 300, causal, lse, split_interp, sw, 2, "interp"))
    for dt in FLOAT_DTYPES:
        kept = mod._prune_configs(mod._split_configs(), {"q_ptr": _empty(dt), "T": T}, BLOCK_D=512)
        for d, causal in ((512, False), (320, True)):
            every = d == 512 and dt != torch.bfloat16
            for c in (kept if every else _spread(kept, n_tuned)):
                cases.append(case(dt, d, causal, False, dict(c.kwargs), c.num_warps, c.num_stages, "tuned"))
    return cases


def decode_attention_cases(mod, n_tuned: int) -> List[Case]:
    cases = []
    B, Hq, Hkv, blocks, page, max_blocks = 8, 32, 8, 4096, 16, 256

    def split_case(dt, d, tq, split, page_size, meta, warps, stages, tag):
        rows = (Hq // Hkv) * tq
        block_g = min(max(16, triton.next_power_of_2(rows)), mod._MAX_ROWS)
        block_d = max(16, triton.next_power_of_2(d))
        qs = _contig((B, Hq, tq, d))
        ks = _contig((blocks, page_size, Hkv, d))
        part = torch.float32 if split else dt
        args = dict(Q=Ptr(dt), K=Ptr(dt), V=Ptr(dt), BlockTable=Ptr("i32"), SeqLens=Ptr("i32"),
                    Out=Ptr(dt), PartOut=Ptr(part), PartLse=Ptr(part), qk_scale=0.127,
                    num_splits=8 if split else 1, n_row_tiles=-(-rows // block_g), Hq=Hq, Tq=tq,
                    G=Hq // Hkv,
                    stride_qb=qs[0], stride_qh=qs[1], stride_qt=qs[2], stride_qd=qs[3],
                    stride_kblk=ks[0], stride_kslot=ks[1], stride_kh=ks[2], stride_kd=ks[3],
                    stride_vblk=ks[0], stride_vslot=ks[1], stride_vh=ks[2], stride_vd=ks[3],
                    stride_btb=max_blocks, stride_btn=1, stride_sl=1,
                    stride_ob=qs[0], stride_oh=qs[1], stride_ot=qs[2], stride_od=qs[3])
        const = dict(ROWS=rows, HEAD_DIM=d, PAGE_SIZE=page_size, SPLIT=split, BLOCK_G=block_g,
                     BLOCK_D=block_d, **meta)
        label = (f"{DTYPES[dt]} D{d} Tq{tq} page{page_size} split={int(split)} {tag} "
                 f"{_cfg_label(meta, warps, stages)}")
        return Case("decode_attention", "_paged_attention_split_kernel", label, args, const, warps, stages,
                    tuned=tag == "tuned")

    interp = dict(mod._INTERPRET_CONFIG)
    iw = interp.pop("num_warps", 4)
    for dt in FLOAT_DTYPES:
        for split in (False, True):
            cases.append(split_case(dt, 128, 1, split, page, interp, iw, 3, "interp"))
        cases.append(split_case(dt, 80, 4, True, 24, interp, iw, 3, "interp"))  # odd dim and page
    for dt in FLOAT_DTYPES:
        for d in (64, 128, 256):
            block_d = max(16, triton.next_power_of_2(d))
            kept = mod._prune(mod._configs(), {"Q": _empty(dt)}, BLOCK_D=block_d)
            for c in _spread(kept, n_tuned):
                cases.append(split_case(dt, d, 1, True, page, dict(c.kwargs), c.num_warps, c.num_stages,
                                        "tuned"))
    # the merge kernel: fp32 partials into the output dtype, the launcher's warp rule
    for dt in FLOAT_DTYPES:
        for d, splits in ((128, 8), (80, 3), (256, 256)):
            block_s = triton.next_power_of_2(splits)
            block_d = max(16, triton.next_power_of_2(d))
            warps = 4 if block_s * block_d >= 8192 else 2
            os_ = _contig((B, Hq, 1, d))
            args = dict(PartOut=Ptr(torch.float32), PartLse=Ptr(torch.float32), Out=Ptr(dt),
                        num_splits=splits, Hq=Hq, Tq=1, stride_ob=os_[0], stride_oh=os_[1],
                        stride_ot=os_[2], stride_od=os_[3])
            const = dict(HEAD_DIM=d, BLOCK_S=block_s, BLOCK_D=block_d)
            cases.append(Case("decode_attention", "_paged_attention_merge_kernel",
                              f"{DTYPES[dt]} D{d} splits={splits} w{warps}", args, const, warps, 3))
    return cases


def linear_cases(mod, n_tuned: int) -> List[Case]:
    cases = []
    N, K = 4096, 4096

    def case(kernel, dt, m, bias, res, act, meta, warps, stages, tag):
        args = dict(x_ptr=Ptr(dt), w_ptr=Ptr(dt), b_ptr=Ptr(dt), r_ptr=Ptr(dt), out_ptr=Ptr(dt),
                    M=m, N=N, K=K)
        if kernel == "_linear_gemm_kernel":
            args["M_BUCKET"] = min(triton.next_power_of_2(m), mod._M_BUCKET_CAP)
        args.update(stride_xm=K, stride_xk=1, stride_wn=K, stride_wk=1, stride_b=1 if bias else 0,
                    stride_rm=N if res else 0, stride_rn=1 if res else 0, stride_om=N, stride_on=1)
        const = dict(HAS_BIAS=bias, HAS_RESIDUAL=res, ACTIVATION=act, **meta)
        label = (f"{DTYPES[dt]} M{m} bias={int(bias)} res={int(res)} act={act} {tag} "
                 f"{_cfg_label(meta, warps, stages)}")
        return Case("linear", kernel, label, args, const, warps, stages, tuned=tag == "tuned")

    for kernel, m, interp in (("_linear_gemm_kernel", 4096, mod._INTERP_GEMM),
                              ("_linear_small_m_kernel", 8, mod._INTERP_SMALL_M)):
        for dt in FLOAT_DTYPES:                   # flags, interpreter tile
            for bias, res in ((False, False), (True, True)):
                cases.append(case(kernel, dt, m, bias, res, 0, dict(interp), 4, 3, "interp"))
        for act in range(1, len(mod.ACTIVATIONS)):  # every activation (fp16, bf16)
            for dt in (torch.float16, torch.bfloat16):
                cases.append(case(kernel, dt, m, True, True, act, dict(interp), 4, 3, "interp"))
        for dt in FLOAT_DTYPES:                   # autotune configs that survive pruning
            if kernel == "_linear_gemm_kernel":
                kept = mod._prune_gemm(mod._gemm_configs(), {"x_ptr": _empty(dt), "M_BUCKET": 4096, "N": N})
            else:
                kept = mod._prune_small_m(mod._small_m_configs(), {"x_ptr": _empty(dt), "N": N, "K": K})
            for c in _spread(kept, n_tuned):
                cases.append(case(kernel, dt, m, True, False, 4, dict(c.kwargs), c.num_warps, c.num_stages,
                                  "tuned"))
    return cases


def norm_cases(mod, n_tuned: int) -> List[Case]:
    cases = []
    for dt in FLOAT_DTYPES:
        for n in (576, 4096, 65536):
            m = 8192
            block_m, block_n, warps = mod._launch_settings(n, m)
            modes = [(True, False, True, False), (True, True, True, False),   # RMS, +residual
                     (False, False, True, True), (False, True, False, False)]  # LN, LN no affine
            for is_rms, res, w, b in modes:
                args = dict(x_ptr=Ptr(dt), res_ptr=Ptr(dt), w_ptr=Ptr(dt), b_ptr=Ptr(dt), y_ptr=Ptr(dt),
                            h_ptr=Ptr(dt), M=m, N=n, eps=1e-6,
                            stride_xm=n, stride_xn=1, stride_rm=n, stride_rn=1,
                            stride_w=1 if w else 0, stride_b=1 if b else 0, stride_ym=n,
                            stride_hm=n if res else 0)
                meta = dict(BLOCK_M=block_m, BLOCK_N=block_n)
                const = dict(IS_RMS=is_rms, HAS_RESIDUAL=res, HAS_WEIGHT=w, HAS_BIAS=b, **meta)
                label = (f"{DTYPES[dt]} N{n} {'rms' if is_rms else 'ln'} res={int(res)} w={int(w)} "
                         f"b={int(b)} {_cfg_label(meta, warps, 3)}")
                cases.append(Case("norm", "_norm_fwd_kernel", label, args, const, warps, 3))
    return cases


def rotary_cases(mod, n_tuned: int) -> List[Case]:
    cases = []
    B, T = 2, 512
    for dt in FLOAT_DTYPES:
        for hq, hkv, half, d, pos_dt in ((32, 8, 64, 128, "i64"), (32, 32, 16, 64, "i32"),
                                         (16, 16, 32, 80, "i64")):  # full, partial (tail), odd
            block_h, block_half, block_tail, warps = mod._launch_settings(hq, hkv, half, d)
            qs, ks = _contig((B, hq, T, d)), _contig((B, hkv, T, d))
            args = dict(q_ptr=Ptr(dt), k_ptr=Ptr(dt), qo_ptr=Ptr(dt), ko_ptr=Ptr(dt),
                        cos_ptr=Ptr(torch.float32), sin_ptr=Ptr(torch.float32), pos_ptr=Ptr(pos_dt),
                        T=T, HQ=hq, HKV=hkv, HALF=half, D=d,
                        stride_qb=qs[0], stride_qh=qs[1], stride_qt=qs[2], stride_qd=qs[3],
                        stride_kb=ks[0], stride_kh=ks[1], stride_kt=ks[2], stride_kd=ks[3],
                        stride_qob=qs[0], stride_qoh=qs[1], stride_qot=qs[2],
                        stride_kob=ks[0], stride_koh=ks[1], stride_kot=ks[2],
                        stride_cp=half, stride_cc=1, stride_sp=half, stride_sc=1,
                        stride_pb=0 if pos_dt == "i64" else T, stride_pt=1)
            meta = dict(BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_TAIL=block_tail)
            const = dict(HAS_TAIL=2 * half < d, **meta)
            label = f"{DTYPES[dt]} Hq{hq} Hkv{hkv} D{d} r{2 * half} pos={pos_dt} {_cfg_label(meta, warps, 3)}"
            cases.append(Case("rotary", "_rotary_kernel", label, args, const, warps, 3))
    return cases


def swiglu_cases(mod, n_tuned: int) -> List[Case]:
    cases = []
    for dt in FLOAT_DTYPES:
        for m, n, strided in ((8192, 14336, False), (7, 40, False), (4096, 11008, True)):
            block_m, block_n, warps = mod._launch_settings(m, n)
            args = dict(x_ptr=Ptr(dt), y_ptr=Ptr(dt), M=m, N=n,
                        stride_xm=2 * n + (64 if strided else 0), stride_xn=2 if strided else 1,
                        stride_ym=n)
            meta = dict(BLOCK_M=block_m, BLOCK_N=block_n)
            label = f"{DTYPES[dt]} M{m} N{n} strided={int(strided)} {_cfg_label(meta, warps, 3)}"
            cases.append(Case("swiglu", "_swiglu_kernel", label, args, meta, warps, 3))
    return cases


def group_norm_cases(mod, n_tuned: int) -> List[Case]:
    cases = []
    mod._SM_COUNT.setdefault(0, 132)  # _launch_settings' SM count for a "cuda" device: an H100's
    cuda0 = torch.device("cuda", 0)
    # (N, C, G, H, W, channels_last, spatial_2d): SD VAE 512ch @ 64x64, 128ch @ 512x512
    # channels-last, a cropped view (2-D spatial), an (N, C) input
    shapes = ((1, 512, 32, 64, 64, False, False), (1, 128, 32, 512, 512, True, False),
              (2, 64, 8, 30, 30, False, True), (4, 256, 32, 1, 1, False, False))
    for dt in FLOAT_DTYPES:
        for n, c, g, h, w, cl, sp2 in shapes:
            cpg, s = c // g, h * w
            block_c, s_per_prog, split = mod._launch_settings(n * g, cpg, s, cuda0)
            if cl:
                xs = (h * w * c, 1, w * c, c)
                sh, sw = 0, c
            elif sp2:
                xs = (c * 32 * 32, 32 * 32, 32, 1)   # a 30x30 crop of a 32x32 map
                sh, sw = 32, 1
            else:
                xs = (c * s, s, w, 1)
                sh, sw = 0, 1
            ys = (c * s, s, w, 1) if not cl else (h * w * c, 1, w * c, c)
            ysh, ysw = (w, 1) if sp2 else (0, ys[3])
            sizes = dict(G=g, CPG=cpg, S=s, W=w if sp2 else s, S_PER_PROG=s_per_prog, SPLIT=split)
            kept = mod._prune(mod._configs(), {"BLOCK_C": block_c, "S_PER_PROG": s_per_prog})
            for cfg in _spread(kept, n_tuned):
                meta = dict(BLOCK_C=block_c, **cfg.kwargs)
                shape = f"{DTYPES[dt]} {n}x{c}x{h}x{w} G{g}{' cl' if cl else ''}{' crop' if sp2 else ''}"
                args = dict(x_ptr=Ptr(dt), ws_ptr=Ptr(torch.float32), **sizes,
                            stride_xn=xs[0], stride_xc=xs[1], stride_xh=sh, stride_xw=sw)
                cases.append(Case("group_norm", "_gn_stats_kernel",
                                  f"{shape} {_cfg_label(meta, cfg.num_warps, cfg.num_stages)}", args,
                                  dict(SPATIAL_2D=sp2, **meta), cfg.num_warps, cfg.num_stages, tuned=True))
                for wb, act in ((True, None), (True, "silu"), (False, "silu")):
                    args = dict(x_ptr=Ptr(dt), y_ptr=Ptr(dt), w_ptr=Ptr(dt), b_ptr=Ptr(dt),
                                ws_ptr=Ptr(torch.float32), **sizes, eps=1e-6,
                                stride_xn=xs[0], stride_xc=xs[1], stride_xh=sh, stride_xw=sw,
                                stride_yn=ys[0], stride_yc=ys[1], stride_yh=ysh, stride_yw=ysw,
                                stride_w=1 if wb else 0, stride_b=1 if wb else 0)
                    const = dict(SPATIAL_2D=sp2, HAS_WEIGHT=wb, HAS_BIAS=wb, ACTIVATION=act,
                                 SPLIT_BLOCK=triton.next_power_of_2(split), **meta)
                    label = f"{shape} affine={int(wb)} act={act} {_cfg_label(meta, cfg.num_warps, cfg.num_stages)}"
                    cases.append(Case("group_norm", "_gn_apply_kernel", label, args, const, cfg.num_warps,
                                      cfg.num_stages, tuned=True))
    return cases


def _conv_layout(shape, channels_last: bool):
    n, c, h, w = shape
    return (h * w * c, 1, w * c, c) if channels_last else tuple(_contig(shape))


def conv2d_cases(mod, n_tuned: int) -> List[Case]:
    cases = []
    # (N, C, H, W, K, R, stride, pad, upsample): VAE 3x3 conv, its upsample conv, 1x1, RGB out
    problems = ((1, 512, 64, 64, 512, 3, 1, 1, 1), (1, 256, 128, 128, 256, 3, 1, 1, 2),
                (1, 512, 64, 64, 256, 1, 1, 0, 1), (1, 128, 512, 512, 3, 3, 1, 1, 1),
                (8, 64, 32, 32, 128, 4, 2, 1, 1))

    def case(dt, prob, cl, bias, act, res, meta, warps, stages, tag):
        n, c, h, w, k, r, st, pad, up = prob
        ho = (h * up + 2 * pad - r) // st + 1
        wo = (w * up + 2 * pad - r) // st + 1
        xs = _conv_layout((n, c, h, w), cl)
        ws = _conv_layout((k, c, r, r), cl)
        os_ = _conv_layout((n, k, ho, wo), cl)
        rs = os_ if res else (0, 0, 0, 0)
        args = dict(x_ptr=Ptr(dt), w_ptr=Ptr(dt), b_ptr=Ptr(dt), res_ptr=Ptr(dt), out_ptr=Ptr(dt),
                    N=n, C=c, H=h, W=w, K=k, Ho=ho, Wo=wo, R=r, S=r, stride_h=st, stride_w=st,
                    pad_h=pad, pad_w=pad, negative_slope=0.2,
                    sxn=xs[0], sxc=xs[1], sxh=xs[2], sxw=xs[3], swk=ws[0], swc=ws[1], swr=ws[2], sws=ws[3],
                    sb=1 if bias else 0, srn=rs[0], srk=rs[1], srh=rs[2], srw=rs[3],
                    son=os_[0], sok=os_[1], soh=os_[2], sow=os_[3])
        const = dict(UPSAMPLE=up, HAS_BIAS=bias, ACTIVATION=act, HAS_RESIDUAL=res, **meta)
        label = (f"{DTYPES[dt]} {n}x{c}x{h}x{w}->{k} k{r}s{st}u{up} {'cl' if cl else 'nchw'} "
                 f"bias={int(bias)} act={act or '-'} res={int(res)} {tag} {_cfg_label(meta, warps, stages)}")
        return Case("conv2d", "_conv2d_kernel", label, args, const, warps, stages, tuned=tag == "tuned")

    interp = dict(mod._INTERPRET_CONFIG)
    for dt in FLOAT_DTYPES:                       # every flag, interpreter tile
        for act in mod.ACTIVATIONS:
            cases.append(case(dt, problems[0], True, True, act or "", act == "silu", interp, 4, 3, "interp"))
        cases.append(case(dt, problems[1], False, False, "", False, interp, 4, 3, "interp"))
    for dt in FLOAT_DTYPES:                       # autotune configs per problem, both layouts
        for prob in problems:
            n, c, h, w, k, r, st, pad, up = prob
            ho = (h * up + 2 * pad - r) // st + 1
            kept = mod._prune(mod._configs(), {"N": n, "Ho": ho, "Wo": ho, "K": k, "C": c, "x_ptr": _empty(dt)})
            for cl in (True, False):
                for cfg in _spread(kept, n_tuned if cl or n_tuned == EVERY else 1):
                    cases.append(case(dt, prob, cl, True, "silu", False, dict(cfg.kwargs), cfg.num_warps,
                                      cfg.num_stages, "tuned"))
    return cases


def conv_transpose2d_cases(mod, n_tuned: int) -> List[Case]:
    cases = []
    # DCGAN generator: (N, C_in, H, W, C_out, R, stride, pad)
    problems = ((64, 100, 1, 1, 512, 4, 1, 0), (64, 512, 4, 4, 256, 4, 2, 1),
                (64, 128, 16, 16, 64, 4, 2, 1), (64, 64, 32, 32, 3, 4, 2, 1), (2, 32, 9, 7, 16, 3, 3, 2))

    def case(dt, prob, cl, bias, act, meta, warps, stages, tag):
        n, ci, h, w, co, r, st, pad = prob
        ho = (h - 1) * st - 2 * pad + r
        wo_ = (w - 1) * st - 2 * pad + r
        hq, wq = -(-ho // st), -(-wo_ // st)
        xs = _conv_layout((n, ci, h, w), cl)
        ws = (co * r * r, 1, r * co, co) if cl else tuple(_contig((ci, co, r, r)))
        os_ = _conv_layout((n, co, ho, wo_), cl)
        args = dict(x_ptr=Ptr(dt), w_ptr=Ptr(dt), b_ptr=Ptr(dt), out_ptr=Ptr(dt),
                    N=n, CI=ci, H=h, W=w, CO=co, Ho=ho, Wo=wo_, R=r, S=r, pad_h=pad, pad_w=pad,
                    negative_slope=0.2, sxn=xs[0], sxc=xs[1], sxh=xs[2], sxw=xs[3],
                    swi=ws[0], swo=ws[1], swr=ws[2], sws=ws[3], sb=1 if bias else 0,
                    son=os_[0], soc=os_[1], soh=os_[2], sow=os_[3])
        const = dict(STRIDE_H=st, STRIDE_W=st,
                     BATCH_INNER=n > 1 and hq * wq < mod._BATCH_INNER_MAX_PIXELS,
                     HAS_BIAS=bias, ACTIVATION=act, **meta)
        label = (f"{DTYPES[dt]} {n}x{ci}x{h}x{w}->{co} k{r}s{st}p{pad} {'cl' if cl else 'nchw'} "
                 f"bias={int(bias)} act={act or '-'} {tag} {_cfg_label(meta, warps, stages)}")
        return Case("conv_transpose2d", "_conv_transpose2d_kernel", label, args, const, warps, stages,
                    tuned=tag == "tuned")

    interp = dict(mod._INTERPRET_CONFIG)
    acts = importlib.import_module(mod.__name__.rsplit(".", 1)[0] + ".conv2d").ACTIVATIONS
    for dt in FLOAT_DTYPES:
        for act in acts:
            cases.append(case(dt, problems[1], True, act is None, act or "", interp, 4, 3, "interp"))
        cases.append(case(dt, problems[0], False, False, "relu", interp, 4, 3, "interp"))
    for dt in FLOAT_DTYPES:
        for prob in problems:
            n, ci, h, w, co, r, st, pad = prob
            ho = (h - 1) * st - 2 * pad + r
            kept = mod._prune(mod._configs(), {"N": n, "Ho": ho, "Wo": ho, "CO": co, "CI": ci,
                                               "x_ptr": _empty(dt)}, STRIDE_H=st, STRIDE_W=st)
            for cl in (True, False):
                for cfg in _spread(kept, n_tuned if cl or n_tuned == EVERY else 1):
                    cases.append(case(dt, prob, cl, False, "relu", dict(cfg.kwargs), cfg.num_warps,
                                      cfg.num_stages, "tuned"))
    return cases


CASES: Dict[str, Callable] = {
    "attention": attention_cases, "decode_attention": decode_attention_cases, "linear": linear_cases,
    "norm": norm_cases, "rotary": rotary_cases, "swiglu": swiglu_cases, "group_norm": group_norm_cases,
    "conv2d": conv2d_cases, "conv_transpose2d": conv_transpose2d_cases,
}


# --------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------
def build_source(fn, args: Dict[str, Any], constexprs: Dict[str, Any]) -> ASTSource:
    """``ASTSource`` for ``fn`` with every argument specialised as a launch would (see the
    module docstring). The signature maps *every* argument name to its type string, constexprs
    included (``"constexpr"``); ``constexprs`` and ``attrs`` are keyed as triton 3.6/3.9 expect."""
    names = list(fn.arg_names)
    unknown = (set(args) | set(constexprs)) - set(names)
    if unknown:
        raise TypeError(f"{fn.__name__} has no argument(s) {sorted(unknown)}")
    signature: Dict[str, str] = {}
    consts: Dict[str, Any] = {}
    attrs: Dict[Tuple[int], list] = {}
    div16 = [["tt.divisibility", 16]]
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name], consts[name] = "constexpr", constexprs[name]
            continue
        if name not in args:
            raise TypeError(f"{fn.__name__}: no value for argument {name!r}")
        v = args[name]
        if isinstance(v, Ptr):
            signature[name] = str(v)
            attrs[(i,)] = div16
        elif isinstance(v, bool):
            signature[name] = "u1"
        elif isinstance(v, int):
            if v == 1:                        # launches turn an int 1 into the constexpr 1
                signature[name], consts[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = div16
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name!r} = {v!r} is not a Ptr, int, float or bool")
    return ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)


_PTXAS = {"regs": re.compile(r"Used (\d+) registers"), "spill": re.compile(r"(\d+) bytes spill stores"),
          "stack": re.compile(r"(\d+) bytes stack frame")}


def _cuobjdump_usage(cubin: bytes) -> Dict[str, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = {}
    for key, pat in (("regs", r"REG:(\d+)"), ("stack", r"STACK:(\d+)")):
        m = re.search(pat, out)
        if m:
            found[key] = int(m.group(1))
    return found


def compile_case(case: Case, fn) -> Dict[str, Any]:
    row: Dict[str, Any] = {"family": case.family, "kernel": case.kernel, "config": case.config}
    t0 = time.time()
    log = io.StringIO()
    try:
        src = build_source(fn, case.args, case.constexprs)
        with contextlib.redirect_stdout(log):
            ck = triton.compile(src, target=TARGET,
                                options={"num_warps": case.num_warps, "num_stages": case.num_stages})
    except Exception as e:  # noqa: BLE001 - every failure is a row of the table
        text = f"{type(e).__name__}: {e}".strip()
        lines = [ln for ln in text.splitlines() if ln.strip()]
        # CompilationError puts the location first and the reason last: keep both ends short
        row.update(ok=False, error=lines[0][:200] + (f" ... {lines[-1][:200]}" if len(lines) > 1 else ""),
                   full_error=text, seconds=time.time() - t0)
        return row
    usage = {}
    for key, pat in _PTXAS.items():
        m = pat.search(log.getvalue())
        if m:
            usage[key] = int(m.group(1))
    if "regs" not in usage:  # cached compile: ptxas did not run, read the cubin instead
        usage.update(_cuobjdump_usage(ck.asm.get("cubin", b"")))
    row.update(ok=True, shared=int(getattr(ck.metadata, "shared", 0) or 0), seconds=time.time() - t0,
               **usage)
    return row


# Built once in the parent; forked workers inherit it and receive indices only.
_ALL: List[Tuple[Case, Any]] = []


def _work(i: int) -> Dict[str, Any]:
    case, fn = _ALL[i]
    return compile_case(case, fn)


@contextlib.contextmanager
def _autotune_mode(mod, mode: Optional[str]):
    """The kernels' autotune mode (``_common.AUTOTUNE``) while their pruning rules pick cases."""
    common = mod._common
    previous = common.AUTOTUNE
    common.AUTOTUNE = mode or previous
    try:
        yield
    finally:
        common.AUTOTUNE = previous


def collect(families, n_tuned: int, quick: bool = False) -> Tuple[List[Tuple[Case, Any]], List[str]]:
    """Every family's cases; with ``quick``, only the autotune configs GENFUSE_AUTOTUNE=quick
    can pick (each pruning rule in quick mode, all of what it keeps, for every case problem)."""
    cases, problems = [], []
    for fam in families:
        mod = _kernel_module(fam)
        with _autotune_mode(mod, "quick" if quick else None):
            fam_cases = CASES[fam](mod, EVERY if quick else n_tuned)
        if quick:
            fam_cases = [c for c in fam_cases if c.tuned]
        covered = {c.kernel for c in fam_cases}
        jitted = {name for name, obj in vars(mod).items()
                  if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel")}
        for name in sorted(jitted - covered) if not quick else ():
            problems.append(f"{fam}.{name}: a @triton.jit kernel with no compile case")
        for c in fam_cases:
            fn = getattr(mod, c.kernel)
            if not isinstance(fn, triton.runtime.jit.JITFunction):
                problems.append(f"{fam}.{c.kernel} is a {type(fn).__name__}, not a JITFunction")
                continue
            cases.append((c, fn))
    return cases, problems


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(FAMILIES), help="comma-separated kernel families")
    p.add_argument("--tuned", type=int, default=3, help="autotune configs per problem (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="compile only the autotune configs GENFUSE_AUTOTUNE=quick can pick, every one "
                        "the pruning keeps for each problem (families without autotuning have none)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.add_argument("--list", action="store_true", help="list the cases, compile nothing")
    p.add_argument("--cache-dir", help="Triton cache to use (default: a fresh temporary one, so "
                                       "every case really compiles)")
    p.add_argument("--verbose", action="store_true", help="print the full error of every failure")
    a = p.parse_args(argv)
    families = [f.strip() for f in a.only.split(",") if f.strip()]
    bad = [f for f in families if f not in CASES]
    if bad:
        p.error(f"unknown families {bad}; choose from {', '.join(FAMILIES)}")

    cases, problems = collect(families, a.tuned, a.quick)
    _ALL[:] = cases
    print(f"triton {triton.__version__}, torch {torch.__version__}, target {TARGET}, {len(cases)} compiles")
    if a.list:
        for c, _ in cases:
            print(f"{c.family:17s} {c.kernel:32s} {c.config}")
        return 0

    tmp = None
    if a.cache_dir:
        os.environ["TRITON_CACHE_DIR"] = a.cache_dir
    else:
        tmp = tempfile.TemporaryDirectory(prefix="genfuse-compile-check-")
        os.environ["TRITON_CACHE_DIR"] = tmp.name
    def num(row, key):
        return str(row[key]) if key in row else "?"

    def show(row):
        if row["ok"]:
            ok = "OK" if row["shared"] <= SMEM_LIMIT else "SMEM!"
            print(f"{row['kernel']:32s} {ok:6s} {num(row, 'regs'):>4s} {row['shared']:>7d} "
                  f"{num(row, 'spill'):>5s} {num(row, 'stack'):>5s}  {row['config']}", flush=True)
        else:
            print(f"{row['kernel']:32s} {'FAIL':6s} {'':>4s} {'':>7s} {'':>5s} {'':>5s}  {row['config']}")
            print(f"{'':39s}-> {row['error']}", flush=True)

    print(f"{'kernel':32s} {'result':6s} {'regs':>4s} {'smem':>7s} {'spill':>5s} {'stack':>5s}  config")
    rows = []
    try:
        t0 = time.time()
        if a.jobs > 1:
            import multiprocessing as mp
            with ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("fork")) as ex:
                for row in ex.map(_work, range(len(cases))):  # in order, as they complete
                    rows.append(row)
                    show(row)
        else:
            for i in range(len(cases)):
                rows.append(_work(i))
                show(rows[-1])
        elapsed = time.time() - t0
    finally:
        if tmp is not None:
            tmp.cleanup()
    failed = [r for r in rows if not r["ok"]]
    spilled = [r for r in rows if r["ok"] and r.get("spill", 0) > 0]
    over = [r for r in rows if r["ok"] and r["shared"] > SMEM_LIMIT]
    print(f"\nsummary (triton {triton.__version__}, sm_90): {len(rows) - len(failed)}/{len(rows)} compiled, "
          f"{len(failed)} failed, {len(spilled)} spill registers, {len(over)} need more than the "
          f"{SMEM_LIMIT} bytes of shared memory a block may have (SMEM!); {elapsed:.0f} s")
    by_kernel: Dict[str, List[int]] = {}
    for r in rows:
        counts = by_kernel.setdefault(f"{r['family']}.{r['kernel']}", [0, 0, 0, 0])
        counts[0 if r["ok"] else 1] += 1
        counts[2] += int(r["ok"] and r.get("spill", 0) > 0)
        counts[3] += int(r["ok"] and r["shared"] > SMEM_LIMIT)
    for k, (ok, bad_, sp, sm) in by_kernel.items():
        print(f"  {k:50s} {ok:3d} ok {bad_:3d} failed {sp:3d} spilling {sm:3d} over smem")
    if a.verbose:
        for r in failed:
            print(f"\n--- {r['kernel']} [{r['config']}]\n{r['full_error']}")
    for msg in problems:
        print(f"MISSING: {msg}")
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
