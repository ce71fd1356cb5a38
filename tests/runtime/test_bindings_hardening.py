"""genfuse._C's argument conversion against hostile arguments (issue 10, item 1).

A list item that is not an int is converted through its ``__index__``: Python code that may
clear, grow or refill the very list being converted and drop the last reference to its items.
The conversion used to keep a pointer into the list's item array across those calls (a
use-after-free: ``allocate``, ``append_batch``, ``slot_mapping`` segfaulted), and the quantized
matmul let numpy convert lists, which crashes numpy the same way. Now every list argument of
every binding converts from a snapshot that holds its items: the call sees the list as it was
passed, and a bad item is a TypeError/ValueError naming the argument and the item.

Each hostile case runs in a fresh interpreter that loads the same genfuse._C file (without the
genfuse package, so it starts in a fraction of a second): a crash fails that case instead of
killing pytest. csrc/asan_check.sh runs this file against an AddressSanitizer build, where an
out-of-bounds or freed read aborts the child even when it would not crash.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from genfuse import _C
from genfuse._C import BlockManager

# The child's prelude: the extension, int-likes that run Python code, and one JSON line out.
PRELUDE = r'''
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("genfuse._C", sys.argv[1])
_C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(_C)
BlockManager = _C.BlockManager

class T:
    """An int whose __index__ is Python code."""
    def __init__(s, v): s.v = v
    def __index__(s): return s.v

class Do(T):
    """An int whose __index__ first runs f()."""
    def __init__(s, v, f): s.v, s.f = v, f
    def __index__(s): s.f(); return s.v

def boom():
    raise RuntimeError("boom")

def outcome(f):
    try:
        return {"returned": f()}
    except Exception as e:
        return {"raised": type(e).__name__, "message": str(e)}
'''


# -S: no site initialisation (a third of the child's start-up); numpy found through PYTHONPATH.
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [os.path.dirname(os.path.dirname(np.__file__))] + os.environ.get("PYTHONPATH", "").split(os.pathsep))}


def run_child(code: str) -> dict:
    """Run PRELUDE + code in a fresh interpreter; code sets `result`. Fails on any crash."""
    src = PRELUDE + code + "\nprint(json.dumps(result))\n"
    proc = subprocess.run([sys.executable, "-S", "-c", src, _C.__file__], capture_output=True, text=True,
                          timeout=120, env=CHILD_ENV)
    assert proc.returncode == 0, f"the child died (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Every list-taking binding: make() builds fresh state, PLAIN is a valid list for the argument
# ARG, call(state, lst) makes the call with lst in that argument and returns what it changed,
# in a form that depends on every value of lst (block hashes for token lists).
TARGETS = {
    "allocate": ("token_ids", """
        def make(): return BlockManager(64, 4)
        PLAIN = list(range(1, 202))
        def call(bm, lst): return [bm.allocate(1, lst), bm.num_tokens(1), [bm.block_hash(b) for b in bm.block_table(1)]]
    """),
    "cached_prefix_length": ("token_ids", """
        def make():
            bm = BlockManager(64, 4)
            bm.allocate(0, list(range(1, 202)))
            return bm
        PLAIN = list(range(1, 202))
        def call(bm, lst): return bm.cached_prefix_length(lst)
    """),
    "extend": ("token_ids", """
        def make():
            bm = BlockManager(64, 4)
            bm.allocate(0, [1, 2, 3])
            return bm
        PLAIN = list(range(1, 202))
        def call(bm, lst): return [bm.extend(0, lst), bm.num_tokens(0), [bm.block_hash(b) for b in bm.block_table(0)]]
    """),
    "append_batch.seq_ids": ("seq_ids", """
        N = 201
        def make():
            bm = BlockManager(4 * N, 4)
            for s in range(N): bm.allocate(s, [s % 7] * 4)
            return bm
        PLAIN = list(range(N))
        def call(bm, lst): return [bm.append_batch(lst, [9] * N), [bm.num_tokens(s) for s in range(N)]]
    """),
    "append_batch.token_ids": ("token_ids", """
        N = 201
        def make():
            bm = BlockManager(4 * N, 4)
            for s in range(N): bm.allocate(s, [s % 7] * 3)
            return bm
        PLAIN = list(range(1, N + 1))
        def call(bm, lst):  # each append fills a block: its hash depends on the token
            return [bm.append_batch(list(range(N)), lst), [bm.block_hash(bm.block_table(s)[0]) for s in range(N)]]
    """),
    "block_table_array": ("seq_ids", """
        def make():
            bm = BlockManager(64, 4)
            for s in range(8): bm.allocate(s, [1] * (s + 1))
            return bm
        PLAIN = [s % 8 for s in range(201)]
        def call(bm, lst): return bm.block_table_array(lst, 2).tolist()
    """),
    "slot_mapping": ("seq_ids", """
        def make():
            bm = BlockManager(64, 4)
            for s in range(8): bm.allocate(s, [1] * (s + 1))
            return bm
        PLAIN = [s % 8 for s in range(201)]
        def call(bm, lst): return bm.slot_mapping(lst).tolist()
    """),
    "dequantize_rows": ("rows", """
        import numpy as np
        def make():
            w = np.random.default_rng(0).integers(0, 256, (8, 34), dtype=np.uint8)  # Q8_0, K = 32
            w[:, 0], w[:, 1] = 0x00, 0x3C  # each row's fp16 scale: 1.0
            return w, np.zeros((201, 32), np.float32)
        PLAIN = [i % 8 for i in range(201)]
        def call(s, lst):
            w, out = s
            _C.dequantize_rows(w, 8, 32, lst, out, 1)
            return out.tolist()
    """),
}
TARGETS = {name: (arg, textwrap.dedent(setup)) for name, (arg, setup) in TARGETS.items()}

# What the first item's __index__ does to the list being converted (named `lst`).
MUTATIONS = {
    "clear": "lst.clear()",                              # the reproducer
    "grow": "lst.extend([T(1)] * 100_000)",              # the item array is reallocated
    "refill": "lst[:] = [T(0) for _ in lst]",            # every old item is freed
    "drop_self": "del lst[0]",                           # the item being converted is freed
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("target", list(TARGETS))
def test_an_index_that_mutates_the_list_sees_the_list_as_passed(target, mutation):
    _, setup = TARGETS[target]
    out = run_child(setup + f"""
