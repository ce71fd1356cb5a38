"""A bounded pre-scan of a GGUF header, run before the file reaches `gguf.GGUFReader`.

gguf's reader trusts every count in the header: an array claiming 2**63 elements in a 118-byte
file makes it build one numpy view per claimed element, reading zero bytes past the end of the
memory map each time (minutes and gigabytes, or never ending). This scanner walks the same layout
(magic, version, tensor and key/value counts, each key, value type, array count and string length,
then the tensor infos) with `struct` over a memory map and checks every claimed count and length
against the bytes left in the file before stepping over them, so its work is linear in the file's
size and the reader only ever sees a header that fits the file. Any violation raises ValueError
naming the file and the key (or tensor).

Layout (GGUF v2/v3, little-endian unless the version reads byte-swapped, as the reader decides):
    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x   (str key | u32 value_type | value)
    tensor_count x (str name | u32 n_dims | n_dims x u64 dim | u32 ggml_type | u64 offset)
    padding to general.alignment (default 32) | tensor data
    where str = u64 byte length + bytes, and an array value = u32 item_type | u64 count | items.
"""
from __future__ import annotations

import functools
import mmap
import os
import struct

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # gguf.constants.READER_SUPPORTED_VERSIONS
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4  # ggml tensors have at most 4 dimensions

# Each element of a metadata array becomes one numpy view in gguf's reader (~100 bytes, ~1 us),
# so a file of small elements costs 100x its size in memory. The largest real vocabularies
# (Gemma's 262k tokens with scores and types, plus merges) hold about 1.3M elements in all.
MAX_METADATA_ELEMENTS = 1 << 22
# One reader view per tensor as well; a model of the families genfuse runs has 9-16 tensors per
# layer, and ModelConfig allows at most 4096 layers.
MAX_TENSORS = 1 << 16
MAX_ARRAY_NESTING = 2  # arrays of arrays exist in the spec; deeper nesting in no real file

# GGUF value types (gguf.constants.GGUFValueType) -> size in bytes of a scalar
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32",
               7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}
# the smallest possible encodings: a key/value is a u64 key length, a u32 type and >= 1 value
# byte; a tensor info is a u64 name length, u32 n_dims, u32 type and u64 offset
_MIN_KV_BYTES, _MIN_TENSOR_INFO_BYTES = 13, 24


