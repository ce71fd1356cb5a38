"""python -m genfuse.bench.tp_bench: random weights at a shape through the engine, and the sizings
and devices it refuses before starting anything."""
from __future__ import annotations

import json
import tempfile
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "runtime"))
from llm_helpers import TINY_LLAMA_SHAPE  # noqa: E402

from genfuse.bench import tp_bench  # noqa: E402


def test_tp_bench_decodes_random_weights_at_a_shape(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(tp_bench.SHAPES, "tiny", TINY_LLAMA_SHAPE)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the checkpoint goes
    out = tmp_path / "tp.json"
    assert tp_bench.main(["--shape", "tiny", "--worlds", "1", "--tokens", "4", "--repeats", "1",
                          "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["model"] == "tiny" and r["device"] == "cpu" and r["dtype"] == "float32"
    assert r["decode"]["1"]["tokens_per_s_median"] > 0 and len(r["decode"]["1"]["runs"]) == 1
    assert not list(tmp_path.glob("genfuse_bench_*"))  # the checkpoint folder is gone
    assert "N=1: decode" in capsys.readouterr().out


def test_tp_bench_refuses_what_cannot_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(tp_bench.SHAPES, "tiny", TINY_LLAMA_SHAPE)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the checkpoint goes
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert tp_bench.main(["--device", "cuda", "--worlds", "1,2"]) == 2
    assert "N=2 needs 2 CUDA devices, one a rank; this machine has 1" in capsys.readouterr().err
    assert tp_bench.main(["--shape", "tiny", "--worlds", "3"]) == 2  # 4 query heads do not split 3 ways
    assert "tp_bench:" in capsys.readouterr().err
    assert not list(tmp_path.glob("genfuse_bench_*"))
    assert tp_bench.main(["--shape", "tiny", "--model", "x"]) == 2
    assert "--shape and --model name two models" in capsys.readouterr().err
    assert tp_bench.main(["--worlds", "1,two"]) == 2
    assert "--worlds takes comma-separated integers" in capsys.readouterr().err
