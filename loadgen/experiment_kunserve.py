"""Experiment E4 (DESIGN §8): KunServe parameter drop, in the simulator at GPU scale and on the real CPU engine.

    kairos bench experiment kunserve                  # both parts
    kairos bench experiment kunserve --part sim       # the simulator (engine/kunserve_experiment.py), seconds
    kairos bench experiment kunserve --part real      # the real CPU engine, drop on vs off (under 8 minutes)
    kairos bench experiment kunserve --part sim --quick --out /tmp/e4   # smoke run (seconds)

As loadgen's other experiments, every point is a command (loadgen imports nothing of the engine): the simulator part
runs `python -m engine.kunserve_experiment` per workload (recompute vs swap vs drop, 2 replicas); the real part
starts `python -m server serve --replicas 2 --device-memory B --param-drop on|off` per configuration, replays one
burst with `python -m loadgen run`, and samples GET /status meanwhile (preemptions, KunServe drops and restores).
JSON goes to OUT/{sim,real}.json; the real part's table replaces the marked section of the markdown (--md).
"""

from __future__ import annotations

import argparse
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from loadgen import harness
from loadgen.harness import PYTHON, StatusSampler
from loadgen.throughput_experiment import REPO, ServerSpec

BEGIN = "<!-- BEGIN kunserve real (kairos bench experiment kunserve --part real) -->"
END = "<!-- END kunserve real -->"


@dataclass(frozen=True)
class SimSetup:
    """The GPU-scale simulation of docs/results/kunserve.md: 2 replicas, a KV budget that the bursts exceed."""

    workloads: tuple[tuple[str, int], ...] = (("azure-conv", 2000), ("azure-code", 1500))
    kv_blocks: int = 1500
    time_scale: float = 0.2


@dataclass(frozen=True)
class RealSetup:
    """SmolLM2-135M (fp32) on CPU, 2 replicas of `device_memory` each (weights + KV; 1.15 GiB leaves 216 blocks
    of 16 tokens per replica). One burst of ShareGPT requests at recorded lengths (ignore_eos), all sent at once."""

    variants: tuple[str, ...] = ("on", "off")
    workload: str = "sharegpt"
    num_requests: int = 40
    max_tokens: int = 256
    max_model_len: int = 1024
    device_memory: str = "1.15GiB"
    seed: int = 0
    port: int = 8394
    start_timeout_s: float = 300.0


QUICK_SIM = SimSetup(workloads=(("azure-conv", 150),), kv_blocks=150)
QUICK_REAL = RealSetup(num_requests=8, max_tokens=16)


# ---- simulator part -----------------------------------------------------------------------------------------------


def sim_command(setup: SimSetup, workload: str, num_requests: int, out: Path) -> list[str]:
    return [
        PYTHON, "-m", "engine.kunserve_experiment",
        "--workload", workload,
        "--num-requests", str(num_requests),
        "--kv-blocks", str(setup.kv_blocks),
        "--time-scale", f"{setup.time_scale:g}",
        "--json", str(out),
    ]  # fmt: skip


def run_sim(setup: SimSetup, workdir: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    rows, tables = [], {}
    for workload, num_requests in setup.workloads:
        out = workdir / "sim" / f"{workload}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = sim_command(setup, workload, num_requests, out)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{' '.join(cmd[2:])} failed ({proc.returncode}): {proc.stderr[-500:]}")
        result = orjson.loads(out.read_bytes())
        command = "python " + " ".join(cmd[1:-2])
        rows += [{"workload": workload, **row, "command": command} for row in result["rows"]]
        tables[workload] = proc.stdout.strip()
        print(f"[sim] {workload}, {num_requests} requests (SIMULATED):\n{tables[workload]}", flush=True)
    return {
        "setup": harness.setup_dict(setup),
        "label": "SIMULATED",
        "wall_seconds": time.monotonic() - t0,
        "rows": rows,
        "tables": tables,
    }


# ---- real part ----------------------------------------------------------------------------------------------------


