"""torch.ops.genfuse.*: PyTorch's own operator checks, torch.compile and torch.export through them.

The suite runs under TRITON_INTERPRET=1 (conftest), so an eager call of an operator runs the
Triton kernels through the interpreter, while the tracing checks (fake tensors, AOT dispatch,
compile) trace the torch reference: opcheck comparing the two is also a kernel-vs-reference check.
"""
import pytest
import torch
import torch.nn.functional as F

from genfuse import kernels as gk
from genfuse.kernels import ops

G = torch.ops.genfuse


def _paged(B=2, Hq=6, Hkv=2, Tq=1, D=24, lens=(5, 19), block_size=8):
    n_blocks = [-(-n // block_size) for n in lens]
    pool = sum(n_blocks) + 1
    k = torch.randn(pool, block_size, Hkv, D)
    v = torch.randn(pool, block_size, Hkv, D)
    perm = torch.randperm(pool).tolist()
    table = torch.zeros((B, max(n_blocks)), dtype=torch.int32)
    for b, n in enumerate(n_blocks):
        table[b, :n] = torch.tensor(perm[:n])
        perm = perm[n:]
    q = torch.randn(B, Hq, Tq, D)
    return q, k, v, table, torch.tensor(lens, dtype=torch.int32)


def _opcheck_cases():
    r = torch.randn
    q, kc, vc, table, lens = _paged()
    cos, sin = gk.rope_cos_sin(16, 10)
    # unified attention: 2 sequences, 3 + 1 new tokens over 11 and 6 cached
    uq = r(4, 6, 24)
    qsl = torch.tensor([0, 3, 4], dtype=torch.int32)
    kv_k, kv_v = r(3, 2, 24), r(3, 2, 24)
    x4 = r(2, 5, 7, 9)
    return {
        "attention_causal": (G.attention, (r(1, 6, 5, 24), r(1, 2, 9, 24), r(1, 2, 9, 24), True, 0.3)),
        "attention_strided": (G.attention, (r(2, 7, 3, 16).transpose(1, 2), r(2, 1, 11, 16),
                                            r(2, 1, 11, 16), False, None)),
        "paged_attention": (G.paged_attention, (q, kc, vc, table, lens, None, 2)),
        "unified_attention": (G.unified_attention, (uq, kc, vc, table, torch.tensor([11, 6], dtype=torch.int32),
                                                    qsl, None, 3)),
        "write_kv_cache": (G.write_kv_cache, (kv_k, kv_v, kc.clone()[:, :, :2], vc.clone()[:, :, :2],
                                              torch.tensor([3, -1, 17]))),
        "linear_3d_bias_act_res": (G.linear, (r(2, 3, 13), r(7, 13), r(7), "gelu_tanh", r(2, 3, 7))),
        "linear_transposed_w": (G.linear, (r(5, 11), r(11, 9).t(), None, None, None)),
        "rms_norm": (G.rms_norm, (r(3, 5, 37), r(37), 1e-5)),
        "add_rms_norm": (G.add_rms_norm, (r(4, 37), r(4, 37), r(37), 1e-6)),
        "layer_norm": (G.layer_norm, (r(3, 19), r(19), r(19), 1e-5)),
        "layer_norm_no_affine": (G.layer_norm, (r(2, 2, 19), None, None, 1e-5)),
        "add_layer_norm": (G.add_layer_norm, (r(3, 19), r(3, 19), r(19), None, 1e-5)),
        "rotary_embedding": (G.rotary_embedding, (r(2, 3, 5, 12), r(2, 1, 5, 12), cos, sin,
                                                  torch.randint(0, 16, (2, 5)))),
        "swiglu": (G.swiglu, (r(3, 4, 22),)),
        "group_norm_silu": (G.group_norm, (r(2, 6, 5, 3), 3, r(6), r(6), 1e-5, "silu")),
        "conv2d": (G.conv2d, (x4, r(4, 5, 3, 3), r(4), [2, 1], [1, 0], 1, "relu", 0.2, None)),
        "conv2d_upsample_channels_last": (G.conv2d, (x4.to(memory_format=torch.channels_last),
                                                     r(3, 5, 3, 3), None, [1, 1], [1, 1], 2,
                                                     "leaky_relu", 0.1, None)),
        "conv_transpose2d": (G.conv_transpose2d, (r(2, 5, 3, 4), r(5, 3, 4, 4), r(3), [2, 2], [1, 1],
                                                  [0, 0], "tanh", 0.2)),
    }


CASES = _opcheck_cases()


def test_every_op_is_registered_and_checked():
    assert set(ops.NAMES) == {getattr(G, n).default.name().split("::")[1] for n in ops.NAMES}
    checked = {op._qualified_op_name.split("::")[1] for op, _ in CASES.values()}
    assert checked == set(ops.NAMES)


@pytest.mark.parametrize("case", list(CASES))
def test_opcheck(case):
    op, args = CASES[case]
    torch.library.opcheck(op, args, rtol=1e-4, atol=1e-4)


def test_ops_match_the_functions():
    """The operators compute what the plain functions compute (both through the interpreter)."""
    x, w = torch.randn(3, 37), torch.randn(37)
    torch.testing.assert_close(G.rms_norm(x, w, 1e-6), gk.rms_norm(x, w, 1e-6))
    y, h = G.add_rms_norm(x, x, w, 1e-6)
    y2, h2 = gk.rms_norm(x, w, 1e-6, residual=x)
    torch.testing.assert_close((y, h), (y2, h2))
    lx, lw = torch.randn(4, 13), torch.randn(9, 13)
    torch.testing.assert_close(G.linear(lx, lw, None, "silu"), gk.linear(lx, lw, activation="silu"))


def test_write_kv_cache_mutates_only_the_caches():
    kc, vc = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
    k, v = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    G.write_kv_cache(k, v, kc, vc, torch.tensor([5, 0]))
    assert torch.equal(kc[1, 1], k[0]) and torch.equal(vc[0, 0], v[1])
    assert G.write_kv_cache.default._schema.arguments[2].alias_info.is_write


def test_bad_input_is_a_one_line_error():
    with pytest.raises(ValueError, match="x has 5 input features"):
        G.linear(torch.randn(2, 5), torch.randn(3, 4))


# --------------------------------------------------------------------------------------
# A tiny Llama block from the operators, compiled
# --------------------------------------------------------------------------------------
class TinyBlock(torch.nn.Module):
    """Pre-norm attention + SwiGLU MLP on the operators: D=32, 4 query / 2 KV heads of 8."""

    def __init__(self, d=32, hq=4, hkv=2, ffn=48):
        super().__init__()
        self.hq, self.hkv, self.hd = hq, hkv, d // hq
        self.qkv = torch.nn.Parameter(torch.randn((hq + 2 * hkv) * self.hd, d) / d ** 0.5)
        self.o = torch.nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.gate_up = torch.nn.Parameter(torch.randn(2 * ffn, d) / d ** 0.5)
        self.down = torch.nn.Parameter(torch.randn(d, ffn) / ffn ** 0.5)
        self.n1 = torch.nn.Parameter(1 + 0.1 * torch.randn(d))
        self.n2 = torch.nn.Parameter(1 + 0.1 * torch.randn(d))
        cos, sin = gk.rope_cos_sin(64, self.hd)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, x, positions):
        B, T, _ = x.shape
        h = G.rms_norm(x, self.n1, 1e-5)
        qkv = G.linear(h, self.qkv, None, None, None).view(B, T, self.hq + 2 * self.hkv, self.hd)
        q, k, v = qkv.transpose(1, 2).split([self.hq, self.hkv, self.hkv], dim=1)  # (B, H, T, hd)
        q, k = G.rotary_embedding(q, k, self.cos, self.sin, positions)
        a = G.attention(q, k, v, True, None).transpose(1, 2).reshape(B, T, -1)
        x = G.linear(a, self.o, None, None, x)                                       # + residual
        h = G.rms_norm(x, self.n2, 1e-5)
        return G.linear(G.swiglu(G.linear(h, self.gate_up, None, None, None)), self.down, None, None, x)


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    with torch.no_grad():
        yield TinyBlock().eval(), torch.randn(2, 7, 32), torch.arange(7)


def test_block_has_no_graph_break(block):
    m, x, pos = block
    torch._dynamo.reset()
    explain = torch._dynamo.explain(m)(x, pos)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_block_compiles_fullgraph(block, backend):
    m, x, pos = block
    torch._dynamo.reset()
    with torch.no_grad():
        eager = m(x, pos)
        compiled = torch.compile(m, fullgraph=True, backend=backend)(x, pos)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_block_exports(block):
    m, x, pos = block
    ep = torch.export.export(m, (x, pos))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"genfuse.rms_norm.default", "genfuse.linear.default", "genfuse.attention.default",
            "genfuse.rotary_embedding.default", "genfuse.swiglu.default"} <= targets
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x, pos), m(x, pos), rtol=1e-5, atol=1e-5)


