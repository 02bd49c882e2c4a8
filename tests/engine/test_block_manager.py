import random

import pytest

from server.engine.block_manager import BlockManager, KVCacheError
from server.engine.sequence import SamplingParams, Sequence


def make_seq(request_id: str = "r") -> Sequence:
    return Sequence(request_id, [1, 2, 3], SamplingParams())


def test_rejects_non_positive_sizes() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, 16)
    with pytest.raises(ValueError):
        BlockManager(8, 0)


@pytest.mark.parametrize(("num_tokens", "num_blocks"), [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_allocate_holds_num_tokens(num_tokens: int, num_blocks: int) -> None:
    manager = BlockManager(8, 4)
    seq = make_seq()
    manager.allocate(seq, num_tokens)
    assert len(seq.block_table) == num_blocks
    assert manager.num_used_blocks == num_blocks
    assert manager.num_free_blocks == 8 - num_blocks


def test_allocate_grows_incrementally_and_never_shrinks() -> None:
    manager = BlockManager(8, 4)
    seq = make_seq()
    manager.allocate(seq, 3)
    first = list(seq.block_table)
    manager.allocate(seq, 4)
    assert seq.block_table == first
    manager.allocate(seq, 10)
    assert seq.block_table[:1] == first
    assert len(seq.block_table) == 3
    manager.allocate(seq, 2)
    assert len(seq.block_table) == 3
    assert manager.num_missing_blocks(seq, 13) == 1


def test_free_returns_every_block_and_is_idempotent() -> None:
    manager = BlockManager(8, 4)
    seq = make_seq()
    manager.allocate(seq, 20)
    assert manager.usage == pytest.approx(5 / 8)
    manager.free(seq)
    assert seq.block_table == []
    assert manager.num_free_blocks == 8
    assert manager.usage == 0.0
    manager.free(seq)
    assert manager.num_free_blocks == 8


def test_can_allocate_is_false_when_full_and_allocate_raises_without_change() -> None:
    manager = BlockManager(4, 4)
    a, b = make_seq("a"), make_seq("b")
    manager.allocate(a, 12)
    assert manager.can_allocate(b, 4)
    assert not manager.can_allocate(b, 5)
    assert manager.can_allocate(a, 16)
    assert not manager.can_allocate(a, 17)
    with pytest.raises(KVCacheError, match="needs 2 more blocks"):
        manager.allocate(b, 8)
    assert b.block_table == []
    assert manager.num_free_blocks == 1


def test_can_allocate_keeps_reserve_free() -> None:
    manager = BlockManager(4, 4)
    seq = make_seq()
    assert manager.can_allocate(seq, 8, reserve=2)
    assert not manager.can_allocate(seq, 9, reserve=2)


@pytest.mark.parametrize("table", [[99], [0, 0]])
def test_free_refuses_blocks_the_sequence_does_not_own(table: list[int]) -> None:
    manager = BlockManager(4, 4)
    owner, stranger = make_seq("owner"), make_seq("stranger")
    manager.allocate(owner, 4)
    stranger.block_table = table
    with pytest.raises(KVCacheError, match="does not own"):
        manager.free(stranger)
    assert manager.num_used_blocks == 1


def test_free_refuses_another_sequences_block() -> None:
    manager = BlockManager(4, 4)
    owner, stranger = make_seq("owner"), make_seq("stranger")
    manager.allocate(owner, 4)
    stranger.block_table = list(owner.block_table)
    with pytest.raises(KVCacheError):
        manager.free(stranger)
    assert owner.block_table and manager.num_used_blocks == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_allocate_free_leaks_nothing(seed: int) -> None:
    rng = random.Random(seed)
    manager = BlockManager(32, 4)
    seqs = [make_seq(str(i)) for i in range(8)]
    for _ in range(500):
        seq = rng.choice(seqs)
        if rng.random() < 0.3:
            manager.free(seq)
        else:
            num_tokens = len(seq.block_table) * 4 + rng.randint(0, 12)
            if manager.can_allocate(seq, num_tokens):
                manager.allocate(seq, num_tokens)
        tables = [block for s in seqs for block in s.block_table]
        assert len(tables) == len(set(tables)) == manager.num_used_blocks
        assert manager.num_used_blocks + manager.num_free_blocks == 32
    for seq in seqs:
        manager.free(seq)
    whole = make_seq("whole")
    manager.allocate(whole, manager.capacity)  # takes every free block: any duplicate would show here
    assert sorted(whole.block_table) == list(range(32))


# Prefix caching: full computed blocks are found again by (parent, tokens, adapter key).


def computed_seq(manager: BlockManager, request_id: str, tokens: list[int], adapter: str | None = None) -> Sequence:
    """A sequence holding blocks for all of `tokens`, computed and registered in the prefix cache."""
    seq = Sequence(request_id, tokens, SamplingParams(), adapter)
    manager.allocate(seq, len(tokens), prefix=manager.cached_prefix(seq))
    seq.num_computed_tokens = len(tokens)
    manager.cache_computed(seq)
    return seq


def test_same_tokens_on_same_adapter_version_hit_every_full_block_but_the_last_token() -> None:
    manager = BlockManager(16, 4)
    first = computed_seq(manager, "a", list(range(10)), "sql@1")
    assert manager.num_cached_blocks == 2  # the third block holds 2 tokens: never shared
    longer = Sequence("b", [*range(10), 99, 98], SamplingParams(), "sql@1")
    assert manager.cached_prefix(longer) == first.block_table[:2]
    whole = Sequence("c", list(range(8)), SamplingParams(), "sql@1")
    assert manager.cached_prefix(whole) == first.block_table[:1]  # its last token must be computed for logits
    branch = Sequence("d", [0, 1, 2, 3, 4, 5, 6, 70, 8, 9], SamplingParams(), "sql@1")
    assert manager.cached_prefix(branch) == first.block_table[:1]


@pytest.mark.parametrize("adapter", [None, "sql@2", "poet@1"])
def test_other_adapters_and_versions_never_hit(adapter: str | None) -> None:
    manager = BlockManager(16, 4)
    computed_seq(manager, "a", list(range(12)), "sql@1")
    assert manager.cached_prefix(Sequence("b", list(range(12)), SamplingParams(), adapter)) == []


def test_base_model_blocks_are_not_an_adapters() -> None:
    manager = BlockManager(16, 4)
    computed_seq(manager, "a", list(range(12)))
    assert len(manager.cached_prefix(Sequence("b", list(range(12)), SamplingParams()))) == 2
    assert manager.cached_prefix(Sequence("c", list(range(12)), SamplingParams(), "sql@1")) == []


def test_shared_blocks_are_freed_when_their_last_holder_frees_them() -> None:
    manager = BlockManager(8, 4)
    first = computed_seq(manager, "a", [*range(8), 50])
    second = computed_seq(manager, "b", [*range(8), 60])
    assert second.block_table[:2] == first.block_table[:2] and second.block_table[2] != first.block_table[2]
    assert manager.num_used_blocks == 4
    manager.free(first)
    assert manager.num_used_blocks == 3  # the shared two stay held by b
    manager.free(second)
    assert manager.num_used_blocks == 0 and manager.num_free_blocks == 8
    assert manager.num_cached_blocks == 2  # free, still findable


def test_prefix_blocks_that_are_free_cost_free_blocks_and_held_ones_do_not() -> None:
    manager = BlockManager(4, 4)
    holder = computed_seq(manager, "a", list(range(9)))  # 3 blocks, 2 cached
    seq = Sequence("b", list(range(12)), SamplingParams())
    prefix = manager.cached_prefix(seq)
    assert len(prefix) == 2
    assert manager.can_allocate(seq, 12, prefix=prefix)  # 1 new block, 1 free
    assert not manager.can_allocate(seq, 13, prefix=prefix)
    manager.free(holder)  # now the prefix blocks are free too: taking them costs free blocks
    assert manager.can_allocate(seq, 12, prefix=prefix)
    assert not manager.can_allocate(seq, 12, prefix=prefix, reserve=2)
    manager.allocate(seq, 12, prefix=prefix)
    assert seq.block_table[:2] == prefix and manager.num_free_blocks == 1


def test_allocate_with_a_prefix_that_does_not_fit_changes_nothing() -> None:
    manager = BlockManager(3, 4)
    holder = computed_seq(manager, "a", list(range(8)))
    manager.free(holder)
    seq = Sequence("b", list(range(16)), SamplingParams())
    prefix = manager.cached_prefix(seq)
    with pytest.raises(KVCacheError):
        manager.allocate(seq, 16, prefix=prefix)
    assert seq.block_table == [] and manager.num_free_blocks == 3 and manager.num_cached_blocks == 2
    with pytest.raises(KVCacheError, match="empty table"):
        manager.allocate(holder_with_blocks(manager), 8, prefix=prefix)


def holder_with_blocks(manager: BlockManager) -> Sequence:
    seq = make_seq("holder")
    manager.allocate(seq, 1)
    return seq


def test_eviction_takes_plain_blocks_first_then_the_least_recently_freed_cached_ones() -> None:
    manager = BlockManager(6, 2)
    old = computed_seq(manager, "old", [1, 2, 3, 4, 5])  # blocks 0, 1 cached; 2 plain
    new = computed_seq(manager, "new", [7, 8, 9])  # block 3 cached; 4 plain
    manager.free(old)
    manager.free(new)
    assert manager.num_cached_blocks == 3
    taker = make_seq("taker")
    manager.allocate(taker, 6)  # the three plain blocks: nothing evicted
    assert manager.num_cached_blocks == 3
    manager.allocate(taker, 8)  # evicts old's last full block first
    assert manager.num_cached_blocks == 2
    assert len(manager.cached_prefix(Sequence("x", [1, 2, 3, 4, 5], SamplingParams()))) == 1
    assert len(manager.cached_prefix(Sequence("y", [7, 8, 9], SamplingParams()))) == 1


def test_an_equal_block_computed_twice_is_cached_once() -> None:
    manager = BlockManager(8, 4)
    a, b = Sequence("a", list(range(5)), SamplingParams()), Sequence("b", list(range(5)), SamplingParams())
    for seq in (a, b):  # admitted together: neither found the other's blocks
        manager.allocate(seq, 5)
    for seq in (a, b):
        seq.num_computed_tokens = 5
        manager.cache_computed(seq)
    assert manager.num_cached_blocks == 1
    manager.free(a)
    manager.free(b)
    assert manager.num_free_blocks == 8 and manager.num_cached_blocks == 1


def test_caching_off_finds_nothing() -> None:
    manager = BlockManager(8, 4, enable_caching=False)
    computed_seq(manager, "a", list(range(9)))
    assert manager.num_cached_blocks == 0
    assert manager.cached_prefix(Sequence("b", list(range(9)), SamplingParams())) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_sharing_keeps_reference_counts_exact(seed: int) -> None:
    rng = random.Random(seed)
    manager = BlockManager(24, 4)
    prompts = [[rng.randrange(3) for _ in range(12)] for _ in range(3)]  # few distinct prefixes: many hits
    live: list[Sequence] = []
    content: dict[int, tuple] = {}  # block -> (adapter, every token up to its end) as computed into it
    hits = 0
    for i in range(400):
        if live and rng.random() < 0.4:
            manager.free(live.pop(rng.randrange(len(live))))
        else:
            tokens = rng.choice(prompts)[: rng.randint(1, 12)] + [rng.randrange(3) for _ in range(rng.randint(0, 6))]
            seq = Sequence(str(i), tokens, SamplingParams(), rng.choice([None, "a@1"]))
            prefix = manager.cached_prefix(seq)
            if manager.can_allocate(seq, len(tokens), prefix=prefix):
                manager.allocate(seq, len(tokens), prefix=prefix)
                hits += len(prefix)
                for index, block in enumerate(seq.block_table):
                    written = (seq.adapter, tuple(tokens[: (index + 1) * 4]))
                    if index < len(prefix):
                        assert content[block] == written  # a hit holds exactly this adapter's K/V of these tokens
                    content[block] = written
                seq.num_computed_tokens = len(tokens)
                manager.cache_computed(seq)
                live.append(seq)
        held = {block for seq in live for block in seq.block_table}
        assert manager.num_used_blocks == len(held)
    assert hits > 50
    for seq in live:
        manager.free(seq)
    whole = make_seq("whole")
    manager.allocate(whole, manager.capacity)  # every block, cached ones evicted: any duplicate would show here
    assert sorted(whole.block_table) == list(range(24)) and manager.num_cached_blocks == 0
