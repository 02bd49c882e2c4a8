import itertools
import random
from collections import Counter
from collections.abc import Callable

import pytest

from server.engine.block_manager import BlockManager
from server.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from server.engine.sequence import FinishReason, SamplingParams, Sequence, SequenceStatus
from server.errors import InvalidRequestError

SAMPLED_TOKEN = 7


def make_seq(
    request_id: str, prompt_len: int, *, adapter: str | None = None, arrival: float = 0.0, max_tokens: int = 4
) -> Sequence:
    return Sequence(
        request_id,
        list(range(prompt_len)),
        SamplingParams(max_tokens=max_tokens),
        adapter=adapter,
        arrival_time=arrival,
    )


def make_scheduler(
    *,
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 64,
    max_loras: int = 4,
    watermark: float = 0.0,
    adapter_ready: Callable[[str], bool] | None = None,
    prefix_caching: bool = False,  # off: most prompts here share a prefix; the prefix tests below turn it on
    cached_first: bool = False,
) -> Scheduler:
    config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len, max_loras, watermark, cached_first)
    manager = BlockManager(num_blocks, block_size, enable_caching=prefix_caching)
    if adapter_ready is None:
        return Scheduler(config, manager)
    return Scheduler(config, manager, adapter_ready)


def step(scheduler: Scheduler) -> SchedulerOutput:
    """One engine step as the engine runs it: schedule, (run the model), then postprocess."""
    output = scheduler.schedule()
    postprocess(scheduler, output)
    return output


def postprocess(scheduler: Scheduler, output: SchedulerOutput) -> None:
    """Advance, append a token to each sequence that sampled, finish those at max_tokens or max_model_len."""
    scheduler.advance(output)
    for item in output.scheduled:
        if item.samples:
            seq = item.seq
            seq.output_token_ids.append(SAMPLED_TOKEN)
            if seq.num_output_tokens >= seq.params.max_tokens or len(seq) >= scheduler.config.max_model_len:
                scheduler.finish(seq, FinishReason.LENGTH)


def run_to_completion(scheduler: Scheduler, max_steps: int = 1000) -> list[SchedulerOutput]:
    outputs = []
    while scheduler.has_work:
        assert len(outputs) < max_steps, "scheduler made no progress"
        outputs.append(step(scheduler))
    return outputs


def chunks(output: SchedulerOutput) -> list[tuple[str, int, bool]]:
    return [(item.seq.request_id, item.num_new_tokens, item.samples) for item in output.scheduled]


def ids(seqs: object) -> list[str]:
    return [seq.request_id for seq in seqs]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_num_seqs": 0},
        {"max_num_batched_tokens": 0},
        {"max_model_len": -1},
        {"max_loras": 0},
        {"watermark": 1.0},
        {"watermark": -0.1},
    ],
)
def test_config_rejects_bad_limits(kwargs: dict) -> None:
    values = {"max_num_seqs": 1, "max_num_batched_tokens": 1, "max_model_len": 1, "max_loras": 1} | kwargs
    with pytest.raises(ValueError):
        SchedulerConfig(**values)


def test_cache_smaller_than_max_model_len_is_rejected() -> None:
    with pytest.raises(ValueError, match="fewer than max_model_len"):
        make_scheduler(num_blocks=3, block_size=4, max_model_len=13)


def test_add_rejects_prompt_over_max_model_len_and_used_sequences() -> None:
    scheduler = make_scheduler(max_model_len=8)
    with pytest.raises(InvalidRequestError):
        scheduler.add(make_seq("long", 9))
    used = make_seq("used", 4)
    used.num_computed_tokens = 2
    with pytest.raises(ValueError):
        scheduler.add(used)
    assert not scheduler.has_work


def test_prefill_and_decode_mix_in_one_step() -> None:
    scheduler = make_scheduler()
    scheduler.add(make_seq("a", 6))
    assert chunks(step(scheduler)) == [("a", 6, True)]
    scheduler.add(make_seq("b", 5))
    output = step(scheduler)
    assert chunks(output) == [("a", 1, True), ("b", 5, True)]
    assert [item.start for item in output.scheduled] == [6, 0]
    assert output.scheduled[0].token_ids == [SAMPLED_TOKEN]


