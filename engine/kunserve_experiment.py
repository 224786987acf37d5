"""E4 (DESIGN §8), simulated at GPU scale: tail TTFT under a memory spike, 2 replicas, no drop vs swap vs drop.

    .venv/bin/python -m engine.kunserve_experiment --num-requests 3000 --kv-blocks 10516 --json OUT.json

The workload is loadgen's azure-code trace replay (engine/simulate_cli.py plans it), the cost model the
h100-llama3-8b preset, and the drop model's numbers are assumptions written out in `drop_model` below. Everything is
SIMULATED; the markdown table goes to stdout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.config import SchedulerConfig
from engine.cost_model import CostModel
from engine.kunserve_sim import MODES, DropModel, ReplicaSimConfig, ReplicaSimResult, simulate_replicas
from engine.simulate_cli import build_replay_parser, plan_requests

# Llama-3-8B, bf16 (public facts): 8.03e9 parameters, of which embed_tokens and the untied lm_head are
# 2 x 128256 x 4096; the rest are the 32 decoder layers that a drop releases. KV: 128 KiB per token.
LLAMA3_8B_LAYER_BYTES = int((8.03e9 - 2 * 128256 * 4096) * 2)
KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2
NVLINK_BYTES_PER_S = 300e9  # ASSUMPTION: NVLink 4, ~2/3 of its 450 GB/s per direction
PCIE_BYTES_PER_S = 50e9  # ASSUMPTION: PCIe 5 x16 effective, as the cost model's swap bandwidth
HANDOFF_S = 20e-6  # ASSUMPTION: one activation transfer per stage boundary per step (a few MB over NVLink)


def drop_model(block_size: int, num_replicas: int = 2) -> DropModel:
    block_bytes = KV_BYTES_PER_TOKEN * block_size
    return DropModel(
        layer_blocks=LLAMA3_8B_LAYER_BYTES // block_bytes,
        exchange_s_per_block=block_bytes / NVLINK_BYTES_PER_S,
        handoff_s=HANDOFF_S,
        reload_s=LLAMA3_8B_LAYER_BYTES * (num_replicas - 1) / num_replicas / PCIE_BYTES_PER_S,
    )


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = p / 100 * (len(ordered) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def summary(result: ReplicaSimResult) -> dict:
    done = [r for r in result.records if r.is_done]
    ttft = [r.first_token_s - r.arrival_s for r in done]
    tpot = [
        (r.token_times_s[-1] - r.token_times_s[0]) / (len(r.token_times_s) - 1)
        for r in done
        if len(r.token_times_s) > 1
    ]
    row = {"mode": result.config.mode, "num_done": len(done), "num_requests": len(result.records)}
    for name, values in (("ttft", ttft), ("tpot", tpot)):
        for p in (50, 99, 99.9):
            row[f"{name}_p{p}_s"] = percentile(values, p)
    return row | {
        "num_preemptions": result.num_preemptions_total,
        "num_drops": result.num_drops,
        "num_restores": result.num_restores,
        "num_drops_refused": result.num_drops_refused,
        "throttled_s": result.throttled_s,
        "memory_limit_s": result.limit_s,
        "capacity_blocks": result.capacity,
        "regroup_seconds": result.regroup_seconds,
        "wall_seconds": result.wall_seconds,
    }


def markdown(rows: list[dict]) -> str:
    def f(x: float | None, scale: float = 1.0, digits: int = 2) -> str:
        return "–" if x is None else f"{x * scale:.{digits}f}"

    lines = [
        "| mode | TTFT p50 (s) | p99 | p99.9 | TPOT p50 (ms) | p99 | p99.9 | preemptions | drops / restores "
        "| throttled at (s) | memory limit at (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {f(r['ttft_p50_s'])} | {f(r['ttft_p99_s'])} | {f(r['ttft_p99.9_s'])} "
            f"| {f(r['tpot_p50_s'], 1e3, 1)} | {f(r['tpot_p99_s'], 1e3, 1)} | {f(r['tpot_p99.9_s'], 1e3, 1)} "
            f"| {r['num_preemptions']} | {r['num_drops']} / {r['num_restores']} | {f(r['throttled_s'], 1, 1)} "
            f"| {f(r['memory_limit_s'], 1, 1)} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_replay_parser()
    parser.description = __doc__
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES)
    )
    parser.add_argument("--micro-batches", type=int, default=2, help="in flight per pipeline step")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--workload" not in argv:
        argv = ["--workload", "azure-code", *argv]
    if "--cost-model" not in argv:
        argv = ["--cost-model", "h100-llama3-8b", *argv]
    args = parser.parse_args(argv)
    cost_model = CostModel.load(args.cost_model)
    name, requests, info = plan_requests(args, cost_model.max_model_len)
    block_size = cost_model.block_size
    model = drop_model(block_size)
    model = DropModel(**{**model.__dict__, "micro_batches": args.micro_batches})
    host_blocks = int(getattr(args, "swap_space", 0) or 0) // (KV_BYTES_PER_TOKEN * block_size)
    rows = []
    for mode in args.modes.split(","):
        config = ReplicaSimConfig(
            drop=model,
            scheduler=SchedulerConfig(policy=args.policy, block_size=block_size),
            mode=mode,
            num_kv_blocks=args.kv_blocks or 0,
            num_host_blocks=host_blocks or (args.kv_blocks or cost_model.num_kv_blocks) * 2,
        )
        rows.append(summary(simulate_replicas(requests, cost_model, config)))
        print(f"{mode}: done in {rows[-1]['wall_seconds']:.1f}s", file=sys.stderr)
    meta = {
        "workload": name,
        "workload_info": info,
        "num_requests": len(requests),
        "cost_model": cost_model.name,
        "cost_model_source": cost_model.source,
        "drop_model": model.__dict__,
        "kv_blocks_per_replica": args.kv_blocks or cost_model.num_kv_blocks,
        "argv": argv,
        "label": "SIMULATED",
    }
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
