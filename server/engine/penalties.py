"""Logit processors a request may ask for: repetition, presence and frequency penalties, a logit bias and min-p.

Each works on the rows that ask only (the others are neither copied nor touched), batched over those rows:

- presence/frequency (OpenAI semantics, over generated tokens): `logit -= presence * (count > 0) + frequency * count`.
- repetition (vLLM semantics, over prompt and generated tokens): a seen token's logit is divided by the penalty when
  positive and multiplied by it when negative.
- logit_bias: added to the named tokens' logits; -100 effectively bans a token.

- min_p: after temperature, tokens less likely than `min_p` times the most likely one are dropped.

Penalties and bias apply to the raw logits, before temperature and the min-p/top-k/top-p filters, as in vLLM;
reported log-probabilities stay those of the raw logits (server.engine.logprobs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.engine.sequence import SamplingParams
from server.errors import InvalidRequestError


def validate_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """Refuse, before queueing, token ids outside the vocabulary in logit_bias and stop_token_ids."""
    for param, ids in (("logit_bias", [t for t, _ in params.logit_bias]), ("stop_token_ids", params.stop_token_ids)):
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            msg = f"{param}: token id {bad} is outside the vocabulary [0, {vocab_size})"
            raise InvalidRequestError(msg, param=param)


def apply_penalties(
    logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[tuple[list[int], list[int]]]
) -> torch.Tensor:
    """`logits: [L, V]` with each row's penalties and bias applied; `histories[i]` is row i's (prompt, output).

    Returns `logits` itself when no row asks for any of them.
    """
    penalized = [i for i, p in enumerate(params) if p.has_penalties]
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    if not penalized and not biased:
        return logits
    logits = logits.clone()
    if penalized:
        idx = torch.tensor(penalized, device=logits.device)
        logits[idx] = _penalize(logits[idx], [params[i] for i in penalized], [histories[i] for i in penalized])
    if biased:
        rows = torch.tensor([i for i in biased for _ in params[i].logit_bias], device=logits.device)
        cols = torch.tensor([t for i in biased for t, _ in params[i].logit_bias], device=logits.device)
        bias = torch.tensor([b for i in biased for _, b in params[i].logit_bias], device=logits.device)
        logits.index_put_((rows, cols), bias.to(logits.dtype), accumulate=True)
    return logits


def _penalize(
    logits: torch.Tensor, params: list[SamplingParams], histories: list[tuple[list[int], list[int]]]
) -> torch.Tensor:
    """Penalties of `logits: [P, V]`, one row per entry of `params`."""
    device, (rows, vocab) = logits.device, logits.shape
    counts = _counts([output for _, output in histories], rows, vocab, device)  # [P, V] generated-token counts
    presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]  # [P, 1]
    frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]  # [P, 1]
    repetition = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]  # [P, 1]
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = (_counts([prompt for prompt, _ in histories], rows, vocab, device) > 0) | (counts > 0)  # [P, V]
        repeated = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, repeated, logits)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def _counts(token_lists: list[list[int]], rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token id occurs in each list: `[rows, vocab]` float32."""
    counts = torch.zeros(rows, vocab, device=device)
    row_ids = torch.tensor([r for r, tokens in enumerate(token_lists) for _ in tokens], device=device)
    if row_ids.numel():
        token_ids = torch.tensor([t for tokens in token_lists for t in tokens], device=device)
        counts.index_put_((row_ids, token_ids), torch.ones_like(token_ids, dtype=counts.dtype), accumulate=True)
    return counts


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """`logits: [S, V]` (temperature applied) with -inf where a token's probability is under `min_p[s]` times its
    row's most likely token's; `min_p: [S]`, 0 = off. Compared in log space: log p - log p_max < log min_p."""
    gap = logits - logits.max(dim=-1, keepdim=True).values  # [S, V], log(p / p_max)
    return logits.masked_fill(gap < torch.log(min_p)[:, None], float("-inf"))