def test_token_budget_chunks_admissions() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=8)
    for i, name in enumerate("abc"):
        scheduler.add(make_seq(name, 5, arrival=i))
    first = step(scheduler)
    assert chunks(first) == [("a", 5, True), ("b", 3, False)]
    assert scheduler.num_waiting == 1
    second = step(scheduler)
    assert chunks(second) == [("a", 1, True), ("b", 2, True), ("c", 5, True)]
    assert second.num_batched_tokens == 8


def test_long_prompt_prefills_in_chunks_across_steps() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=8, block_size=4)
    seq = make_seq("long", 20)
    scheduler.add(seq)
    table_sizes = []
    for expected in [("long", 8, False), ("long", 8, False), ("long", 4, True), ("long", 1, True)]:
        assert chunks(step(scheduler)) == [expected]
        table_sizes.append(len(seq.block_table))
    assert table_sizes == [2, 4, 5, 6]
    assert seq.num_computed_tokens == 21


def test_max_num_seqs_limits_running() -> None:
    scheduler = make_scheduler(max_num_seqs=3)
    for i in range(5):
        scheduler.add(make_seq(f"r{i}", 4, arrival=i))
    output = scheduler.schedule()
    assert ids(item.seq for item in output.scheduled) == ["r0", "r1", "r2"]
    assert (scheduler.num_running, scheduler.num_waiting) == (3, 2)


def test_latest_arrival_is_preempted_and_recomputed_when_blocks_run_out() -> None:
    scheduler = make_scheduler(num_blocks=6, block_size=4, max_model_len=24)
    a, b, c = (make_seq(name, 7, arrival=i, max_tokens=8) for i, name in enumerate("abc"))
    for seq in (a, b, c):
        scheduler.add(seq)
    step(scheduler)  # three prefills of 7 tokens: 2 blocks each, the cache is full
    step(scheduler)  # decodes to 8 tokens still fit in 2 blocks
    output = step(scheduler)  # a and b need a 3rd block: c makes room
    assert chunks(output) == [("a", 1, True), ("b", 1, True)]
    assert output.preempted == [c]
    assert list(scheduler.waiting) == [c]
    assert (c.status, c.block_table, c.num_computed_tokens, c.num_preemptions) == (SequenceStatus.WAITING, [], 0, 1)
    assert scheduler.block_manager.num_free_blocks == 0

    rest = run_to_completion(scheduler)
    recompute = next(item for out in rest for item in out.scheduled if item.seq is c)
    assert (recompute.start, recompute.num_new_tokens, recompute.samples) == (0, 9, True)
    assert all(seq.finish_reason is FinishReason.LENGTH and seq.num_output_tokens == 8 for seq in (a, b, c))
    assert scheduler.block_manager.num_used_blocks == 0


def test_sequence_preempts_itself_when_only_older_ones_hold_blocks() -> None:
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_model_len=16)
    a = make_seq("a", 5, arrival=0, max_tokens=2)
    b = make_seq("b", 8, arrival=1, max_tokens=3)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)
    output = step(scheduler)  # b needs a 3rd block and nobody later than b can give one
    assert chunks(output) == [("a", 1, True)]
    assert output.preempted == [b]
    assert a.is_finished
    assert chunks(step(scheduler)) == [("b", 9, True)]
    run_to_completion(scheduler)
    assert b.num_output_tokens == 3
    assert scheduler.block_manager.num_used_blocks == 0


def test_no_admission_in_a_step_that_preempted() -> None:
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_model_len=16)
    scheduler.add(make_seq("a", 4, arrival=0))
    scheduler.add(make_seq("b", 12, arrival=1))
    step(scheduler)
    scheduler.add(make_seq("tiny", 1, arrival=2))
    output = step(scheduler)  # a's decode needs b's blocks; the freed room goes to no one else
    assert chunks(output) == [("a", 1, True)]
    assert ids(output.preempted) == ["b"]
    assert ids(scheduler.waiting) == ["b", "tiny"]


