"""The GGUF header pre-scan (runtime.gguf_guard): every count and length a header claims is
checked against the bytes left in the file before gguf's reader sees it (issue 10, item 4)."""
from __future__ import annotations

import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from genfuse.runtime.config import load_config
from genfuse.runtime.gguf_guard import MAX_METADATA_ELEMENTS, check_gguf_header
from genfuse.runtime.gguf_io import open_gguf
from gguf_writer_helpers import (GGUF_ARRAY, GGUF_STRING, GGUF_UINT32, gstr, kv, kv_array, kv_str, kv_u32, raw_gguf,
                                 tensor_info, tiny_llama_metadata)
from loader_helpers import smollm_gguf, tiny_hf_model, write_gguf


def _refused(tmp_path, name: str, data: bytes, *must_name: str) -> str:
    """Write ``data`` and open it the way LLM does; a ValueError naming the file and ``must_name``,
    fast (the reader alone takes 27 s on the 2**20-element array below, for ever on 2**63)."""
    f = tmp_path / name
    f.write_bytes(data)
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as e:
        load_config(f)
    assert time.perf_counter() - t0 < 2.0
    msg = str(e.value)
    assert str(f) in msg and all(s in msg for s in must_name), msg
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("count", [2**20, 2**32, 2**63, 2**64 - 1])
@pytest.mark.parametrize("item_type", [GGUF_UINT32, GGUF_STRING, GGUF_ARRAY])
def test_array_count_past_the_file_is_refused(tmp_path, count, item_type):
    data = raw_gguf([kv_str("general.architecture", "llama"), kv_array("evil.array", item_type, count)], pad_to=118)
    assert len(data) == 118
    _refused(tmp_path, f"a{item_type}_{count}.gguf", data, "'evil.array'")


