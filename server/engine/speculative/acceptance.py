"""Which proposed tokens a verification forward accepts.

A row that carried proposals `d_1..d_k` gets k + 1 sampled tokens `t_0..t_k`: `t_j` is what the target samples
after the row's tokens plus `d_1..d_j`. Proposal `d_{j+1}` stands when it equals `t_j` (every earlier one standing);
the row keeps the standing proposals and the token sampled after the last of them (the bonus token). Under greedy
sampling `t_j` is the argmax, so the kept tokens are exactly those decoding one token per step gives.
"""

from __future__ import annotations

from collections.abc import Sequence


def accepted_tokens(proposed: Sequence[int], sampled: Sequence[int]) -> list[int]:
    """The tokens a row keeps: the sampled ones up to and including the first that differs from its proposal."""
    if len(sampled) != len(proposed) + 1:
        raise ValueError(f"{len(proposed)} proposals need {len(proposed) + 1} sampled tokens, got {len(sampled)}")
    for j, token in enumerate(proposed):
        if sampled[j] != token:
            return list(sampled[: j + 1])
    return list(sampled)
