"""Turn the scheduler's choice of (sequence, new tokens) into the packed ForwardBatch of one step.

Two kinds of slot meet here and keep distinct names: `kv_slots`, the flat KV-cache position each token writes, and
`adapter_slots`, the device adapter slot (or routing marker, `server.model.routing`) each token is served with.
"""

from __future__ import annotations

import torch

from server.engine.sequence import Sequence
from server.model.batch import ForwardBatch


def build_forward_batch(
    work: list[tuple[Sequence, int]], block_size: int, device: torch.device, adapter_slots: list[int] | None = None
) -> ForwardBatch:
    """Pack each sequence's next `n` tokens; logits are kept for sequences whose chunk reaches their end.

    A chunk may run past the sequence's end into its proposed tokens (`seq.draft_token_ids`, speculative
    decoding): then logits are kept at its last token and at every proposal, each verifying the next.

    `adapter_slots[i]` is the adapter slot of `work[i]` (BASE_SLOT for the base model, MERGED_SLOT for the merged
    adapter); callers order `work` so that equal slots are adjacent, which makes each adapter's tokens one contiguous
    segment.
    """
    ids, positions, kv_slots, token_adapter_slots = [], [], [], []
    query_start, context_lens, logits_indices = [0], [], []
    max_blocks = max(len(seq.block_table) for seq, _ in work)
    # One tensor for all tables: a tensor per sequence cost ~10 µs each, the biggest part of a decode step's packing.
    tables = torch.tensor(
        [seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq, _ in work], dtype=torch.int64
    )  # [S, max_blocks]
    for i, (seq, n) in enumerate(work):
        start = seq.num_computed_tokens
        end = start + n
        num_draft = max(0, end - len(seq))
        ids.extend(seq.token_slice(start, end - num_draft))
        ids.extend(seq.draft_token_ids[:num_draft])
        positions.extend(range(start, end))
        table = seq.block_table
        kv_slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
        query_start.append(query_start[-1] + n)
        context_lens.append(end)
        if end >= len(seq):
            logits_indices.extend(range(query_start[-1] - 1 - num_draft, query_start[-1]))
        if adapter_slots is not None:
            token_adapter_slots.extend([adapter_slots[i]] * n)

    def dev(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)

    return ForwardBatch(
        input_ids=dev(ids),
        positions=dev(positions),
        kv_slots=dev(kv_slots),
        query_start=torch.tensor(query_start, dtype=torch.int64),
        context_lens=torch.tensor(context_lens, dtype=torch.int64),
        block_tables=tables.to(device, non_blocking=True),
        logits_indices=dev(logits_indices),
        adapter_slots=dev(token_adapter_slots) if adapter_slots is not None else None,
    )
