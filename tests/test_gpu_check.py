"""The GPU check without a GPU: bench/gpu_check.sh end to end as a dry run, its phase runner
(budget, timeouts, failures), the merge into results.json / summary.md (bench/gpu_summary.py)
on results shaped like the benchmarks' own, the pytest sampling plugin (bench/gpu_pytest.py),
and the quick autotune mode (GENFUSE_AUTOTUNE=quick) of every autotuned kernel."""
import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest
import torch
import triton

from genfuse.bench import attention_bench, decode_attention_bench, gpu_pytest, gpu_summary, linear_bench
from genfuse.bench import kernels as bench_kernels
from genfuse.bench import norm_bench
from genfuse.kernels import _attention as attention
from genfuse.kernels import _common
from genfuse.kernels import _conv2d as conv2d
from genfuse.kernels import _conv_transpose2d as conv_transpose2d
from genfuse.kernels import _decode_attention as decode_attention
from genfuse.kernels import _group_norm as group_norm
from genfuse.kernels import _linear as linear

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_check.sh")
SUMMARY = os.path.join(REPO, "bench", "gpu_summary.py")
EXPECTED_FILES = {"results.json", "summary.md", "gpu_check.log", "raw.tar.gz"}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENFUSE_")}
    env.update(PYTHON=sys.executable, **extra)
    return env


def _dry_run(tmp_path, *args, **extra):
    out = tmp_path / "out"
    t0 = time.time()
    proc = subprocess.run(["bash", SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=_env(GENFUSE_GPU_CHECK_DRY="1", OUT=str(out), **extra))
    return proc, out, time.time() - t0


# --------------------------------------------------------------------------------------
# The script
# --------------------------------------------------------------------------------------
def test_dry_run_end_to_end(tmp_path):
    proc, out, seconds = _dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert seconds < 60
    # flat and few: the device returns at most 8 files, two folders deep
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    results = json.loads((out / "results.json").read_text())
    phases = [p["phase"] for p in results["phases"]]
    assert phases == ["install", "tests-kernels", "tests-runtime", "headline-kernels", "headline-decode",
                      "headline-dcgan", "headline-engine", "sweep-vae", "sweep-kernels", "sweep-tests", "sweep-images"]
    assert all(p["status"] == "skipped" and "dry run" in p["note"] for p in results["phases"])
    assert results["check"]["dry"] and results["check"]["autotune"] == "quick"
    rows = results["targets"]
    assert len(rows) == 21 and all(r["status"] == "not run" and "dry run" in r["note"] for r in rows)
    summary = (out / "summary.md").read_text()
    assert "dry run" in summary.splitlines()[0]
    assert summary.count("| not run |") == 21
    for area in ("attention fwd", "linear", "decode attention", "norm", "batch-1 decode", "serving engine",
                 "DCGAN faces", "VAE decode"):
        assert f"| {area} |" in summary
    log = (out / "gpu_check.log").read_text()
    assert log.count("skipped (dry run, no CUDA)") == len(phases)
    assert "pip install" not in log  # the install is not run dry
    with tarfile.open(out / "raw.tar.gz") as tar:
        assert "./phases.jsonl" in tar.getnames()
    assert summary in proc.stdout  # the device reply carries the end of stdout: the table


def test_too_little_budget_skips_phases_with_a_message(tmp_path):
    # 25 s budget, 10 s kept for the merge: the install (needs 10 s) fits, the tests (30 s) do not
    proc, out, _ = _dry_run(tmp_path, GENFUSE_GPU_CHECK_BUDGET="25")
    assert proc.returncode == 0, proc.stderr
    phases = json.loads((out / "results.json").read_text())["phases"]
    assert phases[0]["phase"] == "install" and "dry run" in phases[0]["note"]
    assert all("too little time" in p["note"] for p in phases[1:])
    assert re.search(r"tests-kernels: skipped, 1\d s of the 25 s budget left \(needs at least 30 s\)", proc.stdout)


def test_named_phases_and_bad_arguments(tmp_path):
    proc, out, _ = _dry_run(tmp_path, "generate", "llama-3.2-1b")
    assert proc.returncode == 0, proc.stderr
    assert [p["phase"] for p in json.loads((out / "results.json").read_text())["phases"]] == \
        ["install", "generate-llama-3.2-1b"]
    proc, out, _ = _dry_run(tmp_path, "engine")
    assert proc.returncode == 0, proc.stderr
    assert [p["phase"] for p in json.loads((out / "results.json").read_text())["phases"]] == \
        ["install", "engine-llama-3.2-1b-graphs-on", "engine-llama-3.2-1b-graphs-off"]
    proc, out, _ = _dry_run(tmp_path, "tp")
    assert proc.returncode == 0, proc.stderr
    assert [p["phase"] for p in json.loads((out / "results.json").read_text())["phases"]] == ["install", "tp-llama-3-8b"]
    assert "tp: 0 GPU(s) here, so N = 1" in proc.stdout
    proc, _, _ = _dry_run(tmp_path, "generate")
    assert proc.returncode == 2 and "needs a shape" in proc.stderr
    proc, _, _ = _dry_run(tmp_path, "bogus")
    assert proc.returncode == 2 and "unknown phase bogus" in proc.stderr


def test_phase_runner_records_timeouts_failures_and_files(tmp_path):
    """run_phase (sourced, not run): a phase past its slice is killed and recorded as timed out,
    a failing one as failed (the check then exits 1), a pytest phase goes through the plugin,
    and each phase's files are merged at once."""
    out, work, suite = tmp_path / "out", tmp_path / "work", tmp_path / "suite"
    for d in (out, work, suite):
        d.mkdir()
    (suite / "pytest.ini").write_text("[pytest]\n")
    (suite / "test_one.py").write_text("import pytest\n\n\n@pytest.mark.parametrize('i', range(4))\n"
                                       "def test_i(i):\n    assert i < 3\n")
    (tmp_path / "good.json").write_text('{"benchmark": "images", "results": []}')
    script = textwrap.dedent(f"""
        source {SCRIPT}
        OUT={out}; WORK={work}; LOG={out}/gpu_check.log; BUDGET=100; START=$(date +%s)
        export_for_phases
        run_phase slow 2 1 -- sleep 30
        run_phase bad 10 1 -- false
        run_phase good 10 1 -- cp {tmp_path}/good.json {work}/good.json
        run_phase tests 60 1 -- pytest_phase tests 2 {suite}/test_one.py
        echo "FAILED=$FAILED"
    """)
    t0 = time.time()
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=_env())
    assert proc.returncode == 0, proc.stderr
    assert time.time() - t0 < 60  # the sleep was cut at its 2 s slice
    assert "FAILED=1" in proc.stdout
    phases = {p["phase"]: p for p in gpu_summary.read_jsonl(str(work / "phases.jsonl"))}
    assert phases["slow"]["status"] == "timed out" and phases["slow"]["rc"] == 124
    assert phases["bad"]["status"] == "failed" and phases["bad"]["rc"] == 1
    assert phases["good"]["status"] == "ok"
    assert phases["tests"]["status"] == "failed", proc.stdout  # test_i[3]
    results = json.loads((out / "results.json").read_text())
    assert "good" in results["outputs"]
    t = results["tests"]["tests"]  # sampled by the plugin: the first and the last case
    assert (t["collected"], t["sampled_out"], t["passed"], t["failed"]) == (2, 2, 1, 1)
    summary = (out / "summary.md").read_text()
    assert "| slow | timed out |" in summary and "| bad | failed |" in summary
    assert "test_one.py::test_i[3]` (tests, failed): assert 3 < 3" in summary


