"""What the engine reports for /metrics and the status page: queue time on the first token delta, the batch's
prefill/decode composition, per-(tenant, app, class) queues and free blocks that still hold prefix-cache content.
Runs EngineCore with the fake paged runner; invariants (the cached-free counter included) hold after every step."""

from __future__ import annotations

import time

from fake_runner import FakeRunner

from engine.config import EngineConfig, SchedulerConfig
from engine.core import EngineCore, build_scheduler, queue_stats
from engine.protocol import AddRequest, BatchComposition, QueueStat, SamplingParams
from engine.request import Request


def create_core(num_blocks: int = 64, block_size: int = 4, **sched) -> EngineCore:
    config = EngineConfig(scheduler=SchedulerConfig(block_size=block_size, **sched))
    runner = FakeRunner(num_blocks, block_size)
    return EngineCore(build_scheduler(config, runner), runner, check_invariants=True)


def add(core: EngineCore, request_id: str, prompt_len: int, max_tokens: int = 4, **identity) -> None:
    prompt = [10 + (i % 50) for i in range(prompt_len)]
    core.add_request(AddRequest(request_id, prompt, SamplingParams(max_tokens, 0.0), 0.0, **identity))


def test_queue_seconds_is_on_the_first_token_delta_only():
    core = create_core(max_num_seqs=1)
    add(core, "first", 6, max_tokens=3)
    add(core, "second", 6, max_tokens=3)  # waits for "first" to finish (one running request at a time)
    time.sleep(0.02)
    deltas = {}
    while core.has_work():
        for delta in core.step():
            deltas.setdefault(delta.request_id, []).append(delta)
    first, second = deltas["first"], deltas["second"]
    assert 0.02 <= first[0].queue_seconds < 1.0
    assert second[0].queue_seconds > first[0].queue_seconds  # it also waited for three steps of "first"
    assert all(d.queue_seconds == 0.0 for d in first[1:] + second[1:])


def test_batch_composition_splits_prefill_from_decode():
    core = create_core(max_num_batched_tokens=8)
    add(core, "a", 3, max_tokens=5)
    core.step()  # "a" prefilled, first token sampled
    add(core, "b", 20, max_tokens=2)
    core.step()  # "a" decodes one token; "b" gets the other 7 of the budget
    assert core.stats().batch == BatchComposition(1, 7, 1, 1)
    while core.has_work():
        core.step()
    assert core.stats().batch == BatchComposition()  # nothing runs: an empty batch, not a stale one


def test_queues_group_by_tenant_app_and_class():
    core = create_core(max_num_seqs=2, max_num_batched_tokens=64)
    add(core, "r1", 5, tenant="acme", app_id="agent", slo_class="batch")
    add(core, "r2", 5, tenant="acme", app_id="agent", slo_class="batch")
    add(core, "r3", 5, tenant="acme", app_id="agent", slo_class="batch")
    add(core, "r4", 9, tenant="zed")  # no app id: grouped under ""
    before = core.stats().queues
    assert before == [
        QueueStat("acme", "agent", "batch", num_waiting=3),
        QueueStat("zed", "", "interactive", num_waiting=1),
    ]
    core.step()  # admits r1 and r2 (max_num_seqs=2): 2 blocks each
    assert core.stats().queues[0] == QueueStat("acme", "agent", "batch", 1, 2, 4)


def test_queue_stats_cap_merges_the_rest_per_class():
    def request(i: int, slo_class: str) -> Request:
        return Request(f"r{i}", [1], SamplingParams(), tenant=f"t{i}", slo_class=slo_class)

    waiting = [request(i, "batch" if i % 2 else "interactive") for i in range(10)]
    stats = queue_stats(waiting + [request(0, "interactive")], [], max_groups=3)
    assert stats[0] == QueueStat("t0", "", "interactive", num_waiting=2)  # the largest group first
    assert len(stats) == 5
    assert stats[3:] == [
        QueueStat("other", "other", "batch", num_waiting=4),
        QueueStat("other", "other", "interactive", num_waiting=3),
    ]
    assert sum(q.num_waiting for q in stats) == 11


def test_cached_free_blocks_count_prefix_content_left_in_the_pool():
    core = create_core(num_blocks=16, block_size=4)
    blocks = core.scheduler.block_manager
    add(core, "a", 12, max_tokens=1)  # 12 prompt tokens: 3 full blocks get hashes, 1 block for the output
    while core.has_work():
        core.step()
    stats = core.stats()
    assert stats.num_free_blocks == 16 and stats.num_cached_free_blocks == 3
    add(core, "b", 12, max_tokens=4)  # same prompt: revives the 2 reusable cached blocks
    core.step()
    assert blocks.num_cached_free_blocks == 1
    while core.has_work():
        core.step()
    blocks.reset_prefix_cache()
    assert blocks.num_cached_free_blocks == 0
    blocks.check_invariants()
