"""SamplingParams validation and the sampler: greedy, seeding, filters never leaking an excluded
token, the draw's distribution, and HF's logits processors as the oracle for the filters."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from genfuse.runtime.sampling import SamplingParams, apply_repetition_penalty, sample

V = 50


def _logits(B=1, V=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * 3


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": -0.5}, "top_p"),
    ({"min_p": -0.01}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": 1.0}, "max_tokens"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"stop": 3}, "stop"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop": ["ok", 5]}, "stop"),
    ({"stop_token_ids": [1, -2]}, "stop_token_ids"),
    ({"stop_token_ids": 7}, "stop_token_ids"),
    ({"seed": "1"}, "seed"),
    ({"temperature": True}, "temperature"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": "0.5"}, "temperature"),
    ({"top_p": float("nan")}, "top_p"),
    ({"min_p": float("nan")}, "min_p"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"top_k": 2**63}, "top_k"),  # past int64: the per-row tensor could not hold it
    ({"top_k": True}, "top_k"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": "16"}, "max_tokens"),
    ({"seed": 2**64}, "seed"),  # torch.Generator.manual_seed's range is [-2**63, 2**64)
    ({"seed": -2**63 - 1}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"seed": True}, "seed"),
    ({"stop": [None]}, "stop"),
    ({"stop_token_ids": [1.0]}, "stop_token_ids"),
])
def test_invalid_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_params_normalized():
    p = SamplingParams(max_tokens=5, temperature=0, top_k=0, top_p=1, min_p=0, stop="\n\n",
                       stop_token_ids=[7, 8], seed=3)
    assert p.stop == ("\n\n",) and p.stop_token_ids == (7, 8)
    assert isinstance(p.temperature, float) and p.greedy
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=None).stop == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0
    with pytest.raises(ValueError, match="temperature"):
        dataclasses.replace(p, temperature=-1)  # replace re-validates
    g = p.make_generator()
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=torch.Generator().manual_seed(3)))
    assert SamplingParams().make_generator() is None


# --------------------------------------------------------------------------- greedy and seeding


def test_greedy_is_argmax():
    x = _logits(B=8)
    p = SamplingParams(temperature=0, top_k=3, top_p=0.1, min_p=0.5)  # filters do not matter
    assert torch.equal(sample(x, p), x.argmax(-1))
    assert sample(x[0], p).item() == x[0].argmax().item()  # 1-D logits -> 0-d
    assert sample(x.half(), p).dtype == torch.int64


def test_tiny_temperatures_are_greedy():
    """temperature=1e-45 used to divide the logits to inf, softmax made NaN of them and argmax
    then picked token 0 every time; below 1e-5 (vLLM's threshold) a row is greedy."""
    x = _logits(B=8, seed=3)
    for t in (1e-45, 1e-30, 9.9e-6):
        p = SamplingParams(temperature=t, seed=0)
        assert p.greedy
        assert torch.equal(sample(x, p, torch.Generator().manual_seed(0)), x.argmax(-1))
    rows = [SamplingParams(temperature=1e-45), SamplingParams(temperature=1.0)] * 4  # mixed in one batch
    out = sample(x, rows, torch.Generator().manual_seed(0))
    assert torch.equal(out[0::2], x[0::2].argmax(-1))
    assert not SamplingParams(temperature=1e-5).greedy
    assert SamplingParams(seed=2**64 - 1).make_generator() is not None  # the edges of the seed range work
    assert SamplingParams(seed=-2**63).make_generator() is not None


def test_seeded_reproducible():
    x = _logits(B=16)
    p = SamplingParams(temperature=0.8, top_p=0.95, seed=1234)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.stack([sample(x, p, g) for _ in range(10)])

    a, b, c = run(1234), run(1234), run(99)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # per-row generators: row i depends only on its own generator
    gens = [torch.Generator().manual_seed(i) for i in range(16)]
    out1 = sample(x, p, gens)
    gens2 = [torch.Generator().manual_seed(i) for i in range(16)]
    gens2[3] = torch.Generator().manual_seed(777)
    out2 = sample(x, p, gens2)
    same = torch.ones(16, dtype=torch.bool)
    same[3] = False
    assert torch.equal(out1[same], out2[same])


# --------------------------------------------------------------------------- filters

N = 4000  # draws per check: one batched call, one independent draw per row


def _draws(logits_row, p, seed=0):
    x = logits_row.expand(N, -1).contiguous()
    return sample(x, p, torch.Generator().manual_seed(seed))


def test_top_k_never_leaks():
    x = _logits()[0]
    allowed = set(torch.topk(x, 5).indices.tolist())
    got = set(_draws(x, SamplingParams(temperature=2.0, top_k=5)).tolist())
    assert got <= allowed and len(got) >= 4  # high temperature: the whole top 5 shows up


def test_top_p_never_leaks():
    x = _logits()[0] / 3
    probs = torch.softmax(x, -1)
    order = torch.argsort(probs, descending=True)
    mass_before = torch.cumsum(probs[order], 0) - probs[order]
    allowed = set(order[mass_before < 0.7].tolist())
    got = set(_draws(x, SamplingParams(top_p=0.7)).tolist())
    assert got <= allowed and len(got) > 1


def test_min_p_never_leaks():
    x = _logits()[0] / 3
    probs = torch.softmax(x, -1)
    allowed = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    got = set(_draws(x, SamplingParams(min_p=0.2)).tolist())
    assert got <= allowed and len(got) > 1


def test_filters_match_hf_warpers():
    """The surviving set equals transformers' TopK / TopP / MinP warpers applied in HF's order."""
    import transformers
    from genfuse.runtime.sampling import _min_p, _top_k, _top_p

    x = _logits(B=6, V=300, seed=5)
    ids = torch.zeros(6, 1, dtype=torch.long)
    for k, p, mp in [(10, 1.0, 0.0), (0, 0.8, 0.0), (0, 1.0, 0.1), (20, 0.9, 0.05), (1, 0.5, 0.0)]:
        ref = x.clone() / 0.7
        ours = _top_p(_top_k(ref.clone(), k, 300), p) if (k or p < 1) else ref.clone()
        ours = _min_p(ours, mp) if mp else ours
        if k:
            ref = transformers.TopKLogitsWarper(k)(ids, ref)
        if p < 1:
            ref = transformers.TopPLogitsWarper(p)(ids, ref)
        if mp:
            ref = transformers.MinPLogitsWarper(mp)(ids, ref)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (k, p, mp)


def test_draw_follows_the_distribution():
    """Exponential race = categorical sampling: frequencies within 5 sigma of probabilities."""
    x = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -30.0]])
    probs = torch.softmax(x[0], -1)
    counts = torch.bincount(_draws(x[0], SamplingParams()), minlength=6).double()
    sigma = (probs * (1 - probs) / N).sqrt().double()
    assert ((counts / N - probs.double()).abs() <= 5 * sigma + 1e-9).all(), (counts / N, probs)
    # temperature sharpens
    hot = torch.bincount(_draws(x[0], SamplingParams(temperature=0.25)), minlength=6)
    assert hot[0] > counts[0]


