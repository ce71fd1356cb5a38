"""Weight loaders: a Hugging Face folder's safetensors, or a .gguf file, into one state dict.

Canonical naming (what the model code reads, whatever the source; each family declares its
names, shapes and GGUF mapping in its `runtime/models/<family>.py` `Family` record):

    llama family (Llama, SmolLM2, Mistral, Qwen2), Hugging Face's LlamaForCausalLM names:
        model.embed_tokens.weight                               (vocab, hidden)
        model.layers.{i}.input_layernorm.weight                 (hidden,)
        model.layers.{i}.self_attn.{q,k,v}_proj.weight          (heads*hd | kv_heads*hd, hidden)
        model.layers.{i}.self_attn.{q,k,v}_proj.bias            only with config.attention_bias
        model.layers.{i}.self_attn.o_proj.weight  [.bias]       (hidden, heads*hd)
        model.layers.{i}.post_attention_layernorm.weight        (hidden,)
        model.layers.{i}.mlp.{gate,up}_proj.weight  [.bias]     (intermediate, hidden)
        model.layers.{i}.mlp.down_proj.weight  [.bias]          (hidden, intermediate)
        model.norm.weight                                       (hidden,)
        lm_head.weight                                          only when not tied
        model.rope_freqs                                        only with rope_type "freq_factors"
    gpt2, Hugging Face's GPT2LMHeadModel names, every matrix in nn.Linear (out, in) layout
    (GPT-2's Conv1D stores (in, out): safetensors weights are transposed here):
        transformer.wte.weight (vocab, hidden), transformer.wpe.weight (positions, hidden)
        transformer.h.{i}.ln_1.{weight,bias}, transformer.h.{i}.ln_2.{weight,bias}
        transformer.h.{i}.attn.c_attn.weight (3*hidden, hidden) + .bias   (q, k, v stacked)
        transformer.h.{i}.attn.c_proj.weight (hidden, hidden) + .bias
        transformer.h.{i}.mlp.c_fc.weight (intermediate, hidden) + .bias
        transformer.h.{i}.mlp.c_proj.weight (hidden, intermediate) + .bias
        transformer.ln_f.{weight,bias}
        lm_head.weight                                          only when not tied

Tied models carry no lm_head.weight (a checkpoint's copy is dropped): the model ties it to the
embedding. The loaded dict is checked against `expected_shapes(config)`: a missing, unexpected
or misshapen tensor raises ValueError naming the file.

Safetensors are opened with `safetensors.safe_open` (memory-mapped, one tensor at a time, no
pickle). GGUF tensors come from `gguf.GGUFReader` (memory-mapped) and are dequantized with
`gguf.quants.dequantize` (F32, F16, BF16, Q8_0, Q4_0, Q4_1) to float32; the K-quants (Q4_K, Q5_K,
Q6_K) go through genfuse's C++ dequantizer, bitwise the same values and ~100x faster. llama.cpp stores the
q/k projections of arch "llama" files with each head's rows interleaved for its rotary layout;
that permutation is undone here exactly as transformers' GGUF loader does. Pickle checkpoints
(`*.bin`, `*.pt`) are refused, never `torch.load`-ed.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator

import numpy as np
import torch

from .config import ModelConfig, load_config
from .distributed import shard_tensor, sharded_shape
from .models import family_for

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# --------------------------------------------------------------------------- expected layout


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor name the model needs, with its shape."""
    shapes = _top_shapes(config)
    for i in range(config.num_layers):
        shapes.update(_layer_shapes(config, i))
    return shapes


def expected_tensor_count(config: ModelConfig) -> int:
    """len(expected_shapes(config)), without building one entry per layer (a lying config may
    claim a billion layers; this is compared with the file first)."""
    return len(_top_shapes(config)) + config.num_layers * len(_layer_shapes(config, 0))


def tp_split(name: str, config: ModelConfig, plan):
    return family_for(config.arch).tp_split(name, config, plan)


def _top_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = family_for(c.arch).top_shapes(c)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    return shapes


