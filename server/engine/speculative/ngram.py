"""Prompt lookup proposals: the tokens that followed the latest earlier occurrence of a row's last n tokens."""

from __future__ import annotations

from collections.abc import Sequence


def propose_ngram(tokens: Sequence[int], num_tokens: int, min_n: int, max_n: int) -> list[int]:
    """Up to `num_tokens` tokens that followed the most recent earlier match of the last n tokens of `tokens`, for
    the longest n in `[min_n, max_n]` that matches; none when no suffix recurs.

    The most recent match is taken because extraction and rewriting copy the span they are in the middle of.
    """
    length = len(tokens)
    if num_tokens <= 0:
        return []
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = list(tokens[length - n :])
        first = suffix[0]
        # A match at i covers tokens[i:i+n] and must leave a token after it, before the suffix itself starts.
        for i in range(length - n - 1, -1, -1):
            if tokens[i] == first and list(tokens[i : i + n]) == suffix:
                return list(tokens[i + n : i + n + num_tokens])
    return []