def test_excluded_never_wins_even_when_probabilities_underflow():
    x = torch.full((1, V), -1e4)
    x[0, 7] = 0.0
    x[0, 9] = -200.0  # kept by top_k but its probability underflows to 0 in float32
    got = set(_draws(x[0], SamplingParams(top_k=2)).tolist())
    assert got == {7}


# --------------------------------------------------------------------------- batching and penalties


def test_per_row_params():
    x = _logits(B=4, seed=2)
    rows = [SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(top_k=3, temperature=5.0),
            SamplingParams(temperature=0, repetition_penalty=100.0)]
    prev = torch.tensor([[-1, -1], [-1, -1], [-1, -1], [int(x[3].argmax()), -1]])
    draws = torch.stack([sample(x, rows, torch.Generator().manual_seed(s), prev) for s in range(200)])
    assert (draws[:, 0] == x[0].argmax()).all()
    assert (draws[:, 1] == x[1].argmax()).all()
    assert set(draws[:, 2].tolist()) <= set(torch.topk(x[2], 3).indices.tolist())
    assert len(set(draws[:, 2].tolist())) > 1
    penalized = apply_repetition_penalty(x[3:4], prev[3:4], 100.0)
    assert (draws[:, 3] == penalized.argmax()).all() and (draws[:, 3] != x[3].argmax()).all()
    with pytest.raises(ValueError, match="rows"):
        sample(x, rows[:2])


