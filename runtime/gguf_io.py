"""Opening a GGUF file once: the `gguf` package's reader plus its metadata as plain Python values.

`gguf.GGUFReader` walks every metadata value in Python, which costs seconds on a file with a
49k-token vocabulary, and the config, the weights and the tokenizer all need the same file. So
one parsed `GGUFFile` per path is cached here (keyed by size and mtime, so a rewritten file is
read again). The reader memory-maps the file: tensor bytes are only paged in when dequantized.

Before the reader sees a file, `gguf_guard.check_gguf_header` checks every count and length in
its header against the file's size (the reader trusts them and can run for ever on a tiny file).
Anything either cannot parse (a truncated file, random bytes, a wrong magic) raises `ValueError`
naming the file; nothing here ever unpickles.
"""
from __future__ import annotations

import functools
import os
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
        reader = gguf.GGUFReader(path, "r")
        metadata = {key: field.contents() for key, field in reader.fields.items()}
        names = tuple(t.name for t in reader.tensors)
    except Exception as e:  # the reader raises whatever numpy/struct raise on a short or bad file
        raise ValueError(f"{path}: malformed GGUF file ({type(e).__name__}: {e})") from e
    if "general.architecture" not in metadata:
        raise ValueError(f"{path}: GGUF metadata has no general.architecture")
    return GGUFFile(Path(path), reader, metadata, names)
