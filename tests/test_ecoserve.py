"""EcoServe and the baselines in the engine (EngineCore + the paged fake runner): invariants after every step under
a seeded random workload for every policy, KVC pipelining really happening, zero preemptions with oracle lengths,
reserve-max never preempting, the lender never preempted for a borrower, and the EcoServe ordering rules."""

from __future__ import annotations

import random

import pytest
from fake_runner import FakeRunner, reference_generate

from engine.config import EngineConfig, SchedulerConfig
from engine.core import EngineCore, build_scheduler
from engine.kv_ledger import KVLedger
from engine.ordering import EcoServeOrder, FcfsOrder
from engine.protocol import AddRequest, FinishReason, SamplingParams
from engine.request import Request, RequestStatus

POLICY_VARIANTS = {
    "vllm": {"policy": "vllm"},
    "reserve-max": {"policy": "reserve-max"},
    "sjf-oracle": {"policy": "sjf-oracle"},
    "ecoserve": {"policy": "ecoserve"},
    "ecoserve-no-lending": {"policy": "ecoserve", "ecoserve_lending": False},
    "ecoserve-no-grouping": {"policy": "ecoserve", "ecoserve_grouping": False},
    "ecoserve-no-ordering": {"policy": "ecoserve", "ecoserve_ordering": False},
}


def create_core(num_blocks: int, block_size: int = 4, **sched) -> EngineCore:
    sched = {"policy": "ecoserve", "rl_bucket_width": 8, "max_num_batched_tokens": 32, **sched}
    config = EngineConfig(scheduler=SchedulerConfig(block_size=block_size, **sched))
    runner = FakeRunner(num_blocks, block_size)
    return EngineCore(build_scheduler(config, runner), runner, check_invariants=True)


def add(
    core: EngineCore, request_id: str, prompt: list[int], max_tokens: int, rl_q: float, arrival: float = 0.0
):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    core.add_request(AddRequest(request_id, prompt, params, arrival_time=arrival, rl_mean=rl_q, rl_q=rl_q))


def run(core: EngineCore, on_step=None, max_steps: int = 20_000, tokens=None) -> dict[str, list[int]]:
    tokens = {} if tokens is None else tokens
    for _ in range(max_steps):
        if not core.has_work():
            return tokens
        for delta in core.step():
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
        if on_step is not None:
            on_step(core)
    raise AssertionError("engine did not finish")


