"""QLM in the engine: SLO classes and deadlines, the RWT estimator, the edf and qlm policies, eviction by swap or
recompute. Scheduler tests use the fake runner (tests/fake_runner.py) on a manual clock, so they are exact."""

from __future__ import annotations

import math

import pytest
from fake_runner import FakeRunner

from engine.config import EngineConfig, SchedulerConfig
from engine.core import EngineCore, build_scheduler
from engine.protocol import AddRequest, SamplingParams
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
