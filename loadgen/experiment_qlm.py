"""Experiment E2 (DESIGN §8): QLM against vLLM's FCFS and EDF on mixed interactive + batch traffic.

    kairos bench experiment qlm                   # both parts; rewrites docs/results/qlm{.md,/}
    kairos bench experiment qlm --part sim        # the simulator sweep only (minutes)
    kairos bench experiment qlm --part real       # the real CPU engine only (under 10 minutes)
    kairos bench experiment qlm --part sim --quick --out /tmp/e2   # smoke run (seconds)

Workloads (loadgen/workload_mixed.py): Azure conv as the interactive class plus Azure code or ShareGPT as the batch
class, under Poisson arrivals at a swept rate and under the traces' own (bursty) timing at a swept time scale.
Every request carries its class; the engine gets the same class targets the results are scored against (`--slo`).

  simulated  `kairos simulate` per (scenario, load, policy) on the h100-llama3-8b cost model (an ASSUMPTION, not a
             measurement) with a host swap pool priced at its assumed PCIe bandwidth;
  real       `kairos serve --policy P --swap-space ...` (SmolLM2-135M on this CPU, nice) replayed by `kairos bench
             run`, one small Poisson point per policy, GET /status read after each for the QLM gauges.

Per point: SLO attainment per class (a request meets its class's every target; a failed request misses), p50 / p99
interactive TTFT, throughput, preemptions split into swaps and recomputes and QLM evictions, and (qlm) the RWT
estimator's accuracy: estimated vs actual waits from the monitor's ring (simulated), its gauges (real).
"""

from __future__ import annotations

import argparse
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from loadgen import harness
from loadgen.harness import PYTHON
from loadgen.throughput_experiment import REPO, ServerSpec

POLICIES = ("vllm", "edf", "qlm")
# Simulator ablation: qlm with no host swap pool, so every eviction and preemption recomputes.
RECOMPUTE_ONLY = "qlm-recompute"
RWT_PAIRS_KEPT = 400  # per point, evenly spaced over the ring, for the plot


