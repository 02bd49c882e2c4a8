"""Paged KV-cache accounting: which fixed-size blocks hold each sequence's keys and values, and which full blocks
are kept, content-addressed, for later requests that start with the same tokens on the same adapter version.

A full block's identity is a hash of (its parent block's hash, its token ids, the adapter key that computed it).
The adapter key names the version (`name@version`, see `server.adapters.versions`), so a replaced or deleted
adapter's blocks are never found again; they wait in the free list until their memory is needed. The merge state is
not part of the key: blocks computed while an adapter was merged and while it was not agree within the fidelity
tolerance (tests/engine/test_prefix_caching.py measures it), as do the two halves of a sequence that spans a swap.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from server.engine.sequence import Sequence

ROOT_HASH = bytes(16)  # the parent of a sequence's first block
BlockHash = bytes


class KVCacheError(RuntimeError):
    """The block manager was asked for something impossible: a caller bug, never a user error."""


def block_hash(parent: BlockHash, token_ids: list[int], adapter: str | None) -> BlockHash:
    """Content hash of one full block; 128-bit BLAKE2b, so a collision (which would serve wrong K/V) is negligible."""
    name = (adapter or "").encode()  # adapter names are never empty: "" is the base model
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(len(name).to_bytes(2, "little") + name)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class BlockManager:
    """Hands out KV-cache blocks of `block_size` tokens to sequences, shares cached full blocks, takes them back.

    A used block is held by one or more sequences (its reference count is the number of holders). A free block is
    either plain or cached (its hash still finds it); allocation takes plain blocks first, then evicts the least
    recently freed cached one.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._free_plain: deque[int] = deque(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        self._holders: list[set[Sequence]] = [set() for _ in range(num_blocks)]
        self._hash_of: list[BlockHash | None] = [None] * num_blocks
        self._block_of: dict[BlockHash, int] = {}  # cached hash -> block

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds, cached ones included (they are evicted when needed)."""
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks a later request can find by their hash, used or free."""
        return len(self._block_of)

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

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks holding `seq`'s leading full blocks, for a sequence without blocks yet.

        The last token is always left to compute (its logits give the next token), so a prompt that is cached
        whole still recomputes its last block.
        """
        if not self.enable_caching or seq.block_table:
            return []
        hashes = self._hashes(seq, (len(seq) - 1) // self.block_size)
        prefix = []
        for digest in hashes:
            block = self._block_of.get(digest)
            if block is None:
                break
            prefix.append(block)
        return prefix

    def completed_blocks(self, seq: Sequence, start: int, end: int) -> list[BlockHash]:
        """Hashes of the full blocks a chunk computing tokens `[start, end)` of `seq` completes (none uncached).

        Proposed tokens past the sequence's end (speculative decoding) complete no block: they may be rejected.
        """
        if not self.enable_caching:
            return []
        return self._hashes(seq, min(end, len(seq)) // self.block_size)[start // self.block_size :]

    def first_missing_block(self, seq: Sequence, num_cached_blocks: int) -> BlockHash | None:
        """Hash of `seq`'s first full block past its `num_cached_blocks` cached ones, if `cached_prefix` could ever
        return it (None without caching, or where the prompt has no such block)."""
        if not self.enable_caching or num_cached_blocks >= (len(seq) - 1) // self.block_size:
            return None
        return self._hashes(seq, num_cached_blocks + 1)[num_cached_blocks]

    def can_allocate(
        self, seq: Sequence, num_tokens: int, *, reserve: int = 0, prefix: list[int] | None = None
    ) -> bool:
        """Whether `seq` can grow to hold `num_tokens` tokens and still leave `reserve` blocks free.

        `prefix` (from `cached_prefix`) starts an empty table: its blocks cost nothing but those now free.
        """
        return self._num_needed(seq, num_tokens, prefix or []) + reserve <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int, *, prefix: list[int] | None = None) -> None:
        """Grow `seq.block_table` to hold `num_tokens` tokens, starting with the cached `prefix` if given."""
        prefix = prefix or []
        needed = self._num_needed(seq, num_tokens, prefix)
        if needed > self.num_free_blocks:
            raise KVCacheError(
                f"{seq.request_id} needs {needed} more blocks for {num_tokens} tokens, "
                f"only {self.num_free_blocks} are free; check can_allocate first"
            )
        for block in prefix:
            self._free_cached.pop(block, None)
            self._hold(block, seq)
            seq.num_cached_blocks += 1
        for _ in range(self.num_missing_blocks(seq, num_tokens)):
            block = self._take_free()
            self._hold(block, seq)

    def cache_computed(self, seq: Sequence) -> None:
        """Make `seq`'s full blocks whose tokens are all computed findable by later requests."""
        if not self.enable_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= seq.num_cached_blocks:
            return
        hashes = self._hashes(seq, num_full)
        for index in range(seq.num_cached_blocks, num_full):
            block, digest = seq.block_table[index], hashes[index]
            if self._hash_of[block] is None and digest not in self._block_of:  # else an equal block is cached
                self._hash_of[block] = digest
                self._block_of[digest] = block
        seq.num_cached_blocks = num_full

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Free `seq`'s blocks past those holding its first `num_tokens` tokens: the K/V of rejected proposals.

        They were allocated for this sequence alone and never cached (`cache_computed` stops at its computed
        tokens), so they go back to the plain free list.
        """
        keep = self.num_blocks_for(num_tokens)
        if keep < seq.num_cached_blocks:
            raise KVCacheError(f"{seq.request_id}: trimming to {num_tokens} tokens would drop cached blocks")
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            holders = self._holders[block]
            holders.discard(seq)
            if not holders and self._hash_of[block] is None:
                self._free_plain.append(block)

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s hold on its blocks and clear its table; freeing an empty table does nothing.

        Blocks nobody holds any more become free; cached ones stay findable until evicted, the sequence's last
        blocks first (later requests are likelier to share its beginning).
        """
        table = seq.block_table
        if len(set(table)) != len(table) or any(
            not 0 <= block < self.num_blocks or seq not in self._holders[block] for block in table
        ):
            raise KVCacheError(f"block table of {seq.request_id} holds blocks it does not own: {table}")
        for block in reversed(table):
            holders = self._holders[block]
            holders.discard(seq)
            if holders:
                continue
            if self._hash_of[block] is None:
                self._free_plain.append(block)
            else:
                self._free_cached[block] = None
        table.clear()
        seq.num_cached_blocks = 0

    def _num_needed(self, seq: Sequence, num_tokens: int, prefix: list[int]) -> int:
        """Free blocks that allocating `num_tokens` tokens (after `prefix`) takes."""
        if prefix and seq.block_table:
            raise KVCacheError(f"{seq.request_id} already has blocks: a cached prefix only starts an empty table")
        missing = max(0, self.num_blocks_for(num_tokens) - len(seq.block_table) - len(prefix))
        return missing + sum(1 for block in prefix if not self._holders[block])

    def _hold(self, block: int, seq: Sequence) -> None:
        self._holders[block].add(seq)
        seq.block_table.append(block)

    def _take_free(self) -> int:
        """A free block with no hash: a plain one, else the least recently freed cached one, evicted."""
        if self._free_plain:
            return self._free_plain.popleft()
        block, _ = self._free_cached.popitem(last=False)
        del self._block_of[self._hash_of[block]]
        self._hash_of[block] = None
        return block

    def _hashes(self, seq: Sequence, num_full_blocks: int) -> list[BlockHash]:
        """Hashes of `seq`'s first `num_full_blocks` blocks, extending the ones it already has (tokens only grow)."""
        hashes = seq.block_hashes
        size = self.block_size
        while len(hashes) < num_full_blocks:
            start = len(hashes) * size
            parent = hashes[-1] if hashes else ROOT_HASH
            hashes.append(block_hash(parent, seq.token_slice(start, start + size), seq.adapter))
        return hashes