# --------------------------------------------------------------------------------------
# The merge: targets judged on results shaped like the benchmarks' JSON
# --------------------------------------------------------------------------------------
def _kres(kernel, speedup, frac=0.5, agrees=True, flops=0.0, **meta):
    rate = {"TFLOPs": 400.0} if flops else {"GBps": 2000.0}
    return {"kernel": kernel, "case": f"{kernel} {meta}", "flops": flops, "rel_err_vs_baseline": 1e-3,
            "agrees_with_baseline": agrees, **meta,
            "timings": {"genfuse": {"ms": 1.0, "frac_ceiling": frac, **rate},
                        **{n: {"ms": s, "frac_ceiling": frac / s, **rate} for n, s in speedup.items()}},
            "speedup": speedup}


def _write(path, payload):
    path.write_text(json.dumps(payload))


def test_merge_judges_each_target(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    att = dict(B=4, Hq=16, Hkv=16, T=4096, S=4096)
    kernels_json = {
        "device": {"torch_device_name": "NVIDIA H200", "torch": "2.11", "triton": "3.6.0", "cuda_runtime": "13.0",
                   "nvml": {}},
        "ceilings": {"copy_GBps": 4000.0, "bf16_matmul_TFLOPs": 790.0},
        "results": [
            _kres("attention", {"sdpa_flash": 1.1, "sdpa": 0.95}, flops=1, D=64, causal=False, **att),  # short
            _kres("attention", {"sdpa_flash": 1.3, "sdpa": 1.02}, flops=1, D=64, causal=True, **att),   # pass
            _kres("attention", {"sdpa": 1.5}, agrees=False, flops=1, D=128, causal=False, **att),      # mismatch
            _kres("linear", {"torch.matmul": 0.93, "F.linear": 0.91}, flops=1, M=4096, N=4096, K=4096,
                  epilogue="none"),
            _kres("linear", {"torch unfused": 1.1}, flops=1, M=4096, N=4096, K=4096,
                  epilogue="bias+gelu_tanh+residual"),
            _kres("decode_attention", {"sdpa_contiguous": 2.0}, frac=0.75, B=8, seq_len=8192, block_size=16, Tq=1),
            _kres("norm", {"torch": 1.5}, frac=0.5, op="rms_norm", M=4096, N=4096),
        ],
        "failed": [{"kernel": "linear", "case": "decode M1 N4096 K4096", "error": "CompilationError: boom"}],
    }
    _write(work / "headline-kernels.json", kernels_json)
    generate = {"benchmark": "generate", "shapes": [{
        "shape": "llama-3.2-1b", "batch1_floor": {"ms": 0.82, "copy_GBps": 4000.0},
        "batches": [{"batch": 1, "timings": {"genfuse": {"itl_ms": 1.0, "tokens_per_s": 900.0},
                                             "transformers eager": {"itl_ms": 4.0, "tokens_per_s": 225.0}},
                     "speedup_tokens_per_s": {"transformers eager": 4.0}, "token_agreement_vs_eager": 0.5}]}]}
    _write(work / "headline-decode.json", generate)
    images = {"benchmark": "images", "smoke": False, "results": [{
        "model": "dcgan-faces", "batch": 256, "agrees": True,
        "impls": {"genfuse": {"ms": 0.2, "images_per_s": 1.28e6, "rel_err": 1e-3, "agrees": True},
                  "torch eager (best)": {"ms": 0.5, "variant": "torch eager channels-last"}},
        "speedup": {"torch eager (best)": 2.5}}]}
    _write(work / "headline-dcgan.json", images)
    engine = {"benchmark": "engine", "model": "llama-3.2-1b", "machine": {"cuda_graphs": "auto"},
              "throughput": {"engine": {"tokens_per_s": 5000.0}, "one_at_a_time": {"tokens_per_s": 2000.0},
                             "engine_vs_one_at_a_time": 2.5},
              "overhead": {"host_fraction_median": 0.08, "step_median_s": 0.004}}  # no prefix part
    _write(work / "headline-engine.json", engine)
    (work / "tests-kernels.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"event": "collected", "count": 5, "sampled_out": 7},
        {"event": "result", "nodeid": "tests/kernels/test_a.py::test_x[1]", "outcome": "passed"},
        {"event": "result", "nodeid": "tests/kernels/test_a.py::test_x[2]", "outcome": "failed",
         "message": "AssertionError: rel err 0.5"},
        {"event": "result", "nodeid": "tests/kernels/test_a.py::test_y", "outcome": "skipped"},
    ]) + '\n{"event": "result", "nodeid": "cut off mid-li')  # the kill came while writing
    for phase, status, note in (("headline-kernels", "ok", ""), ("sweep-vae", "timed out", "stopped after 60 s")):
        assert gpu_summary.main(["record", str(work), phase, status, "--rc", "0", "--note", note]) == 0
    assert gpu_summary.main(["merge", str(work), str(out), "--budget", "480", "--start", str(time.time())]) == 0

    rows = {(r["area"], r["case"]): r for r in json.loads((out / "results.json").read_text())["targets"]}
    assert rows[("attention fwd", "B4 H16 T4096 D64")]["status"] == "short"
    assert rows[("attention fwd", "B4 H16 T4096 D64")]["ratio"] == "0.95x vs sdpa"   # the faster SDPA
    assert rows[("attention fwd", "B4 H16 T4096 D64 causal")]["status"] == "pass"
    assert rows[("attention fwd", "B4 H16 T4096 D128")]["status"] == "MISMATCH"
    assert rows[("attention fwd", "B4 H16 T4096 D128 causal")]["status"] == "not run"
    assert rows[("linear", "M4096 N4096 K4096")]["status"] == "pass"  # 0.91x cuBLAS >= 0.9
    assert rows[("linear", "M4096 N4096 K4096 +bias gelu_tanh +res")]["status"] == "short"  # < 1.2x
    assert "CompilationError: boom" in rows[("linear", "decode M1 N4096 K4096")]["note"]
    assert rows[("decode attention", "B8 ctx 8k page 16")]["status"] == "pass"
    assert rows[("decode attention", "B8 ctx 8k page 16")]["ratio"] == "75 % of 4000 GB/s"
    assert rows[("norm", "rms_norm M4096 N4096")]["status"] == "short"
    floor = rows[("batch-1 decode", "llama-3.2-1b bf16 vs floor")]
    assert floor["status"] == "pass" and floor["ratio"].startswith("1.22x floor")
    assert rows[("batch-1 decode", "llama-3.2-1b bf16 vs transformers")]["status"] == "short"
    assert rows[("DCGAN faces", "batch 256")]["status"] == "pass"
    eng = rows[("serving engine", "llama-3.2-1b bf16: engine / one at a time")]
    assert eng["status"] == "pass" and eng["ratio"] == "2.50x" and eng["measured"] == "5000 / 2000 tokens/s"
    over = rows[("serving engine", "llama-3.2-1b bf16: host time of a 64-sequence step")]
    assert over["status"] == "short" and over["measured"] == "8.00% of 4.0 ms"
    assert rows[("serving engine", "llama-3.2-1b bf16: prefix caching TTFT off / on")]["status"] == "not run"
    vae = rows[("VAE decode", "SD 1.5, 64x64 -> 512x512")]
    assert vae["status"] == "not run" and vae["note"] == "sweep-vae timed out: stopped after 60 s"

    summary = (out / "summary.md").read_text()
    assert "NVIDIA H200" in summary and "copy GBps 4000" in summary
    assert "| tests-kernels | 5 | 1 | 1 | 0 | 1 | 0 | 2 | 7 | FAIL |" in summary  # 2 not reached
    assert "`tests/kernels/test_a.py::test_x[2]` (tests-kernels, failed): AssertionError: rel err 0.5" in summary


