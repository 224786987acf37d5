"""loadgen.report on hand-built results: vllm-bench metrics, goodput, app completion, Jain's index."""

from __future__ import annotations

import pytest

from loadgen.client import RequestResult
from loadgen.report import (
    app_completion,
    build_report,
    format_table,
    jain_index,
    max_min_shares,
    summarize,
    tenant_fairness,
)

VLLM_KEYS = [
    "completed",
    "failed",
    "duration",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "request_goodput",
] + [f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "std", "p90", "p99")]


def result(
    index: int,
    tenant: str = "a",
    start: float = 0.0,
    ttft: float = 0.1,
    itl: float = 0.02,
    num_out: int = 10,
    num_in: int = 10,
    status: str = "ok",
    app_id: str = "",
) -> RequestResult:
    r = RequestResult(index, tenant, app_id, "interactive", num_in, num_out, status=status, start_s=start)
    if status == "ok":
        r.ttft, r.itl, r.output_tokens = ttft, [itl] * (num_out - 1), num_out
        r.e2e = ttft + itl * (num_out - 1)
    r.end_s = start + r.e2e
    return r


def test_vllm_metrics_and_goodput() -> None:
    # TTFT 100 / 300 ms; TPOT 20 / 40 ms; E2EL 100+9*20=280 / 300+9*40=660 ms; one failure
    results = [result(0), result(1, ttft=0.3, itl=0.04), result(2, status="http_500")]
    s = summarize(results, duration=2.0, slo_ms={"ttft": 200.0, "tpot": 50.0})
    assert (s["completed"], s["failed"], s["total_input_tokens"], s["total_output_tokens"]) == (2, 1, 20, 20)
    assert (
        s["request_throughput"] == 1.0
        and s["output_throughput"] == 10.0
        and s["total_token_throughput"] == 20
    )
    assert s["mean_ttft_ms"] == pytest.approx(200.0) and s["std_ttft_ms"] == pytest.approx(100.0)
    assert s["mean_tpot_ms"] == pytest.approx(30.0) and s["median_itl_ms"] == pytest.approx(30.0)
    assert s["p99_e2el_ms"] == pytest.approx(280 + 0.99 * 380)
    assert s["request_goodput"] == 0.5  # only the first meets TTFT <= 200 ms
    assert summarize(results, 2.0, {"e2el": 700.0})["request_goodput"] == 1.0
    assert summarize(results, 2.0, {})["request_goodput"] is None
    one_token = result(3, num_out=1)
    assert one_token.tpot == 0.0 and summarize([one_token], 1.0, {})["mean_tpot_ms"] == 0.0


def test_jain_and_max_min_shares_by_hand() -> None:
    assert jain_index([1, 1, 1, 1]) == 1.0
    assert jain_index([1, 0]) == 0.5
    assert jain_index([2, 1]) == pytest.approx(9 / 10)
    assert jain_index([]) is None and jain_index([0, 0]) is None
    assert max_min_shares({"a": 10, "b": 100, "c": 50}, 90) == {"a": 10, "b": 40, "c": 40}
    assert max_min_shares({"a": 10, "b": 20}, 100) == {"a": 10, "b": 20}


def test_fairness_fcfs_vs_interleaved() -> None:
    # FCFS: a's chunks at t = 1..10 s, b's at 11..20 s; each serves 10 prompt + 10 output = 20 tokens.
    # Half of 40 tokens is served at t = 10: S = (20, 0), D = (20, 20), fair shares of 20 = (10, 10),
    # x = (2, 0) → Jain = 4 / (2·4) = 0.5. At the end everyone got all: 1.
    fcfs = [result(0, "a", ttft=1.0, itl=1.0), result(1, "b", ttft=11.0, itl=1.0)]
    f = tenant_fairness(fcfs)
    assert f["fairness_horizon_s"] == pytest.approx(10.0)
    assert f["per_tenant"]["a"]["normalized_service"] == pytest.approx(2.0)
    assert f["per_tenant"]["b"]["normalized_service"] == 0.0
    assert f["jain_index"] == pytest.approx(0.5) and f["jain_index_final"] == pytest.approx(1.0)
    # interleaved: a at 1, 3, 5, ...; b at 2, 4, 6, ...: by t = 2 both have 11 tokens → equal → 1
    fair = [result(0, "a", ttft=1.0, itl=2.0), result(1, "b", ttft=2.0, itl=2.0)]
    assert tenant_fairness(fair)["jain_index"] == pytest.approx(1.0)
    # a failed tenant got nothing: final completion ratios (1, 0) → 0.5
    failed = [result(0, "a"), result(1, "b", status="429")]
    assert tenant_fairness(failed)["jain_index_final"] == pytest.approx(0.5)


def test_app_completion_time() -> None:
    results = [
        result(0, app_id="x", start=0.0),  # ends at 0.28
        result(1, app_id="x", start=1.0),  # ends at 1.28
        result(2, app_id="y", start=0.5),  # ends at 0.78
        result(3),  # no app
    ]
    apps = app_completion(results)
    assert apps["per_app"] == pytest.approx({"x": 1.28, "y": 0.28})
    assert apps["mean"] == pytest.approx(0.78) and apps["max"] == pytest.approx(1.28)


def test_report_has_every_field_and_renders() -> None:
    results = [result(0, "a", app_id="x"), result(1, "b", app_id="y"), result(2, "b", status="429")]
    results[2].num_429 = 1
    report = build_report(results, 1.0, {"ttft": 150.0}, {"workload": "unit"})
    for key in [
        *VLLM_KEYS,
        "per_tenant",
        "per_app",
        "per_slo_class",
        "app_completion_s",
        "jain_index",
        "num_429",
    ]:
        assert key in report, key
    assert report["num_429"] == 1 and report["per_tenant"]["b"]["failed"] == 1
    assert set(report["per_app"]) == {"x", "y"} and set(report["per_slo_class"]) == {"interactive"}
    assert report["per_tenant"]["a"]["service"]["normalized_service_final"] == 1.0
    table = format_table(report)
    assert "Successful requests:" in table and "per_tenant" in table
