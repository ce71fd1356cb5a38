"""genfuse.accelerate() on transformers causal LMs and a diffusers pipeline, against the originals.

Tiny random-weight models of each supported family (Llama with GQA and untied embeddings, Qwen2
with q/k/v biases, Mistral, GPT-2) and the real SmolLM2 GGUF loaded by transformers: logits
within 1e-4 of the unpatched model in fp32, the same greedy tokens, the same through Triton's
interpreter with torch's F.linear / SDPA / rms_norm made to raise, the pipeline example, and the
original model left as it was.
"""
import copy
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers

import genfuse
from genfuse.runtime import accelerate_hf
from llm_helpers import one_thread, smollm_transformers

V = 101


def _tiny(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                  pad_token_id=0, bos_token_id=1, eos_token_id=None)
    if kind == "llama":   # GQA 6 / 2, untied embeddings, rope theta not the default
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=5e4)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":  # q/k/v biases
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=None))
    else:
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=48, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=None, pad_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # biases are zero at init: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


KINDS = ("llama", "qwen2", "mistral", "gpt2")


def _greedy(model, ids, n=6):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              do_sample=False, pad_token_id=0)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_greedy_tokens_match(kind):
    model = _tiny(kind)
    before, impl = _state(model), model.config._attn_implementation
    fast = genfuse.accelerate(model, backend="torch")
    ids = torch.randint(2, V, (2, 11))
    with torch.no_grad():
        ref, out = model(ids).logits, fast(ids).logits
    assert (out - ref).abs().max() < 1e-4
    assert torch.equal(_greedy(fast, ids[:1]), _greedy(model, ids[:1]))
    # the original is untouched: same weights, same modules, its own attention implementation
    assert model.config._attn_implementation == impl and fast.config._attn_implementation == "genfuse"
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(type(m).__module__.startswith("genfuse") for m in model.modules())
    kinds = {type(m).__name__ for m in fast.modules()}
    assert {"GenfuseLinear"} <= kinds and ({"GenfuseLayerNorm", "GenfuseMLP"} if kind == "gpt2" else
                                           {"GenfuseRMSNorm", "GenfuseSwiGLUMLP", "GenfuseLlamaAttention"}) <= kinds


@pytest.fixture
def no_torch_compute(monkeypatch):
    """F.linear, SDPA and F.rms_norm raise: what the accelerated modules compute, genfuse does."""
    def boom(*a, **k):
        raise AssertionError("torch compute inside an accelerated module")

    def patch():
        for name in ("linear", "scaled_dot_product_attention", "rms_norm", "layer_norm"):
            monkeypatch.setattr(F, name, boom)
        monkeypatch.setattr(torch, "rms_norm", boom, raising=False)
    return patch


@pytest.mark.parametrize("kind", KINDS)
def test_interpreter_runs_only_genfuse_kernels(kind, no_torch_compute):
    model = _tiny(kind)
    fast = genfuse.accelerate(model, backend="triton")
    ids = torch.randint(2, V, (1, 7))
    with torch.no_grad():
        ref = model(ids).logits
        want = _greedy(model, ids, 3)
        no_torch_compute()
        out = fast(ids).logits
        got = _greedy(fast, ids, 3)
    assert (out - ref).abs().max() < 1e-4
    assert torch.equal(got, want)


def test_attn_implementation_genfuse_at_from_pretrained(tmp_path):
    model = _tiny("llama")
    model.save_pretrained(tmp_path)  # importing accelerate_hf (above) registered "genfuse"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="genfuse").eval()
    assert loaded.config._attn_implementation == "genfuse"
    ids = torch.randint(2, V, (1, 9))
    with torch.no_grad():
        assert (loaded(ids).logits - model(ids).logits).abs().max() < 1e-4


def test_padded_batch_falls_back_to_sdpa_and_says_so(caplog):
    model = _tiny("llama")
    fast = genfuse.accelerate(model, backend="torch")
    ids = torch.randint(2, V, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    accelerate_hf._warned_fallback.clear()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="genfuse"):
        ref = model(ids, attention_mask=mask).logits
        out = fast(ids, attention_mask=mask).logits
    assert (out - ref)[mask.bool()].abs().max() < 1e-4
    assert "explicit attention mask" in caplog.text


