"""Every registered benchmark family builds its cases, and on tiny CPU shapes genfuse and each
baseline compute the same thing (the GPU benchmark then times what was checked here). On CPU
the genfuse calls run the Triton kernels through the interpreter."""
import pytest
import torch

from genfuse.bench import harness, kernels


def _tensors(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize("family", kernels.FAMILIES)
def test_smoke_cases_agree_with_their_baselines(family):
    cases = kernels.family_cases(family, "cpu", torch.float32, "smoke")
    assert cases, f"{family} has no smoke cases"
    for case in cases:
        assert case.kernel == family
        assert case.baselines, f"{case.name} has nothing to compare against"
        assert case.flops > 0 or case.bytes > 0, f"{case.name} gives neither FLOPs nor bytes"
        outs = _tensors(case.genfuse())
        for name, fn in case.baselines.items():
            refs = _tensors(fn())
            assert len(refs) == len(outs), f"{case.name}: {name} returns {len(refs)} tensors, genfuse {len(outs)}"
            for i, (out, ref) in enumerate(zip(outs, refs)):  # every output: norm sums, rotary's k
                err = harness.rel_error(out, ref)
                assert err < 1e-4, f"{case.name}: genfuse vs {name}, output {i}: {err:.2e}"


def test_kernel_benchmark_keeps_going_and_saves_after_every_case(tmp_path, monkeypatch, capsys):
    """A case that raises (a kernel that fails to compile) is listed with its error and the
    others still run; the JSON is rewritten after every case, so a run cut off keeps them."""
    import json

    path = tmp_path / "k.json"
    seen, progress = [], []

    def fake_run_case(case, ceilings, key):
        saved = json.loads(path.read_text())  # already holds every case before this one
        progress.append(len(saved["results"]) + len(saved["failed"]))
        seen.append(case.name)
        if case.name == "bad":
            raise RuntimeError("CompilationError: out of resources\nmore lines")
        return {"kernel": case.kernel, "case": case.name, "timings": {"genfuse": {"ms": 1.0, "GBps": 1.0,
                                                                                  "frac_ceiling": 0.5}},
                "speedup": {}}

    def fake_cases(family, device, dtype, size):
        assert size == "headline"
        return [harness.Case(family, name, genfuse=lambda: None, baselines={}, bytes=1.0)
                for name in ("good", "bad", "also good")]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(harness, "device_info", lambda: {"torch": torch.__version__, "triton": "x"})
    monkeypatch.setattr(harness, "run_case", fake_run_case)
    monkeypatch.setattr(kernels, "family_cases", fake_cases)
    rc = kernels.main(["--size", "headline", "--only", "norm", "--skip-ceilings", "--json", str(path)])
    assert rc == 1 and seen == ["good", "bad", "also good"] and progress == [0, 1, 2]
    report = json.loads(path.read_text())
    assert report["complete"] and report["size"] == "headline"
    assert [r["case"] for r in report["results"]] == ["good", "also good"]
    assert report["failed"] == [{"kernel": "norm", "case": "bad", "error": "RuntimeError: CompilationError: out of resources"}]
    assert "FAILED: 1 case(s): norm bad" in capsys.readouterr().err


def test_kernel_benchmark_headline_families():
    assert kernels.main(["--size", "headline", "--only", "conv2d"]) == 2  # no headline for it
    for family in kernels.HEADLINE_FAMILIES:  # each builds its smoke cases after the size check
        assert kernels.family_cases(family, "cpu", torch.float32, "smoke")
