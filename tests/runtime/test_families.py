"""The FAMILIES table is the only place that knows the model families: a new family is one file
(here, this test's `TinyBigram`) and one entry in the table, and config.json parsing, the weight
checks, the loader and the engine pick it up; an unknown architecture is refused by name."""
import json

import pytest
import torch
from safetensors.torch import save_file

from genfuse.runtime import models
from genfuse.runtime.config import ModelConfig
from genfuse.runtime.engine import Engine
from genfuse.runtime.models.family import Family
from genfuse.runtime.sampling import SamplingParams
from genfuse.runtime.weights import expected_shapes


class TinyBigram:
    """A family with no layers: the next token's logits are ``embed[token] @ W.T``."""

    def __init__(self, config, embed, head):
        self.config, self.embed, self.head = config, embed, head

    @classmethod
    def from_state_dict(cls, config, sd, *, backend=None):
        return cls(config, sd["embed.weight"], sd["lm_head.weight"])

    def setup_rope(self, max_len):
        pass

    def forward_step(self, inp, k_pool, v_pool):
        return (self.embed[inp.input_ids[inp.logits_indices]] @ self.head.T).float()


def _hf_config(r, model_type):
    return dict(arch="bigram", vocab_size=r.dim("vocab_size", "vocab_size"), hidden_size=r.dim("dim", "hidden_size"),
                num_layers=1, num_heads=1, num_kv_heads=1, head_dim=4, intermediate_size=4, norm_eps=1e-5,
                max_position_embeddings=64, tie_word_embeddings=False, model_type=model_type)


BIGRAM = Family(
    arch="bigram", model=TinyBigram, hf_model_types=("bigram-lm",), gguf_archs=(),
    hf_config=_hf_config, gguf_config=None, check_config=lambda c: None,
    top_shapes=lambda c: {"embed.weight": (c.vocab_size, c.hidden_size)},
    layer_shapes=lambda c, i: {}, hf_name=lambda name: name, gguf_top={}, gguf_block={}, layer_prefix="")


@pytest.fixture
def bigram(monkeypatch):
    monkeypatch.setitem(models.FAMILIES, "bigram", BIGRAM)  # the one line


def test_a_new_family_runs_end_to_end(bigram, tmp_path):
    V, H = 11, 8
    torch.manual_seed(0)
    embed, head = torch.randn(V, H), torch.randn(V, H)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bigram-lm", "vocab_size": V, "dim": H}))
    save_file({"embed.weight": embed, "lm_head.weight": head}, str(tmp_path / "model.safetensors"))
    config = ModelConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert config.arch == "bigram"
    assert expected_shapes(config) == {"embed.weight": (V, H), "lm_head.weight": (V, H)}

    engine = Engine(str(tmp_path), device="cpu")
    assert isinstance(engine.model, TinyBigram)
    engine.add_request("a", [3], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    got = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            got += out.new_token_ids
    want, t = [], 3
    for _ in range(5):  # the bigram chain, computed by hand
        t = int((embed[t] @ head.T).argmax())
        want.append(t)
    assert got == want


def test_unknown_architectures_are_refused_by_name(bigram):
    with pytest.raises(ValueError, match=r"model_type 'phi' is not supported \(supported: llama, mistral, qwen2, "
                                         r"gpt2, bigram-lm\)"):
        ModelConfig.from_hf({"model_type": "phi"})
    with pytest.raises(ValueError, match=r"GGUF architecture 'phi2' is not supported \(supported: llama, qwen2, "
                                         r"gpt2\)"):
        ModelConfig.from_gguf({"general.architecture": "phi2"}, [])
    with pytest.raises(ValueError, match=r"architecture 'mamba' is not supported \(supported: llama, gpt2, bigram\)"):
        ModelConfig(arch="mamba", vocab_size=4, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4,
                    intermediate_size=8, norm_eps=1e-5, max_position_embeddings=16, tie_word_embeddings=True)


def test_every_family_declares_a_whole_record():
    for arch, fam in models.FAMILIES.items():
        assert fam.arch == arch
        for method in ("from_state_dict", "setup_rope", "forward_step"):
            assert callable(getattr(fam.model, method))
        assert fam.hf_model_types and fam.gguf_archs and fam.layer_prefix
