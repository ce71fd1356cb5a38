"""The engine over tensor-parallel ranks: worker processes it starts itself (gloo on 127.0.0.1),
the same outputs as one process for concurrent requests with prefix-cache hits, no process left
behind, and a dead worker reported within the timeout."""
import time

import pytest

from genfuse.runtime.engine import Engine
from genfuse.runtime.engine.tp_executor import TensorParallelError
from genfuse.runtime.sampling import SamplingParams
from llm_helpers import tiny_folder

SHARED = [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]  # > one block: cached


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return tiny_folder("llama", tmp_path_factory.mktemp("tp_engine") / "m")[1]


def run_all(engine, prompts, n=6):
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    got = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    return [got[str(i)] for i in range(len(prompts))]


def test_engine_over_2_ranks_equals_one(tiny_llama):
    prompts = [SHARED + [30 + i] * (i + 1) for i in range(4)] + [[40, 41, 42]]
    want = run_all(Engine(str(tiny_llama), device="cpu", backend="torch", block_size=8), prompts)
    engine = Engine(str(tiny_llama), device="cpu", backend="torch", block_size=8, tensor_parallel_size=2)
    try:
        procs = list(engine.tp.procs)
        assert len(procs) == 1 and procs[0].is_alive()
        assert engine.model.num_kv_heads == 1  # 2 KV heads over 2 ranks
        assert run_all(engine, prompts) == want
        assert engine.stats.num_cached_prompt_tokens > 0  # later prompts hit the shared prefix
    finally:
        engine.close()
    for p in procs:
        assert not p.is_alive()  # no orphan


def test_a_dead_worker_is_reported(tiny_llama):
    engine = Engine(str(tiny_llama), device="cpu", backend="torch", tensor_parallel_size=2)
    try:
        engine.tp.procs[0].kill()
        engine.tp.procs[0].join(timeout=10)
        engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0))
        t0 = time.monotonic()
        with pytest.raises(TensorParallelError, match="tensor-parallel worker"):
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - t0 < 130
    finally:
        engine.close()


def test_bad_sizing_is_refused_before_any_process_starts(tiny_llama):
    with pytest.raises(ValueError, match=r"cannot split llama over tensor_parallel_size=3: 4 query heads"):
        Engine(str(tiny_llama), device="cpu", tensor_parallel_size=3)
    with pytest.raises(ValueError, match=r"tensor_parallel_size must be an int in \[1, 64\], got 0"):
        Engine(str(tiny_llama), device="cpu", tensor_parallel_size=0)


def test_cli_generate_over_2_ranks(tmp_path):
    import subprocess
    import sys

    from llm_helpers import tiny_chat_folder

    folder = tiny_chat_folder(tmp_path / "chat")
    base = [sys.executable, "-m", "genfuse", "generate", "--model", str(folder), "--max-tokens", "8",
            "--temperature", "0", "--backend", "torch", "--device", "cpu", "Hello"]
    one = subprocess.run(base, capture_output=True, text=True, timeout=240)
    two = subprocess.run(base + ["--tensor-parallel-size", "2"], capture_output=True, text=True, timeout=240)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout == one.stdout and one.stdout.strip()
    bad = subprocess.run(base + ["--tensor-parallel-size", "3"], capture_output=True, text=True, timeout=240)
    assert bad.returncode != 0 and "4 query heads are not divisible by 3" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_readme_example_smollm2_over_3():
    # README "Tensor parallelism": the real default model over 3 ranks, the same text as alone
    import genfuse

    params = genfuse.SamplingParams(max_tokens=6, temperature=0)
    want = genfuse.LLM("smollm2-135m-instruct", backend="torch").generate("The capital of France is", params)[0]
    llm = genfuse.LLM("smollm2-135m-instruct", backend="torch", tensor_parallel_size=3)
    try:
        got = llm.generate("The capital of France is", params)[0]
    finally:
        llm.engine.close()
    assert got.text == want.text and got.token_ids == want.token_ids


def test_a_hung_worker_fails_the_step_within_the_timeout(tiny_llama, monkeypatch):
    import os
    import signal

    monkeypatch.setenv("GENFUSE_TP_TIMEOUT_S", "5")
    engine = Engine(str(tiny_llama), device="cpu", backend="torch", tensor_parallel_size=2)
    worker = engine.tp.procs[0]
    try:
        os.kill(worker.pid, signal.SIGSTOP)  # alive but answering nothing
        engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0))
        t0 = time.monotonic()
        with pytest.raises(TensorParallelError, match="tensor-parallel"):
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - t0 < 60
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        engine.close()
    assert not worker.is_alive()


def test_bad_timeout_setting_is_one_line(tiny_llama, monkeypatch):
    monkeypatch.setenv("GENFUSE_TP_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match=r"GENFUSE_TP_TIMEOUT_S must be a number of seconds > 0, got 'soon'"):
        Engine(str(tiny_llama), device="cpu", tensor_parallel_size=2)


def test_ctrl_c_during_generate_over_2_ranks(tmp_path):
    # a terminal's Ctrl-C reaches the whole process group: rank 0 finishes the step in flight
    # (a step cut halfway would leave the ranks in different collectives), stops, exits 130;
    # the worker ignores SIGINT and stops on rank 0's STOP
    import os
    import signal
    import subprocess
    import sys

    from llm_helpers import tiny_chat_folder

    folder = tiny_chat_folder(tmp_path / "chat")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.Popen([sys.executable, "-m", "genfuse", "generate", "--model", str(folder), "--max-tokens", "250",
                          "--max-model-len", "256", "--temperature", "0", "--backend", "torch", "--device", "cpu",
                          "--tensor-parallel-size", "2", "H"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**env, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        assert p.stdout.read(1)  # generating (250 tokens take seconds here)
        group = subprocess.run(["pgrep", "-g", str(p.pid)], capture_output=True, text=True).stdout.split()
        assert len(group) >= 2  # rank 0 and its worker
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
    err = err.decode()
    assert p.returncode == 130 and "[interrupted]" in err and "Traceback" not in err, err[-2000:]
    deadline = time.monotonic() + 15
    while subprocess.run(["pgrep", "-g", str(p.pid)], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "a process of the run is still alive"
        time.sleep(0.1)


def test_workers_take_rank_0s_threads(tiny_llama, capfd):
    """`--threads` / LLM.set_threads hold on every rank: a worker takes rank 0's kernel and torch
    thread counts with the next step (and logs it), and ranks started here split the cores by
    default."""
    import logging

    import torch

    from genfuse.runtime import threads

    log = logging.getLogger("genfuse.tp")
    handler = logging.StreamHandler()
    log.addHandler(handler)
    old_level, old_threads, old_torch = log.level, threads._threads, torch.get_num_threads()
    log.setLevel(logging.INFO)
    threads._threads = None
    try:
        engine = Engine(str(tiny_llama), device="cpu", backend="torch", tensor_parallel_size=2)
        try:
            assert threads.kernel_threads() == max(1, threads.default_threads() // 2)
            threads.set_threads(3, torch_threads=2)
            run_all(engine, [[1, 2, 3]], n=2)
            threads.set_threads(1, torch_threads=1)
            run_all(engine, [[4, 5, 6]], n=2)
        finally:
            engine.close()
        err = capfd.readouterr().err
        assert "rank 1: genfuse kernels on 3 thread(s), torch on 2" in err, err
        assert "rank 1: genfuse kernels on 1 thread(s), torch on 1" in err, err
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        threads._threads = old_threads
        torch.set_num_threads(old_torch)