def test_unsupported_parts_left_and_named_in_one_warning():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, hidden_act="gelu")
    model = transformers.LlamaForCausalLM(cfg).eval()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fast = genfuse.accelerate(model, backend="torch")
    msgs = [str(x.message) for x in w if "genfuse.accelerate" in str(x.message)]
    assert len(msgs) == 1 and "model.layers.0.mlp (LlamaMLP: hidden_act='gelu'" in msgs[0]
    ids = torch.randint(2, V, (1, 6))
    with torch.no_grad():
        assert (fast(ids).logits - model(ids).logits).abs().max() < 1e-4


def test_inplace_patches_the_model_itself():
    model = _tiny("gpt2")
    ids = torch.randint(2, V, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
    assert genfuse.accelerate(model, backend="torch", inplace=True) is model
    assert model.config._attn_implementation == "genfuse"
    with torch.no_grad():
        assert (model(ids).logits - ref).abs().max() < 1e-4


def test_unknown_architecture_is_refused_by_name():
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=40)
    with pytest.raises(ValueError, match="supports transformers' .*got BertModel"):
        genfuse.accelerate(transformers.BertModel(cfg))


def test_compiled_accelerated_model_matches_eager():
    """torch.compile(fullgraph) of the accelerated forward: the modules call torch.ops.genfuse.*"""
    model = _tiny("llama")
    fast = genfuse.accelerate(model)
    ids = torch.randint(2, V, (1, 9))
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = torch.compile(fast, fullgraph=True, backend="aot_eager")(ids, use_cache=False).logits
    assert (out - ref).abs().max() < 1e-4


# --------------------------------------------------------------------------------------
# The real SmolLM2, loaded by transformers from the shipped GGUF (once per process)
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm():
    model = smollm_transformers()
    return model, genfuse.accelerate(model, backend="torch")


def test_smollm2_logits_and_greedy_tokens(smollm):
    model, fast = smollm
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253]])
    with one_thread(), torch.no_grad():
        assert (fast(ids).logits - model(ids).logits).abs().max() < 1e-4
        assert torch.equal(_greedy(fast, ids, 8), _greedy(model, ids, 8))


def test_smollm2_interpreter_forward(smollm, no_torch_compute):
    """SmolLM2's real weights through the interpreter: its first two layers and final norm (the
    whole model there takes minutes: the 49152-row LM head alone ~25 s; the tiny models above
    cover the head on genfuse linear)."""
    model, _ = smollm
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = 2
    small = transformers.LlamaForCausalLM(cfg).eval()
    keep = {k: v for k, v in model.state_dict().items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < 2}
    small.load_state_dict(keep)
    fast = genfuse.accelerate(small, backend="triton")
    ids = torch.tensor([[1, 504, 3458, 282]])
    with one_thread(), torch.no_grad():
        ref = small.model(ids).last_hidden_state
        no_torch_compute()
        out = fast.model(ids).last_hidden_state
    assert (out - ref).abs().max() < 1e-4


# --------------------------------------------------------------------------------------
# diffusers: a pipeline's VAE decoder
# --------------------------------------------------------------------------------------
def test_diffusers_pipeline_vae_decoder():
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline

    class LatentPipeline(DiffusionPipeline):
        def __init__(self, vae, scheduler):
            super().__init__()
            self.register_modules(vae=vae, scheduler=scheduler)

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, latent_channels=4, sample_size=16).eval()
    pipe = LatentPipeline(vae, DDPMScheduler())
    fast = genfuse.accelerate(pipe, backend="torch")
    assert fast is not pipe and pipe.vae is vae and fast.vae is not vae and fast.scheduler is pipe.scheduler
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        ref, out = vae.decode(z).sample, fast.vae.decode(z).sample
    assert type(fast.vae.decoder).__module__.startswith("genfuse")
    assert (out - ref).abs().max() < 1e-4


def test_readme_example_runs(monkeypatch):
    """The README's accelerate example, executed as written: text, equal to the unpatched pipeline.

    As a user runs it on CPU: without Triton's interpreter (which the suite turns on), i.e. on the
    torch reference ops that ``backend=None`` picks there."""
    import pathlib
    import re

    from genfuse.kernels import _common

    monkeypatch.setattr(_common, "INTERPRET", False)

    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Drop-in: `genfuse.accelerate` for transformers", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    ns: dict = {}
    with one_thread():
        exec(compile(code, "README.md", "exec"), ns)
        want = transformers.pipeline("text-generation", model=ns["model"], tokenizer=ns["tok"])(
            "The capital of France is", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert ns["text"].startswith("The capital of France is") and len(ns["text"]) > 26
    assert ns["text"] == want
    assert ns["model"].config._attn_implementation != "genfuse"
