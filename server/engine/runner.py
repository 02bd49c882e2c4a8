"""The model runner: the only code that touches device memory. Packs a step, runs the forward, samples."""

from __future__ import annotations

import torch

from server.engine.batch_builder import build_forward_batch
from server.engine.sampler import Sampler, SamplingRow
from server.engine.scheduler import ScheduledSequence
from server.model.kv_cache import KVCache
from server.model.loader import LoadedModel


class ModelRunner:
    """Owns the base model and the KV cache pools; turns scheduled chunks into sampled token ids."""

    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.block_size = block_size
        self.kv_cache = KVCache(loaded.spec, num_blocks, block_size, loaded.dtype, loaded.device)
        self.sampler = Sampler(loaded.spec.eos_token_ids)

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence], rows: list[SamplingRow]) -> list[int]:
        """Run one step; returns the next token of each sampling item (`item.samples`), in `scheduled` order.

        `rows` holds one SamplingRow per sampling item, in the same order.
        """
        work = [(item.seq, item.num_new_tokens) for item in scheduled]
        batch = build_forward_batch(work, self.block_size, self.device)
        hidden = self.model(batch, self.kv_cache)  # [T, hidden]
        logits = self.model.compute_logits(hidden[batch.logits_indices])  # [L, vocab]
        return self.sampler.sample(logits, rows)