def check_gguf_header(path: str | os.PathLike) -> None:
    """ValueError naming the file (and the key or tensor) unless every count and length in the
    GGUF header at ``path`` fits inside the file; returns None when the reader may parse it."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size < 24:  # magic + version + two u64 counts
            raise ValueError(f"{path}: {size} bytes is too short for a GGUF header (at least 24)")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            _Scan(m, size, path).run()
    except OSError as e:
        raise ValueError(f"{path}: cannot read GGUF file ({e})") from e


class _Scan:
    def __init__(self, buf, size: int, path: str):
        self.buf, self.size, self.path = buf, size, path
        self.pos = 0
        self.elements = 0  # metadata array elements so far, against MAX_METADATA_ELEMENTS

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: {what}")

    # ------------------------------------------------------------------ primitives

    def need(self, n: int, what: str) -> None:
        left = self.size - self.pos
        if n > left:
            raise self.fail(f"{what} needs {n} bytes at offset {self.pos}, but only {left} are left in the "
                            f"file ({self.size} bytes): truncated or corrupt GGUF")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = self.u32s.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = self.u64s.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str, decode: bool) -> str | None:
        n = self.u64(f"the length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        start, self.pos = self.pos, self.pos + n
        if not decode:
            return None
        try:
            return bytes(self.buf[start:self.pos]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} at offset {start} is not UTF-8 ({e.reason})") from None

    # ------------------------------------------------------------------ layout

    def run(self) -> None:
        if self.buf[:4] != GGUF_MAGIC:
            raise self.fail(f"not a GGUF file (starts with {bytes(self.buf[:4])!r}, expected {GGUF_MAGIC!r})")
        # the reader's rule: a version whose low 16 bits are zero was written byte-swapped
        (version,) = struct.unpack_from("<I", self.buf, 4)
        order = "<"
        if version & 0xFFFF == 0:
            order = ">"
            (version,) = struct.unpack_from(">I", self.buf, 4)
        self.u32s, self.u64s = struct.Struct(order + "I"), struct.Struct(order + "Q")
        if version not in SUPPORTED_VERSIONS:
            raise self.fail(f"GGUF version {version} is not supported (versions {SUPPORTED_VERSIONS})")
        self.pos = 8
        n_tensors = self.u64("the tensor count")
        n_kv = self.u64("the metadata key/value count")
        left = self.size - self.pos
        if n_tensors > MAX_TENSORS:
            raise self.fail(f"header claims {n_tensors} tensors (limit {MAX_TENSORS})")
        if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > left:
            raise self.fail(f"header claims {n_kv} metadata keys and {n_tensors} tensors, which cannot fit in "
                            f"the {left} bytes left in the file")
        alignment = DEFAULT_ALIGNMENT
        keys: set[str] = set()
        for i in range(n_kv):
            key = self.string(f"metadata key #{i}", decode=True)
            if key in keys:
                raise self.fail(f"metadata key {key!r} appears twice")
            keys.add(key)
            vtype = self.u32(f"the value type of {key!r}")
            if key == "general.alignment":
                alignment = self.alignment(vtype)
            else:
                self.value(vtype, key, depth=0)
        tensors = [self.tensor_info(i) for i in range(n_tensors)]
        data_start = -(-self.pos // alignment) * alignment
        names: set[str] = set()
        for name, n_bytes, offset in tensors:
            if name in names:
                raise self.fail(f"tensor {name!r} appears twice")
            names.add(name)
            end = data_start + offset + n_bytes
            if end > self.size:
                raise self.fail(f"tensor {name!r} claims {n_bytes} bytes at data offset {offset}, past the end of "
                                f"the file ({end} > {self.size} bytes)")

    def alignment(self, vtype: int) -> int:
        if vtype != _UINT32:  # the reader insists on uint32
            raise self.fail(f"metadata 'general.alignment' is a {_TYPE_NAMES.get(vtype, vtype)}, not a uint32")
        a = self.u32("the value of 'general.alignment'")
        if a == 0 or a & (a - 1):
            raise self.fail(f"metadata 'general.alignment' = {a} is not a power of two")
        return a

    def value(self, vtype: int, key: str, depth: int) -> None:
        size = _SCALAR_SIZES.get(vtype)
        if size is not None:
            self.need(size, f"the value of {key!r}")
            self.pos += size
        elif vtype == _STRING:
            self.string(f"the value of {key!r}", decode=False)
        elif vtype == _ARRAY:
            self.array(key, depth)
        else:
            raise self.fail(f"metadata {key!r} has unknown value type {vtype}")

    def array(self, key: str, depth: int) -> None:
        if depth >= MAX_ARRAY_NESTING:
            raise self.fail(f"metadata {key!r} nests arrays more than {MAX_ARRAY_NESTING} deep")
        itype = self.u32(f"the item type of array {key!r}")
        count = self.u64(f"the length of array {key!r}")
        self.elements += count
        if self.elements > MAX_METADATA_ELEMENTS:
            raise self.fail(f"metadata {key!r} claims {count} array elements, past the limit of "
                            f"{MAX_METADATA_ELEMENTS} metadata array elements in one file")
        size = _SCALAR_SIZES.get(itype)
        least = size if size is not None else 8 if itype == _STRING else 12 if itype == _ARRAY else None
        if least is None:
            raise self.fail(f"metadata array {key!r} has unknown item type {itype}")
        left = self.size - self.pos
        if count * least > left:
            raise self.fail(f"metadata {key!r} claims {count} {_TYPE_NAMES[itype]} elements (at least "
                            f"{count * least} bytes), but only {left} bytes are left in the file")
        if size is not None:
            self.pos += count * size
        elif itype == _STRING:
            # the hot loop: a 49k-token vocabulary is two string arrays of ~49k items
            buf, unpack, end, pos = self.buf, self.u64s.unpack_from, self.size, self.pos
            for j in range(count):
                if pos + 8 > end:
                    self.pos = pos
                    self.need(8, f"the length of {key!r}[{j}]")
                (n,) = unpack(buf, pos)
                pos += 8
                if n > end - pos:
                    raise self.fail(f"metadata {key!r}[{j}] claims a {n}-byte string at offset {pos}, but only "
                                    f"{end - pos} bytes are left in the file")
                pos += n
            self.pos = pos
        else:
            for j in range(count):
                self.array(f"{key}[{j}]", depth + 1)

    def tensor_info(self, i: int) -> tuple[str, int, int]:
        name = self.string(f"the name of tensor #{i}", decode=True)
        n_dims = self.u32(f"the dimension count of tensor {name!r}")
        if n_dims > GGML_MAX_DIMS:
            raise self.fail(f"tensor {name!r} claims {n_dims} dimensions (ggml allows {GGML_MAX_DIMS})")
        dims = [self.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
        ggml_type = self.u32(f"the type of tensor {name!r}")
        sizes = _ggml_sizes()
        if ggml_type not in sizes:
            raise self.fail(f"tensor {name!r} has unknown ggml type {ggml_type}")
        offset = self.u64(f"the data offset of tensor {name!r}")
        block, type_bytes = sizes[ggml_type]
        if dims and dims[0] % block:
            raise self.fail(f"tensor {name!r}: its first dimension {dims[0]} is not a multiple of its type's "
                            f"block of {block} values")
        n_elements = 1
        for d in dims:
            n_elements *= d  # Python ints: no overflow, and compared with the file size below
        return name, n_elements // block * type_bytes, offset


@functools.lru_cache(maxsize=1)
def _ggml_sizes() -> dict[int, tuple[int, int]]:
    """ggml type id -> (values per block, bytes per block), from gguf-py's own table."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(t): v for t, v in GGML_QUANT_SIZES.items()}