def test_kv_cache_write_in_a_compiled_graph():
    """The one mutating op keeps its effect through functionalization (aot_eager)."""
    def step(k, v, kc, vc, slots):
        G.write_kv_cache(k * 2, v, kc, vc, slots)
        return kc.sum() + vc.sum()

    kc, vc = torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)
    k, v = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    torch._dynamo.reset()
    total = torch.compile(step, fullgraph=True, backend="aot_eager")(k, v, kc, vc, torch.tensor([1, 9]))
    assert torch.equal(kc[0, 1], 2 * k[0]) and torch.equal(vc[2, 1], v[1])
    torch.testing.assert_close(total, 2 * k.sum() + v.sum())


def test_reference_is_the_cpu_trace():
    """Under compile on CPU the op decomposes into the reference: F.rms_norm appears in the
    AOT graph of a function that only calls torch.ops.genfuse.rms_norm."""
    seen = []

    def backend(gm, example_inputs):
        from torch._functorch.aot_autograd import aot_module_simplified

        def inner(g, _):
            seen.extend(str(n.target) for n in g.graph.nodes)
            return g
        return aot_module_simplified(gm, example_inputs, fw_compiler=inner)

    torch._dynamo.reset()
    x, w = torch.randn(3, 16), torch.randn(16)
    out = torch.compile(lambda x: G.rms_norm(x, w, 1e-6), backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(out, F.rms_norm(x, (16,), w, 1e-6))
    assert not any("genfuse" in s for s in seen) and any("rms_norm" in s or "rsqrt" in s for s in seen)


def test_plain_import_does_not_load_the_compiler():
    """`import genfuse.kernels` stays light; `import genfuse.kernels.ops` registers the ops."""
    import subprocess
    import sys

    code = ("import sys, torch, genfuse.kernels; assert 'torch._dynamo' not in sys.modules; "
            "import genfuse.kernels.ops; print(torch.ops.genfuse.linear.default.name())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "genfuse::linear"


def _step_batch(poison=True):
    """A mixed engine step (a chunk after a prefix, a decode, a whole prompt, a sequence with no
    query) over a shuffled pool; unwritten slots hold NaN, as a fresh pool may."""
    from test_unified_attention import make_batch

    q, kc, vc, table, lens, qsl = make_batch("cpu", torch.float32, [(9, 4), (20, 1), (0, 6), (5, 0)],
                                             Hq=6, Hkv=2, D=16, block_size=8, garbage=0)
    if poison:
        written = torch.zeros(kc.shape[:2], dtype=torch.bool)
        for b, L in enumerate(lens.tolist()):
            for j in range(L):
                written[table[b, j // 8], j % 8] = True
        kc[~written] = float("nan")
        vc[~written] = float("nan")
    return q, kc, vc, table, lens, qsl


def test_traced_twins_match_the_functions():
    q, kc, vc, table, lens, qsl = _step_batch()
    want = gk.unified_attention(q, kc, vc, table, lens, qsl, backend="torch")
    got = ops._unified_attention_traced(q, kc, vc, table, lens, qsl, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    k, v = torch.randn(4, 2, 16), torch.randn(4, 2, 16)
    slots = torch.tensor([3, -1, 17, 10**6])  # padding and a slot past the pool are skipped
    want_k, want_v = kc.clone(), vc.clone()
    gk.write_kv_cache(k, v, want_k, want_v, slots, validate=False, backend="torch")
    ops._write_kv_cache_traced(k, v, kc, vc, slots)
    torch.testing.assert_close(kc, want_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, want_v, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_engine_step_compiles_fullgraph(backend):
    """write_kv_cache then unified_attention, as a model layer runs them, under
    torch.compile(fullgraph=True): the same output and the same pool as eager."""
    q, kc, vc, table, lens, qsl = _step_batch(poison=False)
    N = q.shape[0]
    k, v = torch.randn(N, 2, 16), torch.randn(N, 2, 16)
    starts = (lens - (qsl[1:] - qsl[:-1])).tolist()  # each sequence's new tokens go at its end
    slots = torch.cat([table[b, (torch.arange(s, L) // 8)].long() * 8 + torch.arange(s, L) % 8
                       for b, (s, L) in enumerate(zip(starts, lens.tolist()))])

    def layer(q, k, v, kc, vc):
        G.write_kv_cache(k, v, kc, vc, slots)
        return G.unified_attention(q, kc, vc, table, lens, qsl, None, 6)

    kc2, vc2 = kc.clone(), vc.clone()
    want = layer(q, k, v, kc2, vc2)
    torch._dynamo.reset()
    got = torch.compile(layer, fullgraph=True, backend=backend)(q, k, v, kc, vc)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kc, kc2, rtol=0, atol=0)
