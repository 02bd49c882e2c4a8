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
