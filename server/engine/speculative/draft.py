"""The `draft_model` method: a smaller model of the same tokenizer decodes every proposing row greedily, all at once.

The draft runs its own paged KV cache. Per request it keeps a `Sequence` of its own whose tokens are what its cache
was fed: the row's tokens as of the last step it saw, then its own proposals but the last. Each step it rolls that
back to the longest prefix the row still shares (accepted proposals stay, rejected ones go), then catches up on the
row's new tokens (the whole prompt the first time, chunked across steps when long) in one forward for all rows;
that forward's last logits give each row's first proposal, and one more forward for all rows gives each further
one. A row still catching up, or whose tokens do not fit the draft's cache, proposes nothing that step.

Proposals are greedy, hence deterministic: the Speculator's acceptance rule then keeps the target's distribution.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server.engine.batch_builder import build_forward_batch
from server.engine.block_manager import BlockManager
from server.engine.sequence import FinishReason, Sequence
from server.engine.speculative.draft_adapters import DraftAdapters
from server.engine.speculative.draft_model import load_draft_model
from server.model.kv_cache import KVCache
from server.model.loader import LoadedModel
from server.model.routing import make_lora_batch

if TYPE_CHECKING:
    from server.engine.speculative.config import SpeculativeConfig
    from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass(eq=False)
class DraftRow:
    """The draft's view of one request: `seq.prompt_token_ids` are the tokens its cache was fed or is about to be."""

    seq: Sequence
    confirmed: int = 0  # leading tokens known to be the request's; past them come the draft's own proposals