def test_waiting_request_that_does_not_fit_blocks_later_ones() -> None:
    scheduler = make_scheduler(num_blocks=8, block_size=4, max_model_len=32)
    scheduler.add(make_seq("a", 16))
    step(scheduler)
    scheduler.add(make_seq("big", 20, arrival=1))
    scheduler.add(make_seq("small", 2, arrival=2))
    assert chunks(scheduler.schedule()) == [("a", 1, True)]
    assert ids(scheduler.waiting) == ["big", "small"]


def test_watermark_keeps_blocks_free_but_not_from_a_lone_sequence() -> None:
    scheduler = make_scheduler(num_blocks=10, block_size=4, max_model_len=40, watermark=0.2)
    for i, prompt_len in enumerate([4, 28, 4]):
        scheduler.add(make_seq(f"r{i}", prompt_len, arrival=i))
    assert ids(item.seq for item in scheduler.schedule().scheduled) == ["r0", "r1"]
    assert scheduler.block_manager.num_free_blocks == 2

    lone = make_scheduler(num_blocks=4, block_size=4, max_model_len=16, watermark=0.5)
    lone.add(make_seq("whole", 16))
    assert chunks(lone.schedule()) == [("whole", 16, True)]


def test_abort_frees_blocks_of_running_and_waiting_sequences() -> None:
    scheduler = make_scheduler(max_num_seqs=1)
    running, waiting = make_seq("run", 9), make_seq("wait", 3, arrival=1)
    scheduler.add(running)
    scheduler.add(waiting)
    step(scheduler)
    assert scheduler.block_manager.num_used_blocks == 3
    assert scheduler.abort("run") is running
    assert scheduler.abort("wait") is waiting
    for seq in (running, waiting):
        assert (seq.status, seq.finish_reason, seq.block_table) == (SequenceStatus.FINISHED, FinishReason.CANCELLED, [])
    assert scheduler.block_manager.num_used_blocks == 0
    assert not scheduler.has_work
    assert scheduler.abort("run") is None
    assert scheduler.abort("unknown") is None


def test_advance_skips_sequences_finished_after_schedule() -> None:
    scheduler = make_scheduler()
    seq = make_seq("a", 5)
    scheduler.add(seq)
    output = scheduler.schedule()
    scheduler.abort("a")
    scheduler.advance(output)
    assert seq.num_computed_tokens == 0


def test_schedule_refuses_sequence_with_nothing_to_compute() -> None:
    scheduler = make_scheduler()
    scheduler.add(make_seq("a", 5))
    scheduler.advance(scheduler.schedule())  # the engine forgot to append the sampled token
    with pytest.raises(RuntimeError, match="no token to compute"):
        scheduler.schedule()


def test_third_adapter_waits_without_blocking_base_or_known_adapters() -> None:
    scheduler = make_scheduler(max_loras=2)
    requests = [("a1", "a"), ("b1", "b"), ("c1", "c"), ("base", None), ("a2", "a")]
    for i, (name, adapter) in enumerate(requests):
        scheduler.add(make_seq(name, 4, adapter=adapter, arrival=i, max_tokens=8))
    assert ids(item.seq for item in step(scheduler).scheduled) == ["a1", "b1", "base", "a2"]
    assert ids(scheduler.waiting) == ["c1"]
    assert scheduler.running_adapters == Counter(a=2, b=1)
    assert scheduler.waiting_adapters == Counter(c=1)

    for seq in [seq for seq in scheduler.running if seq.adapter == "a"]:
        scheduler.finish(seq, FinishReason.STOP)
    assert chunks(step(scheduler)) == [("b1", 1, True), ("base", 1, True), ("c1", 4, True)]
    assert scheduler.running_adapters == Counter(b=1, c=1)


