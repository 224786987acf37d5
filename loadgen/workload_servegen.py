"""The `servegen` workload: a multi-tenant mix from ServeGen's per-client characterisation (data/GUIDE.md §2.3).

Tenants are the --num-tenants (default 8) busiest language clients of one 600-s window (--servegen-window-s,
default 0) that have a length summary; tenant id "<pool>-<client_id>". Each tenant is a renewal process with its
recorded rate and its fitted gap distribution's shape (Gamma a or Weibull c; arrivals.renewal_gaps), so rate skew
and per-client burstiness are kept. Rates are recorded ÷ time_scale, or, with --rate R, rescaled so that they sum
to R with the same shares. The window's parameters are held for the whole run.

Lengths: a lognormal through the tenant's recorded (p50, p90), clipped to [1, p99]; then scaled into the context
by one factor for all tenants: budget / the largest p99 among them.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from loadgen import arrivals
from loadgen.datasets import (
    STREAM_ARRIVALS,
    STREAM_LENGTHS,
    STREAM_PROMPTS,
    WorkloadConfig,
    data_file,
    read_csv,
)
from loadgen.plan import DEFAULT_SLO_CLASS, PlannedRequest, Workload
from loadgen.synthetic import PromptMaker, fit_lengths

WINDOWS_FILE = "servegen_client_windows.csv"
LENGTHS_FILE = "servegen_client_lengths.csv"
CATEGORY = "language"
DEFAULT_NUM_TENANTS = 8
Z90 = 1.2815515655446004  # standard normal 0.9 quantile


def read_tenants(config: WorkloadConfig) -> list[dict[str, str]]:
    """Window rows of the busiest clients with a length summary, busiest first, each joined with the length
    row of the latest 6-h window starting at or before the rate window (else the client's first)."""
    by_client: dict[tuple[str, str], list[dict[str, str]]] = {}
    for row in read_csv(data_file(config, LENGTHS_FILE)):
        if row["category"] == CATEGORY:
            by_client.setdefault((row["pool"], row["client_id"]), []).append(row)
    lengths = {key: _length_row(rows, config.servegen_window_s) for key, rows in by_client.items()}
    window = str(config.servegen_window_s)
    rows = [
        r
        for r in read_csv(data_file(config, WINDOWS_FILE))
        if r["window_start_s"] == window and r["category"] == CATEGORY and float(r["rate_rps"]) > 0
    ]
    if not rows:
        raise ValueError(
            f"no ServeGen window starts at {config.servegen_window_s} s (windows are 600 s apart)"
        )
    rows = [r for r in rows if (r["pool"], r["client_id"]) in lengths]
    rows.sort(key=lambda r: (-float(r["rate_rps"]), r["pool"], int(r["client_id"])))
    chosen = rows[: config.num_tenants or DEFAULT_NUM_TENANTS]
    return [{**lengths[r["pool"], r["client_id"]], **r} for r in chosen]


def _length_row(rows: list[dict[str, str]], window_s: int) -> dict[str, str]:
    before = [r for r in rows if int(r["window_start_s"]) <= window_s]
    if before:
        return max(before, key=lambda r: int(r["window_start_s"]))
    return min(rows, key=lambda r: int(r["window_start_s"]))


def tenant_name(row: dict[str, str]) -> str:
    return f"{row['pool']}-{row['client_id']}"


def merged_arrivals(
    tenants: list[dict[str, str]], rates: list[float], num: int, config: WorkloadConfig
) -> list[tuple[float, int]]:
    """The first `num` arrivals of all tenants' renewal processes merged: (time s, tenant index), time-sorted.
    Each tenant has its own random stream; its first arrival is one gap after 0 (no synchronized start)."""
    rngs = [np.random.default_rng((config.seed, STREAM_ARRIVALS, i)) for i in range(len(tenants))]
    dists = [(row["iat_dist"].lower(), float(row["iat_param1"])) for row in tenants]

    def gap(i: int) -> float:
        return float(arrivals.renewal_gaps(1, rates[i], dists[i][0], dists[i][1], rngs[i])[0])

    heap = [(gap(i), i) for i in range(len(tenants))]
    heapq.heapify(heap)
    out = []
    while len(out) < num:
        t, i = heapq.heappop(heap)
        out.append((t, i))
        heapq.heappush(heap, (t + gap(i), i))
    return out


def sample_length(row: dict[str, str], side: str, rng: np.random.Generator) -> float:
    """A lognormal through (p50, p90) of `side` ("in" or "out"), clipped to [1, p99]."""
    p50, p90, top = (max(1.0, float(row[f"{side}_{q}"])) for q in ("p50", "p90", "p99"))
    sigma = max(0.0, math.log(max(p90, p50) / p50) / Z90)
    return min(top, max(1.0, float(rng.lognormal(math.log(p50), sigma))))


def build_servegen(config: WorkloadConfig) -> Workload:
    tenants = read_tenants(config)
    recorded = [float(r["rate_rps"]) for r in tenants]
    factor = config.rate / sum(recorded) if config.rate is not None else 1.0 / config.time_scale
    rates = [r * factor for r in recorded]
    fit = fit_lengths(
        max(float(r["in_p99"]) for r in tenants),
        max(float(r["out_p99"]) for r in tenants),
        config.max_model_len,
        config.input_scale,
        config.output_scale,
        config.max_tokens,
    )
    schedule = merged_arrivals(tenants, rates, config.num_requests, config)
    t0 = schedule[0][0]
    length_rng = config.rng(STREAM_LENGTHS)
    maker = PromptMaker(config.prompt_format, config.vocab_size, config.rng(STREAM_PROMPTS))
    requests = []
    for index, (t, i) in enumerate(schedule):
        num_prompt = fit.input(sample_length(tenants[i], "in", length_rng))
        requests.append(
            PlannedRequest(
                index=index,
                offset_s=t - t0,
                prompt=maker.render(maker.fresh(num_prompt)),
                num_prompt_tokens=num_prompt,
                max_tokens=fit.output(sample_length(tenants[i], "out", length_rng)),
                ignore_eos=True,
                tenant=tenant_name(tenants[i]),
                slo_class=config.slo_class or DEFAULT_SLO_CLASS,
            )
        )
    info = {
        "source": [WINDOWS_FILE, LENGTHS_FILE],
        "window_start_s": config.servegen_window_s,
        "length_fit": fit.to_dict(),
        "rate_factor": factor,
        "tenants": {
            tenant_name(row): {
                "recorded_rate_rps": recorded[i],
                "rate_rps": rates[i],
                "iat_dist": row["iat_dist"],
                "iat_shape": float(row["iat_param1"]),
                "iat_cv": float(row["iat_cv"]),
            }
            for i, row in enumerate(tenants)
        },
    }
    return Workload("servegen", tuple(requests), info)