def test_summary_headline_cases_are_the_benchmarks():
    """gpu_summary looks up exactly the cases the benchmarks' headline size builds."""
    assert gpu_summary.ATTENTION == [(b, hq, t, d, c) for b, hq, hkv, t, d, c in attention_bench.HEADLINE
                                     if hq == hkv]
    assert len(gpu_summary.ATTENTION) == len(attention_bench.HEADLINE)
    assert gpu_summary.LINEAR_LARGE == linear_bench.HEADLINE_LARGE
    assert gpu_summary.LINEAR_DECODE == linear_bench.HEADLINE_DECODE
    assert gpu_summary.DECODE_CONTEXTS == decode_attention_bench.HEADLINE
    assert gpu_summary.NORM_SHAPES == norm_bench.HEADLINE_SHAPES
    assert set(bench_kernels.HEADLINE_FAMILIES) == {"attention", "linear", "decode_attention", "norm"}


def test_linear_headline_cases_carry_the_meta_the_summary_matches():
    cases = linear_bench.cases("cpu", torch.bfloat16, "headline")  # bf16 on CPU: only built, not run
    payload = {"headline-kernels": {"results": [dict(c.meta, kernel=c.kernel) for c in cases]}}
    for m, n, k in gpu_summary.LINEAR_LARGE + gpu_summary.LINEAR_DECODE:
        for epilogue in ("none", "bias+gelu_tanh+residual"):
            assert gpu_summary.find_kernel(payload, "linear", M=m, N=n, K=k, epilogue=epilogue)[1] is not None
    assert not any("torch.compile" in c.baselines for c in cases)


