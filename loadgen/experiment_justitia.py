"""Experiment E3 (Justitia): application completion time and fairness, `kairos bench experiment justitia`.

Workload: `apps` (loadgen/workload_apps.py): map-reduce and self-consistency apps with k ∈ {1, 4, 16, 64} parallel
calls and real agent sessions, arriving open-loop. Policies: vllm (FCFS), vtc, justitia, sjf-oracle. Two parts:

  simulated  `kairos simulate` on the h100-llama3-8b cost model (an assumption, not a measurement) at two loads;
  real       `kairos serve --policy P` (SmolLM2-135M on this CPU, nice) replayed by `kairos bench run`, small.

Metrics per run, from each request's send and finish times: app completion (last finish − first send) mean and
p99; slowdown against the fluid fair reference (loadgen/fluid.py), max and p99; Jain's index over apps of
1/slowdown (1 when every app got the same fraction of its fair-reference speed). Writes docs/results/justitia/*.json,
docs/results/justitia.md (tables) and docs/results/justitia/act.png. `--quick`: a CI-sized simulated run only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from loadgen.fluid import FluidRequest, fluid_finish
from loadgen.harness import serving
from loadgen.report import jain_index
from loadgen.throughput_experiment import REPO, ServerSpec

POLICIES = ("vllm", "vtc", "justitia", "sjf-oracle")
COST_MODEL = "h100-llama3-8b"
TASK_PARALLEL = (
    "map-reduce",
    "self-consistency",
)  # tenants of the synthetic apps; agents think between calls


# ---- scenarios ----------------------------------------------------------------------------------------------


def sim_scenarios(quick: bool) -> list[dict[str, Any]]:
    """Simulated runs: the KV pool is cut to 4,096 blocks (65,536 tokens) so memory is what apps compete for."""
    if quick:
        return [{"name": "quick", "rate": 4.0, "num_requests": 300, "kv_blocks": 1024}]
    return [
        {"name": "load-medium", "rate": 1.0, "num_requests": 3000, "kv_blocks": 4096},
        {"name": "load-high", "rate": 2.0, "num_requests": 3000, "kv_blocks": 4096},
    ]


REAL = {
    "name": "cpu-smollm2",
    "rate": 1.0,
    "num_requests": 150,
    "max_tokens": 32,
    "input_scale": 0.1,
    "time_scale": 0.03,  # agents' recorded think times × 0.03
    "kv_cache_memory": "96MiB",  # about 2,000 tokens of SmolLM2 KV: memory binds, as in the simulated runs
}


# ---- metrics ------------------------------------------------------------------------------------------------


def app_metrics(requests: list[dict[str, Any]], service_rate: float, token_seconds: float) -> dict[str, Any]:
    """App completion times, slowdowns against the fluid fair reference and Jain's index (module doc)."""
    ok = [r for r in requests if r["status"] == "ok" and r["app_id"]]
    fluid = [FluidRequest(r["app_id"], r["start_s"], r["prompt_tokens"], r["output_tokens"]) for r in ok]
    reference = fluid_finish(fluid, service_rate, token_seconds)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for r in ok:
        first[r["app_id"]] = min(first.get(r["app_id"], np.inf), r["start_s"])
        last[r["app_id"]] = max(last.get(r["app_id"], 0.0), r["end_s"])
    act = {a: last[a] - first[a] for a in first}
    tenant = {r["app_id"]: r["tenant"] for r in ok}  # the app's shape; an agent's framework
    slowdown = {a: act[a] / max(reference[a] - first[a], 1e-9) for a in act}
    task_parallel = np.array([t for a, t in act.items() if tenant[a] in TASK_PARALLEL])
    act_values = np.array(list(act.values()))
    slow_values = np.array(list(slowdown.values()))
    by_shape: dict[str, list[float]] = {}
    for a, t in act.items():
        by_shape.setdefault(tenant[a], []).append(t)
    return {
        "num_apps": len(act),
        "num_failed": len(requests) - len(ok),
        "mean_act_s": float(act_values.mean()),
        "mean_act_task_parallel_s": float(task_parallel.mean()) if task_parallel.size else None,
        "p99_act_task_parallel_s": float(np.percentile(task_parallel, 99)) if task_parallel.size else None,
        "p99_act_s": float(np.percentile(act_values, 99)),
        "max_slowdown": float(slow_values.max()),
        "p99_slowdown": float(np.percentile(slow_values, 99)),
        "jain_apps": jain_index(1.0 / slow_values),
        "mean_act_by_shape_s": {k: float(np.mean(v)) for k, v in sorted(by_shape.items())},
        "per_app": {a: {"act_s": act[a], "slowdown": slowdown[a]} for a in sorted(act)},
    }