def test_adapter_still_loading_is_skipped_without_blocking_others() -> None:
    ready: set[str] = set()
    scheduler = make_scheduler(adapter_ready=ready.__contains__)
    scheduler.add(make_seq("cold", 4, adapter="slow", arrival=0))
    scheduler.add(make_seq("base", 4, arrival=1))
    assert chunks(step(scheduler)) == [("base", 4, True)]
    assert ids(scheduler.waiting) == ["cold"]
    ready.add("slow")
    assert chunks(step(scheduler)) == [("base", 1, True), ("cold", 4, True)]
    assert ids(scheduler.running) == ["cold", "base"]  # running stays in arrival order


def check_step_invariants(scheduler: Scheduler, output: SchedulerOutput) -> None:
    config, manager = scheduler.config, scheduler.block_manager
    seqs = [item.seq for item in output.scheduled]
    assert output.num_batched_tokens <= config.max_num_batched_tokens
    assert len(seqs) == len(set(map(id, seqs))) <= config.max_num_seqs
    assert all(seq.status is SequenceStatus.RUNNING for seq in seqs)
    assert len({seq.adapter for seq in seqs} - {None}) <= config.max_loras
    assert len(scheduler.running_adapters) <= config.max_loras
    assert scheduler.num_running <= config.max_num_seqs
    blocks = [block for seq in scheduler.running for block in seq.block_table]
    assert len(set(blocks)) == manager.num_used_blocks
    assert manager.enable_caching or len(blocks) == len(set(blocks))  # only cached blocks are shared
    assert all(not seq.block_table and seq.num_computed_tokens == 0 for seq in scheduler.waiting)
    assert all(len(item.seq.block_table) >= manager.num_blocks_for(item.end) for item in output.scheduled)
    assert all(seq in scheduler.waiting and seq not in seqs for seq in output.preempted)
    arrivals = [seq.arrival_time for seq in scheduler.running]
    assert arrivals == sorted(arrivals)


