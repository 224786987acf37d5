"""Metrics of a run, with `vllm bench serve`'s JSON key names, plus per-tenant/app/SLO-class views and fairness.

Per request (client.RequestResult): TTFT = first chunk with choices − send; ITL = gaps between such chunks;
E2EL = last chunk − send; TPOT = (E2EL − TTFT) / (output_tokens − 1), for requests with more than one output
token. Aggregates are over completed requests: mean, median, std (population), p50/p90/p99 in ms (numpy
linear percentiles; 0 when empty). duration = run start → last request done; throughputs divide by it (per
group too, so groups' throughputs add up). Goodput: a completed request is good if it meets every given SLO
(TTFT, TPOT, E2EL ≤ the given ms); request_goodput = good / duration (null without --goodput).

App completion time (per app id): last end of its requests − first send. Fairness: see `tenant_fairness`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from loadgen.client import RequestResult

PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")


def latency_stats(name: str, values_s: Iterable[float]) -> dict[str, float]:
    ms = np.asarray(list(values_s), dtype=np.float64) * 1000.0
    if ms.size == 0:
        ms = np.zeros(1)
    out = {
        f"mean_{name}_ms": float(ms.mean()),
        f"median_{name}_ms": float(np.median(ms)),
        f"std_{name}_ms": float(ms.std()),
    }
    out.update({f"p{p}_{name}_ms": float(np.percentile(ms, p)) for p in PERCENTILES})
    return out


def is_good(r: RequestResult, slo_ms: dict[str, float]) -> bool:
    values = {"ttft": r.ttft, "tpot": r.tpot, "e2el": r.e2e}
    return r.ok and all(values[k] * 1000.0 <= limit for k, limit in slo_ms.items())


def summarize(results: list[RequestResult], duration: float, slo_ms: dict[str, float]) -> dict[str, Any]:
    """The `vllm bench serve` metrics of `results` over `duration` s."""
    ok = [r for r in results if r.ok]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    duration = max(duration, 1e-9)
    summary: dict[str, Any] = {
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "num_429": sum(r.num_429 for r in results),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "request_goodput": sum(is_good(r, slo_ms) for r in ok) / duration if slo_ms else None,
    }
    summary.update(latency_stats("ttft", (r.ttft for r in ok)))
    summary.update(latency_stats("tpot", (r.tpot for r in ok if r.output_tokens > 1)))
    summary.update(latency_stats("itl", (x for r in ok for x in r.itl)))
    summary.update(latency_stats("e2el", (r.e2e for r in ok)))
    return summary


def group_by(
    results: list[RequestResult], key: Callable[[RequestResult], str]
) -> dict[str, list[RequestResult]]:
    groups: dict[str, list[RequestResult]] = {}
    for r in results:
        groups.setdefault(key(r), []).append(r)
    return dict(sorted(groups.items()))


def app_completion(results: list[RequestResult]) -> dict[str, Any]:
    """Per app id (requests without one are skipped): last end − first send, s; and mean/p50/p99/max."""
    per_app = {
        app: max(r.end_s for r in rs) - min(r.start_s for r in rs)
        for app, rs in group_by([r for r in results if r.app_id], lambda r: r.app_id).items()
    }
    times = np.asarray(list(per_app.values()), dtype=np.float64)
    stats = (
        {"mean": float(times.mean()), "p50": float(np.median(times)), "p99": float(np.percentile(times, 99))}
        if times.size
        else {"mean": None, "p50": None, "p99": None}
    )
    return {**stats, "max": float(times.max()) if times.size else None, "per_app": per_app}


def jain_index(values: Iterable[float]) -> float | None:
    """(Σx)² / (n·Σx²): 1 when all equal, 1/n when one gets everything; None when undefined."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0 or not np.any(x):
        return None
    return float(x.sum() ** 2 / (x.size * (x**2).sum()))


