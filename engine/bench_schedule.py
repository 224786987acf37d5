"""Scheduling overhead: the time of one `schedule()` + `update()` with 256 running and 1,000 waiting requests, per
policy, with no model (the sampled token is a constant). Results: docs/results/scheduler_overhead.md.

    python -m engine.bench_schedule [--steps 200] [--running 256] [--waiting 1000]

Two memory regimes per policy:
  seq-bound     the running set is at max_num_seqs (256), so the waiting queue is ordered but nobody is tried;
  memory-bound  max_num_seqs is 4× higher and the pool holds just the running set's reservations, so every step
                orders the waiting queue and tries requests (up to the policy's admission window), which the
                ledger refuses. Policies without a ledger (vllm, sjf-oracle) admit whatever fits in free blocks,
                so they have no steady memory-bound state with a fixed running set and are timed seq-bound only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

from engine.batch import ModelOutput
from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.kv_ledger import NoReservations
from engine.policy import POLICIES, make_policy
from engine.protocol import SamplingParams
from engine.request import Request
from engine.scheduler import Scheduler

PROMPT_TOKENS = 32
PREDICTED_TOKENS = 480  # rl_q; the bucket (64) reserves 512 output tokens per request
MAX_TOKENS = 4096


def build(policy: str, config: SchedulerConfig, num_running: int, memory_bound: bool) -> Scheduler:
    if memory_bound:
        config = replace(config, max_num_seqs=4 * num_running)
    scheduler = _scheduler(policy, config, num_blocks=1 << 20)
    ledger = scheduler.ledger
    if isinstance(ledger, NoReservations):
        tokens_per_request = PROMPT_TOKENS + 512
    else:
        tokens_per_request = ledger.initial_reservation(make_request(0)) + ledger.slack
    num_blocks = -(-num_running * tokens_per_request // config.block_size)
    if memory_bound:  # exactly the running set's reservations fit in pool - reserve
        num_capacity_blocks = num_blocks
        while int(num_blocks * (1 - ledger.config.reserve_fraction)) < num_capacity_blocks + 1:
            num_blocks += 1
    else:
        num_blocks *= 4
    return _scheduler(policy, config, num_blocks)


def _scheduler(policy: str, config: SchedulerConfig, num_blocks: int) -> Scheduler:
    return Scheduler(
        config,
        BlockManager(num_blocks, config.block_size, config.enable_prefix_caching),
        make_policy(policy, config),
        max_model_len=8192,
        eos_token_ids=(2,),
        clock=lambda: 0.0,
    )


def make_request(index: int) -> Request:
    prompt = [3 + (index * 7 + i) % 900 for i in range(PROMPT_TOKENS)]
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return Request(
        f"r{index}", prompt, sampling, arrival_time=float(index), rl_mean=200.0, rl_q=PREDICTED_TOKENS
    )


def step(scheduler: Scheduler) -> None:
    output = scheduler.schedule()
    sampled = {s.request_id: 7 for s in output.scheduled if s.needs_sample}
    scheduler.update(output, ModelOutput(sampled))


def measure(
    policy: str, config: SchedulerConfig, args: argparse.Namespace, memory_bound: bool
) -> list[float]:
    scheduler = build(policy, config, args.running, memory_bound)
    for i in range(args.running):
        scheduler.add_request(make_request(i))
    while any(r.is_prefilling for r in scheduler.running) or len(scheduler.running) < args.running:
        step(scheduler)
    for i in range(args.running, args.running + args.waiting):
        scheduler.add_request(make_request(i))
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step(scheduler)
        seconds.append(time.perf_counter() - start)
    # Lending may admit a few waiting requests into the tails of the running set (they were prefilled over several
    # steps, so they end at different steps); nobody finishes or is preempted.
    assert len(scheduler.running) + len(scheduler.waiting) == args.running + args.waiting
    assert len(scheduler.running) >= args.running and scheduler.num_preemptions_total == 0
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--running", type=int, default=256)
    parser.add_argument("--waiting", type=int, default=1000)
    args = parser.parse_args(argv)
    variants = [(name, SchedulerConfig(policy=name)) for name in POLICIES]
    variants += [
        ("ecoserve no-lending", SchedulerConfig(policy="ecoserve", ecoserve_lending=False)),
        ("ecoserve no-grouping", SchedulerConfig(policy="ecoserve", ecoserve_grouping=False)),
        ("ecoserve no-ordering", SchedulerConfig(policy="ecoserve", ecoserve_ordering=False)),
    ]
    print("| policy | regime | median ms | p99 ms |")
    print("|---|---|---|---|")
    for label, config in variants:
        has_ledger = not isinstance(
            make_policy(config.policy, config).make_ledger(BlockManager(1, 16), 1), NoReservations
        )
        for memory_bound in (False, True) if has_ledger else (False,):
            seconds = sorted(measure(config.policy, config, args, memory_bound))
            p99 = seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))]
            regime = "memory-bound" if memory_bound else "seq-bound"
            print(f"| {label} | {regime} | {statistics.median(seconds) * 1e3:.3f} | {p99 * 1e3:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