def test_the_118_byte_file_of_the_issue_in_a_subprocess(tmp_path):
    """Unfixed, this never ends: run it where a timeout can stop it."""
    f = tmp_path / "evil.gguf"
    f.write_bytes(raw_gguf([kv_str("general.architecture", "llama"), kv_array("evil", GGUF_UINT32, 2**63)],
                           pad_to=118))
    code = ("import sys\nfrom genfuse.runtime.gguf_io import open_gguf\n"
            "try:\n    open_gguf(sys.argv[1])\nexcept ValueError as e:\n    print('ValueError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("ValueError:") and "'evil'" in out.stdout, out


def test_lying_lengths_and_counts(tmp_path):
    arch = kv_str("general.architecture", "llama")
    cases = {
        "key_len": (raw_gguf([struct.pack("<Q", 2**62) + b"k"], pad_to=64), "metadata key #0"),
        "str_len": (raw_gguf([arch, kv("general.name", GGUF_STRING, struct.pack("<Q", 2**40) + b"abc")]),
                    "'general.name'"),
        "str_in_array": (raw_gguf([arch, kv_array("tokenizer.ggml.tokens", GGUF_STRING, 3,
                                                  gstr("a") + gstr("b") + struct.pack("<Q", 10**6))]),
                         "'tokenizer.ggml.tokens'[2]"),
        "nested": (raw_gguf([arch, kv_array("nest", GGUF_ARRAY, 1, struct.pack("<IQ", GGUF_UINT32, 2**50))]),
                   "'nest[0]'"),
        "too_deep": (raw_gguf([arch, kv_array("deep", GGUF_ARRAY, 1, struct.pack("<IQ", GGUF_ARRAY, 1)
                                              + struct.pack("<IQ", GGUF_UINT32, 0))]), "'deep[0][0]'"),
        "kv_count": (raw_gguf([arch], n_kv=2**63), "metadata keys"),
        "tensor_count": (raw_gguf([arch], n_tensors=2**40), "tensors"),
        "value_type": (raw_gguf([arch, kv("odd", 99, b"\0" * 8)]), "'odd'"),
        "item_type": (raw_gguf([arch, kv_array("odd", 77, 1, b"\0" * 8)]), "'odd'"),
        "scalar_cut": (raw_gguf([arch, kv("cut", GGUF_UINT32, b"\0\0")]), "'cut'"),
        "duplicate_key": (raw_gguf([arch, arch]), "twice"),
        "bad_utf8_key": (raw_gguf([arch, struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<I", GGUF_UINT32)
                                   + b"\0" * 4]), "UTF-8"),
        "alignment_type": (raw_gguf([arch, kv_str("general.alignment", "32")]), "'general.alignment'"),
        "alignment_zero": (raw_gguf([arch, kv_u32("general.alignment", 0)]), "'general.alignment'"),
        "alignment_odd": (raw_gguf([arch, kv_u32("general.alignment", 48)]), "power of two"),
        "version": (raw_gguf([arch], version=7), "version 7"),
        "v1": (raw_gguf([arch], version=1), "version 1"),
        "short": (b"GGUF\3\0\0\0", "too short"),
        "magic": (b"GGML" + b"\0" * 60, "not a GGUF file"),
    }
    for name, (data, needle) in cases.items():
        _refused(tmp_path, f"{name}.gguf", data, needle)


def test_lying_tensor_infos(tmp_path):
    md = tiny_llama_metadata()
    cases = {
        "dims": (raw_gguf(md, [gstr("t") + struct.pack("<I", 2**31)]), "'t'"),
        "huge": (raw_gguf(md, [tensor_info("token_embd.weight", [2**40, 2**20])], b"\0" * 64),
                 "'token_embd.weight'", "past the end"),
        "past_end": (raw_gguf(md, [tensor_info("a", [8]), tensor_info("b", [8], offset=32)], b"\0" * 40),
                     "'b'", "past the end"),
        "offset": (raw_gguf(md, [tensor_info("a", [8], offset=2**63)], b"\0" * 32), "'a'"),
        "type": (raw_gguf(md, [tensor_info("a", [8], ggml_type=250)], b"\0" * 32), "'a'", "ggml type 250"),
        "block": (raw_gguf(md, [tensor_info("a", [20], ggml_type=2)], b"\0" * 32), "'a'", "block"),  # Q4_0: 32
        "duplicate": (raw_gguf(md, [tensor_info("a", [8]), tensor_info("a", [8], offset=32)], b"\0" * 64),
                      "'a'", "twice"),
        "cut": (raw_gguf(md, [tensor_info("a", [8])])[:-3], "'a'"),
    }
    for name, (data, *needles) in cases.items():
        _refused(tmp_path, f"{name}.gguf", data, *needles)


def test_total_metadata_elements_are_bounded(tmp_path):
    """Each array element costs gguf's reader ~100 bytes and ~1 us: a file of many small arrays
    stays refused past the limit even though each one fits the file."""
    n = MAX_METADATA_ELEMENTS // 4 + 1
    kvs = [kv_str("general.architecture", "llama")] + [kv_array(f"a{i}", 0, n, b"\0" * n) for i in range(4)]
    _refused(tmp_path, "many.gguf", raw_gguf(kvs), "'a3'", str(MAX_METADATA_ELEMENTS))


def test_mutated_small_files_fail_cleanly(tmp_path):
    """Random byte flips and every truncation of a valid file: it loads, or a ValueError names
    the file, quickly; never another exception."""
    good = write_gguf(tmp_path / "good.gguf", tiny_hf_model("smol"), "llama").read_bytes()
    header_end = good.index(b"blk.1.ffn_up.weight") + 64  # the flips land in the header, not the data
    rng = np.random.default_rng(0)
    cuts = list(range(0, header_end, max(1, header_end // 40)))
    for i in range(120 + len(cuts)):
        data = bytearray(good)
        if i < 120:
            for pos in rng.integers(0, header_end, size=int(rng.integers(1, 4))):
                data[pos] = int(rng.integers(0, 256))
        else:
            data = data[:cuts[i - 120]]
        f = tmp_path / f"m{i}.gguf"
        f.write_bytes(bytes(data))
        t0 = time.perf_counter()
        try:
            open_gguf(f)
        except ValueError as e:
            assert str(f) in str(e)
        assert time.perf_counter() - t0 < 5.0, i


def test_real_files_pass_quickly(tmp_path):
    path = smollm_gguf()
    best = min(_timed(check_gguf_header, path) for _ in range(3))
    # 49k tokens + 49k merges: ~40 ms here, against several seconds for gguf's reader itself
    assert best < 1.0, best
    check_gguf_header(write_gguf(tmp_path / "s.gguf", tiny_hf_model("smol"), "llama"))


def test_big_endian_file_is_scanned_in_its_byte_order(tmp_path):
    import gguf

    f = tmp_path / "be.gguf"
    w = gguf.GGUFWriter(str(f), "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_block_count(1)
    w.add_token_list(["a", "bb", "ccc"])
    w.add_tensor("token_embd.weight", np.arange(24, dtype=np.float32).reshape(3, 8).byteswap())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    check_gguf_header(f)
    assert open_gguf(f).metadata["tokenizer.ggml.tokens"] == ["a", "bb", "ccc"]


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0
