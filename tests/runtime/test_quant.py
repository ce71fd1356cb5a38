"""Packed GGUF weights on the CPU: genfuse._C.quant_matmul / dequantize_rows against gguf's own
dequantization, runtime.quant (PackedWeight, linear, embedding), and the LLM with the SmolLM2
GGUF kept packed against the same model dequantized."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="gguf is in the test extra; the GPU image lacks it unless its wheel is carried (bench/gpu_check.sh)")
from genfuse.runtime import quant
from genfuse.runtime.quant import PackedWeight
from gguf import GGMLQuantizationType as T
from gguf import quants

from genfuse import _C
from engine_helpers import prompt_logits
from test_quant_qdot import activation_bound

TYPES = [T.Q4_0, T.Q4_1, T.Q8_0]


def packed(N, K, qtype, seed=0):
    """(gguf blocks uint8 (N, bytes), their float32 dequantization (N, K)) of random weights."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((N, K)) * rng.uniform(0.01, 2.0, size=(N, 1))).astype(np.float32)
    blocks = quants.quantize(w, qtype)
    return blocks, quants.dequantize(blocks, qtype)


def ref_matmul(x, deq):
    return x.astype(np.float64) @ deq.astype(np.float64).T


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("M,N,K", [(1, 1, 32), (1, 37, 64), (3, 100, 576), (4, 9, 96), (5, 130, 160),
                                   (7, 8, 1536), (17, 33, 256), (33, 20, 128)])
@pytest.mark.parametrize("portable", [False, True], ids=["fast", "portable"])
def test_quant_matmul_matches_the_dequantized_weight(qtype, M, N, K, portable):
    blocks, deq = packed(N, K, qtype, seed=M * 1000 + N)
    x = np.random.default_rng(1).standard_normal((M, K)).astype(np.float32) * 3
    y = np.full((M, N), np.nan, np.float32)
    _C.quant_matmul(x, blocks, int(qtype), y, 2, portable)
    ref = ref_matmul(x, deq)
    # float32 sums of K terms: relative to the row's scale, a few ulps times sqrt(K)
    scale = np.abs(x).astype(np.float64) @ np.abs(deq).astype(np.float64).T
    assert np.all(np.abs(y - ref) <= 1e-6 * scale + 1e-30), np.max(np.abs(y - ref) / scale)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_give_identical_results(threads):
    """Rows are split between threads, never the sum over K: any thread count, same bits."""
    blocks, _ = packed(3072, 576, T.Q4_1)
    x = np.random.default_rng(2).standard_normal((2, 576)).astype(np.float32)
    y1, yt = np.empty((2, 3072), np.float32), np.empty((2, 3072), np.float32)
    _C.quant_matmul(x, blocks, int(T.Q4_1), y1, 1)
    _C.quant_matmul(x, blocks, int(T.Q4_1), yt, threads)
    assert np.array_equal(y1, yt)


def test_fast_and_portable_paths_agree_closely():
    blocks, _ = packed(64, 2048, T.Q4_1)
    x = np.random.default_rng(3).standard_normal((3, 2048)).astype(np.float32)
    a, b = np.empty((3, 64), np.float32), np.empty((3, 64), np.float32)
    _C.quant_matmul(x, blocks, int(T.Q4_1), a, 1, False)
    _C.quant_matmul(x, blocks, int(T.Q4_1), b, 1, True)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_rows_is_bitwise_gguf(qtype):
    blocks, deq = packed(45, 96, qtype)
    out = np.empty((45, 96), np.float32)
    _C.dequantize_rows(blocks, int(qtype), 96, None, out, 2)
    assert np.array_equal(out, deq)
    rows = np.array([44, 0, 7, 7])
    sub = np.empty((4, 96), np.float32)
    _C.dequantize_rows(blocks, int(qtype), 96, rows, sub, 1)
    assert np.array_equal(sub, deq[rows])


def test_half_precision_scales_edge_cases():
    """Block scales that are fp16 subnormals, zero, negative and large decode exactly."""
    K = 32
    blocks = np.zeros((4, 34), np.uint8)
    for i, d in enumerate([np.float16(6e-8), np.float16(0.0), np.float16(-3.5), np.float16(60000.0)]):
        blocks[i, :2] = np.frombuffer(np.float16(d).tobytes(), np.uint8)
        blocks[i, 2:] = np.arange(-16, 16, dtype=np.int8).view(np.uint8)
    out = np.empty((4, K), np.float32)
    _C.dequantize_rows(blocks, int(T.Q8_0), K, None, out, 1)
    assert np.array_equal(out, quants.dequantize(blocks, T.Q8_0))
    x = np.ones((1, K), np.float32)
    y = np.empty((1, 4), np.float32)
    _C.quant_matmul(x, blocks, int(T.Q8_0), y, 1)
    np.testing.assert_allclose(y[0], out.sum(1), rtol=1e-6)


