"""Prometheus `/metrics`: vLLM's series names (so vLLM dashboards and routers read Kairos unchanged), tenant and
SLO-class labels where they fit, and Kairos's own series.

Two sources. Engine series (gauges, and counters of the engine's cumulative totals) are read at scrape time from
the last pushed EngineStats by `EngineStatsCollector`: exact, and never double-counted. Per-request series are
observed here as requests run: generation.py calls `Metrics` as its RequestObserver (first token, each later
token, finish), which also feeds the status page's RollingWindow. Each app owns its CollectorRegistry; nothing
is global. Tenant labels are capped (the first `max_tenants` seen, then "other"); app ids are unbounded, so they
stay out of Prometheus and appear on the status page only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.protocol import EngineStats
from server.admission import REJECT_REASONS
from server.status import REPLICA_MODES, RollingWindow, kv_pool, replica_mode

if TYPE_CHECKING:
    from server.generation import Generation

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what vLLM's /metrics answers
MAX_TENANTS = 64

# vLLM's buckets (v1/metrics/loggers.py), seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
FINISH_REASONS = ("stop", "length", "abort", "error")
_COMPLETED = ("stop", "length")  # latency and length histograms count only requests that ran to their end


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, … up to max_value (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class LabelCap:
    """Bounds a label's cardinality: the first `max_values` distinct values pass, later ones become "other"."""

    def __init__(self, max_values: int, overflow: str = "other") -> None:
        self.max_values = max_values
        self.overflow = overflow
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self.max_values:
            return self.overflow
        self._seen.add(value)
        return value


class Metrics:
    """Per-request series, observed as requests run, plus the engine collector, in one registry.

    `max_model_len` sets the token-count buckets, so this is built once the engine's Ready is known."""

    def __init__(
        self,
        model_name: str,
        max_model_len: int,
        latest_stats: Callable[[], EngineStats | None],
        window: RollingWindow,
        max_tenants: int = MAX_TENANTS,
    ) -> None:
        self.model_name = model_name
        self.window = window
        self.tenant_label = LabelCap(max_tenants)
        self.registry = CollectorRegistry()
        labels = ("model_name", "tenant", "slo_class")

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token (s).", TTFT_BUCKETS)
        self.itl = histogram(
            "vllm:inter_token_latency_seconds", "Time between output tokens (s).", ITL_BUCKETS
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds", "Arrival to last token (s).", REQUEST_LATENCY_BUCKETS
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Engine intake to first scheduled (s).",
            REQUEST_LATENCY_BUCKETS,
        )
        self.tpot = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Per request: (last token - first token) / (output tokens - 1) (s).",
            ITL_BUCKETS,
        )
        token_buckets = buckets_1_2_5(max_model_len)
        self.prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Prompt tokens per request.", token_buckets
        )
        self.generation_tokens = histogram(
            "vllm:request_generation_tokens", "Output tokens per request.", token_buckets
        )
        self.request_success = Counter(
            "vllm:request_success",
            "Finished requests, by the finish reason the client saw.",
            ("model_name", "finished_reason"),
            registry=self.registry,
        )
        for reason in FINISH_REASONS:  # every series exists from the start, so rate() sees the first one
            self.request_success.labels(model_name, reason)
        self.requests = Counter(
            "kairos:requests",
            "Finished requests per tenant and SLO class, by finish reason.",
            (*labels, "finished_reason"),
            registry=self.registry,
        )
        self.requests_rejected = Counter(
            "kairos:requests_rejected",
            "Requests refused with 429 by an admission limit (server/admission.py), by the limit hit.",
            ("model_name", "reason"),
            registry=self.registry,
        )
        for reason in REJECT_REASONS:
            self.requests_rejected.labels(model_name, reason)
        self.engine_restarts = Counter(
            "kairos:engine_restarts",
            "Engine processes spawned again after the engine died (server/supervisor.py).",
            ("model_name",),
            registry=self.registry,
        )
        self.engine_restarts.labels(model_name)
        self.registry.register(EngineStatsCollector(model_name, latest_stats, self.tenant_label))

    def on_rejected(self, reason: str) -> None:
        self.requests_rejected.labels(self.model_name, reason).inc()

    def on_engine_restart(self) -> None:
        self.engine_restarts.labels(self.model_name).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _labels(self, gen: Generation) -> tuple[str, str, str]:
        return self.model_name, self.tenant_label(gen.msg.tenant), gen.msg.slo_class

    # ---- RequestObserver (generation.py) ---------------------------------------------------------------------

    def on_first_token(self, gen: Generation, now: float) -> None:
        labels = self._labels(gen)
        ttft = now - gen.msg.arrival_time
        self.ttft.labels(*labels).observe(ttft)
        self.queue_time.labels(*labels).observe(gen.queue_seconds)
        self.window.add_latency("ttft", ttft, now)
        self.window.add_latency("queue", gen.queue_seconds, now)

    def on_token_gap(self, gen: Generation, gap_s: float) -> None:
        self.itl.labels(*self._labels(gen)).observe(gap_s)

    def on_finish(self, gen: Generation, now: float) -> None:
        labels = self._labels(gen)
        reason = gen.finish_reason
        self.request_success.labels(self.model_name, reason).inc()
        self.requests.labels(*labels, reason).inc()
        self.window.add_finished(reason, now)
        if reason not in _COMPLETED:
            return
        e2e = now - gen.msg.arrival_time
        num_output = gen.output.num_tokens
        self.e2e.labels(*labels).observe(e2e)
        self.prompt_tokens.labels(*labels).observe(len(gen.msg.prompt_token_ids))
        self.generation_tokens.labels(*labels).observe(num_output)
        self.window.add_latency("e2e", e2e, now)
        if num_output > 1 and gen.first_token_time is not None and gen.last_token_time is not None:
            tpot = (gen.last_token_time - gen.first_token_time) / (num_output - 1)
            self.tpot.labels(*labels).observe(tpot)
            self.window.add_latency("tpot", tpot, now)


