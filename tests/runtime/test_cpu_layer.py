"""The fused CPU decoder layers (genfuse._C.CpuDecoder, runtime/models/cpu_layer.py) against
`Llama.forward_step`'s torch layer loop: tiny random packed Llama models (GQA and MHA, head_dim
32 and 64, block sizes 16 and 32, q/k/v bias on and off, a QKV weight of mixed types, dense
weights), two engine steps each (prefills of 1, 5 and 21 tokens, then a mixed step: a 7-token
chunk on a cached prefix, two decodes and a padded row of slot -1), on every code path this CPU
runs (head_dim 40 too: the vector loops' tails); the real SmolLM2 through the engine (greedy tokens); and bad input (one-line errors)."""
from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="gguf is in the test extra")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import quants  # noqa: E402

from genfuse import _C  # noqa: E402
from genfuse.runtime.config import ModelConfig  # noqa: E402
from genfuse.runtime.engine.kv_cache import StepInputs  # noqa: E402
from genfuse.runtime.models import cpu_layer, llama  # noqa: E402
from genfuse.runtime.quant import QDOT_MAX_ROWS, PackedWeight  # noqa: E402
from genfuse.runtime.sampling import SamplingParams  # noqa: E402
from llm_helpers import one_thread, smollm_llm  # noqa: E402

PATHS = _C.cpu_paths()
NUM_BLOCKS = 24


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@contextlib.contextmanager
def env(**kw):
    before = {k: os.environ.get(k) for k in kw}
    os.environ.update({k: v for k, v in kw.items() if v is not None})
    for k, v in kw.items():
        if v is None:
            os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def packed(w: np.ndarray, qtype) -> PackedWeight:
    return PackedWeight(torch.from_numpy(quants.quantize(w, qtype)), qtype.name, w.shape[1])