def unloaded_token_seconds(requests: list[dict[str, Any]]) -> float:
    """t_tok of the fluid reference: the 5th percentile of TPOT in the run (a decode step of a near-idle engine)."""
    tpots = [(r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1) for r in requests if r["output_tokens"] > 1]
    return float(np.percentile(tpots, 5))


# ---- simulated part -----------------------------------------------------------------------------------------


def run_sim(scenario: dict[str, Any], policy: str, out: Path) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "server", "simulate", "--workload", "apps", "--policy", policy,
        "--rate", str(scenario["rate"]), "--num-requests", str(scenario["num_requests"]),
        "--kv-blocks", str(scenario["kv_blocks"]), "--cost-model", COST_MODEL, "--json", str(out),
    ]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    report = orjson.loads(out.read_bytes())
    sched = report["scheduler_config"]
    service_rate = report["num_kv_blocks"] * report["block_size"] / sched["fair_iteration_s"]
    token_s = unloaded_token_seconds(report["requests"])
    metrics = app_metrics(report["requests"], service_rate, token_s)
    metrics.update(
        {
            "policy": policy,
            "preemptions": report["num_preemptions_total"],
            "jain_tenants": report["jain_index"],
            "reference": {"service_rate": service_rate, "token_seconds": token_s},
            "simulated_seconds": report["simulated_seconds"],
            "wall_seconds": report["wall_seconds"],
        }
    )
    return metrics


# ---- real part ----------------------------------------------------------------------------------------------


def serve_spec(policy: str, port: int, fair_iteration_s: float) -> ServerSpec:
    cmd = [
        "nice", sys.executable, "-m", "server", "serve", "--policy", policy, "--port", str(port),
        "--max-model-len", "2048", "--fair-iteration-s", str(fair_iteration_s), "--log-level", "warning",
        "--kv-cache-memory", REAL["kv_cache_memory"],
    ]  # fmt: skip
    return ServerSpec(policy, cmd, port, "default", "fp32")


def kv_pool_tokens(port: int) -> int:
    info = httpx.get(f"http://127.0.0.1:{port}/status", timeout=5).json()["engine_info"]
    return int(info["num_kv_blocks"]) * int(info["block_size"])


def run_real(policy: str, port: int, fair_iteration_s: float, out: Path) -> tuple[dict[str, Any], dict]:
    with serving(serve_spec(policy, port, fair_iteration_s), out.with_suffix(".log"), timeout_s=600.0):
        cmd = [
            "nice", sys.executable, "-m", "loadgen", "run", "--workload", "apps", "--base-url",
            f"http://127.0.0.1:{port}", "--rate", str(REAL["rate"]), "--num-requests", str(REAL["num_requests"]),
            "--max-tokens", str(REAL["max_tokens"]), "--input-scale", str(REAL["input_scale"]),
            "--output-scale", "1", "--time-scale", str(REAL["time_scale"]), "--max-model-len", "2048",
            "--json", str(out), "--no-progress",
            "--save-detailed",
        ]  # fmt: skip
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        pool = kv_pool_tokens(port)
    return orjson.loads(out.read_bytes()), {"kv_pool_tokens": pool}


def real_metrics(report: dict, pool: int, step_s: float, policy: str) -> dict[str, Any]:
    token_s = unloaded_token_seconds(report["requests"])
    metrics = app_metrics(report["requests"], pool / step_s, token_s)
    metrics.update(
        {
            "policy": policy,
            "jain_tenants": report["jain_index"],
            "reference": {"service_rate": pool / step_s, "token_seconds": token_s, "kv_pool_tokens": pool},
            "duration_s": report["duration"],
        }
    )
    return metrics


