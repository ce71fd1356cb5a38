"""Tokenizer, chat template and streaming detokenizer against transformers' AutoTokenizer."""
from __future__ import annotations

import json

import pytest

from genfuse.runtime.tokenizer import REPLACEMENT_CHAR, Tokenizer, TokenizerNotFoundError
from loader_helpers import hf_gguf_dir, smollm_gguf, tiny_hf_model, write_gguf

import transformers
import jinja2

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. 1234567890 3.14159",
    "héllo wörld — ünïcödé ñ ß ç; 日本語のテキスト; Ελληνικά; русский; العربية",
    "emoji 😀👍🏽🇫🇷 and a family 👨‍👩‍👧 ✨",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f'{x!r}')\r\n}",
    "  leading and trailing spaces  ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "",
]

CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 😀 × 3?\nthanks"}],
    [{"role": "user", "content": "first"}, {"role": "assistant", "content": "second"}],
]


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    """(genfuse tokenizer, transformers tokenizer) for the shipped SmolLM2 GGUF."""
    path = smollm_gguf()
    folder, name = hf_gguf_dir(tmp_path_factory, path)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    return Tokenizer.from_gguf(path), ref


@pytest.mark.parametrize("text", TEXTS)
def test_smollm_encode_decode_like_transformers(smollm, text):
    tok, ref = smollm
    ids = tok.encode(text)
    assert ids == ref(text).input_ids == ref.encode(text)
    assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == ref.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    if "<|" not in text:
        assert tok.decode(ids) == text  # byte-level BPE round-trips


def test_smollm_special_tokens(smollm):
    tok, ref = smollm
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                      ref.pad_token_id)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.vocab_size == len(ref) == 49152
    assert tok.encode("<|im_start|>") == [1]  # a control token stays whole
    assert tok.encode_batch(TEXTS[:3]) == [ref.encode(t) for t in TEXTS[:3]]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_smollm_chat_template_like_transformers(smollm, chat, add_generation_prompt):
    tok, ref = smollm
    messages = CHATS[chat]
    got = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert got == want
    assert tok.encode(got, add_special_tokens=False) == ref.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False)


def test_template_helpers_like_transformers(smollm):
    tok, ref = smollm
    template = ("{{ bos_token }}{{ messages | tojson }}|{{ strftime_now('%Y') }}|"
                "{% for m in messages %}{% generation %}{{ m['content'] | upper }}{% endgeneration %}"
                "{% if loop.last %}{% break %}{% endif %}{% endfor %}|{{ extra }}")
    msgs = [{"role": "user", "content": "héllo <b> 😀"}]
    got = tok.apply_chat_template(msgs, chat_template=template, extra="x")
    assert got == ref.apply_chat_template(msgs, chat_template=template, tokenize=False, extra="x")
    assert '"héllo <b> 😀"' in got  # tojson keeps non-ASCII and does not HTML-escape


