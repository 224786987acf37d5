"""server/status.py: the rolling window's buckets, percentiles, rates and ring reuse, and the /status body."""

from __future__ import annotations

import dataclasses

import pytest

from engine.protocol import BatchComposition, EngineStats, QueueStat, Ready
from server.status import RollingWindow, percentile, queue_tables, status_body

T0 = 1_700_000_000.0  # a whole second


def stats(timestamp: float, prompt: int = 0, generation: int = 0, preemptions: int = 0, **kw) -> EngineStats:
    return EngineStats(
        timestamp=timestamp,
        num_running=kw.pop("num_running", 0),
        num_waiting=0,
        num_preempted=0,
        num_free_blocks=kw.pop("num_free_blocks", 100),
        num_total_blocks=100,
        kv_usage=0.0,
        num_preemptions_total=preemptions,
        num_prompt_tokens_total=prompt,
        num_generation_tokens_total=generation,
        prefix_cache_queries_total=0,
        prefix_cache_hits_total=0,
        num_steps_total=0,
        last_step_seconds=0.0,
        **kw,
    )


def test_percentile_interpolates_between_ranks():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 90) == pytest.approx(4.6)  # numpy.percentile's default
    assert percentile(values, 100) == 5.0


def test_summary_counts_only_the_window():
    window = RollingWindow()
    window.add_latency("ttft", 9.0, T0 - 100)  # outside the last minute, inside the last five
    for i in range(10):
        window.add_latency("ttft", 0.1 * (i + 1), T0 + 0.05 * i)
    last_minute = window.summary(T0 + 1, 60)
    assert last_minute["ttft"]["count"] == 10
    assert last_minute["ttft"]["p50"] == pytest.approx(0.55)
    assert last_minute["tpot"] == {"count": 0, "p50": None, "p90": None, "p99": None}
    assert window.summary(T0 + 1, 300)["ttft"]["count"] == 11
    assert window.summary(T0 + 1, 300)["ttft"]["p99"] > 1.0


def test_reservoir_bounds_samples_but_counts_all():
    window = RollingWindow(max_samples_per_bucket=8)
    for i in range(1000):
        window.add_latency("e2e", float(i), T0 + 0.5)
    summary = window.summary(T0 + 0.5, 10)
    assert summary["e2e"]["count"] == 1000
    assert 0 <= summary["e2e"]["p50"] <= 999
    assert len(window._buckets[int(T0) % 300].samples["e2e"]) == 8


def test_engine_totals_become_per_second_rates():
    window = RollingWindow()
    window.add_engine_stats(stats(T0, prompt=1000, generation=500), T0)  # a baseline: no increment yet
    window.add_engine_stats(stats(T0 + 1, prompt=1100, generation=530, preemptions=2), T0 + 1)
    window.add_engine_stats(stats(T0 + 1, prompt=1100, generation=530, preemptions=2), T0 + 1.5)  # same push
    window.add_engine_stats(stats(T0 + 2, prompt=1100, generation=560, preemptions=2), T0 + 2)
    series = window.series(T0 + 2)
    assert len(series["generation_tokens"]) == 300 and series["end"] == T0 + 2
    assert series["generation_tokens"][-3:] == [0.0, 30.0, 30.0]
    assert series["prompt_tokens"][-2:] == [100.0, 0.0]
    assert series["preemptions"][-2:] == [2.0, 0.0]
    summary = window.summary(T0 + 2, 60)
    assert summary["generation_tokens_total"] == 60 and summary["preemptions_total"] == 2
    assert summary["generation_tokens_per_s"] == pytest.approx(1.0)


def test_ring_forgets_seconds_that_left_the_window():
    window = RollingWindow(num_buckets=5)
    window.add_latency("ttft", 1.0, T0)
    window.add_finished("stop", T0)
    assert window.series(T0 + 4)["ttft_p90"] == [1.0, None, None, None, None]
    window.add_latency("ttft", 2.0, T0 + 5)  # same slot, five seconds later
    assert window.series(T0 + 5)["ttft_p90"] == [None, None, None, None, 2.0]
    assert window.series(T0 + 5)["finished"] == [0.0] * 5
    assert window.finished_by_reason == {"stop": 1}  # totals since start stay


def test_queue_tables_sum_per_tenant_app_and_class():
    queues = [
        QueueStat("acme", "agent", "batch", 3, 1, 10),
        QueueStat("acme", "", "interactive", 0, 2, 6),
        QueueStat("zed", "agent", "interactive", 1, 0, 0),
    ]
    tables = queue_tables(queues)
    assert tables["by_group"][0] == dataclasses.asdict(queues[0])
    assert tables["by_tenant"] == [
        {"tenant": "acme", "num_waiting": 3, "num_running": 3, "num_kv_blocks": 16},
        {"tenant": "zed", "num_waiting": 1, "num_running": 0, "num_kv_blocks": 0},
    ]
    assert [r["app_id"] for r in tables["by_app"]] == ["agent", ""]
    assert tables["by_class"][0] == {
        "slo_class": "batch",
        "num_waiting": 3,
        "num_running": 1,
        "num_kv_blocks": 10,
    }


def test_status_body_without_and_with_engine_stats():
    window = RollingWindow()
    body = status_body(
        model_name="m",
        state="the model is loading",
        ready=None,
        stats=None,
        window=window,
        now=T0,
        started_at=T0,
    )
    assert body["engine"] is None and body["kv"] is None and body["queues"]["by_group"] == []
    assert body["state"] == "the model is loading" and body["summary"]["60s"]["ttft"]["count"] == 0

    ready = Ready("m", 512, 16, 100, "cpu", "vllm")
    pushed = stats(
        T0 - 0.5,
        num_running=2,
        num_free_blocks=70,
        num_cached_free_blocks=20,
        batch=BatchComposition(1, 30, 1, 1),
        queues=[QueueStat("acme", "", "interactive", 0, 2, 30)],
    )
    body = status_body(
        model_name="m", state="ok", ready=ready, stats=pushed, window=window, now=T0, started_at=T0 - 9
    )
    assert body["kv"] == {"total": 100, "used": 30, "cached": 20, "free": 50}
    assert body["batch"] == {
        "num_prefill_requests": 1,
        "num_prefill_tokens": 30,
        "num_decode_requests": 1,
        "num_decode_tokens": 1,
    }
    assert body["engine"]["age_s"] == pytest.approx(0.5) and body["engine"]["num_running"] == 2
    assert "queues" not in body["engine"] and body["queues"]["by_tenant"][0]["num_running"] == 2
    assert body["engine_info"]["policy"] == "vllm" and body["uptime_s"] == 9
