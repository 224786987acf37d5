"""The composed default policy `kairos` (DESIGN §4): QLM's urgent groups first (EDF), otherwise Justitia's order;
EcoServe's KV ledger (exact allocation + lending); the pressure ladder with QLM eviction by swap or recompute.
Fake runner (exact outputs through the paged cache) on a manual clock, and the simulator for the fairness check;
the helpers are the qlm and justitia tests' own."""

from __future__ import annotations

import random

import pytest
from fake_runner import reference_generate
from test_justitia_engine import SimRequest, app_finish, run_sim
from test_qlm import clocked_core, expected_output, run_burst

from engine.fairness import JustitiaOrder
from engine.kv_ledger import KVLedger
from engine.ordering import FairOrder, UrgentFirst
from engine.policy import POLICIES, make_policy
from engine.pressure import LedgerVictim
from engine.protocol import AddRequest, SamplingParams
from engine.qlm import QlmMonitor
from engine.request import Request
from engine.slo import DEFAULT_SLO_TARGETS


def test_kairos_is_the_composition_of_the_existing_parts():
    assert "kairos" in POLICIES
    core = clocked_core("kairos", num_blocks=64)
    policy = core.scheduler.policy
    assert policy.name == "kairos"
    assert isinstance(policy.ordering, UrgentFirst)
    assert isinstance(policy.observer, FairOrder) and isinstance(policy.observer.fair, JustitiaOrder)
    assert policy.ordering.base is policy.observer  # the order Justitia keeps accounts for is the order used
    assert isinstance(policy.slo, QlmMonitor)
    assert isinstance(policy.victims, LedgerVictim)
    assert isinstance(core.scheduler.ledger, KVLedger)
    assert policy.swaps


def test_with_no_slo_at_risk_the_order_is_justitias():
    kairos, justitia = make_policy("kairos"), make_policy("justitia")
    params = SamplingParams(max_tokens=16)
    requests = [
        Request(f"r{i}", [5] * (4 + 7 * i % 13), params, arrival_time=float(i), app_id=f"app{i % 3}")
        for i in range(9)
    ]
    for policy in (kairos, justitia):
        for r in requests:
            policy.observer.on_arrival(r, r.arrival_time)
    assert not kairos.slo.urgent_ids
    ids = lambda rs: [r.request_id for r in rs]  # noqa: E731
    assert ids(kairos.ordering.waiting_order(requests)) == ids(justitia.ordering.waiting_order(requests))
    assert ids(kairos.ordering.running_order(requests)) == ids(justitia.ordering.running_order(requests))


def test_a_late_small_app_is_not_starved_behind_a_large_one():
    """Justitia's property survives the composition (batch class: no deadline is at risk, so no QLM reorder).
    The big app's own finish is held to ecoserve's, the policy with the same KV ledger (reservations admit fewer
    of its requests at once than vLLM's overcommit, whatever the order)."""
    big = [SimRequest(0.0, 256, 256, "big", "big", "batch", rl_mean=256, rl_q=256) for _ in range(64)]
    small = [SimRequest(1.0, 32, 16, "small", "small", "batch", rl_mean=16, rl_q=16)]
    fcfs = run_sim(big + small, "vllm", num_kv_blocks=256)
    same_ledger = run_sim(big + small, "ecoserve", num_kv_blocks=256)
    fair = run_sim(big + small, "kairos", num_kv_blocks=256)
    small_fair = fair.records[-1].finish_s - 1.0
    for baseline in (fcfs, same_ledger):
        assert small_fair < 0.2 * (baseline.records[-1].finish_s - 1.0)
    assert all(rec.is_done for rec in fair.records)
    assert app_finish(fair, "big") <= 1.1 * app_finish(same_ledger, "big")


@pytest.mark.parametrize("num_host_blocks", [0, 256])
def test_urgent_burst_behind_a_batch_backlog_meets_its_ttft_as_with_qlm(num_host_blocks):
    target = DEFAULT_SLO_TARGETS["interactive"].ttft_s
    ttft, outputs, core = run_burst("kairos", num_host_blocks)
    assert len(ttft) == 3 and max(ttft.values()) < target
    assert core.scheduler.num_preemptions_total >= 3  # the chats got in by evicting batch requests
    assert (core.scheduler.num_swaps_total > 0) == (num_host_blocks > 0)
    assert len(outputs) == 19
    assert all(tokens == expected_output(rid) for rid, tokens in outputs.items())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_invariants_and_exact_outputs_under_a_seeded_fuzz(seed):
    """Both classes, several tenants and apps, predictions off by up to 4x, aborts, a pool too small and host
    space for a few requests: check_invariants (block manager + ledger) after every step, every surviving output
    equal to the reference, the pool and the ledger empty at the end, every app closed."""
    rng = random.Random(seed)
    core = clocked_core(
        "kairos", num_blocks=48, num_host_blocks=24, max_num_seqs=6, max_num_batched_tokens=32
    )
    prompts, max_tokens, outputs, aborted = {}, {}, {}, set()
    for step in range(5000):
        if step < 400 and rng.random() < 0.15:
            rid = f"r{len(prompts)}"
            prompts[rid] = [rng.randrange(3, 997) for _ in range(rng.randint(1, 40))]
            max_tokens[rid] = rng.randint(1, 60)
            mean = max_tokens[rid] * rng.choice((0.25, 0.5, 1.0, 2.0, 4.0))
            tenant = f"t{rng.randrange(3)}"
            params = SamplingParams(max_tokens=max_tokens[rid], temperature=0.0, ignore_eos=True)
            core.add_request(
                AddRequest(
                    rid,
                    prompts[rid],
                    params,
                    0.0,
                    tenant=tenant,
                    app_id=f"{tenant}-app{rng.randrange(3)}",
                    slo_class=rng.choice(["interactive", "batch"]),
                    rl_mean=mean,
                    rl_q=1.3 * mean,
                    tenant_weight=rng.choice((1.0, 2.0)),
                )
            )
        if rng.random() < 0.01 and core.scheduler.requests:
            victim = rng.choice(sorted(core.scheduler.requests))
            aborted.add(victim)
            core.abort([victim])
        for delta in core.step():
            outputs.setdefault(delta.request_id, []).extend(delta.token_ids)
        if step >= 400 and not core.has_work():
            break
    assert not core.has_work()
    assert core.scheduler.num_evictions_total > 0 and core.scheduler.num_swaps_total > 0  # QLM's rung ran
    for rid in prompts:
        if rid not in aborted:
            assert outputs[rid] == reference_generate(prompts[rid], max_tokens[rid]), rid
    assert core.scheduler.block_manager.num_free_blocks == 48
    assert core.scheduler.swap_space.num_free_blocks == 24
    assert core.scheduler.ledger.num_reserved_tokens == 0
    fair = core.scheduler.policy.observer.fair
    assert all(app.num_unfinished == 0 for app in fair.registry.apps.values())
