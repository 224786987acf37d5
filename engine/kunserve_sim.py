"""E4 at GPU scale: N replicas of one model on the simulator's virtual clocks, with and without KunServe's drop.

Each group (a replica, or a pipeline of replicas after a drop) is the real scheduler in an EngineCore with a
SimulatedRunner and its own VirtualClock: groups run in parallel, as GPUs do, and the loop always steps the group
whose clock is earliest, so every clock only moves forward. New requests go to the least-loaded group. Modes:

    recompute   no drop; a request that cannot get a block is preempted by recompute (vLLM)
    swap        no drop; preemption copies the KV to a host pool when that is cheaper (engine/swap.py)
    drop        KunServe: the memory monitor and the drop plan of engine/kunserve.py regroup the replicas, when
                the cost check (estimate_drop: exchange stall + pipeline slowdown vs queueing saved) says it pays
    drop-always the same without the cost check (the monitor's vote alone, as the authors' code)

The drop model (DropModel; its numbers are assumptions for a GPU box, not measurements):
    capacity    a group of k replicas holds k·n + (k−1)·layer_blocks blocks: each merge frees one copy of the
                decoder layers, worth `layer_blocks` KV blocks (as engine/replicas.py sizes the real pools)
    latency     a regroup starts when every dissolved group's step in flight has ended, and stalls the new group
                for the KV exchange (blocks moved × (k−1)/k of their layers change device × exchange_s_per_block);
                a restore first reloads the dropped layers from host memory for reload_s while the pipeline keeps
                serving (as engine/replicas.py does; the pool is not shrunk meanwhile), a drop vote cancels it
    step cost   a pipeline step: m micro-batches through k stages, each stage 1/k of the cost model's step for
                a micro-batch, (m + k − 1) slots plus hand-offs (PipelineSimRunner); m = 1 is the plain sum of the
                stage costs (the real CPU pipeline, engine/pipeline.py), m = 2 the paper's two in flight

Torch-free; the experiment is loadgen/experiment_kunserve.py.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from dataclasses import dataclass, field

from engine.batch import ModelOutput, SchedulerOutput
from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.core import EngineCore
from engine.cost_model import CostModel, StepShape
from engine.kunserve import (
    DropCosts,
    DropEstimate,
    MemoryMonitor,
    MonitorConfig,
    adopt,
    arrival_rate,
    estimate_drop,
    plan_drop,
    plan_moves,
)
from engine.policy import make_policy
from engine.scheduler import Scheduler
from engine.simulator import RequestRecord, SimRequest, SimulatedRunner, VirtualClock, _add_message, _Arrivals
from engine.swap import SwapSpace

MODES = ("recompute", "swap", "drop", "drop-always")


@dataclass(frozen=True)
class DropModel:
    layer_blocks: int  # KV blocks one copy of the decoder layers is worth (layer bytes // block bytes)
    exchange_s_per_block: float = 0.0  # one block's KV (all layers) from one device to another
    handoff_s: float = 0.0  # activations across one stage boundary, per step
    micro_batches: int = 2  # in flight per pipeline step (PipelineSimRunner)
    reload_s: float = 0.0  # a restore: the dropped layers back from host memory


@dataclass(frozen=True)
class ReplicaSimConfig:
    drop: DropModel
    scheduler: SchedulerConfig = SchedulerConfig()
    mode: str = "drop"
    num_replicas: int = 2
    num_kv_blocks: int = 0  # per replica
    num_host_blocks: int = 0  # per replica, swap mode
    monitor: MonitorConfig = MonitorConfig()
    max_model_len: int = 0
    check_invariants: bool = False


class PipelineSimRunner(SimulatedRunner):
    """A pipeline group's runner. The batch is cut into m micro-batches; a stage runs its 1/k of the layers on one
    micro-batch in cost(shape / m) / k, so the step's critical path is (m + k − 1) stage slots (the fill and drain
    bubbles included) plus a hand-off per stage boundary. m = 1 is the sum of the stage costs, as the real CPU
    pipeline runs; the next step's micro-batches wait for this step's tokens, so bubbles are not hidden."""

    def __init__(self, *args, num_stages: int, micro_batches: int, handoff_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_stages, self.micro_batches, self.handoff_s = num_stages, micro_batches, handoff_s

    def execute(self, output: SchedulerOutput) -> ModelOutput:
        k, m = self.num_stages, self.micro_batches
        shape = self.last_shape = StepShape.of(output)
        part = StepShape(
            shape.prefill_tokens / m, shape.num_decode / m, shape.sum_context / m, shape.prefill_pairs / m
        )
        seconds = (m + k - 1) * self.cost_model.step_seconds(part) / k + (k - 1) * self.handoff_s
        self.last_seconds = seconds
        self.clock.advance(seconds)
        self.num_steps += 1
        self.busy_seconds += seconds
        sampled = {item.request_id: self._token(item) for item in output.scheduled if item.needs_sample}
        return ModelOutput(sampled, seconds)


@dataclass
class _Group:
    replica_ids: tuple[int, ...]
    clock: VirtualClock
    runner: SimulatedRunner
    core: EngineCore

    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler


@dataclass
class ReplicaSimResult:
    config: ReplicaSimConfig
    records: list[RequestRecord]
    capacity: list[
        tuple[float, int]
    ]  # (simulated s, KV blocks of all groups), at the start and every regroup
    num_drops: int = 0
    num_restores: int = 0
    num_drops_refused: int = 0  # drop votes the cost check turned down
    num_preemptions_total: int = 0
    throttled_s: float | None = None  # first time usage ≥ drop_usage with pending ≥ free
    limit_s: float | None = None  # first time throttled with nothing left to drop (the memory limit)
    wall_seconds: float = 0.0
    regroup_seconds: list[float] = field(default_factory=list)  # stall of each regroup


class _ReplicaSim:
    def __init__(self, requests: list[SimRequest], cost_model: CostModel, config: ReplicaSimConfig) -> None:
        if config.mode not in MODES:
            raise ValueError(f"mode {config.mode!r}: expected one of {MODES}")
        self.requests, self.cost_model, self.config = requests, cost_model, config
        self.num_blocks = config.num_kv_blocks or (
            cost_model.num_kv_blocks * cost_model.block_size // config.scheduler.block_size
        )
        self.max_model_len = config.max_model_len or cost_model.max_model_len
        self.swap_s = cost_model.swap_seconds_per_block(config.scheduler.block_size) or 0.0
        self.eos_after: dict[str, int] = {}  # shared by every runner: a request keeps its EOS when it moves
        self.monitor = MemoryMonitor(config.monitor)
        self.groups = [self._group((i,), VirtualClock()) for i in range(config.num_replicas)]
        self.result = ReplicaSimResult(config, [RequestRecord(i, 0.0) for i in range(len(requests))], [])
        self.result.capacity.append((0.0, self.total_blocks))
        self._retired_preemptions = 0
        self._restore_at: float | None = None  # a restore's reload ends then (simulated s)
        self.arrivals: deque[float] = deque(maxlen=10_000)  # recent arrival times, for the arrival rate
        self.dp_step_s = self.dp_token_s = 0.0  # EWMAs of a data-parallel group's step and s per token

    @property
    def total_blocks(self) -> int:
        return sum(g.scheduler.block_manager.num_blocks for g in self.groups)

    def _capacity(self, ids: tuple[int, ...]) -> int:
        return len(ids) * self.num_blocks + (len(ids) - 1) * self.config.drop.layer_blocks

    def _group(self, ids: tuple[int, ...], clock: VirtualClock) -> _Group:
        config, num_blocks = self.config, self._capacity(ids)
        host = config.num_host_blocks if config.mode == "swap" and len(ids) == 1 else 0
        if len(ids) == 1:
            runner = SimulatedRunner(
                self.cost_model, clock, num_blocks, self.max_model_len, host, self.swap_s
            )
        else:
            runner = PipelineSimRunner(
                self.cost_model, clock, num_blocks, self.max_model_len, num_stages=len(ids),
                micro_batches=config.drop.micro_batches, handoff_s=config.drop.handoff_s,
            )  # fmt: skip
        runner.eos_after = self.eos_after
        policy = make_policy(config.scheduler.policy, config.scheduler)
        if config.mode == "swap":
            policy = dataclasses.replace(policy, swaps=True)
        blocks = BlockManager(num_blocks, config.scheduler.block_size, config.scheduler.enable_prefix_caching)
        scheduler = Scheduler(
            config.scheduler, blocks, policy, self.max_model_len, runner.eos_token_ids, clock,
            SwapSpace(host, self.swap_s),
        )  # fmt: skip
        return _Group(ids, clock, runner, EngineCore(scheduler, runner, config.check_invariants))

    def run(self) -> ReplicaSimResult:
        wall_start = time.perf_counter()
        arrivals = _Arrivals(self.requests)
        records = self.result.records
        live = {}
        while True:
            busy = [g for g in self.groups if g.core.has_work()]
            t_group = min((g.clock.now for g in busy), default=math.inf)
            t_arrival = arrivals.next_time() if arrivals.has_next() else math.inf
            if t_group == t_arrival == math.inf:
                break
            if t_arrival <= t_group:
                for index, arrival_s in arrivals.pop_until(t_arrival):
                    self._add(index, arrival_s, live)
                continue
            group = min(busy, key=lambda g: g.clock.now)
            num_steps = group.runner.num_steps
            for delta in group.core.step():
                record = records[int(delta.request_id)]
                record.token_times_s.extend([group.clock.now] * len(delta.token_ids))
                if delta.finish_reason is None:
                    continue
                record.finish_reason, record.error = delta.finish_reason.openai_name, delta.error
                if (request := live.pop(delta.request_id, None)) is not None:
                    record.num_preemptions = request.num_preemptions
                self.eos_after.pop(delta.request_id, None)
                arrivals.finished(int(delta.request_id), group.clock.now)
            if len(group.replica_ids) == 1 and group.runner.num_steps > num_steps:
                self._measure(group.runner)
            if group.runner.num_steps == num_steps:  # stalled: only an arrival or a regroup can unblock it
                if not arrivals.has_next() and not self._watch(group.clock.now, force=True):
                    raise RuntimeError(f"group {group.replica_ids} stalled with nothing left to arrive")
                if arrivals.has_next():
                    group.clock.jump_to(max(arrivals.next_time(), group.clock.now))
                continue
            self._watch(group.clock.now)
        self.result.num_preemptions_total = self._retired_preemptions + sum(
            g.scheduler.num_preemptions_total for g in self.groups
        )
        self.result.wall_seconds = time.perf_counter() - wall_start
        return self.result

    def _add(self, index: int, arrival_s: float, live: dict) -> None:
        group = min(
            self.groups,
            key=lambda g: (
                len(g.scheduler.waiting) + len(g.scheduler.running),
                -g.scheduler.block_manager.num_free_blocks,
            ),
        )
        group.clock.jump_to(arrival_s)  # an idle group starts now; a busy one takes it after its step
        r = self.requests[index]
        self.result.records[index].arrival_s = arrival_s
        self.arrivals.append(arrival_s)
        group.core.add_request(_add_message(index, r, arrival_s))
        if r.max_tokens > r.num_output_tokens:
            self.eos_after[str(index)] = r.num_output_tokens
        if (request := group.scheduler.requests.get(str(index))) is not None:
            live[str(index)] = request

    def _watch(self, now: float, force: bool = False) -> bool:
        """The memory monitor over all groups; True if a regroup happened. `force`: a stalled group samples now."""
        blocks = [g.scheduler.block_manager for g in self.groups]
        num_used, num_total = sum(b.num_used_blocks for b in blocks), sum(b.num_blocks for b in blocks)
        if self._restore_at is not None and now >= self._restore_at:  # the reload is done: switch
            self._restore_at = None
            if self._regroup([(i,) for i in range(self.config.num_replicas)]):
                self.result.num_restores += 1
                return True
        if not self.monitor.observe(now, num_used, num_total) and not force:
            return False
        waiting = [r for g in self.groups for r in g.scheduler.waiting]
        num_pending = sum(blocks[0].num_blocks_for(r.num_tokens) for r in waiting)
        num_free = num_total - num_used
        usage = num_used / max(1, num_total)
        throttled = usage >= self.config.monitor.drop_usage and num_pending >= num_free and num_pending > 0
        if throttled and self.result.throttled_s is None:
            self.result.throttled_s = now
        can_drop = self.config.mode.startswith("drop") and len(self.groups) > 1
        if throttled and not can_drop and self.result.limit_s is None:
            self.result.limit_s = now
        if not self.config.mode.startswith("drop"):
            return False
        if self.monitor.should_drop(num_pending, num_free):
            self._restore_at = None  # the spike is back: a restore in progress is cancelled
            if len(self.groups) < 2:  # one group already: nothing left to drop
                return False
            if self.config.mode == "drop" and not self._estimate(now, waiting, num_free).pays_off:
                self.result.num_drops_refused += 1
                return False
            demand = num_pending - num_free
            plan = plan_drop([g.replica_ids for g in self.groups], self.config.drop.layer_blocks, demand)
            if not plan.is_empty and self._regroup(list(plan.groups)):
                self.result.num_drops += 1
                return True
        elif (
            any(len(g.replica_ids) > 1 for g in self.groups)
            and self._restore_at is None
            and self.monitor.should_restore(
                len(waiting), num_used, self.config.num_replicas * self.num_blocks
            )
        ):  # restore while serving (engine/replicas.py begin_restore): the pipeline serves during the reload
            self._restore_at = now + self.config.drop.reload_s
        return False

    def _measure(self, runner: SimulatedRunner) -> None:
        """EWMAs of a DP step and, from steps that are mostly prefill, of the seconds per prompt token."""
        shape, seconds = runner.last_shape, runner.last_seconds
        self.dp_step_s = seconds if not self.dp_step_s else 0.8 * self.dp_step_s + 0.2 * seconds
        num_tokens = shape.prefill_tokens + shape.num_decode
        if num_tokens and shape.prefill_tokens >= 0.8 * num_tokens:
            per_token = seconds / num_tokens
            self.dp_token_s = per_token if not self.dp_token_s else 0.8 * self.dp_token_s + 0.2 * per_token

    def _estimate(self, now: float, waiting: list, num_free: int) -> DropEstimate:
        """The cost check with the drop model's numbers: a 2-stage merge moves half of each running block's
        layers, and the pipeline step is (m + k − 1) / m data-parallel steps (PipelineSimRunner, linear cost)."""
        drop, k = self.config.drop, 2
        running = [r for g in self.groups for r in g.scheduler.running]
        num_blocks = sum(len(set(r.block_ids)) for r in running)
        costs = DropCosts(
            exchange_s=num_blocks * (k - 1) / k * drop.exchange_s_per_block,
            step_s=self.dp_step_s,
            token_s=self.dp_token_s,
            arrival_rate=arrival_rate(self.arrivals, now, self.config.monitor),
            dwell_s=self.config.monitor.min_pipeline_s,
            slowdown=(drop.micro_batches + k - 1) / drop.micro_batches,
        )
        return estimate_drop(running, waiting, num_free, self.config.scheduler.block_size, costs)

    def _regroup(self, layouts: list[tuple[int, ...]]) -> bool:
        kept = [g for g in self.groups if g.replica_ids in layouts]
        old = [g for g in self.groups if g.replica_ids not in layouts]
        new = [ids for ids in layouts if ids not in {g.replica_ids for g in kept}]
        moves = plan_moves(
            [(g.replica_ids, g.scheduler) for g in old], new, {i: self._capacity(i) for i in new}
        )
        if not old or moves is None:
            return False
        start = max(g.clock.now for g in old)  # the steps in flight end first
        k = max(len(ids) for ids in [*new, *(g.replica_ids for g in old)])
        moved = sum(len(m.block_map) for m in moves.values())
        stall = moved * (k - 1) / k * self.config.drop.exchange_s_per_block
        self._retired_preemptions += sum(g.scheduler.num_preemptions_total for g in old)
        groups = {ids: self._group(ids, VirtualClock(start + stall)) for ids in new}
        for (_, ids), move in moves.items():
            adopt(groups[ids].scheduler, move)
        self.groups = sorted(kept + list(groups.values()), key=lambda g: g.replica_ids)
        self.monitor.reset(start + stall)
        self.result.capacity.append((start + stall, self.total_blocks))
        self.result.regroup_seconds.append(stall)
        return True


def simulate_replicas(
    requests: list[SimRequest], cost_model: CostModel, config: ReplicaSimConfig
) -> ReplicaSimResult:
    """Replay `requests` through N simulated replicas in `config.mode` (see the module doc)."""
    return _ReplicaSim(requests, cost_model, config).run()