def test_template_raise_exception_and_sandbox(smollm):
    tok, _ = smollm
    raising = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    assert tok.apply_chat_template([{"role": "user", "content": ""}], chat_template=raising) == "ok"
    with pytest.raises(jinja2.TemplateError, match="first must be user"):
        tok.apply_chat_template([{"role": "system", "content": ""}], chat_template=raising)
    with pytest.raises(ValueError, match="SecurityError") as e:  # one line for the CLI, the cause kept
        tok.apply_chat_template([], chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    assert isinstance(e.value.__cause__, jinja2.exceptions.SecurityError)
    with pytest.raises(ValueError, match="first must be user"):
        tok.apply_chat_template([{"role": "system", "content": ""}], chat_template=raising)
    with pytest.raises(ValueError, match="TypeError"):
        tok.apply_chat_template([], chat_template="{{ 'a' - 1 }}")
    with pytest.raises(ValueError, match="parse"):
        tok.apply_chat_template([], chat_template="{% for %}")
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        tok.apply_chat_template(["hi"])


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer(smollm, text):
    tok, _ = smollm
    ids = tok.encode(text)
    detok = tok.detokenizer()
    pieces = [detok.push(i) for i in ids]
    assert all(REPLACEMENT_CHAR not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == tok.decode(ids)


def test_incremental_detokenizer_holds_split_characters(smollm):
    tok, _ = smollm
    ids = tok.encode("😀👍🏽🇫🇷")
    # these emoji are byte pieces: some single ids decode to U+FFFD on their own...
    assert any(REPLACEMENT_CHAR in tok.decode([i]) for i in ids)
    detok = tok.detokenizer()
    pieces = [detok.push(i) for i in ids]
    assert "" in pieces  # ...so the detokenizer held some back
    assert "".join(pieces) == "😀👍🏽🇫🇷" and detok.flush() == ""
    # a generation cut inside a character: the rest comes out only on flush
    detok = tok.detokenizer()
    head = "".join(detok.push(i) for i in ids[:1])
    assert REPLACEMENT_CHAR not in head
    assert head + detok.flush() == tok.decode(ids[:1])
    # specials skipped on request
    detok = tok.detokenizer(skip_special_tokens=True)
    assert "".join(detok.push(i) for i in tok.encode("<|im_start|>hi<|im_end|>")) == "hi"


def test_folder_tokenizer_like_transformers(smollm, tmp_path):
    _, ref = smollm
    ref.save_pretrained(tmp_path)  # tokenizer.json, tokenizer_config.json, chat template
    tok = Tokenizer.load(tmp_path)
    folder_ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert tok.encode(text) == folder_ref.encode(text) == ref.encode(text)
    for messages in CHATS:
        assert tok.apply_chat_template(messages) == folder_ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
    assert (tok.bos_token_id, tok.eos_token_id) == (folder_ref.bos_token_id, folder_ref.eos_token_id)


def test_folder_bos_post_processor_and_template_in_config(smollm, tmp_path):
    """A tokenizer.json that adds BOS (as Llama's do), and the template in tokenizer_config.json."""
    _, ref = smollm
    ref.save_pretrained(tmp_path)
    tj_path = tmp_path / "tokenizer.json"
    tj = json.loads(tj_path.read_text())
    tj["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}}
    tj_path.write_text(json.dumps(tj))
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    template_file = tmp_path / "chat_template.jinja"
    if template_file.exists():  # move it to the older place, inside tokenizer_config.json
        cfg["chat_template"] = template_file.read_text()
        template_file.unlink()
    cfg_path.write_text(json.dumps(cfg))
    tok = Tokenizer.from_folder(tmp_path)
    folder_ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS[:4]:
        assert tok.encode(text) == folder_ref.encode(text)
        assert tok.encode(text)[0] == tok.bos_token_id
        assert tok.encode(text, add_special_tokens=False) == folder_ref.encode(text, add_special_tokens=False)
    assert tok.apply_chat_template(CHATS[1]) == folder_ref.apply_chat_template(
        CHATS[1], tokenize=False, add_generation_prompt=True)


def test_folder_without_tokenizer(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path)  # config.json + model.safetensors only
    with pytest.raises(TokenizerNotFoundError, match="tokenizer.json") as e:
        Tokenizer.load(tmp_path)
    assert "token ids" in str(e.value)
    assert isinstance(e.value, FileNotFoundError)


def test_no_chat_template(smollm, tmp_path):
    _, ref = smollm
    ref.save_pretrained(tmp_path)
    for f in ("chat_template.jinja", "chat_template.json"):
        (tmp_path / f).unlink(missing_ok=True)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_folder(tmp_path).apply_chat_template(CHATS[0])


def test_malformed_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


# --------------------------------------------------------------------------- other GGUF vocabularies


def _spm_vocab():
    """A SentencePiece-style vocabulary (llama.cpp tokenizer model "llama"): no merges in the
    file, scores instead, byte-fallback tokens, a control and a user-defined token."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = ["▁", "e", "t", "h", "a", "o", "l", "r", "n", "s", "d", "w", "i", "H", "W", "!", ",", "é", "c",
              "▁t", "he", "▁the", "ll", "▁w", "or", "▁wor", "ld", "▁world", "el", "▁h", "▁he", "llo", "▁hello",
              "in", "▁in", "▁a", "an", "▁and", "▁H", "▁Hello", "▁▁", "▁▁▁▁"]
    tokens += pieces + ["<|turn|>", "<tool>"]
    types += [1] * len(pieces) + [3, 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0, 0.0]
    return {"model": "llama", "tokens": tokens, "types": types, "scores": scores, "bos": 1, "eos": 2, "unk": 0,
            "chat_template": "{% for m in messages %}<|turn|>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"}


SPM_TEXTS = ["Hello world!", "the world in hello and hell", " leading", "two  spaces    four",
             "héllo 日本 😀 ç", "<|turn|>user <tool> hi</s>", "a\nb\tc", ""]


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    vocab = _spm_vocab()
    model = tiny_hf_model("smol")
    path = write_gguf(d / "spm.gguf", model, "llama", tokenizer=vocab)
    ref = transformers.AutoTokenizer.from_pretrained(str(d), gguf_file="spm.gguf")
    return Tokenizer.from_gguf(path), ref


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_sentencepiece_gguf_like_transformers(spm, text):
    tok, ref = spm
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert ids[:1] == [1]  # BOS by default for a SentencePiece vocabulary
    assert tok.decode(ids) == ref.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    detok = tok.detokenizer(skip_special_tokens=True)
    pieces = [detok.push(i) for i in ids]
    assert all(REPLACEMENT_CHAR not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == tok.decode(ids, skip_special_tokens=True)


def test_sentencepiece_gguf_chat_template(spm):
    tok, ref = spm
    for messages in CHATS:
        assert tok.apply_chat_template(messages) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


def test_byte_level_gguf_with_split_regex(smollm, tmp_path):
    """A byte-level vocabulary whose pre-tokenizer llama.cpp names (llama-bpe: Llama 3's regex)."""
    from genfuse.runtime.gguf_io import open_gguf

    md = open_gguf(smollm_gguf()).metadata
    vocab = {"model": "gpt2", "pre": "llama-bpe", "tokens": md["tokenizer.ggml.tokens"],
             "types": md["tokenizer.ggml.token_type"], "merges": md["tokenizer.ggml.merges"], "bos": 1, "eos": 2}
    write_gguf(tmp_path / "bpe.gguf", tiny_hf_model("smol"), "llama", tokenizer=vocab)
    tok = Tokenizer.from_gguf(tmp_path / "bpe.gguf")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="bpe.gguf")
    for text in TEXTS + ["12345678 apples, I'LL see you're 1,000,000"]:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))
    # the regex is really in use: Llama 3's splits "(hello" and "'LL" unlike GPT-2's
    def chunks(t, s):
        return [c for c, _ in t.backend.pre_tokenizer.pre_tokenize_str(s)]
    assert chunks(tok, "(hello I'LL") != chunks(smollm[0], "(hello I'LL")


@pytest.mark.parametrize("bad, why", [("Ġt zzzq", "names a token not in the vocabulary"),
                                      ("Ġthe", "is not two tokens separated by a space")])
def test_gguf_bad_merge_is_named(tmp_path, bad, why):
    """The fast path hands merges to tokenizers unchecked; a bad one is still named by index."""
    from genfuse.runtime.gguf_io import open_gguf

    md = open_gguf(smollm_gguf()).metadata
    merges = list(md["tokenizer.ggml.merges"][:300])
    merges[123] = bad
    vocab = {"model": "gpt2", "pre": "smollm", "tokens": md["tokenizer.ggml.tokens"],
             "types": md["tokenizer.ggml.token_type"], "merges": merges, "bos": 1, "eos": 2}
    write_gguf(tmp_path / "bad.gguf", tiny_hf_model("smol"), "llama", tokenizer=vocab)
    with pytest.raises(ValueError, match=rf"tokenizer.ggml.merges\[123\] = {bad!r} {why}"):
        Tokenizer.from_gguf(tmp_path / "bad.gguf")


def test_gguf_without_tokenizer(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_hf_model("smol"), "llama",
                      tokenizer={"model": "none", "tokens": [], "types": []})
    with pytest.raises(TokenizerNotFoundError, match="no tokenizer"):
        Tokenizer.from_gguf(path)


# --------------------------------------------------------------------------- bad input (issue 10, items 11 and 12)


def test_lone_surrogate_is_a_clear_value_error(smollm):
    tok, _ = smollm
    with pytest.raises(ValueError, match=r"text holds a lone surrogate U\+D800 at index 3"):
        tok.encode("abc\ud800def")
    with pytest.raises(ValueError, match=r"texts\[1\] holds a lone surrogate U\+DFFF at index 0"):
        tok.encode_batch(["fine", "\udfff"])
    with pytest.raises(TypeError, match=r"texts\[0\] must be a str"):
        tok.encode_batch([b"bytes"])
    assert tok.encode("abc\U0001F600") == tok.encode("abc😀")  # a real astral character is fine


def test_decode_refuses_ids_that_are_not_ids(smollm):
    tok, _ = smollm
    for bad in (-1, 2**40, 1.5, "2"):
        with pytest.raises(ValueError, match=f"token ids must be non-negative ints.*got {bad!r}"):
            tok.decode([1, bad])


def _raw_tokenizer_gguf(path, **kvs):
    """A GGUF holding only tokenizer metadata (no tensors: Tokenizer.from_gguf reads no weights)."""
    from gguf_writer_helpers import raw_gguf

    path.write_bytes(raw_gguf([_kv("general.architecture", "llama")] + [_kv(k, v) for k, v in kvs.items()]))
    return path


def _kv(key, value):
    from gguf_writer_helpers import GGUF_STRING, GGUF_UINT32, gstr, kv_array, kv_str, kv_u32

    if isinstance(value, str):
        return kv_str(key, value)
    if isinstance(value, int):
        return kv_u32(key, value)
    if all(isinstance(v, str) for v in value):
        return kv_array(key, GGUF_STRING, len(value), b"".join(map(gstr, value)))
    return kv_array(key, GGUF_UINT32, len(value), b"".join(v.to_bytes(4, "little") for v in value))


def test_malformed_gguf_vocabularies_name_the_key(tmp_path):
    tokens = ["a", "b", "ab", "<s>"]
    good = dict(**{"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
                   "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.eos_token_id": 3})
    tok = Tokenizer.from_gguf(_raw_tokenizer_gguf(tmp_path / "good.gguf", **good))
    assert tok.encode("ab", add_special_tokens=False) == [2] and tok.eos_token == "<s>"
    cases = {
        "no_space": ({"tokenizer.ggml.merges": ["ab"]}, "tokenizer.ggml.merges[0] = 'ab' is not two tokens"),
        "oov": ({"tokenizer.ggml.merges": ["a b", "a zz"]}, "tokenizer.ggml.merges[1] = 'a zz' names a token not"),
        "int_merges": ({"tokenizer.ggml.merges": [1, 2]}, "tokenizer.ggml.merges[0] = 1 is not one of strings"),
        "int_tokens": ({"tokenizer.ggml.tokens": [1, 2, 3]}, "tokenizer.ggml.tokens[0] = 1 is not one of strings"),
        "str_types": ({"tokenizer.ggml.token_type": ["x"] * 4}, "tokenizer.ggml.token_type[0] = 'x'"),
        "str_eos": ({"tokenizer.ggml.eos_token_id": "two"}, "tokenizer.ggml.eos_token_id = 'two' is not an int"),
        "int_model": ({"tokenizer.ggml.model": 5}, "tokenizer.ggml.model = 5 is not a string"),
        "int_template": ({"tokenizer.chat_template": 5}, "tokenizer.chat_template = 5 is not a string"),
        "kind": ({"tokenizer.ggml.model": "bert"}, "'bert' is not supported"),
    }
    for name, (change, needle) in cases.items():
        f = _raw_tokenizer_gguf(tmp_path / f"{name}.gguf", **{**good, **change})
        with pytest.raises(ValueError) as e:  # not tokenizers' TypeError / bare Exception
            Tokenizer.from_gguf(f)
        assert str(e.value).startswith(str(f) + ":") and needle in str(e.value), (name, str(e.value))


@pytest.mark.parametrize("messages,needle", [
    ([{"role": "user"}], r"messages\[0\] \(user\) has no 'content'"),
    ([{"role": "user", "content": "hi"}, {"content": "x"}], r"messages\[1\] has no 'role'"),
    ([{"role": 1, "content": "x"}], r"messages\[0\]\['role'\] must be a string, got int"),
    ([{"role": "user", "content": 5}], r"messages\[0\]\['content'\] must be a string"),
    ([{"role": "user", "content": [1, 2]}], r"messages\[0\]\['content'\] must be a string"),
    ([{"role": "user", "content": None}], r"messages\[0\] \(user\) has no 'content'"),
    ([("user", "hi")], r"messages\[0\] must be a dict"),
    ("hello", "messages must be a list"),
    ({"role": "user", "content": "hi"}, "messages must be a list"),
])
def test_chat_messages_are_validated_first(smollm, messages, needle):
    """Before: jinja's UndefinedError (or a template rendering 'None') from inside the template."""
    tok, _ = smollm
    with pytest.raises(ValueError, match=needle):
        tok.apply_chat_template(messages)


def test_chat_messages_that_are_valid(smollm):
    tok, _ = smollm
    tool_call = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}
    template = "{% for m in messages %}{{ m['role'] }}:{{ m.content if m.content is string else '-' }};{% endfor %}"
    parts = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    got = tok.apply_chat_template([{"role": "user", "content": "a"}, tool_call, parts], chat_template=template)
    assert got == "user:a;assistant:-;user:-;"
