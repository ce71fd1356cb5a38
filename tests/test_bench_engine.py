"""`genfuse bench engine` end to end on a tiny model: every part runs and reports its numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "runtime"))
from llm_helpers import tiny_chat_folder  # noqa: E402

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
    assert r["prefix"]["caching_on"]["cached_prompt_tokens"] > 0 == r["prefix"]["caching_off"]["cached_prompt_tokens"]
    assert 0 < r["overhead"]["host_fraction_median"] < 1


def test_engine_bench_refuses_an_unknown_mode_before_loading():
    with pytest.raises(SystemExit, match="unknown --modes fast"):
        cli_main(["bench", "engine", "--model", "/no/such/model", "--modes", "engine,fast"])
