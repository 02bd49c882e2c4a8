"""When speculation pays: measured cost per generated token with and without it, per batch size.

Verification turns each proposing row into a chunk of 1 + k tokens. At batch 1 a step costs about the same for a
handful of tokens as for one, so accepted proposals are nearly free; in a large batch the step is compute-bound and
rejected proposals cost as much as real tokens. Rather than a fixed batch-size threshold, the policy measures the
seconds per generated token of decode-only steps with and without proposals, per batch-size class (powers of two),
and speculates where it has been cheaper, trying the other choice now and then: first after EXPLORE_EVERY steps of
the class, then after twice as many each time a try leaves the choice as it was (up to EXPLORE_MAX), and again after
EXPLORE_EVERY once the choice changes. A try of speculation in a compute-bound batch costs that step a fifth or
more; at a fixed interval those tries were a percent of a 32-in-flight run's time, for choices that never changed.

Seconds per token is the ratio of two moving sums, seconds over tokens, not a moving average of each step's own
ratio: speculating steps keep 1 to k + 1 tokens at about the same cost, and the mean of their per-step ratios is
dominated by the steps that kept one (at batch 1 it overstated the cost by a third and flipped the choice for
hundreds of steps at a time, measured through the server on json-extract).
"""

from __future__ import annotations

EXPLORE_EVERY = 32  # steps of a batch-size class before its first try of the choice that currently looks worse
EXPLORE_MAX = 512  # the longest interval between tries, after tries that kept confirming the choice
_SMOOTHING = 0.1  # weight of the latest step in the moving sums


class SpeculationPolicy:
    """Chooses per step whether the running rows propose tokens, from what such steps cost so far."""

    def __init__(self) -> None:
        self._spent: dict[tuple[int, bool], tuple[float, float]] = {}  # (class, speculated) -> (seconds, tokens)
        self._trials: dict[int, _Trials] = {}  # per batch-size class

    def speculate(self, num_rows: int) -> bool:
        """Whether a step of `num_rows` decoding rows should carry proposals."""
        with_spec, without = self.cost(num_rows, True), self.cost(num_rows, False)
        if with_spec is None or without is None:
            return with_spec is None  # measure each choice once before comparing
        better = with_spec <= without
        trials = self._trials.setdefault(num_rows.bit_length(), _Trials(better))
        return better if trials.keep(better) else not better

    def cost(self, num_rows: int, speculated: bool) -> float | None:
        """Seconds per generated token of recent steps of this batch-size class; None before the first."""
        spent = self._spent.get((num_rows.bit_length(), speculated))
        return None if spent is None else spent[0] / spent[1]

    def record(self, num_rows: int, speculated: bool, seconds: float, num_tokens: int) -> None:
        """What a decode-only step of `num_rows` rows cost for the `num_tokens` tokens it generated."""
        if num_tokens <= 0:
            return
        key = (num_rows.bit_length(), speculated)
        spent, tokens = self._spent.get(key, (seconds, num_tokens))  # the first step starts the sums
        keep = 1 - _SMOOTHING
        self._spent[key] = (keep * spent + _SMOOTHING * seconds, keep * tokens + _SMOOTHING * num_tokens)


class _Trials:
    """When one batch-size class next tries the choice that looks worse: the interval doubles after each try that
    left the choice as it was and starts again at EXPLORE_EVERY when it changes."""

    def __init__(self, choice: bool) -> None:
        self.choice = choice
        self.interval = EXPLORE_EVERY
        self.steps = 0  # since the previous try, or since the choice changed

    def keep(self, choice: bool) -> bool:
        """Whether this step takes `choice`, the one that looks better now (else it tries the other)."""
        if choice != self.choice:
            self.choice, self.interval, self.steps = choice, EXPLORE_EVERY, 0
        self.steps += 1
        if self.steps < self.interval:
            return True
        self.steps, self.interval = 0, min(2 * self.interval, EXPLORE_MAX)
        return False
