"""Mixed-class workloads for QLM (DESIGN §8 E2): Azure conv as the interactive class plus a batch class.

mixed-code      interactive = azure-conv, batch = azure-code (long prompts, short outputs, extremely bursty)
mixed-sharegpt  interactive = azure-conv, batch = ShareGPT first turns (real prompts and lengths)

Arrivals:
  trace timing (no --rate)  both Azure traces replayed from their starts (times `time_scale`) and merged; the first
                            N arrivals of the merged stream. Conv is close to Poisson, code is the bursty trace
                            (data/GUIDE.md §2.1: IAT CV 12.8), so batch work lands in bursts. For mixed-sharegpt
                            the batch requests take the code trace's send times with ShareGPT's lengths.
  --rate R (--burstiness k) one gamma (k = 1: Poisson) process at R req/s; each arrival is interactive with the
                            probability of the two traces' own rate ratio (conv 5.9 req/s : code 3.2 req/s, 0.65),
                            seeded on its own stream, so the class mix is the same in both modes.

Each class's requests are built by its own builder (same seed, same length fit), so a mixed plan's conv part is
the azure-conv plan's prefix; every request is tagged with its class (X-SLO-Class), whatever --slo-class says.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from loadgen import arrivals
from loadgen.datasets import STREAM_ARRIVALS, WorkloadConfig, data_file, read_csv
from loadgen.plan import Workload

STREAM_CLASSES = (
    4  # the class draw has its own seed stream (datasets.py uses 0-3 for the others; 3 is lengths)
)
INTERACTIVE, BATCH = "interactive", "batch"
CONV_FILE, CODE_FILE = "azure2023_conv.csv", "azure2023_code.csv"


def trace_times(config: WorkloadConfig, file_name: str) -> list[float]:
    return [float(r["timestamp_s"]) for r in read_csv(data_file(config, file_name))]


def interactive_share(conv_times: list[float], code_times: list[float]) -> float:
    """The conv trace's share of the two traces' mean request rates (requests / recorded span)."""
    conv_rate = len(conv_times) / (max(conv_times) - min(conv_times))
    code_rate = len(code_times) / (max(code_times) - min(code_times))
    return conv_rate / (conv_rate + code_rate)


def plan_classes(config: WorkloadConfig) -> tuple[list[str], list[float], float | None]:
    """Each arrival's class and send offset, in send order, and the interactive share drawn with (None: trace
    timing, where the traces decide)."""
    conv_times, code_times = trace_times(config, CONV_FILE), trace_times(config, CODE_FILE)
    n = config.num_requests
    if config.rate is None:
        merged = sorted(
            [(t - conv_times[0], INTERACTIVE) for t in conv_times]
            + [(t - code_times[0], BATCH) for t in code_times]
        )[:n]
        if len(merged) < n:
            raise ValueError(f"asked for {n} requests, the two traces have {len(merged)}")
        return [c for _, c in merged], arrivals.replay([t for t, _ in merged], config.time_scale), None
    share = interactive_share(conv_times, code_times)
    draws = config.rng(STREAM_CLASSES).random(n)
    classes = [INTERACTIVE if u < share else BATCH for u in draws.tolist()]
    return classes, arrivals.schedule(n, config.rate, config.burstiness, config.rng(STREAM_ARRIVALS)), share


def build_mixed(config: WorkloadConfig, batch_workload: str) -> Workload:
    from loadgen.workloads import build_azure_code, build_azure_conv, build_sharegpt

    classes, offsets, share = plan_classes(config)
    num_interactive = classes.count(INTERACTIVE)
    per_class = replace(config, rate=None, slo_class=None)
    conv = build_azure_conv(replace(per_class, num_requests=num_interactive))
    build_batch = build_azure_code if batch_workload == "azure-code" else build_sharegpt
    batch = build_batch(replace(per_class, num_requests=len(classes) - num_interactive))
    pools = {INTERACTIVE: iter(conv.requests), BATCH: iter(batch.requests)}
    requests = tuple(
        replace(next(pools[slo_class]), index=i, offset_s=offsets[i], slo_class=slo_class, after=None)
        for i, slo_class in enumerate(classes)
    )
    info = {
        "interactive": {"workload": "azure-conv", "num_requests": num_interactive, **conv.info},
        "batch": {"workload": batch_workload, "num_requests": len(batch.requests), **batch.info},
        "arrivals": "trace (conv + code timestamps merged)"
        if config.rate is None
        else f"gamma rate {config.rate:g} burstiness {config.burstiness:g}",
        "interactive_share": share,
        "time_scale": config.time_scale,
    }
    return Workload(f"mixed-{batch_workload.removeprefix('azure-')}", requests, info)


def build_mixed_code(config: WorkloadConfig) -> Workload:
    return build_mixed(config, "azure-code")


def build_mixed_sharegpt(config: WorkloadConfig) -> Workload:
    return build_mixed(config, "sharegpt")


def class_counts(workload: Workload) -> dict[str, int]:
    """Requests per SLO class."""
    return dict(Counter(r.slo_class for r in workload.requests))
