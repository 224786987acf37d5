"""KunServe on one node (engine/kunserve.py, engine/pipeline.py, engine/replicas.py): two CPU replicas of the tiny
random Llama. Greedy (and seeded) outputs of requests that straddle a parameter drop and a restore equal those of
one replica that never regroups (also with a restore that reloads layers while serving); the pool grows by the freed
layer bytes // block bytes; the exchange moves only the layers that change replica; invariants hold after every step;
the monitor's votes, its restore hysteresis on a scripted hovering trace, the drop cost check (taken / refused), the
micro-batch split and the drop plan's merges on hand-worked cases."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import pytest

from engine.config import DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.core import EngineCore, build_scheduler
from engine.kunserve import DropCosts, MemoryMonitor, MonitorConfig, estimate_drop, plan_drop, split_layers
from engine.model import KVCache
from engine.protocol import AddRequest, EngineStats, SamplingParams
from engine.replicas import ReplicaEngine
from engine.request import Request
from engine.runner import ModelRunner
from engine.weights import load_weights

BLOCK_SIZE = 4
BYTES_PER_BLOCK = 2 * 2 * BLOCK_SIZE * 2 * 16 * 4  # layers x (k, v) x tokens x KV heads x head_dim x fp32


class StepClock:
    """The scheduler clock: 0.1 s per engine step, so the monitor samples once per step."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_replicas(
    model_dir: Path,
    num_blocks: int,
    monitor: MonitorConfig | None = None,
    clock=None,
    param_drop=True,
    policy: str = "vllm",
) -> ReplicaEngine:
    device = DeviceConfig(device="cpu", kv_cache_memory=num_blocks * BYTES_PER_BLOCK)
    config = EngineConfig(
        model=ModelConfig(model=str(model_dir)),
        scheduler=SchedulerConfig(policy=policy, block_size=BLOCK_SIZE, max_num_batched_tokens=64),
        device=device,
    )
    runners = [ModelRunner(config.model, device, BLOCK_SIZE) for _ in range(2)]
    host = load_weights(model_dir)
    kwargs = {"clock": clock} if clock else {}
    return ReplicaEngine(
        config,
        runners,
        host.layers,
        param_drop,
        MemoryMonitor(monitor or MonitorConfig()),
        check_invariants=True,
        **kwargs,
    )


def make_single(model_dir: Path, policy: str = "vllm") -> EngineCore:
    device = DeviceConfig(device="cpu", kv_cache_memory=400 * BYTES_PER_BLOCK)
    runner = ModelRunner(ModelConfig(model=str(model_dir)), device, BLOCK_SIZE)
    config = EngineConfig(
        scheduler=SchedulerConfig(policy=policy, block_size=BLOCK_SIZE, max_num_batched_tokens=64)
    )
    return EngineCore(build_scheduler(config, runner), runner, check_invariants=True)


def requests(prefix: str, num: int, seed: int, max_tokens: int = 40) -> list[AddRequest]:
    rng = random.Random(seed)
    out = []
    for i in range(num):
        prompt = [rng.randrange(3, 320) for _ in range(rng.randrange(3, 30))]
        sampling = (
            SamplingParams(max_tokens=max_tokens, temperature=0.9, seed=100 + i, ignore_eos=True)
            if i % 3 == 2  # seeded sampling too: a regroup must not disturb a request's random stream
            else SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        )
        out.append(AddRequest(f"{prefix}{i}", prompt, sampling, arrival_time=0.0))
    return out


def run(
    core, waves: dict[int, list[AddRequest]], actions: dict[int, object] | None = None, clock=None
) -> dict:
    """Step until idle: add wave k before step k, call actions[k] after step k; collect tokens per request."""
    actions = actions or {}
    outputs: dict[str, list[int]] = {}
    step = 0
    while step <= max(waves) or core.has_work():
        for msg in waves.get(step, []):
            core.add_request(msg)
        for delta in core.step():
            outputs.setdefault(delta.request_id, []).extend(delta.token_ids)
        if clock is not None:
            clock.now += 0.1
        if step in actions:
            actions[step]()
        step += 1
        assert step < 2000
    return outputs


