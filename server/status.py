"""GET /status: the engine's last pushed stats plus rolling aggregates over the last minutes, as one JSON body.

`RollingWindow` cuts time into 1-second buckets kept for 5 minutes (a ring). The server adds latency samples as
requests run (TTFT, TPOT, e2e, engine queue time) and, once a second, the engine's cumulative totals, whose increments become
per-second rates (tokens/s, preemptions/s). `status_body` only reads what is already here: it never waits on
the engine, so the page keeps answering while the engine is busy, loading or gone.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from engine.protocol import EngineStats, QueueStat, Ready

LATENCIES = ("ttft", "tpot", "e2e", "queue")  # seconds; one sample per request
PERCENTILES = (50, 90, 99)
SUMMARY_WINDOWS_S = (60, 300)
_TOTALS = {  # rate series name -> the EngineStats cumulative total it is the increment of
    "prompt_tokens": "num_prompt_tokens_total",
    "generation_tokens": "num_generation_tokens_total",
    "preemptions": "num_preemptions_total",
}


@dataclass
class _Bucket:
    index: int = -1  # int(time / bucket_s) of the second this bucket holds; -1 = never used
    samples: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in LATENCIES})
    num_seen: Counter[str] = field(default_factory=Counter)  # samples offered, for reservoir sampling
    counts: Counter[str] = field(default_factory=Counter)  # finished requests and engine increments


class RollingWindow:
    """Per-second buckets over the last `num_buckets` seconds. Each bucket keeps at most
    `max_samples_per_bucket` samples of each latency (a uniform reservoir), so memory is bounded at any rate."""

    def __init__(
        self, bucket_s: float = 1.0, num_buckets: int = 300, max_samples_per_bucket: int = 512, seed: int = 0
    ) -> None:
        self.bucket_s = bucket_s
        self.num_buckets = num_buckets
        self.max_samples_per_bucket = max_samples_per_bucket
        self._buckets = [_Bucket() for _ in range(num_buckets)]
        self._rng = random.Random(seed)
        self._last_totals: dict[str, int] | None = None
        self._last_stats_time: float | None = None
        self.finished_by_reason: Counter[str] = Counter()  # since start, as clients saw them

    # ---- recording -------------------------------------------------------------------------------------------

    def _bucket(self, now: float) -> _Bucket:
        index = int(now // self.bucket_s)
        slot = index % self.num_buckets
        if self._buckets[slot].index != index:  # it held a second that has left the window
            self._buckets[slot] = _Bucket(index)
        return self._buckets[slot]

    def add_latency(self, name: str, seconds: float, now: float) -> None:
        bucket = self._bucket(now)
        samples = bucket.samples[name]
        bucket.num_seen[name] += 1
        if len(samples) < self.max_samples_per_bucket:
            samples.append(seconds)
        elif (slot := self._rng.randrange(bucket.num_seen[name])) < len(samples):
            samples[slot] = seconds

    def add_finished(self, finish_reason: str, now: float) -> None:
        self._bucket(now).counts["finished"] += 1
        self.finished_by_reason[finish_reason] += 1

    def add_engine_stats(self, stats: EngineStats, now: float) -> None:
        """Book the increments of the engine's totals since the last call into the bucket of `now`.
        The same stats twice (the engine pushed nothing new) adds nothing."""
        if stats.timestamp == self._last_stats_time:
            return
        totals = {name: getattr(stats, total) for name, total in _TOTALS.items()}
        if self._last_totals is not None:
            bucket = self._bucket(now)
            for name, value in totals.items():
                bucket.counts[name] += max(0, value - self._last_totals[name])
        self._last_totals, self._last_stats_time = totals, stats.timestamp

    # ---- reading ---------------------------------------------------------------------------------------------

    def _recent(self, now: float, window_s: float) -> list[_Bucket]:
        """Buckets of the last `window_s` seconds up to `now`, oldest first, empty ones for seconds without data."""
        last = int(now // self.bucket_s)
        first = last - min(self.num_buckets, math.ceil(window_s / self.bucket_s)) + 1
        out = []
        for index in range(first, last + 1):
            bucket = self._buckets[index % self.num_buckets]
            out.append(bucket if bucket.index == index else _Bucket(index))
        return out

    def summary(self, now: float, window_s: float) -> dict[str, Any]:
        """Percentiles of each latency, request rate and token rates over the last `window_s` seconds."""
        buckets = self._recent(now, window_s)
        span = len(buckets) * self.bucket_s
        out: dict[str, Any] = {"window_s": span}
        for name in LATENCIES:
            values = sorted(v for b in buckets for v in b.samples[name])
            out[name] = {
                "count": sum(b.num_seen[name] for b in buckets),
                **{f"p{p}": percentile(values, p) for p in PERCENTILES},
            }
        for name in ("finished", *_TOTALS):
            total = sum(b.counts[name] for b in buckets)
            out[f"{name}_total"] = total
            out[f"{name}_per_s"] = total / span
        return out

    def series(self, now: float) -> dict[str, Any]:
        """One value per second over the whole window, oldest first: counts per second, and the p90 of each
        latency among the requests of that second (None where there were none)."""
        buckets = self._recent(now, self.num_buckets * self.bucket_s)
        out: dict[str, Any] = {"bucket_s": self.bucket_s, "end": buckets[-1].index * self.bucket_s}
        for name in ("finished", *_TOTALS):
            out[name] = [b.counts[name] / self.bucket_s for b in buckets]
        for name in LATENCIES:
            out[f"{name}_p90"] = [percentile(sorted(b.samples[name]), 90) for b in buckets]
        return out


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not sorted_values:
        return None
    rank = (len(sorted_values) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


# ---- the /status body ------------------------------------------------------------------------------------------


_QUEUE_COUNTS = ("num_waiting", "num_running", "num_kv_blocks")


def queue_tables(queues: Iterable[QueueStat]) -> dict[str, list[dict[str, Any]]]:
    """The engine's (tenant, app, class) groups, and their sums per tenant, app and class; most requests first."""
    rows = [dataclasses.asdict(q) for q in queues]
    return {
        "by_group": rows,
        "by_tenant": _sum_by(rows, "tenant"),
        "by_app": _sum_by(rows, "app_id"),
        "by_class": _sum_by(rows, "slo_class"),
    }


