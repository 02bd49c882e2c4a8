"""Paged KV-cache accounting: which fixed-size blocks hold each sequence's keys and values."""

from __future__ import annotations

from collections import deque

from server.engine.sequence import Sequence


class KVCacheError(RuntimeError):
    """The block manager was asked for something impossible: a caller bug, never a user error."""


class BlockManager:
    """Hands out KV-cache blocks of `block_size` tokens to sequences and takes them back (no prefix sharing)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free_blocks: deque[int] = deque(range(num_blocks))
        self._owners: dict[int, Sequence] = {}  # used block -> the sequence holding it

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return len(self._owners)

    @property
    def usage(self) -> float:
        """Share of blocks in use, 0..1."""
        return self.num_used_blocks / self.num_blocks

    @property
    def capacity(self) -> int:
        """Tokens the whole cache holds: the longest sequence that can ever run."""
        return self.num_blocks * self.block_size

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` still needs so that its table holds `num_tokens` tokens."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must not be negative, got {num_tokens}")
        return max(0, self.num_blocks_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int, *, reserve: int = 0) -> bool:
        """Whether `seq` can grow to hold `num_tokens` tokens and still leave `reserve` blocks free."""
        return self.num_missing_blocks(seq, num_tokens) + reserve <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq.block_table` to hold `num_tokens` tokens; blocks it already has are kept."""
        missing = self.num_missing_blocks(seq, num_tokens)
        if missing > self.num_free_blocks:
            raise KVCacheError(
                f"{seq.request_id} needs {missing} more blocks for {num_tokens} tokens, "
                f"only {self.num_free_blocks} are free; check can_allocate first"
            )
        for _ in range(missing):
            block = self._free_blocks.popleft()
            self._owners[block] = seq
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Return all of `seq`'s blocks and clear its table; freeing an empty table does nothing."""
        table = seq.block_table
        if len(set(table)) != len(table) or any(self._owners.get(block) is not seq for block in table):
            raise KVCacheError(f"block table of {seq.request_id} holds blocks it does not own: {table}")
        for block in table:
            del self._owners[block]
        self._free_blocks.extend(table)
        table.clear()
