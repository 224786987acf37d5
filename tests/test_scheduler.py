"""Scheduler + block manager + EngineCore with the fake paged runner: outputs, chunking, prefix cache,
preemption, aborts, refusals and the vLLM policy's rules. Invariants are checked after every step."""

from __future__ import annotations

import random

import pytest
from fake_runner import FakeRunner, reference_generate

from engine.config import EngineConfig, SchedulerConfig
from engine.core import EngineCore, build_scheduler
from engine.protocol import AddRequest, FinishReason, SamplingParams, TokenDelta


def create_core(num_blocks: int = 256, block_size: int = 4, **sched) -> EngineCore:
    config = EngineConfig(scheduler=SchedulerConfig(block_size=block_size, **sched))
    runner = FakeRunner(num_blocks, block_size)
    return EngineCore(build_scheduler(config, runner), runner, check_invariants=True)


def create_request(request_id: str, prompt: list[int], max_tokens: int = 8, arrival: float = 0.0, **sampling):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling)
    return AddRequest(request_id, prompt, params, arrival_time=arrival)


def run_to_completion(core: EngineCore, max_steps: int = 10_000) -> dict[str, list[TokenDelta]]:
    deltas: dict[str, list[TokenDelta]] = {}
    for _ in range(max_steps):
        if not core.has_work():
            return deltas
        for delta in core.step():
            deltas.setdefault(delta.request_id, []).append(delta)
    raise AssertionError("engine did not finish")


