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
