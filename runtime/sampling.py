"""Sampling parameters and the sampler.

`sample(logits, params, generator, prev_tokens)` picks one token per row of ``logits`` (B, V)
entirely on the logits' device, with no host synchronization (no ``.item()``, ``.tolist()``,
``torch.multinomial``, nor a Python branch on a tensor value), so a decode loop can run it
inside a CUDA graph or ahead of the host. The pipeline, per row, in Hugging Face's order:

    repetition penalty (HF semantics) -> presence / frequency penalties (OpenAI semantics, over
    the generated tokens) -> temperature -> top-k -> top-p -> min-p -> draw

A row with ``temperature`` below `GREEDY_BELOW` (1e-5, vLLM's threshold) is greedy: the argmax of
the penalized logits, no filtering (dividing float32 logits by a temperature of 1e-45 overflows
them to inf, and softmax would turn the row into NaN).
The draw is the exponential race: ``argmax(probs / E)`` with ``E ~ Exponential(1)`` i.i.d. per
token picks token i with probability probs[i] (the minimum of exponentials with rates p_i is
attained at i with probability p_i / sum p), and a filtered-out token has probability exactly 0
so it can never win. Noise comes from the given ``torch.Generator``(s), so a seed reproduces
the draw on the same device.

Batching: ``params`` is either one `SamplingParams` for every row or a sequence with one per
row (a continuously batched engine mixes requests); per-row values travel to the device as
small tensors. ``generator`` is likewise one generator for the batch or one per row.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Sequence

import torch

GREEDY_BELOW = 1e-5  # temperatures under this are greedy (vLLM's _SAMPLING_EPS)
_SEED_RANGE = (-2**63, 2**64)  # what torch.Generator.manual_seed accepts
_TOP_K_MAX = 2**62  # fits the int64 per-row tensor; any k >= vocab keeps everything
MAX_LOGPROBS = 20  # alternatives per token, OpenAI's limit for top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """How to generate: length, randomness, filters, penalties and stop conditions.

    - ``max_tokens``: the most tokens to generate (>= 1).
    - ``temperature``: finite, >= 0; 0 (or anything below 1e-5, `GREEDY_BELOW`) is greedy;
      otherwise it divides the logits.
    - ``top_k``: keep the k most likely tokens (ties with the k-th kept); 0 = off.
    - ``top_p``: keep the smallest most-likely set whose probability reaches top_p, in (0, 1];
      1 = off.
    - ``min_p``: drop tokens less likely than min_p x the top token's probability, in [0, 1];
      0 = off.
    - ``repetition_penalty``: > 0; 1 = off. Tokens already seen (prompt and output) have
      their logit divided by it when positive, multiplied when negative (HF / CTRL).
    - ``seed``: an int in [-2**63, 2**64) seeding this request's own generator
      (`make_generator`): every prompt of a batch draws from its own generator, so a seeded
      prompt gives the same tokens alone or batched with others; None = unseeded.
    - ``stop``: strings that end generation (not included in the output); str or list of str.
    - ``stop_token_ids``: token ids that end generation, besides the model's EOS ids.
    - ``ignore_eos``: keep generating past EOS (benchmarks).
    - ``presence_penalty`` / ``frequency_penalty``: finite, in [-2, 2] (OpenAI's range); 0 = off.
      OpenAI's rule over the tokens generated so far (not the prompt, as vLLM):
      ``logit[t] -= presence_penalty * (count[t] > 0) + frequency_penalty * count[t]``.
    - ``logprobs``: None (off) or an int in [0, 20]: every generated token comes with its
      log-probability and the ``logprobs`` most likely alternatives (`TokenLogprob`), from the
      model's raw distribution (log-softmax of the logits before penalties, temperature and
      filters, as vLLM's default).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None

    def __post_init__(self):
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        t = _real("temperature", self.temperature)
        if t < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {t}")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= _TOP_K_MAX:
            raise ValueError(f"top_k must be an int in [0, 2**62] (0 = off), got {self.top_k!r}")
        p = _real("top_p", self.top_p)
        if not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p}")
        mp = _real("min_p", self.min_p)
        if not 0 <= mp <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {mp}")
        rp = _real("repetition_penalty", self.repetition_penalty)
        if rp <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {rp}")
        if self.seed is not None and not (_is_int(self.seed) and _SEED_RANGE[0] <= self.seed < _SEED_RANGE[1]):
            raise ValueError(f"seed must be None or an int in [-2**63, 2**64), got {self.seed!r}")
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, (list, tuple)):
            stop = tuple(stop)
        else:
            raise ValueError(f"stop must be a str or a list of str, got {type(stop).__name__}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r}")
        ids = self.stop_token_ids
        if ids is None:
            ids = ()
        elif not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of int, got {type(ids).__name__}")
        for i in ids:
            if not _is_int(i) or i < 0:
                raise ValueError(f"stop_token_ids must be ints >= 0, got {i!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = _real(name, getattr(self, name))
            if not -2 <= v <= 2:
                raise ValueError(f"{name} must be in [-2, 2] (0 = off), got {v}")
        if self.logprobs is not None and not (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an int in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def penalizes_output(self) -> bool:
        """Do the presence / frequency penalties apply (they need the generated ids)?"""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def make_generator(self, device: str | torch.device = "cpu") -> torch.Generator | None:
        """A generator for this request on ``device``, seeded with ``seed``; None when unseeded
        (then the sampler draws from torch's default generator)."""
        if self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return g


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _real(name: str, v) -> float:
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


# --------------------------------------------------------------------------- the sampler


def apply_repetition_penalty(logits: torch.Tensor, prev_tokens: torch.Tensor,
                             penalty: float | torch.Tensor) -> torch.Tensor:
    """HF's `RepetitionPenaltyLogitsProcessor`: for every token id in ``prev_tokens`` (B, L),
    logit / penalty where the logit is > 0, logit * penalty where it is <= 0. Negative ids
    are padding and ignored. ``penalty`` is a float or a (B,) tensor. Returns a new tensor."""
    B, V = logits.shape
    valid = prev_tokens >= 0
    idx = prev_tokens.clamp(min=0)
    seen = torch.zeros(B, V, dtype=torch.int32, device=logits.device)
    seen.scatter_add_(1, idx, valid.to(torch.int32))  # add, not write: padding must not unmark id 0
    if isinstance(penalty, torch.Tensor):
        penalty = penalty.to(logits.dtype).view(B, 1)
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen > 0, penalized, logits)


def apply_output_penalties(logits: torch.Tensor, output_tokens: torch.Tensor, presence: float | torch.Tensor,
                           frequency: float | torch.Tensor) -> torch.Tensor:
    """OpenAI's presence / frequency penalties: ``logit[t] -= presence * (count[t] > 0) +
    frequency * count[t]`` with ``count`` the occurrences of t in ``output_tokens`` (B, L)
    (negative ids are padding). The penalties are floats or (B,) tensors. Returns a new tensor."""
    B, V = logits.shape
    counts = torch.zeros(B, V, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, output_tokens.clamp(min=0), (output_tokens >= 0).to(logits.dtype))
    if isinstance(presence, torch.Tensor):
        presence = presence.to(logits.dtype).view(B, 1)
    if isinstance(frequency, torch.Tensor):
        frequency = frequency.to(logits.dtype).view(B, 1)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def sample(logits: torch.Tensor, params: SamplingParams | Sequence[SamplingParams],
           generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
           prev_tokens: torch.Tensor | Sequence[Sequence[int]] | None = None,
           output_tokens: torch.Tensor | Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """One token id per row: ``logits`` (B, V) or (V,) -> int64 (B,) (or a 0-d tensor).

    ``prev_tokens``: the ids the repetition penalty applies to (prompt and output), (B, L)
    int64 with negative padding, or a list of id lists (copied to the device; for a hot loop
    keep a tensor). ``output_tokens``: likewise, the generated ids the presence / frequency
    penalties count (needed only when a row sets them).
    """
    squeeze = logits.dim() == 1
    if squeeze:
        logits = logits.unsqueeze(0)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (V,) or (B, V), got shape {tuple(logits.shape)}")
    B, V = logits.shape
    dev = logits.device
    rows = [params] * B if isinstance(params, SamplingParams) else list(params)
    if len(rows) != B:
        raise ValueError(f"got {len(rows)} SamplingParams for {B} rows of logits")

    def per_row(attr: str, dtype=torch.float32):
        # a Python scalar when every row agrees (no tensor, no copy), else a (B, 1) tensor
        values = [getattr(r, attr) for r in rows]
        if all(v == values[0] for v in values):
            return values[0]
        return torch.tensor(values, dtype=dtype, device=dev).view(B, 1)

    x = logits.float()
    if any(r.repetition_penalty != 1.0 for r in rows) and prev_tokens is not None:
        prev = _prev_tensor(prev_tokens, B, dev)
        pen = per_row("repetition_penalty")
        x = apply_repetition_penalty(x, prev, pen.view(B) if isinstance(pen, torch.Tensor) else pen)
    if any(r.penalizes_output for r in rows) and output_tokens is not None:
        outs = _prev_tensor(output_tokens, B, dev)
        pres, freq = per_row("presence_penalty"), per_row("frequency_penalty")
        x = apply_output_penalties(x, outs, pres.view(B) if isinstance(pres, torch.Tensor) else pres,
                                   freq.view(B) if isinstance(freq, torch.Tensor) else freq)

    greedy_rows = [r.greedy for r in rows]
    greedy = x.argmax(dim=-1)  # of the penalized logits, before temperature and filters
    if all(greedy_rows):
        return greedy[0] if squeeze else greedy

    temps = [1.0 if g else r.temperature for g, r in zip(greedy_rows, rows)]  # greedy rows take argmax below
    if all(t == temps[0] for t in temps):
        x = x / temps[0]
    else:
        x = x / torch.tensor(temps, dtype=torch.float32, device=dev).view(B, 1)

    if any(r.top_k > 0 for r in rows):
        x = _top_k(x, per_row("top_k", torch.int64), V)
    if any(r.top_p < 1.0 for r in rows):
        x = _top_p(x, per_row("top_p"))
    if any(r.min_p > 0.0 for r in rows):
        x = _min_p(x, per_row("min_p"))

    probs = torch.softmax(x, dim=-1)
    noise = _exponential(probs, generator, B)
    out = (probs / noise).argmax(dim=-1)
    if any(greedy_rows):
        out = torch.where(torch.tensor(greedy_rows, device=dev), greedy, out)
    return out[0] if squeeze else out


def _prev_tensor(prev_tokens, B: int, dev) -> torch.Tensor:
    if isinstance(prev_tokens, torch.Tensor):
        prev = prev_tokens.to(device=dev, dtype=torch.int64)
        if prev.dim() == 1:
            prev = prev.unsqueeze(0).expand(B, -1)
        if prev.dim() != 2 or prev.shape[0] != B:
            raise ValueError(f"prev_tokens must be (B={B}, L), got shape {tuple(prev_tokens.shape)}")
        return prev
    seqs = [list(s) for s in prev_tokens]
    if len(seqs) != B:
        raise ValueError(f"prev_tokens has {len(seqs)} rows for {B} rows of logits")
    L = max((len(s) for s in seqs), default=0)
    padded = [s + [-1] * (L - len(s)) for s in seqs]
    return torch.tensor(padded, dtype=torch.int64, device=dev).view(B, L)


def _top_k(x: torch.Tensor, k, V: int) -> torch.Tensor:
    """Keep logits >= the k-th largest (HF's rule: ties with the k-th survive); k = 0 keeps all."""
    if isinstance(k, torch.Tensor):
        k = torch.where(k <= 0, torch.full_like(k, V), k.clamp(max=V))  # (B, 1)
        kmax = V
    else:
        k = min(k, V) if k > 0 else V
        kmax = k
    top = torch.topk(x, kmax, dim=-1).values  # (B, kmax) sorted descending
    if isinstance(k, torch.Tensor):
        kth = top.gather(1, k - 1)  # (B, 1)
    else:
        kth = top[:, k - 1:k]
    return x.masked_fill(x < kth, float("-inf"))


def _top_p(x: torch.Tensor, p) -> torch.Tensor:
    """Keep the most likely tokens until their mass reaches p (the token that crosses it is
    kept; so is the top token). Same set as HF's TopPLogitsWarper: it drops the tokens whose
    ascending cumulative mass is <= 1 - p, i.e. those with >= p of mass strictly above them."""
    if not isinstance(p, torch.Tensor) and p >= 1.0:
        return x
    sorted_x, order = torch.sort(x, dim=-1, descending=True)
    probs = torch.softmax(sorted_x, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # (B, V) mass of the strictly better tokens
    drop_sorted = mass_before >= p
    drop_sorted[:, 0] = False
    if isinstance(p, torch.Tensor):
        drop_sorted &= p < 1.0  # rows with p == 1 are off (cumsum rounding could reach 1.0 early)
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return x.masked_fill(drop, float("-inf"))


def _min_p(x: torch.Tensor, min_p) -> torch.Tensor:
    """Drop tokens whose probability is below min_p x the top token's."""
    probs = torch.softmax(x, dim=-1)
    top = probs.max(dim=-1, keepdim=True).values
    return x.masked_fill(probs < min_p * top, float("-inf"))


def _exponential(probs: torch.Tensor, generator, B: int) -> torch.Tensor:
    """Exponential(1) noise shaped like ``probs``, from one generator or one per row, clamped
    away from 0 so that 0 / noise is never NaN (argmax would pick a NaN)."""
    noise = torch.empty_like(probs)
    if generator is None or isinstance(generator, torch.Generator):
        noise.exponential_(generator=generator)
    else:
        gens = list(generator)
        if len(gens) != B:
            raise ValueError(f"got {len(gens)} generators for {B} rows")
        for i, g in enumerate(gens):
            noise[i].exponential_(generator=g)
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


# --------------------------------------------------------------------------- logprobs


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the ``logprobs`` most likely alternatives
    (``top``: (token id, logprob) pairs, most likely first), from the raw distribution."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprob]:
    """`TokenLogprob` of ``tokens`` (B,) under ``log_softmax(logits)`` (B, V), with the ``k``
    best alternatives each (one device-to-host copy for all rows; call it after the step's
    sync, it adds no wait of its own). A non-finite logprob (a NaN row) is reported as is."""
    B, V = logits.shape
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, tokens.view(B, 1).clamp(0, V - 1)).view(B)
    k = min(k, V)
    if k > 0:
        top = lp.topk(k, dim=-1)
        vals, ids = top.values.tolist(), top.indices.tolist()
    else:
        vals = ids = [[] for _ in range(B)]
    return [TokenLogprob(int(t), float(c), tuple(zip(i, v)))
            for t, c, i, v in zip(tokens.tolist(), chosen.tolist(), ids, vals)]