def tokens_of(deltas: list[TokenDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(3, 997) for _ in range(length)]


def test_single_request_matches_reference_and_frees_everything():
    core = create_core()
    prompt = list(range(10, 23))
    core.add_request(create_request("a", prompt, max_tokens=9))
    deltas = run_to_completion(core)["a"]
    assert tokens_of(deltas) == reference_generate(prompt, 9)
    assert deltas[-1].finish_reason == FinishReason.LENGTH
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert core.scheduler.block_manager.num_free_blocks == 256


@pytest.mark.parametrize("budget", [7, 64, 2048])
def test_ragged_concurrent_requests_with_chunked_prefill(budget):
    rng = random.Random(budget)
    core = create_core(max_num_batched_tokens=budget)
    prompts = {f"r{i}": random_prompt(rng, rng.randint(1, 40)) for i in range(12)}
    for request_id, prompt in prompts.items():
        core.add_request(create_request(request_id, prompt, max_tokens=rng.randint(1, 20)))
    max_tokens = {rid: core.scheduler.requests[rid].sampling.max_tokens for rid in prompts}
    out = run_to_completion(core)
    for request_id, prompt in prompts.items():
        assert tokens_of(out[request_id]) == reference_generate(prompt, max_tokens[request_id])
    assert core.scheduler.block_manager.num_free_blocks == 256


def test_step_respects_token_budget_and_mixes_prefill_with_decode():
    core = create_core(max_num_batched_tokens=10)
    core.add_request(create_request("short", [5, 6], max_tokens=4, arrival=0.0))
    core.add_request(create_request("long", list(range(3, 40)), max_tokens=4, arrival=1.0))
    first = core.scheduler.schedule()
    assert first.num_tokens == 10 and [(r.request_id, r.num_tokens) for r in first.scheduled] == [
        ("short", 2),
        ("long", 8),
    ]
    assert first.scheduled[0].needs_sample and not first.scheduled[1].needs_sample
    core.scheduler.update(first, core.runner.execute(first))
    # Next steps carry short's decode together with long's next prefill chunk.
    mixed = False
    while core.has_work():
        output = core.scheduler.schedule()
        assert output.num_tokens <= 10
        kinds = {r.request_id: r.num_tokens for r in output.scheduled}
        mixed |= len(kinds) == 2 and min(kinds.values()) == 1 and max(kinds.values()) > 1
        core.scheduler.update(output, core.runner.execute(output))
        core.scheduler.check_invariants()
    assert mixed


def test_prefix_cache_hit_shares_blocks_and_keeps_output_exact():
    core = create_core(block_size=4)
    shared = list(range(100, 120))  # 5 full blocks
    core.add_request(create_request("first", shared + [7, 8], max_tokens=3))
    run_to_completion(core)
    core.add_request(create_request("second", shared + [9], max_tokens=5))
    first = core.step()
    assert core.scheduler.requests["second"].num_cached_tokens == 20
    assert first[0].num_cached_tokens == 20
    out = run_to_completion(core)
    assert tokens_of(first + out["second"]) == reference_generate(shared + [9], 5)
    blocks = core.scheduler.block_manager
    assert blocks.prefix_cache_hits == 20 and blocks.prefix_cache_queries == 22 + 21


def test_concurrent_requests_share_prefix_blocks_with_refcounts():
    core = create_core(block_size=4)
    shared = list(range(200, 216))
    core.add_request(create_request("a", shared + [1], max_tokens=30))
    for _ in range(3):
        core.step()
    core.add_request(create_request("b", shared + [5, 6], max_tokens=3))
    first = [d for d in core.step() if d.request_id == "b"]
    a, b = core.scheduler.requests["a"], core.scheduler.requests["b"]
    assert a.block_ids[:4] == b.block_ids[:4]
    assert all(core.scheduler.block_manager.blocks[i].ref_count == 2 for i in a.block_ids[:4])
    out = run_to_completion(core)
    assert tokens_of(first + out["b"]) == reference_generate(shared + [5, 6], 3)


def test_cache_salt_isolates_prefix_cache():
    core = create_core(block_size=4)
    prompt = list(range(300, 320))
    core.add_request(
        AddRequest("x", prompt, SamplingParams(max_tokens=2, temperature=0), 0.0, cache_salt="t1")
    )
    run_to_completion(core)
    core.add_request(
        AddRequest("y", prompt, SamplingParams(max_tokens=2, temperature=0), 0.0, cache_salt="t2")
    )
    out = run_to_completion(core)
    assert out["y"][0].num_cached_tokens == 0


def test_preemption_by_recompute_keeps_outputs_exact():
    rng = random.Random(7)
    core = create_core(num_blocks=24, block_size=4, max_num_batched_tokens=64)
    prompts = {f"p{i}": random_prompt(rng, rng.randint(8, 20)) for i in range(6)}
    for request_id, prompt in prompts.items():
        core.add_request(create_request(request_id, prompt, max_tokens=40))
    out = run_to_completion(core)
    assert core.scheduler.num_preemptions_total > 0
    for request_id, prompt in prompts.items():
        assert tokens_of(out[request_id]) == reference_generate(prompt, 40)
    assert core.scheduler.block_manager.num_free_blocks == 24


def test_vllm_policy_preempts_newest_and_admits_nothing_in_that_step():
    core = create_core(num_blocks=8, block_size=4, max_num_batched_tokens=64, enable_prefix_caching=False)
    core.add_request(create_request("old", list(range(3, 15)), max_tokens=20, arrival=0.0))
    core.add_request(create_request("new", list(range(20, 32)), max_tokens=20, arrival=1.0))
    core.step()  # both prefilled: 3 + 3 blocks (12 tokens each + room for the first decode)
    core.add_request(create_request("late", [40, 41], max_tokens=2, arrival=2.0))
    preempted_step = None
    for _ in range(30):
        output = core.scheduler.schedule()
        if output.preempted_request_ids:
            preempted_step = output
            break
        core.scheduler.update(output, core.runner.execute(output))
    assert preempted_step is not None
    assert preempted_step.preempted_request_ids == ["new"]
    assert [r.request_id for r in preempted_step.scheduled] == ["old"]  # "late" was not admitted in this step


def test_fcfs_head_of_line_blocks_later_requests():
    core = create_core(num_blocks=10, block_size=4, enable_prefix_caching=False)
    core.add_request(create_request("running", list(range(3, 27)), max_tokens=10, arrival=0.0))  # 6-7 blocks
    core.step()
    core.add_request(create_request("big", list(range(3, 19)), max_tokens=2, arrival=1.0))  # needs 4 blocks
    core.add_request(create_request("tiny", [5], max_tokens=2, arrival=2.0))  # would fit
    output = core.scheduler.schedule()
    assert [r.request_id for r in output.scheduled] == ["running"]


def test_abort_frees_blocks_and_reports_abort():
    core = create_core(num_blocks=64)
    core.add_request(create_request("a", list(range(3, 30)), max_tokens=50))
    core.add_request(create_request("b", list(range(3, 9)), max_tokens=50))
    for _ in range(3):
        core.step()
    assert core.scheduler.block_manager.num_free_blocks < 64
    core.abort(["a", "b", "unknown"])
    deltas = core.step()
    assert {d.request_id: d.finish_reason for d in deltas} == {
        "a": FinishReason.ABORT,
        "b": FinishReason.ABORT,
    }
    assert not core.has_work()
    assert core.scheduler.block_manager.num_free_blocks == 64
    core.scheduler.check_invariants()


def test_abort_of_waiting_request():
    core = create_core(num_blocks=64, max_num_seqs=1)
    core.add_request(create_request("a", [5, 6, 7], max_tokens=5))
    core.add_request(create_request("b", [5, 6, 8], max_tokens=5))
    first = core.step()
    core.abort(["b"])
    out = run_to_completion(core)
    assert out["b"][-1].finish_reason == FinishReason.ABORT and len(tokens_of(first + out["a"])) == 5


def test_request_that_can_never_fit_is_refused_not_deadlocked():
    core = create_core(num_blocks=4, block_size=4)
    core.add_request(create_request("huge", list(range(3, 13)), max_tokens=100))
    out = run_to_completion(core)
    assert out["huge"][-1].finish_reason == FinishReason.ERROR
    assert "KV blocks" in out["huge"][-1].error


def test_prompt_at_context_length_is_refused():
    config = EngineConfig(scheduler=SchedulerConfig(block_size=4))
    runner = FakeRunner(64, 4, max_model_len=16)
    core = EngineCore(build_scheduler(config, runner), runner, check_invariants=True)
    core.add_request(create_request("long", list(range(3, 19)), max_tokens=1))
    assert run_to_completion(core)["long"][-1].finish_reason == FinishReason.ERROR


def test_context_length_finishes_with_length():
    config = EngineConfig(scheduler=SchedulerConfig(block_size=4))
    runner = FakeRunner(64, 4, max_model_len=16)
    core = EngineCore(build_scheduler(config, runner), runner, check_invariants=True)
    core.add_request(create_request("a", list(range(3, 13)), max_tokens=100))
    out = run_to_completion(core)["a"]
    assert len(tokens_of(out)) == 6 and out[-1].finish_reason == FinishReason.LENGTH


def test_eos_stop_token_ids_and_ignore_eos():
    core = create_core()
    core.add_request(create_request("eos", [5, 6], max_tokens=10))
    core.add_request(create_request("ignore", [5, 7], max_tokens=4, ignore_eos=True))
    core.add_request(create_request("stopid", [5, 8], max_tokens=10, stop_token_ids=(555,)))
    core.runner.forced = {"eos": [50, 2, 9], "ignore": [2, 2, 2, 2], "stopid": [4, 555]}
    out = run_to_completion(core)
    assert tokens_of(out["eos"]) == [50, 2] and out["eos"][-1].finish_reason == FinishReason.STOP
    assert tokens_of(out["ignore"]) == [2, 2, 2, 2] and out["ignore"][-1].finish_reason == FinishReason.LENGTH
    assert tokens_of(out["stopid"]) == [4, 555] and out["stopid"][-1].finish_reason == FinishReason.STOP


def test_max_num_seqs_caps_running():
    core = create_core(max_num_seqs=2)
    for i in range(5):
        core.add_request(create_request(f"r{i}", [5, 6, i + 3], max_tokens=3))
    core.step()
    assert len(core.scheduler.running) == 2
    run_to_completion(core)


def test_duplicate_request_id_is_rejected():
    core = create_core()
    core.add_request(create_request("a", [5], max_tokens=3))
    with pytest.raises(ValueError):
        core.add_request(create_request("a", [5], max_tokens=3))


def test_stats_reflect_state():
    core = create_core(num_blocks=64)
    core.add_request(create_request("a", list(range(3, 20)), max_tokens=4))
    core.step()
    stats = core.stats()
    assert stats.num_running == 1 and stats.num_free_blocks < 64 and 0 < stats.kv_usage <= 1
    assert stats.num_prompt_tokens_total == 17 and stats.num_generation_tokens_total == 1
    ready = core.ready_message()
    assert ready.num_kv_blocks == 64 and ready.policy == "vllm"
