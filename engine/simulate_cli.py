"""`kairos simulate ...`: replay a loadgen workload through the simulator and print the loadgen report, labelled
simulated; `kairos simulate calibrate ...`: fit a cost model to the real engine (engine/calibrate.py).

    kairos simulate --workload sharegpt --rate 20 --duration 120 --policy vllm --cost-model h100-llama3-8b
    kairos simulate --workload azure-conv --num-requests 2000 --cost-model docs/results/simulator/cpu-smollm2.json
    kairos simulate calibrate --out docs/results/simulator/cpu-smollm2.json --markdown docs/results/simulator.md

Plans come from loadgen's workload builders (same seeds, same lengths, same arrivals); every request runs with
ignore_eos and max_tokens = its planned length. Metrics come from loadgen/report.py on simulated times.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from engine.config import SchedulerConfig, parse_size
from engine.cost_model import PRESETS, CostModel, StepShape
from engine.policy import POLICIES
from engine.simulator import SimConfig, SimRequest, SimulationResult, simulate
from loadgen.cli import UsageError, parse_goodput
from loadgen.client import RequestResult
from loadgen.datasets import DEFAULT_DATA_DIR, WorkloadConfig
from loadgen.plan import PlannedRequest
from loadgen.report import build_report, format_table, is_good
from loadgen.workloads import WORKLOADS, build_workload

SHARED_PREFIX_WORKLOADS = ("mooncake", "agents")  # their token ids encode prefix reuse: keep them
RL_SOURCES = ("oracle", "none")
RL_NOISE_STREAM = 17  # its own seed stream: noise never reshuffles the plan


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise UsageError(message)


def build_replay_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="kairos simulate", description="replay a workload on the simulator (results are simulated)"
    )
    w = p.add_argument_group("workload (loadgen's builders)")
    w.add_argument("--workload", required=True, choices=list(WORKLOADS))
    w.add_argument(
        "--rate", type=float, default=None, help="req/s (Poisson unless --burstiness); default: trace timing"
    )
    w.add_argument(
        "--duration", type=float, default=None, help="s of arrivals: with --rate, rate × S requests"
    )
    w.add_argument(
        "--num-requests", type=int, default=None, help="requests to plan (default: rate × duration)"
    )
    w.add_argument("--burstiness", type=float, default=1.0)
    w.add_argument("--time-scale", type=float, default=1.0, help="trace timing × S")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    w.add_argument("--max-tokens", type=int, default=None, help="cap on output lengths")
    w.add_argument(
        "--client-max-tokens",
        type=int,
        default=0,
        help="send this max_tokens (what reserve-max reserves) and end each request with a simulated EOS at its "
        "true length; default: max_tokens = the true length, with ignore_eos",
    )
    w.add_argument("--num-tenants", type=int, default=0)
    w.add_argument("--slo-class", default=None)
    w.add_argument(
        "--rl", choices=RL_SOURCES, default="oracle", help="rl_mean/rl_q tags: true length, or none"
    )
    w.add_argument(
        "--rl-noise",
        type=float,
        default=0.0,
        metavar="SIGMA",
        help="oracle + noise: tags = true length × exp(N(0, SIGMA²)), seeded by --seed",
    )
    w.add_argument(
        "--rl-coverage",
        type=float,
        default=0.5,
        metavar="Q",
        help="with --rl-noise: shift rl_q's log-normal factor so a share Q of the tags cover the true length "
        "(0.9: a calibrated upper quantile, as the predictor's rl_q; 0.5: median-unbiased)",
    )
    e = p.add_argument_group("simulated engine")
    e.add_argument(
        "--cost-model", default="h100-llama3-8b", help=f"a JSON file or a preset: {', '.join(PRESETS)}"
    )
    e.add_argument("--policy", default="vllm", choices=sorted(POLICIES))
    e.add_argument("--kv-blocks", type=int, default=0, help="KV pool in blocks (default: the cost model's)")
    e.add_argument("--block-size", type=int, default=16)
    e.add_argument("--max-num-seqs", type=int, default=256)
    e.add_argument(
        "--fair-iteration-s",
        type=float,
        default=0.0,
        help="justitia: seconds per step in the fluid reference's rate M / t_iter (default: the cost model's "
        "step with --max-num-seqs decodes holding the whole pool)",
    )
    e.add_argument("--app-idle-timeout", type=float, default=5.0, help="justitia: s an idle app stays active")
    e.add_argument("--max-num-batched-tokens", type=int, default=2048)
    e.add_argument("--max-model-len", type=int, default=0, help="default: the cost model's")
    e.add_argument("--no-prefix-caching", action="store_true")
    e.add_argument("--kv-reserve-fraction", type=float, default=0.05, help="KV ledger's global reserve")
    e.add_argument("--no-lending", action="store_true", help="ecoserve ablation: no KVC pipelining")
    e.add_argument("--no-grouping", action="store_true", help="ecoserve ablation: no GT groups")
    e.add_argument("--no-ordering", action="store_true", help="ecoserve ablation: FCFS order")
    e.add_argument(
        "--slo",
        action="append",
        default=[],
        metavar="NAME:ttft=S,tpot=S,e2e=S",
        help="SLO class targets, as `kairos serve --slo` (engine/slo.py)",
    )
    e.add_argument(
        "--swap-space",
        type=parse_size,
        default=0,
        metavar="BYTES",
        help="host memory for KV swapped out by QLM eviction, as `kairos serve --swap-space` (e.g. 64GiB); "
        "its copies cost the cost model's host bandwidth; 0 = evict by recompute only",
    )
    r = p.add_argument_group("report")
    r.add_argument(
        "--goodput", nargs="+", default=[], metavar="METRIC:MS", help="SLOs: ttft:MS tpot:MS e2el:MS"
    )
    r.add_argument("--json", type=Path, default=None, help="write the report (and every request) here")
    r.add_argument("--save-steps", action="store_true", help="also store every step's record in the JSON")
    return p


def build_calibrate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kairos simulate calibrate", description="fit the cost model to the real engine")
    p.add_argument("--model", default="default", help="as `kairos serve --model`")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per shape (median kept)")
    p.add_argument("--out", type=Path, default=Path("docs/results/simulator/cpu-smollm2.json"))
    p.add_argument("--markdown", type=Path, default=None, help="also write the summary here")
    return p


# ---- workload → simulated requests --------------------------------------------------------------------------


def plan_requests(
    args: argparse.Namespace, max_model_len: int
) -> tuple[str, list[SimRequest], dict[str, Any]]:
    num = args.num_requests
    if num is None:
        if args.rate is None or args.duration is None:
            raise UsageError("give --num-requests, or --rate and --duration")
        num = max(1, math.ceil(args.rate * args.duration))
    keep_ids = args.workload in SHARED_PREFIX_WORKLOADS
    config = WorkloadConfig(
        data_dir=args.data_dir,
        num_requests=num,
        seed=args.seed,
        max_model_len=max_model_len,
        prompt_format="ids" if keep_ids else "text",  # text: a string per prompt, far smaller than id tuples
        rate=args.rate,
        burstiness=args.burstiness,
        time_scale=args.time_scale,
        max_tokens=args.max_tokens,
        use_recorded_length=True,  # a simulated request never samples EOS: its recorded length is its length
        num_tenants=args.num_tenants,
        slo_class=args.slo_class,
    )
    try:
        workload = build_workload(args.workload, config)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    planned = cut_at(list(workload.requests), args.duration)
    requests = [to_sim_request(r, args.rl, keep_ids, args.client_max_tokens) for r in planned]
    if args.rl_noise > 0:
        rng = np.random.default_rng((args.seed, RL_NOISE_STREAM))
        requests = with_rl_noise(requests, args.rl_noise, rng, args.rl_coverage)
    return workload.name, requests, workload.info


def cut_at(planned: list[PlannedRequest], duration_s: float | None) -> list[PlannedRequest]:
    """Open-loop requests sent before `duration_s` (and the closed-loop ones chained to them), re-indexed."""
    if duration_s is None:
        return planned
    new_index: dict[int, int] = {}
    kept: list[PlannedRequest] = []
    for r in planned:
        if (r.after is None and r.offset_s >= duration_s) or (
            r.after is not None and r.after not in new_index
        ):
            continue
        new_index[r.index] = len(kept)
        after = None if r.after is None else new_index[r.after]
        kept.append(PlannedRequest(**{**r.__dict__, "index": len(kept), "after": after}))
    return kept


def to_sim_request(r: PlannedRequest, rl: str, keep_ids: bool, client_max_tokens: int = 0) -> SimRequest:
    length = r.max_tokens
    return SimRequest(
        arrival_s=r.offset_s,
        num_prompt_tokens=r.num_prompt_tokens,
        num_output_tokens=length,
        tenant=r.tenant,
        app_id=r.app_id,
        slo_class=r.slo_class,
        rl_mean=float(length) if rl == "oracle" else 0.0,
        rl_q=float(length) if rl == "oracle" else 0.0,
        prompt_token_ids=tuple(r.prompt) if keep_ids and isinstance(r.prompt, tuple) else None,
        after=r.after,
        max_tokens=max(client_max_tokens, length) if client_max_tokens else 0,
    )


def with_rl_noise(
    requests: list[SimRequest], sigma: float, rng: np.random.Generator, coverage: float = 0.5
) -> list[SimRequest]:
    """Length tags = true length × a log-normal factor: a predictor of known spread. rl_mean's factor has median
    1; rl_q's is shifted by Φ⁻¹(coverage)·sigma in log space, so P(rl_q ≥ true length) = coverage, as for a
    calibrated upper-quantile predictor (coverage 0.5: the same factor as rl_mean)."""
    if not 0.0 < coverage < 1.0:
        raise UsageError(f"--rl-coverage must be in (0, 1), got {coverage}")
    z = rng.normal(0.0, 1.0, len(requests))
    shift = statistics.NormalDist().inv_cdf(coverage) * sigma
    return [
        replace(
            r,
            rl_mean=max(1.0, r.rl_mean * math.exp(sigma * e)),
            rl_q=max(1.0, r.rl_q * math.exp(sigma * e + shift)),
        )
        for r, e in zip(requests, z.tolist(), strict=True)
    ]


# ---- simulation → loadgen report ----------------------------------------------------------------------------


def request_results(result: SimulationResult) -> list[RequestResult]:
    """loadgen's per-request view of the simulation: send = arrival, TTFT = first token − arrival, ..."""
    out = []
    for request, record in zip(result.requests, result.records, strict=True):
        times = record.token_times_s
        ok = record.is_done
        out.append(
            RequestResult(
                index=record.index,
                tenant=request.tenant,
                app_id=request.app_id,
                slo_class=request.slo_class,
                prompt_tokens=request.num_prompt_tokens,
                max_tokens=request.num_output_tokens,
                status="ok" if ok else "error",
                error=record.error or ("" if ok else "did not finish"),
                scheduled_s=record.arrival_s,
                start_s=record.arrival_s,
                end_s=times[-1] if times else record.arrival_s,
                ttft=times[0] - record.arrival_s if times else 0.0,
                e2e=times[-1] - record.arrival_s if times else 0.0,
                itl=np.diff(times).tolist(),
                output_tokens=len(times),
                usage_seen=True,
            )
        )
    return out


