"""Logits straight from the engine's model step, for the tests that compare them with
transformers (the engine itself only hands out tokens)."""
from __future__ import annotations

import torch
from genfuse.runtime.sampling import SamplingParams


def prompt_logits(llm, ids: list[int]) -> torch.Tensor:
    """The last position's logits ``(vocab,)`` float32 over ``ids``, computed as one prefill
    step of the LLM's engine (which must be idle; the request is dropped after)."""
    e = llm.engine
    assert not e.has_unfinished_requests()
    e.add_request("prompt-logits", list(ids), SamplingParams(max_tokens=1, temperature=0))
    try:
        out = e.scheduler.schedule()
        [s] = out.scheduled
        assert s.samples, f"the {len(ids)}-token prompt does not fit one step"
        return e.model.forward_step(e.kv.prepare(out), e.kv.k, e.kv.v)[0]
    finally:
        e.abort("prompt-logits")
