"""Sampling steps as small pure functions on float32 logits [batch, vocab], applied in this order:
logit bias, repetition penalty, frequency and presence penalties, temperature, then the cuts
top-k, top-p and min-p (transformers' order). Temperature 0 is argmax.

A cut costs only when asked for: without one the draw reads the probabilities as they are, top-k
sorts only its k tokens, and only a top-p cut alone sorts the whole vocabulary.

SamplingParams holds one request's settings; a scheduler that batches requests applies them row by
row (see engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .params import check_logit_bias, check_sampling_args

# Tokens a top-p cut first looks among (see likeliest_first).
HEAD = 256


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its next token. The defaults are OpenAI's: temperature 1, no nucleus
    cut, no penalty. seed None draws from a generator seeded at random."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0  # CTRL's, over the prompt and the generated tokens (transformers')
    frequency_penalty: float = 0.0  # OpenAI's, over the generated tokens: minus this times the count
    presence_penalty: float = 0.0  # OpenAI's, over the generated tokens: minus this once a token appeared
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's: (token, value in [-100, 100]) added to its logit
    top_k: int = 0  # the k likeliest tokens only; 0 or -1: no cut (vLLM's spelling)
    min_p: float = 0.0  # tokens less likely than min_p times the likeliest one dropped; 0: no cut

    def __post_init__(self) -> None:
        check_sampling_args(self.temperature, self.top_p, self.repetition_penalty, self.seed, self.frequency_penalty,
                            self.presence_penalty, self.top_k, self.min_p)
        check_logit_bias(self.logit_bias)

    @property
    def reads_history(self) -> bool:
        """Whether a penalty needs the tokens seen so far."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def apply_logit_bias(logits: torch.Tensor, tokens: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """logits [batch, vocab] with bias [n] added to the columns tokens [n] (OpenAI's logit_bias)."""
    return logits.index_add(-1, tokens, bias.expand(logits.shape[0], -1))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty, as transformers applies it: for every token already in the sequence (seen,
    a bool [batch, vocab]), positive logits are divided by penalty and negative ones multiplied."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_frequency_presence_penalty(logits: torch.Tensor, counts: torch.Tensor, frequency: float,
                                     presence: float) -> torch.Tensor:
    """OpenAI's penalties: each token's logit minus frequency times the times it was generated
    (counts [batch, vocab]), minus presence if it was generated at all."""
    if frequency == 0.0 and presence == 0.0:
        return logits
    return logits - frequency * counts - presence * (counts > 0)


def cut(probs: torch.Tensor, top_p: float, top_k: int = 0, min_p: float = 0.0
        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tokens of probs [batch, vocab] that the cuts keep: (their weights, zero where a token is
    dropped; the token id of each column, or None where the columns are the vocabulary's own).

    top_k keeps the k likeliest tokens; top_p then keeps the likeliest tokens whose probabilities add
    up to p, as Meta's reference does (a token is dropped once the tokens ranked above it hold more
    than p of the mass left); min_p drops the tokens less likely than min_p times the likeliest."""
    ids = None
    if 0 < top_k < probs.shape[-1]:
        probs, ids = probs.topk(top_k, dim=-1)  # sorted, likeliest first
        if top_p < 1:
            probs = probs / probs.sum(dim=-1, keepdim=True)  # top-p's mass is of what top-k left
    elif top_p < 1:
        probs, ids = likeliest_first(probs, top_p)
    if top_p < 1:
        before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
        probs = probs.masked_fill(before > top_p, 0.0)  # the top token (before = 0) is always kept
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs, ids


def likeliest_first(probs: torch.Tensor, mass: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Enough of the likeliest tokens of each row of probs, in order, to hold more than mass: the
    HEAD likeliest when they do (the common case, and 50x cheaper than sorting a vocabulary), else
    the whole vocabulary sorted. Returns (probabilities, token ids)."""
    if probs.shape[-1] > HEAD:
        values, ids = probs.topk(HEAD, dim=-1)
        if bool((values.sum(dim=-1) > mass).all()):  # every token past the head is then cut
            return values, ids
    return probs.sort(dim=-1, descending=True)


def sample(probs: torch.Tensor, top_p: float, generator: torch.Generator | None, top_k: int = 0,
           min_p: float = 0.0) -> torch.Tensor:
    """Draw a token per row of probs [batch, vocab] among those the cuts keep (see cut). Returns [batch].

    One uniform number per row, looked up in the kept weights' running sum (inverse transform
    sampling): torch.multinomial draws one random number per vocabulary entry, which on a CPU costs
    more than the rest of sampling together."""
    weights, ids = cut(probs, top_p, top_k, min_p)
    totals = weights.cumsum(dim=-1)
    # In (0, total]: the first column whose running sum reaches it holds weight, never a dropped token.
    u = 1.0 - torch.rand((weights.shape[0], 1), generator=generator, device=weights.device)
    choice = torch.searchsorted(totals, u * totals[:, -1:])  # [batch, 1]
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, repetition_penalty: float,
                seen: torch.Tensor | None, generator: torch.Generator | None, counts: torch.Tensor | None = None,
                frequency_penalty: float = 0.0, presence_penalty: float = 0.0, top_k: int = 0,
                min_p: float = 0.0) -> torch.Tensor:
    """The next token of each sequence, [batch], from last-position logits [batch, vocab]. seen
    (bool) feeds the repetition penalty, counts (generated tokens) the frequency and presence ones."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if counts is not None:
        logits = apply_frequency_presence_penalty(logits, counts, frequency_penalty, presence_penalty)
    if temperature == 0:
        return logits.argmax(dim=-1)
    # A tiny repetition penalty or temperature can scale a logit past float32's range; clamped, the
    # largest logits tie instead of turning softmax into NaN.
    biggest = torch.finfo(logits.dtype).max
    probs = torch.softmax((logits / temperature).clamp(-biggest, biggest), dim=-1)
    return sample(probs, top_p, generator, top_k, min_p)


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, n: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under the model's own distribution (logits [batch, vocab], before any
    penalty or temperature): of the chosen tokens [batch], and the n likeliest tokens' values and
    ids, [batch, n] each."""
    logprobs = torch.log_softmax(logits, dim=-1)
    top_values, top_ids = logprobs.topk(n, dim=-1)
    return logprobs.gather(-1, tokens[:, None]).squeeze(-1), top_values, top_ids