# (family type, name as declared, help, EngineStats field): vLLM's engine series, one sample each.
_ENGINE_SERIES = (
    (GaugeMetricFamily, "vllm:num_requests_running", "Requests in the running batch.", "num_running"),
    (GaugeMetricFamily, "vllm:num_requests_waiting", "Requests waiting (new or preempted).", "num_waiting"),
    (GaugeMetricFamily, "vllm:kv_cache_usage_perc", "KV blocks in use / all blocks (0..1).", "kv_usage"),
    (CounterMetricFamily, "vllm:prompt_tokens", "Prompt tokens computed (cache hits excluded).",
     "num_prompt_tokens_total"),
    (CounterMetricFamily, "vllm:generation_tokens", "Output tokens generated.", "num_generation_tokens_total"),
    (CounterMetricFamily, "vllm:num_preemptions", "Preemptions (recompute).", "num_preemptions_total"),
    (CounterMetricFamily, "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
     "prefix_cache_queries_total"),
    (CounterMetricFamily, "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
     "prefix_cache_hits_total"),
)  # fmt: skip

# (family type, name, help, EngineStats.extra key): QLM's figures (engine/qlm.py gauges, engine/core.py slo_extra),
# present only under a policy that reports them; a family with no key in `extra` has no sample.
_EXTRA_SERIES = (
    (GaugeMetricFamily, "kairos:qlm_urgent_requests", "Waiting requests the last QLM violation check found urgent.",
     "qlm_urgent_requests"),
    (CounterMetricFamily, "kairos:qlm_violations", "Request groups found urgent (predicted to miss), over all checks.",
     "qlm_violations_total"),
    (GaugeMetricFamily, "kairos:qlm_tokens_per_second", "Generated tokens per busy second (the RWT estimator's Θ).",
     "qlm_tokens_per_s"),
    (GaugeMetricFamily, "kairos:qlm_rwt_pairs", "Estimated-vs-actual wait pairs in the RWT estimator's ring.",
     "qlm_rwt_pairs"),
    (GaugeMetricFamily, "kairos:qlm_rwt_mean_error_seconds",
     "Mean of estimated minus actual wait over the ring (> 0: the estimator is pessimistic).", "qlm_rwt_mean_error_s"),
    (GaugeMetricFamily, "kairos:qlm_rwt_mean_abs_error_seconds", "Mean |estimated - actual wait| over the ring.",
     "qlm_rwt_mean_abs_error_s"),
    (CounterMetricFamily, "kairos:num_swaps", "Preemptions that swapped KV to host memory (not recomputed).",
     "num_swaps_total"),
    (CounterMetricFamily, "kairos:num_evictions", "QLM evictions: lower-class requests preempted for an urgent one.",
     "num_evictions_total"),
    (CounterMetricFamily, "kairos:model_swaps", "QLM model swaps: another model's weights loaded on a replica.",
     "model_swaps_total"),
    (CounterMetricFamily, "kairos:kunserve_drops", "KunServe parameter drops (replicas merged into pipelines).",
     "kunserve_drops_total"),
    (CounterMetricFamily, "kairos:kunserve_restores", "KunServe restores (back to data-parallel replicas).",
     "kunserve_restores_total"),
    (GaugeMetricFamily, "kairos:kunserve_freed_weight_bytes", "Decoder-layer bytes dropped now and serving as KV.",
     "kunserve_freed_weight_bytes"),
)  # fmt: skip