@pytest.mark.parametrize("variant", sorted(POLICY_VARIANTS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_invariants_and_exact_outputs_under_a_random_workload(variant, seed):
    """Tight pool, staggered arrivals, predictions from exact to 8x off, aborts: check_invariants (block manager
    + ledger) after every step, and every surviving output equals the reference, so no KV was overwritten."""
    rng = random.Random(seed)
    core = create_core(num_blocks=40, **POLICY_VARIANTS[variant])
    expected: dict[str, tuple[list[int], int]] = {}
    aborted: set[str] = set()
    pending = []
    for i in range(36):
        prompt = [rng.randrange(3, 997) for _ in range(rng.randint(1, 24))]
        max_tokens = rng.randint(1, 48)
        rl_q = max_tokens * rng.choice([0.125, 0.5, 1.0, 1.0, 2.0]) if rng.random() < 0.9 else 0.0
        pending.append((rng.randint(0, 60), f"r{i}", prompt, max_tokens, rl_q))
        expected[f"r{i}"] = (prompt, max_tokens)
    pending.sort()
    step = 0
    tokens: dict[str, list[int]] = {}
    while pending or core.has_work():
        while pending and pending[0][0] <= step:
            _, request_id, prompt, max_tokens, rl_q = pending.pop(0)
            add(core, request_id, prompt, max_tokens, rl_q, arrival=float(step))
        if step % 17 == 5 and core.scheduler.running:
            victim = rng.choice(core.scheduler.running).request_id
            core.abort([victim])
            aborted.add(victim)
        for delta in core.step():
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
        step += 1
        assert step < 20_000
    for request_id, (prompt, max_tokens) in expected.items():
        if request_id not in aborted:
            assert tokens[request_id] == reference_generate(prompt, max_tokens), request_id
    assert core.scheduler.block_manager.num_free_blocks == 40
    if isinstance(core.scheduler.ledger, KVLedger):
        assert core.scheduler.ledger.num_reserved_tokens == 0


@pytest.mark.parametrize(
    "variant", ["ecoserve", "ecoserve-no-lending", "ecoserve-no-grouping", "reserve-max"]
)
def test_zero_preemptions_with_oracle_lengths_when_the_workload_fits(variant):
    rng = random.Random(4)
    core = create_core(num_blocks=48, **POLICY_VARIANTS[variant])
    prompts = {}
    for i in range(30):
        prompt = [rng.randrange(3, 997) for _ in range(rng.randint(4, 40))]
        max_tokens = rng.randint(8, 120)
        add(core, f"r{i}", prompt, max_tokens, rl_q=max_tokens, arrival=float(i))  # oracle: true length
        prompts[f"r{i}"] = (prompt, max_tokens)
    tokens = run(core)
    assert core.scheduler.num_preemptions_total == 0
    for request_id, (prompt, max_tokens) in prompts.items():
        assert tokens[request_id] == reference_generate(prompt, max_tokens)
    ledger = core.scheduler.ledger
    assert ledger.num_extensions_total == 0 and ledger.num_overruns_total == 0
    # The pool (192 tokens) binds: with lending, many requests ran in others' unwritten tails, still safely.
    assert (ledger.num_borrowers_total > 0) == ledger.config.lending


def test_reserve_max_never_preempts_even_with_wrong_predictions():
    rng = random.Random(9)
    core = create_core(num_blocks=30, policy="reserve-max")
    for i in range(25):
        prompt = [rng.randrange(3, 997) for _ in range(rng.randint(1, 30))]
        add(core, f"r{i}", prompt, rng.randint(1, 80), rl_q=rng.uniform(1, 10), arrival=float(i))
    run(core)
    assert core.scheduler.num_preemptions_total == 0


def test_vllm_preempts_on_the_same_workload():
    """The contrast that makes the two tests above meaningful."""
    rng = random.Random(9)
    core = create_core(num_blocks=30, policy="vllm")
    for i in range(25):
        prompt = [rng.randrange(3, 997) for _ in range(rng.randint(1, 30))]
        add(core, f"r{i}", prompt, rng.randint(1, 80), rl_q=rng.uniform(1, 10), arrival=float(i))
    run(core)
    assert core.scheduler.num_preemptions_total > 0


def first_step(core: EngineCore) -> dict[str, list[int]]:
    return {d.request_id: list(d.token_ids) for d in core.step()}


def pipelining_core(lending: bool) -> tuple[EngineCore, dict[str, list[int]]]:
    # Pool 30 blocks x 4 = 120 tokens, reserve 3 blocks. Long: 8 + 96 = 104 reserved (+3 slack). Short: 4 + 8 = 12
    # (+3): flat, 122 > 108, so without lending it waits for the long one; with lending it lives in the long
    # one's unwritten tail and is gone long before the long one's frontier gets there.
    core = create_core(num_blocks=30, kv_reserve_fraction=0.1, ecoserve_lending=lending)
    add(core, "long", list(range(3, 11)), max_tokens=96, rl_q=96, arrival=0.0)
    tokens = first_step(core)
    add(core, "short", list(range(20, 24)), max_tokens=8, rl_q=8, arrival=1.0)
    return core, tokens


def test_kvc_pipelining_runs_a_short_request_in_a_long_ones_unwritten_tail():
    core, tokens = pipelining_core(lending=True)
    seen = {}

    def watch(core: EngineCore) -> None:
        requests = core.scheduler.requests
        if "short" in requests and requests["short"].status == RequestStatus.RUNNING:
            entry = core.scheduler.ledger.entry("short")
            seen.setdefault("borrower", entry.is_borrower)
            seen.setdefault("long_running", "long" in requests)
            flat = sum(
                e.reserved_tokens + core.scheduler.ledger.slack
                for e in core.scheduler.ledger.entries.values()
            )
            seen["flat_over_capacity"] = flat > core.scheduler.ledger.capacity_tokens

    run(core, on_step=watch, tokens=tokens)
    assert seen == {"borrower": True, "long_running": True, "flat_over_capacity": True}
    assert tokens["short"] == reference_generate(list(range(20, 24)), 8)
    assert tokens["long"] == reference_generate(list(range(3, 11)), 96)
    assert core.scheduler.num_preemptions_total == 0 and core.scheduler.ledger.num_borrowers_total == 1


def test_without_lending_the_short_request_waits_for_the_long_one():
    core, _ = pipelining_core(lending=False)
    finished = []

    def watch(core: EngineCore) -> None:
        requests = core.scheduler.requests
        finished.extend(r for r in ("long", "short") if r not in requests and r not in finished)
        if "short" in requests and requests["short"].status == RequestStatus.RUNNING:
            assert "long" not in requests

    run(core, on_step=watch)
    assert finished == ["long", "short"]


def test_an_overrunning_borrower_is_preempted_never_the_lender():
    # The short request claims 8 tokens but runs 60 (ignore_eos, max_tokens=60): it borrows the long one's
    # tail, outgrows its reservation, the pool cannot extend it, and when blocks run out it is the victim.
    core = create_core(num_blocks=30, kv_reserve_fraction=0.1)
    add(core, "long", list(range(3, 11)), max_tokens=96, rl_q=96, arrival=0.0)
    tokens = first_step(core)
    add(core, "short", list(range(20, 24)), max_tokens=60, rl_q=8, arrival=1.0)
    preempted = []

    def watch(core: EngineCore) -> None:
        requests = core.scheduler.requests
        preempted.extend(r.request_id for r in core.scheduler.waiting if r.status == RequestStatus.PREEMPTED)
        if "long" in requests:
            assert requests["long"].num_preemptions == 0

    run(core, on_step=watch, tokens=tokens)
    assert tokens["long"] == reference_generate(list(range(3, 11)), 96)
    assert tokens["short"] == reference_generate(list(range(20, 24)), 60)
    assert set(preempted) == {"short"} and core.scheduler.ledger.num_overruns_total >= 1


def make_request(request_id: str, prompt: int, output: int, rl_q: float, arrival: float, preempted=False):
    request = Request(
        request_id, list(range(3, 3 + prompt)), SamplingParams(max_tokens=500), arrival, rl_q=rl_q
    )
    request.output_token_ids = [7] * output
    if preempted:
        request.status = RequestStatus.PREEMPTED
    return request


def test_ecoserve_order_more_kv_first_then_shorter_remaining():
    order = EcoServeOrder()
    small = make_request("small", 4, 2, rl_q=100, arrival=0)
    big_long = make_request("big_long", 30, 10, rl_q=300, arrival=1)
    big_short = make_request("big_short", 30, 10, rl_q=20, arrival=2)
    ids = [r.request_id for r in order.running_order([small, big_long, big_short])]
    assert ids == ["big_short", "big_long", "small"]


def test_ecoserve_gt_queue_before_pt_queue_and_pts_by_arrival():
    order = EcoServeOrder()
    pt_late = make_request("pt_late", 50, 0, rl_q=10, arrival=5)
    pt_early = make_request("pt_early", 2, 0, rl_q=10, arrival=1)
    gt_small = make_request("gt_small", 4, 3, rl_q=10, arrival=9, preempted=True)
    gt_big = make_request("gt_big", 20, 9, rl_q=10, arrival=8, preempted=True)
    ids = [r.request_id for r in order.waiting_order([pt_late, gt_small, pt_early, gt_big])]
    assert ids == ["gt_big", "gt_small", "pt_early", "pt_late"]


def test_slo_urgent_goes_first():
    class UrgentInteractive(EcoServeOrder):
        def is_slo_urgent(self, request: Request) -> bool:
            return request.request_id.startswith("urgent")

    order = UrgentInteractive()
    big = make_request("big", 40, 10, rl_q=10, arrival=0)
    urgent = make_request("urgent", 2, 1, rl_q=400, arrival=3)
    assert [r.request_id for r in order.running_order([big, urgent])] == ["urgent", "big"]
    pt = make_request("pt", 2, 0, rl_q=10, arrival=0)
    urgent_pt = make_request("urgent_pt", 2, 0, rl_q=10, arrival=9)
    assert [r.request_id for r in order.waiting_order([pt, urgent_pt])] == ["urgent_pt", "pt"]


def test_no_ordering_ablation_is_fcfs():
    core = create_core(num_blocks=64, ecoserve_ordering=False)
    assert isinstance(core.scheduler.policy.ordering, FcfsOrder)
    assert isinstance(create_core(num_blocks=64, policy="ecoserve").scheduler.policy.ordering, EcoServeOrder)


def test_sjf_oracle_admits_the_shortest_true_length_first():
    core = create_core(num_blocks=64, policy="sjf-oracle", max_num_seqs=1)
    add(core, "long", [5, 6], max_tokens=30, rl_q=1, arrival=0.0)
    add(core, "short", [5, 7], max_tokens=3, rl_q=100, arrival=1.0)
    finished = []
    for _ in range(100):
        finished += [d.request_id for d in core.step() if d.finish_reason == FinishReason.LENGTH]
    assert finished == ["short", "long"]


@pytest.mark.parametrize("variant", ["ecoserve", "ecoserve-no-lending", "reserve-max"])
def test_a_request_as_large_as_the_pool_still_runs_alone(variant):
    # 16 blocks x 4 = 64 tokens: prompt 8 + max_tokens 56 fills the pool exactly, more than pool - reserve.
    core = create_core(num_blocks=16, **POLICY_VARIANTS[variant])
    add(core, "whole", list(range(3, 11)), max_tokens=56, rl_q=0.0)
    add(core, "next", list(range(20, 24)), max_tokens=4, rl_q=4.0, arrival=1.0)
    tokens = run(core)
    assert tokens["whole"] == reference_generate(list(range(3, 11)), 56)
    assert tokens["next"] == reference_generate(list(range(20, 24)), 4)


def test_ecoserve_fills_the_step_budget_with_prompt_chunks_after_the_decodes():
    core = create_core(num_blocks=64, max_num_batched_tokens=10)
    add(core, "gt", [5, 6], max_tokens=6, rl_q=6)
    core.step()  # prefilled: a GT now
    add(core, "pt", list(range(3, 40)), max_tokens=2, rl_q=2, arrival=1.0)
    output = core.scheduler.schedule()
    assert [(s.request_id, s.num_tokens) for s in output.scheduled] == [("gt", 1), ("pt", 9)]
