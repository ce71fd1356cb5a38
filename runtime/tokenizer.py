"""Tokenizer glue: a `tokenizers.Tokenizer` plus special tokens, the chat template and streaming.

Two sources:

- a Hugging Face folder: ``tokenizer.json`` (required), ``tokenizer_config.json`` (special tokens,
  add_bos/eos, chat template), ``chat_template.jinja`` / ``chat_template.json`` (newer layout).
- a GGUF file: vocabulary, merges, token types and special ids from its ``tokenizer.ggml.*``
  metadata, rebuilt with the `tokenizers` library the way transformers' GGUF conversion
  (`transformers.integrations.gguf.gguf_tokenizer_mapping`) builds it, so both encode alike:
  "gpt2" vocabularies become byte-level BPE (with the split regex of the file's pre-tokenizer
  when transformers knows it), "llama" ones SentencePiece-style BPE with byte fallback. The BPE
  itself is always the `tokenizers` library's; transformers is not needed at run time.

The chat template renders with jinja2 in an immutable sandbox whose work is bounded, with the
helpers Hugging Face templates expect (see `runtime.chat_template`).
`IncrementalDetokenizer` turns a growing list of ids into text pieces for streaming without
ever emitting half of a multi-byte character.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from .chat_template import check_messages
from .chat_template import render as render_template
from .config import ConfigReader

REPLACEMENT_CHAR = "\ufffd"


class TokenizerNotFoundError(FileNotFoundError):
    """The model has no tokenizer: token-id prompts still work, text prompts cannot."""


class Tokenizer:
    """Encode/decode, special token ids and the chat template of one model."""

    def __init__(self, backend, *, bos_token: str | None = None, eos_token: str | None = None,
                 unk_token: str | None = None, pad_token: str | None = None,
                 chat_template: str | None = None, source: str = ""):
        self.backend = backend  # tokenizers.Tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        self.chat_template = chat_template
        self.source = source

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """From a model folder or a .gguf file; TokenizerNotFoundError if there is none."""
        p = Path(path)
        if p.is_dir():
            return cls.from_folder(p)
        if p.suffix == ".gguf" and p.is_file():
            return cls.from_gguf(p)
        raise TokenizerNotFoundError(f"{p}: not a model folder or a .gguf file, so no tokenizer")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        folder = Path(folder)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerNotFoundError(
                f"{folder} has no tokenizer.json, so text cannot be tokenized: pass prompts as token ids, "
                "or add the model's tokenizer.json (and tokenizer_config.json) to the folder")
        try:
            backend = Backend.from_file(str(tok_file))
        except Exception as e:
            raise ValueError(f"{tok_file}: malformed tokenizer ({type(e).__name__}: {e})") from e
        cfg = _read_json(folder / "tokenizer_config.json") or {}
        special = {k: _token_str(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        template = _folder_chat_template(folder, cfg)
        # BOS/EOS insertion is tokenizer.json's post-processor; only a file without one gets
        # tokenizer_config's add_bos_token / add_eos_token (transformers' behaviour for the two
        # disagreeing varies with the tokenizer class and version).
        if backend.post_processor is None:
            _set_post_processor(backend, special["bos_token"] if cfg.get("add_bos_token") else None,
                                special["eos_token"] if cfg.get("add_eos_token") else None)
        return cls(backend, chat_template=template, source=str(folder), **special)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        from .gguf_io import open_gguf

        g = open_gguf(path)
        md, source = g.metadata, str(g.path)
        # every tokenizer.ggml.* value the builders read, checked for its type first
        r = ConfigReader(md, source, "GGUF metadata")
        tokens = r.list("tokenizer.ggml.tokens", str, None, what="strings")
        kind = r.str("tokenizer.ggml.model", None)
        if not tokens or kind is None:
            raise TokenizerNotFoundError(f"{g.path}: GGUF metadata has no tokenizer (tokenizer.ggml.*)")
        r.list("tokenizer.ggml.token_type", int, None, what="ints")
        r.list("tokenizer.ggml.scores", (int, float), None, what="numbers")
        r.list("tokenizer.ggml.merges", str, None, what="strings")
        r.str("tokenizer.ggml.pre", None)
        chat_template = r.str("tokenizer.chat_template", None)
        if kind not in ("gpt2", "llama"):
            raise ValueError(f"{g.path}: GGUF tokenizer model {kind!r} is not supported (gpt2, llama)")
        try:
            backend = _byte_level_bpe(md, source) if kind == "gpt2" else _sentencepiece_bpe(md, source)
        except ValueError:
            raise
        except Exception as e:  # tokenizers raises bare Exception / TypeError on a bad vocabulary
            raise ValueError(f"{g.path}: cannot build the {kind} tokenizer from tokenizer.ggml.* "
                             f"({type(e).__name__}: {e})") from e

        def tok(key):
            i = r.int(f"tokenizer.ggml.{key}", None, lo=0, null_ok=True)
            return tokens[i] if i is not None and i < len(tokens) else None

        bos, eos = tok("bos_token_id"), tok("eos_token_id")
        # A SentencePiece vocabulary without the flag gets BOS, as llama.cpp and transformers do.
        add_bos = r.bool("tokenizer.ggml.add_bos_token", kind == "llama")
        add_eos = r.bool("tokenizer.ggml.add_eos_token", False)
        _set_post_processor(backend, bos if add_bos else None, eos if add_eos else None)
        return cls(backend, bos_token=bos, eos_token=eos, unk_token=tok("unknown_token_id"),
                   pad_token=tok("padding_token_id"), chat_template=chat_template, source=source)

    # ------------------------------------------------------------------ ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the model's BOS/EOS rule applies."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:  # tokenizers' answer to a lone surrogate: "TextInputSequence must be str"
            _check_text("text", text)
            raise

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
        try:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        except TypeError:
            for i, t in enumerate(texts):
                _check_text(f"texts[{i}]", t)
            raise

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = list(ids)
        try:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        except (TypeError, OverflowError):  # a float, a str, a negative id or one past 2**32
            bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < 1 << 32),
                       None)
            raise ValueError(f"token ids must be non-negative ints (below 2**32), got {bad!r}") from None

    def detokenizer(self, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, *,
                            chat_template: str | None = None, tools: list | None = None,
                            documents: list | None = None, **kwargs: Any) -> str:
        """The prompt text for ``messages`` ([{"role": ..., "content": ...}, ...]).

        Renders like transformers' ``apply_chat_template(..., tokenize=False)``: the template sees
        ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the special tokens as
        strings (``bos_token``, ``eos_token``, ...) and any extra ``kwargs``. The result usually
        starts with the BOS text itself, so encode it with ``add_special_tokens=False``. The
        messages are checked first and the render's work is bounded (`runtime.chat_template`):
        either gives a ValueError saying what is wrong.
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError(f"{self.source or 'this tokenizer'} has no chat template "
                             "(none in tokenizer_config.json / chat_template.jinja / GGUF metadata)")
        messages = check_messages(messages)
        variables = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                       ("unk_token", self.unk_token), ("pad_token", self.pad_token))
                     if v is not None}
        variables.update(kwargs)
        return render_template(template, messages=messages, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **variables)


