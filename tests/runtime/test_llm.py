"""runtime/llm.py: the generation API (generate, stream, chat), finish reasons, stop handling,
seeded sampling, batching and the exports, on the shipped SmolLM2 GGUF (CPU, torch backend)."""
from __future__ import annotations

import genfuse.runtime
import pytest
import torch
from genfuse.runtime.llm import LLM, Completion
from genfuse.runtime.sampling import SamplingParams
from llm_helpers import one_thread, smollm_llm, tiny_folder

import genfuse

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = "Once upon a time, in a small village by the sea,"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def llm():
    return smollm_llm()


@pytest.fixture(scope="module")
def story(llm):
    """Greedy reference: 24 tokens past EOS."""
    [c] = llm.generate(STORY, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    return c


def test_exports():
    assert genfuse.LLM is genfuse.runtime.LLM is LLM
    assert genfuse.SamplingParams is genfuse.runtime.SamplingParams is SamplingParams
    assert genfuse.Completion is genfuse.runtime.Completion is Completion


def test_length_finish_and_fields(llm, story):
    c = story
    assert isinstance(c, Completion)
    assert c.finish_reason == "length" and len(c.token_ids) == 24
    assert c.text == llm.tokenizer.decode(c.token_ids, skip_special_tokens=True) and c.text
    assert c.prompt_token_ids == llm.tokenizer.encode(STORY)
    assert 0 < c.ttft_s and c.tokens_per_s > 0


def test_eos_ends_with_stop_and_is_not_in_text(llm):
    c = llm.chat(QUESTION, SamplingParams(max_tokens=48, temperature=0))
    assert c.finish_reason == "stop"
    assert c.token_ids[-1] in llm.eos_token_ids
    assert "Paris" in c.text and "<|im_end|>" not in c.text
    # ignore_eos runs on past it
    c2 = llm.chat(QUESTION, SamplingParams(max_tokens=len(c.token_ids) + 3, temperature=0, ignore_eos=True))
    assert c2.finish_reason == "length" and c2.token_ids[:len(c.token_ids)] == c.token_ids


def test_stop_token_ids(llm, story):
    i = 5
    t = story.token_ids[i]
    first = story.token_ids.index(t)
    c = llm.generate(STORY, SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[t]))[0]
    assert c.finish_reason == "stop"
    assert c.token_ids == story.token_ids[:first + 1]


def test_stop_strings_are_cut(llm, story):
    text = story.text
    stop = text[len(text) // 2:len(text) // 2 + 4]
    cut = text.find(stop)
    params = SamplingParams(max_tokens=24, temperature=0, stop=["@@never@@", stop])
    c = llm.generate(STORY, params)[0]
    assert c.finish_reason == "stop"
    assert c.text == text[:cut]
    assert len(c.token_ids) < 24 and c.token_ids == story.token_ids[:len(c.token_ids)]
    assert "".join(llm.stream(STORY, params)) == c.text  # streaming holds back a possible stop prefix


def test_stream_pieces_concatenate_to_the_text(llm, story):
    pieces = list(llm.stream(STORY, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)))
    assert len(pieces) > 5
    assert "".join(pieces) == story.text
    assert all("\ufffd" not in p for p in pieces)


def test_batch_equals_one_by_one(llm, story):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    other = "The three primary colors are"
    batch = llm.generate([STORY, other, llm.chat_prompt(QUESTION)], params)
    assert batch[0].token_ids == story.token_ids[:12]
    assert batch[1].token_ids == llm.generate(other, params)[0].token_ids
    assert batch[2].token_ids == llm.generate([llm.chat_prompt(QUESTION)], params)[0].token_ids


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    a = llm.generate(STORY, params)[0].token_ids
    b = llm.generate(STORY, params)[0].token_ids
    assert a == b
    others = [llm.generate(STORY, SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50,
                                                 seed=s, ignore_eos=True))[0].token_ids for s in (1, 2)]
    assert any(o != a for o in others)  # the seed matters


def test_token_id_prompts_without_tokenizer(tmp_path):
    _, folder = tiny_folder("smol", tmp_path / "m")
    llm = LLM(folder, device="cpu", backend="torch")
    [c] = llm.generate([1, 2, 3], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(c.token_ids) == 4 and c.text == ""
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("hello", SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 10**6]], SamplingParams(max_tokens=4))
    # past the context (max_model_len = max_position_embeddings = 256): "length" at the end of it
    [c] = llm.generate([1, 2, 3], SamplingParams(max_tokens=10**5, temperature=0, ignore_eos=True))
    assert c.finish_reason == "length" and len(c.token_ids) == 256 - 3
    with pytest.raises(ValueError, match="max_model_len=256"):
        llm.generate([[1] * 256])


def test_hf_folder_with_tokenizer_and_shards(llm, tmp_path):
    """SmolLM2 written as a Hugging Face folder by transformers (sharded safetensors + index,
    tokenizer.json, tokenizer_config.json with the chat template) generates what the GGUF does."""
    import transformers
    from llm_helpers import smollm_transformers
    from loader_helpers import smollm_gguf

    folder = tmp_path / "smollm2"
    gguf_model = smollm_transformers()  # transformers will not save a GGUF-loaded model: copy it
    config = transformers.LlamaConfig.from_dict(
        {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"})
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.save_pretrained(str(folder), max_shard_size="200MB")
    src = tmp_path / "link"
    src.mkdir()
    (src / smollm_gguf().name).symlink_to(smollm_gguf())
    transformers.AutoTokenizer.from_pretrained(str(src), gguf_file=smollm_gguf().name).save_pretrained(str(folder))
    assert (folder / "model.safetensors.index.json").is_file()
    from_folder = LLM(folder, device="cpu", backend="torch")
    assert from_folder.tokenizer.encode(STORY) == llm.tokenizer.encode(STORY)
    params = SamplingParams(max_tokens=12, temperature=0)
    c = from_folder.chat(QUESTION, params)
    assert c.token_ids == llm.chat(QUESTION, params).token_ids and "Paris" in c.text
