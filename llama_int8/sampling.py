"""Sampling steps as small pure functions on float32 logits [batch, vocab], applied in this order:
logit bias, repetition penalty, frequency and presence penalties, temperature, top-p. Temperature 0
is argmax.

SamplingParams holds one request's settings; a scheduler that batches requests applies them row by
row (see engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .params import check_logit_bias, check_sampling_args


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

    def __post_init__(self) -> None:
        check_sampling_args(self.temperature, self.top_p, self.repetition_penalty, self.seed, self.frequency_penalty,
                            self.presence_penalty)
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


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Sample among the top tokens whose probabilities add up to p, as Meta's reference does: a token
    is dropped when the tokens ranked above it already hold more than p. Returns [batch]."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above each one
    sorted_probs = sorted_probs.masked_fill(before > p, 0.0)  # the top token (before = 0) is always kept
    choice = torch.multinomial(sorted_probs, num_samples=1, generator=generator)  # [batch, 1]
    return order.gather(-1, choice).squeeze(-1)


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, repetition_penalty: float,
                seen: torch.Tensor | None, generator: torch.Generator | None, counts: torch.Tensor | None = None,
                frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> torch.Tensor:
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
    return sample_top_p(probs, top_p, generator)


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, n: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under the model's own distribution (logits [batch, vocab], before any
    penalty or temperature): of the chosen tokens [batch], and the n likeliest tokens' values and
    ids, [batch, n] each."""
    logprobs = torch.log_softmax(logits, dim=-1)
    top_values, top_ids = logprobs.topk(n, dim=-1)
    return logprobs.gather(-1, tokens[:, None]).squeeze(-1), top_values, top_ids
