"""QLM in the engine: SLO classes and deadlines, the RWT estimator, the edf and qlm policies, eviction by swap or
recompute. Scheduler tests use the fake runner (tests/fake_runner.py) on a manual clock, so they are exact."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from fake_runner import FakeRunner, reference_generate

from engine.batch import ScheduledRequest, SchedulerOutput
from engine.config import DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.core import EngineCore, build_scheduler
from engine.protocol import AddRequest, SamplingParams
from engine.qlm import QlmMonitor, RwtEstimator, form_groups
from engine.request import Request
from engine.slo import DEFAULT_SLO_TARGETS, SloTarget, build_slo_table, parse_slo_spec
from server.schema import RequestError, parse_identity


class ManualClock:
    """A scheduler clock the test moves by hand (or the runner moves by a fixed cost per step)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def add(
    core: EngineCore,
    request_id: str,
    num_prompt: int,
    max_tokens: int,
    slo_class: str = "interactive",
    rl_mean: float = 0.0,
    rl_q: float = 0.0,
    seed: int = 0,
) -> None:
    prompt = [3 + (seed * 7919 + i * 31) % 990 for i in range(num_prompt)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    core.add_request(
        AddRequest(request_id, prompt, params, 0.0, slo_class=slo_class, rl_mean=rl_mean, rl_q=rl_q)
    )


# ---- SLO classes ------------------------------------------------------------------------------------------


def test_slo_spec_parsing_and_overrides():
    assert parse_slo_spec("interactive:ttft=2,tpot=0.2") == ("interactive", SloTarget(2.0, 0.2, math.inf))
    assert parse_slo_spec("Batch:e2e=600") == ("batch", SloTarget(e2e_s=600.0))
    for bad in ("interactive", "x:ttft=0", "x:foo=1", "x:ttft=abc", "x:", ":ttft=1"):
        with pytest.raises(ValueError):
            parse_slo_spec(bad)
    table = build_slo_table(("interactive:ttft=1", "gold:ttft=0.5,e2e=30"))
    assert table["interactive"] == SloTarget(ttft_s=1.0, tpot_s=0.2)  # tpot kept from the default
    assert table["batch"] == DEFAULT_SLO_TARGETS["batch"]
    assert table["gold"] == SloTarget(0.5, math.inf, 30.0)
    assert table["batch"].tightness > table["interactive"].tightness


def test_slo_class_from_header_priority_and_service_tier():
    assert parse_identity({"priority": "batch"}, {}).slo_class == "batch"
    assert parse_identity({"priority": 3}, {}).priority == 3  # an int keeps vLLM's meaning
    assert parse_identity({"priority": "batch", "service_tier": "default"}, {}).slo_class == "batch"
    assert parse_identity({"priority": "batch"}, {"x-slo-class": "interactive"}).slo_class == "interactive"
    with pytest.raises(RequestError, match="unknown SLO class"):
        parse_identity({"priority": "platinum"}, {})
    with pytest.raises(RequestError, match="unknown SLO class"):
        parse_identity({}, {"x-slo-class": "gold"})
    assert parse_identity({}, {"x-slo-class": "gold"}, ("interactive", "batch", "gold")).slo_class == "gold"


def test_requests_get_their_class_deadlines_at_intake():
    clock = ManualClock()
    config = EngineConfig(scheduler=SchedulerConfig(block_size=4, slo=("interactive:ttft=1.5",)))
    runner = FakeRunner(64, 4)
    core = EngineCore(build_scheduler(config, runner, clock), runner)
    clock.now = 10.0
    add(core, "i", 8, 4)
    add(core, "b", 8, 4, slo_class="batch")
    i, b = core.scheduler.requests["i"], core.scheduler.requests["b"]
    assert i.ttft_deadline == 11.5 and i.e2e_deadline == math.inf and i.next_deadline == 11.5
    assert b.ttft_deadline == math.inf and b.next_deadline == b.e2e_deadline == 610.0
    i.output_token_ids = [5, 5]  # two tokens out: the next is due at ttft + 2·tpot
    assert i.next_deadline == pytest.approx(11.5 + 2 * 0.2)


# ---- RWT estimator -------------------------------------------------------------------------------------------


def tagged(request_id: str, slo_class: str, rl_mean: float, sigma: float, queued: float = 0.0) -> Request:
    """A waiting request whose rl_q puts σ = `sigma` under the estimator's normal reading of the 0.9 quantile."""
    rl_q = rl_mean + 1.2815515655446004 * sigma
    params = SamplingParams(max_tokens=1000)
    request = Request(request_id, [5, 6, 7], params, slo_class=slo_class, rl_mean=rl_mean, rl_q=rl_q)
    request.queued_time = queued
    return request


def test_rwt_estimator_against_a_hand_worked_queue():
    # Virtual queue: g1 = two interactive requests of μ=10, σ=2 (log4 bucket 1); g2 = one batch request of μ=100,
    # σ=0 (bucket 3); g3 = one interactive request of μ=100 (bucket 3, another class than g2).
    waiting = [
        tagged("a", "interactive", 10, 2, 0.0),
        tagged("b", "batch", 100, 0, 0.1),
        tagged("c", "interactive", 10, 2, 0.2),
        tagged("d", "interactive", 100, 3, 0.3),
    ]
    groups = form_groups(waiting)
    assert [[r.request_id for r in g.requests] for g in groups] == [["a", "c"], ["b"], ["d"]]
    assert groups[0].sum_mu == pytest.approx(20) and groups[0].sum_var == pytest.approx(8)
    # z_0.99 = 2.326348; by hand: W1 = 0, W2 = (20 + 2.326348·√8) / 10 = 2.657991,
    # W3 = (20 + 100 + 2.326348·√(8 + 0)) / 10 = 12.657991 (tokens ahead at Θ = 10 tokens/s).
    waits = RwtEstimator(0.99).waits(groups, tokens_per_s=10.0)
    assert waits == pytest.approx([0.0, 2.657991, 12.657991], rel=1e-6)
    assert RwtEstimator(0.99).waits(groups, tokens_per_s=None) == [0.0, 0.0, 0.0]  # Θ not measured yet


def test_violation_check_marks_the_group_that_would_miss_its_deadline():
    monitor = QlmMonitor(tick_s=0.1, quantile=0.99)
    monitor.meter.observe(seconds=1.0, num_generated=10, num_prefill_tokens=0, num_tokens=10)  # Θ = 10 tok/s
    batch = tagged("b", "batch", 100, 0, queued=0.0)
    chat = tagged("i", "interactive", 10, 0, queued=0.5)
    batch.slo, chat.slo = DEFAULT_SLO_TARGETS["batch"], DEFAULT_SLO_TARGETS["interactive"]
    monitor.tick(1.0, [batch, chat], [], 0.0)
    # The chat waits 100 tokens / 10 tok/s = 10 s behind the batch request: 1 + 10 > its TTFT deadline 2.5.
    assert monitor.urgent_ids == {"i"}
    monitor.tick(1.05, [batch], [], 0.0)  # within the tick: nothing re-evaluated
    assert monitor.urgent_ids == {"i"}
    chat.first_scheduled_time = (
        1.2  # admitted: its estimate (0.5 s queued + W = 0, as it goes first) is logged
    )
    monitor.tick(1.2, [batch], [], 0.0)
    assert monitor.urgent_ids == set()
    assert list(monitor.estimate_log) == [pytest.approx((0.5, 0.7))]


# ---- edf / qlm in the engine ----------------------------------------------------------------------------------


class ClockedRunner(FakeRunner):
    """The fake runner on a manual clock: every step costs `step_s` seconds (decode-bound, as on a GPU)."""

    def __init__(self, clock: ManualClock, step_s: float, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clock, self.step_s = clock, step_s

    def execute(self, output):
        self.clock.now += self.step_s
        return super().execute(output)


def clocked_core(policy: str, num_blocks: int = 512, num_host_blocks: int = 0, **sched) -> EngineCore:
    clock = ManualClock()
    runner = ClockedRunner(clock, 0.02, num_blocks, 4, num_host_blocks=num_host_blocks)
    config = EngineConfig(scheduler=SchedulerConfig(policy=policy, block_size=4, **sched))
    return EngineCore(build_scheduler(config, runner, clock), runner, check_invariants=True)


def run_burst(
    policy: str, num_host_blocks: int = 0
) -> tuple[dict[str, float], dict[str, list[int]], EngineCore]:
    """16 batch requests of 200 tokens fill 4 seats; at t = 1 s three chats of 8 tokens arrive behind them.
    Returns each chat's TTFT, every request's output and the core."""
    core = clocked_core(policy, num_host_blocks=num_host_blocks, max_num_seqs=4)
    clock = core.scheduler.clock
    for i in range(16):
        add(core, f"batch{i}", 16, 200, "batch", rl_mean=200, rl_q=200, seed=i)
    arrivals, ttft, outputs = {}, {}, {}
    while core.has_work() or not arrivals:
        if clock.now >= 1.0 and not arrivals:
            for i in range(3):
                add(core, f"chat{i}", 8, 8, "interactive", rl_mean=8, rl_q=8, seed=100 + i)
                arrivals[f"chat{i}"] = clock.now
        for delta in core.step():
            outputs.setdefault(delta.request_id, []).extend(delta.token_ids)
            if delta.request_id in arrivals and delta.request_id not in ttft and delta.token_ids:
                ttft[delta.request_id] = clock.now - arrivals[delta.request_id]
    return ttft, outputs, core


def expected_output(request_id: str) -> list[int]:
    kind, index = ("batch", int(request_id[5:])) if request_id.startswith("batch") else ("chat", None)
    if kind == "batch":
        return reference_generate([3 + (index * 7919 + i * 31) % 990 for i in range(16)], 200)
    seed = 100 + int(request_id[4:])
    return reference_generate([3 + (seed * 7919 + i * 31) % 990 for i in range(8)], 8)


@pytest.mark.parametrize("num_host_blocks", [0, 256])  # evict by recompute only / by swap
def test_burst_behind_batch_backlog_meets_ttft_with_qlm_and_misses_with_vllm(num_host_blocks):
    target = DEFAULT_SLO_TARGETS["interactive"].ttft_s
    vllm_ttft, vllm_outputs, _ = run_burst("vllm")
    qlm_ttft, qlm_outputs, qlm_core = run_burst("qlm", num_host_blocks)
    assert (
        min(vllm_ttft.values()) > target
    )  # FCFS: the chats wait for three waves of 200-token batch requests
    assert max(qlm_ttft.values()) < target  # urgent at the next tick, admitted by evicting batch requests
    assert qlm_core.scheduler.num_preemptions_total >= 3
    assert (qlm_core.scheduler.num_swaps_total > 0) == (num_host_blocks > 0)
    for outputs in (vllm_outputs, qlm_outputs):  # evicted requests resume without losing or changing a token
        assert all(tokens == expected_output(rid) for rid, tokens in outputs.items())
    assert len(qlm_outputs) == 19


def test_edf_serves_the_earliest_deadline_first():
    core = clocked_core("edf", max_num_seqs=1)
    add(core, "late", 8, 4, "batch", seed=1)
    add(core, "soon", 8, 4, "interactive", seed=2)
    first = [d.request_id for d in core.step()]
    assert first == ["soon"]


@pytest.mark.parametrize("policy", ["vllm", "edf", "qlm"])
def test_invariants_and_outputs_under_a_seeded_fuzz(policy):
    """Random arrivals of both classes into a pool too small for them: preemption, eviction by swap (host space
    for a few requests only) and by recompute all happen; every step's invariants hold, every output is exact."""
    rng = random.Random(7)
    core = clocked_core(policy, num_blocks=48, num_host_blocks=24, max_num_seqs=6, max_num_batched_tokens=32)
    prompts, max_tokens, outputs = {}, {}, {}
    for step in range(3000):
        if step < 400 and rng.random() < 0.15:
            rid = f"r{len(prompts)}"
            slo_class = rng.choice(["interactive", "batch"])
            prompts[rid] = [rng.randrange(3, 997) for _ in range(rng.randint(1, 40))]
            max_tokens[rid] = rng.randint(1, 60)
            mean = max_tokens[rid] * rng.uniform(0.5, 1.5)
            params = SamplingParams(max_tokens=max_tokens[rid], temperature=0.0, ignore_eos=True)
            msg = AddRequest(
                rid, prompts[rid], params, 0.0, slo_class=slo_class, rl_mean=mean, rl_q=1.3 * mean
            )
            core.add_request(msg)
        for delta in core.step():
            outputs.setdefault(delta.request_id, []).extend(delta.token_ids)
        if step >= 400 and not core.has_work():
            break
    assert not core.has_work()
    assert set(outputs) == set(prompts)
    for rid, tokens in outputs.items():
        assert tokens == reference_generate(prompts[rid], max_tokens[rid]), rid
    if policy == "qlm":
        assert core.scheduler.num_swaps_total > 0
    assert core.scheduler.swap_space.num_free_blocks == 24 or policy != "qlm"


# ---- swap on the real runner (tiny random Llama) ----------------------------------------------------------------

BLOCK = 4
BYTES_PER_BLOCK = 2 * 2 * BLOCK * 2 * 16 * 4  # layers x (k, v) x tokens x KV heads x head_dim x fp32


def tiny_runner(model_dir: Path, num_blocks: int = 64, num_host_blocks: int = 32):
    from engine.runner import ModelRunner  # torch behind the import, as in the engine

    device = DeviceConfig(
        device="cpu",
        kv_cache_memory=num_blocks * BYTES_PER_BLOCK,
        swap_space=num_host_blocks * BYTES_PER_BLOCK,
    )
    return ModelRunner(ModelConfig(model=str(model_dir)), device, BLOCK)


def test_swap_out_and_in_round_trips_kv_bit_exactly(tiny_llama_dir: Path):
    import torch

    runner = tiny_runner(tiny_llama_dir)
    assert runner.num_host_blocks == 32 and runner.swap_seconds_per_block > 0
    prompt = ScheduledRequest("r", list(range(3, 17)), 0, [0, 1, 2, 3], SamplingParams(temperature=0.0), True)
    runner.execute(SchedulerOutput([prompt]))
    before = runner.kv_cache.storage[:, :, [0, 1, 2, 3]].clone()
    assert before.abs().sum() > 0
    runner.swap([(0, 9), (1, 5), (2, 6), (3, 7)], [])
    runner.kv_cache.storage[:, :, [0, 1, 2, 3]] = 0.0  # the freed blocks are reused by someone else
    runner.swap([], [(9, 20), (5, 11), (6, 30), (7, 12)])  # back into other free blocks
    assert torch.equal(runner.kv_cache.storage[:, :, [20, 11, 30, 12]], before)


class ClockedModelRunner:
    """A real ModelRunner whose steps cost 20 ms of a manual clock, so QLM's ticks are deterministic. Its swap
    price is on that clock too (0.1 ms a block), not the wall-clock one the runner measured."""

    swap_seconds_per_block = 1e-4

    def __init__(self, runner, clock: ManualClock) -> None:
        self.runner, self.clock = runner, clock

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    def execute(self, output):
        self.clock.now += 0.02
        return self.runner.execute(output)


def test_greedy_output_after_evict_by_swap_and_resume_equals_the_unevicted_run(tiny_llama_dir: Path):
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompt = [(7 * i) % 300 + 3 for i in range(22)]

    def core(policy: str) -> EngineCore:
        clock = ManualClock()
        runner = ClockedModelRunner(tiny_runner(tiny_llama_dir), clock)
        sched = SchedulerConfig(
            policy=policy, block_size=BLOCK, max_num_seqs=1, slo=("interactive:ttft=0.1",)
        )
        return EngineCore(build_scheduler(EngineConfig(scheduler=sched), runner, clock), runner, True)

    alone = core("vllm")
    alone.add_request(AddRequest("b", prompt, params, 0.0, slo_class="batch"))
    expected = [t for _ in range(100) for d in alone.step() for t in d.token_ids]
    assert len(expected) == 40

    evicting = core("qlm")
    evicting.add_request(AddRequest("b", prompt, params, 0.0, slo_class="batch"))
    outputs: dict[str, list[int]] = {}
    for step in range(200):
        if step == 10:  # "b" has 9 tokens out; the chat's deadline passes while "b" holds the only seat
            chat = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            evicting.add_request(AddRequest("i", [5, 6, 7], chat, 0.0))
        for delta in evicting.step():
            outputs.setdefault(delta.request_id, []).extend(delta.token_ids)
    scheduler = evicting.scheduler
    assert scheduler.num_swaps_total == 1 and scheduler.num_preemptions_total == 1
    assert outputs["b"] == expected
    assert len(outputs["i"]) == 4
    assert scheduler.swap_space.num_free_blocks == 32


def test_engine_stats_report_qlm_gauges_and_estimator_accuracy():
    _, _, core = run_burst("qlm", num_host_blocks=256)
    extra = core.stats().extra
    assert extra["num_swaps_total"] == 3 and extra["qlm_violations_total"] >= 1
    # 19 requests, less the 4 batch requests admitted at the first step, before Θ was measured
    assert extra["qlm_rwt_pairs"] == len(core.scheduler.policy.slo.estimate_log) == 15
    assert extra["qlm_tokens_per_s"] > 0
    assert extra["qlm_rwt_mean_abs_error_s"] >= abs(extra["qlm_rwt_mean_error_s"])
    assert "qlm_violations_total" not in run_burst("vllm")[2].stats().extra


# ---- the simulator's host swap pool ----------------------------------------------------------------------------


def _swap_scenario(num_host_blocks: int, host_bytes_per_s: float = 1e9):
    """A batch request (40 + 60 tokens) fills most of a 26-block pool; an interactive one (40 + 5) arrives at
    0.35 s, when it no longer fits, with a TTFT target the running work makes it miss: qlm evicts the batch
    request (by swap when there is a pool and it is cheaper). Steps take ~10 ms, so the 0.1 s tick matters."""
    from engine.cost_model import CostModel
    from engine.simulator import SimConfig, SimRequest, simulate

    cost = CostModel(1e-2, 1e-5, 1e-4, 0.0, kv_bytes_per_token=1000, host_bytes_per_s=host_bytes_per_s)
    requests = [
        SimRequest(0.0, 40, 60, slo_class="batch", rl_mean=60.0, rl_q=60.0),
        SimRequest(0.35, 40, 5, slo_class="interactive", rl_mean=5.0, rl_q=5.0),
    ]
    scheduler = SchedulerConfig(policy="qlm", block_size=4, slo=("interactive:ttft=0.02",))
    config = SimConfig(scheduler, num_kv_blocks=26, num_host_blocks=num_host_blocks, check_invariants=True)
    return cost, simulate(requests, cost, config)


def test_simulator_evicts_by_swap_at_the_cost_models_host_bandwidth():
    from engine.cost_model import StepShape

    cost, result = _swap_scenario(num_host_blocks=32)
    extra = result.extra
    assert extra["num_evictions_total"] == 1 and extra["num_swaps_total"] == 1
    assert [len(r.token_times_s) for r in result.records] == [60, 5]  # exact lengths, nothing lost
    assert result.records[1].first_token_s < result.records[0].finish_s  # the interactive one went first
    # The batch prompt was prefilled once: its KV came back from the host, it was not recomputed.
    assert sum(s.prefill_tokens for s in result.steps) == 40 + 40
    # It held > 16 blocks when evicted (the interactive prompt's 10 did not fit in 26); all came back.
    assert extra["blocks_swapped_out"] == extra["blocks_swapped_in"] > 16
    # Every step took the cost model's time plus its block copies at 4,000 B / 1e9 B/s = 4 µs each.
    copies = sum(s.seconds for s in result.steps) - sum(
        cost.step_seconds(StepShape(s.prefill_tokens, s.num_decode, s.sum_context)) for s in result.steps
    )
    assert cost.swap_seconds_per_block(4) == pytest.approx(4e-6)
    assert copies == pytest.approx(2 * extra["blocks_swapped_out"] * 4e-6, rel=1e-6)


def test_simulator_recomputes_without_a_host_pool_or_when_the_link_is_slow():
    for num_host_blocks, bandwidth in ((0, 1e9), (32, 1e3)):  # 1 kB/s: 4 s a block, far dearer than prefill
        _, result = _swap_scenario(num_host_blocks, bandwidth)
        assert result.extra["num_evictions_total"] == 1 and result.extra["num_swaps_total"] == 0
        assert sum(s.prefill_tokens for s in result.steps) > 80  # the evicted prompt was computed again
        assert result.extra["blocks_swapped_out"] == 0
        assert [len(r.token_times_s) for r in result.records] == [60, 5]


def test_simulator_refuses_a_host_pool_it_cannot_price():
    from engine.cost_model import CostModel
    from engine.simulator import SimConfig, SimRequest, simulate

    with pytest.raises(ValueError, match="host bandwidth"):
        simulate(
            [SimRequest(0.0, 4, 4)], CostModel(1e-3, 0, 0, 0), SimConfig(num_kv_blocks=8, num_host_blocks=4)
        )
