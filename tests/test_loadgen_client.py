"""loadgen.client against the deterministic fake server: TTFT 100 ms, ITL 20 ms, n tokens → hand-computed
TTFT, TPOT, ITL, E2E, goodput and Jain's index (±30 ms for timing noise on a shared CPU)."""

from __future__ import annotations

import asyncio
import io
import statistics

import pytest
from fake_openai_server import MODEL, FakeBehavior, fake_server

from loadgen.client import ClientConfig, Progress, RequestResult, first_model, run_plan
from loadgen.plan import PlannedRequest
from loadgen.report import build_report

TOL_S = 0.030


def planned(index: int, max_tokens: int, **kw: object) -> PlannedRequest:
    return PlannedRequest(
        index=index, offset_s=0.0, prompt=(5, 6, 7), num_prompt_tokens=3, max_tokens=max_tokens, **kw
    )


def run(base_url: str, requests: list[PlannedRequest], **kw: object):
    return asyncio.run(run_plan(requests, ClientConfig(base_url, MODEL, show_progress=False, **kw)))


def test_timing_matches_the_fake_servers_schedule() -> None:
    # n = 2 → E2E = 100 + 20 = 120 ms; n = 26 → 100 + 25·20 = 600 ms; TPOT = ITL = 20 ms
    requests = [planned(i, 2 if i % 2 else 26, tenant=f"t{i % 2}") for i in range(6)]
    with fake_server() as server:
        asyncio.run(first_model(server.base_url))  # open nothing persistent; just check /v1/models
        results, duration = run(server.base_url, requests)
    assert all(r.ok and r.usage_seen for r in results)
    assert statistics.median(r.ttft for r in results) == pytest.approx(0.100, abs=TOL_S)
    assert statistics.median(x for r in results for x in r.itl) == pytest.approx(0.020, abs=0.010)
    for r in results:
        assert r.tpot == pytest.approx(0.020, abs=0.010)
        assert r.e2e - r.ttft == pytest.approx(0.020 * (r.max_tokens - 1), abs=TOL_S)
        assert r.output_tokens == r.max_tokens and r.prompt_tokens == 3
    assert duration == pytest.approx(0.600, abs=0.3)
    # goodput: E2EL <= 400 ms holds exactly for the three 2-token requests
    report = build_report(results, duration, {"e2el": 400.0, "ttft": 1000.0}, {"workload": "fake"})
    assert report["request_goodput"] * duration == pytest.approx(3)
    assert report["per_tenant"]["t1"]["request_goodput"] * duration == pytest.approx(3)
    assert report["per_tenant"]["t0"]["request_goodput"] == 0.0
    assert report["jain_index_final"] == pytest.approx(1.0)


def test_headers_and_bodies() -> None:
    requests = [
        planned(0, 3, tenant="acme", app_id="app-1", slo_class="batch", ignore_eos=True),
        PlannedRequest(0, 0.0, "hello there world", 3, 2),
    ]
    with fake_server() as server:
        run(server.base_url, requests[:1])
        run(server.base_url, requests[1:], endpoint="chat")
        sent = server.log.requests
    completion, chat = sent[0], sent[1]
    assert completion["path"] == "/v1/completions" and chat["path"] == "/v1/chat/completions"
    assert completion["headers"]["x-tenant-id"] == "acme" and completion["headers"]["x-app-id"] == "app-1"
    assert completion["headers"]["x-slo-class"] == "batch"
    assert completion["body"]["prompt"] == [5, 6, 7] and completion["body"]["ignore_eos"] is True
    assert completion["body"]["stream_options"] == {"include_usage": True}
    assert chat["body"]["messages"] == [{"role": "user", "content": "hello there world"}]
    assert chat["body"]["max_completion_tokens"] == 2 and "ignore_eos" not in chat["body"]


def test_429_counted_or_retried() -> None:
    requests = [planned(0, 2, tenant="ok"), planned(1, 2, tenant="blocked")]
    with fake_server(FakeBehavior(ttft_s=0.01, itl_s=0.01, reject_tenants=frozenset({"blocked"}))) as server:
        results, duration = run(server.base_url, requests)
    assert [r.status for r in results] == ["ok", "429"] and results[1].num_429 == 1
    report = build_report(results, duration, {}, {"workload": "fake"})
    assert report["num_429"] == 1 and report["failed"] == 1
    assert report["jain_index_final"] == pytest.approx(0.5)  # completion ratios (1, 0)
    with fake_server(FakeBehavior(ttft_s=0.01, itl_s=0.01, num_429_first=2)) as server:
        results, _ = run(server.base_url, requests, on_429="retry")
    assert all(r.ok and r.num_429 == 2 for r in results)


def test_no_usage_chunk_counts_chunks_and_concurrency_limit() -> None:
    requests = [planned(i, 4) for i in range(3)]
    with fake_server(FakeBehavior(ttft_s=0.05, itl_s=0.01, send_usage=False)) as server:
        results, duration = run(server.base_url, requests, max_concurrency=1)
    assert all(r.ok and not r.usage_seen and r.output_tokens == 4 for r in results)
    starts = sorted(r.start_s for r in results)  # one at a time: each starts when the previous ended
    assert starts[1] - starts[0] >= 0.08 and starts[2] - starts[1] >= 0.08


def test_chained_request_waits_for_its_predecessor() -> None:
    requests = [planned(0, 6), PlannedRequest(1, 0.2, (1, 2), 2, 2, after=0)]
    with fake_server(FakeBehavior(ttft_s=0.05, itl_s=0.01)) as server:
        results, _ = run(server.base_url, requests)
    assert results[1].start_s - results[0].end_s == pytest.approx(0.2, abs=TOL_S)


def test_progress_bar_draws_counts() -> None:
    stream = io.StringIO()
    progress = Progress(2, enabled=True, stream=stream)
    progress.update(RequestResult(0, "t", "", "interactive", 1, 1, status="ok"))
    progress.update(RequestResult(1, "t", "", "interactive", 1, 1, status="429"))
    progress.close()
    assert "2/2 ok 1 failed 1" in stream.getvalue() and stream.getvalue().endswith("\n")
