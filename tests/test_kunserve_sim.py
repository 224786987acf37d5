"""The KunServe simulator (engine/kunserve_sim.py): two replicas on virtual clocks; a burst that overflows their
pools makes the drop mode merge them (pool + one copy of the layers' worth of blocks) and restore afterwards, with
every request finished and the scheduler invariants checked after every step; the no-drop modes keep the pool."""

from __future__ import annotations

import random

import pytest

from engine.config import SchedulerConfig
from engine.cost_model import CostModel, StepShape
from engine.kunserve import MonitorConfig
from engine.kunserve_sim import DropModel, PipelineSimRunner, ReplicaSimConfig, simulate_replicas
from engine.simulator import SimRequest, VirtualClock

COST = CostModel(a_s=0.01, b_s_per_prefill_token=1e-5, c_s_per_decode=1e-4, d_s_per_context_token=1e-7,
                 kv_bytes_per_token=1024, host_bytes_per_s=1e9)  # fmt: skip


def burst() -> list[SimRequest]:
    rng = random.Random(5)
    calm = [SimRequest(0.5 * i, rng.randint(20, 60), rng.randint(10, 40)) for i in range(10)]
    spike = [SimRequest(5.0 + 0.01 * i, rng.randint(20, 60), rng.randint(40, 80)) for i in range(30)]
    tail = [SimRequest(30.0 + 0.5 * i, rng.randint(20, 60), rng.randint(10, 40)) for i in range(10)]
    return calm + spike + tail


def config(mode: str) -> ReplicaSimConfig:
    return ReplicaSimConfig(
        drop=DropModel(layer_blocks=60, exchange_s_per_block=1e-4, handoff_s=1e-4, reload_s=0.05),
        scheduler=SchedulerConfig(block_size=16, max_num_batched_tokens=512),
        mode=mode,
        num_kv_blocks=60,
        num_host_blocks=200,
        monitor=MonitorConfig(window=10),
        max_model_len=1024,
        check_invariants=True,
    )


def test_drop_grows_the_pool_and_restores() -> None:
    """The mechanics, on the monitor's vote alone (drop-always: no cost check)."""
    result = simulate_replicas(burst(), COST, config("drop-always"))
    assert all(r.is_done for r in result.records)
    assert result.num_drops >= 1 and result.num_restores >= 1
    assert [blocks for _, blocks in result.capacity[:3]] == [120, 180, 120]  # 2 x 60, + 60 freed, back
    assert result.regroup_seconds[0] > 0 and result.throttled_s is not None
    assert (
        result.regroup_seconds[1] < 0.05
    )  # reload_s: the restore reloaded while serving, only the exchange stalls


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_baselines_keep_the_pool(mode: str) -> None:
    result = simulate_replicas(burst(), COST, config(mode))
    assert all(r.is_done for r in result.records)
    assert result.num_drops == 0 and result.capacity == [(0.0, 120)]
    assert result.num_preemptions_total > 0 and result.limit_s == result.throttled_s is not None


def test_pipeline_step_cost() -> None:
    """m micro-batches over k stages: (m + k - 1) slots of cost(shape / m) / k, plus the hand-offs."""
    runner = PipelineSimRunner(COST, VirtualClock(), 10, 1024, num_stages=2, micro_batches=2, handoff_s=0.001)
    from engine.batch import ScheduledRequest, SchedulerOutput
    from engine.protocol import SamplingParams

    out = SchedulerOutput(
        [ScheduledRequest(str(i), [1], 99, [0] * 7, SamplingParams(), True) for i in range(4)]
    )
    runner.execute(out)
    half = COST.step_seconds(StepShape(0, 2, 200))
    assert runner.clock.now == pytest.approx(3 * half / 2 + 0.001)
