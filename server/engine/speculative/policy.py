"""When speculation pays: measured cost per generated token with and without it, per batch size.

Verification turns each proposing row into a chunk of 1 + k tokens. At batch 1 a step costs about the same for a
handful of tokens as for one, so accepted proposals are nearly free; in a large batch the step is compute-bound and
rejected proposals cost as much as real tokens. Rather than a fixed batch-size threshold, the policy keeps a moving
average of seconds per generated token of decode-only steps with and without proposals, per batch-size class
(powers of two), and speculates where it has been cheaper, trying the other choice now and then.
"""

from __future__ import annotations

EXPLORE_EVERY = 32  # steps of a batch-size class between tries of the choice that currently looks worse
_SMOOTHING = 0.1  # weight of the latest step in the moving averages


class SpeculationPolicy:
    """Chooses per step whether the running rows propose tokens, from what such steps cost so far."""

    def __init__(self) -> None:
        self._cost: dict[tuple[int, bool], float] = {}  # (batch-size class, speculated) -> seconds per token
        self._steps: dict[int, int] = {}  # steps seen per batch-size class

    def speculate(self, num_rows: int) -> bool:
        """Whether a step of `num_rows` decoding rows should carry proposals."""
        size = num_rows.bit_length()
        step = self._steps.get(size, 0) + 1
        self._steps[size] = step
        with_spec, without = self._cost.get((size, True)), self._cost.get((size, False))
        if with_spec is None or without is None:
            return with_spec is None  # measure each choice once before comparing
        better = with_spec <= without
        return better if step % EXPLORE_EVERY else not better

    def record(self, num_rows: int, speculated: bool, seconds: float, num_tokens: int) -> None:
        """What a decode-only step of `num_rows` rows cost for the `num_tokens` tokens it generated."""
        if num_tokens <= 0:
            return
        key = (num_rows.bit_length(), speculated)
        cost = seconds / num_tokens
        old = self._cost.get(key)
        self._cost[key] = cost if old is None else (1 - _SMOOTHING) * old + _SMOOTHING * cost