@dataclass(frozen=True)
class ClassTarget:
    """A class's targets in seconds (None: no target of that kind), as engine/slo.py reads `--slo`."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    def spec(self, name: str) -> str:
        keys = (("ttft", self.ttft_s), ("tpot", self.tpot_s), ("e2e", self.e2e_s))
        return f"{name}:" + ",".join(f"{k}={v:g}" for k, v in keys if v is not None)

    def met(self, r: dict[str, Any]) -> bool:
        if r["status"] != "ok":
            return False
        n = r["output_tokens"]
        tpot = (r["e2e"] - r["ttft"]) / (n - 1) if n > 1 else 0.0
        return all(
            limit is None or value <= limit
            for value, limit in ((r["ttft"], self.ttft_s), (tpot, self.tpot_s), (r["e2e"], self.e2e_s))
        )


@dataclass(frozen=True)
class Scenario:
    """One workload and arrival mode, swept over `loads`: req/s (Poisson) or time scales (trace timing)."""

    name: str
    workload: str
    arrivals: str  # "poisson" or "trace"
    loads: tuple[float, ...]

    def load_flags(self, load: float) -> list[str]:
        return ["--rate", f"{load:g}"] if self.arrivals == "poisson" else ["--time-scale", f"{load:g}"]


@dataclass(frozen=True)
class SimSetup:
    """The simulated sweep. The KV pool is cut to 2,048 blocks (4 GiB of Llama-3-8B KV) so that memory binds and
    eviction has something to free, as in E1; the host swap pool is 64 GiB (32,768 blocks): never the limit."""

    scenarios: tuple[Scenario, ...] = (
        Scenario("sharegpt-poisson", "mixed-sharegpt", "poisson", (12.0, 16.0, 20.0)),
        Scenario("code-poisson", "mixed-code", "poisson", (12.0, 16.0, 20.0)),
        Scenario("sharegpt-trace", "mixed-sharegpt", "trace", (0.6, 0.5, 0.4, 0.3)),
        Scenario("code-trace", "mixed-code", "trace", (0.6, 0.5, 0.4, 0.3)),
    )
    policies: tuple[str, ...] = (*POLICIES, RECOMPUTE_ONLY)
    num_requests: int = 1500
    seed: int = 0
    cost_model: str = "h100-llama3-8b"
    kv_blocks: int = 2048
    swap_space: str = "64GiB"
    max_tokens: int = 1024
    # QLM §4.5 scores interactive on TTFT and batch on a 1-minute "Batch-1" target; ours adds a reading pace.
    targets: dict[str, ClassTarget] = field(
        default_factory=lambda: {
            "interactive": ClassTarget(ttft_s=2.0, tpot_s=0.2),
            "batch": ClassTarget(e2e_s=60.0),
        }
    )
    jobs: int = 2


@dataclass(frozen=True)
class RealSetup:
    """The real engine on this CPU: SmolLM2-135M, a KV pool of a few MiB so that memory binds (45 KiB per token:
    24 MiB is 34 blocks of 16 tokens), a host swap pool twice that. ShareGPT batch requests run to their recorded
    length (up to 96 tokens) and hold KV long; the interactive conv requests are short."""

    workload: str = "mixed-sharegpt"
    rate: float = 0.5
    num_requests: int = 40
    seed: int = 0
    policies: tuple[str, ...] = POLICIES
    max_tokens: int = 96
    max_model_len: int = 512
    kv_cache_memory: str = "24MiB"
    swap_space: str = "48MiB"
    targets: dict[str, ClassTarget] = field(
        default_factory=lambda: {
            "interactive": ClassTarget(ttft_s=5.0, tpot_s=1.0),
            "batch": ClassTarget(e2e_s=120.0),
        }
    )
    port: int = 8392
    start_timeout_s: float = 600.0


QUICK_SIM = SimSetup(  # a pool small enough that qlm evicts within 200 requests
    scenarios=(Scenario("sharegpt-poisson", "mixed-sharegpt", "poisson", (16.0,)),),
    policies=POLICIES,
    num_requests=200,
    kv_blocks=512,
    jobs=1,
)
QUICK_REAL = RealSetup(rate=1.0, num_requests=6, max_tokens=16)


def slo_flags(targets: dict[str, ClassTarget]) -> list[str]:
    return [flag for name, t in targets.items() for flag in ("--slo", t.spec(name))]


# ---- per-point metrics ----------------------------------------------------------------------------------------


def class_metrics(requests: list[dict[str, Any]], targets: dict[str, ClassTarget], duration_s: float) -> dict:
    """SLO attainment per class and overall, interactive TTFT percentiles, batch e2e, throughput."""
    out: dict[str, Any] = {
        "num_requests": len(requests),
        "completed": sum(r["status"] == "ok" for r in requests),
    }
    met = [targets[r["slo_class"]].met(r) for r in requests]
    out["attainment"] = float(np.mean(met)) if met else None
    for name in targets:
        rows = [(r, m) for r, m in zip(requests, met, strict=True) if r["slo_class"] == name]
        out[f"{name}_num"] = len(rows)
        out[f"{name}_attainment"] = float(np.mean([m for _, m in rows])) if rows else None
        ok = [r for r, _ in rows if r["status"] == "ok"]
        ttft = np.array([r["ttft"] for r in ok]) if ok else np.zeros(1)
        e2e = np.array([r["e2e"] for r in ok]) if ok else np.zeros(1)
        out[f"{name}_p50_ttft_s"] = float(np.percentile(ttft, 50))
        out[f"{name}_p99_ttft_s"] = float(np.percentile(ttft, 99))
        out[f"{name}_p99_e2e_s"] = float(np.percentile(e2e, 99))
    ok = [r for r in requests if r["status"] == "ok"]
    out["request_throughput"] = len(ok) / duration_s if duration_s > 0 else None
    out["output_throughput"] = sum(r["output_tokens"] for r in ok) / duration_s if duration_s > 0 else None
    return out


def rwt_accuracy(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    """The estimator against the truth: error = estimated − actual wait (s), coverage = share of requests that
    waited no longer than estimated (the estimate is a 0.99-quantile bound), rank correlation."""
    if not pairs:
        return {"rwt_pairs": 0}
    est, actual = (np.array(x) for x in zip(*pairs, strict=True))
    err = est - actual
    keep = np.linspace(0, len(pairs) - 1, min(len(pairs), RWT_PAIRS_KEPT)).astype(int)
    ranks = [np.argsort(np.argsort(x)) for x in (est, actual)]
    return {
        "rwt_pairs": len(pairs),
        "rwt_mean_error_s": float(err.mean()),
        "rwt_median_abs_error_s": float(np.median(np.abs(err))),
        "rwt_p90_abs_error_s": float(np.percentile(np.abs(err), 90)),
        "rwt_coverage": float(np.mean(actual <= est)),
        "rwt_spearman": float(np.corrcoef(*ranks)[0, 1]) if len(pairs) > 2 and np.std(ranks[0]) > 0 else None,
        "rwt_sample": [[float(est[i]), float(actual[i])] for i in keep],
    }


# ---- simulator part -------------------------------------------------------------------------------------------


def sim_command(setup: SimSetup, scenario: Scenario, load: float, policy: str, out: Path) -> list[str]:
    return [
        PYTHON, "-m", "server", "simulate",
        "--workload", scenario.workload,
        *scenario.load_flags(load),
        "--num-requests", str(setup.num_requests),
        "--seed", str(setup.seed),
        "--max-tokens", str(setup.max_tokens),
        "--cost-model", setup.cost_model,
        "--kv-blocks", str(setup.kv_blocks),
        "--swap-space", "0" if policy == RECOMPUTE_ONLY else setup.swap_space,
        "--policy", policy.removesuffix("-recompute"),
        *slo_flags(setup.targets),
        "--json", str(out),
    ]  # fmt: skip


def sim_point(setup: SimSetup, scenario: Scenario, load: float, policy: str, workdir: Path) -> dict[str, Any]:
    out = workdir / "sim" / scenario.name / f"{policy}_{load:g}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = sim_command(setup, scenario, load, policy, out)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if not out.exists():
        raise RuntimeError(f"{' '.join(cmd[2:])} failed ({proc.returncode}): {proc.stderr[-500:]}")
    report = orjson.loads(out.read_bytes())
    preemptions, swaps = report["num_preemptions_total"], report["num_swaps_total"]
    row = {
        "scenario": scenario.name,
        "workload": scenario.workload,
        "arrivals": scenario.arrivals,
        "load": load,
        "offered_rate": report["num_prompts"] / max(r["scheduled_s"] for r in report["requests"]),
        "policy": policy,
        **class_metrics(report["requests"], setup.targets, report["duration"]),
        "num_preemptions": preemptions,
        "num_swaps": swaps,
        "num_recomputes": preemptions - swaps,
        "num_evictions": report["num_evictions_total"],
        "blocks_swapped_out": report["engine_extra"].get("blocks_swapped_out", 0),
        "qlm_violations": report["engine_extra"].get("qlm_violations_total"),
        **rwt_accuracy([tuple(p) for p in report["rwt_pairs"]]),
        "simulated_seconds": report["simulated_seconds"],
        "wall_seconds": report["wall_seconds"],
        "workload_info": report["workload_info"],
        "command": "kairos simulate " + " ".join(cmd[4:-2]),
    }
    out.unlink()  # per-request data of every point would be tens of MB; the row keeps what the report uses
    return row


def run_sim(setup: SimSetup, workdir: Path) -> dict[str, Any]:
    points = [(s, load, p) for s in setup.scenarios for load in s.loads for p in setup.policies]
    t0 = time.monotonic()
    rows = []
    with ThreadPoolExecutor(max_workers=setup.jobs) as pool:  # each point is its own process
        futures = [pool.submit(sim_point, setup, *point, workdir) for point in points]
        for i, future in enumerate(futures):
            r = future.result()
            rows.append(r)
            print(
                f"[sim {i + 1}/{len(points)}] {r['scenario']} load {r['load']:g} {r['policy']}: "
                f"interactive {r['interactive_attainment']:.0%}, batch {r['batch_attainment']:.0%}, "
                f"swaps {r['num_swaps']}, recomputes {r['num_recomputes']}, evictions {r['num_evictions']}",
                flush=True,
            )
    return {"setup": harness.setup_dict(setup), "wall_seconds": time.monotonic() - t0, "rows": rows}


# ---- real part ------------------------------------------------------------------------------------------------


NICE = ("nice", "-n", "10")


def serve_spec(setup: RealSetup, policy: str) -> ServerSpec:
    cmd = harness.serve_command(
        setup.port,
        *("--policy", policy),
        *("--kv-cache-memory", setup.kv_cache_memory),
        *("--swap-space", setup.swap_space),
        *("--max-model-len", str(setup.max_model_len)),
        *("--length-source", "oracle"),
        *slo_flags(setup.targets),
        prefix=NICE,
    )
    return ServerSpec(policy, cmd, setup.port, "default", "fp32")


def client_command(setup: RealSetup, out: Path) -> list[str]:
    return harness.loadgen_run_command(setup, f"{setup.rate:g}", out, prefix=NICE)


def real_point(setup: RealSetup, policy: str, workdir: Path) -> dict[str, Any]:
    spec = serve_spec(setup, policy)
    cmd = client_command(setup, workdir / "real" / f"{policy}.json")
    with harness.serving(spec, workdir / "real" / f"{policy}.log", setup.start_timeout_s):
        run = harness.run_client(cmd, setup.port, policy)
        after = harness.status_now(setup.port)["engine"]
    before, report = run.status_before["engine"], run.report
    extra = after.get("extra", {})
    preemptions = after["num_preemptions_total"] - before["num_preemptions_total"]
    swaps = int(extra.get("num_swaps_total", 0))
    row = {
        "scenario": f"{setup.workload}-poisson",
        "workload": setup.workload,
        "arrivals": "poisson",
        "load": setup.rate,
        "policy": policy,
        **class_metrics(report["requests"], setup.targets, report["duration"]),
        "num_preemptions": preemptions,
        "num_swaps": swaps,
        "num_recomputes": preemptions - swaps,
        "num_evictions": int(extra.get("num_evictions_total", 0)),
        "qlm_violations": extra.get("qlm_violations_total"),
        "rwt_pairs": int(extra.get("qlm_rwt_pairs", 0)),
        "rwt_mean_error_s": extra.get("qlm_rwt_mean_error_s"),
        "rwt_mean_abs_error_s": extra.get("qlm_rwt_mean_abs_error_s"),
        "loadavg_before": run.loadavg_before,
        "workload_info": report["workload_info"],
        "server_command": "kairos serve " + " ".join(spec.cmd[7:]),
        "client_command": "kairos bench run " + " ".join(cmd[7:-2]),
    }
    print(
        f"[real] {policy}: interactive {row['interactive_attainment']:.0%}, batch {row['batch_attainment']:.0%}, "
        f"swaps {swaps}, evictions {row['num_evictions']}",
        flush=True,
    )
    return row


def run_real(setup: RealSetup, workdir: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    rows = [real_point(setup, policy, workdir) for policy in setup.policies]
    return {"setup": harness.setup_dict(setup), "wall_seconds": time.monotonic() - t0, "rows": rows}


# ---- command line ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = harness.experiment_parser(
        "qlm", __doc__, "a CI-sized smoke run (one point per policy)", Path("/tmp/kairos-e2")
    )
    p.add_argument("--jobs", type=int, default=None, help="sim points run at once (default 2)")
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    from loadgen.experiment_qlm_report import write_outputs

    args = parse_args(argv)
    sim_setup, real_setup = (QUICK_SIM, QUICK_REAL) if args.quick else (SimSetup(), RealSetup())
    sim_setup = replace(sim_setup, jobs=args.jobs or sim_setup.jobs)
    meta = harness.run_meta("qlm", argv, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    for part in ("sim", "real") if args.part == "all" else (args.part,):
        result = run_sim(sim_setup, args.workdir) if part == "sim" else run_real(real_setup, args.workdir)
        harness.write_part(args.out, part, result, meta)
    md = args.md or args.out.parent / f"{args.out.name}.md"
    for path in write_outputs(args.out, md, plots=not args.no_plots):
        print(f"wrote {path}", flush=True)
    return 0