@pytest.mark.parametrize("policy", ["vllm", "ecoserve", "justitia", "qlm"])
def test_outputs_identical_across_drop_and_restore(tiny_llama_dir: Path, policy: str) -> None:
    """Every policy's scheduler state survives a regroup: ledger reservations, fair-queue arrivals, SLO checks."""
    waves = {0: requests("a", 6, seed=1), 12: requests("b", 4, seed=2, max_tokens=20)}
    expected = run(make_single(tiny_llama_dir, policy), waves)

    engine = make_replicas(tiny_llama_dir, num_blocks=80, param_drop=False, policy=policy)
    seen: dict[str, object] = {}

    def drop() -> None:
        blocks = [g.scheduler.block_manager for g in engine.groups]
        num_free, num_total = sum(b.num_free_blocks for b in blocks), sum(b.num_blocks for b in blocks)
        running = {r.request_id for g in engine.groups for r in g.scheduler.running}
        num_blocks = sum(len(set(r.block_ids)) for g in engine.groups for r in g.scheduler.running)
        assert len(running) >= 4 and engine.drop(demand_bytes=1)
        # r0 keeps layer 0 and r1 layer 1: each request's KV crosses for one layer of two, the other stays put.
        layer_kv = num_blocks * BYTES_PER_BLOCK // 2
        assert engine.last_exchange.moved == engine.last_exchange.local == layer_kv > 0
        assert engine.exchange_bytes(num_blocks) == layer_kv  # what the cost check charges
        (group,) = engine.groups
        assert group.replica_ids == (0, 1) and engine.stats().replica_groups == [[0, 1]]
        freed = sum(engine.layer_bytes)  # one copy of the decoder layers
        assert engine.freed_weight_bytes == freed
        bm = group.scheduler.block_manager
        assert bm.num_blocks - num_total == freed // BYTES_PER_BLOCK > 0
        assert bm.num_free_blocks - num_free == freed // BYTES_PER_BLOCK
        assert {r.request_id for r in group.scheduler.running} == running  # nobody preempted or restarted
        # Each replica holds only its own layer, and a pool with that layer's KV only.
        assert [sum(layer is not None for layer in r.model.weights.layers) for r in engine.runners] == [1, 1]
        assert [s.kv.storage.shape[0] for s in group.stages] == [1, 1]
        seen["drop"] = running

    def restore() -> None:
        running = {r.request_id for g in engine.groups for r in g.scheduler.running}
        assert running & seen["drop"], "no request straddles both transitions"
        num_blocks = sum(len(set(r.block_ids)) for g in engine.groups for r in g.scheduler.running)
        assert engine.restore()
        assert engine.last_exchange.moved == engine.last_exchange.local == num_blocks * BYTES_PER_BLOCK // 2
        assert [g.replica_ids for g in engine.groups] == [(0,), (1,)]
        assert engine.stats().replica_groups == [[0], [1]]
        assert {r.request_id for g in engine.groups for r in g.scheduler.running} == running
        assert all(len(r.model.weights.layers) == 2 and all(r.model.weights.layers) for r in engine.runners)
        assert [g.scheduler.block_manager.num_blocks for g in engine.groups] == [80, 80]

    got = run(engine, waves, {6: drop, 20: restore})
    assert got == expected
    assert engine.num_drops_total == engine.num_restores_total == 1
    assert all(g.scheduler.block_manager.num_free_blocks == 80 for g in engine.groups)


def test_restore_while_serving(tiny_llama_dir: Path) -> None:
    """begin_restore reloads one dropped layer per engine step while the pipeline keeps producing tokens, then
    switches to data-parallel; the outputs equal the single-replica run's."""
    waves = {0: requests("a", 6, seed=5), 10: requests("b", 3, seed=6, max_tokens=20)}
    expected = run(make_single(tiny_llama_dir), waves)
    engine = make_replicas(tiny_llama_dir, num_blocks=80, param_drop=False)
    log: list[tuple[bool, int, int]] = []  # after each step: restoring, groups, tokens produced by that step
    original_step = engine.step

    def step():
        deltas = original_step()
        log.append((engine.is_restoring, len(engine.groups), sum(len(d.token_ids) for d in deltas)))
        return deltas

    engine.step = step
    actions = {4: lambda: engine.drop(demand_bytes=1), 12: lambda: engine.begin_restore()}
    got = run(engine, waves, actions)
    assert got == expected
    during = [entry for entry in log[13:] if entry[0]]
    assert during and all(groups == 1 and tokens > 0 for _, groups, tokens in during)  # served as a pipeline
    assert log[13 + len(during)][:2] == (False, 2)  # then data-parallel
    assert engine.num_restores_total == 1 and not engine.is_restoring
    assert all(len(r.model.weights.layers) == 2 and all(r.model.weights.layers) for r in engine.runners)
    # A restore that starts as the last request ends still finishes: the reloads are work of their own.
    assert engine.drop(demand_bytes=1) and engine.begin_restore() and engine.has_work()
    while engine.has_work():
        engine.step()
    assert [g.replica_ids for g in engine.groups] == [(0,), (1,)] and engine.num_restores_total == 2


