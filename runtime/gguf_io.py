"""Opening a GGUF file once: the `gguf` package's reader plus its metadata as plain Python values.

`gguf.GGUFReader` walks every metadata value in Python, which costs seconds on a file with a
49k-token vocabulary, and the config, the weights and the tokenizer all need the same file. So
one parsed `GGUFFile` per path is cached here (keyed by size and mtime, so a rewritten file is
read again). The reader memory-maps the file: tensor bytes are only paged in when dequantized.

Fast path: `gguf.GGUFReader` makes one numpy view per metadata element (~1 us each, ~100k of
them for SmolLM2's vocabulary and merges: 95% of the model's load time in issue 13). `_FastReader`
parses the same little-endian v2/v3 layout in one pass with `struct` over a memory map (strings
decoded straight from the map, numeric arrays with one `numpy.frombuffer` each) and exposes the
tensors as `gguf.ReaderTensor`s whose ``data`` are views of a read-only `numpy.memmap`, as the
reader's are (nothing is copied). Files it does not handle (byte-swapped, nested arrays) go to
`gguf.GGUFReader`; the tests hold both to the same metadata and tensors.

Before either parser sees a file, `gguf_guard.check_gguf_header` checks every count and length in
its header against the file's size (the reader trusts them and can run for ever on a tiny file).
Anything either cannot parse (a truncated file, random bytes, a wrong magic) raises `ValueError`
naming the file; nothing here ever unpickles.
"""
from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .gguf_guard import check_gguf_header


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    reader: Any  # gguf.GGUFReader
    metadata: dict[str, Any]  # key -> int | float | bool | str | list
    tensor_names: tuple[str, ...]

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def arch_key(self, suffix: str, default: Any = None) -> Any:
        """`{architecture}.{suffix}`, e.g. `llama.block_count`."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse (or fetch from the cache) the GGUF file at ``path``; ValueError if it is not one."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError as e:
        raise ValueError(f"{p}: cannot read GGUF file ({e})") from e
    return _open_cached(str(p), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open_cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
    import gguf

    check_gguf_header(path)  # every count and length in the header fits the file: the reader cannot run away
    try:
        try:
            reader = _FastReader(path)
            metadata = reader.metadata
        except _NotFast:
            reader = gguf.GGUFReader(path, "r")
            metadata = {key: field.contents() for key, field in reader.fields.items()}
        names = tuple(t.name for t in reader.tensors)
    except Exception as e:  # the reader raises whatever numpy/struct raise on a short or bad file
        raise ValueError(f"{path}: malformed GGUF file ({type(e).__name__}: {e})") from e
    if "general.architecture" not in metadata:
        raise ValueError(f"{path}: GGUF metadata has no general.architecture")
    return GGUFFile(Path(path), reader, metadata, names)


class _NotFast(Exception):
    """A layout the fast path leaves to gguf.GGUFReader."""


# GGUF value types -> (struct format, numpy dtype) of a scalar
_SCALARS = {0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"),
            5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "?"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"),
            12: ("<d", "<f8")}
_STRING, _ARRAY = 8, 9


class _FastReader:
    """`metadata` (as ReaderField.contents() gives it) and `tensors` (gguf.ReaderTensor, data
    memory-mapped) of a little-endian GGUF v2/v3 file whose header `check_gguf_header` passed."""

    def __init__(self, path: str):
        import numpy as np
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, ReaderTensor
        from gguf.quants import quant_shape_to_byte_shape

        self.data = np.memmap(path, mode="r")
        buf = memoryview(self.data)
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise _NotFast  # byte-swapped (or unsupported: the reader says which)
        off = 24
        md: dict = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}

        def string(off):
            (n,) = struct.unpack_from("<Q", buf, off)
            return str(buf[off + 8:off + 8 + n], "utf-8"), off + 8 + n

        for _ in range(n_kv):
            key, off = string(off)
            (vtype,) = struct.unpack_from("<I", buf, off)
            off += 4
            if vtype == _STRING:
                md[key], off = string(off)
            elif vtype == _ARRAY:
                itype, count = struct.unpack_from("<IQ", buf, off)
                off += 12
                if itype == _STRING:
                    items = []
                    for _ in range(count):
                        item, off = string(off)
                        items.append(item)
                    md[key] = items
                elif itype in _SCALARS:
                    dt = np.dtype(_SCALARS[itype][1])
                    md[key] = np.frombuffer(buf, dt, count, off).tolist()
                    off += dt.itemsize * count
                else:
                    raise _NotFast  # arrays of arrays
            elif vtype in _SCALARS:
                fmt = _SCALARS[vtype][0]
                (md[key],) = struct.unpack_from(fmt, buf, off)
                off += struct.calcsize(fmt)
            else:
                raise ValueError(f"metadata {key!r} has unknown value type {vtype}")
        infos = []
        for _ in range(n_tensors):
            name, off = string(off)
            (n_dims,) = struct.unpack_from("<I", buf, off)
            dims = np.frombuffer(buf, "<u8", n_dims, off + 4).copy()
            off += 4 + 8 * n_dims
            ttype, toff = struct.unpack_from("<IQ", buf, off)
            off += 12
            infos.append((name, dims, ttype, toff))
        align = md.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0:
            raise ValueError(f"general.alignment must be a positive integer, got {align!r}")
        start = (off + align - 1) // align * align
        plain = {GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
                 GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
                 GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
                 GGMLQuantizationType.I64: np.int64}
        tensors, seen = [], set()
        for name, dims, ttype, toff in infos:
            if name in seen:
                raise ValueError(f"Found duplicated tensor with name {name}")
            seen.add(name)
            gtype = GGMLQuantizationType(ttype)
            n_elems = int(np.prod(dims))
            block, type_size = GGML_QUANT_SIZES[gtype]
            n_bytes = n_elems * type_size // block
            np_dims = tuple(reversed(dims.tolist()))
            begin = start + toff
            if begin + n_bytes > len(self.data):
                raise ValueError(f"tensor {name} ({n_bytes} bytes at {begin}) runs past the end of the file")
            if gtype in plain:
                arr = self.data[begin:begin + n_bytes].view(plain[gtype]).reshape(np_dims)
            else:
                arr = self.data[begin:begin + n_bytes].reshape(quant_shape_to_byte_shape(np_dims, gtype))
            tensors.append(ReaderTensor(name=name, tensor_type=gtype, shape=dims, n_elements=n_elems,
                                        n_bytes=n_bytes, data_offset=begin, data=arr, field=None))
        self.metadata, self.tensors = md, tensors
