"""GET /metrics: it parses with prometheus_client's own text parser, carries vLLM's names, and moves as requests run.

The first tests use the scripted fake engine client (milliseconds); the `e2e` ones run the real server with the
default model and check the engine counters against the usage the API reported, token for token.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest
from fake_engine_client import ANSWER, FakeClient
from live_server import LiveServer, live_server, wait_until_idle
from prometheus_client.parser import text_string_to_metric_families
from tiny_tokenizer import tiny_tokenizer

from engine.protocol import BatchComposition, EngineStats, QueueStat
from server.app import build_app
from server.config import ServerConfig
from server.metrics import CONTENT_TYPE, LabelCap, buckets_1_2_5

USER = [{"role": "user", "content": "hi"}]
Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, keyed by (sample name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the samples of `name` whose labels include `labels` (0 when there are none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def scrape(base_url: str, **client_kwargs) -> Samples:
    response = httpx.get(f"{base_url}/metrics", timeout=5, **client_kwargs)
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE
    return parse(response.text)


# ---- against the fake engine client ------------------------------------------------------------------------


async def _requests_then_scrape(
    fake: FakeClient, requests: list[dict]
) -> tuple[Samples, list[httpx.Response]]:
    """Send `requests` one after the other, then scrape; the last response is GET /status, taken last."""
    app = build_app(ServerConfig(served_model_names=("fake",)), fake, tokenizer=tiny_tokenizer())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        responses = [await http.post("/v1/chat/completions", **r) for r in requests]
        metrics = await http.get("/metrics")
        responses.append(await http.get("/status"))
    assert metrics.headers["content-type"] == CONTENT_TYPE
    return parse(metrics.text), responses


def test_request_series_move_with_tenant_and_class_labels():
    fake = FakeClient()
    fake.token_delay_s = 0.002
    acme = {
        "json": {"messages": USER, "stream": True},
        "headers": {"X-Tenant-Id": "acme", "X-SLO-Class": "batch"},
    }
    plain = {"json": {"messages": USER}}
    short = {"json": {"messages": USER, "max_tokens": 2}}
    samples, responses = asyncio.run(_requests_then_scrape(fake, [acme, plain, short]))
    assert all(r.status_code == 200 for r in responses)
    status = responses[-1].json()  # the status page's rolling window saw the same requests
    counts = {k: v["count"] for k, v in status["summary"]["60s"].items() if isinstance(v, dict)}
    assert counts == {"ttft": 3, "tpot": 3, "e2e": 3, "queue": 3}
    assert status["finished_by_reason"] == {"stop": 2, "length": 1}
    num_answer = len(tiny_tokenizer().encode(ANSWER))
    model, acme_labels = {"model_name": "fake"}, {"tenant": "acme", "slo_class": "batch"}
    default_labels = {"tenant": "default", "slo_class": "interactive"}

    assert value(samples, "vllm:time_to_first_token_seconds_count", **model) == 3
    assert value(samples, "vllm:time_to_first_token_seconds_count", **acme_labels) == 1
    assert value(samples, "vllm:time_to_first_token_seconds_count", **default_labels) == 2
    assert value(samples, "vllm:request_queue_time_seconds_count") == 3
    assert value(samples, "vllm:inter_token_latency_seconds_count") == 2 * (num_answer - 1) + 1
    assert value(samples, "vllm:e2e_request_latency_seconds_count") == 3
    assert value(samples, "vllm:e2e_request_latency_seconds_sum") > 0.002 * num_answer
    assert value(samples, "vllm:request_generation_tokens_sum", **acme_labels) == num_answer
    assert value(samples, "vllm:request_generation_tokens_sum") == 2 * num_answer + 2
    assert value(samples, "vllm:request_prompt_tokens_count") == 3
    assert value(samples, "vllm:request_time_per_output_token_seconds_count") == 3
    assert value(samples, "vllm:request_success_total", finished_reason="stop") == 2
    assert value(samples, "vllm:request_success_total", finished_reason="length") == 1
    assert ("vllm:request_success_total", frozenset({**model, "finished_reason": "abort"}.items())) in samples
    assert value(samples, "kairos:requests_total", finished_reason="stop", **acme_labels) == 1
    assert value(samples, "kairos:requests_total", finished_reason="length", **default_labels) == 1
    # vLLM's buckets: TTFT from 1 ms to 2560 s, token counts 1-2-5 up to max_model_len (64 here)
    les = {dict(ls)["le"] for n, ls in samples if n == "vllm:time_to_first_token_seconds_bucket"}
    assert {"0.001", "2560.0", "+Inf"} <= les and len(les) == 23
    les = {dict(ls)["le"] for n, ls in samples if n == "vllm:request_prompt_tokens_bucket"}
    assert les == {"1.0", "2.0", "5.0", "10.0", "20.0", "50.0", "+Inf"}


def test_engine_failure_counts_as_error():
    fake = FakeClient()
    fake.error_after = 2
    samples, responses = asyncio.run(_requests_then_scrape(fake, [{"json": {"messages": USER}}]))
    assert responses[0].status_code == 500
    assert value(samples, "vllm:request_success_total", finished_reason="error") == 1
    assert value(samples, "vllm:time_to_first_token_seconds_count") == 1
    assert value(samples, "vllm:e2e_request_latency_seconds_count") == 0  # only completed requests


def test_engine_series_are_the_last_pushed_stats():
    fake = FakeClient()
    fake.latest_stats = EngineStats(
        timestamp=1.0,
        num_running=3,
        num_waiting=5,
        num_preempted=1,
        num_free_blocks=60,
        num_total_blocks=100,
        kv_usage=0.4,
        num_preemptions_total=7,
        num_prompt_tokens_total=1234,
        num_generation_tokens_total=567,
        prefix_cache_queries_total=900,
        prefix_cache_hits_total=300,
        num_steps_total=42,
        last_step_seconds=0.01,
        num_cached_free_blocks=25,
        batch=BatchComposition(1, 100, 2, 2),
        queues=[
            QueueStat("acme", "a1", "batch", 4, 1, 20),
            QueueStat("acme", "a2", "batch", 1, 0, 0),
            QueueStat("zed", "", "interactive", 0, 2, 20),
        ],
    )
    samples, _ = asyncio.run(_requests_then_scrape(fake, []))
    m = {"model_name": "fake"}
    assert value(samples, "vllm:num_requests_running", **m) == 3
    assert value(samples, "vllm:num_requests_waiting", **m) == 5
    assert value(samples, "vllm:kv_cache_usage_perc", **m) == 0.4
    assert value(samples, "vllm:prompt_tokens_total", **m) == 1234
    assert value(samples, "vllm:generation_tokens_total", **m) == 567
    assert value(samples, "vllm:num_preemptions_total", **m) == 7
    assert value(samples, "vllm:prefix_cache_queries_total", **m) == 900
    assert value(samples, "vllm:prefix_cache_hits_total", **m) == 300
    kv = {state: value(samples, "kairos:kv_blocks", state=state) for state in ("free", "cached", "used")}
    assert kv == {"free": 35, "cached": 25, "used": 40}
    assert value(samples, "kairos:batch_tokens", phase="prefill") == 100
    assert value(samples, "kairos:batch_requests", phase="decode") == 2
    acme = {"tenant": "acme", "slo_class": "batch"}
    assert value(samples, "kairos:num_requests_waiting_by_tenant", **acme) == 5  # two apps, one series
    assert value(samples, "kairos:num_requests_running_by_tenant", tenant="zed") == 2
    assert value(samples, "kairos:kv_blocks_by_tenant", **acme) == 20
    assert not any("app" in dict(labels) for _, labels in samples)  # app ids stay out of Prometheus


def test_qlm_figures_from_engine_stats_extra():
    """QLM's violation check, estimator accuracy, swaps and evictions (EngineStats.extra) become series; a policy
    that reports none of them (vllm: no qlm_* keys) leaves those families without samples."""
    extra = {
        "qlm_urgent_requests": 2.0,
        "qlm_violations_total": 9.0,
        "qlm_tokens_per_s": 812.5,
        "qlm_rwt_pairs": 40.0,
        "qlm_rwt_mean_error_s": 0.25,
        "qlm_rwt_mean_abs_error_s": 0.75,
        "num_swaps_total": 3.0,
        "num_evictions_total": 4.0,
    }

    def stats(extra: dict[str, float]) -> EngineStats:
        return EngineStats(1.0, 0, 0, 0, 100, 100, 0.0, 0, 0, 0, 0, 0, 0, 0.0, extra=extra)

    fake = FakeClient()
    fake.latest_stats = stats(extra)
    samples, _ = asyncio.run(_requests_then_scrape(fake, []))
    m = {"model_name": "fake"}
    assert value(samples, "kairos:qlm_urgent_requests", **m) == 2
    assert value(samples, "kairos:qlm_violations_total", **m) == 9
    assert value(samples, "kairos:qlm_tokens_per_second", **m) == 812.5
    assert value(samples, "kairos:qlm_rwt_pairs", **m) == 40
    assert value(samples, "kairos:qlm_rwt_mean_error_seconds", **m) == 0.25
    assert value(samples, "kairos:qlm_rwt_mean_abs_error_seconds", **m) == 0.75
    assert value(samples, "kairos:num_swaps_total", **m) == 3
    assert value(samples, "kairos:num_evictions_total", **m) == 4

    fake.latest_stats = stats({"num_swaps_total": 0.0, "num_evictions_total": 0.0})
    samples, _ = asyncio.run(_requests_then_scrape(fake, []))
    assert not any(name.startswith("kairos:qlm_") for name, _ in samples)
    assert ("kairos:num_swaps_total", frozenset(m.items())) in samples


def test_metrics_is_empty_until_the_engine_is_ready():
    fake = FakeClient()
    fake.ready = None
    app = build_app(ServerConfig(), fake, tokenizer=tiny_tokenizer())

    async def get() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return await http.get("/metrics")

    response = asyncio.run(get())
    assert response.status_code == 200 and response.text == ""


def test_tenant_label_cap():
    cap = LabelCap(2)
    assert [cap(t) for t in ("a", "b", "c", "a", "d", "b")] == ["a", "b", "other", "a", "other", "b"]


def test_buckets_1_2_5():
    assert buckets_1_2_5(512) == (1, 2, 5, 10, 20, 50, 100, 200, 500)
    assert buckets_1_2_5(1000) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


# ---- against the real server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with live_server(Path(tmp_path_factory.mktemp("metrics"))) as srv:
        yield srv


def chat(server: LiveServer, max_tokens: int, headers: dict | None = None, **body) -> dict:
    payload = {"messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": max_tokens}
    response = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={**payload, "temperature": 0, **body},
        headers=headers or {},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.e2e
def test_engine_counters_match_usage(server: LiveServer):
    chat(server, 4)  # warm-up (the first request pays torch.compile), and a prompt in the prefix cache
    wait_until_idle(server)
    before = scrape(server.base_url)
    acme = {"X-Tenant-Id": "acme", "X-SLO-Class": "batch"}
    usages = [chat(server, 12, acme)["usage"], chat(server, 6)["usage"]]
    wait_until_idle(server)
    after = scrape(server.base_url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert cached > 0
    assert moved("vllm:generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert moved("vllm:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages) - cached
    assert moved("vllm:prefix_cache_queries_total") == sum(u["prompt_tokens"] for u in usages)
    assert moved("vllm:prefix_cache_hits_total") == cached
    assert moved("vllm:time_to_first_token_seconds_count", tenant="acme", slo_class="batch") == 1
    assert moved("vllm:time_to_first_token_seconds_count", tenant="default") == 1
    assert moved("vllm:request_queue_time_seconds_count") == 2
    assert moved("vllm:e2e_request_latency_seconds_sum") > 0
    assert moved("vllm:request_generation_tokens_sum") == sum(u["completion_tokens"] for u in usages)
    assert moved("vllm:request_success_total") == 2
    assert moved("kairos:requests_total", tenant="acme") == 1
    assert value(after, "vllm:num_requests_running") == 0
    kv = {state: value(after, "kairos:kv_blocks", state=state) for state in ("free", "cached", "used")}
    assert kv["used"] == 0 and kv["cached"] > 0  # idle: every block is free, the prompts' still cached


@pytest.mark.e2e
def test_running_request_shows_in_gauges_and_abort_is_counted(server: LiveServer):
    before = scrape(server.base_url)
    seen_running = threading.Event()

    def stream_then_disconnect() -> None:
        body = {
            "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 400,
            "stream": True,
        }
        headers = {"X-Tenant-Id": "streamer"}
        with httpx.stream(
            "POST", f"{server.base_url}/v1/chat/completions", json=body, headers=headers, timeout=120
        ) as response:
            for _ in response.iter_lines():
                if seen_running.is_set():
                    return  # closing the stream aborts the request

    thread = threading.Thread(target=stream_then_disconnect)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            samples = scrape(server.base_url)
            if value(samples, "kairos:num_requests_running_by_tenant", tenant="streamer") == 1:
                break
            assert time.monotonic() < deadline, "the running request never showed in /metrics"
            time.sleep(0.1)
        assert value(samples, "vllm:num_requests_running") == 1
        assert value(samples, "kairos:kv_blocks", state="used") > 0
        assert value(samples, "kairos:kv_blocks_by_tenant", tenant="streamer") > 0
    finally:
        seen_running.set()
        thread.join(timeout=60)
    wait_until_idle(server)
    after = scrape(server.base_url)
    assert value(after, "vllm:request_success_total", finished_reason="abort") == (
        value(before, "vllm:request_success_total", finished_reason="abort") + 1
    )
    assert value(after, "kairos:requests_total", tenant="streamer", finished_reason="abort") == 1