def test_repetition_penalty_matches_hf():
    import transformers
    x = _logits(B=3, V=40, seed=4)
    prev = torch.tensor([[1, 5, 5, 39, 0], [2, 2, 2, 2, 2], [0, 7, 11, 13, 17]])
    for penalty in (1.3, 0.7):
        ref = transformers.RepetitionPenaltyLogitsProcessor(penalty)(prev, x.clone())
        assert torch.equal(apply_repetition_penalty(x, prev, penalty), ref)
    # padding (-1) is ignored; lists work like tensors; greedy sees the penalized logits
    pad = torch.tensor([[1, 5, -1], [2, -1, -1], [0, 7, 11]])
    ours = apply_repetition_penalty(x, pad, 1.3)
    for row, ids in enumerate([[1, 5], [2], [0, 7, 11]]):
        ref = transformers.RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([ids]), x[row:row + 1].clone())
        assert torch.equal(ours[row:row + 1], ref)
    assert ours[1, 0] == x[1, 0]  # token 0 is padding in row 1, not a previous token
    lists = [[1, 5], [2], [0, 7, 11]]
    p = SamplingParams(temperature=0, repetition_penalty=1e6)
    assert torch.equal(sample(x, p, prev_tokens=lists), apply_repetition_penalty(x, pad, 1e6).argmax(-1))


@pytest.mark.gpu
def test_no_host_sync_on_cuda():
    """The sampler must not synchronize: CUDA's sync debug mode turns any sync into an error."""
    x = _logits(B=8).cuda()
    prev = torch.randint(0, V, (8, 12), device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = [SamplingParams(top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.2), SamplingParams(temperature=0)] * 4
    sample(x, rows, g, prev)  # warm up (allocator, lazy init)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample(x, SamplingParams(top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.2), g, prev)
        sample(x, SamplingParams(temperature=0, repetition_penalty=1.2), g, prev)
    finally:
        torch.cuda.set_sync_debug_mode(0)


test_no_host_sync_on_cuda = pytest.mark.gpu(test_no_host_sync_on_cuda)


# --------------------------------------------------------------------------- penalties, logprobs


@pytest.mark.parametrize("kwargs,match", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": float("nan")}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"frequency_penalty": "1"}, "frequency_penalty"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"logprobs": 1.0}, "logprobs"),
])
def test_invalid_penalty_and_logprob_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_output_penalties_formula_and_padding():
    from genfuse.runtime.sampling import apply_output_penalties

    x = _logits(2)
    outs = torch.tensor([[3, 3, 7, -1], [0, -1, -1, -1]])  # row 1: id 0 once; padding must not count id 0
    got = apply_output_penalties(x, outs, torch.tensor([0.5, 1.0]), 0.25)
    want = x.clone()
    want[0, 3] -= 0.5 + 0.25 * 2
    want[0, 7] -= 0.5 + 0.25
    want[1, 0] -= 1.0 + 0.25
    torch.testing.assert_close(got, want)
    # through sample(): greedy picks the argmax of the penalized logits; a row without penalties is untouched
    top = int(x[0].argmax())
    p = SamplingParams(temperature=0, presence_penalty=2.0, frequency_penalty=2.0)
    tok = sample(x[:1].repeat(2, 1), [p, SamplingParams(temperature=0)], output_tokens=[[top] * 3, [top]])
    assert tok[1] == top and tok[0] == int((x[0] - 8.0 * (torch.arange(V) == top)).argmax())


def test_token_logprobs():
    from genfuse.runtime.sampling import token_logprobs

    x = _logits(3)
    toks = torch.tensor([1, 2, 3])
    got = token_logprobs(x, toks, 4)
    ref = torch.log_softmax(x.double(), dim=-1)
    for b, lp in enumerate(got):
        assert lp.token_id == b + 1
        assert lp.logprob == pytest.approx(ref[b, b + 1].item(), abs=1e-5)
        assert [t for t, _ in lp.top] == ref[b].topk(4).indices.tolist()
    assert all(lp.top == () for lp in token_logprobs(x, toks, 0))