def test_bad_arguments_raise():
    blocks, _ = packed(8, 64, T.Q4_1)
    x = np.zeros((2, 64), np.float32)
    y = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="unknown quant type"):
        _C.quant_matmul(x, blocks, 1, y)
    with pytest.raises(ValueError, match="multiple of 32"):
        _C.quant_matmul(np.zeros((2, 48), np.float32), blocks, int(T.Q4_1), y)
    with pytest.raises(ValueError, match="bytes a row"):
        _C.quant_matmul(x, blocks, int(T.Q8_0), y)
    with pytest.raises(TypeError, match="float32"):
        _C.quant_matmul(x.astype(np.float64), blocks, int(T.Q4_1), y)
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.quant_matmul(np.zeros((64, 2), np.float32).T, blocks, int(T.Q4_1), y)
    with pytest.raises(ValueError, match=r"y must be \(2, 8\)"):
        _C.quant_matmul(x, blocks, int(T.Q4_1), np.zeros((2, 9), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        _C.quant_matmul(x[0], blocks, int(T.Q4_1), y)
    with pytest.raises(IndexError, match="out of range"):
        _C.dequantize_rows(blocks, int(T.Q4_1), 64, np.array([8]), np.zeros((1, 64), np.float32))


# --------------------------------------------------------------------------- runtime.quant


def _packed_weight(N, K, qtype, seed=0):
    blocks, deq = packed(N, K, qtype, seed)
    return PackedWeight(torch.from_numpy(blocks), qtype.name, K), torch.from_numpy(deq)


@pytest.mark.parametrize("M", [1, 3, quant.QDOT_MAX_ROWS + 5])  # the last one takes the float32 GEMM (gemm_matmul)
@pytest.mark.parametrize("activation", [None, "silu", "gelu_tanh", "relu", "gelu", "tanh"])  # every epilogue
def test_linear_with_epilogue_matches_dense(M, activation):
    from genfuse.kernels import linear_reference

    w, deq = _packed_weight(40, 96, T.Q4_1)
    x = torch.randn(1, M, 96)
    bias, res = torch.randn(40), torch.randn(1, M, 40)
    got = quant.linear(x, w, bias, activation=activation, residual=res)
    want = linear_reference(x.double(), deq.double(), bias.double(), activation=activation,
                            residual=res.double())
    assert got.shape == (1, M, 40) and got.dtype == torch.float32
    if M > quant.QDOT_MAX_ROWS:  # float32 GEMM on the dequantized weight panels
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    else:  # integer dots on Q8 activations: the activation bound (each epilogue is 1.2-Lipschitz)
        bound = 1.2 * torch.from_numpy(activation_bound(x[0].numpy(), deq.numpy())) + 1e-5
        assert torch.all((got[0].double() - want[0]).abs() <= bound)


def test_linear_refuses_an_unknown_activation_before_any_work():
    w, _ = _packed_weight(8, 32, T.Q8_0)
    with pytest.raises(ValueError, match=r"activation must be one of \(None, 'relu'.*got 'swish'"):
        quant.linear(torch.randn(2, 32), w, activation="swish")


def test_linear_dense_weights_go_to_the_kernel_library():
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    torch.testing.assert_close(quant.linear(x, w, backend="torch"), x @ w.T)


def test_packed_weight_rows_cat_and_embedding():
    a, da = _packed_weight(12, 64, T.Q8_0, seed=1)
    b, db = _packed_weight(5, 64, T.Q8_0, seed=2)
    both = PackedWeight.cat([a, b])
    assert both.shape == (17, 64)
    torch.testing.assert_close(both.dequantize(), torch.cat([da, db]), rtol=0, atol=0)
    perm = torch.tensor([3, 0, 16, 5])
    torch.testing.assert_close(both.take_rows(perm).dequantize(), torch.cat([da, db])[perm], rtol=0, atol=0)
    tokens = torch.tensor([[1, 16], [0, 0]])
    torch.testing.assert_close(quant.embedding(both, tokens), torch.cat([da, db])[tokens], rtol=0, atol=0)
    # a packed block next to a dense one (e.g. an F16 v_proj): dequantized and concatenated
    mixed = quant.cat_rows([a, db])
    torch.testing.assert_close(mixed, torch.cat([da, db]), rtol=0, atol=0)


def test_packed_weight_validates():
    with pytest.raises(ValueError, match="unsupported quant type 'Q2_K'; supported: Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K"):
        PackedWeight(torch.zeros(2, 84, dtype=torch.uint8), "Q2_K", 256)
    with pytest.raises(ValueError, match="Q5_K rows hold whole blocks of 256: K=32"):
        PackedWeight(torch.zeros(2, 20, dtype=torch.uint8), "Q5_K", 32)
    with pytest.raises(ValueError, match="multiple"):
        PackedWeight(torch.zeros(2, 20, dtype=torch.uint8), "Q4_1", 48)
    with pytest.raises(ValueError, match=r"uint8 \(N, 40\)"):
        PackedWeight(torch.zeros(2, 20, dtype=torch.uint8), "Q4_1", 64)
    with pytest.raises(ValueError, match="one format"):
        PackedWeight.cat([_packed_weight(2, 32, T.Q4_1)[0], _packed_weight(2, 32, T.Q8_0)[0]])
    w, _ = _packed_weight(4, 32, T.Q4_0)
    with pytest.raises(ValueError, match="takes 32"):
        quant.linear(torch.randn(1, 64), w)
    with pytest.raises(ValueError, match="float32 CPU"):
        quant.linear(torch.randn(1, 32, dtype=torch.float64), w)


def test_can_pack():
    cpu = torch.device("cpu")
    assert quant.can_pack(cpu, torch.float32, "torch")
    assert not quant.can_pack(cpu, torch.float32, "triton")
    assert not quant.can_pack(cpu, torch.bfloat16, "torch")
    assert not quant.can_pack(torch.device("cuda"), torch.float32, "torch")


# --------------------------------------------------------------------------- the LLM


def test_smollm_packed_and_dequantized_agree():
    """The shipped SmolLM2 GGUF (Q4_1 layers, Q8_0 embedding) kept packed gives the dequantized
    model's greedy tokens and last logits (the comparison with transformers in test_llama runs
    packed, the default on CPU)."""
    from genfuse.runtime.llm import LLM
    from genfuse.runtime.sampling import SamplingParams
    from llm_helpers import one_thread, smollm_llm
    from loader_helpers import smollm_gguf

    packed_llm = smollm_llm()
    assert packed_llm.keep_quantized
    assert isinstance(packed_llm.model.layers[0].w_qkv, PackedWeight)
    assert packed_llm.model.layers[0].w_qkv.qtype == "Q4_1" and packed_llm.model.lm_head.qtype == "Q8_0"
    dense = LLM(str(smollm_gguf()), device="cpu", backend="torch", keep_quantized=False)
    assert isinstance(dense.model.lm_head, torch.Tensor)
    ids = packed_llm.chat_prompt([{"role": "user", "content": "Name three colours."}])
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    with one_thread(), torch.inference_mode():
        assert packed_llm.generate([ids], params)[0].token_ids == dense.generate([ids], params)[0].token_ids
        a = prompt_logits(packed_llm, ids).double()
        b = prompt_logits(dense, ids).double()
    assert ((a - b).norm() / b.norm()).item() < 1e-5


def test_keep_quantized_true_where_it_cannot_apply_raises():
    from genfuse.runtime.llm import LLM
    from loader_helpers import smollm_gguf

    with pytest.raises(ValueError, match="keep_quantized=True needs"):
        LLM(str(smollm_gguf()), device="cpu", dtype=torch.bfloat16, backend="torch", keep_quantized=True)


@pytest.mark.parametrize("M", [1, 5])
def test_rows_in_different_formats_multiply_as_one_weight(M):
    """q/k/v quantized in different types (llama.cpp often gives attn_v a bigger one) stay
    packed as a PackedRows and multiply into their own output columns."""
    parts = [_packed_weight(8, 64, T.Q4_0, 1), _packed_weight(4, 64, T.Q4_1, 2), _packed_weight(4, 64, T.Q8_0, 3)]
    w = quant.cat_rows([p for p, _ in parts])
    assert isinstance(w, quant.PackedRows) and w.shape == (16, 64)
    dense = torch.cat([d for _, d in parts])
    torch.testing.assert_close(w.dequantize(), dense, rtol=0, atol=0)
    x, res = torch.randn(M, 64), torch.randn(M, 16)
    err = (quant.linear(x, w, residual=res).double() - (x.double() @ dense.double().T + res.double())).abs()
    assert torch.all(err <= torch.from_numpy(activation_bound(x.numpy(), dense.numpy())) + 1e-5)
    with pytest.raises(ValueError, match="one width"):
        quant.PackedRows([_packed_weight(2, 32, T.Q4_0)[0], _packed_weight(2, 64, T.Q4_0)[0]])


def test_act_bits_env_picks_the_activation_width(monkeypatch):
    """GENFUSE_ACT_BITS=8 runs llama.cpp's Q8 activations (within the 8-bit bound, and not the
    32-bit result); a bad value is a one-line ValueError."""
    w, deq = _packed_weight(64, 256, T.Q4_1, seed=7)
    x = torch.randn(3, 256)
    exact = x.double() @ deq.double().T
    y32 = quant.linear(x, w)
    monkeypatch.setenv("GENFUSE_ACT_BITS", "8")
    y8 = quant.linear(x, w)
    assert torch.all((y8.double() - exact).abs() <= torch.from_numpy(activation_bound(x.numpy(), deq.numpy(), 8)) + 1e-5)
    assert not torch.equal(y8, y32)
    monkeypatch.setenv("GENFUSE_ACT_BITS", "4")
    with pytest.raises(ValueError, match="GENFUSE_ACT_BITS='4': choose 32"):
        quant.linear(x, w)