def kv_summary(result: SimulationResult) -> dict[str, Any]:
    """Time-weighted (by step length) KV in tokens: allocated blocks, tokens written, reservations if any."""
    steps = result.steps
    pool = result.num_kv_blocks * result.config.scheduler.block_size
    if not steps:
        return {"pool_tokens": pool}
    w = np.array([s.seconds for s in steps])
    w = w / w.sum() if w.sum() > 0 else np.full(len(steps), 1 / len(steps))
    allocated = np.array([s.kv_allocated_tokens for s in steps], dtype=np.float64)
    written = np.array([s.kv_written_tokens for s in steps], dtype=np.float64)
    summary: dict[str, Any] = {
        "pool_tokens": pool,
        "mean_usage": float(w @ allocated) / pool,
        "max_usage": float(allocated.max()) / pool,
        "mean_allocated_tokens": float(w @ allocated),
        "mean_written_tokens": float(w @ written),
        "mean_reserved_tokens": None,
    }
    if all(s.kv_reserved_tokens is not None for s in steps):
        summary["mean_reserved_tokens"] = float(
            w @ np.array([s.kv_reserved_tokens for s in steps], dtype=float)
        )
    return summary


def build_sim_report(
    result: SimulationResult, slo_ms: dict[str, float], meta: dict[str, Any]
) -> tuple[dict[str, Any], list[RequestResult]]:
    results = request_results(result)
    duration = max((r.end_s for r in results), default=0.0)
    report = build_report(results, duration, slo_ms, meta)
    ok = [r for r in results if r.ok]
    report["slo_attainment"] = sum(is_good(r, slo_ms) for r in ok) / len(ok) if slo_ms and ok else None
    report["num_preemptions_total"] = result.num_preemptions_total
    report["num_swaps_total"] = int(result.extra.get("num_swaps_total", 0))
    report["num_evictions_total"] = int(result.extra.get("num_evictions_total", 0))
    report["engine_extra"] = result.extra
    report["num_requests_preempted"] = sum(rec.num_preemptions > 0 for rec in result.records)
    report["mean_jct_s"] = float(np.mean([r.e2e for r in ok])) if ok else None
    report["kv"] = kv_summary(result)
    report["num_steps"] = len(result.steps)
    report["simulated_seconds"] = result.end_s
    report["wall_seconds"] = result.wall_seconds
    return report, results


