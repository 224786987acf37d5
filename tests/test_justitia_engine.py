"""Justitia and VTC in the engine: the real scheduler, driven by the simulator (virtual clock, exact lengths) for
the fairness properties and by the fake runner (exact outputs through a paged cache) for the invariant fuzz."""

from __future__ import annotations

import random

import pytest
from fake_runner import FakeRunner, reference_generate

from engine.config import EngineConfig, SchedulerConfig
from engine.core import EngineCore, build_scheduler
from engine.cost_model import CostModel, StepShape
from engine.fairness import request_cost
from engine.ordering import FairOrder, FcfsOrder, UrgentFirst
from engine.protocol import AddRequest, SamplingParams
from engine.request import Request
from engine.simulator import SimConfig, SimRequest, simulate

COST_MODEL = CostModel.load("h100-llama3-8b")
FAIR_POLICIES = ("justitia", "vtc")


def chains(
    app: str, width: int, length: int, prompt: int, output: int, weight: float = 1.0
) -> list[SimRequest]:
    """An app that stays backlogged: `width` closed-loop chains, each call sent when the previous one finished."""
    out: list[SimRequest] = []
    for _ in range(width):
        for k in range(length):
            after = None if k == 0 else -1  # patched to an absolute index by `indexed`
            out.append(
                SimRequest(
                    0.0,
                    prompt,
                    output,
                    app,
                    app,
                    rl_mean=output,
                    rl_q=output,
                    after=after,
                    tenant_weight=weight,
                )
            )
    return out


def indexed(groups: list[list[SimRequest]]) -> list[SimRequest]:
    """Concatenate app groups, turning each chain's relative `after = -1` into the previous request's index."""
    out: list[SimRequest] = []
    for group in groups:
        for r in group:
            after = None if r.after is None else len(out) - 1
            out.append(SimRequest(**{**r.__dict__, "after": after}))
    return out


POOL_BLOCKS = 16  # 256 KV tokens: about three 64 + 32 requests at once, so KV is what apps compete for
# Justitia's reference serves M tokens of KV per step: the step time of a full pool of decodes.
FULL_POOL_STEP_S = COST_MODEL.step_seconds(StepShape(0, 3, POOL_BLOCKS * 16))


def run_sim(requests: list[SimRequest], policy: str, num_kv_blocks: int = POOL_BLOCKS, **sched):
    config = SchedulerConfig(policy=policy, fair_iteration_s=FULL_POOL_STEP_S, **sched)
    return simulate(
        requests, COST_MODEL, SimConfig(config, num_kv_blocks=num_kv_blocks, check_invariants=True)
    )


def service_at(result, t: float, tenant: str, metric) -> float:
    """Service a tenant received by time t: Σ metric(prompt, outputs sampled by t) over its requests."""
    total = 0.0
    for request, record in zip(result.requests, result.records, strict=True):
        if request.tenant == tenant and (n := sum(1 for x in record.token_times_s if x <= t)):
            total += metric(request.num_prompt_tokens, n)
    return total


def app_finish(result, app: str) -> float:
    return max(
        rec.finish_s for r, rec in zip(result.requests, result.records, strict=True) if r.app_id == app
    )


def vtc_tokens(prompt: int, output: int) -> float:
    return prompt + 2.0 * output


def test_two_backlogged_equal_apps_stay_within_the_delay_bound():
    """JustitiaOrder's fairness bound: |W_A − W_B| ≤ Δ_A + Δ_B + 2·c_max while both are backlogged, Δ the most
    predicted cost an app adds at one instant (its 4 chains open together: 4·c), in KV token-time."""
    width, prompt, output = 4, 64, 32
    requests = indexed([chains("A", width, 24, prompt, output), chains("B", width, 24, prompt, output)])
    result = run_sim(requests, "justitia")
    c = request_cost(prompt, output)
    bound = 2 * width * c + 2 * c
    horizon = min(app_finish(result, "A"), app_finish(result, "B"))
    gaps = [
        abs(service_at(result, s.end_s, "A", request_cost) - service_at(result, s.end_s, "B", request_cost))
        for s in result.steps
        if s.end_s < horizon
    ]
    assert len(gaps) > 100
    assert max(gaps) <= bound
    assert service_at(result, horizon, "A", request_cost) > 5 * bound  # the bound is not vacuous