def tiny_model(heads, kv_heads, head_dim, bias, *, v_type=T.Q4_1, dense=False, seed=0):
    """A 2-layer random Llama (hidden 64, intermediate 96), its matrices Q4_1 blocks (v_proj in
    ``v_type``: another type makes the fused QKV a PackedRows) or dense float32."""
    hidden, inter, layers = 64, 96, 2
    c = ModelConfig(arch="llama", vocab_size=50, hidden_size=hidden, num_layers=layers, num_heads=heads,
                    num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=inter, norm_eps=1e-5,
                    max_position_embeddings=256, tie_word_embeddings=True, attention_bias=bias)
    rng = np.random.default_rng(seed)

    def mat(n, k, qtype=T.Q4_1):
        w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        return torch.from_numpy(quants.dequantize(quants.quantize(w, qtype), qtype)) if dense else packed(w, qtype)

    def vec(n, base=0.0, scale=1.0):
        return torch.from_numpy((base + scale * rng.standard_normal(n)).astype(np.float32))

    sd = {"model.embed_tokens.weight": vec(50 * hidden).view(50, hidden), "model.norm.weight": vec(hidden, 1, 0.1)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = vec(hidden, 1, 0.1)
        sd[p + "post_attention_layernorm.weight"] = vec(hidden, 1, 0.1)
        sd[p + "self_attn.q_proj.weight"] = mat(heads * head_dim, hidden)
        sd[p + "self_attn.k_proj.weight"] = mat(kv_heads * head_dim, hidden)
        sd[p + "self_attn.v_proj.weight"] = mat(kv_heads * head_dim, hidden, v_type)
        sd[p + "self_attn.o_proj.weight"] = mat(hidden, heads * head_dim)
        sd[p + "mlp.gate_proj.weight"] = mat(inter, hidden)
        sd[p + "mlp.up_proj.weight"] = mat(inter, hidden)
        sd[p + "mlp.down_proj.weight"] = mat(hidden, inter)
        if bias:
            for proj, n in (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
                sd[p + f"self_attn.{proj}_proj.bias"] = vec(n, 0, 0.5)
    model = llama.Llama.from_state_dict(c, sd, backend="torch")
    model.setup_rope(256)
    return model


def step_inputs(seqs, block_size, pad_rows=0):
    """StepInputs for ``seqs``: (start, new tokens, token ids, the sequence's blocks), plus
    ``pad_rows`` rows as the CUDA-graph buckets pad them (slot -1, length 1, block 0)."""
    pos, slots, lens, qsl, ids, tables = [], [], [], [0], [], []
    for start, n, toks, blocks in seqs:
        for p in range(start, start + n):
            pos.append(p)
            slots.append(blocks[p // block_size] * block_size + p % block_size)
        ids += toks
        lens.append(start + n)
        qsl.append(qsl[-1] + n)
        tables.append(blocks)
    for _ in range(pad_rows):
        pos.append(0), slots.append(-1), ids.append(0), lens.append(1), qsl.append(qsl[-1] + 1), tables.append([0])
    W = max(len(t) for t in tables)
    table = [t + [0] * (W - len(t)) for t in tables]
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return StepInputs(input_ids=i32(ids), positions=i32(pos), slot_mapping=i32(slots), block_table=i32(table),
                      seq_lens=i32(lens), query_start_loc=i32(qsl), logits_indices=i32(qsl[1:]) - 1,
                      max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])), max_seq_len=max(lens))


def three_steps(model, block_size, fused: bool, kv_dtype=torch.float32):
    """(logits of steps 1, 2 and 3, k pool, v pool): three prefills (21, 5 and 1 tokens), then a
    7-token chunk after the 21 cached, two decodes and one padded row, then three decodes. Steps 1
    and 2 have more than QDOT_MAX_ROWS tokens (the GEMM), step 3 fewer (the integer-dot kernel).
    Unwritten slots are NaN (a kernel reading one shows); block 0, which the padded row reads,
    holds finite values."""
    c = model.config
    shape = (c.num_layers, NUM_BLOCKS, block_size, model.num_kv_heads, c.head_dim)
    gen = torch.Generator().manual_seed(1)
    k, v = torch.full(shape, float("nan"), dtype=kv_dtype), torch.full(shape, float("nan"), dtype=kv_dtype)
    k[:, 0], v[:, 0] = torch.randn(shape[:1] + shape[2:], generator=gen), torch.randn(shape[:1] + shape[2:], generator=gen)
    rng = np.random.default_rng(2)
    perm = [int(b) for b in rng.permutation(np.arange(1, NUM_BLOCKS))]  # scattered blocks, never block 0
    blocks = [perm[0:3], perm[3:5], perm[5:7]]
    toks = [rng.integers(0, 50, 40).tolist() for _ in range(3)]
    s1 = step_inputs([(0, 21, toks[0][:21], blocks[0]), (0, 5, toks[1][:5], blocks[1]), (0, 1, toks[2][:1], blocks[2])],
                     block_size)
    s2 = step_inputs([(21, 7, toks[0][21:28], blocks[0]), (5, 1, toks[1][5:6], blocks[1]), (1, 1, toks[2][1:2], blocks[2])],
                     block_size, pad_rows=1)
    s3 = step_inputs([(28, 1, toks[0][28:29], blocks[0]), (6, 1, toks[1][6:7], blocks[1]), (2, 1, toks[2][2:3], blocks[2])],
                     block_size)
    assert s1.num_tokens > QDOT_MAX_ROWS and s2.num_tokens > QDOT_MAX_ROWS and s3.num_tokens <= QDOT_MAX_ROWS
    with env(GENFUSE_FUSED_LAYERS=os.environ.get("GENFUSE_FUSED_LAYERS", "1") if fused else "0"):
        l1 = model.forward_step(s1, k, v)
        l2 = model.forward_step(s2, k, v)
        l3 = model.forward_step(s3, k, v)
    return l1, l2, l3, k, v


def close(a, b, tol=1e-5):
    assert a.shape == b.shape
    assert torch.isfinite(b).all()
    err = ((a - b).abs().max() / b.abs().max()).item()
    assert err <= tol, f"max relative error {err:.2e} > {tol:.0e}"


def check_model(model, block_size):
    ref = three_steps(model, block_size, fused=False)
    attend = llama.attend
    llama.attend = lambda *a, **k: pytest.fail("the torch layer loop ran")  # the fused path must carry every layer
    try:
        got = three_steps(model, block_size, fused=True)
    finally:
        llama.attend = attend
    for g, r in zip(got[:3], ref[:3]):
        close(g, r)
    for g, r in zip(got[3:], ref[3:]):  # the same slots written (NaN where neither wrote), the same values
        assert torch.equal(g.isnan(), r.isnan())
        close(g.nan_to_num(), r.nan_to_num())


CASES = {  # heads, kv heads, head_dim, bias, block size, v_proj type
    "gqa-d32-bs16-bias": (4, 2, 32, True, 16, T.Q4_1),
    "mha-d64-bs32": (2, 2, 64, False, 32, T.Q4_1),
    "gqa-d64-bs16-mixed-qkv": (4, 1, 64, True, 16, T.Q8_0),
    "gqa-d32-bs32": (6, 2, 32, False, 32, T.Q4_0),
    "gqa-d40-bs16-bias": (4, 2, 40, True, 16, T.Q4_1),  # vector tails: 40 = 2 x 16 + 8, rotary half 20
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(CASES))
def test_fused_layers_equal_the_torch_loop(case, path):
    heads, kv_heads, d, bias, bs, v_type = CASES[case]
    model = tiny_model(heads, kv_heads, d, bias, v_type=v_type)
    with env(GENFUSE_CPU_PATH=path):
        check_model(model, bs)
    assert isinstance(model._cpu_decoder, _C.CpuDecoder)


@pytest.mark.parametrize("path", ["portable", PATHS[0]])
def test_dense_weights_fused_on_request(path):
    model = tiny_model(4, 2, 32, True, dense=True)
    assert cpu_layer.decoder(model) is None  # dense weights: the torch path by default
    with env(GENFUSE_CPU_PATH=path, GENFUSE_FUSED_LAYERS="all"):
        check_model(model, 16)


def test_switches_and_limits():
    model = tiny_model(4, 2, 32, False)
    with env(GENFUSE_FUSED_LAYERS="0"):
        assert cpu_layer.decoder(model) is None
    assert cpu_layer.decoder(model) is not None
    model.fused_layers = False
    assert cpu_layer.decoder(model) is None
    model.fused_layers = True
    assert _C.cpu_layer_isa("portable") == "portable"
    assert _C.cpu_layer_isa(PATHS[0]) in ("avx512", "avx2", "portable")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["gqa-d32-bs16-bias", "gqa-d40-bs16-bias", "mha-d64-bs32"])