def _layer_shapes(c: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    return family_for(c.arch).layer_shapes(c, i)


def check_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig, source: str, tp_plan=None) -> None:
    """ValueError naming ``source`` unless the names and shapes are exactly the expected ones
    (with ``tp_plan``, those of that rank's slice)."""
    family = config.model_type or config.arch
    n_want = expected_tensor_count(config)
    if n_want > 2 * len(state_dict) + 64:
        # refused before expected_shapes builds one entry per layer the config claims; below
        # this the list costs no more than the file's own and names what is missing
        raise ValueError(f"{source}: the {family} config ({config.num_layers} layers) implies {n_want} tensors, "
                         f"the file holds {len(state_dict)}")
    want = expected_shapes(config)
    missing = sorted(set(want) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(want))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise ValueError(f"{source}: tensors do not match the {family} config: " + "; ".join(parts))
    split = (lambda name: None) if tp_plan is None else (lambda name: tp_split(name, config, tp_plan))
    for name, shape in want.items():
        shape = sharded_shape(shape, split(name))
        got = tuple(state_dict[name].shape)
        if got != shape:
            raise ValueError(f"{source}: {name} has shape {got}, the config implies {shape}")


# --------------------------------------------------------------------------- entry point


def load_weights(path: str | os.PathLike, config: ModelConfig | None = None, *,
                 dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 packed: bool = False, tp_plan=None) -> dict[str, torch.Tensor]:
    """The canonical state dict of a model folder (safetensors) or a .gguf file.

    ``dtype=None`` keeps a safetensors file's own dtype and gives float32 for GGUF (quantized
    blocks dequantize to float32; F16/BF16 convert exactly). ``config`` defaults to
    `load_config(path)`. ``packed=True`` (GGUF, CPU, float32 only; see `runtime.quant`) keeps
    the Q4_0 / Q4_1 / Q8_0 / Q4_K / Q5_K / Q6_K matrices as `PackedWeight` blocks instead of
    dequantizing them.
    ``tp_plan`` (`runtime.distributed.TPPlan`): keep only that rank's slice of each tensor, cut
    as soon as the tensor is read, so a rank holds about 1/N of the split weights.
    """
    p = Path(path)
    if config is None:
        config = load_config(p)
    if tp_plan is None:
        cut = lambda name, t: t  # noqa: E731
    else:
        cut = lambda name, t: shard_tensor(t, tp_split(name, config, tp_plan))  # noqa: E731
    if p.is_dir():
        sd = _load_folder(p, config, dtype, device, cut)
        source = str(p)
    elif p.suffix == ".gguf" and p.is_file():
        sd = _load_gguf(p, config, dtype, device, packed, cut)
        source = str(p)
    else:
        raise ValueError(f"{p}: not a model folder or a .gguf file")
    check_state_dict(sd, config, source, tp_plan)
    return sd


# --------------------------------------------------------------------------- safetensors


def safetensors_files(folder: Path) -> list[Path]:
    """The folder's weight files: those the index names, else `model.safetensors`, else all
    `*.safetensors`. Pickle-only folders, and shards named or linked outside the folder, are
    refused with a ValueError naming the file."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: malformed safetensors index ({type(e).__name__}: {e})") from e
        return [_shard_path(folder, index, f) for f in files]
    single = folder / "model.safetensors"
    if single.is_file():
        return [_check_inside(folder, single)]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return [_check_inside(folder, f) for f in found]
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{folder / pickles[0]}: pickle checkpoints are not loaded (unpickling runs code); "
                         "convert the model to safetensors")
    raise ValueError(f"{folder}: no *.safetensors weights in the model folder")


def _shard_path(folder: Path, index: Path, name: object) -> Path:
    """The shard an index names: a plain relative path inside ``folder`` (never ``../x`` or
    ``/abs/x``) that, links followed, stays inside it too (see `_check_inside`)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{index}: shard names must be non-empty strings, got {name!r}")
    rel = PurePosixPath(name.replace("\\", "/"))
    if rel.is_absolute() or PureWindowsPath(name).drive or ".." in rel.parts or "\0" in name:
        raise ValueError(f"{index}: names shard {name!r}, which is outside the model folder {folder}")
    f = folder / rel
    if not f.is_file():
        raise ValueError(f"{index}: names shard {name}, which is not in {folder}")
    return _check_inside(folder, f)


