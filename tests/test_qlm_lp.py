"""QLM's LP reorder (engine/qlm_lp.py, `--policy qlm-lp`): the exact program on hand-worked queues, its EDF fallback,
the order it gives the scheduler, and the qlm-lp policy in the engine (burst behind a batch backlog, fuzz)."""

from __future__ import annotations

import math

import pytest
import test_qlm
from test_qlm import expected_output, run_burst, tagged

from engine.ordering import QlmLpOrder
from engine.policy import make_policy
from engine.qlm import QlmMonitor
from engine.qlm_lp import lp_order
from engine.slo import DEFAULT_SLO_TARGETS


def test_lp_order_on_hand_worked_queues():
    assert lp_order([10.0, 1.0], [20.0, 50.0], 0.0) == [1, 0]  # both feasible: the shorter first (EDF: 0, 1)
    assert lp_order([10.0, 1.0], [0.5, 50.0], 0.0) == [0, 1]  # the long one must start first
    assert lp_order([10.0, 10.0], [0.5, 0.5], 0.0) is None  # no order meets both: the caller keeps EDF
    assert lp_order([1.0, 2.0, 3.0], [math.inf] * 3, 5.0) == [0, 1, 2]
    assert lp_order([1.0] * 9, [math.inf] * 9, 0.0) is None  # more than 8 groups: not solved
    seconds, deadlines = [5, 3, 8, 1, 2, 7, 4, 6], [30, 10, 40, 60, 5, 50, 20, 35]
    order = lp_order(seconds, deadlines, 0.0)
    starts = [sum(seconds[k] for k in order[:p]) for p in range(len(order))]
    assert all(start <= deadlines[k] for start, k in zip(starts, order, strict=True))
    assert order == sorted(
        range(8), key=lambda k: seconds[k]
    )  # shortest first happens to meet every deadline


def test_lp_plan_orders_the_queue_where_edf_would_not():
    """At 10 tok/s: a batch request of 100 tokens (10 s), then a chat (bucket 1, 0.4 s, TTFT due at 3 s), then a
    batch request of 10 tokens (1 s). The chat is urgent behind the first. QLM's EDF reorder serves the chat, then the
    batch requests FCFS (starts 1, 1.4, 11.4); the LP serves the short batch request before the long one (1, 1.4, 2.4)."""
    monitor = QlmMonitor(tick_s=0.1, quantile=0.99, reorder="lp")
    monitor.meter.observe(seconds=1.0, num_generated=10, num_prefill_tokens=0, num_tokens=10)
    long_batch = tagged("long", "batch", 100, 0, queued=0.0)
    chat = tagged("chat", "interactive", 4, 0, queued=1.0)
    short_batch = tagged("short", "batch", 10, 0, queued=1.0)
    for request in (long_batch, chat, short_batch):
        request.slo = DEFAULT_SLO_TARGETS[request.slo_class]
    waiting = [long_batch, chat, short_batch]
    monitor.tick(1.0, waiting, [], 0.0)
    assert monitor.urgent_ids == {"chat"}
    assert monitor.plan == {"chat": 0, "short": 1, "long": 2}
    assert [r.request_id for r in QlmLpOrder(monitor).waiting_order(waiting)] == ["chat", "short", "long"]
    edf = QlmMonitor(tick_s=0.1, quantile=0.99)
    edf.meter.observe(seconds=1.0, num_generated=10, num_prefill_tokens=0, num_tokens=10)
    edf.tick(1.0, waiting, [], 0.0)
    assert [r.request_id for r in QlmLpOrder(edf).waiting_order(waiting)] == ["chat", "long", "short"]
    assert monitor.gauges()["qlm_lp_attempts_total"] == 1 and monitor.gauges()["qlm_lp_fallbacks_total"] == 0
    monitor.tick(1.2, [long_batch, short_batch], [], 0.0)  # no violation: no plan, FCFS again
    assert monitor.plan == {}


def test_qlm_lp_policy_meets_the_burst_ttft():
    assert make_policy("qlm-lp").name == "qlm-lp"
    ttft, outputs, core = run_burst("qlm-lp", num_host_blocks=256)
    assert max(ttft.values()) < DEFAULT_SLO_TARGETS["interactive"].ttft_s
    assert all(tokens == expected_output(rid) for rid, tokens in outputs.items()) and len(outputs) == 19
    assert core.scheduler.policy.slo.num_lp_attempts_total > 0


def test_qlm_lp_invariants_and_outputs_under_the_fuzz():
    test_qlm.test_invariants_and_outputs_under_a_seeded_fuzz("qlm-lp")


@pytest.mark.parametrize("reorder", ["bad"])
def test_unknown_reorder_is_refused(reorder):
    with pytest.raises(ValueError):
        QlmMonitor(reorder=reorder)