def _sum_by(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    sums: dict[str, dict[str, Any]] = {}
    for row in rows:
        total = sums.setdefault(row[key], {key: row[key], **dict.fromkeys(_QUEUE_COUNTS, 0)})
        for name in _QUEUE_COUNTS:
            total[name] += row[name]
    return sorted(sums.values(), key=lambda r: (-r["num_waiting"] - r["num_running"], r[key]))


def kv_pool(stats: EngineStats) -> dict[str, int]:
    """free + cached + used = total: `free` holds nothing, `cached` is free but still a prefix-cache hit."""
    return {
        "total": stats.num_total_blocks,
        "used": stats.num_total_blocks - stats.num_free_blocks,
        "cached": stats.num_cached_free_blocks,
        "free": stats.num_free_blocks - stats.num_cached_free_blocks,
    }


REPLICA_MODES = ("single", "data_parallel", "pipeline")


def replica_mode(stats: EngineStats) -> str:
    """single: one replica; data_parallel: every group is one replica; pipeline: a group spans several
    (after a KunServe parameter drop)."""
    if not stats.replica_groups:
        return "single"
    return "pipeline" if any(len(g) > 1 for g in stats.replica_groups) else "data_parallel"


def status_body(
    *,
    model_name: str,
    state: str,
    ready: Ready | None,
    stats: EngineStats | None,
    window: RollingWindow,
    now: float,
    started_at: float,
) -> dict[str, Any]:
    """Everything the status page shows. `state`: "ok", or why the server cannot serve yet."""
    body: dict[str, Any] = {
        "time": now,
        "state": state,
        "uptime_s": now - started_at,
        "model": model_name,
        "engine_info": dataclasses.asdict(ready) if ready else None,
        "engine": None,
        "kv": None,
        "replicas": None,
        "batch": None,
        "queues": queue_tables(()),
        "summary": {f"{int(w)}s": window.summary(now, w) for w in SUMMARY_WINDOWS_S},
        "series": window.series(now),
        "finished_by_reason": dict(window.finished_by_reason),
    }
    if stats is not None:
        engine = {k: v for k, v in dataclasses.asdict(stats).items() if k not in ("queues", "batch")}
        body["engine"] = {**engine, "age_s": max(0.0, now - stats.timestamp)}
        body["kv"] = kv_pool(stats)
        body["replicas"] = {"mode": replica_mode(stats), "groups": stats.replica_groups}
        body["batch"] = dataclasses.asdict(stats.batch)
        body["queues"] = queue_tables(stats.queues)
    return body
