"""runtime.threads: the CPU kernels' thread count, torch's intra-op threads beside it, and
LLM(threads=); the C++ pool under many callers, thread counts and forks is in
test_quant_review.py."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="gguf is in the test extra; the GPU image lacks it unless its wheel is carried (bench/gpu_check.sh)")
from genfuse.runtime import threads as gthreads
from gguf import GGMLQuantizationType as T


@pytest.fixture(autouse=True)
def _restore():
    before, torch_before = gthreads._threads, torch.get_num_threads()
    yield
    gthreads._threads = before
    torch.set_num_threads(torch_before)


def test_default_is_the_physical_cores_of_this_process():
    n = gthreads.default_threads()
    assert 1 <= n <= len(os.sched_getaffinity(0))
    siblings = set()
    for cpu in os.sched_getaffinity(0):
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                siblings.add(f.read().strip())
        except OSError:  # no topology in /sys (some containers): each CPU counts as a core
            siblings.add(str(cpu))
    assert n == len(siblings)
    gthreads._threads = None
    assert gthreads.kernel_threads() == n


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts_raise(bad):
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        gthreads.set_threads(bad)


def test_set_threads_and_torch_threads():
    assert gthreads.set_threads(3, torch_threads=1) == 3
    assert gthreads.kernel_threads() == 3 and torch.get_num_threads() == 1
    assert gthreads.set_threads(None) == gthreads.default_threads()


def _tiny_packed_gguf(tmp_path):
    from gguf_writer_helpers import tiny_llama_gqa, write_model_gguf

    def pick(name, arr):
        return T.Q8_0 if arr.ndim == 2 and arr.shape[-1] % 32 == 0 else T.F32

    return write_model_gguf(tmp_path / "m.gguf", tiny_llama_gqa(), "llama", pick)


def test_llm_threads_sets_the_kernels_and_torch(tmp_path):
    """Packed weights on the CPU: the kernels get `threads`, torch 1; any count gives the same
    tokens (rows of W are split between threads, never a sum)."""
    from genfuse.runtime.llm import LLM
    from genfuse.runtime.quant import PackedWeight
    from genfuse.runtime.sampling import SamplingParams

    path = _tiny_packed_gguf(tmp_path)
    torch.set_num_threads(2)
    llm = LLM(str(path), device="cpu", backend="torch", threads=2)
    assert isinstance(llm.model.layers[0].w_qkv, PackedWeight)
    assert llm.threads == 2 and gthreads.kernel_threads() == 2 and torch.get_num_threads() == 1
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    two = llm.generate([[1, 5, 9, 33]], params)[0].token_ids
    llm.set_threads(1)
    assert gthreads.kernel_threads() == 1
    assert llm.generate([[1, 5, 9, 33]], params)[0].token_ids == two
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        LLM(str(path), device="cpu", backend="torch", threads=0)


def test_dense_cpu_model_threads_go_to_torch(tmp_path):
    from genfuse.runtime.llm import LLM

    path = _tiny_packed_gguf(tmp_path)
    torch.set_num_threads(1)
    LLM(str(path), device="cpu", backend="torch", keep_quantized=False, threads=2)
    assert torch.get_num_threads() == 2 and gthreads.kernel_threads() == 2


def test_qdot_many_threads_equal_one():
    from genfuse import _C
    from gguf import quants

    rng = np.random.default_rng(0)
    blocks = quants.quantize(rng.standard_normal((4096, 256)).astype(np.float32), T.Q4_1)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    ref, y = np.empty((3, 4096), np.float32), np.empty((3, 4096), np.float32)
    _C.qdot_matmul(x, blocks, int(T.Q4_1), ref, 1)
    for t in (2, 3, 8, 64):
        _C.qdot_matmul(x, blocks, int(T.Q4_1), y, t)
        assert np.array_equal(y, ref), t


def test_cli_generate_and_chat_take_threads(tmp_path, capsys):
    from genfuse.cli import main

    path = _tiny_packed_gguf(tmp_path)
    for cmd in ("generate", "chat"):
        with pytest.raises(SystemExit) as e:
            main([cmd, *(["hi"] if cmd == "generate" else []), "--model", str(path), "--threads", "0"])
        assert e.value.code == 2
        assert "threads must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "--threads" in capsys.readouterr().out


def test_long_prompt_gemm_runs_on_the_kernel_threads(monkeypatch):
    """Past QDOT_MAX_ROWS a packed matmul is genfuse's float32 GEMM (gemm_matmul) on the kernels'
    thread count, and torch's own threads are left alone (two pools would fight for the cores)."""
    from genfuse.runtime import quant
    from gguf import quants

    assert quant.QDOT_MAX_ROWS == quant._ext().QDOT_MAX_ROWS  # the fused layers' switch is the same
    rng = np.random.default_rng(0)
    blocks = quants.quantize(rng.standard_normal((16, 64)).astype(np.float32), T.Q8_0)
    w = quant.PackedWeight(torch.from_numpy(blocks), "Q8_0", 64)
    ext = quant._ext()
    seen, set_calls = [], []
    real = ext.gemm_matmul
    monkeypatch.setattr(ext, "gemm_matmul", lambda *a: (seen.append(a[4]), real(*a))[1])
    gthreads.set_threads(2, torch_threads=1)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: set_calls.append(n))
    x = torch.randn(quant.QDOT_MAX_ROWS + 1, 64)
    torch.testing.assert_close(quant.linear(x, w), x @ w.dequantize().T)
    quant.linear(x[:quant.QDOT_MAX_ROWS], w)  # the integer-dot kernel: no gemm call
    assert seen == [2] and set_calls == [] and torch.get_num_threads() == 1