@pytest.mark.parametrize("policy", FAIR_POLICIES)
def test_a_late_small_app_is_not_starved_behind_a_large_one(policy):
    big = [SimRequest(0.0, 256, 256, "big", "big", rl_mean=256, rl_q=256) for _ in range(64)]
    small = [SimRequest(1.0, 32, 16, "small", "small", rl_mean=16, rl_q=16)]
    fcfs = run_sim(big + small, "vllm", num_kv_blocks=256)
    fair = run_sim(big + small, policy, num_kv_blocks=256)
    small_fcfs = fcfs.records[-1].finish_s - 1.0
    small_fair = fair.records[-1].finish_s - 1.0
    assert small_fair < 0.2 * small_fcfs
    assert all(rec.is_done for rec in fair.records)  # the big app still finishes
    assert app_finish(fair, "big") <= 1.1 * app_finish(fcfs, "big")


def app_stream(tenant: str, weight: float, num_apps: int, rate: float, offset: float) -> list[SimRequest]:
    """A tenant sending 4-request apps (64 + 32 tokens each) open-loop at `rate` apps/s."""
    return [
        SimRequest(
            offset + i / rate, 64, 32, tenant, f"{tenant}-{i}", rl_mean=32, rl_q=32, tenant_weight=weight
        )
        for i in range(num_apps)
        for _ in range(4)
    ]


def test_vtc_weight_two_gets_about_twice_the_service_of_weight_one():
    """Two tenants that each alone overload a 1,024-token pool (VTC's currency: input + 2·output tokens)."""
    requests = sorted(
        app_stream("heavy", 2.0, 120, 40.0, 0.0) + app_stream("light", 1.0, 120, 40.0, 0.0125),
        key=lambda r: r.arrival_s,
    )
    result = run_sim(requests, "vtc", num_kv_blocks=64)

    def window(tenant: str) -> float:
        return service_at(result, 3.0, tenant, vtc_tokens) - service_at(result, 1.0, tenant, vtc_tokens)

    assert result.end_s > 6.0  # still backlogged when the window closes
    assert 1.8 <= window("heavy") / window("light") <= 2.2


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 2.0)])
def test_justitia_weight_two_halves_the_virtual_finish_and_finishes_first(weights):
    """Justitia weighs apps through F = S + Ĉ/w (completion order), not rates: of two identical 16-request apps,
    the one whose tenant weighs 2 is served first even though it arrived second, and finishes in about half the
    time of the other; with equal weights arrival order decides."""
    first = [SimRequest(0.0, 64, 32, "first", "first", rl_mean=32, rl_q=32, tenant_weight=weights[0])] * 16
    second = [
        SimRequest(0.001, 64, 32, "second", "second", rl_mean=32, rl_q=32, tenant_weight=weights[1])
    ] * 16
    result = run_sim(first + second, "justitia")
    t_first, t_second = app_finish(result, "first"), app_finish(result, "second")
    if weights[1] > weights[0]:
        assert t_second < 0.7 * t_first
    else:
        assert t_first < 0.7 * t_second


def test_equal_weights_share_equally_under_vtc():
    requests = indexed([chains("a", 4, 30, 64, 32), chains("b", 4, 30, 64, 32)])
    result = run_sim(requests, "vtc")
    horizon = min(app_finish(result, "a"), app_finish(result, "b"))
    ratio = service_at(result, horizon, "a", vtc_tokens) / service_at(result, horizon, "b", vtc_tokens)
    assert 0.8 <= ratio <= 1.25, ratio


# ---- invariants under a seeded fuzz (fake runner: exact outputs through the paged cache) ----------------------


def create_core(policy: str, num_blocks: int, block_size: int = 4) -> EngineCore:
    sched = SchedulerConfig(
        policy=policy, block_size=block_size, max_num_batched_tokens=32, enable_prefix_caching=False
    )
    runner = FakeRunner(num_blocks, block_size)
    return EngineCore(build_scheduler(EngineConfig(scheduler=sched), runner), runner, check_invariants=True)