def format_sim_summary(report: dict[str, Any]) -> str:
    kv = report["kv"]
    lines = [
        f"SIMULATED with cost model {report['cost_model']} ({report['cost_model_source']}); policy "
        f"{report['policy']}, {report['num_kv_blocks']} KV blocks of {report['block_size']} tokens",
        f"preemptions {report['num_preemptions_total']} ({report['num_requests_preempted']} requests; "
        f"{report['num_swaps_total']} by swap, {report['num_evictions_total']} QLM evictions); "
        f"mean JCT {report['mean_jct_s'] or 0:.3f} s; SLO attainment "
        f"{'-' if report['slo_attainment'] is None else format(report['slo_attainment'], '.1%')}",
        f"KV usage mean {kv.get('mean_usage', 0):.1%} max {kv.get('max_usage', 0):.1%}; tokens allocated "
        f"{kv.get('mean_allocated_tokens', 0):.0f} vs written {kv.get('mean_written_tokens', 0):.0f} (time mean)"
        + (
            f", reserved {kv['mean_reserved_tokens']:.0f}"
            if kv.get("mean_reserved_tokens") is not None
            else ""
        ),
        f"{report['num_steps']} steps, {report['simulated_seconds']:.1f} simulated s in "
        f"{report['wall_seconds']:.2f} wall s",
    ]
    return "\n".join(lines)


