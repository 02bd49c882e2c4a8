"""Fair admission for adapters that loaded late: arrival order kept across a cold load, and bounded overtaking."""

from __future__ import annotations

from collections import deque

from server.engine.overtaking import MAX_OVERTAKES, insert_by_arrival
from server.engine.sequence import SequenceStatus
from tests.engine.test_scheduler import make_scheduler, make_seq, step


def test_a_request_whose_adapter_loaded_late_takes_back_its_place_in_the_queue() -> None:
    scheduler = make_scheduler(max_num_seqs=1)
    for i in range(1, 4):
        scheduler.add(make_seq(f"hot{i}", 4, adapter="hot", arrival=float(i)))
    scheduler.add(make_seq("cold", 4, adapter="cold", arrival=0.5))  # arrived first, submitted once loaded
    assert [seq.request_id for seq in scheduler.waiting] == ["cold", "hot1", "hot2", "hot3"]
    assert [item.seq.request_id for item in step(scheduler).scheduled] == ["cold"]


def test_insert_by_arrival_keeps_equal_arrivals_in_submission_order() -> None:
    waiting = deque([make_seq("a", 4, arrival=1.0), make_seq("b", 4, arrival=2.0)])
    insert_by_arrival(waiting, make_seq("c", 4, arrival=2.0))
    insert_by_arrival(waiting, make_seq("d", 4, arrival=0.0))
    assert [seq.request_id for seq in waiting] == ["d", "a", "b", "c"]


def _run_hot_traffic(scheduler, until: str, max_steps: int = 400) -> tuple[int, list[str]]:
    """Two new `hot` requests every step until `until` runs; how many were admitted after it arrived, in order."""
    admitted: list[str] = []
    for i in range(max_steps):
        for j in range(2):
            scheduler.add(make_seq(f"hot-{i}-{j}", 4, adapter="hot", arrival=10.0 + i + j / 10, max_tokens=3))
        output = step(scheduler)
        names = [item.seq.request_id for item in output.scheduled if item.seq.num_computed_tokens <= 4]
        if any(seq.request_id == until for seq in scheduler.running) or until in names:
            return i, admitted
        admitted += [n for n in names if n.startswith("hot-") and n not in admitted]
    raise AssertionError(f"{until} never ran: {len(admitted)} later requests overtook it")


def test_a_ready_request_without_a_free_slot_is_overtaken_a_bounded_number_of_times() -> None:
    scheduler = make_scheduler(max_loras=1, max_num_seqs=8, num_blocks=256)
    scheduler.add(make_seq("first", 4, adapter="hot", arrival=0.0, max_tokens=3))
    step(scheduler)  # `hot` holds the only slot
    scheduler.add(make_seq("other", 4, adapter="other", arrival=1.0))  # ready, but no slot is free for it
    _, overtook = _run_hot_traffic(scheduler, "other")
    assert 0 < len(overtook) <= MAX_OVERTAKES  # hot traffic flowed, then held back until `other` got the slot


def test_base_model_requests_keep_flowing_while_a_starved_adapter_waits_for_its_slot() -> None:
    scheduler = make_scheduler(max_loras=1, max_num_seqs=64, num_blocks=512, max_num_batched_tokens=512)
    scheduler.add(make_seq("first", 4, adapter="hot", arrival=0.0, max_tokens=50))
    step(scheduler)
    scheduler.add(make_seq("other", 4, adapter="other", arrival=1.0))
    for i in range(MAX_OVERTAKES + 1):  # each admitted ahead of `other`, which waits for `hot`'s slot
        scheduler.add(make_seq(f"hot{i}", 4, adapter="hot", arrival=2.0 + i, max_tokens=50))
        step(scheduler)
    late_hot = make_seq("late-hot", 4, adapter="hot", arrival=100.0)
    base = make_seq("base", 4, arrival=101.0)
    scheduler.add(late_hot)
    scheduler.add(base)
    step(scheduler)
    assert base.status is SequenceStatus.RUNNING  # no slot needed
    assert late_hot.status is SequenceStatus.WAITING  # held back: `other` has waited its bound
    assert scheduler._overtakes._passed.keys() <= {seq.request_id for seq in scheduler.waiting}  # no leak