def mut():
    {MUTATIONS[mutation]}
want = outcome(lambda: call(make(), list(PLAIN)))
lst = [Do(PLAIN[0], mut)] + [T(v) for v in PLAIN[1:]]
got = outcome(lambda: call(make(), lst))
result = {{"want": want, "got": got}}
""")
    assert "returned" in out["want"], out["want"]
    assert out["got"] == out["want"]


@pytest.mark.parametrize("target", [t for t in TARGETS if t != "dequantize_rows"])  # rows: integer arrays only
def test_an_index_that_resizes_an_object_array_sees_the_array_as_passed(target):
    _, setup = TARGETS[target]
    out = run_child(setup + """
import numpy as np
want = outcome(lambda: call(make(), list(PLAIN)))
def mut(): lst.resize(0, refcheck=False)
lst = np.array([Do(PLAIN[0], mut)] + [T(v) for v in PLAIN[1:]], dtype=object)
got = outcome(lambda: call(make(), lst))
result = {"want": want, "got": got}
""")
    assert "returned" in out["want"], out["want"]
    assert out["got"] == out["want"]


# Items whose __index__ fails, at position 1 (after a good item): a TypeError naming the item.
EVIL_ITEMS = {
    "raises": ("Do(0, boom)", "RuntimeError: boom"),
    "clears_then_raises": ("Do(0, lambda: (lst.clear(), boom()))", "RuntimeError: boom"),
    "returns_a_str": ('T("3")', "non-int"),
    "returns_beyond_int64": ("T(2**64)", "=18446744073709551616 does not fit in int64"),
    "returns_a_huge_int": ("T(10**100_000)", "(an int of 332193 bits) does not fit in int64"),
    "no_index": ("object()", "must be an int, not object"),
}


@pytest.mark.parametrize("item", list(EVIL_ITEMS))
@pytest.mark.parametrize("target", list(TARGETS))
def test_an_item_whose_index_fails_is_a_type_error_naming_it(target, item):
    arg, setup = TARGETS[target]
    code, says = EVIL_ITEMS[item]
    out = run_child(setup + f"""
