"""A pytest plugin for the GPU check (bench/gpu_check.sh): a representative sample of a test
run, and every outcome written the moment it is known.

    python -m pytest -p genfuse.bench.gpu_pytest --gpu-check-sample 3 --gpu-check-log run.jsonl ...

* ``--gpu-check-sample N`` keeps at most N cases of each test function, spread over its
  parametrizations (the first, the last and evenly between), so that every function, every
  kernel family and the ends of each parameter grid are still run when the whole grid does not
  fit the check's time slice. The cases with the ``gpu`` marker (bf16, the large shapes) are
  sampled apart from the others, N of each. 0 (the default) keeps every case.
* ``--gpu-check-log PATH`` appends one JSON object per line: ``{"event": "collected", ...}``
  once, then one ``{"event": "result", "nodeid", "outcome", "when", "seconds", "message"}`` per
  test. A run killed by ``timeout`` keeps every line written before; ``gpu_summary.py`` counts
  the collected tests without a result as not reached.
"""
from __future__ import annotations

import json
import time
from typing import Any, Dict, List

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("genfuse GPU check")
    group.addoption("--gpu-check-sample", type=int, default=0, metavar="N",
                    help="keep at most N cases of each test function, spread over its parametrizations "
                         "(0: all)")
    group.addoption("--gpu-check-log", default=None, metavar="PATH",
                    help="append one JSON line per test outcome to PATH as the run goes")


def spread(items: List[Any], k: int) -> List[Any]:
    """Up to ``k`` of ``items``: the first, the last and evenly between, in order."""
    if k <= 0 or len(items) <= k:
        return list(items)
    if k == 1:
        return [items[0]]
    idx = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in idx]


def _write(config: pytest.Config, record: Dict[str, Any]) -> None:
    path = config.getoption("gpu_check_log")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected what they deselect
def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    k = config.getoption("gpu_check_sample")
    if k < 0:
        raise pytest.UsageError(f"--gpu-check-sample must be >= 0, got {k}")
    dropped: List[pytest.Item] = []
    if k:
        groups: Dict[tuple, List[pytest.Item]] = {}
        for item in items:  # one group per test function and gpu marker, in collection order
            key = (item.nodeid.split("[", 1)[0], "gpu" in item.keywords)
            groups.setdefault(key, []).append(item)
        keep = {id(item) for group in groups.values() for item in spread(group, k)}
        dropped = [item for item in items if id(item) not in keep]
        items[:] = [item for item in items if id(item) in keep]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
    _write(config, {"event": "collected", "count": len(items), "sampled_out": len(dropped),
                    "sample": k, "time": time.time()})


def _message(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        text = crash.message
    elif isinstance(report.longrepr, tuple):  # skips: (path, line, reason)
        text = str(report.longrepr[-1])
    else:
        text = str(report.longrepr or "")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0][:300] if lines else ""


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # One record per test: its call, or the setup / teardown phase that failed or skipped it.
    if report.when == "call" or (report.when == "setup" and not report.passed) or \
            (report.when == "teardown" and report.failed):
        outcome = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        elif report.when != "call" and report.failed:
            outcome = "error"
        _write(_CONFIG["config"], {"event": "result", "nodeid": report.nodeid, "outcome": outcome,
                                   "when": report.when, "seconds": round(report.duration, 3),
                                   "message": "" if report.passed else _message(report)})


# The hooks without a config argument write through the session's config.
_CONFIG: Dict[str, pytest.Config] = {}


def pytest_configure(config: pytest.Config) -> None:
    _CONFIG["config"] = config


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _write(session.config, {"event": "finished", "exitstatus": int(exitstatus), "time": time.time()})