@pytest.mark.parametrize(("prefix_caching", "cached_first"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("seed", range(4))
def test_random_workload_keeps_invariants_and_leaks_no_blocks(seed: int, prefix_caching: bool, cached_first: bool):
    rng = random.Random(seed)
    clock = itertools.count()
    ready = {"a", "b"}
    scheduler = make_scheduler(
        num_blocks=24,
        block_size=4,
        max_num_seqs=6,
        max_num_batched_tokens=32,
        max_model_len=48,
        max_loras=2,
        watermark=0.05,
        adapter_ready=ready.__contains__,
        prefix_caching=prefix_caching,
        cached_first=cached_first,
    )
    seqs = [
        make_seq(f"r{i}", rng.randint(1, 40), adapter=rng.choice([None, "a", "b", "c"]), max_tokens=rng.randint(1, 16))
        for i in range(80)
    ]
    pending, aborted, num_steps = list(seqs), set(), 0
    while pending or scheduler.has_work:
        num_steps += 1
        assert num_steps < 5000, "scheduler made no progress"
        num_arrivals = rng.randint(0, 3)
        for seq in pending[:num_arrivals]:
            seq.arrival_time = next(clock)
            scheduler.add(seq)
        del pending[:num_arrivals]
        if num_steps == 40:
            ready.add("c")
        if scheduler.has_work and rng.random() < 0.05:
            victim = rng.choice([*scheduler.running, *scheduler.waiting])
            aborted.add(scheduler.abort(victim.request_id).request_id)
        output = scheduler.schedule()
        check_step_invariants(scheduler, output)
        assert "c" in ready or all(item.seq.adapter != "c" for item in output.scheduled)
        postprocess(scheduler, output)
    assert scheduler.block_manager.num_used_blocks == 0
    assert all(seq.is_finished and not seq.block_table for seq in seqs)
    done = [seq for seq in seqs if seq.request_id not in aborted]
    assert all(seq.num_output_tokens == seq.params.max_tokens or len(seq) >= 48 for seq in done)
    assert sum(seq.num_preemptions for seq in seqs) > 0
    assert (sum(seq.num_cached_tokens or 0 for seq in seqs) > 0) == prefix_caching


# Prefix caching: admission reuses the cached leading blocks and counts only the rest.


def test_shared_prefix_is_admitted_on_what_it_still_needs() -> None:
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=6, prefix_caching=True)
    first = make_seq("first", 10, adapter="a@1", arrival=0)
    scheduler.add(first)
    step(scheduler)
    step(scheduler)  # 10 prompt tokens in chunks of 6 and 4: two full blocks cached
    second = make_seq("second", 11, adapter="a@1", arrival=1)
    other = make_seq("other", 11, adapter="b@1", arrival=2)
    scheduler.add(second)
    scheduler.add(other)
    output = step(scheduler)
    assert chunks(output) == [("first", 1, True), ("second", 3, True), ("other", 2, False)]
    assert [item.start for item in output.scheduled] == [10, 8, 0]
    assert second.block_table[:2] == first.block_table[:2]
    assert (second.num_cached_tokens, other.num_cached_tokens) == (8, 0)


def test_mostly_cached_prompt_fits_where_its_whole_length_would_not() -> None:
    scheduler = make_scheduler(num_blocks=5, block_size=4, max_model_len=20, prefix_caching=True)
    holder = make_seq("holder", 13, max_tokens=8)
    scheduler.add(holder)
    step(scheduler)  # 4 blocks held, 3 of them cached; 1 block free
    follower = make_seq("follower", 13, arrival=1)
    scheduler.add(follower)
    output = step(scheduler)
    assert chunks(output) == [("holder", 1, True), ("follower", 1, True)]
    assert follower.num_cached_tokens == 12 and scheduler.block_manager.num_free_blocks == 0


def test_cached_first_admits_a_mostly_cached_prompt_ahead_of_an_uncached_one() -> None:
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=16, max_model_len=32, prefix_caching=True,
                               cached_first=True)  # fmt: skip
    scheduler.add(make_seq("task", 18, adapter="a@1", max_tokens=1))
    run_to_completion(scheduler)  # the task prefix (4 full blocks) is cached
    long = make_seq("long", 30, adapter="b@1", arrival=1)
    follower = make_seq("follower", 18, adapter="a@1", arrival=2)
    scheduler.add(long)
    scheduler.add(follower)
    output = step(scheduler)
    assert chunks(output) == [("follower", 2, True), ("long", 14, False)]  # first token now; the head still moves
    assert follower.num_cached_tokens == 16 and follower.num_output_tokens == 1


def test_cached_first_leaves_the_queue_head_at_least_half_the_budget() -> None:
    scheduler = make_scheduler(block_size=4, max_num_seqs=32, max_num_batched_tokens=16, max_model_len=40,
                               num_blocks=128, prefix_caching=True, cached_first=True)  # fmt: skip
    scheduler.add(make_seq("task", 18, max_tokens=1))
    run_to_completion(scheduler)
    head = make_seq("head", 40, adapter="b@1", arrival=1)
    scheduler.add(head)
    for i in range(10):  # a crowd of cheap, mostly cached followers behind the head
        scheduler.add(make_seq(f"f{i}", 18, arrival=2 + i))
    output = step(scheduler)
    jumped = [item for item in output.scheduled if item.seq.request_id.startswith("f")]
    assert sum(item.num_new_tokens for item in jumped) <= 8  # half the budget
    assert ("head", 8, False) in chunks(output)


def test_fcfs_policy_keeps_arrival_order() -> None:
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=16, max_model_len=32, prefix_caching=True)
    scheduler.add(make_seq("task", 18, adapter="a@1", max_tokens=1))
    run_to_completion(scheduler)
    scheduler.add(make_seq("long", 30, adapter="b@1", arrival=1))
    scheduler.add(make_seq("follower", 18, adapter="a@1", arrival=2))
    assert chunks(scheduler.schedule()) == [("long", 16, False)]