def max_min_shares(demands: dict[str, float], capacity: float) -> dict[str, float]:
    """Water-filling: the max-min fair split of `capacity` among `demands` (no one gets more than it asks)."""
    shares: dict[str, float] = {}
    left = capacity
    ordered = sorted(demands.items(), key=lambda kv: kv[1])
    for k, (name, demand) in enumerate(ordered):
        shares[name] = min(demand, left / (len(ordered) - k))
        left -= shares[name]
    return shares


def token_events(r: RequestResult) -> list[tuple[float, float]]:
    """(time s, tokens) served to `r`: its prompt at the first token, then each chunk's share of the output."""
    times = r.chunk_times()
    if not times:
        return []
    per_chunk = (r.output_tokens / len(times)) if r.ok else 1.0
    return [(times[0], r.prompt_tokens + per_chunk)] + [(t, per_chunk) for t in times[1:]]


def tenant_fairness(results: list[RequestResult]) -> dict[str, Any]:
    """Jain's index over tenants' normalized service at the half-service time.

    Tenant i by time t: demand D_i(t) = Σ (prompt + max_tokens) of its requests sent by t; service S_i(t) =
    tokens served to it by t (each prompt counted when its first token arrives, output tokens as they stream).
    The horizon T½ is the first time by which half of all tokens served in the run had been served. With
    C = Σ_i S_i(T½), a_i is tenant i's max-min fair share of C given the demands D_i(T½) (water-filling: a
    tenant that asks for less than an equal split gets all it asked for; the rest is split equally). The
    normalized service is x_i = S_i(T½) / a_i: 1 for every tenant exactly when service was max-min fair, in
    particular 1 for a tenant that got all it asked for. jain_index = (Σx)² / (n Σx²) over tenants with
    D_i(T½) > 0. jain_index_final is the same at the end of the run (x_i = S_i / D_i, a completion ratio: < 1
    only when requests failed, were rejected or stopped early).
    """
    events = sorted((t, tok, r.tenant) for r in results for t, tok in token_events(r))
    total = sum(tok for _, tok, _ in events)
    horizon = None
    served_so_far = 0.0
    for t, tok, _ in events:
        served_so_far += tok
        if served_so_far >= total / 2:
            horizon = t
            break
    tenants = sorted({r.tenant for r in results})
    per_tenant: dict[str, dict[str, float]] = {
        name: {"demanded_tokens": 0.0, "served_tokens": 0.0, "demanded_at_half": 0.0, "served_at_half": 0.0}
        for name in tenants
    }
    for r in results:
        per_tenant[r.tenant]["demanded_tokens"] += r.demanded_tokens
        if horizon is not None and r.start_s <= horizon:
            per_tenant[r.tenant]["demanded_at_half"] += r.demanded_tokens
    for t, tok, name in events:
        per_tenant[name]["served_tokens"] += tok
        if horizon is not None and t <= horizon:
            per_tenant[name]["served_at_half"] += tok
    active = {n: s["demanded_at_half"] for n, s in per_tenant.items() if s["demanded_at_half"] > 0}
    shares = max_min_shares(active, sum(per_tenant[n]["served_at_half"] for n in active))
    for name, s in per_tenant.items():
        s["fair_share_at_half"] = shares.get(name, 0.0)
        s["normalized_service"] = s["served_at_half"] / shares[name] if shares.get(name) else None
        s["normalized_service_final"] = (
            s["served_tokens"] / s["demanded_tokens"] if s["demanded_tokens"] else None
        )
    return {
        "jain_index": jain_index(
            s["normalized_service"] or 0.0 for n, s in per_tenant.items() if n in active
        ),
        "jain_index_final": jain_index(s["normalized_service_final"] or 0.0 for s in per_tenant.values()),
        "fairness_horizon_s": horizon,
        "per_tenant": per_tenant,
    }


