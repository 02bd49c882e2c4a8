"""Prompt lookup proposals: the tokens that followed the latest earlier occurrence of a row's last n tokens."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.engine.sequence import FinishReason
    from server.engine.sequence import Sequence as Request

_WIDTH = array("q").itemsize  # bytes per token id in the searched buffer


def propose_ngram(tokens: Sequence[int], num_tokens: int, min_n: int, max_n: int) -> list[int]:
    """Up to `num_tokens` tokens that followed the most recent earlier match of the last n tokens of `tokens`, for
    the longest n in `[min_n, max_n]` that matches; none when no suffix recurs.

    The most recent match is taken because extraction and rewriting copy the span they are in the middle of. The
    search runs on the ids' bytes (`bytes.rfind`, in C): every row searches its whole context every step, which a
    Python loop made a millisecond per thousand tokens; a byte match off a token boundary is skipped.
    """
    length = len(tokens)
    if num_tokens <= 0:
        return []
    data = array("q", tokens).tobytes()
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        pattern = data[(length - n) * _WIDTH :]
        end = (length - 1) * _WIDTH  # a match must leave a token after it, before the suffix's last token
        while (at := data.rfind(pattern, 0, end)) >= 0:
            if at % _WIDTH == 0:
                follow = at // _WIDTH + n
                return list(tokens[follow : follow + num_tokens])
            end = at + len(pattern) - 1  # look for matches starting before this misaligned one
    return []


class PromptLookup:
    """The `ngram` method: every row proposes from its own prompt and output; nothing is kept between steps."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, rows: list[tuple[Request, int]]) -> list[list[int]]:
        return [propose_ngram(seq.token_ids, room, self.min_n, self.max_n) for seq, room in rows]

    def finish(self, seq: Request, reason: FinishReason) -> None:
        """Nothing to forget: proposals come from the row alone."""
