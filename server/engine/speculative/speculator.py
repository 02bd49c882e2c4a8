"""The engine's side of speculative decoding: proposals before a step, acceptance and roll-back after it.

Rows propose only when decoding (one token left to compute) and only where the proposer finds something; a row
never proposes more tokens than its max_tokens and the context length leave room for, nor, with a grammar, past the
first proposal its grammar refuses. Requests that opt out (`speculative: false`) never propose.

Sampled rows speculate too, exactly: the row at each verified position draws the uniform that decoding would draw
for that token, and after acceptance the request's generator is rewound to just past the uniforms of the kept
tokens. A seeded request therefore gets the same tokens with and without speculation; an unseeded one its target
distribution (a proposal is kept with the target's probability of it, else the target's draw without it is).

Only decode-only steps speculate. A step that also computes prompt chunks is compute-bound: proposals add their
full cost there, and the policy, which measures decode-only steps, cannot see it (32 in flight over 32 adapters,
suffix: with 5-15 of a run's 20-odd prompt-carrying steps speculating, 0.95-0.96x the tokens/s of no speculation;
without, 0.96-1.00x).

Each row's proposals are as long as its recent verifications earned: a row whose proposal was cut at position i
proposes at most i + 1 tokens next, and a row that kept a whole proposal doubles its length again, up to
`num_speculative_tokens`. A verification chunk costs more the longer it is, so rows whose proposals keep failing
(free-form chat) pay for a two-token chunk, not a full one, while rows that copy long spans soon propose all k.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import torch

from server.adapters.versions import adapter_name
from server.engine.block_manager import BlockManager
from server.engine.scheduler import ScheduledSequence
from server.engine.sequence import FinishReason, Sequence
from server.engine.speculative.acceptance import accepted_tokens
from server.engine.speculative.config import SpeculativeConfig
from server.engine.speculative.policy import SpeculationPolicy
from server.engine.speculative.proposer import Proposer, make_proposer
from server.engine.structured import GrammarState


class Speculator:
    """Proposes tokens for the running rows, keeps what verification accepts and counts both per adapter."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int, proposer: Proposer | None = None) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.proposer = make_proposer(config) if proposer is None else proposer
        self.policy = SpeculationPolicy()
        self.proposed: Counter[str | None] = Counter()  # adapter key -> proposed tokens verified, since start
        self.accepted: Counter[str | None] = Counter()  # adapter key -> of those, kept
        self._reported: dict[str | None, tuple[int, int]] = {}  # what `take_counts` handed out so far
        self._generator_states: dict[str, torch.Tensor] = {}  # request id -> generator state before the step
        self.draft_grammars: dict[str, tuple[GrammarState, ...]] = {}  # request id -> its grammar after each proposal
        self._lengths: dict[str, int] = {}  # request id -> most tokens it may propose next, from its verifications
        self._step_start = 0.0

    def propose(
        self,
        running: list[Sequence],
        waiting: bool,
        allowed: Callable[[Sequence], bool],
        generator_of: Callable[[Sequence], torch.Generator | None],
        grammar_of: Callable[[Sequence], GrammarState | None],
    ) -> None:
        """Set `draft_token_ids` of the running rows that speculate this step; clear everyone else's. None do in a
        step that computes prompt tokens too (a running row mid-prompt, or requests `waiting` to start)."""
        self._step_start = time.perf_counter()
        self._generator_states.clear()  # a failed step never reached end_step
        self.draft_grammars.clear()
        for seq in running:
            seq.draft_token_ids = []
        decoding = [seq for seq in running if seq.num_uncomputed_tokens == 1]
        if not decoding or waiting or len(decoding) < len(running) or not self.policy.speculate(len(decoding)):
            return
        rows = [(seq, room) for seq in decoding if allowed(seq) and (room := self._room(seq)) > 0]
        for (seq, _), proposal in zip(rows, self.proposer.propose(rows), strict=True):
            seq.draft_token_ids = proposal
            if seq.draft_token_ids and (grammar := grammar_of(seq)) is not None:
                seq.draft_token_ids, self.draft_grammars[seq.request_id] = grammar_walk(grammar, seq.draft_token_ids)
            if seq.draft_token_ids and (generator := generator_of(seq)) is not None:
                self._generator_states[seq.request_id] = generator.get_state()

    def _room(self, seq: Sequence) -> int:
        """How many tokens `seq` may propose: its max_tokens and the context length leave room for the bonus."""
        return min(
            self._length(seq.request_id),
            seq.params.max_tokens - seq.num_output_tokens - 1,
            self.max_model_len - len(seq) - 1,
        )

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """`seq` ended: the proposer learns from its output or forgets it."""
        self._lengths.pop(seq.request_id, None)
        self.proposer.finish(seq, reason)

    def verify(self, item: ScheduledSequence, sampled: list[int], generator: torch.Generator | None) -> list[int]:
        """The tokens `item` keeps of its `sampled` ones; its generator rewound to just past the kept ones' draws."""
        seq = item.seq
        proposed = seq.draft_token_ids[: item.num_draft]
        kept = accepted_tokens(proposed, sampled)
        self.proposed[seq.adapter] += len(proposed)
        self.accepted[seq.adapter] += len(kept) - 1
        if proposed:
            self._lengths[seq.request_id] = self._next_length(seq.request_id, len(proposed), len(kept) - 1)
        state = self._generator_states.pop(seq.request_id, None)
        if generator is not None and state is not None:
            generator.set_state(state)
            torch.rand(len(kept), dtype=torch.float64, generator=generator)  # the draws of the kept tokens
        return kept

    def _next_length(self, request_id: str, num_proposed: int, num_accepted: int) -> int:
        """How many tokens a row may propose after verification kept `num_accepted` of its `num_proposed`."""
        if num_accepted < num_proposed:
            return num_accepted + 1
        return min(self.config.num_speculative_tokens, 2 * self._length(request_id))

    def _length(self, request_id: str) -> int:
        """Most tokens the row may propose next: k until its first verification."""
        return self._lengths.get(request_id, self.config.num_speculative_tokens)

    def take_counts(self) -> list[tuple[str | None, int, int]]:
        """(adapter name or None, proposed, accepted) gained per adapter since the previous call, for the metrics."""
        gained = []
        for key, proposed in self.proposed.items():
            accepted = self.accepted[key]
            before = self._reported.get(key, (0, 0))
            if (proposed, accepted) != before:
                name = None if key is None else adapter_name(key)
                gained.append((name, proposed - before[0], accepted - before[1]))
                self._reported[key] = (proposed, accepted)
        return gained

    @staticmethod
    def roll_back(seq: Sequence, num_accepted: int, blocks: BlockManager) -> None:
        """Count the accepted proposals as computed and free the blocks only rejected ones reached."""
        seq.num_computed_tokens += num_accepted
        blocks.cache_computed(seq)
        blocks.trim(seq, len(seq))

    def end_step(self, scheduled: list[ScheduledSequence], num_tokens: int) -> None:
        """Clear this step's proposals and record, for a decode-only step, what it cost per generated token."""
        for item in scheduled:
            item.seq.draft_token_ids = []
        self._generator_states.clear()
        self.draft_grammars.clear()
        if scheduled and all(item.num_new_tokens - item.num_draft == 1 for item in scheduled):
            speculated = any(item.num_draft for item in scheduled)
            self.policy.record(len(scheduled), speculated, time.perf_counter() - self._step_start, num_tokens)


def grammar_walk(grammar: GrammarState, proposed: list[int]) -> tuple[list[int], tuple[GrammarState, ...]]:
    """The leading `proposed` tokens `grammar` accepts in order, and a copy of it after each; the request's own
    state is untouched (it advances by the kept tokens only)."""
    states: list[GrammarState] = []
    matcher = grammar.matcher.deep_copy()
    for token in proposed:
        if not matcher.consume_token(token):
            break
        states.append(GrammarState(matcher, grammar.vocab_size))
        matcher = matcher.deep_copy()
    return proposed[: len(states)], tuple(states)
