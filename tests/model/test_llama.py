"""Our packed, paged forward against the transformers forward of the same checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from server.engine.batch_builder import build_forward_batch
from server.engine.sequence import SamplingParams, Sequence
from server.model.kv_cache import KVCache
from server.model.loader import load_model

BLOCK = 4


def _allocate(seqs: list[Sequence], total: int) -> None:
    """Give each sequence enough blocks for `total` tokens, interleaving ids so tables are not contiguous."""
    next_block = 0
    for _ in range(-(-total // BLOCK)):
        for seq in seqs:
            seq.block_table.append(next_block)
            next_block += 1


def _hf_logits(model_dir, token_ids: list[int]) -> torch.Tensor:
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0]  # [len, vocab]


@pytest.mark.parametrize("chunk", [None, 3])
def test_prefill_then_decode_matches_hf(tiny_model_dir, chunk):
    loaded = load_model(tiny_model_dir, torch.device("cpu"), torch.float32)
    prompts = [[5, 9, 22, 41, 7, 3, 99], [17], [8, 8, 8, 120, 64], list(range(3, 40))]
    seqs = [Sequence(str(i), p, SamplingParams()) for i, p in enumerate(prompts)]
    _allocate(seqs, 64)
    cache = KVCache(loaded.spec, num_blocks=len(seqs) * 16, block_size=BLOCK, dtype=torch.float32, device="cpu")
    rng = torch.Generator().manual_seed(1)
    for _step in range(12):
        work = [(s, min(s.num_uncomputed_tokens, chunk or 10**9)) for s in seqs]
        batch = build_forward_batch(work, BLOCK, torch.device("cpu"))
        with torch.no_grad():
            logits = loaded.model.compute_logits(loaded.model(batch, cache)[batch.logits_indices])
        sampled = [s for s, n in work if s.num_computed_tokens + n == len(s)]
        for s, n in work:
            s.num_computed_tokens += n
        for row, s in zip(logits, sampled, strict=True):
            ref = _hf_logits(tiny_model_dir, s.token_ids)[-1]
            torch.testing.assert_close(row, ref, atol=1e-4, rtol=1e-4)
            s.output_token_ids.append(int(torch.randint(3, 250, (1,), generator=rng)))