def _check_text(name: str, text: str) -> None:
    """ValueError if ``text`` holds a lone surrogate (not valid Unicode: it has no UTF-8 form)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} holds a lone surrogate U+{ord(text[e.start]):04X} at index {e.start}, which is "
                         "not valid Unicode (decode bytes with errors='replace' to get text)") from None


class IncrementalDetokenizer:
    """Streaming text for a growing sequence of token ids.

    Decodes a short window of recent ids and emits only the text past what the window already
    produced, holding back while the text ends in U+FFFD (a multi-byte character split over
    several tokens). The pieces returned by `push` plus `flush` concatenate to `decode(ids)`.
    The window (rather than decoding one id at a time) keeps context-dependent decoding right,
    e.g. SentencePiece's leading-space rule.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids up to here have been emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_ids: int | Iterable[int]) -> str:
        """Add one id (or several); return the new text that is safe to show ("" if none yet)."""
        if isinstance(token_ids, int):
            self.ids.append(token_ids)
        else:
            self.ids.extend(int(t) for t in token_ids)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation); may contain U+FFFD."""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text):]


# --------------------------------------------------------------------------- chat template


def _folder_chat_template(folder: Path, cfg: dict) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    json_file = _read_json(folder / "chat_template.json")
    template = (json_file or {}).get("chat_template") or cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d


def _token_str(v) -> str | None:
    if isinstance(v, dict):  # serialized AddedToken
        v = v.get("content")
    return v if isinstance(v, str) else None


def _set_post_processor(backend, bos: str | None, eos: str | None) -> None:
    from tokenizers import processors

    specials = []
    for t in (bos, eos):
        if t is not None and (tid := backend.token_to_id(t)) is not None and (t, tid) not in specials:
            specials.append((t, tid))
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


# --------------------------------------------------------------------------- GGUF vocabularies

TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4

# llama.cpp's pre-tokenizer names -> the split regex its merges were learned with; names not
# here (gpt2, smollm, ...) use the GPT-2 regex of ByteLevel. Same table as transformers'.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _merges(md: dict, vocab: dict[str, int], scores: dict[str, float] | None = None,
            source: str = "<gguf>", check: bool | None = None) -> list[tuple[str, str]]:
    """The file's merges, or (SentencePiece files list none) the merges its scores imply:
    every split of a token into two vocabulary pieces, best-scored token first, as
    transformers' `generate_merges` orders them. A file's merge that is not two vocabulary
    tokens separated by a space is a ValueError naming it (``check=True``; by default merges of
    two non-empty pieces are returned unchecked and `_bpe` re-reads them checked if the BPE
    builder refuses one)."""
    if md.get("tokenizer.ggml.merges"):
        merges = md["tokenizer.ggml.merges"]
        if check is None:  # fast path: the tokens' membership is left to the BPE builder (_bpe)
            pairs = [tuple(m.split(" ")) for m in merges]
            if set(map(len, pairs)) == {2} and all(map(all, pairs)):
                return pairs
        pairs = []
        for i, m in enumerate(merges):
            a, _, b = m.partition(" ")
            if not a or not b or a not in vocab or b not in vocab:
                why = "is not two tokens separated by a space" if not a or not b else "names a token not in the vocabulary"
                raise ValueError(f"{source}: tokenizer.ggml.merges[{i}] = {m[:60]!r} {why}")
            pairs.append((a, b))
        return pairs
    tokens = md["tokenizer.ggml.tokens"]
    if scores is None:
        scores = dict(zip(tokens, md.get("tokenizer.ggml.scores") or [0.0] * len(tokens)))
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda x: (x[2], len(x[0]), len(x[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _added_tokens(backend, md: dict, byte_level: bool) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens, so
    neither is split by BPE. In a byte-level vocabulary a control token spelled outside the byte
    alphabet is a llama.cpp mislabel and is skipped (transformers does the same)."""
    from tokenizers import AddedToken

    tokens = md["tokenizer.ggml.tokens"]
    types = md.get("tokenizer.ggml.token_type") or ()
    alphabet = set(bytes_to_unicode().values()) if byte_level else None
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty == TOKEN_TYPE_CONTROL and (alphabet is None or set(t) <= alphabet)]
    if control:
        backend.add_special_tokens(control)
    user = [t for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_USER_DEFINED]
    if user:
        vocab = backend.get_vocab()
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user if t in vocab])