def build_report(
    results: list[RequestResult], duration: float, slo_ms: dict[str, float], meta: dict[str, Any]
) -> dict[str, Any]:
    """The whole JSON: run metadata, the overall metrics, per tenant / app / SLO class, apps, fairness."""
    report = {**meta, "duration": duration, "goodput_slo_ms": slo_ms or None}
    report.update(summarize(results, duration, slo_ms))
    fairness = tenant_fairness(results)
    views = {
        "per_tenant": lambda r: r.tenant,
        "per_app": lambda r: r.app_id,
        "per_slo_class": lambda r: r.slo_class,
    }
    for view, key in views.items():
        chosen = [r for r in results if key(r)]  # per_app: requests without an app id are in no app
        report[view] = {name: summarize(rs, duration, slo_ms) for name, rs in group_by(chosen, key).items()}
    for name, service in fairness["per_tenant"].items():
        report["per_tenant"][name]["service"] = service
    report["app_completion_s"] = app_completion(results)
    report["jain_index"] = fairness["jain_index"]
    report["jain_index_final"] = fairness["jain_index_final"]
    report["fairness_horizon_s"] = fairness["fairness_horizon_s"]
    return report


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def format_table(report: dict[str, Any]) -> str:
    """The terminal summary: vllm bench serve's block, then one line per tenant / app / SLO class."""
    width = 60
    lines = [f"{' Serving Benchmark Result (' + report['workload'] + ') ':=^{width}}"]

    def row(name: str, value: Any) -> None:
        lines.append(f"{name:<44}{_fmt(value):>16}")

    row("Successful requests:", report["completed"])
    row("Failed requests:", report["failed"])
    row("HTTP 429 responses:", report["num_429"])
    row("Benchmark duration (s):", report["duration"])
    row("Total input tokens:", report["total_input_tokens"])
    row("Total generated tokens:", report["total_output_tokens"])
    row("Request throughput (req/s):", report["request_throughput"])
    if report["goodput_slo_ms"]:
        slo = ", ".join(f"{k}<={v:g}ms" for k, v in report["goodput_slo_ms"].items())
        row(f"Request goodput ({slo}):", report["request_goodput"])
    row("Output token throughput (tok/s):", report["output_throughput"])
    row("Total token throughput (tok/s):", report["total_token_throughput"])
    for metric, title in zip(
        LATENCY_METRICS,
        (
            "Time to First Token",
            "Time per Output Token (excl. 1st token)",
            "Inter-token Latency",
            "End-to-end Latency",
        ),
        strict=True,
    ):
        lines.append(f"{title:-^{width}}")
        row(f"Mean {metric.upper()} (ms):", report[f"mean_{metric}_ms"])
        row(f"Median {metric.upper()} (ms):", report[f"median_{metric}_ms"])
        for p in PERCENTILES[1:]:
            row(f"P{p} {metric.upper()} (ms):", report[f"p{p}_{metric}_ms"])
    lines.append(f"{'Fairness and applications':-^{width}}")
    row("Jain's index over tenants (at T1/2):", report["jain_index"])
    row("Jain's index over tenants (final):", report["jain_index_final"])
    apps = report["app_completion_s"]
    row("Apps:", len(apps["per_app"]))
    row("App completion mean / p99 (s):", f"{_fmt(apps['mean'])} / {_fmt(apps['p99'])}")
    lines.append("=" * width)
    for view in ("per_tenant", "per_slo_class", "per_app"):
        groups = report[view]
        if len(groups) < 2 and view != "per_slo_class":
            continue
        lines.append(
            f"{view:<22}{'ok':>6}{'fail':>6}{'p50 TTFT':>10}{'p99 TTFT':>10}{'p50 TPOT':>10}{'p99 E2E':>10}{'good/s':>8}"
        )
        for name, s in list(groups.items())[:20]:
            lines.append(
                f"{name[:21]:<22}{s['completed']:>6}{s['failed']:>6}{s['median_ttft_ms']:>10.1f}"
                f"{s['p99_ttft_ms']:>10.1f}{s['median_tpot_ms']:>10.1f}{s['p99_e2el_ms']:>10.1f}"
                f"{_fmt(s['request_goodput']):>8}"
            )
        if len(groups) > 20:
            lines.append(f"... {len(groups) - 20} more in the JSON")
    return "\n".join(lines)