def test_monitor_drops_under_a_burst_and_restores_after(tiny_llama_dir: Path) -> None:
    """Small pools and a burst: usage reaches 95 % with requests pending, the monitor drops; once the burst has
    drained and usage falls, it restores. Outputs still equal the single-replica run."""
    waves = {0: requests("a", 8, seed=3, max_tokens=48), 4: requests("b", 8, seed=4, max_tokens=30)}
    expected = run(make_single(tiny_llama_dir), waves)
    clock = StepClock()
    engine = make_replicas(
        tiny_llama_dir, num_blocks=40, monitor=MonitorConfig(window=5, min_pipeline_s=1.0), clock=clock
    )
    modes: list[int] = []
    got = run(engine, waves, {i: lambda: modes.append(len(engine.groups)) for i in range(2000)}, clock)
    assert got == expected
    assert engine.num_drops_total >= 1 and engine.num_restores_total >= 1
    assert 1 in modes and modes[-1] == 2  # pipelined at some point, data-parallel at the end


def test_drop_plan_merges_the_smallest_groups() -> None:
    w = 100  # one copy of the layers
    assert plan_drop([(0,), (1,), (2,), (3,)], w, 0).is_empty
    one = plan_drop([(0,), (1,), (2,), (3,)], w, 1)
    assert one.groups == ((0, 1), (2,), (3,)) and one.freed_bytes == w
    two = plan_drop([(0,), (1,), (2,), (3,)], w, 150)
    assert two.groups == ((0, 1), (2, 3)) and two.freed_bytes == 2 * w
    assert plan_drop([(0,), (1,), (2,), (3,)], w, 10 * w).groups == ((0, 1, 2, 3),)  # capped: one group left
    # An existing pair is not deepened while two singles can merge.
    assert plan_drop([(0, 1), (2,), (3,)], w, 1).groups == ((0, 1), (2, 3))
    assert plan_drop([(0, 1), (2, 3), (4,)], w, 1).groups == ((0, 1, 4), (2, 3))
    assert split_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert split_layers(4, 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(ValueError):
        split_layers(2, 3)


def test_monitor_votes() -> None:
    m = MemoryMonitor(
        MonitorConfig(interval_s=0.1, window=3, drop_usage=0.95, restore_usage=0.5, min_pipeline_s=0.0)
    )
    assert m.observe(0.0, 96, 100) and not m.observe(0.05, 10, 100)  # one sample per interval
    assert m.usage == 0.96
    assert m.should_drop(num_pending_blocks=4, num_free_blocks=4)
    assert not m.should_drop(num_pending_blocks=3, num_free_blocks=4)  # the free blocks cover the queue
    assert not m.should_drop(num_pending_blocks=0, num_free_blocks=0)  # nothing pending
    m.observe(0.1, 94, 100)
    assert not m.should_drop(num_pending_blocks=10, num_free_blocks=6)  # under 95 %
    m.reset(0.5)
    for t, used in ((0.0, 50), (0.1, 45), (0.2, 40)):
        assert not m.should_restore(0, used, 100)  # fewer samples than the window
        m.observe(t + 1, used, 100)
    assert m.should_restore(0, 40, 100)
    assert not m.should_restore(1, 40, 100)  # something pending
    assert not m.should_restore(0, 40, 49)  # the data-parallel pools would be 82 % full (> 80 %)
    m.observe(2.0, 45, 100)  # window 45, 40, 45: not falling
    assert not m.should_restore(0, 45, 100)
    m.reset(2.5)
    for t, used in ((0.0, 70), (0.1, 60), (0.2, 55)):  # falling but above 50 %
        m.observe(t + 3, used, 100)
    assert not m.should_restore(0, 55, 100)
    # The fall is judged by the window's least-squares slope, not by its two end samples.
    m = MemoryMonitor(MonitorConfig(window=5, min_pipeline_s=0.0))
    for t, used in enumerate(
        (300, 310, 320, 330, 295)
    ):  # rising, then one dip: last < first, yet not falling
        m.observe(t, used, 1000)
    assert m.slope > 0 and not m.should_restore(0, 295, 1000)
    for t, used in enumerate((300, 200, 100, 310)):  # falling, then one blip: last > first, yet falling
        m.observe(t + 10, used, 1000)
    assert m.slope < 0 and m.should_restore(0, 310, 1000)


def replay_usage(
    config: MonitorConfig, demand: list[float], dp_blocks: int = 100, pipeline_blocks: int = 250
) -> list[tuple[float, str]]:
    """Drive the monitor with a scripted demand (blocks wanted, one value per 0.1 s sample): the pools hold
    min(demand, capacity), the rest is pending; drop and restore on its votes. Returns the transitions."""
    monitor, pipelined, transitions = MemoryMonitor(config), False, []
    for i, wanted in enumerate(demand):
        now = i * config.interval_s
        capacity = pipeline_blocks if pipelined else dp_blocks
        used, pending = min(wanted, capacity), max(0.0, wanted - capacity)
        monitor.observe(now, int(used), capacity)
        if not pipelined and monitor.should_drop(int(pending), capacity - int(used)):
            pipelined = True
        elif pipelined and monitor.should_restore(int(pending > 0), int(used), dp_blocks):
            pipelined = False
        else:
            continue
        monitor.reset(now)
        transitions.append((now, "drop" if pipelined else "restore"))
    return transitions


def test_restore_hysteresis_does_not_flap_on_a_hovering_trace() -> None:
    """A burst (demand 60 -> 130 blocks over 100 DP blocks), 40 s hovering between 85 and 120 blocks (pipeline
    usage 34-48 %: under restore_usage, so the bare rule restores whenever the window tilts down, and the DP pools
    overflow at once), then a fall to 30 blocks. The bare rule flaps; with the dwell and the fit check the monitor
    drops once and restores once, after the fall."""
    rng = random.Random(0)
    demand = [60 + 70 * i / 50 for i in range(50)]
    demand += [102 + 12 * math.sin(i / 15) + rng.uniform(-5, 5) for i in range(400)]
    demand += [100 - 70 * i / 50 for i in range(50)] + [30] * 100
    bare = MonitorConfig(min_pipeline_s=0.0, restore_fit_usage=float("inf"))
    flapping = replay_usage(bare, demand)
    assert sum(kind == "drop" for _, kind in flapping) >= 3
    steady = replay_usage(MonitorConfig(), demand)
    assert [kind for _, kind in steady] == ["drop", "restore"]
    assert steady[1][0] >= 45.0  # after the fall, not during the hover
    # The dwell alone: a spike that vanishes at once restores only min_pipeline_s after the drop.
    spike = [60 + 70 * i / 20 for i in range(20)] + [40 - i / 10 for i in range(200)]  # keeps falling
    (dropped_at, _), (restored_at, _) = replay_usage(MonitorConfig(window=5, min_pipeline_s=5.0), spike)
    assert restored_at - dropped_at >= 5.0 - 1e-9


def scripted_request(name: str, prompt_len: int, max_tokens: int, num_out: int) -> Request:
    """A request with `num_out` tokens decoded and the blocks its tokens fill (block size 16)."""
    request = Request(name, [5] * prompt_len, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    request.output_token_ids = [7] * num_out
    request.block_ids = list(range(-(-request.num_tokens // 16))) if num_out else []
    return request


def test_cost_check_takes_a_drop_that_saves_queueing() -> None:
    """A memory spike: 8 running requests of 64 tokens with 400 still to decode will fill 29 blocks each, far more
    than the 34 blocks there are; 4 prompts of 64 tokens (11 blocks at their full 164) wait, 2 more arrive per
    second. Without a drop nothing is admitted before the running requests end (400 steps of 30 ms = 12 s), and
    the fourth waits for the first of them to end too (100 steps more); each prefill takes only 6.4 ms."""
    running = [scripted_request(f"r{i}", 60, 404, 4) for i in range(8)]
    waiting = [scripted_request(f"w{i}", 64, 100, 0) for i in range(4)]
    costs = DropCosts(
        exchange_s=0.05, step_s=0.03, token_s=1e-4, slowdown=1.05, arrival_rate=2.0, dwell_s=5.0
    )
    estimate = estimate_drop(running, waiting, num_free_blocks=2, block_size=16, costs=costs)
    compute = [0.0064 * (i + 1) for i in range(4)]  # each waits for the prefills before it and its own
    memory = [12.0, 12.0, 12.0, 15.0]
    rho = 2.0 * 64 * 1e-4  # the arrivals' prefill load: a memory-bound burst
    excess = memory[-1] - compute[-1]
    expected = sum(m - c for m, c in zip(memory, compute, strict=True)) + (1 - rho) * 2.0 * excess**2 / 2
    assert estimate.gain_s == pytest.approx(expected)
    # Everyone stalls 50 ms; 8 x 400 + 4 x 100 tokens decode 5 % slower, and the queue's prefills too.
    assert estimate.cost_s == pytest.approx(0.05 * 12 + 0.05 * (0.03 * 3600 + sum(compute)))
    assert estimate.pays_off


def test_cost_check_refuses_a_drop_that_costs_more_than_it_saves() -> None:
    """A compute spike (E4's Azure-code shape): the running requests are 3 tokens from their end, the queue's
    2000-token prompts wait for prefill compute (2 s each) longer than for memory (0.15 s), and arrivals keep 20x
    more prefill work coming than the device does: the drop's slower pipeline would only make that queue longer."""
    running = [scripted_request(f"r{i}", 2000, 32, 29) for i in range(4)]
    waiting = [scripted_request(f"w{i}", 2000, 32, 0) for i in range(4)]
    costs = DropCosts(exchange_s=2.0, step_s=0.05, token_s=1e-3, slowdown=1.5, arrival_rate=10.0, dwell_s=5.0)
    estimate = estimate_drop(running, waiting, num_free_blocks=0, block_size=16, costs=costs)
    assert estimate.gain_s == 0.0  # memory frees in 0.15 s, sooner than any prompt's compute wait
    rho = 10.0 * 2000 * 1e-3
    queue = 0.5 * (0.05 * (4 * 3 + 4 * 32) + (2 + 4 + 6 + 8))
    arrivals = 0.5 * 10.0 * 5.0 * ((rho - 1) * 5.0 / 2 + 2.0)
    assert estimate.cost_s == pytest.approx(2.0 * 8 + queue + arrivals)
    assert not estimate.pays_off


def test_engine_counts_a_refused_drop(tiny_llama_dir: Path) -> None:
    """The engine asks the cost check on every drop vote: with a pipeline slowdown measured as huge the burst is
    served by recompute preemption, no regroup happens, and the refusals are counted in the stats."""
    waves = {0: requests("a", 8, seed=3, max_tokens=48), 4: requests("b", 8, seed=4, max_tokens=30)}
    expected = run(make_single(tiny_llama_dir), waves)
    clock = StepClock()
    engine = make_replicas(tiny_llama_dir, num_blocks=40, monitor=MonitorConfig(window=5), clock=clock)
    engine._token_s = {False: 1e-3, True: 1.0}  # as if a pipeline step had been measured 1000x slower
    got = run(engine, waves, clock=clock)
    assert got == expected
    assert engine.num_drops_total == 0 and engine.num_drops_refused_total >= 1
    assert engine.stats().extra["kunserve_drops_refused_total"] == engine.num_drops_refused_total
    assert not engine.last_estimate.pays_off


def test_micro_batches_balance_tokens_and_attention() -> None:
    """Two micro-batches by token + attention cost: a decode over 4000 tokens of context weighs about as much as
    a 64-token prefill chunk, which a token count alone does not see."""
    from engine.batch import ScheduledRequest
    from engine.pipeline import request_cost, split_micro_batches

    def item(name: str, num_tokens: int, start: int) -> ScheduledRequest:
        blocks = list(range(-(-(start + num_tokens) // 16)))
        return ScheduledRequest(name, [1] * num_tokens, start, blocks, SamplingParams(), True)

    w = 1 / 64
    batch = [
        item("p0", 64, 0),
        item("d0", 1, 4000),
        item("d1", 1, 4000),
        item("d2", 1, 10),
        item("p1", 32, 0),
    ]
    assert request_cost(batch[0], w) == pytest.approx(64 + w * 64 * 32.5)
    assert request_cost(batch[1], w) == pytest.approx(1 + w * 4001)  # it sees its own key too
    parts = split_micro_batches(batch, 2, w)
    assert sorted(r.request_id for p in parts for r in p) == sorted(r.request_id for r in batch)
    costs = [sum(request_cost(r, w) for r in p) for p in parts]
    assert abs(costs[0] - costs[1]) <= max(request_cost(r, w) for r in batch)
    assert [{r.request_id for r in p} for p in parts] == [{"p0", "p1"}, {"d0", "d1", "d2"}]
    # Balanced by token count alone (w = 0), the decodes join the short prefill: 96.5 vs 168.4 in true cost.
    by_tokens = [sum(request_cost(r, w) for r in p) for p in split_micro_batches(batch, 2, 0.0)]
    assert abs(by_tokens[0] - by_tokens[1]) > 5 * abs(costs[0] - costs[1])
    for p in parts:  # prefills first, in scheduler order, as build_forward_batch lays out the logits rows
        kinds = [r.num_tokens == 1 for r in p]
        assert kinds == sorted(kinds)
    assert split_micro_batches(batch[:1], 2, w) == [batch[:1]]  # one request: one micro-batch


def test_block_bytes_match_the_layout(tiny_llama_dir: Path) -> None:
    """The test's BYTES_PER_BLOCK is the runner's: the growth assertion above compares like with like."""
    runner = ModelRunner(
        ModelConfig(model=str(tiny_llama_dir)),
        DeviceConfig(device="cpu", kv_cache_memory=8 * BYTES_PER_BLOCK),
        BLOCK_SIZE,
    )
    arch = runner.model.arch
    assert (
        KVCache.bytes_per_block(
            arch.num_layers, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim, runner.model.kv_dtype
        )
        == BYTES_PER_BLOCK
    )
    assert runner.num_kv_blocks == 8
    assert dataclasses.is_dataclass(runner.model.weights)


def test_replica_mode_on_metrics_and_status_page() -> None:
    """EngineStats.replica_groups -> the kairos:replica_mode gauge and the status body's `replicas` (the page's
    header line reads it, static/status.js fmtReplicas)."""
    from server.metrics import EngineStatsCollector
    from server.status import RollingWindow, status_body

    def families(groups: list[list[int]]) -> dict:
        stats = EngineStats(1.0, 0, 0, 0, 100, 100, 0.0, 0, 0, 0, 0, 0, 0, 0.0, replica_groups=groups)
        stats.extra["kunserve_drops_total"] = 1.0
        collector = EngineStatsCollector("m", lambda: stats, lambda tenant: tenant)
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value for f in collector.collect() for s in f.samples
        }
        body = status_body(
            model_name="m",
            state="ok",
            ready=None,
            stats=stats,
            window=RollingWindow(),
            now=2.0,
            started_at=0.0,
        )
        return samples, body["replicas"]

    def mode(samples: dict, name: str) -> float:
        return samples["kairos:replica_mode", (("mode", name), ("model_name", "m"))]

    for groups, current in (([], "single"), ([[0], [1]], "data_parallel"), ([[0, 1]], "pipeline")):
        samples, replicas = families(groups)
        assert replicas == {"mode": current, "groups": groups}
        assert [mode(samples, m) for m in ("single", "data_parallel", "pipeline")] == [
            float(m == current) for m in ("single", "data_parallel", "pipeline")
        ]
        assert samples["kairos:replica_groups", (("model_name", "m"),)] == max(1, len(groups))
        assert samples["kairos:kunserve_drops_total", (("model_name", "m"),)] == 1.0


def test_build_engine_core_with_two_cpu_replicas(tiny_llama_dir: Path) -> None:
    """The engine process's factory: --replicas 2 on CPU gives a ReplicaEngine whose replicas have their own
    weight tensors (a drop must free real memory), and a device list names one replica per device."""
    from engine.core import build_engine_core
    from engine.replicas import replica_devices

    config = EngineConfig(
        model=ModelConfig(model=str(tiny_llama_dir)),
        scheduler=SchedulerConfig(block_size=BLOCK_SIZE),
        device=DeviceConfig(device="cpu", kv_cache_memory=32 * BYTES_PER_BLOCK, replicas=2),
    )
    engine = build_engine_core(config)
    assert isinstance(engine, ReplicaEngine) and engine.param_drop
    a, b = (r.model.weights.layers[0].qkv for r in engine.runners)
    assert a.data_ptr() != b.data_ptr() and engine.host_layers[0].qkv.data_ptr() not in (
        a.data_ptr(),
        b.data_ptr(),
    )
    ready = engine.ready_message()
    assert ready.num_kv_blocks == 64 and ready.device == "cpu,cpu"
    assert ready.max_blocks_per_request == 32  # one replica's pool: the server refuses what no group can hold
    assert replica_devices("cuda:0,cuda:1", 1) == ["cuda:0", "cuda:1"]
    assert replica_devices("cpu", 3) == ["cpu"] * 3
    with pytest.raises(ValueError):
        replica_devices("cuda:0,cuda:1", 3)
