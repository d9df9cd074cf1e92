"""Sampling steps as small pure functions on float32 logits [batch, vocab], applied in this order:
repetition penalty, temperature, top-p. Temperature 0 is argmax."""

from __future__ import annotations

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty, as transformers applies it: for every token already in the sequence (seen,
    a bool [batch, vocab]), positive logits are divided by penalty and negative ones multiplied."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Sample among the top tokens whose probabilities add up to p, as Meta's reference does: a token
    is dropped when the tokens ranked above it already hold more than p. Returns [batch]."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above each one
    sorted_probs = sorted_probs.masked_fill(before > p, 0.0)  # the top token (before = 0) is always kept
    choice = torch.multinomial(sorted_probs, num_samples=1, generator=generator)  # [batch, 1]
    return order.gather(-1, choice).squeeze(-1)


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, repetition_penalty: float,
                seen: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each sequence, [batch], from last-position logits [batch, vocab]."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return sample_top_p(probs, top_p, generator)