lst = [T(PLAIN[0]), {code}] + [T(v) for v in PLAIN[2:]]
result = outcome(lambda: call(make(), lst))
""")
    assert out.get("raised") == "TypeError", out
    assert out["message"].startswith(f"{arg}[1]") and says in out["message"], out["message"]
    assert len(out["message"]) < 300


# ---- in process: values that run no Python code of their own ---------------------------------

def _bm_calls():
    """(binding, argument, call(bad list)) of every BlockManager list argument, live state ready."""
    def bm():
        b = BlockManager(64, 4)
        for s in range(3):
            b.allocate(s, [1, 2, 3])
        return b
    return [
        ("allocate", "token_ids", lambda lst: bm().allocate(9, lst)),
        ("cached_prefix_length", "token_ids", lambda lst: bm().cached_prefix_length(lst)),
        ("extend", "token_ids", lambda lst: bm().extend(0, lst)),
        ("append_batch", "seq_ids", lambda lst: bm().append_batch(lst, [1] * len(lst))),
        ("append_batch", "token_ids", lambda lst: bm().append_batch(list(range(len(lst))), lst)),
        ("block_table_array", "seq_ids", lambda lst: bm().block_table_array(lst, 1)),
        ("slot_mapping", "seq_ids", lambda lst: bm().slot_mapping(lst)),
    ]


BM_CALLS = [pytest.param(arg, call, id=f"{name}.{arg}") for name, arg, call in _bm_calls()]
BAD_VALUES = {
    "float": (1.5, "must be an int, not float"),
    "none": (None, "must be an int, not NoneType"),
    "str": ("1", "must be an int, not str"),
    "beyond_int64": (2**63, "=9223372036854775808 does not fit in int64 [-9223372036854775808, 9223372036854775807]"),
    "below_int64": (-2**63 - 1, "=-9223372036854775809 does not fit in int64"),
    "huge": (10**100_000, "(an int of 332193 bits) does not fit in int64"),
    "numpy_float": (np.float64(1.0), "must be an int, not numpy.float64"),
}


@pytest.mark.parametrize("value", list(BAD_VALUES))
@pytest.mark.parametrize("arg,call", BM_CALLS)
def test_a_non_int_item_is_a_type_error_naming_it(arg, call, value):
    bad, says = BAD_VALUES[value]
    with pytest.raises(TypeError) as e:
        call([1, bad, 2])
    assert str(e.value).startswith(f"{arg}[1]") and says in str(e.value)


class PyInt:
    """An int whose __index__ is Python code."""

    def __init__(self, v):
        self.v = v

    def __index__(self):
        return self.v

    def __int__(self):
        return self.v


@pytest.mark.parametrize("arg,call", [p for p in BM_CALLS if p.values[0] == "token_ids"])
@pytest.mark.parametrize("bad", [-1, 2**31, np.int64(-5), np.int32(-1), PyInt(-7), PyInt(2**31 + 1)],
                         ids=["-1", "2**31", "np.int64(-5)", "np.int32(-1)", "__index__=-7", "__index__=2**31+1"])
def test_a_token_outside_int32_is_a_value_error_naming_it(arg, call, bad):
    with pytest.raises(ValueError, match=rf"^token_ids\[1\]={int(bad)} is outside the token id range \[0, 2147483647\]$"):
        call([1, bad, 2])
    with pytest.raises(ValueError, match=rf"^token_ids\[1\]={int(bad)} "):  # the same from an array
        call(np.array([1, int(bad), 2], np.int64))


def test_a_scalar_whose_index_fails_is_a_type_error_naming_it():
    class Raises:
        def __index__(self):
            raise ZeroDivisionError("no")

    bm = BlockManager(8, 4)
    for call, name in [(lambda: bm.allocate(Raises(), [1]), "seq_id"), (lambda: bm.append(Raises(), 1), "seq_id"),
                       (lambda: bm.block_table_array([], Raises()), "width"),
                       (lambda: BlockManager(Raises(), 4), "num_blocks"), (lambda: bm.block_hash(Raises()), "block_id")]:
        with pytest.raises(TypeError, match=rf"^{name}: operator.index\(\) of a .*Raises raised ZeroDivisionError: no$") as e:
            call()
        assert isinstance(e.value.__cause__, ZeroDivisionError)
    bm.allocate(0, [1])
    with pytest.raises(TypeError, match=r"^token_id: operator.index\(\) of a .*Raises raised ZeroDivisionError"):
        bm.append(0, Raises())
    with pytest.raises(ValueError, match=r"^token_id=-1 is outside the token id range"):
        bm.append(0, -1)


def test_keyboard_interrupt_from_index_passes_through():
    class Interrupts:
        def __index__(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        BlockManager(8, 4).allocate(0, [1, Interrupts()])


def test_tuples_ranges_and_arrays_name_the_item_too():
    bm = BlockManager(8, 4)
    with pytest.raises(TypeError, match=r"^token_ids\[2\] must be an int, not float$"):
        bm.allocate(0, (1, 2, 3.0))
    with pytest.raises(TypeError, match=r"^token_ids\[0\] must be an int, not numpy.float32$"):
        bm.allocate(0, np.zeros(2, np.float32))
    with pytest.raises(TypeError, match=r"^token_ids\[0\]=18446744073709551615 does not fit in int64"):
        bm.allocate(0, np.array([2**64 - 1], np.uint64))
    with pytest.raises(TypeError, match=r"^seq_ids\[0\]=9223372036854775808 does not fit in int64"):
        bm.slot_mapping(range(2**63, 2**63 + 1))
    assert bm.allocate(0, range(5)) == 0 and bm.num_tokens(0) == 5


# ---- the quantized matmul: numpy arrays only, row indices converted first -------------------

def _q8(n=8):
    w = np.random.default_rng(0).integers(0, 256, (n, 34), dtype=np.uint8)  # Q8_0, K = 32
    w[:, 0], w[:, 1] = 0x00, 0x3C  # fp16 scale 1.0
    return w


# A nested list whose first item's __len__ clears it: numpy's own conversion of it crashes.
NUMPY_CRASHER = """
class Evil:
    def __len__(s): lst.clear(); return 1
    def __getitem__(s, i):
        if i: raise IndexError
        return 1.0
