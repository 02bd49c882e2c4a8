"""What proposes tokens: one object per server, chosen by `--speculative-config`'s method."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from server.engine.sequence import FinishReason, Sequence
from server.engine.speculative.config import SpeculativeConfig
from server.engine.speculative.draft import make_draft_proposer
from server.engine.speculative.ngram import PromptLookup
from server.engine.speculative.suffix import SuffixProposer

if TYPE_CHECKING:
    from server.model.loader import LoadedModel
    from server.settings import Settings


class Proposer(Protocol):
    """Proposes tokens for the rows that speculate this step; learns from, or forgets, the rows that end."""

    def propose(self, rows: list[tuple[Sequence, int]]) -> list[list[int]]:
        """At most `room` tokens to follow each (sequence, room); an empty list where it has nothing to offer."""

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """`seq` ended (finished, aborted or failed): drop what was kept for it."""


def make_proposer(
    config: SpeculativeConfig, target: LoadedModel | None = None, settings: Settings | None = None
) -> Proposer:
    """The proposer of `config.method`; `draft_model` loads its draft next to the `target` the `settings` serve."""
    if config.method == "suffix":
        return SuffixProposer(config)
    if config.method == "ngram":
        return PromptLookup(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == "draft_model":
        if target is None or settings is None:
            raise ValueError("the draft_model method needs the loaded target model and the settings")
        return make_draft_proposer(config, target, settings)
    raise ValueError(f"no proposer for speculative method {config.method!r}")
