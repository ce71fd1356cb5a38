"""Tensor parallelism under torchrun: `python -m torch.distributed.run --nproc-per-node 2 -m
genfuse generate ...` uses the ranks torchrun started (rank 0 runs the engine, rank 1 serves
its steps) and prints the same tokens as one process; no process is left behind. The backend
choice and its refusals (nccl without CUDA) happen before any process starts."""
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from genfuse.runtime.distributed import choose_backend, free_port, launch_env
from llm_helpers import tiny_chat_folder

TIMEOUT = 150  # a run takes ~10 s here; bounded so a hang fails instead of stalling the suite


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return tiny_chat_folder(tmp_path_factory.mktemp("tp_torchrun") / "chat")


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "GENFUSE_TP_TIMEOUT_S": "60"}


def _run(cmd):
    # its own session: on a timeout the whole tree (torchrun and its ranks) is killed
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"{' '.join(cmd)} did not finish within {TIMEOUT} s\n{err[-3000:]}")
    return p.returncode, out, err


def _processes_naming(text: str) -> list[str]:
    """Live processes whose command line contains ``text`` (the test's unique model folder)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(f"{pid}: {cmdline}")
    return found


def test_torchrun_generate_equals_one_process(chat):
    gen = ["-m", "genfuse", "generate", "--model", str(chat), "--max-tokens", "8", "--temperature", "0",
           "--backend", "torch", "--device", "cpu", "Hello"]
    rc, want, err = _run([sys.executable, *gen])
    assert rc == 0 and want.strip(), err[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(free_port())]
    rc, got, err = _run([*torchrun, *gen])  # no --tensor-parallel-size: torchrun's WORLD_SIZE
    assert rc == 0, err[-3000:]
    assert got == want  # rank 1 prints nothing to stdout
    assert "tensor parallel: 2 ranks on gloo (torchrun's process group)" in err
    for rank in (0, 1):  # each rank says what it holds
        held = f"query heads {2 * rank}-{2 * rank + 1}, KV heads {rank}-{rank}"
        assert f"tensor parallel rank {rank}/2 holds {held}" in err
    assert _processes_naming(str(chat)) == []  # every rank exited

    # a size other than torchrun's: each rank's one-line error (torchrun adds its own report)
    rc, _, err = _run([*torchrun[:-1], str(free_port()), *gen, "--tensor-parallel-size", "4"])
    assert rc != 0
    assert "genfuse generate: error: torchrun started 2 ranks but tensor_parallel_size=4: they must be equal" in err
    assert _processes_naming(str(chat)) == []


def test_torchrun_serve(chat):
    """rank 0 listens and runs the engine, rank 1 only serves its steps; SIGTERM to torchrun ends both."""
    import queue
    import re
    import threading

    import httpx

    gen = [sys.executable, "-m", "genfuse", "generate", "--model", str(chat), "--max-tokens", "8", "--temperature",
           "0", "--backend", "torch", "--device", "cpu", "Hello"]
    rc, want, err = _run(gen)
    assert rc == 0, err[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "genfuse", "serve", str(chat), "--port", "0", "--backend", "torch",
           "--device", "cpu", "--served-model-name", "tiny"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                         start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in p.stdout], daemon=True).start()
    errs: list[str] = []
    reader = threading.Thread(target=lambda: errs.extend(p.stderr), daemon=True)
    reader.start()
    try:
        url = None
        while url is None:
            line = lines.get(timeout=TIMEOUT)  # queue.Empty past the bound
            m = re.search(r"ready at (http://\S+)/v1", line)
            url = m and m.group(1)
        r = httpx.post(url + "/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want[:-1]  # generate adds a newline
        p.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks
        p.wait(60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
    reader.join(10)  # the rest of stderr, up to its end
    log = "".join(errs)
    assert "tensor parallel rank 1/2 holds" in log and "tensor parallel rank 0/2 holds" in log
    assert _processes_naming(str(chat)) == []


def test_launch_env_reads_torchrun_variables(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert launch_env() is None
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    env = launch_env()
    assert (env.rank, env.world, env.local_rank) == (3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match=r"RANK=4 is outside WORLD_SIZE=4"):
        launch_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match=r"RANK, WORLD_SIZE and LOCAL_RANK must be integers"):
        launch_env()


def test_backend_choice():
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert choose_backend("gloo", "cpu", 4) == ("gloo", "cpu")
    assert choose_backend("gloo", None, 2) == ("gloo", "cpu")
    with pytest.raises(ValueError, match=r"'nccl' needs CUDA tensors, but the device is the CPU"):
        choose_backend("nccl", "cpu", 2)
    with pytest.raises(ValueError, match=r"distributed_backend must be one of gloo, nccl or None, got 'mpi'"):
        choose_backend("mpi", None, 2)
    with pytest.raises(ValueError, match=rf"'nccl' needs a CUDA device for every rank: {gpus + 1} ranks, "
                                         rf"{gpus} CUDA device\(s\) here"):
        choose_backend("nccl", None, gpus + 1)
    if gpus:  # the device decides: CUDA is nccl, rank r on cuda:r (cuda:LOCAL_RANK under torchrun)
        assert choose_backend(None, None, 1) == ("nccl", "cuda:0")
        assert choose_backend(None, "cuda", 1, local_rank=gpus - 1) == ("nccl", f"cuda:{gpus - 1}")
    else:
        assert choose_backend(None, None, 2) == ("gloo", "cpu")


def test_nccl_on_the_cpu_is_refused_before_any_process_starts(chat):
    from genfuse.runtime.engine import Engine

    with pytest.raises(ValueError, match=r"'nccl' needs CUDA tensors, but the device is the CPU"):
        Engine(str(chat), device="cpu", backend="torch", tensor_parallel_size=2, distributed_backend="nccl")
    assert multiprocessing.active_children() == []
    with pytest.raises(ValueError, match=r"distributed_backend must be 'gloo', 'nccl' or None, got 'mpi'"):
        Engine(str(chat), tensor_parallel_size=2, distributed_backend="mpi")
    rc, _, err = _run([sys.executable, "-m", "genfuse", "generate", "--model", str(chat), "--max-tokens", "2",
                       "--backend", "torch", "--device", "cpu", "--tensor-parallel-size", "2",
                       "--distributed-backend", "nccl", "Hi"])
    assert rc == 1 and err.strip().splitlines() == [
        "genfuse generate: error: distributed_backend='nccl' needs CUDA tensors, but the device is the CPU; "
        "use distributed_backend='gloo' (or a CUDA device)"], err