def test_headline_size_errors():
    with pytest.raises(ValueError, match="size must be"):
        attention_bench.cases("cpu", torch.float32, "huge")
    with pytest.raises(ValueError, match="size must be"):
        norm_bench.cases("cpu", torch.float32, "huge")
    assert bench_kernels.main(["--size", "headline", "--only", "rotary"]) == 2


# --------------------------------------------------------------------------------------
# The pytest plugin
# --------------------------------------------------------------------------------------
def test_pytest_plugin_samples_and_logs_as_it_goes(tmp_path):
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("i", range(5))
        def test_a(i):
            assert i != 4, "four is out"

        @pytest.mark.parametrize("i", [pytest.param(j, marks=pytest.mark.gpu) for j in range(3)] + [10, 11])
        def test_b(i):
            pass

        def test_skip():
            pytest.skip("not here")
    """))
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: a GPU test\n")

    def run(*args):
        log = tmp_path / f"log{len(args)}.jsonl"
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "genfuse.bench.gpu_pytest",
                               "-p", "no:cacheprovider", "--gpu-check-log", str(log), *args, "test_sample.py"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        return proc, gpu_summary.pytest_summary(gpu_summary.read_jsonl(str(log)))

    proc, s = run("--gpu-check-sample", "2")
    assert proc.returncode == 1, proc.stdout  # test_a[4] fails
    # test_a: first and last of 5; test_b: 2 of the gpu-marked, 2 of the rest; test_skip
    assert (s["collected"], s["sampled_out"]) == (7, 4)
    assert (s["passed"], s["failed"], s["skipped"], s["not_reached"]) == (5, 1, 1, 0)
    assert s["finished"] and s["exitstatus"] == 1
    assert s["failures"] == [{"nodeid": "test_sample.py::test_a[4]", "outcome": "failed",
                              "message": "AssertionError: four is out"}]
    proc, s = run("-m", "gpu", "--gpu-check-sample", "1")  # -m deselects first, then the sample
    assert proc.returncode == 0 and (s["collected"], s["passed"]) == (1, 1)


def test_spread():
    assert gpu_pytest.spread(list(range(5)), 2) == [0, 4]
    assert gpu_pytest.spread(list(range(5)), 3) == [0, 2, 4]
    assert gpu_pytest.spread([1, 2], 5) == [1, 2]
    assert gpu_pytest.spread(list(range(5)), 1) == [0]


# --------------------------------------------------------------------------------------
# Quick autotune (GENFUSE_AUTOTUNE=quick)
# --------------------------------------------------------------------------------------
def test_autotune_mode_is_read_from_the_environment_at_import():
    code = textwrap.dedent("""
        import importlib, os
        from genfuse.kernels import _common
        print(_common.AUTOTUNE)
        os.environ["GENFUSE_AUTOTUNE"] = "fastest"
        try:
            importlib.reload(_common)
        except ValueError as e:
            print(e)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=_env(GENFUSE_AUTOTUNE="Quick"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["quick", "GENFUSE_AUTOTUNE must be one of full, quick, got 'fastest'"]
    assert _common._autotune_mode(None) == _common._autotune_mode("") == "full"
    with pytest.raises(ValueError, match="GENFUSE_AUTOTUNE"):
        _common._autotune_mode("slow")


def _keys(configs):
    return [_common.config_key(c) for c in configs]


def _cpu(dtype):
    return torch.empty(0, dtype=dtype)


# (kernel, full config list, pruning rule, named args, keyword args, the quick list for them)
def _problems():
    out = []
    for dt in (torch.float16, torch.float32):
        e = _cpu(dt).element_size()
        for d in (32, 64, 128, 256):
            for t in (32, 4096):
                out.append((f"attention {dt} D{d} T{t}", attention._configs(), attention._prune_configs,
                            {"q_ptr": _cpu(dt), "T": t}, {"BLOCK_D": d}, attention._quick_configs(e, d)))
        out.append((f"attention {dt} D512", attention._split_configs(), attention._prune_configs,
                    {"q_ptr": _cpu(dt), "T": 4096}, {"BLOCK_D": 512}, attention._quick_configs(e, 512)))
        for m_bucket, n in ((32, 4096), (128, 4096), (4096, 4096), (8192, 14336), (4096, 48)):
            out.append((f"linear {dt} M{m_bucket} N{n}", linear._gemm_configs(), linear._prune_gemm,
                        {"x_ptr": _cpu(dt), "M_BUCKET": m_bucket, "N": n}, {}, linear._quick_gemm(e)))
        for n, k in ((4096, 4096), (512, 2048), (14336, 4096), (40, 72)):
            out.append((f"linear decode {dt} N{n} K{k}", linear._small_m_configs(), linear._prune_small_m,
                        {"x_ptr": _cpu(dt), "N": n, "K": k}, {}, linear._quick_small_m(e)))
        for d in (64, 128, 256):
            out.append((f"decode_attention {dt} D{d}", decode_attention._configs(), decode_attention._prune,
                        {"Q": _cpu(dt)}, {"BLOCK_D": d}, decode_attention._quick_configs(e, d)))
        for n, c, k, hw in ((1, 512, 512, 64), (1, 128, 3, 512), (1, 4, 128, 64), (2, 3, 16, 9)):
            out.append((f"conv2d {dt} {c}->{k}", conv2d._configs(), conv2d._prune,
                        {"N": n, "Ho": hw, "Wo": hw, "K": k, "C": c, "x_ptr": _cpu(dt)}, {},
                        conv2d._quick_configs(k)))
        for n, ci, co, hw in ((256, 100, 512, 4), (256, 128, 64, 32), (256, 64, 3, 64)):
            out.append((f"conv_transpose2d {dt} {ci}->{co}", conv_transpose2d._configs(), conv_transpose2d._prune,
                        {"N": n, "Ho": hw, "Wo": hw, "CO": co, "CI": ci, "x_ptr": _cpu(dt)},
                        {"STRIDE_H": 2, "STRIDE_W": 2}, conv_transpose2d._quick_configs(co)))
    for block_c, s_per_prog in ((16, 4096), (4, 65536), (64, 256), (1, 16)):
        out.append((f"group_norm C{block_c} S{s_per_prog}", group_norm._configs(), group_norm._prune,
                    {"S_PER_PROG": s_per_prog}, {"BLOCK_C": block_c}, group_norm._quick_configs(block_c)))
    return out


PROBLEMS = _problems()


@pytest.mark.parametrize("problem", PROBLEMS, ids=[p[0] for p in PROBLEMS])
def test_quick_mode_picks_the_short_list(problem, monkeypatch):
    name, full_space, prune, named, kw, quick = problem
    space = _keys(full_space)
    assert len(quick) <= 4, f"{name}: the quick list has {len(quick)} configs"
    assert set(quick) <= set(space), f"{name}: quick configs outside the full space"
    monkeypatch.setattr(_common, "AUTOTUNE", "full")
    full = prune(full_space, named, **kw)
    monkeypatch.setattr(_common, "AUTOTUNE", "quick")
    picked = prune(full_space, named, **kw)
    # what quick mode times passed the full mode's pruning rules (or is its own fallback)
    if set(_keys(full)) & set(quick):
        assert _keys(picked) == [k for k in quick if k in set(_keys(full))]
    else:
        assert _keys(picked) == _keys(full)[:1]
    assert len(picked) < len(full) or len(full) <= len(quick)


def test_quick_mode_narrows_the_large_spaces(monkeypatch):
    """The classes the check's headline runs: fp16 attention D128 at 4k, the 4096^3 GEMM, decode."""
    monkeypatch.setattr(_common, "AUTOTUNE", "quick")
    fp16 = _cpu(torch.float16)
    att = attention._prune_configs(attention._configs(), {"q_ptr": fp16, "T": 4096}, BLOCK_D=128)
    gemm = linear._prune_gemm(linear._gemm_configs(), {"x_ptr": fp16, "M_BUCKET": 4096, "N": 4096})
    small = linear._prune_small_m(linear._small_m_configs(), {"x_ptr": fp16, "N": 4096, "K": 4096})
    monkeypatch.setattr(_common, "AUTOTUNE", "full")
    att_full = attention._prune_configs(attention._configs(), {"q_ptr": fp16, "T": 4096}, BLOCK_D=128)
    assert 2 <= len(att) <= 3 < len(att_full)
    assert len(gemm) == 4 < len(linear._prune_gemm(linear._gemm_configs(),
                                                   {"x_ptr": fp16, "M_BUCKET": 4096, "N": 4096}))
    # N=4096 leaves only tiles of <= 32 columns filling 3/4 of 132 SMs: two of the three
    assert _keys(small) == [_common.quick_key({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": 256}, 4, 4)
                            for bn in (32, 16)]
    assert _keys(gemm)[0] == _common.quick_key({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, 8, 3)


def test_select_quick():
    cfgs = [triton.Config({"B": b}, num_warps=4, num_stages=2) for b in (16, 32, 64)]
    want = (_common.quick_key({"B": 64}, 4, 2), _common.quick_key({"B": 16}, 4, 2), ("absent",))
    assert _common.select_quick(cfgs, want, mode="full") is cfgs
    assert [c.kwargs["B"] for c in _common.select_quick(cfgs, want, mode="quick")] == [64, 16]
    assert _common.select_quick(cfgs, (("absent",),), mode="quick") == cfgs[:1]
    assert _common.select_quick([], want, mode="quick") == []


def test_the_kernel_sweep_covers_every_family():
    """The run's sweep names its families (those without a headline first): none is left out."""
    text = open(SCRIPT).read()
    first, rest = re.search(r"local sweep=(\S+)\n\s*sweep\+=(\S+)\n", text).groups()
    assert sorted((first + rest).split(",")) == sorted(bench_kernels.FAMILIES)
