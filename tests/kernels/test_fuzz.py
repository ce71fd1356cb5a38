"""Seeded fuzz of the public kernel launchers (issue 10): random shapes, fp32/fp16, strided
views, and index, size and float arguments both in and out of range.

Every call must either return a result equal to the float64 reference or raise ValueError /
TypeError, on both paths (the kernels through Triton's interpreter, and ``backend="torch"``).
A case built to be valid must return; one built to be invalid (an index outside its tensor, a
NaN scale, a mismatched dim) must raise. A segfault or a hang in an interpreted kernel would
take pytest down with it, so the loop runs in a subprocess with a timeout.

Run by hand: ``python tests/kernels/test_fuzz.py [seed] [cases_per_op]``.
"""
from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import time

SEED = 10
CASES_PER_OP = 20  # x 10 ops x 2 backends: ~10-20 s through the interpreter on a busy 2-core box
TIMEOUT_S = 300    # only a hang gets near this


def test_fuzz_kernel_launchers():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run([sys.executable, __file__, str(SEED), str(CASES_PER_OP)], env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"fuzz loop hung (> {TIMEOUT_S} s); last output:\n{(e.stdout or '')[-3000:]}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"fuzz loop exited with {proc.returncode} (negative: a signal)\n{out[-6000:]}"
    summary = [line for line in proc.stdout.splitlines() if line.startswith("fuzz:")]
    assert summary, out[-3000:]
    # both outcomes must have been exercised on both paths, or the fuzz checks nothing
    counts = dict(item.split("=") for item in summary[-1].split()[1:])
    assert int(counts["matched"]) >= 100 and int(counts["refused"]) >= 60, summary[-1]


# --------------------------------------------------------------------------------------
# The loop (runs in the subprocess)
# --------------------------------------------------------------------------------------
TOL = {"float32": 1e-4, "float16": 5e-3}


class Case:
    """One call: ``run(backend)`` calls the op, ``ref()`` the float64 reference (valid cases)."""

    def __init__(self, name, run, ref=None, *, valid=True):
        self.name, self.run, self.ref, self.valid = name, run, ref, valid


def _fuzz_main(seed: int, per_op: int) -> int:
    import torch

    import genfuse.kernels as K
    from genfuse.kernels import _common

    assert _common.INTERPRET, "the fuzz runs the kernels through Triton's interpreter"
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64

    def pick(*options):
        return rng.choice(options)

    def tensor(shape, dtype, scale=1.0):
        """Random values in ``shape``, as one of several layouts: contiguous, a transposed
        allocation viewed back, a strided slice of a wider buffer, channels-last (4-D)."""
        layout = pick("contiguous", "transposed", "sliced", "channels_last")
        shape = tuple(shape)
        if layout == "transposed" and len(shape) >= 2:
            t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).transpose(-1, -2)
        elif layout == "sliced" and len(shape) >= 1:
            t = torch.randn(*shape[:-1], 2 * shape[-1] + 1, generator=gen)[..., 1::2]
        elif layout == "channels_last" and len(shape) == 4:
            t = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
        else:
            t = torch.randn(shape, generator=gen)
        return (t * scale).to(dtype)

    def d64(*ts):
        return [None if t is None else t.to(f64) for t in ts]

    bad_scales = (float("nan"), float("inf"), -1.0, 0.0, "0.1", True)

    # ---------------------------------------------------------------- generators, one per op
    def gen_attention(dtype):
        B, hkv, g = pick(1, 2), pick(1, 2), pick(1, 2, 3)
        T, S, D = pick(0, 1, 5, 17, 33), pick(1, 4, 23, 40), pick(8, 16, 24, 40, 64, 80)
        q, k, v = tensor((B, hkv * g, T, D), dtype), tensor((B, hkv, S, D), dtype), tensor((B, hkv, S, D), dtype)
        kw = dict(causal=pick(False, True), scale=pick(None, 0.3, 1), return_lse=pick(False, True))
        valid = True
        mutation = pick(None, None, "scale", "head_dim", "dtype")
        if mutation == "scale":
            kw["scale"], valid = pick(*bad_scales), False
        elif mutation == "head_dim":
            k, valid = k[..., : D // 2], False
        elif mutation == "dtype":
            q, valid = q.to(torch.int32), False

        def ref():
            return K.attention_reference(*d64(q, k, v), **kw)
        return Case(f"attention q{tuple(q.shape)} k{tuple(k.shape)} {kw} {mutation}",
                    lambda be: K.attention(q, k, v, backend=be, **kw), ref, valid=valid)

    def gen_paged_attention(dtype):
        B, hkv, g, tq, D = pick(1, 2, 3), pick(1, 2), pick(1, 3), pick(1, 1, 2, 3), pick(16, 32, 48, 80)
        bs, width = pick(4, 7, 8, 16), pick(1, 2, 3, 5)
        cap = width * bs
        lens = [rng.randint(tq, cap) for _ in range(B)]
        pool = max(1, sum(-(-n // bs) for n in lens) + pick(0, 2))
        k, v = tensor((pool, bs, hkv, D), dtype), tensor((pool, bs, hkv, D), dtype)
        q = tensor((B, hkv * g, tq, D), dtype)
        index = pick(torch.int32, torch.int64)
        perm = list(range(pool))
        rng.shuffle(perm)
        table = torch.empty(B, width, dtype=torch.int64)
        for b, n in enumerate(lens):
            used = -(-n // bs)
            table[b, :used] = torch.tensor([perm.pop() if perm else 0 for _ in range(used)])
            # garbage past the end is allowed and must never be read
            table[b, used:] = pick(-1, pool, 10**8, 0)
        seq_lens = torch.tensor(lens, dtype=index)
        kw = dict(scale=pick(None, 0.25), num_splits=pick(None, 1, 2, 4))
        valid = True
        mutation = pick(None, None, "table", "seq_lens", "scale")
        if mutation == "table":
            b = rng.randrange(B)
            table[b, rng.randrange(-(-lens[b] // bs))] = pick(-1, pool, 10**8, 2**40 if index == torch.int64 else -7)
            valid = False
        elif mutation == "seq_lens":
            seq_lens[rng.randrange(B)] = pick(0, -1, tq - 1, cap + 1, 10**6)
            valid = False
        elif mutation == "scale":
            kw["scale"], valid = pick(*bad_scales), False
        table = table.to(index)

        def ref():
            return K.paged_attention_reference(*d64(q, k, v), table, seq_lens, scale=kw["scale"])
        return Case(f"paged_attention q{tuple(q.shape)} cache{tuple(k.shape)} lens={seq_lens.tolist()} "
                    f"table={table.tolist()} {kw} {mutation}",
                    lambda be: K.paged_attention(q, k, v, table, seq_lens, backend=be, **kw), ref, valid=valid)

    def gen_linear(dtype):
        lead = pick((0,), (1,), (3,), (17,), (2, 9), (33,))
        K_, N = pick(1, 8, 33, 70), pick(1, 5, 32, 47)
        x, w = tensor((*lead, K_), dtype), tensor((N, K_), dtype, 1 / math.sqrt(K_))
        b = tensor((N,), dtype) if pick(True, False) else None
        r = tensor((*lead, N), dtype) if pick(True, False) else None
        act = pick(*K.ACTIVATIONS)
        valid = True
        mutation = pick(None, None, "k", "residual", "activation")
        if mutation == "k":
            w, valid = w[:, : K_ - 1] if K_ > 1 else w[:, :0], False
        elif mutation == "residual":
            r, valid = tensor((*lead, N + 1), dtype), False
        elif mutation == "activation":
            act, valid = pick("gelu_erf", "RELU", 3), False

        def ref():
            return K.linear_reference(*d64(x, w, b), activation=act, residual=d64(r)[0])
        return Case(f"linear x{tuple(x.shape)} w{tuple(w.shape)} bias={b is not None} "
                    f"residual={None if r is None else tuple(r.shape)} {act} {mutation}",
                    lambda be: K.linear(x, w, b, activation=act, residual=r, backend=be), ref, valid=valid)

    def gen_norm(dtype, rms):
        shape = pick((0, 8), (1, 1), (5, 33), (2, 3, 64), (9, 300))
        n = shape[-1]
        x = tensor(shape, dtype)
        w = tensor((n,), dtype) if rms or pick(True, False) else None
        b = None if rms or pick(True, False) else tensor((n,), dtype)
        r = tensor(shape, dtype) if pick(True, False) else None
        eps = pick(1e-6, 1e-5, 0.1)
        valid = True
        mutation = pick(None, None, "eps", "weight")
        if mutation == "eps":
            eps, valid = pick(float("nan"), -1e-5, float("inf"), "1e-5"), False
        elif mutation == "weight":
            w, valid = tensor((n + 1,), dtype), False
        if rms:
            def run(be):
                return K.rms_norm(x, w, eps, residual=r, backend=be)

            def ref():
                return K.rms_norm_reference(*d64(x, w), eps, residual=d64(r)[0])
        else:
            def run(be):
                return K.layer_norm(x, w, b, eps, residual=r, backend=be)

            def ref():
                return K.layer_norm_reference(*d64(x, w, b), eps, residual=d64(r)[0])
        return Case(f"{'rms' if rms else 'layer'}_norm x{shape} weight={w is not None} bias={b is not None} "
                    f"residual={r is not None} eps={eps} {mutation}", run, ref, valid=valid)

    def gen_rotary(dtype):
        B, hq, hkv, T = pick(0, 1, 2), pick(1, 4, 6, 33), pick(1, 3), pick(0, 1, 5)
        D = pick(8, 16, 40, 41, 80)
        r = 2 * rng.randint(1, D // 2)
        n_pos = pick(1, 7, 40)
        cos, sin = K.rope_cos_sin(n_pos, r)
        q, k = tensor((B, hq, T, D), dtype), tensor((B, hkv, T, D), dtype)
        shape = (T,) if pick(True, False) else (B, T)
        positions = torch.randint(0, n_pos, shape, generator=gen, dtype=pick(torch.int32, torch.int64))
        valid = True
        mutation = pick(None, None, "position", "position", "dtype")
        if mutation == "position" and positions.numel():
            positions.view(-1)[rng.randrange(positions.numel())] = pick(-1, n_pos, 10**9)
            valid = False
        elif mutation == "dtype":
            positions, valid = positions.float(), False

        def ref():
            return K.rotary_embedding_reference(*d64(q, k), cos, sin, positions)
        return Case(f"rotary q{tuple(q.shape)} k{tuple(k.shape)} r={r} n_pos={n_pos} "
                    f"positions={positions.tolist()} {mutation}",
                    lambda be: K.rotary_embedding(q, k, cos, sin, positions, backend=be), ref, valid=valid)

    def gen_swiglu(dtype):
        shape = pick((0, 8), (1, 2), (7, 64), (3, 5, 38), (20, 200))
        x = tensor(shape, dtype)
        valid = True
        if pick(False, False, True):
            x, valid = tensor((*shape[:-1], shape[-1] + 1), dtype), False

        def ref():
            return K.swiglu_reference(x.to(f64))
        return Case(f"swiglu x{tuple(x.shape)}", lambda be: K.swiglu(x, backend=be), ref, valid=valid)

    def gen_group_norm(dtype):
        G, cpg = pick(1, 2, 4), pick(1, 3, 5)
        C = G * cpg
        shape = pick((pick(0, 1, 2), C), (pick(0, 1, 2), C, pick(1, 5), pick(1, 7)), (1, C, 3, 2, 2))
        x = tensor(shape, dtype)
        w = tensor((C,), dtype) if pick(True, False) else None
        b = tensor((C,), dtype) if pick(True, False) else None
        act, eps, groups = pick(None, "silu"), pick(1e-5, 1e-2), G
        valid = True
        mutation = pick(None, None, "groups", "eps")
        if mutation == "groups":
            groups, valid = pick(0, C + 1, -1, 2.0), False
        elif mutation == "eps":
            eps, valid = pick(float("nan"), -1.0), False

        def ref():
            return K.group_norm_reference(*d64(x), groups, *d64(w, b), eps, activation=act)
        return Case(f"group_norm x{tuple(x.shape)} G={groups} weight={w is not None} bias={b is not None} "
                    f"{act} eps={eps} {mutation}",
                    lambda be: K.group_norm(x, groups, w, b, eps, activation=act, backend=be), ref, valid=valid)

    conv_acts = (None, "relu", "silu", "tanh", "sigmoid", "leaky_relu")

    def gen_conv2d(dtype):
        N, C, H, W, Kc = pick(0, 1, 2), pick(1, 3, 5), pick(1, 4, 8), pick(1, 5, 7), pick(1, 4, 6)
        R, S = pick(1, 2, 3), pick(1, 3)
        kw = dict(stride=pick(1, 2, (1, 2)), padding=pick(0, 1, (2, 0)), upsample=pick(1, 1, 2),
                  activation=pick(*conv_acts), negative_slope=pick(0.2, 0.01))
        x, w = tensor((N, C, H, W), dtype), tensor((Kc, C, R, S), dtype, 1 / math.sqrt(C * R * S))
        b = tensor((Kc,), dtype) if pick(True, False) else None
        sh, sw = (kw["stride"],) * 2 if isinstance(kw["stride"], int) else kw["stride"]
        ph, pw = (kw["padding"],) * 2 if isinstance(kw["padding"], int) else kw["padding"]
        ho = (H * kw["upsample"] + 2 * ph - R) // sh + 1
        wo = (W * kw["upsample"] + 2 * pw - S) // sw + 1
        valid = ho >= 1 and wo >= 1
        res = tensor((N, Kc, ho, wo), dtype) if valid and pick(True, False) else None
        mutation = pick(None, None, "slope", "channels")
        if mutation == "slope":
            kw["negative_slope"], valid = pick(float("nan"), "0.2", None), False
        elif mutation == "channels":
            w, valid = tensor((Kc, C + 1, R, S), dtype), False

        def ref():
            return K.conv2d_reference(*d64(x, w, b), residual=d64(res)[0], **kw)
        return Case(f"conv2d x{tuple(x.shape)} w{tuple(w.shape)} bias={b is not None} residual={res is not None} "
                    f"{kw} {mutation}", lambda be: K.conv2d(x, w, b, residual=res, backend=be, **kw), ref,
                    valid=valid)

    def gen_conv_transpose2d(dtype):
        N, C, H, W, Co = pick(0, 1, 2), pick(1, 3, 5), pick(1, 3, 5), pick(1, 4), pick(1, 3, 4)
        R, S = pick(1, 2, 4), pick(1, 3)
        stride = pick(1, 2, (2, 1))
        sh, sw = (stride,) * 2 if isinstance(stride, int) else stride
        kw = dict(stride=stride, padding=pick(0, 1), output_padding=pick(0, 0, (sh - 1, sw - 1)),
                  activation=pick(*conv_acts))
        x, w = tensor((N, C, H, W), dtype), tensor((C, Co, R, S), dtype, 1 / math.sqrt(C))
        b = tensor((Co,), dtype) if pick(True, False) else None
        p = kw["padding"]
        op = (kw["output_padding"],) * 2 if isinstance(kw["output_padding"], int) else kw["output_padding"]
        valid = (H - 1) * sh - 2 * p + R + op[0] >= 1 and (W - 1) * sw - 2 * p + S + op[1] >= 1
        mutation = pick(None, None, "output_padding", "slope")
        if mutation == "output_padding":
            kw["output_padding"], valid = sh, False
        elif mutation == "slope":
            kw["negative_slope"], valid = float("-inf"), False

        def ref():
            return K.conv_transpose2d_reference(*d64(x, w, b), **kw)
        return Case(f"conv_transpose2d x{tuple(x.shape)} w{tuple(w.shape)} bias={b is not None} {kw} {mutation}",
                    lambda be: K.conv_transpose2d(x, w, b, backend=be, **kw), ref, valid=valid)

    generators = {
        "attention": gen_attention, "paged_attention": gen_paged_attention, "linear": gen_linear,
        "rms_norm": lambda dt: gen_norm(dt, True), "layer_norm": lambda dt: gen_norm(dt, False),
        "rotary_embedding": gen_rotary, "swiglu": gen_swiglu, "group_norm": gen_group_norm,
        "conv2d": gen_conv2d, "conv_transpose2d": gen_conv_transpose2d,
    }

    # ---------------------------------------------------------------- checking
    def rel_error(out, ref):
        out, ref = out.to(f64), ref.to(f64)
        if out.shape != ref.shape:
            return f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
        if out.numel() == 0:
            return 0.0
        finite = torch.isfinite(ref)
        # the only non-finite reference values are lse = -inf (rows that see no key)
        if not torch.equal(torch.isfinite(out), finite) or not torch.equal(out[~finite], ref[~finite]):
            return "non-finite values differ from the reference"
        denom = ref[finite].norm().item()
        err = (out[finite] - ref[finite]).norm().item()
        return err / denom if denom > 0 else err

    def compare(got, want, dtype):
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        if len(got) != len(want):
            return f"{len(got)} outputs, reference has {len(want)}"
        for g, w in zip(got, want):
            if g.dtype not in (dtype, torch.float32):  # outputs in the input dtype, lse in fp32
                return f"output dtype {g.dtype}"
            err = rel_error(g, w)
            if isinstance(err, str) or err > TOL[str(dtype).replace("torch.", "")]:
                return f"relative error {err}"
        return None

    failures, matched, refused = [], 0, 0
    per_op_counts = {}
    start = time.monotonic()
    for op, make in generators.items():
        for i in range(per_op):
            dtype = pick(torch.float32, torch.float16)
            case = make(dtype)
            want = None
            if case.valid:
                try:
                    want = case.ref()
                except Exception as e:  # a generator bug, not a kernel bug: say so
                    failures.append(f"{op}[{i}] reference failed on a valid case: {e!r}\n    {case.name}")
                    continue
            for backend in (None, "torch"):
                label = f"{op}[{i}] {str(dtype)[6:]} backend={backend}: {case.name}"
                print("run", label, flush=True)  # the last line names the case if the process dies
                try:
                    got = case.run(backend)
                except (ValueError, TypeError) as e:
                    if case.valid:
                        failures.append(f"{label}\n    valid case refused: {e!r}")
                    else:
                        refused += 1
                    continue
                except Exception as e:
                    failures.append(f"{label}\n    raised {type(e).__name__}: {e}")
                    continue
                if not case.valid:
                    failures.append(f"{label}\n    invalid case returned instead of raising")
                    continue
                problem = compare(got, want, dtype)
                if problem:
                    failures.append(f"{label}\n    {problem}")
                else:
                    matched += 1
                    per_op_counts[op] = per_op_counts.get(op, 0) + 1
    print("matched per op:", per_op_counts)
    for f in failures:
        print("FAIL", f)
    print(f"fuzz: seed={seed} cases={per_op * len(generators)} matched={matched} refused={refused} "
          f"failures={len(failures)} seconds={time.monotonic() - start:.1f}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before genfuse.kernels is imported
    sys.exit(_fuzz_main(int(sys.argv[1]) if len(sys.argv) > 1 else SEED,
                        int(sys.argv[2]) if len(sys.argv) > 2 else CASES_PER_OP))
