"""Log-probabilities of sampled and prompt tokens, from the model's raw logits (before any sampling transform).

As vLLM reports by default: temperature, top-k/top-p, penalties, biases and grammar masks change what is sampled,
not the reported distribution. Only the rows that ask pay for a `log_softmax`; prompt positions are scored in
slices so that a long prompt never materialises `[prompt_len, vocab]` logits at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from server.engine.sequence import Sequence

MAX_TOP_LOGPROBS = 20
_PROMPT_SLICE = 256  # prompt positions per logits slice: 256 x 49152 fp32 logits is 50 MB


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and the most likely alternatives at its position (most likely first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: list[int]) -> list[TokenLogprob]:
    """Log-probability of `token_ids[i]` under row i of `logits: [N, V]`, with row i's `num_top[i]` best tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    chosen = logp.gather(-1, token_ids[:, None]).squeeze(-1).tolist()  # [N]
    tokens = token_ids.tolist()
    k = max(num_top, default=0)
    if not k:
        return [TokenLogprob(token, logprob) for token, logprob in zip(tokens, chosen, strict=True)]
    top_values, top_ids = logp.topk(k, dim=-1)  # [N, k]
    values, ids = top_values.tolist(), top_ids.tolist()
    return [
        TokenLogprob(token, logprob, tuple(zip(ids[i][: num_top[i]], values[i][: num_top[i]], strict=True)))
        for i, (token, logprob) in enumerate(zip(tokens, chosen, strict=True))
    ]


def prompt_positions(seq: Sequence, start: int, end: int) -> range:
    """Positions of the chunk `[start, end)` whose logits score a prompt token not scored yet.

    Position p scores prompt token p + 1; those already in `seq.prompt_logprobs` (from before a preemption
    made the sequence recompute its prompt) are not scored twice.
    """
    if seq.params.prompt_logprobs is None:
        return range(0)
    return range(max(start, len(seq.prompt_logprobs)), min(end, seq.num_prompt_tokens - 1))


def score_prompt(
    hidden: torch.Tensor, first_row: int, seq: Sequence, positions: range, compute_logits: Callable
) -> list[TokenLogprob]:
    """Prompt tokens `positions + 1` scored from `hidden: [T, H]`, where position `positions[0]` is `first_row`."""
    scored: list[TokenLogprob] = []
    num_top = seq.params.prompt_logprobs or 0
    for offset in range(0, len(positions), _PROMPT_SLICE):
        part = positions[offset : offset + _PROMPT_SLICE]
        rows = hidden[first_row + offset : first_row + offset + len(part)]  # [n, H]
        targets = torch.tensor(seq.prompt_token_ids[part.start + 1 : part.stop + 1], device=hidden.device)  # [n]
        scored += token_logprobs(compute_logits(rows), targets, [num_top] * len(part))
    return scored
