"""runtime.gguf_io's fast GGUF parser (the < 0.5 s load of issue 13) against gguf.GGUFReader:
the same metadata (values and Python types) and the same tensors (name, type, shape, offsets
and the memory-mapped bytes), on the shipped SmolLM2 file and on small files written with
gguf's own writer; the fallback for layouts it leaves to the reader."""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="gguf is in the test extra; the GPU image lacks it unless its wheel is carried (bench/gpu_check.sh)")
from genfuse.runtime import gguf_io
from gguf import GGMLQuantizationType as T


def assert_same_as_gguf_reader(path):
    fast = gguf_io._FastReader(str(path))
    ref = gguf.GGUFReader(str(path), "r")
    md = {k: f.contents() for k, f in ref.fields.items()}
    assert fast.metadata == md
    assert {k: type(v) for k, v in fast.metadata.items()} == {k: type(v) for k, v in md.items()}
    assert len(fast.tensors) == len(ref.tensors)
    for a, b in zip(fast.tensors, ref.tensors):
        assert (a.name, a.tensor_type, a.n_elements, a.n_bytes, a.data_offset) == \
               (b.name, b.tensor_type, b.n_elements, b.n_bytes, b.data_offset)
        assert np.array_equal(a.shape, b.shape) and a.data.shape == b.data.shape and a.data.dtype == b.data.dtype
        assert np.array_equal(a.data, b.data, equal_nan=True)
        assert not a.data.flags.writeable  # a view of the read-only map, not a copy
    return fast


def test_smollm_file_parses_as_the_reader_does():
    from loader_helpers import smollm_gguf

    fast = assert_same_as_gguf_reader(smollm_gguf())
    assert len(fast.metadata["tokenizer.ggml.tokens"]) == 49152


def test_open_gguf_takes_the_fast_path():
    from loader_helpers import smollm_gguf

    g = gguf_io.open_gguf(smollm_gguf())
    assert isinstance(g.reader, gguf_io._FastReader)


def test_written_file_with_every_value_and_tensor_type(tmp_path):
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -7)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63)
    w.add_int64("t.i64", -(2**40))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, 1.5])
    w.add_array("t.strs", ["a", "", "ü"])
    w.add_array("t.bools", [True, False])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 7)).astype(np.float16))
    w.add_tensor("i32", np.arange(6, dtype=np.int32))
    for qt in (T.Q4_0, T.Q4_1, T.Q8_0):
        w.add_tensor(qt.name, gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    fast = assert_same_as_gguf_reader(path)
    assert fast.metadata["t.str"] == "héllo ✓" and fast.metadata["t.bools"] == [True, False]


def test_a_layout_it_leaves_to_the_reader_still_opens(tmp_path):
    """An array of arrays: the fast path steps aside and gguf.GGUFReader parses the file."""
    path = tmp_path / "n.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_tensor("x", np.zeros((2, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(gguf_io._NotFast):
        gguf_io._FastReader(str(path))
    g = gguf_io.open_gguf(path)
    assert isinstance(g.reader, gguf.GGUFReader) and g.tensor_names == ("x",)