lst = [Evil()] + [[float(i)] * 32 for i in range(200)]
"""


@pytest.mark.parametrize("arg", ["x", "w", "y"])
def test_quant_matmul_takes_numpy_arrays_only(arg):
    out = run_child(NUMPY_CRASHER + f"""
import numpy as np
w = np.zeros((8, 34), np.uint8)
args = dict(x=np.zeros((201, 32), np.float32), w=w, y=np.zeros((201, 8), np.float32))
args["{arg}"] = lst
result = outcome(lambda: _C.quant_matmul(args["x"], args["w"], 8, args["y"], 1))
""")
    assert out == {"raised": "TypeError", "message": f"{arg} must be a numpy.ndarray, not list"}


@pytest.mark.parametrize("arg", ["w", "out", "rows"])
def test_dequantize_rows_takes_numpy_arrays_only(arg):
    out = run_child(NUMPY_CRASHER + f"""
import numpy as np
args = dict(w=np.zeros((8, 34), np.uint8), rows=None, out=np.zeros((8, 32), np.float32))
args["{arg}"] = lst
result = outcome(lambda: _C.dequantize_rows(args["w"], 8, 32, args["rows"], args["out"], 1))
""")
    assert out["raised"] == "TypeError", out
    assert out["message"] in (f"{arg} must be a numpy.ndarray, not list", "rows[0] must be an int, not Evil")


def test_a_torch_tensor_or_list_output_is_refused_not_written_to_a_temporary():
    import torch  # a dependency of genfuse
    x = np.ones((2, 32), np.float32)
    with pytest.raises(TypeError, match="^y must be a numpy.ndarray, not list$"):
        _C.quant_matmul(x, _q8(), 8, [[np.float32(0)] * 8] * 2, 1)  # was: a float32 temporary, lost
    with pytest.raises(TypeError, match="^x must be a numpy.ndarray, not Tensor$"):
        _C.quant_matmul(torch.ones(2, 32), _q8(), 8, np.zeros((2, 8), np.float32), 1)


def test_dequantize_rows_converts_the_rows_before_checking_the_arrays():
    # An index whose __index__ shrinks `out` after it was checked would have the kernel write
    # into freed memory; the rows are converted first, so the shrunken `out` is what is checked.
    w, out = _q8(), np.zeros((1, 32), np.float32)
    shrink = type("Shrink", (), {"__index__": lambda self: (out.resize((0, 32), refcheck=False), 0)[1]})
    with pytest.raises(ValueError, match=r"^out must be \(1, 32\), got \(0, 32\)$"):
        _C.dequantize_rows(w, 8, 32, [shrink()], out, 1)


def test_dequantize_rows_refuses_an_array_like_rows():
    # np.asarray(rows) used to run rows.__array__ (Python code) after `out` was checked.
    w, out = _q8(), np.zeros((1, 32), np.float32)

    class ArrayLike:
        def __array__(self, dtype=None, copy=None):
            out.resize((0, 32), refcheck=False)
            return np.zeros(1, np.int64)

    with pytest.raises(TypeError, match="^rows must be None, a 1-D integer numpy array or a list of ints, not .*ArrayLike$"):
        _C.dequantize_rows(w, 8, 32, ArrayLike(), out, 1)
    assert out.shape == (1, 32)


@pytest.mark.parametrize("rows,exc,says", [
    ([0, -1], IndexError, r"^rows\[1\]=-1 is out of range \[0, 8\)$"),
    ([0, 8], IndexError, r"^rows\[1\]=8 is out of range \[0, 8\)$"),
    ([0, PyInt(-3)], IndexError, r"^rows\[1\]=-3 is out of range \[0, 8\)$"),
    (np.array([2**40]), IndexError, r"^rows\[0\]=1099511627776 is out of range \[0, 8\)$"),
    ([0, 2**64], TypeError, r"^rows\[1\]=18446744073709551616 does not fit in int64"),
    ([0, 1.0], TypeError, r"^rows\[1\] must be an int, not float$"),
    ((0, None), TypeError, r"^rows\[1\] must be an int, not NoneType$"),
    (np.array([[0]]), ValueError, r"^rows must be a 1-D array of integer row indices, got \(1, 1\) int64$"),
    ({0}, TypeError, r"^rows must be None, a 1-D integer numpy array or a list of ints, not set$"),
])
def test_dequantize_rows_bad_rows_name_the_item(rows, exc, says):
    with pytest.raises(exc, match=says):
        _C.dequantize_rows(_q8(), 8, 32, rows, np.zeros((2, 32), np.float32), 1)


def test_dequantize_rows_takes_lists_tuples_and_ranges_as_arrays():
    w = _q8()
    want = np.zeros((3, 32), np.float32)
    _C.dequantize_rows(w, 8, 32, np.array([5, 0, 5]), want, 1)
    for rows in ([5, 0, 5], (5, 0, np.int64(5)), [np.int32(5), True - 1, 5]):
        got = np.zeros((3, 32), np.float32)
        _C.dequantize_rows(w, 8, 32, rows, got, 1)
        np.testing.assert_array_equal(got, want)
    first3, got = np.zeros((3, 32), np.float32), np.zeros((3, 32), np.float32)
    _C.dequantize_rows(w, 8, 32, np.arange(3), first3, 1)
    _C.dequantize_rows(w, 8, 32, range(3), got, 1)
    np.testing.assert_array_equal(got, first3)
