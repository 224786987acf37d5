"""EngineCore: add / abort / step / stats around the scheduler and a runner. No I/O, no processes.

The engine process (`engine/process.py`) is a loop around it; tests drive it directly with a tiny model or a
fake runner; the simulator will drive it with a cost model. One step is three calls:

    output = scheduler.schedule();  model_output = runner.execute(output);  deltas = scheduler.update(...)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from engine.batch import ModelOutput, SchedulerOutput
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.policy import make_policy
from engine.protocol import AddRequest, BatchComposition, EngineStats, QueueStat, Ready, TokenDelta
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler
from engine.swap import SwapSpace

logger = logging.getLogger(__name__)

MAX_QUEUE_STATS = 64  # (tenant, app, class) groups per EngineStats; the rest merge into "other" per class


class Runner(Protocol):
    """What the core needs from a model runner (engine/runner.py, or a fake in tests)."""

    num_kv_blocks: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    model_name: str
    device: str

    def execute(self, output: SchedulerOutput) -> ModelOutput: ...


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: Runner, check_invariants: bool = False) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.check_invariants = check_invariants
        self._pending: list[TokenDelta] = []  # deltas produced outside a step (refusals, aborts)
        self._last_step_seconds = 0.0

    def add_request(self, msg: AddRequest) -> None:
        if msg.request_id in self.scheduler.requests:
            raise ValueError(f"duplicate request id {msg.request_id!r}")
        if (refusal := self.scheduler.add_request(Request.from_message(msg))) is not None:
            logger.info("refused %s: %s", msg.request_id, refusal.error)
            self._pending.append(refusal)

    def abort(self, request_ids: list[str]) -> None:
        self._pending.extend(self.scheduler.abort(request_ids))

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished or bool(self._pending)

    def step(self) -> list[TokenDelta]:
        """Run one schedule → execute → update if there is anything to run; return every delta since the last step."""
        deltas, self._pending = self._pending, []
        if not self.scheduler.has_unfinished:
            return deltas
        start = time.perf_counter()
        output = self.scheduler.schedule()
        if not output.is_empty:
            model_output = self.runner.execute(output)
            deltas.extend(self.scheduler.update(output, model_output))
        self._last_step_seconds = time.perf_counter() - start
        if self.check_invariants:
            self.scheduler.check_invariants()
        return deltas

    def stats(self) -> EngineStats:
        scheduler, blocks = self.scheduler, self.scheduler.block_manager
        return EngineStats(
            timestamp=time.time(),
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            num_preempted=sum(1 for r in scheduler.waiting if r.status == RequestStatus.PREEMPTED),
            num_free_blocks=blocks.num_free_blocks,
            num_total_blocks=blocks.num_blocks,
            kv_usage=blocks.usage,
            num_preemptions_total=scheduler.num_preemptions_total,
            num_prompt_tokens_total=scheduler.num_prompt_tokens_total,
            num_generation_tokens_total=scheduler.num_generation_tokens_total,
            prefix_cache_queries_total=blocks.prefix_cache_queries,
            prefix_cache_hits_total=blocks.prefix_cache_hits,
            num_steps_total=scheduler.num_steps_total,
            last_step_seconds=self._last_step_seconds,
            num_cached_free_blocks=blocks.num_cached_free_blocks,
            batch=scheduler.last_batch if scheduler.running else BatchComposition(),
            queues=queue_stats(scheduler.waiting, scheduler.running),
            extra=kv_extra(scheduler) | slo_extra(scheduler),
        )

    def ready_message(self) -> Ready:
        return Ready(
            model_name=self.runner.model_name,
            max_model_len=self.runner.max_model_len,
            block_size=self.scheduler.block_manager.block_size,
            num_kv_blocks=self.scheduler.block_manager.num_blocks,
            device=self.runner.device,
            policy=self.scheduler.policy.name,
            max_blocks_per_request=self.scheduler.block_manager.num_blocks,
        )


def kv_extra(scheduler: Scheduler) -> dict[str, float]:
    """KV in tokens as E1 reports it: written (computed tokens of running requests) and, under a KV ledger,
    reserved (EcoServe exact allocation): the gap is what reservations hold back or lend."""
    extra = {"kv_written_tokens": float(sum(r.num_computed_tokens for r in scheduler.running))}
    if isinstance(reserved := getattr(scheduler.ledger, "num_reserved_tokens", None), int):
        extra["kv_reserved_tokens"] = float(reserved)
    return extra


def slo_extra(scheduler: Scheduler) -> dict[str, float]:
    """QLM as reports read it: the policy's violation-check gauges (engine/qlm.py), and preemptions so far that
    swapped (vs recomputed) and that were evictions for an urgent request (vs KV pressure)."""
    return scheduler.policy.slo.gauges() | {
        "num_swaps_total": float(scheduler.num_swaps_total),
        "num_evictions_total": float(scheduler.num_evictions_total),
        "model_swaps_total": float(scheduler.num_model_swaps_total),
    }


def queue_stats(
    waiting: Iterable[Request], running: Iterable[Request], max_groups: int = MAX_QUEUE_STATS
) -> list[QueueStat]:
    """Requests grouped by (tenant, app, SLO class), the most requests first. Past `max_groups` groups the
    rest merge into one ("other", "other", class) group per class, so class totals stay exact."""
    counts: dict[tuple[str, str, str], list[int]] = {}  # key -> [waiting, running, kv blocks]
    for column, requests in ((0, waiting), (1, running)):
        for r in requests:
            app_id = "" if r.app_id == r.request_id else r.app_id  # no app id given: one bucket, not N
            row = counts.setdefault((r.tenant, app_id, r.slo_class), [0, 0, 0])
            row[column] += 1
            row[2] += len(r.block_ids)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1][0] - kv[1][1], -kv[1][2], kv[0]))
    others: dict[str, list[int]] = {}
    for (_, _, slo_class), row in ranked[max_groups:]:
        merged = others.setdefault(slo_class, [0, 0, 0])
        for i, n in enumerate(row):
            merged[i] += n
    groups = [(*key, *row) for key, row in ranked[:max_groups]]
    groups += [("other", "other", slo_class, *row) for slo_class, row in sorted(others.items())]
    return [QueueStat(*group) for group in groups]


def build_scheduler(
    config: EngineConfig, runner: Runner, clock: Callable[[], float] = time.monotonic
) -> Scheduler:
    sched = config.scheduler
    block_manager = BlockManager(runner.num_kv_blocks, sched.block_size, sched.enable_prefix_caching)
    return Scheduler(
        sched,
        block_manager,
        make_policy(sched.policy, sched),
        runner.max_model_len,
        runner.eos_token_ids,
        clock,
        # Host swap space for QLM eviction, where the runner has one (its bandwidth measured at start-up).
        SwapSpace(getattr(runner, "num_host_blocks", 0), getattr(runner, "swap_seconds_per_block", 0.0)),
        # The models it serves (QLM model swapping), the first resident, with their measured load times.
        getattr(runner, "model_names", (runner.model_name,)),
        getattr(runner, "model_load_seconds", {}),
    )


def build_engine_core(config: EngineConfig, check_invariants: bool = False) -> EngineCore:
    """Load the model (this takes seconds) and wire the scheduler to it. With several replicas (KunServe), the
    core is a ReplicaEngine (engine/replicas.py) with the same five methods."""
    if config.device.replicas > 1 or "," in config.device.device:
        if config.model.extra_models:
            raise ValueError(
                "several models (model swapping) are served on one replica only, not with --replicas"
            )
        from engine.replicas import build_replica_engine

        return build_replica_engine(config, check_invariants)
    from engine.runner import ModelRunner  # torch lives behind this import

    runner = ModelRunner(config.model, config.device, config.scheduler.block_size)
    warmup_seconds = runner.warmup()  # kernels built and shapes seen before traffic, not on the first request
    core = EngineCore(build_scheduler(config, runner), runner, check_invariants)
    logger.info(
        "engine ready: model %s on %s, %d KV blocks of %d tokens, policy %s (warm-up %.1fs)",
        runner.model_name,
        runner.device,
        runner.num_kv_blocks,
        config.scheduler.block_size,
        config.scheduler.policy,
        warmup_seconds,
    )
    return core
