"""The model runner: the only code that touches device memory. Packs a step, runs the forward, samples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from server.engine.batch_builder import build_forward_batch
from server.engine.logprobs import TokenLogprob, prompt_positions, score_prompt, token_logprobs
from server.engine.sampler import INVALID_TOKEN, Sampler, SamplingRow
from server.engine.scheduler import ScheduledSequence
from server.engine.sequence import Sequence
from server.engine.speculative.verification import tokens_per_item, verification_rows
from server.engine.structured import MaskBuilder
from server.model.kv_cache import KVCache
from server.model.loader import LoadedModel
from server.model.routing import BASE_SLOT, MERGED_SLOT, make_lora_batch


@dataclass
class StepResult:
    """What one step produced: the tokens sampled per sampling item, and the log-probabilities asked for.

    An item gets one token, or one per position it verifies when it carried proposals (speculative decoding).
    """

    sampled: list[tuple[ScheduledSequence, list[int]]]
    logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)  # request id -> its sampled tokens'
    prompt_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)  # request id -> this chunk's


class ModelRunner:
    """Owns the base model and the KV cache pools; turns scheduled chunks into sampled token ids."""

    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.block_size = block_size
        self.kv_cache = KVCache(loaded.spec, num_blocks, block_size, loaded.dtype, loaded.device)
        self.sampler = Sampler(loaded.spec.eos_token_ids)
        self.masks = MaskBuilder()

    @torch.inference_mode()
    def execute(
        self,
        scheduled: list[ScheduledSequence],
        row_of: Callable[[Sequence], SamplingRow],
        merged: str | None = None,
    ) -> StepResult:
        """Run one step; a next token for every item whose chunk ends its sequence (`item.samples`).

        Sequences are packed in adapter-slot order so that each adapter's tokens form one contiguous segment.
        `merged` names the adapter merged into the base weights: its tokens need no adapter work, the others (base
        model included) the merged adapter's correction.
        """

        def adapter_slot_of(seq: Sequence) -> int:
            if merged is not None and seq.adapter == merged:
                return MERGED_SLOT
            return BASE_SLOT if seq.adapter_slot is None else seq.adapter_slot

        items = sorted(scheduled, key=lambda item: adapter_slot_of(item.seq))
        work = [(item.seq, item.num_new_tokens) for item in items]
        adapter_slots = [adapter_slot_of(item.seq) for item in items]
        with_adapters = any(slot >= 0 or (merged is not None and slot != MERGED_SLOT) for slot in adapter_slots)
        batch = build_forward_batch(work, self.block_size, self.device, adapter_slots if with_adapters else None)
        lora = make_lora_batch(batch.adapter_slots) if batch.adapter_slots is not None else None
        sampling = [item for item in items if item.samples]
        rows = [row for item in sampling for row in verification_rows(item, row_of(item.seq))]
        masks = self.masks.start([row.grammar for row in rows])  # computed while the forward runs
        hidden = self.model(batch, self.kv_cache, lora)  # [T, hidden]
        logits = self.model.compute_logits(hidden[batch.logits_indices])  # [L, vocab]
        tokens = self.sampler.sample(logits, rows, masks)
        return StepResult(
            list(zip(sampling, tokens_per_item(sampling, tokens), strict=True)),
            self._sampled_logprobs(logits, tokens, rows),
            self._prompt_logprobs(hidden, batch.query_start.tolist(), items),
        )

    @staticmethod
    def _sampled_logprobs(
        logits: torch.Tensor, tokens: list[int], rows: list[SamplingRow]
    ) -> dict[str, list[TokenLogprob]]:
        """Logprobs of the sampled tokens of the rows that ask, in row order per request; rows whose sampling failed
        (INVALID_TOKEN) have none. `logits: [L, V]`, one row per entry of `rows`."""
        kept = [i for i, token in enumerate(tokens) if token != INVALID_TOKEN and rows[i].params.logprobs is not None]
        if not kept:
            return {}
        index = torch.tensor(kept, device=logits.device)
        chosen = torch.tensor([tokens[i] for i in kept], device=logits.device)
        found = token_logprobs(logits[index], chosen, [rows[i].params.logprobs or 0 for i in kept])
        scored: dict[str, list[TokenLogprob]] = {}
        for n, i in enumerate(kept):
            scored.setdefault(rows[i].request_id, []).append(found[n])
        return scored

    def _prompt_logprobs(
        self, hidden: torch.Tensor, query_start: list[int], items: list[ScheduledSequence]
    ) -> dict[str, list[TokenLogprob]]:
        """Scores of the prompt tokens this step's chunks reach, for the requests that ask; `hidden: [T, H]`."""
        scored = {}
        for row, item in enumerate(items):
            positions = prompt_positions(item.seq, item.start, item.end)
            if positions:
                first = query_start[row] + positions.start - item.start
                scored[item.seq.request_id] = score_prompt(
                    hidden, first, item.seq, positions, self.model.compute_logits
                )
        return scored
