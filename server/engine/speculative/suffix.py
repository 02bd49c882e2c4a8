"""Suffix decoding per adapter: proposals from the row itself or from the outputs its adapter gave before.

An adapter trained for a task answers in the same shape every time (`{"name": "…", "city": "…", "age": …}`): the
keys and punctuation are in none of the prompts, but in every earlier answer. So besides prompt lookup in the row
(what `ngram` does) the proposer keeps each adapter's latest outputs, each after the last few tokens of its prompt
(the chat template's assistant header, so the first tokens of an answer are proposed too), and proposes the
continuation most of the matches agree on. Histories are per adapter version: one tenant's outputs never steer
another adapter's proposals.

Matching runs on the token ids' bytes (`bytes.rfind`, in C). Whether the row's last n tokens occur is monotone in n
(an occurrence of n tokens holds one of n - 1), so the longest match is found by bisection.
"""

from __future__ import annotations

from array import array
from collections import Counter, deque
from dataclasses import dataclass, field

from server.engine.sequence import FinishReason, Sequence
from server.engine.speculative.config import SpeculativeConfig
from server.engine.speculative.ngram import propose_ngram

_TYPE = "i"  # token ids fit 32 bits; half the bytes to search of 64-bit ids
_WIDTH = array(_TYPE).itemsize
_SEPARATOR = -1  # between cached outputs: no match or continuation runs across two of them
_PROMPT_TAIL = 8  # prompt tokens kept before each cached output
_VOTERS = 16  # latest matches whose continuations vote
_MAX_ADAPTER_TOKENS = 1 << 16  # per adapter: 256 KiB searched per bisection probe, well under a millisecond
_MAX_CACHED_TOKENS = 1 << 22  # all adapters: 16 MiB


@dataclass
class _History:
    """One adapter's cached outputs, oldest first, and their concatenation as searched."""

    outputs: deque[array] = field(default_factory=deque)
    num_tokens: int = 0
    data: bytes | None = None  # built on the first search after a change

    def searched(self) -> bytes:
        if self.data is None:
            self.data = b"".join(output.tobytes() for output in self.outputs)
        return self.data


class SuffixProposer:
    """The `suffix` method: prompt lookup in the row, or the continuation the adapter's earlier outputs agree on,
    whichever matches more of the row's latest tokens."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.max_depth = config.max_tree_depth
        self.max_cached = config.max_cached_requests
        self.spec_factor = config.max_spec_factor
        self.min_prob = config.min_token_prob
        self._histories: dict[str | None, _History] = {}  # adapter key (None: the base model) -> its outputs
        self._order: deque[str | None] = deque()  # adapter key of every cached output, oldest first
        self._num_tokens = 0

    def propose(self, rows: list[tuple[Sequence, int]]) -> list[list[int]]:
        return [self._proposal(seq, room) for seq, room in rows]

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Cache the output of a request that ended normally, evicting the oldest outputs beyond the budgets."""
        if reason not in (FinishReason.STOP, FinishReason.LENGTH) or not seq.output_token_ids or self.max_cached == 0:
            return
        tail = seq.prompt_token_ids[-_PROMPT_TAIL:]
        output = array(_TYPE, [_SEPARATOR, *tail, *seq.output_token_ids[: _MAX_ADAPTER_TOKENS - len(tail) - 1]])
        history = self._histories.setdefault(seq.adapter, _History())
        history.outputs.append(output)
        history.num_tokens += len(output)
        history.data = None
        self._order.append(seq.adapter)
        self._num_tokens += len(output)
        while history.num_tokens > _MAX_ADAPTER_TOKENS:
            self._drop_oldest(history)
        while len(self._order) > self.max_cached or self._num_tokens > _MAX_CACHED_TOKENS:
            self._evict_oldest()

    def num_cached(self) -> int:
        """Outputs cached over all adapters."""
        return sum(len(history.outputs) for history in self._histories.values())

    def _proposal(self, seq: Sequence, room: int) -> list[int]:
        tokens = seq.token_ids
        own_n = _longest_match(array(_TYPE, tokens).tobytes(), tokens, self.max_depth, own=True)
        own = propose_ngram(tokens, room, own_n, own_n) if own_n else []
        history = self._histories.get(seq.adapter)
        if history is None:
            return own
        data = history.searched()
        n = _longest_match(data, tokens, self.max_depth, own=False)
        if n <= own_n and own:
            return own
        limit = min(room, max(1, int(self.spec_factor * n)))
        return _agreed_continuation(data, tokens[len(tokens) - n :], limit, self.min_prob) if n else own

    def _drop_oldest(self, history: _History) -> None:
        dropped = history.outputs.popleft()
        history.num_tokens -= len(dropped)
        history.data = None
        self._num_tokens -= len(dropped)
        for at, key in enumerate(self._order):  # its entry in the global order: the oldest of this adapter's
            if self._histories.get(key) is history:
                del self._order[at]
                break

    def _evict_oldest(self) -> None:
        key = self._order.popleft()
        history = self._histories[key]
        dropped = history.outputs.popleft()
        history.num_tokens -= len(dropped)
        history.data = None
        self._num_tokens -= len(dropped)
        if not history.outputs:
            del self._histories[key]


def _longest_match(data: bytes, tokens: list[int], max_n: int, own: bool) -> int:
    """The largest n <= max_n whose last n `tokens` occur in `data` at a token boundary with a token after them;
    in the row itself (`own`) only earlier than its last token."""
    end = (len(tokens) - 1) * _WIDTH if own else len(data) - _WIDTH
    low, high = 0, min(max_n, len(tokens) - 1 if own else len(tokens))
    while low < high:
        n = (low + high + 1) // 2
        if _occurrences(data, array(_TYPE, tokens[len(tokens) - n :]).tobytes(), end, 1):
            low = n
        else:
            high = n - 1
    return low


def _occurrences(data: bytes, pattern: bytes, end: int, limit: int) -> list[int]:
    """Token indices just past the latest `limit` aligned occurrences of `pattern` lying within `data[:end]`."""
    found: list[int] = []
    while len(found) < limit and (at := data.rfind(pattern, 0, end)) >= 0:
        if at % _WIDTH == 0:
            found.append((at + len(pattern)) // _WIDTH)
        end = at + len(pattern) - 1  # the next one starts before this one
    return found


def _agreed_continuation(data: bytes, suffix: list[int], limit: int, min_prob: float) -> list[int]:
    """The tokens that most of the latest matches of `suffix` in `data` continue with, while the product of the
    agreeing shares stays at or above `min_prob`."""
    ids = memoryview(data).cast(_TYPE)
    starts = _occurrences(data, array(_TYPE, suffix).tobytes(), len(data) - _WIDTH, _VOTERS)
    proposal: list[int] = []
    prob = 1.0
    while starts and len(proposal) < limit:
        votes = Counter(ids[at] for at in starts if at < len(ids) and ids[at] != _SEPARATOR)
        if not votes:
            break
        token, count = votes.most_common(1)[0]
        prob *= count / len(starts)
        if prob < min_prob:
            break
        proposal.append(token)
        starts = [at + 1 for at in starts if at < len(ids) and ids[at] == token]
    return proposal