def _bpe(md: dict, vocab: dict[str, int], source: str, **kwargs):
    """tokenizers' BPE over ``vocab`` and the file's merges; a merge naming a token outside the
    vocabulary is the ValueError of `_merges` (checked only when the builder refuses)."""
    from tokenizers.models import BPE

    try:
        return BPE(vocab=vocab, merges=_merges(md, vocab, source=source), dropout=None, **kwargs)
    except Exception:  # tokenizers raises a bare Exception: find the merge and name it
        _merges(md, vocab, source=source, check=True)
        raise


def _byte_level_bpe(md: dict, source: str = "<gguf>"):
    from tokenizers import Regex, Tokenizer as Backend, decoders, pre_tokenizers

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    tokens = md["tokenizer.ggml.tokens"]
    if set("".join(tokens)) <= alphabet:  # the usual file: every token in the byte alphabet
        vocab = dict(zip(tokens, range(len(tokens))))
    else:
        vocab = {}
        for i, t in enumerate(tokens):
            # a token written in plain UTF-8 (some files spell added tokens that way) is respelled
            key = t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
            vocab[key] = i
    backend = Backend(_bpe(md, vocab, source, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(md.get("tokenizer.ggml.pre"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    _added_tokens(backend, md, byte_level=True)
    return backend


def _sentencepiece_bpe(md: dict, source: str = "<gguf>"):
    """SentencePiece BPE as transformers' LlamaTokenizer builds it: "▁" for spaces prepended to
    the first word, byte fallback for characters outside the vocabulary."""
    from tokenizers import Tokenizer as Backend, decoders, pre_tokenizers

    vocab = {t: i for i, t in enumerate(md["tokenizer.ggml.tokens"])}
    backend = Backend(_bpe(md, vocab, source, fuse_unk=True, byte_fallback=True))
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(content=" ", left=1, right=0),
    ])
    _added_tokens(backend, md, byte_level=False)
    return backend
