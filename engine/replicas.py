"""ReplicaEngine: N replicas of one model in the one engine process, data-parallel until KunServe drops parameters.

The engine is a list of groups. A group is one scheduler (its own block manager, ledger, queues) over one KV block
space, and a runner: a plain ModelRunner for a group of one replica (data-parallel mode, exactly the
single-replica engine), a PipelineRunner for k ≥ 2 (engine/pipeline.py). The policy's balancer places new requests
(engine/balance.py): the least-loaded group, or for qlm and kairos the least estimated QLM waiting time.

    data-parallel      [r0: all layers, pool n0]   [r1: all layers, pool n1]
         │ drop (monitor votes, plan_drop merges)          ▲ restore (monitor votes; the requests fit the DP pools)
         ▼                                                  │
    pipeline           [r0: layers 0..L/2, pool P] → [r1: layers L/2..L, pool P]      one block id, both pools

Regroup (drop and restore are the same move): plan where every request of the dissolved groups goes and which
block it gets there (refuse if it does not fit), drop or reload decoder layers, allocate the new pools, exchange
the KV layer by layer (engine/pipeline.py exchange_kv: a layer that stays on its replica is copied on its device,
only the layers that change replica cross, one layer's blocks at a time), free the old pools, and hand the
requests to the new schedulers with their progress. No running request is preempted or restarted. A stage's pool
is sized from its replica's memory: its data-parallel KV bytes plus the bytes of the layers it dropped, divided by
the bytes a block costs for its layers only. So a 2-replica merge grows the pool by (one copy of the layers) //
(block bytes).

Memory accounting on CPU: each replica's weights are its own tensors and the budget (--device-memory or
--kv-cache-memory) is enforced by sizing, as on a GPU, except during a regroup: a replica then holds its old and
new KV pools side by side while the exchange copies (a GPU would need that headroom, or the paper's mapping of
freed weight pages into the pool; untested, no GPU here). The host copy of the layers (for restore) and the
one-layer staging buffers are host memory, which on CPU is the same RAM. Swapped-out requests of a dissolved group are
recomputed (a pipeline group has no host swap pool), and fair-queuing state restarts with the new scheduler.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.core import EngineCore, build_scheduler, queue_stats
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
    split_layers,
)
from engine.model import KVCache
from engine.pipeline import (
    ExchangeBytes,
    PipelineRunner,
    Stage,
    exchange_kv,
    keep_layers,
    layer_bytes,
    reload_layer,
)
from engine.protocol import AddRequest, BatchComposition, EngineStats, Ready, TokenDelta
from engine.request import Request, RequestStatus
from engine.runner import ModelRunner, pick_device
from engine.weights import load_weights

logger = logging.getLogger(__name__)

_TOTALS = (
    "num_preemptions_total",
    "num_prompt_tokens_total",
    "num_generation_tokens_total",
    "prefix_cache_queries_total",
    "prefix_cache_hits_total",
    "num_steps_total",
)


@dataclass
class Group:
    replica_ids: tuple[int, ...]  # stage order
    stages: list[Stage]
    core: EngineCore

    @property
    def scheduler(self):
        return self.core.scheduler


class ReplicaEngine:
    """EngineCore's interface (add_request, abort, has_work, step, stats, ready_message) over replica groups."""

    def __init__(
        self,
        config: EngineConfig,
        runners: list[ModelRunner],
        host_layers: list,
        param_drop: bool,
        monitor: MemoryMonitor,
        clock: Callable[[], float] = time.monotonic,
        check_invariants: bool = False,
    ) -> None:
        self.config, self.runners, self.host_layers = config, runners, host_layers
        self.param_drop, self.monitor, self.clock = param_drop, monitor, clock
        self.check_invariants = check_invariants
        arch = runners[0].model.arch
        self.num_layers = arch.num_layers
        self.block_size = runners[0].block_size
        # A block's bytes for one layer (K and V); a stage with m layers pays m times this per block.
        self.layer_block_bytes = KVCache.bytes_per_block(
            1, self.block_size, arch.num_kv_heads, arch.head_dim, runners[0].model.kv_dtype
        )
        self.layer_bytes = [layer_bytes(layer) for layer in host_layers]
        self.kv_bytes = [r.num_kv_blocks * self.num_layers * self.layer_block_bytes for r in runners]
        self.num_dp_blocks = sum(r.num_kv_blocks for r in runners)  # all pools in data-parallel mode
        self.groups = [self._dp_group(i) for i in range(len(runners))]
        self._pending: list[TokenDelta] = []
        self._retired = dict.fromkeys(_TOTALS, 0)  # counters of schedulers a regroup replaced
        self._last_step_seconds = 0.0
        self.num_drops_total = self.num_restores_total = self.num_drops_refused_total = 0
        # The cost check's measured numbers (engine/kunserve.py estimate_drop): copy bandwidth (a host round trip
        # now, then each regroup's staging), seconds per step and per sampled token in each mode (EWMA).
        self.copy_bytes_per_s = measure_copy_bandwidth(runners[0].device)
        self.dp_step_s = self.dp_prefill_token_s = 0.0
        self._token_s = {False: 0.0, True: 0.0}  # seconds per scheduled token, by is_pipelined
        self.last_estimate: DropEstimate | None = None
        self._arrivals: deque[float] = deque(maxlen=10_000)  # scheduler-clock arrival times, for the rate
        self._reloads: deque[tuple[int, int]] = deque()  # (replica, layer) a restore still has to reload
        self._reloaded_bytes: dict[int, int] = {}  # by replica, during a restore
        self.last_exchange = ExchangeBytes()  # KV bytes the last regroup moved between replicas / kept local
        self.num_placements: dict[str, int] = {}  # balancer placements by reason (engine/balance.py)
        self.freed_weight_bytes = 0  # decoder-layer bytes not resident now (0 in data-parallel mode)

    # ---- the EngineCore interface ------------------------------------------------------------------------

    def add_request(self, msg: AddRequest) -> None:
        if any(msg.request_id in g.scheduler.requests for g in self.groups):
            raise ValueError(f"duplicate request id {msg.request_id!r}")
        self._arrivals.append(self.clock())  # KunServe's cost check reads the arrival rate
        request = Request.from_message(msg)
        balancer = self.groups[0].scheduler.policy.balancer  # every group runs the same policy
        placement = balancer.place(request, [g.scheduler for g in self.groups])
        self.num_placements[placement.reason] = self.num_placements.get(placement.reason, 0) + 1
        group = self.groups[placement.index]
        if (refusal := group.scheduler.add_request(request)) is not None:
            logger.info("refused %s: %s", msg.request_id, refusal.error)
            self._pending.append(refusal)

    def abort(self, request_ids: list[str]) -> None:
        for group in self.groups:  # a group ignores ids it does not hold
            self._pending.extend(group.scheduler.abort(request_ids))

    def has_work(self) -> bool:
        """A restore in progress is work too: its reloads run in step(), also once the requests are done."""
        return (
            bool(self._pending) or bool(self._reloads) or any(g.scheduler.has_unfinished for g in self.groups)
        )

    def step(self) -> list[TokenDelta]:
        """One step of every group with work (one after the other), then the memory monitor's vote."""
        deltas, self._pending = self._pending, []
        start = time.perf_counter()
        for group in self.groups:
            if group.scheduler.has_unfinished:
                deltas.extend(group.core.step())
        self._last_step_seconds = time.perf_counter() - start
        batches = [g.scheduler.last_batch for g in self.groups if g.scheduler.running]
        num_prefill = sum(b.num_prefill_tokens for b in batches)
        if num_tokens := num_prefill + sum(b.num_decode_tokens for b in batches):
            self._measure_step(self._last_step_seconds, num_tokens, num_prefill)
        self._watch_memory()
        if self._reloads:
            self._reload_some()
        return deltas

    # ---- KunServe ----------------------------------------------------------------------------------------

    @property
    def is_pipelined(self) -> bool:
        return any(len(g.replica_ids) > 1 for g in self.groups)

    def _watch_memory(self) -> None:
        """Sample usage on the scheduler clock; drop or restore on the monitor's vote (engine/kunserve.py)."""
        blocks = [g.scheduler.block_manager for g in self.groups]
        num_used, num_total = sum(b.num_used_blocks for b in blocks), sum(b.num_blocks for b in blocks)
        if not self.monitor.observe(self.clock(), num_used, num_total):
            return
        waiting = [r for g in self.groups for r in g.scheduler.waiting]
        num_pending = sum(
            blocks[0].num_blocks_for(r.num_tokens) for r in waiting
        )  # one block size everywhere
        num_free = num_total - num_used
        if self.param_drop and self.monitor.should_drop(num_pending, num_free):
            if self._reloads:  # the spike is back before the restore finished: serve on as a pipeline
                self._cancel_restore()
                return
            if len(self.groups) < 2:  # one group already: nothing left to drop
                return
            if self.monitor.config.cost_check:
                self.last_estimate = estimate = self._estimate_drop(waiting, num_free)
                if not estimate.pays_off:
                    self.num_drops_refused_total += 1
                    logger.debug(
                        "KunServe drop refused: costs %.2f s > gains %.2f s", *vars(estimate).values()
                    )
                    return
            self.drop((num_pending - num_free) * self.num_layers * self.layer_block_bytes)
        elif (
            self.is_pipelined
            and not self._reloads
            and self.monitor.should_restore(len(waiting), num_used, self.num_dp_blocks)
        ):
            self.begin_restore()

    def _measure_step(self, seconds: float, num_tokens: int, num_prefill: int, alpha: float = 0.2) -> None:
        """EWMAs: a DP step, seconds per scheduled token in each mode, and seconds per prompt token from steps
        that are mostly prefill (decode steps are memory-bound and would overstate a prompt token's cost)."""

        def ewma(old: float, new: float) -> float:
            return new if not old else (1 - alpha) * old + alpha * new

        mode = self.is_pipelined
        if not mode:
            self.dp_step_s = ewma(self.dp_step_s, seconds)
            if num_prefill >= 0.8 * num_tokens:
                self.dp_prefill_token_s = ewma(self.dp_prefill_token_s, seconds / num_tokens)
        self._token_s[mode] = ewma(self._token_s[mode], seconds / num_tokens)

    @property
    def pipeline_slowdown(self) -> float:
        """Measured once both modes have run (seconds per scheduled token, pipeline over data-parallel); before,
        a prior: stages that share one device (CPU) run the same work one after the other either way (1.0);
        on k devices, one micro-batch in flight makes a step k stage-times long where DP ran k batches at once."""
        if self._token_s[True] and self._token_s[False]:
            return self._token_s[True] / self._token_s[False]
        return 1.0 if len({r.device for r in self.runners}) == 1 else float(len(self.runners))

    def exchange_bytes(self, num_blocks: int) -> int:
        """KV bytes a 2-replica merge moves between replicas for `num_blocks` running blocks: about half of the
        layers of each (the ones its replica drops; exchange_kv). Local copies are not counted: on a GPU they run
        at device bandwidth, an order of magnitude above the link's."""
        return (
            num_blocks * (self.num_layers - len(split_layers(self.num_layers, 2)[0])) * self.layer_block_bytes
        )

    def _estimate_drop(self, waiting: list[Request], num_free: int) -> DropEstimate:
        running = [r for g in self.groups for r in g.scheduler.running]
        num_blocks = sum(len(set(r.block_ids)) for r in running)
        costs = DropCosts(
            exchange_s=self.exchange_bytes(num_blocks) / self.copy_bytes_per_s,
            step_s=self.dp_step_s,
            token_s=self.dp_prefill_token_s,
            arrival_rate=arrival_rate(self._arrivals, self.clock(), self.monitor.config),
            dwell_s=self.monitor.config.min_pipeline_s,
            slowdown=self.pipeline_slowdown,
        )
        return estimate_drop(running, waiting, num_free, self.block_size, costs)

    def drop(self, demand_bytes: int) -> bool:
        """Merge groups (plan_drop) until `demand_bytes` of weights are freed or one group is left."""
        plan = plan_drop([g.replica_ids for g in self.groups], sum(self.layer_bytes), demand_bytes)
        if plan.is_empty or not self.regroup(list(plan.groups)):
            return False
        self.num_drops_total += 1
        logger.info(
            "KunServe drop: groups %s, %.1f MB of weights freed", plan.groups, self.freed_weight_bytes / 1e6
        )
        return True

    @property
    def is_restoring(self) -> bool:
        return bool(self._reloads)

    def begin_restore(self) -> bool:
        """Start a restore while serving (papers.md §2.2 item 7): the dropped layers come back from the host copy
        one per engine step (_reload_some), the pipeline serving meanwhile (its stages ignore layers outside their
        range); when all are back, restore() switches to data-parallel. False if the running requests would not
        fit the data-parallel pools (checked now; restore() checks again at the end)."""
        if not self.is_pipelined or self._reloads:
            return False
        dp = [(i,) for i in range(len(self.runners))]
        old = [(g.replica_ids, g.scheduler) for g in self.groups if len(g.replica_ids) > 1]
        if plan_moves(old, dp, {ids: self._pool_blocks(ids) for ids in dp}) is None:
            return False
        self._reloads.extend(
            (r, i)
            for i in range(self.num_layers)  # layer-major: both replicas progress together
            for r, runner in enumerate(self.runners)
            if runner.model.weights.layers[i] is None
        )
        logger.info("KunServe restore started: %d layers to reload", len(self._reloads))
        return True

    def _reload_some(self) -> None:
        """Reload the next dropped layer while the pipeline's free blocks cover the bytes reloaded so far on that
        replica (the pool is one tensor and cannot shrink, GPU virtual memory would unmap those blocks: this keeps
        the accounting honest by pausing while the pool needs them). Finish with restore() when all are back."""
        replica_id, index = self._reloads[0]
        group = next(g for g in self.groups if replica_id in g.replica_ids)
        stage = next(s for s in group.stages if s.runner is self.runners[replica_id])
        block_bytes = len(stage.layers) * self.layer_block_bytes
        loaded = self._reloaded_bytes.get(replica_id, 0) + self.layer_bytes[index]
        if group.scheduler.block_manager.num_free_blocks * block_bytes < loaded:
            return  # paused: the KV in use now reaches into the memory the layers need
        self._reloads.popleft()
        self._reloaded_bytes[replica_id] = loaded
        reload_layer(self.runners[replica_id], index, self.host_layers)
        if not self._reloads and not self.restore():
            self._cancel_restore()

    def _cancel_restore(self) -> None:
        """Drop the layers a restore had reloaded: the stages keep serving as they were."""
        for group in self.groups:
            for stage in group.stages:
                keep_layers(stage.runner, stage.layers, self.host_layers)
        self._reloads.clear()
        self._reloaded_bytes.clear()
        logger.info("KunServe restore cancelled: pipeline again")

    def restore(self) -> bool:
        """Back to one whole model per replica, if every running request fits the data-parallel pools (layers a
        restore while serving has not reloaded yet are reloaded here, at once)."""
        self._reloads.clear()
        self._reloaded_bytes.clear()
        if not self.is_pipelined or not self.regroup([(i,) for i in range(len(self.runners))]):
            return False
        self.num_restores_total += 1
        logger.info("KunServe restore: data-parallel again")
        return True

    def regroup(self, layouts: list[tuple[int, ...]]) -> bool:
        """Replace the groups whose replica set changes by groups of `layouts` (module docstring). False, with
        nothing touched, if the requests of the dissolved groups do not fit the new pools."""
        kept = [g for g in self.groups if g.replica_ids in layouts]
        old = [g for g in self.groups if g.replica_ids not in layouts]
        new = [ids for ids in layouts if ids not in {g.replica_ids for g in kept}]
        capacity = {ids: self._pool_blocks(ids) for ids in new}
        if not old:
            return False
        if (moves := plan_moves([(g.replica_ids, g.scheduler) for g in old], new, capacity)) is None:
            logger.info("regroup to %s refused: the running requests do not fit the new pools", layouts)
            return False
        for ids in new:  # weights first: a replica that drops layers frees them before its new pool exists
            for replica_id, layers in zip(ids, split_layers(self.num_layers, len(ids)), strict=True):
                keep_layers(self.runners[replica_id], layers, self.host_layers)
        old_stages = [list(g.stages) for g in old]  # their pools live until the exchange has read them
        for group in old:
            self._retire(group)
        groups = {ids: self._build_group(ids, capacity[ids]) for ids in new}
        copy_start, tally = time.perf_counter(), ExchangeBytes()
        for (gi, ids), move in moves.items():
            if move.block_map:
                src_ids, dst_ids = list(move.block_map), list(move.block_map.values())
                exchange_kv(old_stages[gi], groups[ids].stages, src_ids, dst_ids, tally)
            adopt(groups[ids].scheduler, move)
        copy_s = time.perf_counter() - copy_start
        old_stages.clear()  # frees the old pools
        self.last_exchange = tally
        if tally.moved and copy_s > 0:
            self.copy_bytes_per_s = 0.5 * self.copy_bytes_per_s + 0.5 * (tally.moved + tally.local) / copy_s
        for runner in self.runners:
            runner.forget_generators()
        self.groups = sorted(kept + list(groups.values()), key=lambda g: g.replica_ids)
        self.freed_weight_bytes = sum(self.layer_bytes) * (len(self.runners) - len(self.groups))
        self.monitor.reset(self.clock())
        return True

    def _pool_blocks(self, ids: tuple[int, ...]) -> int:
        """Blocks a group of `ids` can hold: every stage must hold every block, for its own layers."""
        counts = []
        for replica_id, layers in zip(ids, split_layers(self.num_layers, len(ids)), strict=True):
            dropped = sum(b for i, b in enumerate(self.layer_bytes) if i not in layers)
            counts.append((self.kv_bytes[replica_id] + dropped) // (len(layers) * self.layer_block_bytes))
        return min(counts)

    def _retire(self, group: Group) -> None:
        """Keep the counters of a scheduler that goes away, and let go of its KV pools (the exchange holds them
        until it has read them)."""
        stats = group.core.stats()
        for name in _TOTALS:
            self._retired[name] += getattr(stats, name)
        for stage in group.stages:
            stage.runner.kv_cache = None
        group.stages.clear()

    def _build_group(self, ids: tuple[int, ...], num_blocks: int) -> Group:
        if len(ids) == 1:
            runner = self.runners[ids[0]]
            runner.kv_cache = runner.model.allocate_kv_cache(num_blocks, self.block_size)
            return self._dp_group(ids[0])
        stages = []
        for replica_id, layers in zip(ids, split_layers(self.num_layers, len(ids)), strict=True):
            runner = self.runners[replica_id]
            runner.kv_cache = runner.model.allocate_kv_cache(
                num_blocks, self.block_size, num_layers=len(layers)
            )
            stages.append(Stage(runner, layers, runner.kv_cache))
        pipeline = PipelineRunner(stages)
        core = EngineCore(build_scheduler(self.config, pipeline, self.clock), pipeline, self.check_invariants)
        return Group(ids, stages, core)

    def _dp_group(self, replica_id: int) -> Group:
        runner = self.runners[replica_id]
        core = EngineCore(build_scheduler(self.config, runner, self.clock), runner, self.check_invariants)
        return Group((replica_id,), [Stage(runner, range(self.num_layers), runner.kv_cache)], core)

    # ---- observability -----------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        parts = [g.core.stats() for g in self.groups]
        waiting = [r for g in self.groups for r in g.scheduler.waiting]
        running = [r for g in self.groups for r in g.scheduler.running]
        num_total = sum(p.num_total_blocks for p in parts)
        num_free = sum(p.num_free_blocks for p in parts)
        extra: dict[str, float] = {}
        for part in parts:
            for key, value in part.extra.items():
                extra[key] = extra.get(key, 0.0) + value  # counts and token totals add up over groups
        extra |= {
            "kunserve_drops_total": float(self.num_drops_total),
            "kunserve_restores_total": float(self.num_restores_total),
            "kunserve_drops_refused_total": float(self.num_drops_refused_total),
            "kunserve_restoring": float(self.is_restoring),
            "kunserve_freed_weight_bytes": float(self.freed_weight_bytes),
            "kunserve_monitor_usage": self.monitor.usage,
        }
        extra |= {f"dispatch_{reason}_total": float(n) for reason, n in self.num_placements.items()}
        return EngineStats(
            timestamp=time.time(),
            num_running=len(running),
            num_waiting=len(waiting),
            num_preempted=sum(1 for r in waiting if r.status == RequestStatus.PREEMPTED),
            num_free_blocks=num_free,
            num_total_blocks=num_total,
            kv_usage=(num_total - num_free) / max(1, num_total),
            **{name: self._retired[name] + sum(getattr(p, name) for p in parts) for name in _TOTALS},
            last_step_seconds=self._last_step_seconds,
            num_cached_free_blocks=sum(p.num_cached_free_blocks for p in parts),
            batch=BatchComposition(
                **{
                    f.name: sum(getattr(p.batch, f.name) for p in parts)
                    for f in dataclasses.fields(BatchComposition)
                }
            ),
            queues=queue_stats(waiting, running),
            extra=extra,
            replica_groups=[list(g.replica_ids) for g in self.groups],
        )

    def ready_message(self) -> Ready:
        return Ready(
            model_name=self.runners[0].model_name,
            max_model_len=self.runners[0].max_model_len,
            block_size=self.block_size,
            num_kv_blocks=sum(g.scheduler.block_manager.num_blocks for g in self.groups),
            device=",".join(r.device for r in self.runners),
            policy=self.groups[0].scheduler.policy.name,
            # a request may be placed on any group, so it must fit the smallest data-parallel pool; a drop only
            # grows pools, so the server's check at Ready stays true in pipeline mode
            max_blocks_per_request=min(g.scheduler.block_manager.num_blocks for g in self.groups),
        )


def measure_copy_bandwidth(device: str, num_bytes: int = 8 << 20) -> float:
    """Bytes per second of a device -> host -> device round trip of `num_bytes` (the KV exchange's path), one
    direction's worth: 2 * bytes / seconds. A regroup then refines it with its own staging time."""
    x = torch.empty(num_bytes // 4, dtype=torch.float32, device=device)
    start = time.perf_counter()
    y = x.cpu().to(device, copy=True)
    if y.is_cuda:
        torch.cuda.synchronize(y.device)
    return 2 * num_bytes / max(time.perf_counter() - start, 1e-9)


def replica_devices(device: str, num_replicas: int) -> list[str]:
    """'cuda:0,cuda:1' -> one replica per listed device; 'auto' -> cuda:0..N-1 where CUDA is present (untested
    here: no GPU on the development machine), else N CPU replicas; 'cpu' / 'cuda:i' -> N replicas there."""
    if "," in device:
        devices = [d.strip() for d in device.split(",") if d.strip()]
        if num_replicas > 1 and num_replicas != len(devices):
            raise ValueError(f"--replicas {num_replicas} but {len(devices)} devices listed")
        return devices
    picked = pick_device(device)
    if picked == "cuda" and num_replicas > 1:
        if num_replicas > torch.cuda.device_count():
            raise ValueError(f"--replicas {num_replicas} but {torch.cuda.device_count()} CUDA devices")
        return [f"cuda:{i}" for i in range(num_replicas)]
    return [picked] * num_replicas


def build_replica_engine(config: EngineConfig, check_invariants: bool = False) -> ReplicaEngine:
    """Load one ModelRunner per replica (each its own weights and KV pool from its own budget), plus one host
    copy of the decoder layers that restores reload from."""
    from engine.model_store import resolve_model
    from engine.runner import _DTYPES

    dev = config.device
    devices = replica_devices(dev.device, dev.replicas)
    runners = []
    for device in devices:
        runner = ModelRunner(
            config.model, dataclasses.replace(dev, device=device), config.scheduler.block_size
        )
        runner.warmup()
        runners.append(runner)
    host = load_weights(resolve_model(config.model.model), dtype=_DTYPES[config.model.dtype], device="cpu")
    param_drop = dev.param_drop == "on" or (dev.param_drop == "auto" and len(runners) >= 2)
    monitor = MemoryMonitor(
        MonitorConfig(
            dev.monitor_interval_s,
            dev.monitor_window,
            dev.drop_usage,
            dev.restore_usage,
            dev.min_pipeline_s,
            dev.restore_fit_usage,
        )
    )
    engine = ReplicaEngine(
        config, runners, host.layers, param_drop, monitor, check_invariants=check_invariants
    )
    logger.info(
        "%d replicas on %s, %d KV blocks each, parameter drop %s",
        len(runners),
        ",".join(devices),
        runners[0].num_kv_blocks,
        "on" if param_drop else "off",
    )
    return engine