# ---- report -------------------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| policy | apps | mean ACT (s) | p99 ACT (s) | task-parallel mean / p99 ACT (s) | max slowdown |"
        " p99 slowdown | Jain (apps) | Jain (tenants) | preemptions |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in rows:
        jt = "-" if m["jain_tenants"] is None else f"{m['jain_tenants']:.3f}"
        lines.append(
            f"| {m['policy']} | {m['num_apps']} | {m['mean_act_s']:.2f} | {m['p99_act_s']:.2f} | "
            f"{m['mean_act_task_parallel_s'] or 0:.2f} / {m['p99_act_task_parallel_s'] or 0:.2f} | "
            f"{m['max_slowdown']:.2f} | {m['p99_slowdown']:.2f} | {m['jain_apps']:.3f} | {jt} | "
            f"{m.get('preemptions', '-')} |"
        )
    return "\n".join(lines)


def shape_table(rows: list[dict[str, Any]]) -> str:
    shapes = sorted({s for m in rows for s in m["mean_act_by_shape_s"]})
    lines = [
        "| policy | " + " | ".join(f"{s} mean ACT (s)" for s in shapes) + " |",
        "|---" * (len(shapes) + 1) + "|",
    ]
    for m in rows:
        lines.append(
            f"| {m['policy']} | "
            + " | ".join(f"{m['mean_act_by_shape_s'].get(s, 0):.2f}" for s in shapes)
            + " |"
        )
    return "\n".join(lines)


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (name, rows) in zip(axes[0], results.items(), strict=True):
        for m in rows:
            acts = np.sort([a["act_s"] for a in m["per_app"].values()])
            ax.plot(acts, np.arange(1, len(acts) + 1) / len(acts), label=m["policy"])
        ax.set_xscale("log")
        ax.set_xlabel("app completion time (s)")
        ax.set_ylabel("fraction of apps")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kairos bench experiment justitia", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a CI-sized simulated run only")
    p.add_argument("--skip-real", action="store_true", help="simulated part only")
    p.add_argument("--out-dir", type=Path, default=REPO / "docs" / "results" / "justitia")
    p.add_argument("--port", type=int, default=8431)
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    raw = Path(os.environ.get("TMPDIR", "/tmp")) / "kairos-e3"
    raw.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {}
    for scenario in sim_scenarios(args.quick):
        key = f"simulated {scenario['name']}"
        results[key] = [
            run_sim(scenario, policy, raw / f"sim-{scenario['name']}-{policy}.json") for policy in POLICIES
        ]
        sys.stderr.write(f"{key}\n{table(results[key])}\n")
    real_rows: list[dict[str, Any]] = []
    if not (args.quick or args.skip_real):
        step_s = 0.0
        for policy in ("vllm", "vtc", "justitia", "sjf-oracle"):  # vllm first: it measures the step time
            report, info = run_real(policy, args.port, step_s or 0.05, raw / f"real-{policy}.json")
            if not step_s:
                itls = [x for r in report["requests"] for x in r.get("itl", [])]
                step_s = float(np.median(itls))
            real_rows.append(real_metrics(report, info["kv_pool_tokens"], step_s, policy))
            sys.stderr.write(f"real {policy} done\n")
        results[f"real {REAL['name']}"] = real_rows
    doc = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "argv": ["kairos", "bench", "experiment", "justitia", *(argv or [])],
        "cost_model": COST_MODEL,
        "sim_scenarios": sim_scenarios(args.quick),
        "real_scenario": None if args.quick or args.skip_real else REAL,
        "results": results,
    }
    name = "quick" if args.quick else "e3"
    (args.out_dir / f"{name}.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    (args.out_dir / f"{name}-tables.md").write_text(
        "\n\n".join(f"### {k}\n\n{table(v)}\n\n{shape_table(v)}" for k, v in results.items()) + "\n"
    )
    plot(results, args.out_dir / f"{name}-act.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
