"""Sampling rows of a verification forward: one per position whose logits a row keeps, and their tokens back.

A row with proposals `d_1..d_k` keeps logits at its last token and at each proposal. The row at proposal j samples
as decoding would after `d_1..d_j` had been generated: its penalties see them, min_tokens counts them and its grammar
(a copy advanced by them) masks it, so every kept token is the one the request would get without speculation.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from server.engine.sampler import SamplingRow

if TYPE_CHECKING:
    from server.engine.scheduler import ScheduledSequence


def verification_rows(item: ScheduledSequence, row: SamplingRow) -> list[SamplingRow]:
    """`row` for the item's last token, then one per proposal it carries."""
    drafts = item.seq.draft_token_ids[: item.num_draft]
    if not drafts:
        return [row]
    outputs = list(row.output_token_ids)
    grammars = [None] * len(drafts) if row.grammar is None else list(row.draft_grammars)
    return [row] + [
        replace(
            row, num_generated=row.num_generated + j, output_token_ids=outputs + drafts[:j], grammar=grammars[j - 1]
        )
        for j in range(1, len(drafts) + 1)
    ]


def tokens_per_item(items: list[ScheduledSequence], tokens: list[int]) -> list[list[int]]:
    """The flat sampled `tokens` (as `verification_rows` laid them out) grouped by item."""
    grouped, at = [], 0
    for item in items:
        grouped.append(tokens[at : at + 1 + item.num_draft])
        at += 1 + item.num_draft
    if at != len(tokens):
        raise ValueError(f"{len(tokens)} sampled tokens for {at} verification rows")
    return grouped
