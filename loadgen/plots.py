"""PNG plots of a run, written next to the JSON: latency CDFs, throughput over time, per-tenant service.

matplotlib (Agg backend) is imported only here, and only when --plot is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from loadgen.client import RequestResult
from loadgen.report import group_by, token_events

MAX_LINES = 8  # more tenants than this: only the total is drawn


def write_plots(results: list[RequestResult], report: dict[str, Any], json_path: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = json_path.with_suffix("")
    paths = [
        _latency_cdfs(plt, results, Path(f"{stem}_latency_cdf.png")),
        _throughput(plt, results, report, Path(f"{stem}_throughput.png")),
        _tenant_service(plt, results, report, Path(f"{stem}_tenants.png")),
    ]
    return paths


def _latency_cdfs(plt: Any, results: list[RequestResult], path: Path) -> Path:
    ok = [r for r in results if r.ok]
    groups = group_by(ok, lambda r: r.slo_class)
    if len(groups) < 2:
        groups = {"all": ok}
    getters = {
        "TTFT": lambda rs: [r.ttft for r in rs],
        "TPOT": lambda rs: [r.tpot for r in rs if r.output_tokens > 1],
        "ITL": lambda rs: [x for r in rs for x in r.itl],
        "E2E latency": lambda rs: [r.e2e for r in rs],
    }
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (title, get) in zip(axes.flat, getters.items(), strict=True):
        for name, rs in groups.items():
            values = np.sort(np.asarray(get(rs), dtype=np.float64) * 1000.0)
            if values.size:
                ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=name)
        ax.set(title=title, xlabel="ms", ylabel="fraction")
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _throughput(plt: Any, results: list[RequestResult], report: dict[str, Any], path: Path) -> Path:
    """Output tokens per 1-s bin (total, and per tenant when there are few) and completions per bin."""
    num_bins = max(1, int(np.ceil(report["duration"])))
    edges = np.arange(num_bins + 1, dtype=np.float64)
    fig, (ax_tok, ax_req) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    tenants = group_by(results, lambda r: r.tenant)
    lines = {"total": results} | (tenants if 1 < len(tenants) <= MAX_LINES else {})
    for name, rs in lines.items():
        events = [e for r in rs for e in _output_events(r)]
        counts, _ = np.histogram([t for t, _ in events], bins=edges, weights=[tok for _, tok in events])
        ax_tok.plot(edges[:-1], counts, label=name, linewidth=2 if name == "total" else 1)
    done, _ = np.histogram([r.end_s for r in results if r.ok], bins=edges)
    ax_req.bar(edges[:-1], done, width=1.0, align="edge")
    ax_tok.set(title="output throughput", ylabel="tokens / s")
    ax_tok.legend(fontsize=8)
    ax_req.set(title="completed requests", xlabel="time since start (s)", ylabel="requests / s")
    for ax in (ax_tok, ax_req):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _output_events(r: RequestResult) -> list[tuple[float, float]]:
    """(time s, output tokens) per chunk: the usage count spread evenly over the chunks."""
    times = r.chunk_times()
    share = r.output_tokens / len(times) if r.ok and times else 1.0
    return [(t, share) for t in times]


def _tenant_service(plt: Any, results: list[RequestResult], report: dict[str, Any], path: Path) -> Path:
    """Left: cumulative tokens served per tenant (T½ dashed). Right: normalized service at T½ and at the end."""
    fig, (ax_cum, ax_bar) = plt.subplots(1, 2, figsize=(12, 5))
    tenants = group_by(results, lambda r: r.tenant)
    for name, rs in list(tenants.items())[:MAX_LINES]:
        events = sorted(e for r in rs for e in token_events(r))
        if events:
            ax_cum.step(
                [t for t, _ in events], np.cumsum([tok for _, tok in events]), where="post", label=name
            )
    if (horizon := report["fairness_horizon_s"]) is not None:
        ax_cum.axvline(horizon, linestyle="--", color="gray", label="T½")
    ax_cum.set(title="tokens served per tenant", xlabel="time since start (s)", ylabel="tokens")
    ax_cum.legend(fontsize=8)
    ax_cum.grid(alpha=0.3)
    names = list(report["per_tenant"])
    services = [report["per_tenant"][n]["service"] for n in names]
    x = np.arange(len(names))
    ax_bar.bar(x - 0.2, [s["normalized_service"] or 0.0 for s in services], width=0.4, label="at T½")
    ax_bar.bar(x + 0.2, [s["normalized_service_final"] or 0.0 for s in services], width=0.4, label="final")
    ax_bar.axhline(1.0, color="gray", linewidth=0.8)
    ax_bar.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax_bar.set(title=f"normalized service (Jain {report['jain_index'] or 0:.3f} at T½)", ylabel="x_i")
    ax_bar.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
