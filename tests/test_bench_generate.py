"""`genfuse bench generate`: help, no-GPU behaviour, the random-weight models and the byte counts.

The GPU part times random-weight models at real shapes; here it runs at a tiny shape on CPU:
the genfuse `LLM` loaded from the folder transformers wrote must give transformers' greedy
tokens, and the batch-1 floor's byte count must match the parameters transformers builds.
"""
import json

import pytest
import torch
from genfuse.bench import generate_bench as gb
from genfuse.runtime.sampling import SamplingParams

from genfuse.cli import main as cli_main

TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "rope_theta": 10000.0, "tie_word_embeddings": False}


def test_help_names_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "generate", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--only", "--model", "--shapes", "--batches", "--prompt-tokens", "--no-compile", "--json"):
        assert flag in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CUDA-less behaviour")
def test_shapes_without_gpu_says_so_and_exits_2(capsys):
    assert cli_main(["bench", "generate", "--only", "shapes"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert cli_main(["bench", "generate", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [(["--only", "model,nope"], "nope"), (["--shapes", "llama-9"], "llama-9"),
                                           (["--batches", "1,0"], "--batches"), (["--tokens", "1"], "--tokens")])
def test_bad_arguments_exit_2(argv, message, capsys):
    assert gb.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", [*gb.SHAPES, "tiny-tied", "tiny-untied"])
def test_floor_bytes_count_the_weights_transformers_builds(name):
    shape = gb.SHAPES.get(name) or {**TINY, "tie_word_embeddings": name == "tiny-tied"}
    model = gb.random_hf_model(shape, torch.bfloat16, "meta")  # shapes only: no memory, no time
    params = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    if not shape["tie_word_embeddings"]:
        params -= shape["vocab_size"] * shape["hidden_size"]  # the embedding table: one row read
    b = gb.decode_bytes(shape, 2, context=100)
    assert b["weight_params"] == params and b["weight_bytes"] == 2 * params
    kv, d = shape["num_key_value_heads"], shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
    assert b["kv_bytes"] == 2 * shape["num_hidden_layers"] * kv * d * 100 * 2
    known = {"smollm2-135m": 134.5e6, "llama-3.2-1b": 1.236e9, "llama-3-8b": 7.50e9}  # public sizes, read parts
    if name in known:
        assert params == pytest.approx(known[name], rel=0.01)


def test_random_weight_pair_generates_transformers_tokens(tmp_path):
    hf, llm = gb.random_weight_pair({**TINY, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                              "original_max_position_embeddings": 32}},
                                    torch.float32, "cpu", tmp_path / "tiny")
    assert (tmp_path / "tiny" / "config.json").is_file() and llm.config.rope_scaling["rope_type"] == "llama3"
    prompts = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    want = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=6, min_new_tokens=6,
                       do_sample=False)[:, 11:].tolist()
    got = [c.token_ids for c in llm.generate(prompts.tolist(), SamplingParams(max_tokens=6, temperature=0,
                                                                                    ignore_eos=True))]
    assert got == want


def test_bench_shape_on_cpu_reports_latencies_and_the_floor(tmp_path):
    r = gb.bench_shape("tiny", TINY, dtype=torch.float32, device="cpu", batches=[1, 3], prompt_tokens=9, tokens=3,
                       repeats=1, copy_GBps=10.0, compile=True, workdir=str(tmp_path), backend="torch")
    assert list(tmp_path.iterdir()) == []  # the random-weight folder is removed once loaded
    assert [b["batch"] for b in r["batches"]] == [1, 3]
    for b in r["batches"]:
        assert set(b["timings"]) == {gb.GENFUSE, gb.HF_EAGER, gb.HF_STATIC}  # static: compiled on CUDA only
        for t in b["timings"].values():
            assert t["ttft_ms"] > 0 and t["tokens_per_s"] > 0 and t["total_ms_min"] <= t["total_ms"]
        assert b["token_agreement_vs_eager"] == 1.0  # fp32, same weights: same greedy tokens
        assert set(b["speedup_tokens_per_s"]) == {gb.HF_EAGER, gb.HF_STATIC}
    f = r["batch1_floor"]
    assert f["ms"] == pytest.approx((f["weight_bytes"] + f["kv_bytes"]) / 10e9 * 1e3)
    assert f["frac_of_floor"] == pytest.approx(f["ms"] / r["batches"][0]["timings"][gb.GENFUSE]["itl_ms"])


def test_a_failing_implementation_is_reported_not_fatal():
    def broken(n):
        raise RuntimeError("compile failed\nlong trace")

    timings, outputs = gb.time_generate({"ok": lambda n: [[0] * n], "broken": broken}, batch=1, tokens=4,
                                        repeats=2, sync=lambda: None)
    assert timings["broken"] == {"error": "RuntimeError: compile failed"} and "broken" not in outputs
    assert timings["ok"]["tokens_per_s"] > 0 and outputs["ok"] == [[0, 0, 0, 0]]
    with pytest.raises(ValueError, match="at least 2"):
        gb.time_generate({"ok": lambda n: [[0] * n]}, batch=1, tokens=1, repeats=1, sync=lambda: None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU run (the shapes part is skipped)")
def test_cpu_run_compares_a_model_folder_and_skips_the_shapes(tmp_path, capsys):
    folder = tmp_path / "tiny"
    gb.random_hf_model(TINY, torch.float32, "cpu").save_pretrained(folder)
    out = tmp_path / "r.json"
    assert cli_main(["bench", "generate", "--model", str(folder), "--tokens", "4", "--repeats", "1",
                     "--prefill-tokens", "40", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "prefill of 40 tokens: genfuse" in captured.out
    assert "shapes part skipped: needs a CUDA GPU" in captured.err
    assert "same tokens as transformers: genfuse: True" in captured.out
    assert "llama.cpp not measured: the model is not a .gguf file" in captured.out
    report = json.loads(out.read_text())
    m = report["model"]
    assert m["same_tokens"] and m["new_tokens"] == 4 and m["device"] == "cpu"
    assert m["genfuse"]["tokens_per_s_median"] > 0 and m["speedup"] > 0
    row = m["by_threads"][0]
    assert row["genfuse"]["decode_tokens_per_s"]["n"] == 1 and "llama.cpp" not in row
    pf = row["prefill"]
    assert pf["prompt_tokens"] == 40 and pf["genfuse"]["ttft_s"]["n"] == 1 and pf["genfuse_vs_transformers"] > 0
    assert m["cpu_path"] and "model" in m["cpu"]
    assert "needs a CUDA GPU" in report["shapes"]["skipped"]
    assert report["device"]["cuda_available"] is False


def test_llama_python_that_lacks_llama_cpp_is_reported(tmp_path):
    py, note = gb.find_llama_python(str(tmp_path / "no-such-python"))
    if py is None:  # this environment has no llama_cpp either
        assert "llama.cpp not measured" in note and "--llama-python" in note
    else:
        assert "llama-cpp-python" in note
