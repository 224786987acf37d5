"""The KV ledger alone: reservations, the flat and the future-feasibility (KVC pipelining) admission checks against
a brute-force evaluation of the usage curves, grouping, and the overrun rule."""

from __future__ import annotations

import random

from engine.kv_ledger import KVLedger, LedgerConfig, _Profile
from engine.protocol import SamplingParams
from engine.request import Request, RequestStatus

BLOCK = 4


def make_ledger(num_blocks: int, **config) -> KVLedger:
    config = {"reserve_fraction": 0.0, "bucket_width": 8, **config}
    return KVLedger(num_blocks, BLOCK, max_model_len=10_000, config=LedgerConfig(**config))


def make_request(request_id: str, prompt: int, rl_q: float, max_tokens: int = 1000) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return Request(request_id, list(range(3, 3 + prompt)), params, rl_q=rl_q)


def start(ledger: KVLedger, request: Request) -> None:
    """What the scheduler does on admission: prefilled, running, recorded."""
    assert ledger.can_admit(request)
    request.status = RequestStatus.RUNNING
    request.num_computed_tokens = request.num_prompt_tokens
    ledger.admit(request)


def decode(ledger: KVLedger, requests: list[Request], num_steps: int) -> None:
    for _ in range(num_steps):
        for request in requests:
            ledger.ensure(request, request.num_tokens)
            request.output_token_ids.append(7)
            request.num_computed_tokens = request.num_tokens - 1
        ledger.start_step(ledger._step + 1)


def test_reservation_is_prompt_plus_bucket_capped_at_max_tokens():
    ledger = make_ledger(100)
    assert ledger.initial_reservation(make_request("a", 10, rl_q=13.2)) == 10 + 16
    assert ledger.initial_reservation(make_request("b", 10, rl_q=13.2, max_tokens=12)) == 10 + 12
    assert ledger.initial_reservation(make_request("c", 10, rl_q=0.0, max_tokens=50)) == 10 + 50  # untagged
    assert make_ledger(100, reserve_max=True).initial_reservation(make_request("d", 10, 5, 70)) == 80


def test_reserve_is_held_back_from_admission():
    ledger = make_ledger(100, reserve_fraction=0.05)
    assert ledger.capacity_tokens == 95 * BLOCK and ledger.pool_tokens == 100 * BLOCK


def test_flat_reservations_never_exceed_the_pool():
    rng = random.Random(3)
    ledger = make_ledger(200, lending=False)
    admitted = []
    for i in range(200):
        request = make_request(f"r{i}", rng.randint(1, 40), rl_q=rng.uniform(1, 100))
        if ledger.can_admit(request):
            start(ledger, request)
            admitted.append(request)
        total = sum(e.reserved_tokens + ledger.slack for e in ledger.entries.values())
        assert total <= ledger.capacity_tokens
    assert 3 < len(admitted) < 200
    ledger.check_invariants(admitted)


def test_short_request_borrows_the_unwritten_tail_of_a_long_one():
    # Pool 60 tokens. Long: 8 + 40 reserved (+3 slack) = 51. Short: 4 + 8 (+3) = 15 does not fit flat,
    # but the long one has written only 8 tokens; the short one ends (step 8) long before the long one needs
    # the space: 8 + 8 + 3 + 15 - 1 <= 60.
    ledger = make_ledger(15)
    long_request = make_request("long", 8, rl_q=40)
    start(ledger, long_request)
    short = make_request("short", 4, rl_q=8)
    flat = make_ledger(15, lending=False)
    start(flat, make_request("long", 8, rl_q=40))
    assert not flat.can_admit(make_request("short", 4, rl_q=8))
    start(ledger, short)
    assert ledger.entry("short").is_borrower and not ledger.entry("long").is_borrower
    assert ledger.peak_tokens() <= ledger.capacity_tokens