def test_fully_cached_prompt_recomputes_its_last_block() -> None:
    scheduler = make_scheduler(block_size=4, prefix_caching=True)
    scheduler.add(make_seq("a", 8, max_tokens=1))
    run_to_completion(scheduler)
    again = make_seq("again", 8, arrival=1)
    scheduler.add(again)
    assert chunks(scheduler.schedule()) == [("again", 4, True)]
    assert again.num_cached_tokens == 4


def test_preempted_sequence_finds_its_own_blocks_but_reports_its_first_admission() -> None:
    scheduler = make_scheduler(num_blocks=6, block_size=4, max_model_len=24, prefix_caching=True)
    a, b, c = (make_seq(name, 7, arrival=i, max_tokens=8) for i, name in enumerate("abc"))
    for seq in (a, b, c):
        scheduler.add(seq)
    assert chunks(step(scheduler)) == [("a", 7, True)]  # b and c wait for the block a computes: one prompt
    assert chunks(step(scheduler)) == [("a", 1, True), ("b", 3, True), ("c", 3, True)]
    step(scheduler)
    assert step(scheduler).preempted == [c]
    rest = run_to_completion(scheduler)
    readmitted = next(item for out in rest for item in out.scheduled if item.seq is c)
    assert readmitted.start == 8  # a computed the same 9 tokens (one prompt, one sampled token) into cached blocks
    assert [seq.num_cached_tokens for seq in (a, b, c)] == [0, 4, 4]  # each first admission's hit, not the re-run's
    assert scheduler.block_manager.num_used_blocks == 0


def test_a_burst_sharing_a_new_prefix_computes_it_once() -> None:
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=64, max_model_len=32, prefix_caching=True)
    burst = [make_seq(f"r{i}", 18, arrival=i, max_tokens=1) for i in range(4)]
    other = make_seq("other", 6, adapter="b@1", arrival=9)  # shares nothing: admitted at once
    for seq in (*burst, other):
        scheduler.add(seq)
    assert chunks(step(scheduler)) == [("r0", 18, True), ("other", 6, True)]
    assert chunks(step(scheduler)) == [("other", 1, True), *((f"r{i}", 2, True) for i in (1, 2, 3))]
    assert [seq.num_cached_tokens for seq in burst] == [0, 16, 16, 16]


def test_without_prefix_caching_a_burst_is_admitted_together() -> None:
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=64, max_model_len=32)
    for i in range(3):
        scheduler.add(make_seq(f"r{i}", 18, arrival=i))
    assert chunks(scheduler.schedule()) == [(f"r{i}", 18, True) for i in range(3)]


def test_abort_keeps_a_running_sequences_shared_blocks_held() -> None:
    scheduler = make_scheduler(block_size=4, prefix_caching=True)
    first, second = make_seq("first", 9, max_tokens=8), make_seq("second", 9, arrival=1, max_tokens=8)
    scheduler.add(first)
    step(scheduler)
    scheduler.add(second)
    step(scheduler)
    assert second.block_table[:2] == first.block_table[:2]
    scheduler.abort("first")
    assert scheduler.block_manager.num_used_blocks == len(second.block_table) == 3
    run_to_completion(scheduler)
    manager = scheduler.block_manager
    assert manager.num_used_blocks == 0 and manager.num_cached_blocks == 4  # 17 tokens: 4 full blocks, equal in both


def test_a_sequence_scoring_its_prompt_reuses_only_blocks_it_scored_already() -> None:
    scheduler = make_scheduler(block_size=4, prefix_caching=True)
    scheduler.add(make_seq("warm", 13, max_tokens=1))
    run_to_completion(scheduler)
    scored = make_seq("scored", 13)
    scored.params = SamplingParams(max_tokens=4, prompt_logprobs=0)
    scheduler.add(scored)
    assert chunks(scheduler.schedule()) == [("scored", 13, True)]
    assert scored.num_cached_tokens == 0