class DraftProposer:
    """Proposes by greedy decoding with a draft model over its own KV cache: one forward per proposed position."""

    def __init__(
        self, loaded: LoadedModel, adapters: DraftAdapters, num_blocks: int, block_size: int, chunk_tokens: int
    ) -> None:
        self.loaded = loaded
        self.adapters = adapters
        self.block_size = block_size
        self.chunk_tokens = chunk_tokens  # most catch-up tokens in one step's first forward
        self.kv_cache = KVCache(loaded.spec, num_blocks, block_size, loaded.dtype, loaded.device)
        self.blocks = BlockManager(num_blocks, block_size, enable_caching=False)
        self.rows: dict[str, DraftRow] = {}  # request id -> what the draft holds of it

    def propose(self, rows: list[tuple[Sequence, int]]) -> list[list[int]]:
        """Up to `room` greedy draft tokens per row. A failing draft never fails a request: it forgets every row (its
        cache may be half written) and proposes nothing this step."""
        if not rows:
            return []
        try:
            return self._propose(rows)
        except Exception:
            log.exception("the draft model failed; dropping its cache, no proposals this step")
            self.blocks = BlockManager(self.blocks.num_blocks, self.block_size, enable_caching=False)
            self.rows.clear()
            return [[] for _ in rows]

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """`seq` ended: its draft blocks are free again."""
        row = self.rows.pop(seq.request_id, None)
        if row is not None:
            self.blocks.free(row.seq)

    @torch.inference_mode()
    def _propose(self, rows: list[tuple[Sequence, int]]) -> list[list[int]]:
        drafts = [self._sync(seq) for seq, _ in rows]
        proposals: list[list[int]] = [[] for _ in rows]
        live = self._catch_up(drafts)
        for i, token in live.items():
            proposals[i].append(token)
        growing = [i for i in live if rows[i][1] > 1]
        while growing:
            for i in growing:
                drafts[i].prompt_token_ids.append(proposals[i][-1])
            fitting = [i for i in growing if self._fits(drafts[i], len(drafts[i]))]
            if not fitting:
                break
            for i, token in zip(fitting, self._forward([(drafts[i], 1) for i in fitting]), strict=True):
                proposals[i].append(token)
            growing = [i for i in fitting if len(proposals[i]) < rows[i][1]]
        return proposals

    def _sync(self, seq: Sequence) -> Sequence:
        """The draft's sequence for `seq`, rolled back to the prefix they share and holding `seq`'s tokens after it.

        The request's tokens only grow, so only the draft's own proposals past `confirmed` can differ. At least the
        last token is left to compute: its logits give the first proposal.
        """
        row = self.rows.get(seq.request_id)
        if row is None:
            row = self.rows[seq.request_id] = DraftRow(Sequence(seq.request_id, [], seq.params, seq.adapter))
        draft, tokens = row.seq, row.seq.prompt_token_ids
        fresh = seq.token_slice(row.confirmed, len(seq))
        keep = min(draft.num_computed_tokens, row.confirmed)
        if draft.num_computed_tokens > row.confirmed:
            held = tokens[row.confirmed : draft.num_computed_tokens]
            matched = next(
                (j for j, (a, b) in enumerate(zip(held, fresh, strict=False)) if a != b), min(len(held), len(fresh))
            )
            keep = row.confirmed + matched
        keep = min(keep, len(seq) - 1)
        del tokens[row.confirmed :]
        tokens.extend(fresh)
        draft.num_computed_tokens = keep
        self.blocks.trim(draft, keep)
        row.confirmed = len(seq)
        return draft

    def _catch_up(self, drafts: list[Sequence]) -> dict[int, int]:
        """Feed each draft sequence its uncomputed tokens, the shortest catch-ups first, within `chunk_tokens` in all;
        the first proposal (row index -> token) of each row that got to its end."""
        budget, work = self.chunk_tokens, []
        for i in sorted(range(len(drafts)), key=lambda i: drafts[i].num_uncomputed_tokens):
            draft = drafts[i]
            n = min(draft.num_uncomputed_tokens, budget)
            if n > 0 and self._fits(draft, draft.num_computed_tokens + n):
                work.append((i, n))
                budget -= n
        if not work:
            return {}
        tokens = self._forward([(drafts[i], n) for i, n in work])
        return {i: token for (i, _), token in zip(work, tokens, strict=True) if token is not None}

    def _fits(self, draft: Sequence, num_tokens: int) -> bool:
        """Give `draft` the blocks for `num_tokens` tokens if the cache has them."""
        if not self.blocks.can_allocate(draft, num_tokens):
            return False
        self.blocks.allocate(draft, num_tokens)
        return True

    def _forward(self, work: list[tuple[Sequence, int]]) -> list[int | None]:
        """Run the next `n` tokens of each draft sequence; the greedy next token of each whose chunk reaches its end.

        Sequences are packed in adapter-slot order, so each draft adapter's tokens form one segment.
        """
        slots = [self.adapters.slot_of(draft.adapter) for draft, _ in work]
        order = sorted(range(len(work)), key=slots.__getitem__)
        packed = [work[i] for i in order]
        with_adapters = any(slots[i] >= 0 for i in order)
        adapter_slots = [slots[i] for i in order] if with_adapters else None
        model = self.loaded.model
        batch = build_forward_batch(packed, self.block_size, self.loaded.device, adapter_slots)
        lora = make_lora_batch(batch.adapter_slots) if batch.adapter_slots is not None else None
        hidden = model(batch, self.kv_cache, lora)  # [T, hidden]
        greedy = iter(model.compute_logits(hidden[batch.logits_indices]).argmax(dim=-1).tolist())  # [L]
        tokens: list[int | None] = [None] * len(work)
        for i in order:
            draft, n = work[i]
            draft.num_computed_tokens += n
            if draft.num_computed_tokens == len(draft):
                tokens[i] = next(greedy)
        return tokens


def make_draft_proposer(config: SpeculativeConfig, target: LoadedModel, settings: Settings) -> DraftProposer:
    """The draft of `config.model` on the target's device and dtype, with a cache of as many blocks as the target's
    (it holds a little less per row: its proposals but the last) and the draft adapters of the settings."""
    if config.model is None:
        raise ValueError("the draft_model method needs a model folder")
    loaded = load_draft_model(config.model, target, settings.fused_kernels)
    adapters = DraftAdapters.load(settings.draft_adapters_store, loaded.model, settings.max_lora_rank)
    num_blocks = KVCache.blocks_for_budget(target.spec, settings.kv_cache_bytes, settings.block_size, target.dtype)
    return DraftProposer(loaded, adapters, num_blocks, settings.block_size, settings.max_num_batched_tokens)
