"""The `genfuse` command line: help, info, and the benchmark's behaviour without a GPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

from genfuse.cli import main


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "genfuse", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("info", "bench"):
        assert command in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: genfuse" in capsys.readouterr().out


def test_info_reports_versions_backend_and_gpu(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    import triton

    assert torch.__version__ in out and triton.__version__ in out
    assert "genfuse._C 0.1.0" in out
    assert "backend" in out and "gpu" in out


def test_info_json_is_machine_readable(capsys):
    assert main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["torch"] == torch.__version__
    assert facts["extension"]["version"] == "0.1.0"
    if not torch.cuda.is_available():
        assert "error" in facts["gpu"]  # NVML finds no GPU here and says so
    kv = facts["kv_cache_cpu"]  # the default pool: SmolLM2 (in the test install) at 46080 B a float32 token
    assert kv["kv_cache_memory"] == 1 << 30 and kv["bytes_per_token"] == 46080
    assert kv["tokens"] == 23296 and kv["tokens_float16"] == 46592


def test_info_backend_line_follows_the_environment():
    plain = run_cli("info", "--json", env={"TRITON_INTERPRET": "0"})
    interp = run_cli("info", "--json", env={"TRITON_INTERPRET": "1"})
    assert plain.returncode == 0 and interp.returncode == 0, plain.stderr + interp.stderr
    if not torch.cuda.is_available():
        assert "torch reference" in json.loads(plain.stdout)["backend"]
        assert "interpreter" in json.loads(interp.stdout)["backend"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU (CUDA-less) behaviour")
def test_bench_kernels_without_gpu_says_so_and_fails():
    res = run_cli("bench", "kernels")
    assert res.returncode == 2
    assert "needs a CUDA GPU" in res.stderr


def test_bench_rejects_unknown_family(capsys):
    assert main(["bench", "kernels", "--only", "attention,nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_bench_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "kernels", "--help"])
    assert exc.value.code == 0
    assert "--only" in capsys.readouterr().out
