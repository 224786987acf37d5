"""`kairos bench soak` (loadgen/soak.py): its probe and soak phases against the fake OpenAI server, the window
bookkeeping, the pass criteria and the marked markdown section. The real 30-minute run is a benchmark
(docs/results/reliability.md), not a test."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from urllib.parse import urlparse

import pytest
from fake_openai_server import FakeBehavior, fake_server

from loadgen.datasets import DEFAULT_DATA_DIR
from loadgen.soak import (
    BEGIN,
    END,
    Outcome,
    Run,
    Sample,
    SoakSetup,
    checks,
    plan,
    probe,
    soak,
    windows,
    write_markdown,
)

needs_data = pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason="needs ../shared/data")

AUDIT_OK = {"kv_used_blocks": 0, "num_running": 0, "num_waiting": 0, "health": 200}


@needs_data
def test_probe_and_soak_against_the_fake_server() -> None:
    with fake_server(FakeBehavior(ttft_s=0.02, itl_s=0.002)) as server:
        setup = SoakSetup(
            duration_s=3.0,
            probe_s=1.5,
            max_queued_requests=4,
            max_tokens=16,
            disconnect_frac=0.5,
            window_s=1.0,
            sample_s=0.2,
            idle_timeout_s=0.5,
            port=urlparse(server.base_url).port,
        )
        requests = plan(setup, 200)
        assert all(r.max_tokens <= 16 for r in requests)
        capacity = asyncio.run(probe(setup, requests))
        assert capacity["completed"] > 0 and capacity["failed"] == 0
        assert capacity["capacity_rps"] == pytest.approx(capacity["completed"] / 1.0)

        run = Run(setup)
        asyncio.run(soak(setup, 20.0, requests, os.getpgid(0), run))
    statuses = {o.status for o in run.outcomes}
    assert statuses <= {"ok", "disconnected"} and statuses == {"ok", "disconnected"}
    assert len(run.outcomes) > 20  # 20 req/s for 3 s
    for o in run.outcomes:
        if o.status == "ok":
            assert o.chunks == requests[o.index % len(requests)].max_tokens
            assert 0 < o.ttft <= o.e2e
    assert run.samples and all(s.rss_mib > 0 for s in run.samples)  # this process group's memory

    rows = windows(setup, run)
    assert len(rows) == 3 and sum(r["sent"] for r in rows) == len(run.outcomes)
    assert all(r["failed"] == 0 for r in rows)
    result = checks(replace(setup, p99_ratio=100.0), rows, run, AUDIT_OK)
    assert result["no_stuck_or_failed_request"] and result["no_leaked_blocks"]


def _run(outcomes: list[Outcome], rss: list[float]) -> Run:
    setup = SoakSetup(duration_s=20.0, window_s=10.0, rss_growth_mib=50.0, p99_ratio=2.0)
    run = Run(setup, outcomes=outcomes)
    run.samples = [Sample(t_s=t, rss_mib=m) for t, m in zip((5.0, 9.0, 15.0, 19.0), rss, strict=True)]
    return run


def test_windows_and_checks_catch_leaks_growth_and_failures() -> None:
    outcomes = [
        Outcome(0, 1.0, "ok", ttft=0.1, e2e=1.0, chunks=5),
        Outcome(1, 2.0, "429"),
        Outcome(2, 3.0, "disconnected", chunks=2),
        Outcome(3, 12.0, "ok", ttft=0.2, e2e=1.5, chunks=5),
        Outcome(4, 13.0, "stuck", error="no byte for 300 s"),
    ]
    run = _run(outcomes, [1000.0, 1010.0, 1020.0, 1100.0])
    rows = windows(run.setup, run)
    assert [(r["sent"], r["ok"], r["429"], r["disconnected"], r["failed"]) for r in rows] == [
        (3, 1, 1, 1, 0),
        (2, 1, 0, 0, 1),
    ]
    assert rows[0]["rss_end_mib"] == 1010.0 and rows[1]["rss_end_mib"] == 1100.0
    leaked = {**AUDIT_OK, "kv_used_blocks": 3}
    c = checks(run.setup, rows, run, leaked)
    assert not c["no_leaked_blocks"] and not c["no_stuck_or_failed_request"]
    assert c["rss_growth_mib"] == pytest.approx(90.0) and not c["rss_growth_ok"]  # bound 50
    assert c["p99_e2e_last_over_first"] == pytest.approx(1.5) and c["p99_stable"]
    assert not c["pass"] and c["failures"][0]["status"] == "stuck"

    clean = _run([o for o in outcomes if o.status != "stuck"], [1000.0, 1010.0, 1020.0, 1030.0])
    c = checks(clean.setup, windows(clean.setup, clean), clean, AUDIT_OK)
    assert c["pass"], c


def test_markdown_section_is_replaced_between_markers(tmp_path) -> None:
    outcomes = [Outcome(0, 1.0, "ok", ttft=0.1, e2e=1.0, chunks=5), Outcome(1, 12.0, "ok", ttft=0.1, e2e=1.2)]
    run = _run(outcomes, [1000.0, 1000.0, 1000.0, 1000.0])
    rows = windows(run.setup, run)
    result = {
        "command": "kairos bench soak --duration-s 20",
        "date": "2026-11-23T00:00:00+00:00",
        "machine": {"cpu_model": "test CPU", "num_cpus": 2, "repo_commit": "abc1234"},
        "loadavg_before": [1.0, 1.0, 1.0],
        "loadavg_after": [2.0, 2.0, 2.0],
        "setup": {**run.setup.__dict__, "data_dir": "x"},
        "probe": {"duration_s": 120.0, "counted_s": 80.0, "completed": 80, "capacity_rps": 1.0},
        "rate_rps": 1.5,
        "windows": rows,
        "audit": {**AUDIT_OK, "kv_cached_blocks": 7, "kv_total_blocks": 100, "server_rejected_total": 0.0}
        | {"num_preemptions_total": 0},
        "checks": checks(run.setup, rows, run, AUDIT_OK),
    }
    md = tmp_path / "reliability.md"
    md.write_text(
        f"# Reliability\n\nhand-written intro\n\n{BEGIN}\nold numbers\n{END}\n\nhand-written tail\n"
    )
    write_markdown(result, md)
    text = md.read_text()
    assert "hand-written intro" in text and "hand-written tail" in text and "old numbers" not in text
    assert "**PASS**" in text and "1.50 req/s" in text and text.count(BEGIN) == 1