def test_a_borrower_that_would_outlive_the_lenders_frontier_is_refused():
    ledger = make_ledger(15)
    long_request = make_request("long", 8, rl_q=40)
    start(ledger, long_request)
    decode(ledger, [long_request], 30)  # the long one's frontier is now near its reservation's end
    assert not ledger.can_admit(make_request("short", 4, rl_q=8))


def brute_force_fits(ramps: list[tuple[int, int]], peak: int, end: int, capacity: int) -> bool:
    """Evaluate Σ u(t) at every step the new ramp is alive: ramps are (peak, end), u(t) = peak - end + t for
    t <= end."""
    everything = [*ramps, (peak, end)]
    return all(sum(p - e + t for p, e in everything if e >= t) <= capacity for t in range(end + 1))


def test_profile_check_matches_brute_force():
    rng = random.Random(11)
    for _ in range(300):
        ramps = [(rng.randint(1, 60), rng.randint(0, 40)) for _ in range(rng.randint(0, 8))]
        ramps = [(max(p, e), e) for p, e in ramps]  # a ramp never goes below 0 tokens at t = 0
        profile = _Profile(sorted([e, p - e, 1] for p, e in ramps), {})
        capacity = rng.randint(20, 300)
        end = rng.randint(0, 40)
        peak = rng.randint(end, end + 40)
        assert profile.fits(peak, end, capacity) == brute_force_fits(ramps, peak, end, capacity)


def test_grouping_is_never_less_conservative_than_per_request_curves():
    rng = random.Random(5)
    for trial in range(40):
        grouped, single = make_ledger(120), make_ledger(120, grouping=False)
        running: list[tuple[Request, Request]] = []
        for i in range(30):
            prompt, rl_q = rng.randint(1, 30), rng.uniform(1, 60)
            a, b = make_request(f"{trial}-{i}", prompt, rl_q), make_request(f"{trial}-{i}", prompt, rl_q)
            if grouped.can_admit(a):
                assert single.can_admit(b)
                start(grouped, a)
                start(single, b)
                running.append((a, b))
            decode(grouped, [a for a, _ in running], 1)
            decode(single, [b for _, b in running], 1)
            for a, b in list(
                running
            ):  # finish as predicted (an overrun could extend in one and not the other)
                if a.num_tokens >= grouped.entry(a.request_id).reserved_tokens - 1:
                    grouped.release(a)
                    single.release(b)
                    running.remove((a, b))
        grouped.check_invariants([a for a, _ in running])
        assert len(grouped._groups) <= len(running)


def test_overrun_re_predicts_by_doubling_and_draws_from_the_reserve():
    ledger = make_ledger(100, reserve_fraction=0.2)
    request = make_request("a", 4, rl_q=8)
    start(ledger, request)
    assert ledger.entry("a").reserved_tokens == 12
    decode(ledger, [request], 8)  # 12 tokens written: at its reservation's end, not finished
    ledger.ensure(request, request.num_tokens + 1)
    entry = ledger.entry("a")
    assert entry.reserved_tokens == 4 + 16 and entry.num_extensions == 1 and not entry.is_overrun
    ledger.check_invariants([request])


def test_overrun_that_the_pool_cannot_extend_runs_unreserved():
    ledger = make_ledger(6, reserve_fraction=0.0)  # 24 tokens
    request = make_request("a", 4, rl_q=16)
    start(ledger, request)  # 20 + 3 slack
    decode(ledger, [request], 16)
    ledger.ensure(request, request.num_tokens + 1)
    entry = ledger.entry("a")
    assert entry.is_overrun and entry.reserved_tokens == 20 and ledger.num_overruns_total == 1


def test_release_removes_the_curve():
    ledger = make_ledger(15)
    a = make_request("a", 8, rl_q=40)
    start(ledger, a)
    assert not ledger.can_admit(make_request("b", 8, rl_q=40))
    ledger.release(a)
    assert ledger.num_reserved_tokens == 0 and ledger.can_admit(make_request("b", 8, rl_q=40))
    ledger.check_invariants([])