def serve_spec(setup: RealSetup, param_drop: str) -> ServerSpec:
    cmd = harness.serve_command(
        setup.port,
        *("--replicas", "2"),
        *("--device-memory", setup.device_memory),
        *("--param-drop", param_drop),
        *("--max-model-len", str(setup.max_model_len)),
    )
    return ServerSpec(f"param-drop-{param_drop}", cmd, setup.port, "default", "fp32")


def client_command(setup: RealSetup, out: Path) -> list[str]:
    return harness.loadgen_run_command(setup, "inf", out)


def latency_metrics(report: dict[str, Any]) -> dict[str, Any]:
    ok = [r for r in report["requests"] if r["status"] == "ok"]
    ttft = np.array([r["ttft"] for r in ok])
    tpot = np.array([(r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1])

    def pct(values: np.ndarray, p: float) -> float | None:
        return float(np.percentile(values, p)) if values.size else None

    return {
        "num_requests": len(report["requests"]),
        "completed": len(ok),
        "output_tokens": int(sum(r["output_tokens"] for r in ok)),
        "duration_s": report["duration"],
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "tpot_p50_s": pct(tpot, 50),
        "tpot_p99_s": pct(tpot, 99),
    }


def drop_events(samples: list[dict[str, Any]], t0: float, before: dict[str, float]) -> dict[str, Any]:
    """When (s after the burst was sent) the /status counters first showed a drop and a restore."""
    events: dict[str, Any] = {"first_drop_at_s": None, "first_restore_at_s": None, "num_drops": 0}
    for s in samples:
        extra = s.get("extra", {})
        drops = extra.get("kunserve_drops_total", 0.0) - before.get("kunserve_drops_total", 0.0)
        restores = extra.get("kunserve_restores_total", 0.0) - before.get("kunserve_restores_total", 0.0)
        if drops > 0 and events["first_drop_at_s"] is None:
            events["first_drop_at_s"] = s["sampled_at"] - t0
        if restores > 0 and events["first_restore_at_s"] is None:
            events["first_restore_at_s"] = s["sampled_at"] - t0
        events["num_drops"], events["num_restores"] = int(drops), int(restores)
        events["max_freed_weight_mb"] = max(
            events.get("max_freed_weight_mb", 0.0), extra.get("kunserve_freed_weight_bytes", 0.0) / 1e6
        )
    events.setdefault("num_restores", 0)
    return events


class TimedSampler(StatusSampler):
    """StatusSampler that keeps the engine's counters, with a wall-clock stamp on every sample."""

    def sample(self, body: dict[str, Any]) -> dict[str, Any] | None:
        if engine := body.get("engine"):
            return {**engine, "sampled_at": time.monotonic()}
        return None


def real_variant(setup: RealSetup, param_drop: str, workdir: Path) -> dict[str, Any]:
    spec = serve_spec(setup, param_drop)
    with harness.serving(spec, workdir / "real" / f"{spec.label}.log", setup.start_timeout_s):
        cmd = client_command(setup, workdir / "real" / f"{spec.label}.json")
        sampler = TimedSampler(setup.port, period_s=0.25)
        # 1 s of sampling after the client exits: one more sample after the last request
        run = harness.run_client(cmd, setup.port, f"param-drop {param_drop}", sampler, settle_s=1.0)
        before, samples, report = run.status_before, run.samples, run.report
        engine_before = before.get("engine") or {}
        last = samples[-1] if samples else harness.status_now(setup.port)["engine"]
        row = {
            "param_drop": param_drop,
            **latency_metrics(report),
            "num_preemptions": last["num_preemptions_total"] - engine_before.get("num_preemptions_total", 0),
            **drop_events(samples, run.started_at, engine_before.get("extra", {})),
            "num_kv_blocks": before.get("engine_info", {}).get("num_kv_blocks"),
            "loadavg_before": run.loadavg_before,
            "workload_info": report["workload_info"],
            "server_command": "kairos serve " + " ".join(spec.cmd[4:]),
            "client_command": "kairos bench " + " ".join(cmd[3:-2]),
        }
        print(
            f"[real] param-drop {param_drop}: TTFT p50 {row['ttft_p50_s'] or 0:.1f} s p99 "
            f"{row['ttft_p99_s'] or 0:.1f} s, preemptions {row['num_preemptions']}, drops {row['num_drops']}",
            flush=True,
        )
        return row


def run_real(setup: RealSetup, workdir: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    rows = [real_variant(setup, v, workdir) for v in setup.variants]
    return {"setup": harness.setup_dict(setup), "wall_seconds": time.monotonic() - t0, "rows": rows}


def real_markdown(result: dict[str, Any]) -> str:
    def f(x: float | None, scale: float = 1.0, digits: int = 1) -> str:
        return "–" if x is None else f"{x * scale:.{digits}f}"

    meta, setup = result["meta"], result["setup"]
    lines = [
        BEGIN,
        f"Command: `{meta['command']}` ({meta['date']} UTC, {meta['machine']['cpu_model']}, {meta['machine']['num_cpus']} CPUs, "
        f"load average at start {meta['loadavg_start']}; whole real part {result['wall_seconds']:.0f} s).",
        f"Server: `{result['rows'][0]['server_command']}`; client: `{result['rows'][0]['client_command']}` "
        f"({setup['num_requests']} {setup['workload']} requests at once, recorded lengths capped at "
        f"{setup['max_tokens']}, ignore_eos).",
        "",
        "| param drop | done | TTFT p50 (s) | p99 | TPOT p50 (ms) | p99 | preemptions | drops / restores "
        "| first drop at (s) | restore at (s) | weights freed (MB) | burst took (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['param_drop']} | {r['completed']}/{r['num_requests']} | {f(r['ttft_p50_s'], digits=2)} "
            f"| {f(r['ttft_p99_s'], digits=2)} | {f(r['tpot_p50_s'], 1e3)} | {f(r['tpot_p99_s'], 1e3)} "
            f"| {r['num_preemptions']} | {r['num_drops']} / {r['num_restores']} | {f(r['first_drop_at_s'])} "
            f"| {f(r['first_restore_at_s'])} | {f(r.get('max_freed_weight_mb'))} | {f(r['duration_s'])} |"
        )
    lines.append(END)
    return "\n".join(lines)


def write_real_markdown(result: dict[str, Any], md: Path) -> None:
    section = real_markdown(result)
    text = md.read_text() if md.exists() else ""
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        text = head + section + rest.partition(END)[2]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    md.write_text(text)


# ---- command line -------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    quick_help = "a CI-sized smoke run (one small workload, few requests)"
    p = harness.experiment_parser("kunserve", __doc__, quick_help, Path("/tmp/kairos-e4"))
    p.add_argument("--real-num-requests", type=int, default=None)
    p.add_argument("--real-max-tokens", type=int, default=None)
    p.add_argument("--device-memory", default=None, help="per replica, e.g. 1.15GiB")
    p.add_argument("--port", type=int, default=None)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    sim_setup, real_setup = (QUICK_SIM, QUICK_REAL) if args.quick else (SimSetup(), RealSetup())
    real_setup = replace(
        real_setup,
        num_requests=args.real_num_requests or real_setup.num_requests,
        max_tokens=args.real_max_tokens or real_setup.max_tokens,
        device_memory=args.device_memory or real_setup.device_memory,
        port=args.port or real_setup.port,
    )
    meta = harness.run_meta("kunserve", argv, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = ("sim", "real") if args.part == "all" else (args.part,)
    for part in parts:
        result = run_sim(sim_setup, args.workdir) if part == "sim" else run_real(real_setup, args.workdir)
        harness.write_part(args.out, part, result, meta)
        if part == "real":
            md = args.md or args.out.parent / f"{args.out.name}.md"
            write_real_markdown(result, md)
            print(f"wrote {md}", flush=True)
            print(real_markdown(result), flush=True)
    return 0