def fuzz_requests(seed: int) -> list[AddRequest]:
    rng = random.Random(seed)
    out = []
    for i in range(40):
        prompt = [3 + rng.randrange(900) for _ in range(rng.randint(1, 24))]
        n = rng.randint(1, 20)
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        tenant = f"t{rng.randrange(3)}"
        out.append(
            AddRequest(
                f"r{i}",
                prompt,
                params,
                arrival_time=float(i),
                tenant=tenant,
                app_id=f"{tenant}-app{rng.randrange(3)}",
                rl_mean=n * rng.choice((0.25, 1.0, 4.0)),
                rl_q=n,
                tenant_weight=rng.choice((1.0, 2.0)),
            )
        )
    return out


@pytest.mark.parametrize("policy", FAIR_POLICIES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_invariants_exact_outputs_and_exact_accounts_under_a_random_workload(policy, seed):
    """A tight pool (preemptions by recompute), staggered arrivals, aborts: the scheduler's invariants after every
    step, every surviving output equal to the reference, and the service reported to the fair object exact:
    each prompt token once (a recompute is not new service), each output token once; every app closed."""
    rng = random.Random(seed + 100)
    core = create_core(policy, num_blocks=24)
    fair = core.scheduler.policy.ordering.fair
    reported: dict[str, list[int]] = {}
    on_progress = fair.on_progress

    def record(request: Request, new_prompt: int, new_output: int, now: float) -> None:
        totals = reported.setdefault(request.request_id, [0, 0])
        totals[0] += new_prompt
        totals[1] += new_output
        on_progress(request, new_prompt, new_output, now)

    fair.on_progress = record
    pending = fuzz_requests(seed)
    seen: dict[str, Request] = {}
    tokens: dict[str, list[int]] = {}
    aborted: set[str] = set()
    for _ in range(5000):
        if pending and rng.random() < 0.3:
            core.add_request(pending.pop(0))
        if rng.random() < 0.02 and core.scheduler.requests:
            victim = rng.choice(sorted(core.scheduler.requests))
            aborted.add(victim)
            core.abort([victim])
        seen.update(core.scheduler.requests)
        for delta in core.step():
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
        if not pending and not core.has_work():
            break
    assert not pending and not core.has_work()
    assert core.scheduler.num_preemptions_total > 0  # the accounts were tested across recomputes
    for request_id, request in seen.items():
        if request_id not in aborted:
            assert tokens[request_id] == reference_generate(
                request.prompt_token_ids, request.sampling.max_tokens
            )
            assert reported[request_id] == [request.num_prompt_tokens, request.num_output_tokens]
        elif request_id in reported:
            assert reported[request_id][1] == request.num_output_tokens
            assert reported[request_id][0] <= request.num_prompt_tokens
    if policy == "vtc":
        assert not any(fair._num_waiting.values())
    else:
        assert all(app.num_unfinished == 0 for app in fair.registry.apps.values())
        assert fair.registry.apps  # apps are kept through their idle timeout


def test_fair_policies_build_the_adapter_as_ordering_and_observer():
    for policy in FAIR_POLICIES:
        scheduler = create_core(policy, num_blocks=8).scheduler
        assert isinstance(scheduler.policy.ordering, FairOrder)
        assert scheduler.policy.observer is scheduler.policy.ordering
    justitia = create_core("justitia", num_blocks=8).scheduler.policy.ordering.fair
    assert justitia.virtual_time.service_rate == pytest.approx(8 * 4 / SchedulerConfig().fair_iteration_s)


def test_urgent_first_puts_the_urgent_rule_in_front_of_the_base_order():
    params = SamplingParams(max_tokens=4)
    requests = [Request(f"r{i}", [5], params, arrival_time=float(i)) for i in range(5)]
    order = UrgentFirst(lambda rs: [r for r in reversed(rs) if r.request_id in ("r1", "r3")], FcfsOrder())
    assert [r.request_id for r in order.waiting_order(requests)] == ["r3", "r1", "r0", "r2", "r4"]