def full_pool_step_s(cost_model: CostModel, args: argparse.Namespace) -> float:
    """Justitia's t_iter: one step of --max-num-seqs decodes whose contexts fill the KV pool, so that M / t_iter
    is the KV token-time the simulated engine serves per second when memory is what apps compete for."""
    num_blocks = args.kv_blocks or cost_model.num_kv_blocks * cost_model.block_size // args.block_size
    return cost_model.step_seconds(StepShape(0, args.max_num_seqs, num_blocks * args.block_size))


def host_blocks(cost_model: CostModel, swap_space_bytes: int, block_size: int) -> int:
    """--swap-space in KV blocks of the modelled engine (its bytes per token come from the cost model)."""
    if not swap_space_bytes:
        return 0
    if cost_model.kv_bytes_per_token <= 0:
        raise UsageError(f"--swap-space: cost model {cost_model.name} knows no KV bytes per token")
    return swap_space_bytes // (cost_model.kv_bytes_per_token * block_size)


def replay(args: argparse.Namespace, argv: Sequence[str]) -> int:
    slo = parse_goodput(args.goodput)
    try:
        cost_model = CostModel.load(args.cost_model)
    except ValueError as e:
        raise UsageError(str(e)) from None
    max_model_len = args.max_model_len or cost_model.max_model_len
    name, requests, info = plan_requests(args, max_model_len)
    scheduler = SchedulerConfig(
        policy=args.policy,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        enable_prefix_caching=not args.no_prefix_caching,
        kv_reserve_fraction=args.kv_reserve_fraction,
        ecoserve_lending=not args.no_lending,
        ecoserve_grouping=not args.no_grouping,
        ecoserve_ordering=not args.no_ordering,
        fair_iteration_s=args.fair_iteration_s or full_pool_step_s(cost_model, args),
        app_idle_timeout=args.app_idle_timeout,
        slo=tuple(args.slo),
    )
    config = SimConfig(
        scheduler=scheduler,
        num_kv_blocks=args.kv_blocks,
        num_host_blocks=host_blocks(cost_model, args.swap_space, args.block_size),
        max_model_len=max_model_len,
    )
    try:
        result = simulate(requests, cost_model, config)
    except ValueError as e:
        raise UsageError(str(e)) from None
    meta = {
        "simulated": True,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "workload": f"{name}, SIMULATED",
        "workload_info": info,
        "num_prompts": len(requests),
        "request_rate": args.rate if args.rate is not None else "trace",
        "burstiness": args.burstiness,
        "time_scale": args.time_scale,
        "seed": args.seed,
        "max_model_len": max_model_len,
        "policy": args.policy,
        "cost_model": cost_model.name,
        "cost_model_source": cost_model.source,
        "cost_model_coefficients": cost_model.coefficients,
        "num_kv_blocks": result.num_kv_blocks,
        "block_size": args.block_size,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "rl_source": args.rl,
        "rl_noise_sigma": args.rl_noise,
        "rl_coverage": args.rl_coverage,
        "scheduler_config": scheduler.__dict__,
        "client_max_tokens": args.client_max_tokens or "true length",
        "num_host_blocks": config.num_host_blocks,
        "argv": ["kairos", "simulate", *argv],
    }
    report, results = build_sim_report(result, slo, meta)
    sys.stdout.write(format_table(report) + "\n" + format_sim_summary(report) + "\n")
    if args.json is not None:
        report["requests"] = [
            {**r.to_dict(), "num_preemptions": rec.num_preemptions}
            for r, rec in zip(results, result.records, strict=True)
        ]
        if args.save_steps:
            report["steps"] = [s.__dict__ for s in result.steps]
        report["rwt_pairs"] = result.rwt_pairs  # QLM's (estimated, actual) waits; empty for other policies
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return 0 if report["completed"] else 1


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    try:
        if argv[:1] == ["calibrate"]:
            from engine.calibrate import main_calibrate

            return main_calibrate(build_calibrate_parser().parse_args(argv[1:]), argv)
        return replay(build_replay_parser().parse_args(argv), argv)
    except UsageError as e:
        sys.stderr.write(f"kairos simulate: error: {e}\n")
        return 2