class EngineStatsCollector(Collector):
    """Engine series, from the last EngineStats the engine pushed (nothing before the first)."""

    def __init__(
        self, model_name: str, latest_stats: Callable[[], EngineStats | None], tenant_label: LabelCap
    ) -> None:
        self.model_name = model_name
        self.latest_stats = latest_stats
        self.tenant_label = tenant_label

    def describe(self) -> Iterator[Metric]:
        return self._families(None)

    def collect(self) -> Iterator[Metric]:
        return self._families(self.latest_stats())

    def _families(self, stats: EngineStats | None) -> Iterator[Metric]:
        for kind, name, doc, field in _ENGINE_SERIES:
            family = kind(name, doc, labels=["model_name"])
            if stats is not None:
                family.add_metric([self.model_name], getattr(stats, field))
            yield family
        for kind, name, doc, key in _EXTRA_SERIES:
            family = kind(name, doc, labels=["model_name"])
            if stats is not None and key in stats.extra:
                family.add_metric([self.model_name], stats.extra[key])
            yield family
        yield self._kv_blocks(stats)
        yield from self._replicas(stats)
        yield from self._batch(stats)
        yield from self._queues(stats)

    def _kv_blocks(self, stats: EngineStats | None) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "kairos:kv_blocks",
            "KV blocks by state; free + cached + used = all. cached: free, still holding prefix-cache content.",
            labels=["model_name", "state"],
        )
        if stats is not None:
            pool = kv_pool(stats)
            for state in ("free", "cached", "used"):
                family.add_metric([self.model_name, state], pool[state])
        return family

    def _replicas(self, stats: EngineStats | None) -> Iterator[GaugeMetricFamily]:
        mode = GaugeMetricFamily(
            "kairos:replica_mode",
            "1 for the current replica mode (KunServe), 0 for the others.",
            labels=["model_name", "mode"],
        )
        groups = GaugeMetricFamily(
            "kairos:replica_groups",
            "Replica groups: one per replica, fewer after a parameter drop.",
            labels=["model_name"],
        )
        if stats is not None:
            current = replica_mode(stats)
            for name in REPLICA_MODES:
                mode.add_metric([self.model_name, name], float(name == current))
            groups.add_metric([self.model_name], max(1, len(stats.replica_groups)))
        yield mode
        yield groups

    def _batch(self, stats: EngineStats | None) -> Iterator[GaugeMetricFamily]:
        labels = ["model_name", "phase"]
        requests = GaugeMetricFamily("kairos:batch_requests", "Requests in the current batch.", labels=labels)
        tokens = GaugeMetricFamily("kairos:batch_tokens", "Tokens in the current batch.", labels=labels)
        if stats is not None:
            b = stats.batch
            for phase, num_requests, num_tokens in (
                ("prefill", b.num_prefill_requests, b.num_prefill_tokens),
                ("decode", b.num_decode_requests, b.num_decode_tokens),
            ):
                requests.add_metric([self.model_name, phase], num_requests)
                tokens.add_metric([self.model_name, phase], num_tokens)
        yield requests
        yield tokens

    def _queues(self, stats: EngineStats | None) -> Iterator[GaugeMetricFamily]:
        labels = ["model_name", "tenant", "slo_class"]
        families = {
            "num_waiting": GaugeMetricFamily(
                "kairos:num_requests_waiting_by_tenant",
                "Waiting requests per tenant and class.",
                labels=labels,
            ),
            "num_running": GaugeMetricFamily(
                "kairos:num_requests_running_by_tenant",
                "Running requests per tenant and class.",
                labels=labels,
            ),
            "num_kv_blocks": GaugeMetricFamily(
                "kairos:kv_blocks_by_tenant",
                "KV blocks held per tenant and class (a shared prefix block counts once per holder).",
                labels=labels,
            ),
        }
        sums: dict[tuple[str, str], dict[str, int]] = {}
        for q in stats.queues if stats is not None else ():
            row = sums.setdefault((self.tenant_label(q.tenant), q.slo_class), dict.fromkeys(families, 0))
            for name in families:
                row[name] += getattr(q, name)
        for (tenant, slo_class), row in sorted(sums.items()):
            for name, family in families.items():
                family.add_metric([self.model_name, tenant, slo_class], row[name])
        yield from families.values()