def _check_inside(folder: Path, f: Path) -> Path:
    """``f`` unless a symbolic link takes it out of ``folder`` (a link in an unpacked archive must
    not make the loader read any file on the machine). The one layout allowed out is the Hugging
    Face hub cache's: ``<repo>/snapshots/<revision>/x`` links to ``<repo>/blobs/<hash>``."""
    real, home = f.resolve(), folder.resolve()
    allowed = [home]
    if home.parent.name == "snapshots":
        allowed.append(home.parent.parent / "blobs")
    if not any(real.is_relative_to(a) for a in allowed):
        raise ValueError(f"{f}: is a link to {real}, outside the model folder {folder}")
    return f


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(name, tensor, file) for every tensor, read one at a time from the memory map."""
    from safetensors import safe_open

    seen: dict[str, Path] = {}
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt", device="cpu")
        except Exception as e:  # SafetensorError, OSError: truncated, random bytes, bad header
            raise ValueError(f"{f}: malformed safetensors file ({type(e).__name__}: {e})") from e
        with handle:
            for name in handle.keys():
                if name in seen:
                    raise ValueError(f"{f}: tensor {name} also appears in {seen[name]}")
                seen[name] = f
                try:
                    t = handle.get_tensor(name)
                except Exception as e:
                    raise ValueError(f"{f}: cannot read tensor {name} ({type(e).__name__}: {e})") from e
                yield name, t, f


def _canonical_hf_name(name: str, config: ModelConfig) -> str | None:
    """A checkpoint key -> its canonical name, or None for a key to drop (buffers, tied heads)."""
    name = family_for(config.arch).hf_name(name)
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return None
    return name


def _load_folder(folder: Path, config: ModelConfig, dtype, device, cut) -> dict[str, torch.Tensor]:
    family = family_for(config.arch)
    sd: dict[str, torch.Tensor] = {}
    for name, t, f in iter_safetensors(safetensors_files(folder)):
        canon = _canonical_hf_name(name, config)
        if canon is None:
            continue
        t = family.hf_tensor(canon, t, str(f))
        if canon in sd:
            raise ValueError(f"{f}: {name} maps to {canon}, which another key already gave")
        sd[canon] = _finish(cut(canon, t), dtype, device)
    return sd


def _finish(t: torch.Tensor, dtype, device) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.to(device).contiguous()


# --------------------------------------------------------------------------- GGUF

_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def gguf_to_canonical(name: str, config: ModelConfig) -> str | None:
    """A GGUF tensor name -> its canonical name (None if the family has no such tensor)."""
    family = family_for(config.arch)
    if name in family.gguf_top:
        return family.gguf_top[name]
    m = _GGUF_BLOCK.match(name)
    if m and m.group(2) in family.gguf_block:
        return f"{family.layer_prefix}.{m.group(1)}.{family.gguf_block[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf `LlamaModel.permute`).

    llama.cpp reorders each head's rows from HF's rotate-half layout (two halves of hd/2) to
    interleaved pairs: rows (n_heads, 2, hd/2) are written as (n_heads, hd/2, 2). Reading them as
    (n_heads, hd/2, 2) and swapping the last two row axes restores HF's order. Works on weights
    (rows, in) and biases (rows,).
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot unpermute {rows} rows over {n_heads} heads")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_supported_types() -> dict:
    from gguf import GGMLQuantizationType as T

    return {T.F32: "F32", T.F16: "F16", T.BF16: "BF16", T.Q8_0: "Q8_0", T.Q4_0: "Q4_0", T.Q4_1: "Q4_1",
            T.Q4_K: "Q4_K", T.Q5_K: "Q5_K", T.Q6_K: "Q6_K"}


def _dequantize_blocks(data: np.ndarray, qtype) -> np.ndarray:
    """GGML blocks -> float32 values, flat. The K-quants through genfuse._C.dequantize_rows (gguf's
    numpy reference takes ~1 s for a 4096 x 4096 Q4_K matrix; the results are bitwise equal, which
    tests/runtime/test_kquant.py checks); the rest, or without the extension, gguf's own."""
    from gguf.quants import dequantize

    from .quant import BLOCK_BYTES, BLOCK_WEIGHTS, QTYPES

    name = qtype.name
    if name in ("Q4_K", "Q5_K", "Q6_K"):
        try:
            from genfuse import _C
        except ImportError:
            _C = None
        if _C is not None:
            from .threads import kernel_threads

            raw = np.ascontiguousarray(data, dtype=np.uint8)
            rows = raw.reshape(-1, raw.shape[-1] if raw.ndim > 1 else raw.size)  # ggml rows: whole blocks
            out = np.empty((rows.shape[0], rows.shape[1] // BLOCK_BYTES[name] * BLOCK_WEIGHTS[name]), dtype=np.float32)
            _C.dequantize_rows(rows, QTYPES[name], out.shape[1], None, out, kernel_threads())
            return out.reshape(-1)
    return dequantize(data, qtype)


def dequantize_gguf_tensor(t, source: str) -> np.ndarray:
    """One `gguf.ReaderTensor` -> a float32 array in numpy (row-major, torch) order."""
    supported = gguf_supported_types()
    if t.tensor_type not in supported:
        raise ValueError(f"{source}: tensor {t.name} is {t.tensor_type.name}, which genfuse does not read; "
                         f"supported GGUF tensor types: {', '.join(supported.values())}")
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # ggml lists the fastest dim first
    try:
        arr = _dequantize_blocks(t.data, t.tensor_type)
    except Exception as e:
        raise ValueError(f"{source}: cannot dequantize {t.name} ({type(e).__name__}: {e})") from e
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{source}: {t.name} holds {arr.size} values, its shape {shape} needs {int(np.prod(shape))}")
    # always a private float32 copy: F32 tensors would otherwise be views of the read-only mmap
    return np.array(arr.reshape(shape), dtype=np.float32, copy=True)


def _packed_gguf_tensor(t, source: str, packed_weight):
    """One quantized 2-D `gguf.ReaderTensor` as a PackedWeight (a private copy of its blocks)."""
    N, K = (int(x) for x in reversed(t.shape.tolist()))
    data = np.array(t.data, dtype=np.uint8, copy=True)  # (N, row bytes); the mmap is read-only
    try:
        return packed_weight(torch.from_numpy(data.reshape(N, -1)), t.tensor_type.name, K)
    except ValueError as e:
        raise ValueError(f"{source}: tensor {t.name}: {e}") from e


def _load_gguf(path: Path, config: ModelConfig, dtype, device, packed: bool = False,
               cut=lambda name, t: t) -> dict[str, torch.Tensor]:
    from .gguf_io import open_gguf
    from .quant import QTYPES, PackedWeight

    g = open_gguf(path)
    permuted_heads = family_for(config.arch).gguf_permuted_heads  # llama.cpp's rotary row order
    sd: dict[str, torch.Tensor] = {}
    for t in g.reader.tensors:
        canon = gguf_to_canonical(t.name, config)
        if canon is None:
            raise ValueError(f"{path}: unexpected tensor {t.name} for a {g.architecture} model")
        if canon == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if packed and t.tensor_type.name in QTYPES and len(t.shape) == 2:
            w = _packed_gguf_tensor(t, str(path), PackedWeight)
            heads = permuted_heads(canon, config, g.architecture)
            if heads is not None:
                w = PackedWeight(unpermute_rotary(w.data, heads), w.qtype, w.shape[1])
            sd[canon] = cut(canon, w)
            continue
        w = torch.from_numpy(dequantize_gguf_tensor(t, str(path)))
        heads = permuted_heads(canon, config, g.architecture)
        if heads is not None:
            w = unpermute_rotary(w, heads)
        sd[canon] = _finish(cut(canon, w), dtype, device)
    return sd
