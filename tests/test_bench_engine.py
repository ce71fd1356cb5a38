"""`genfuse bench engine` end to end on a tiny model: every part runs and reports its numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "runtime"))
from llm_helpers import TINY_LLAMA_SHAPE, tiny_chat_folder  # noqa: E402

from genfuse.cli import main as cli_main  # noqa: E402


def test_engine_bench_reports_every_part(tmp_path):
    folder = tiny_chat_folder(tmp_path / "tiny")
    out = tmp_path / "engine.json"
    # the CPU runtime's own path (torch ops), not the Triton interpreter the suite's conftest sets
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "genfuse", "bench", "engine", "--model", str(folder), "--num-requests", "6",
         "--prompt-tokens", "4:24", "--output-tokens", "2:6", "--prefix-requests", "3", "--prefix-tokens", "40",
         "--overhead-seqs", "4", "--modes", "engine,one_at_a_time", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "engine / one at a time" in proc.stdout and "static batch" not in proc.stdout
    r = json.loads(out.read_text())
    t = r["throughput"]
    assert set(t) >= {"engine", "one_at_a_time", "engine_vs_one_at_a_time"} and "static_batch" not in t
    # every request's own tokens are counted, no more
    assert t["engine"]["tokens"] == t["one_at_a_time"]["tokens"] == t["output_tokens"]
    for mode in ("engine", "one_at_a_time"):  # the prompts ran in steps of their own kind
        steps = t[mode]["steps"]
        assert steps["with_prompt"]["steps"] > 0 and steps["decode_only"]["steps"] > 0
        assert steps["decode_only"]["tokens"] < t["output_tokens"]  # each request's first token comes with its prompt
        assert 0 < steps["decode_only"]["seconds"] + steps["with_prompt"]["seconds"] <= t[mode]["seconds"]
    assert r["prefix"]["caching_on"]["cached_prompt_tokens"] > 0 == r["prefix"]["caching_off"]["cached_prompt_tokens"]
    assert 0 < r["overhead"]["host_fraction_median"] < 1


def test_engine_bench_refuses_an_unknown_mode_before_loading():
    with pytest.raises(SystemExit, match="unknown --modes fast"):
        cli_main(["bench", "engine", "--model", "/no/such/model", "--modes", "engine,fast"])


def test_engine_bench_runs_random_weights_at_a_shape(tmp_path, monkeypatch, capsys):
    """--shape: a transformers Llama with random weights at the shape, saved and loaded back as a
    checkpoint (the folder removed after), in --dtype; the JSON names the shape and the graphs
    setting (bench/gpu_summary.py reads both)."""
    from genfuse.bench import engine_bench

    monkeypatch.setitem(engine_bench.SHAPES, "tiny", TINY_LLAMA_SHAPE)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the checkpoint goes
    out = tmp_path / "engine.json"
    assert engine_bench.main(["--shape", "tiny", "--dtype", "bf16", "--device", "cpu", "--only", "throughput,overhead",
                              "--num-requests", "3", "--prompt-tokens", "4:12", "--output-tokens", "2:4",
                              "--overhead-seqs", "2", "--modes", "engine,one_at_a_time", "--cuda-graphs", "off",
                              "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["benchmark"] == "engine" and r["model"] == "tiny"
    assert r["machine"]["dtype"] == "torch.bfloat16" and r["machine"]["cuda_graphs"] == "off"
    assert r["throughput"]["engine"]["tokens"] == r["throughput"]["output_tokens"]
    assert not list(tmp_path.glob("genfuse_bench_*"))  # the checkpoint folder is gone
    assert "random weights" in capsys.readouterr().err


def test_engine_bench_refuses_a_shape_and_a_model(capsys):
    from genfuse.bench import engine_bench

    assert engine_bench.main(["--shape", "smollm2-135m", "--model", "/some/folder"]) == 2
    assert "--shape and --model name two models" in capsys.readouterr().err
