"""E2 across 2 replicas, simulated: QLM's RWT balancer vs least-loaded dispatch on the mixed-class workloads.

    .venv/bin/python -m engine.balance_experiment --workload mixed-sharegpt --rate 32 --num-requests 3000 \\
        --max-tokens 1024 --kv-blocks 2048 --swap-space 64GiB

Two replicas on their own virtual clocks (engine/kunserve_sim.py's loop, swap mode: no parameter drop, preemption
may swap KV to host), each with E2's engine (h100-llama3-8b cost model, an ASSUMPTION; `--kv-blocks` per replica).
Variants: vllm and qlm with the least-loaded dispatch, qlm with `RwtBalancer`, and its ablations: never join a
group's replica (least estimated wait only), and price every replica at the mean measured Θ, alone and together. The classes are scored on E2's
targets (interactive: TTFT ≤ 2 s and TPOT ≤ 0.2 s; batch: e2e ≤ 60 s). Everything is SIMULATED; a markdown table
goes to stdout.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from engine.balance import Balancer, LeastLoaded, RwtBalancer
from engine.config import SchedulerConfig
from engine.cost_model import CostModel
from engine.kunserve_sim import DropModel, ReplicaSimConfig, _ReplicaSim
from engine.request import Request
from engine.simulate_cli import build_replay_parser, host_blocks, plan_requests
from engine.simulator import SimRequest, _add_message

TARGETS = {
    "interactive": (2.0, 0.2, float("inf")),
    "batch": (float("inf"), float("inf"), 60.0),
}  # ttft, tpot, e2e
SLO_SPECS = ("interactive:ttft=2,tpot=0.2", "batch:e2e=60")
VARIANTS = (
    ("vllm", "least-loaded"),
    ("qlm", "least-loaded"),
    ("qlm", "rwt"),
    ("qlm", "rwt-nojoin"),
    ("qlm", "rwt-mean"),
    ("qlm", "rwt-mean-nojoin"),
)
BALANCERS = {  # ablations of RwtBalancer: no group co-location; every replica priced at the mean measured Θ
    "least-loaded": LeastLoaded,
    "rwt": RwtBalancer,
    "rwt-nojoin": lambda: RwtBalancer(join_groups=False),
    "rwt-mean": lambda: RwtBalancer(shared_theta=True),
    "rwt-mean-nojoin": lambda: RwtBalancer(join_groups=False, shared_theta=True),
}


class BalancedSim(_ReplicaSim):
    """The replica simulation with the dispatch rule given (the base class places least-loaded)."""

    def __init__(self, requests: list[SimRequest], cost_model: CostModel, config, balancer: Balancer) -> None:
        super().__init__(requests, cost_model, config)
        self.balancer = balancer
        self.placements: Counter[str] = Counter()

    def _add(self, index: int, arrival_s: float, live: dict) -> None:
        r = self.requests[index]
        msg = _add_message(index, r, arrival_s)
        placement = self.balancer.place(Request.from_message(msg), [g.scheduler for g in self.groups])
        self.placements[placement.reason] += 1
        group = self.groups[placement.index]
        group.clock.jump_to(arrival_s)  # an idle group starts now; a busy one takes it after its step
        self.result.records[index].arrival_s = arrival_s
        group.core.add_request(msg)
        if r.max_tokens > r.num_output_tokens:
            self.eos_after[str(index)] = r.num_output_tokens
        if (request := group.scheduler.requests.get(str(index))) is not None:
            live[str(index)] = request


def attainment(requests: list[SimRequest], sim: BalancedSim) -> dict[str, float]:
    """Share of each class's requests that finished within every target of their class."""
    met: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for request, record in zip(requests, sim.result.records, strict=True):
        ttft_s, tpot_s, e2e_s = TARGETS[request.slo_class]
        total[request.slo_class] += 1
        if not record.is_done:
            continue
        times = record.token_times_s
        tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
        ttft, e2e = times[0] - record.arrival_s, times[-1] - record.arrival_s
        met[request.slo_class] += ttft <= ttft_s and tpot <= tpot_s and e2e <= e2e_s
    return {name: met[name] / total[name] for name in total}


def run_variant(requests, cost_model, args, policy: str, dispatch: str, num_host_blocks: int) -> dict:
    config = ReplicaSimConfig(
        drop=DropModel(layer_blocks=0),
        scheduler=SchedulerConfig(policy=policy, block_size=args.block_size, slo=SLO_SPECS),
        mode="swap",
        num_kv_blocks=args.kv_blocks or 0,
        num_host_blocks=num_host_blocks,
    )
    sim = BalancedSim(requests, cost_model, config, BALANCERS[dispatch]())
    result = sim.run()
    done = [r for r in result.records if r.is_done]
    return {
        "policy": policy,
        "dispatch": dispatch,
        **{f"{name}_slo": value for name, value in attainment(requests, sim).items()},
        "num_done": len(done),
        "num_preemptions": result.num_preemptions_total,
        "placements": dict(sim.placements),
        "simulated_seconds": max((r.finish_s or 0.0) for r in result.records),
        "wall_seconds": result.wall_seconds,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| policy | dispatch | interactive SLO | batch SLO | preemptions | placements | wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        placements = ", ".join(f"{k} {v}" for k, v in sorted(r["placements"].items()))
        lines.append(
            f"| {r['policy']} | {r['dispatch']} | {r.get('interactive_slo', 0):.1%} | {r.get('batch_slo', 0):.1%} "
            f"| {r['num_preemptions']} | {placements} | {r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_replay_parser()
    parser.description = __doc__
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--cost-model" not in argv:
        argv = ["--cost-model", "h100-llama3-8b", *argv]
    args = parser.parse_args(argv)
    cost_model = CostModel.load(args.cost_model)
    name, requests, info = plan_requests(args, cost_model.max_model_len)
    num_host_blocks = host_blocks(cost_model, args.swap_space, args.block_size)
    rows = []
    for policy, dispatch in VARIANTS:
        rows.append(run_variant(requests, cost_model, args, policy, dispatch, num_host_blocks))
        print(f"{policy}/{dispatch}: done in {rows[-1]['wall_seconds']:.1f}s", file=sys.stderr)
    meta = {"workload": name, "workload_info": info, "num_requests": len(requests), "argv": argv}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
