"""KunServe's two small decisions (papers.md §2): when to drop or restore parameters, and which replicas merge.

MemoryMonitor   samples KV usage (blocks in use / all blocks) every `interval_s` of the scheduler clock into a
                `window`-sample ring, and votes as the authors' `FlashBackend.vote_for` does:
                  drop     usage ≥ drop_usage (95 %)  and  pending blocks ≥ free blocks  (and something is pending)
                  restore  nothing pending  and  usage ≤ restore_usage (50 %)  and  usage falling over the window
                           (least-squares slope < 0), plus two guards against flapping (below)
                Restore hysteresis (ours; the authors' restore path is the bare rule, its request transfer commented
                out): no restore within `min_pipeline_s` of the last regroup, and only if the data-parallel pools
                would hold the blocks in use now at ≤ restore_fit_usage (80 %) of their size: a restore that lands
                at ≥ drop_usage (95 %) re-triggers a drop at the next burst of decode growth, which the CPU run of
                E4 showed (drop, restore 4.7 s later, preemption, drop again).
plan_drop       the greedy plan: start from the current groups, merge the two smallest (a min-heap, O(N log N))
                until the freed weight bytes cover the pending demand. A group of k replicas keeps one copy of the
                layers, split into k contiguous ranges (`split_layers`), so each merge frees one copy's layers.

estimate_drop   the cost check before a drop (ours; the paper's plan only weighs memory against pipeline depth):
                drop only if the request-seconds it adds (the KV exchange stall for every request in flight, and
                the pipeline's slower steps for every token still to decode and prompt still to prefill) are fewer
                than the request-seconds of queueing it saves (each pending request's wait for running requests to
                finish and free its blocks, beyond its wait for the prefills ahead of it).

plan_moves /    where each request of a dissolved group goes in a regroup, and its blocks' ids there; handing
adopt           them to the new scheduler with their progress (shared by engine/replicas.py and the simulator).

Torch-free; engine/replicas.py acts on all of them, engine/kunserve_sim.py simulates them.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from engine.request import Request
from engine.scheduler import Scheduler


@dataclass(frozen=True)
class MonitorConfig:
    interval_s: float = 0.1  # CHECK_EVENTS_INTERVAL in the authors' coordinator
    window: int = 30  # samples; "falling" is judged over the whole window
    drop_usage: float = 0.95  # oom_rate
    restore_usage: float = 0.5  # valley_rate
    min_pipeline_s: float = 5.0  # dwell: seconds in pipeline mode (since the last regroup) before a restore
    restore_fit_usage: float = 0.8  # the DP pools must hold the used blocks at ≤ this fraction (< drop_usage)
    cost_check: bool = True  # drop only when estimate_drop says it pays off


class MemoryMonitor:
    def __init__(self, config: MonitorConfig = MonitorConfig()) -> None:
        self.config = config
        self._samples: deque[float] = deque(maxlen=config.window)
        self._next_sample_at = float("-inf")
        self._regrouped_at = float("-inf")  # scheduler clock of the last regroup (the dwell counts from it)
        self._now = float("-inf")  # the last sample's time

    @property
    def usage(self) -> float:
        """The last sample (0 before the first)."""
        return self._samples[-1] if self._samples else 0.0

    @property
    def slope(self) -> float:
        """Least-squares slope of the window, in usage per sample (0 with fewer than two samples). The authors sum
        the per-sample rates, which telescopes to last − first and so rests on two noisy samples; the fit weighs all
        of them, so a window that hovers does not read as falling because its last sample dipped."""
        n = len(self._samples)
        if n < 2:
            return 0.0
        mean_x, mean_y = (n - 1) / 2, sum(self._samples) / n
        num = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(self._samples))
        return num / sum((x - mean_x) ** 2 for x in range(n))

    def observe(self, now: float, num_used_blocks: int, num_total_blocks: int) -> bool:
        """Take a sample if one is due at `now` (seconds, the scheduler's clock); True if one was taken."""
        if (
            now < self._next_sample_at - 1e-9
        ):  # a clock ticking by exactly interval_s must not skip for rounding
            return False
        self._samples.append(num_used_blocks / max(1, num_total_blocks))
        self._next_sample_at = now + self.config.interval_s
        self._now = now
        return True

    def reset(self, now: float) -> None:
        """A regroup happened at `now`: forget the window (the pool changed size, so old samples compare unlike
        with like, and a drop's sudden fall in usage must not read as "falling" and restore at once), and start
        the dwell."""
        self._samples.clear()
        self._regrouped_at = now

    def should_drop(self, num_pending_blocks: int, num_free_blocks: int) -> bool:
        # The authors vote with pending ≥ free alone; with nothing pending a full pool frees itself by finishing
        # requests, so a drop would buy memory nobody asked for.
        return (
            self.usage >= self.config.drop_usage
            and num_pending_blocks > 0
            and num_pending_blocks >= num_free_blocks
        )

    def should_restore(self, num_pending_requests: int, num_used_blocks: int, num_dp_blocks: int) -> bool:
        """Restore vote in pipeline mode: `num_used_blocks` of the groups now (a block is block_size tokens of
        every layer in either mode, so the count carries over), `num_dp_blocks` all data-parallel pools."""
        c = self.config
        if num_pending_requests or len(self._samples) < c.window:
            return False
        if self._now - self._regrouped_at < c.min_pipeline_s - 1e-9:
            return False
        if num_used_blocks > c.restore_fit_usage * num_dp_blocks:
            return False
        return self.usage <= c.restore_usage and self.slope < 0


@dataclass(frozen=True)
class DropCosts:
    """The measured numbers a drop decision uses (engine/replicas.py measures them, the simulator models them).
    slowdown: a pipeline step over a data-parallel step for the same requests (≤ 1 counts as no cost)."""

    exchange_s: float  # the KV exchange's stall: bytes that change device / measured copy bandwidth
    step_s: float  # one data-parallel step now (a decode token of every running request)
    token_s: float  # data-parallel seconds per prompt token (measured on prefill-heavy steps)
    slowdown: float
    arrival_rate: float = 0.0  # requests per second lately (over the monitor's window)
    dwell_s: float = 0.0  # the least time a drop stays (MonitorConfig.min_pipeline_s)


@dataclass(frozen=True)
class DropEstimate:
    cost_s: float  # request-seconds the drop adds
    gain_s: float  # request-seconds of queueing it saves

    @property
    def pays_off(self) -> bool:
        return self.cost_s < self.gain_s


def arrival_rate(arrivals: deque[float], now: float, config: MonitorConfig) -> float:
    """Requests per second over the monitor's window (window × interval seconds) up to `now`."""
    span = config.window * config.interval_s
    return sum(1 for t in arrivals if now - span <= t <= now) / span


def remaining_tokens(request: Request) -> int:
    """Tokens it may still decode (max_tokens bounds it: an EOS ends it sooner, so this overstates both terms)."""
    return max(0, request.sampling.max_tokens - request.num_output_tokens)


def estimate_drop(
    running: list[Request], waiting: list[Request], num_free_blocks: int, block_size: int, costs: DropCosts
) -> DropEstimate:
    """Both sides in request-seconds, so a stall that hits 200 requests weighs 200 times.

    gain: without a drop a pending request waits for memory. Modelled as FCFS admission with each request's
          final size (tokens + remaining tokens) reserved: running requests hold theirs and return it when they
          end (remaining tokens x step_s from now), a queued request is admitted once its final size is free and
          returns it max_tokens steps after admission, so the queue waits through as many turnovers of the pool
          as it needs. Recompute preemption only adds to the wait. A queue also waits for compute: the prefills
          queued before it and its own take token_s per prompt token in either mode, so only the memory wait
          beyond that compute wait is saved. And the burst goes on: the requests that arrive (arrival_rate)
          during the last pending request's excess wait T wait T / 2 on average.
    cost: every request in flight stalls `exchange_s`; while the group is a pipeline, every token still to decode
          takes (slowdown − 1) · step_s longer, and every pending request's compute wait (slowdown − 1) times
          longer. (E4's Azure-code burst, long prompts and short outputs, is the case this refuses: its queue
          waits for prefill compute, which the pipeline makes slower, not for memory.)"""

    def final_blocks(r: Request) -> int:
        return -(-(r.num_tokens + remaining_tokens(r)) // block_size)

    held = sum(len(set(r.block_ids)) for r in running)
    capacity = num_free_blocks + held
    available = capacity - sum(final_blocks(r) for r in running)  # < 0: the running set will preempt
    ends = [(remaining_tokens(r) * costs.step_s, final_blocks(r)) for r in running]
    heapq.heapify(ends)
    gain = compute_s = sum_compute_s = excess_s = now_s = 0.0
    for request in waiting:
        need = min(final_blocks(request), capacity)
        while available < need and ends:
            now_s, blocks = heapq.heappop(ends)
            available += blocks
        available -= need
        heapq.heappush(ends, (now_s + remaining_tokens(request) * costs.step_s, need))
        compute_s += request.num_tokens * costs.token_s
        sum_compute_s += compute_s
        excess_s = max(0.0, now_s - compute_s)
        gain += excess_s
    # The burst goes on. Arrivals bring prefill work at a load rho = rate x mean prompt x token_s; if rho < 1,
    # those arriving during the last pending request's excess wait T wait T / 2 on average, for memory only
    # (weighted by 1 − rho, the share of time compute is idle); if rho ≥ 1 the burst is compute-bound, they would
    # wait for compute anyway, and the pipeline makes that compute slower for as long as it lasts (≥ the dwell).
    mean_prompt = sum(r.num_tokens for r in waiting) / max(1, len(waiting))
    rho = costs.arrival_rate * mean_prompt * costs.token_s
    gain += max(0.0, 1.0 - rho) * costs.arrival_rate * excess_s * excess_s / 2
    num_tokens = sum(remaining_tokens(r) for r in running) + sum(remaining_tokens(r) for r in waiting)
    slower = max(0.0, costs.slowdown - 1.0)
    cost = costs.exchange_s * (len(running) + len(waiting)) + slower * (
        costs.step_s * num_tokens + sum_compute_s
    )
    if rho >= 1.0:  # every arrival during the dwell waits (slowdown − 1) x the backlog's compute longer
        backlog_s = (rho - 1.0) * costs.dwell_s / 2  # the compute queue grows at rho − 1 s per s
        cost += slower * costs.arrival_rate * costs.dwell_s * (backlog_s + mean_prompt * costs.token_s)
    return DropEstimate(cost, gain)


@dataclass(frozen=True)
class DropPlan:
    groups: tuple[
        tuple[int, ...], ...
    ]  # replica ids per group after the plan; a group's order is stage order
    freed_bytes: int  # weight bytes the merges free (one copy of the layers per merge)
    num_merges: int

    @property
    def is_empty(self) -> bool:
        return self.num_merges == 0


def plan_drop(groups: list[tuple[int, ...]], layer_bytes: int, demand_bytes: int) -> DropPlan:
    """Merge the two smallest groups until `demand_bytes` are freed or one group is left.

    Merging the smallest keeps the deepest pipeline, and so each request's cooperation cost, as shallow as it
    can be for the memory freed (papers.md §2.5). Two groups that each hold one full copy of the layers keep one:
    `layer_bytes` (the replicated decoder layers of one replica) are freed per merge. Ties break on the lowest
    replica id, so a plan is deterministic."""
    heap = [(len(g), min(g), tuple(g)) for g in groups]
    heapq.heapify(heap)
    freed = merges = 0
    while freed < demand_bytes and len(heap) >= 2:
        _, _, small = heapq.heappop(heap)
        _, _, other = heapq.heappop(heap)
        merged = tuple(sorted(small + other))
        heapq.heappush(heap, (len(merged), merged[0], merged))
        freed += layer_bytes
        merges += 1
    return DropPlan(tuple(sorted(g for _, _, g in heap)), freed, merges)


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous layer ranges, as equal as can be, the longer ones first: 5 layers, 2 stages -> [0:3), [3:5)."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {num_stages} stages")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for s in range(num_stages):
        stop = start + base + (s < extra)
        ranges.append(range(start, stop))
        start = stop
    return ranges


@dataclass
class Move:
    """Where the requests of one dissolved group go in one new group, and their blocks' new ids."""

    running: list[Request]
    waiting: list[Request]
    block_map: dict[int, int]  # old block id -> new block id (the KV exchange copies these)


def plan_moves(
    old: list[tuple[tuple[int, ...], Scheduler]],
    new: list[tuple[int, ...]],
    capacity: dict[tuple[int, ...], int],
) -> dict[tuple[int, tuple[int, ...]], Move] | None:
    """Each request of a dissolved group (replica ids, scheduler) goes to a new group sharing one of its
    replicas: running ones, the largest first, where the most blocks are left; waiting ones where the fewest
    requests are. None if a running request fits nowhere (the regroup is refused, nothing moves)."""
    moves: dict[tuple[int, tuple[int, ...]], Move] = {}
    used = dict.fromkeys(new, 0)
    count = dict.fromkeys(new, 0)
    for gi, (replica_ids, scheduler) in enumerate(old):
        targets = [ids for ids in new if set(ids) & set(replica_ids)]
        for ids in targets:
            moves[gi, ids] = Move([], [], {})
        for request in sorted(scheduler.running, key=lambda r: -len(r.block_ids)):
            ids = max(targets, key=lambda t: capacity[t] - used[t])
            move = moves[gi, ids]
            fresh = [b for b in dict.fromkeys(request.block_ids) if b not in move.block_map]
            if used[ids] + len(fresh) > capacity[ids]:
                return None
            for block_id in fresh:
                move.block_map[block_id] = used[ids]
                used[ids] += 1
            move.running.append(request)
            count[ids] += 1
        for request in scheduler.waiting:
            ids = min(targets, key=lambda t: count[t])
            moves[gi, ids].waiting.append(request)
            count[ids] += 1
        order = {id(r): i for i, r in enumerate(scheduler.running)}
        for ids in targets:  # keep admission order: the newest running request stays last
            moves[gi, ids].running.sort(key=lambda r: order[id(r)])
    return moves


def adopt(scheduler: Scheduler, move: Move) -> None:
    """Hand requests to a new scheduler with their progress: running ones with their KV in their new blocks
    (re-admitted to its ledger), waiting ones as they were, a swapped-out one as a recompute (its host blocks
    belonged to the dissolved group). Fair-queuing observers see them arrive again."""
    for request in move.running:
        request.block_ids = [move.block_map[b] for b in request.block_ids]
        scheduler.block_manager.adopt(request)
        scheduler.requests[request.request_id] = request
        scheduler.running.append(request)
        scheduler.ledger.admit(request)
        scheduler.policy.observer.on_arrival(request, request.queued_time)
    for request in move.waiting:
        if request.is_swapped:
            request.take_host_blocks()
            request.preempt()
        scheduler.requests[request.request_id] = request
        scheduler.waiting.append(request)
        scheduler.policy.observer.on_arrival(request, request.queued_time)
