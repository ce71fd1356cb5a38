"""genfuse bench accelerate: the CLI wiring and its argument checks (the timings are a benchmark,
never a test; the overhead part's case list is checked against the registered operators)."""
import subprocess
import sys

import torch

from genfuse.bench import accelerate_bench


def test_cli_lists_and_refuses_bad_parts():
    out = subprocess.run([sys.executable, "-m", "genfuse", "bench", "accelerate", "--only", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown parts ['nope']" in out.stderr
    assert accelerate_bench.main(["--tokens", "1"]) == 2


def test_overhead_cases_call_registered_ops():
    cases = accelerate_bench._op_cases(torch.device("cpu"))
    for name in cases:
        assert hasattr(torch.ops.genfuse, name)
    op, fn = cases["rms_norm"]
    torch.testing.assert_close(op(), fn())