def test_float16_pools(case, path):
    """kv_cache_dtype="float16": layer 0's K/V (which no attention precedes) land in the pools as
    exactly the float16 rounding of what the float32 pools get; every layer's logits stay within
    float16 rounding of the float32 run, on every path (vector tails: D = 40)."""
    heads, kv_heads, d, bias, bs, v_type = CASES[case]
    model = tiny_model(heads, kv_heads, d, bias, v_type=v_type)
    with env(GENFUSE_CPU_PATH=path):
        ref = three_steps(model, bs, fused=True)
        got = three_steps(model, bs, fused=True, kv_dtype=torch.float16)
    assert got[3].dtype == torch.float16
    for g, r in zip(got[3:], ref[3:]):
        assert torch.equal(g.isnan(), r.isnan())
        assert torch.equal(g[0].view(torch.int16), r[0].half().view(torch.int16))  # layer 0: the rounding only
        close(g.float().nan_to_num(), r.nan_to_num(), tol=4e-3)
    for g, r in zip(got[:3], ref[:3]):
        close(g, r, tol=1e-2)


def test_float_to_half_rounds_as_numpy():
    """The portable path's float -> half (F16C's on the others) against numpy: edges (subnormals,
    ties, the overflow threshold 65520, inf, NaN) and 2**20 random bit patterns."""
    edges = np.array([0.0, -0.0, 2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * 1.0000001, 3 * 2.0 ** -25, 2.0 ** -14,
                      2.0 ** -14 * (1 - 2.0 ** -11), 65504.0, 65519.99, 65520.0, 1e10, -1e-10, 1 + 2.0 ** -11,
                      1 + 3 * 2.0 ** -11, np.inf, -np.inf, np.nan], np.float32)
    rnd = np.random.default_rng(0).integers(0, 2**32, 2**20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    for x in (edges, rnd):
        with np.errstate(over="ignore"):
            got, want = _C.float_to_half(x), x.astype(np.float16).view(np.uint16)
        nan = np.isnan(x)
        assert np.array_equal(got[~nan], want[~nan])
        assert np.isnan(got[nan].view(np.float16)).all()


# --------------------------------------------------------------------------- SmolLM2


def test_smollm_greedy_tokens_fused_equal_unfused():
    llm = smollm_llm()
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    prompts = ["The capital of France is", "Once upon a time, in a land far away,", "1, 2, 3,"]
    out = {}
    for mode in ("0", "1"):
        with env(GENFUSE_FUSED_LAYERS=mode):
            out[mode] = [c.token_ids for c in llm.generate(prompts, params, use_tqdm=False)]
    assert out["1"] == out["0"]
    assert all(len(t) == 32 for t in out["1"])
    assert cpu_layer.decoder(llm.engine.model) is not None


def test_smollm_float16_kv_cache():
    """Engine(kv_cache_dtype="float16") on SmolLM2: twice the tokens in the same memory, the same
    greedy tokens as the float32 cache on these prompts (64 tokens each, checked when written);
    refused by name where the layers cannot keep it, and a step that would run the torch layers
    over it says so."""
    from genfuse.runtime.engine import Engine, EngineArgs
    from genfuse.runtime.engine.kv_cache import kv_bytes_per_block

    loaded = smollm_llm().engine.loaded
    c = loaded.config
    mem = 24 * kv_bytes_per_block(c.num_layers, c.num_kv_heads, c.head_dim, 16, torch.float32)  # 24 float32 blocks
    prompts = ["The capital of France is", "Once upon a time, in a land far away,", "1, 2, 3,", "def fib(n):"]
    ids = [loaded.tokenizer.encode(p) for p in prompts]
    outs, cap = {}, {}
    for dt in ("auto", "float16"):
        e = Engine(loaded, kv_cache_dtype=dt, kv_cache_memory=mem)
        cap[dt] = e.kv_capacity_tokens
        for i, p in enumerate(ids):
            e.add_request(str(i), p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
        done = {}
        while e.has_unfinished_requests():
            done.update({o.request_id: o.token_ids for o in e.step() if o.finished})
        outs[dt] = [done[str(i)] for i in range(len(ids))]
        assert e.kv.k.dtype == (torch.float16 if dt == "float16" else torch.float32)
    assert cap == {"auto": 24 * 16, "float16": 48 * 16}
    assert outs["float16"] == outs["auto"] and all(len(t) == 24 for t in outs["auto"])
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of 'auto', 'float32', 'float16', 'bfloat16', got 'fp8'"):
        EngineArgs(kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match=r"kv_cache_dtype='bfloat16' differs from the model's float32: only the fused"):
        Engine(loaded, kv_cache_dtype="bfloat16", kv_cache_memory=mem)
    with env(GENFUSE_FUSED_LAYERS="0"):
        with pytest.raises(ValueError, match=r"kv_cache_dtype='float16' differs .* use kv_cache_dtype='auto'"):
            Engine(loaded, kv_cache_dtype="float16", kv_cache_memory=mem)
    e = Engine(loaded, kv_cache_dtype="float16", kv_cache_memory=mem)
    e.add_request("x", ids[0], SamplingParams(max_tokens=4))
    with env(GENFUSE_FUSED_LAYERS="0"), pytest.raises(RuntimeError, match=r"the KV cache is float16 but this step runs"):
        e.step()


# --------------------------------------------------------------------------- bad input


def _args(model, bs=16):
    s = step_inputs([(0, 3, [1, 2, 3], [1])], bs)
    c = model.config
    k = torch.zeros(c.num_layers, 4, bs, model.num_kv_heads, c.head_dim)
    return dict(h=torch.zeros(3, 64).numpy(), mlp_out=torch.zeros(3, 64).numpy(), positions=s.positions.numpy(),
                slot_mapping=s.slot_mapping.numpy(), block_table=s.block_table.numpy(), seq_lens=s.seq_lens.numpy(),
                query_start_loc=s.query_start_loc.numpy(), k_pool=k.numpy(), v_pool=k.clone().numpy(),
                cos=model.cos.numpy(), sin=model.sin.numpy())


def _i32(*x):
    return np.array(x, dtype=np.int32)


BAD = {
    "h float64": (dict(h=np.zeros((3, 64))), "h must be float32"),
    "h wrong width": (dict(h=np.zeros((3, 63), np.float32)), "h must have shape"),
    "mlp_out rows": (dict(mlp_out=np.zeros((2, 64), np.float32)), "mlp_out must have shape"),
    "h read-only": ("readonly", "h must be writable"),
    "positions int64": (dict(positions=np.zeros(3, np.int64)), "positions must be int32"),
    "positions length": (dict(positions=_i32(0, 1)), "positions must have shape"),
    "position past rotary": (dict(positions=_i32(0, 1, 256)), "positions[2]=256"),
    "slot past pools": (dict(slot_mapping=_i32(0, 1, 64)), "slot_mapping[2]=64"),
    "block out of range": (dict(block_table=_i32(4).reshape(1, 1)), "block_table[0, 0]=4"),
    "seq_lens short": (dict(seq_lens=_i32(2)), "seq_lens[0]=2"),
    "seq_lens past table": (dict(seq_lens=_i32(17)), "seq_lens[0]=17"),
    "query_start_loc decreasing": (dict(query_start_loc=_i32(2, 1)), "must not decrease"),
    "query_start_loc past N": (dict(query_start_loc=_i32(0, 4), seq_lens=_i32(4)), "exceeds the 3 tokens"),
    "pool kv heads": (dict(k_pool=np.zeros((2, 4, 16, 1, 32), np.float32)), "k_pool must have shape"),
    "pools differ": (dict(v_pool=np.zeros((2, 5, 16, 2, 32), np.float32)), "v_pool must have shape"),
    "pool not contiguous": (dict(k_pool=np.zeros((2, 4, 16, 2, 64), np.float32)[..., ::2]), "C-contiguous"),
    "pool a list": (dict(k_pool=[0.0]), "k_pool must be a numpy.ndarray"),
    "same pool twice": ("samepool", "must not share memory"),
    "cos too wide": (dict(cos=np.zeros((256, 17), np.float32), sin=np.zeros((256, 17), np.float32)), "cos must have"),
    "bad path": (dict(path="sse9"), "sse9"),
    "bad act bits": (dict(act_bits=4), "act_bits"),
    "bad layers": (dict(first=1, last=3), "must lie within"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_error(case):
    model = tiny_model(4, 2, 32, False)
    dec = cpu_layer.decoder(model)
    change, msg = BAD[case]
    args = _args(model)
    if change == "readonly":
        args["h"].flags.writeable = False
    elif change == "samepool":
        args["v_pool"] = args["k_pool"]
    else:
        args.update(change)
    with pytest.raises((ValueError, TypeError)) as e:
        dec.forward(**args)
    assert msg in str(e.value) and "\n" not in str(e.value)
    dec.forward(**_args(model))  # and the good call still runs


def test_bad_weights_one_line_error():
    model = tiny_model(4, 2, 32, False)
    lw = model.layers[0]
    good = dict(input_norm=lw.input_norm.numpy(), qkv=[(lw.w_qkv._data_np, 3)], o=[(lw.w_o._data_np, 3)],
                post_norm=lw.post_norm.numpy(), gate_up=[(lw.w_gate_up._data_np, 3)], down=[(lw.w_down._data_np, 3)])
    _C.CpuDecoder(64, 4, 2, 32, 96, 1e-5, [good])
    bad = {
        "missing": ({k: v for k, v in good.items() if k != "o"}, "layers[0].o is missing"),
        "norm shape": (dict(good, post_norm=np.zeros(63, np.float32)), "layers[0].post_norm must have shape"),
        "rows": (dict(good, qkv=[(lw.w_qkv._data_np[:10], 3)]), "parts hold 10 rows"),
        "type": (dict(good, down=[(lw.w_down._data_np, 99)]), "unknown quant type 99"),
        "bytes": (dict(good, down=[(lw.w_down._data_np, 8)]), "layers[0].down blocks must have shape"),
        "dense shape": (dict(good, o=np.zeros((64, 64), np.float32)), "layers[0].o must have shape"),
    }
    for name, (layer, msg) in bad.items():
        with pytest.raises((ValueError, TypeError)) as e:
            _C.CpuDecoder(64, 4, 2, 32, 96, 1e-5, [layer])
        assert msg in str(e.value) and "\n" not in str(e.value), name
    with pytest.raises(ValueError, match="not a multiple"):
        _C.CpuDecoder(64, 3, 2, 32, 96, 1e-5, [good])


def test_layer_ranges_compose():
    """forward(first=0, last=L) equals one call a layer (mlp_in carrying the MLP residual), bit
    for bit: the same kernels in the same order."""
    model = tiny_model(4, 2, 32, True)
    dec = cpu_layer.decoder(model)
    outs = []
    for split in (False, True):
        args = _args(model)
        args["h"][:] = np.random.default_rng(3).standard_normal((3, 64)).astype(np.float32)
        if split:
            for i in range(dec.num_layers):
                dec.forward(**args, first=i, last=i + 1, mlp_in=i > 0)
        else:
            dec.forward(**args)
        outs.append((args["h"].copy(), args["mlp_out"].copy(), args["k_pool"].copy()))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
